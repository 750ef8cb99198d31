"""A study's cohort from a site's OMOP CDM v5.4 database: SQL generated, parameterized, read-only.

The study's [data.omop] section (fedmed.config.OmopConfig) defines the cohort, the features
and the outcome; this module turns it into SQLAlchemy Core statements over explicit CDM Table
objects. No value of the config is ever formatted into SQL: concept ids, ages, days and
windows are bound parameters; the schema name is checked against a strict pattern and then
quoted by SQLAlchemy as an identifier; feature names never reach the database (they label
pandas columns after the rows came back). Connections are read-only (DuckDB
``read_only=True``; PostgreSQL ``default_transaction_read_only=on``), so even a bug here
cannot change a hospital's database.

The database yields an ``Extraction``: one row per person of the cohort (index time, age,
gender, death, end of observation) and the feature observations in the window (person,
feature, minutes since the index time, value). The index is each person's first visit of
the study's visit concepts or, with ``index = "condition"``, first condition of its
condition concepts; its start is minute 0 of every window and of the sequence task.
Everything a task reads is derived from it: the table of the tabular and survival tasks
(``wide_table``: one aggregate per feature plus the outcome) and the long table of the
sequence task (``long_table`` and ``labels``), so every task sees the same cohort. Its
``fingerprint`` (SHA-256 of the cohort definition and of every extracted row, in canonical
order) is what a site registers: a changed cohort is refused until the data steward
registers it again (fedmed.data.registry).

Credentials: a URL must not carry a password; a server's password comes from an environment
variable or a file only its owner can read (``SiteSpec.credentials``: "env:NAME" or
"file:PATH"), is passed to the driver alone, and never appears in a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmed.config import OmopConfig, OmopFeature, echo, omop_dict, parse_omop, plain
from fedmed.errors import ConfigError, DataError

# The URL schemes a site may register -> the SQLAlchemy driver that reads them.
DRIVERS = {
    "duckdb": "duckdb",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}
# The libpq connection parameters a URL may carry (where the server is and how TLS is checked);
# anything else, "options" above all, could undo the read-only session fedmed sets.
POSTGRES_PARAMETERS = (
    "host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl",
    "connect_timeout", "application_name", "target_session_attrs",
)  # fmt: skip
MALE, FEMALE = 8507, 8532
MINUTE = pd.Timedelta(minutes=1)


def is_database_url(path: str) -> bool:
    """A site path that names a database (``duckdb:///FILE``, ``postgresql://...``)."""
    scheme = path.split("://", 1)[0] if "://" in path else ""
    return scheme in DRIVERS


def _sqlalchemy() -> Any:
    try:
        import sqlalchemy
    except ImportError:
        raise ConfigError(
            "reading OMOP databases needs SQLAlchemy; run: pip install 'fedmed[omop]'"
        ) from None
    return sqlalchemy


def database_url(url: str) -> Any:
    """The URL as SQLAlchemy reads it, checked: a known scheme, no password in it."""
    sa = _sqlalchemy()
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise ConfigError(
            f"{echo(_no_secret(url))} is not a database URL; use duckdb:///PATH/FILE.duckdb or "
            "postgresql://USER@HOST:PORT/DATABASE"
        ) from None
    if parsed.drivername not in DRIVERS:
        raise ConfigError(
            f"database scheme '{parsed.drivername}' is not supported; use one of: "
            f"{', '.join(DRIVERS)}"
        )
    if parsed.password is not None:
        raise ConfigError(
            "the database URL carries a password; remove it from the URL and keep it in an "
            "environment variable (--password-env NAME) or a file only you can read "
            "(--password-file PATH, chmod 600)"
        )
    allowed = () if parsed.drivername == "duckdb" else POSTGRES_PARAMETERS
    extra = sorted(set(parsed.query) - set(allowed))
    if extra:
        raise ConfigError(
            f"database URL parameter '{extra[0]}' is not allowed (fedmed sets the session's "
            f"options itself: read-only); remove it, keeping only: {', '.join(allowed) or 'none'}"
        )
    return parsed.set(drivername=DRIVERS[parsed.drivername])


def _no_secret(url: str) -> str:
    """``url`` with anything between ':' and '@' of its authority replaced (for messages)."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    auth, _, host = rest.partition("@")
    user = auth.split(":", 1)[0]
    return f"{head}://{user}:***@{host}"


def shown(url: str) -> str:
    """How a database is named in messages and the registry: never with a password."""
    try:
        return database_url(url).render_as_string(hide_password=True)
    except ConfigError:
        return _no_secret(url)


def read_password(credentials: str) -> str | None:
    """The password ``credentials`` points at ("env:NAME", "file:PATH"), or None for none.

    A file must be readable by its owner alone (like ~/.pgpass): a group- or world-readable
    one is refused, naming ``chmod 600``.
    """
    if not credentials:
        return None
    kind, _, where = credentials.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise ConfigError(
                f"the database password is read from environment variable {where}, which is not "
                f"set; export {where} in the site's environment"
            )
        return value
    file = Path(where).expanduser()
    try:
        mode = file.stat().st_mode
    except OSError:
        raise ConfigError(
            f"{file}: password file not found; create it (one line, the password) and "
            f"chmod 600 {file}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{file}: password file is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {file}"
        )
    value = file.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(f"{file}: password file is empty; write the password in it")
    return value


def connect(url: str, credentials: str = "") -> Any:
    """A read-only SQLAlchemy engine for the database at ``url``.

    DuckDB: the file must exist and is opened ``read_only``. PostgreSQL (psycopg): every
    transaction is read-only (``default_transaction_read_only=on``); the password, if any,
    goes to the driver alone.
    """
    sa = _sqlalchemy()
    parsed = database_url(url)
    if parsed.drivername == "duckdb":
        if credentials:
            raise ConfigError("a DuckDB file has no password; remove its credentials")
        file = Path(parsed.database or "")
        if not file.is_file():
            raise DataError(
                f"{shown(url)}: database file {file} not found; check the path (duckdb:/// "
                "+ a relative path, duckdb://// + an absolute one)"
            )
        _require("duckdb_engine", "reading DuckDB through SQLAlchemy")
        return sa.create_engine(parsed, connect_args={"read_only": True}, poolclass=sa.NullPool)
    _require("psycopg", "reading PostgreSQL")
    args: dict[str, Any] = {"options": "-c default_transaction_read_only=on"}
    password = read_password(credentials)
    if password is not None:
        args["password"] = password
    return sa.create_engine(parsed, connect_args=args, poolclass=sa.NullPool)


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"{what} needs {module}; run: pip install 'fedmed[omop]'") from None


# -- the CDM tables read, as explicit Table objects (OHDSI's CDM v5.4 column names) ------------


def cdm_tables(schema: str = "") -> dict[str, Any]:
    """The CDM v5.4 tables and columns a cohort reads, in ``schema`` ("" = the default)."""
    sa = _sqlalchemy()
    meta = sa.MetaData(schema=schema or None)
    integer, date, stamp = sa.Integer, sa.Date, sa.DateTime
    return {
        "person": sa.Table(
            "person",
            meta,
            sa.Column("person_id", sa.BigInteger),
            sa.Column("gender_concept_id", integer),
            sa.Column("year_of_birth", integer),
        ),
        "visit_occurrence": sa.Table(
            "visit_occurrence",
            meta,
            sa.Column("visit_occurrence_id", sa.BigInteger),
            sa.Column("person_id", sa.BigInteger),
            sa.Column("visit_concept_id", integer),
            sa.Column("visit_start_date", date),
            sa.Column("visit_start_datetime", stamp),
        ),
        "observation_period": sa.Table(
            "observation_period",
            meta,
            sa.Column("person_id", sa.BigInteger),
            sa.Column("observation_period_start_date", date),
            sa.Column("observation_period_end_date", date),
        ),
        "measurement": sa.Table(
            "measurement",
            meta,
            sa.Column("measurement_id", sa.BigInteger),
            sa.Column("person_id", sa.BigInteger),
            sa.Column("measurement_concept_id", integer),
            sa.Column("measurement_date", date),
            sa.Column("measurement_datetime", stamp),
            sa.Column("value_as_number", sa.Numeric),
        ),
        "death": sa.Table(
            "death",
            meta,
            sa.Column("person_id", sa.BigInteger),
            sa.Column("death_date", date),
        ),
        "condition_occurrence": sa.Table(
            "condition_occurrence",
            meta,
            sa.Column("condition_occurrence_id", sa.BigInteger),
            sa.Column("person_id", sa.BigInteger),
            sa.Column("condition_concept_id", integer),
            sa.Column("condition_start_date", date),
            sa.Column("condition_start_datetime", stamp),
        ),
        "observation": sa.Table(
            "observation",
            meta,
            sa.Column("observation_id", sa.BigInteger),
            sa.Column("person_id", sa.BigInteger),
            sa.Column("observation_concept_id", integer),
            sa.Column("observation_date", date),
            sa.Column("observation_datetime", stamp),
            sa.Column("value_as_number", sa.Numeric),
        ),
    }


# Per kind of index event: the CDM table, and its id, concept, start date and start datetime
# columns. The event's start (its datetime, else 00:00 of its date) is the index time.
INDEX_EVENTS = {
    "visit": (
        "visit_occurrence",
        "visit_occurrence_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_start_datetime",
    ),
    "condition": (
        "condition_occurrence",
        "condition_occurrence_id",
        "condition_concept_id",
        "condition_start_date",
        "condition_start_datetime",
    ),
}


def describe_index(omop: OmopConfig) -> str:
    """The cohort's entry in words, for messages (e.g. an empty cohort)."""
    return f"first {omop.index} of concepts {list(omop.index_concept_ids)}"


def cohort_query(tables: dict[str, Any], omop: OmopConfig) -> Any:
    """One row per person: the first index event, if it passes the criteria.

    Entry: each person's earliest visit (or, with ``index = "condition"``, condition) with a
    concept in the bound list (by start, then row id). Kept if the age that year
    (year - year_of_birth) is in [min_age, max_age] and an observation period covers the index
    date with ``prior_observation_days`` before it; its end (the latest such period's) is where
    a survival time without death is censored. Only the table read depends on ``omop.index``
    (a choice of two constants); every value is a bound parameter.
    """
    sa = _sqlalchemy()
    name, row_id, concept, day, stamp = INDEX_EVENTS[omop.index]
    event, person, period = tables[name], tables["person"], tables["observation_period"]
    start = sa.func.coalesce(event.c[stamp], sa.cast(event.c[day], sa.DateTime))
    ranked = (
        sa.select(
            event.c.person_id,
            event.c[row_id].label("index_event_id"),
            start.label("index_start"),
            event.c[day].label("index_date"),
            sa.func.row_number()
            .over(partition_by=event.c.person_id, order_by=(start, event.c[row_id]))
            .label("entry"),
        )
        .where(event.c[concept].in_(sa.bindparam("index_concepts", expanding=True)))
        .subquery("entry_events")
    )
    age = sa.extract("year", ranked.c.index_date) - person.c.year_of_birth
    prior = ranked.c.index_date - sa.bindparam("prior_days", type_=sa.Integer)
    observed_until = (
        sa.select(sa.func.max(period.c.observation_period_end_date))
        .where(
            period.c.person_id == ranked.c.person_id,
            period.c.observation_period_start_date <= prior,
            period.c.observation_period_end_date >= ranked.c.index_date,
        )
        .scalar_subquery()
    )
    chosen = (
        sa.select(
            ranked.c.person_id,
            ranked.c.index_event_id,
            ranked.c.index_start,
            ranked.c.index_date,
            age.label("age"),
            person.c.gender_concept_id,
            observed_until.label("observation_end"),
        )
        .join(person, person.c.person_id == ranked.c.person_id)
        .where(
            ranked.c.entry == 1,
            age.between(sa.bindparam("min_age"), sa.bindparam("max_age")),
        )
        .subquery("candidates")
    )
    return (
        sa.select(chosen).where(chosen.c.observation_end.is_not(None)).order_by(chosen.c.person_id)
    )


def cohort_parameters(omop: OmopConfig) -> dict[str, Any]:
    """The cohort query's bound values (only ever passed as parameters)."""
    return {
        "index_concepts": [int(c) for c in omop.index_concept_ids],
        "prior_days": int(omop.prior_observation_days),
        "min_age": int(omop.min_age),
        "max_age": int(omop.max_age),
    }


def window(feature: OmopFeature, omop: OmopConfig) -> tuple[float, float]:
    """A feature's window in hours after the index time (no end: window_hours)."""
    end = feature.end_hours if feature.end_hours is not None else omop.window_hours
    return feature.start_hours, end


@dataclass(frozen=True)
class Domain:
    """Where a feature domain's rows are: the CDM table and its concept, time, value and
    row-id columns. ``value`` None: the row's value is 1 (a condition is present). ``valueless``:
    rows without a number are read too (an observation is often a coded fact without one, and
    ``count`` counts it); a measurement without a value is not read at all."""

    table: str
    concept: str
    stamp: str
    day: str
    value: str | None
    row_id: str
    valueless: bool = False


# In this order: each domain's rows come back in it (measurement first, as set A's rows).
DOMAINS = {
    "measurement": Domain(
        "measurement",
        "measurement_concept_id",
        "measurement_datetime",
        "measurement_date",
        "value_as_number",
        "measurement_id",
    ),
    "condition": Domain(
        "condition_occurrence",
        "condition_concept_id",
        "condition_start_datetime",
        "condition_start_date",
        None,
        "condition_occurrence_id",
    ),
    "observation": Domain(
        "observation",
        "observation_concept_id",
        "observation_datetime",
        "observation_date",
        "value_as_number",
        "observation_id",
        valueless=True,
    ),
}


def event_query(domain: str, omop: OmopConfig, tables: dict[str, Any]) -> Any:
    """Every row of ``domain`` with a feature's concept inside the widest feature window.

    Joined to the cohort (as a subquery, so the same bound criteria apply); ordered by person,
    time and row id, the order a site's sums are taken in (for set A: its row order).
    """
    sa = _sqlalchemy()
    d = DOMAINS[domain]
    cohort = cohort_query(tables, omop).subquery("cohort")
    t = tables[d.table]
    when = sa.func.coalesce(t.c[d.stamp], sa.cast(t.c[d.day], sa.DateTime))
    number = (
        sa.cast(t.c[d.value], sa.Double) if d.value else sa.cast(sa.literal(1.0), sa.Double)
    ).label("value")
    query = (
        sa.select(t.c.person_id, t.c[d.concept].label("concept_id"), when.label("time"), number)
        .join(cohort, cohort.c.person_id == t.c.person_id)
        .where(
            t.c[d.concept].in_(sa.bindparam(f"{domain}_concepts", expanding=True)),
            when >= cohort.c.index_start + sa.bindparam(f"{domain}_from", type_=sa.Interval),
            when <= cohort.c.index_start + sa.bindparam(f"{domain}_to", type_=sa.Interval),
        )
        .order_by(t.c.person_id, when, t.c[d.row_id])
    )
    return query.where(t.c[d.value].is_not(None)) if d.value and not d.valueless else query


def event_parameters(domain: str, omop: OmopConfig) -> dict[str, Any]:
    """The bound values of ``event_query(domain)``: its features' concepts and widest window."""
    features = [f for f in omop.features if f.domain == domain]
    windows = [window(f, omop) for f in features]
    return {
        f"{domain}_concepts": sorted({int(c) for f in features for c in f.concept_ids}),
        f"{domain}_from": timedelta(hours=min(w[0] for w in windows)),
        f"{domain}_to": timedelta(hours=max(w[1] for w in windows)),
    }


def outcome_query(omop: OmopConfig, tables: dict[str, Any]) -> Any:
    """Each cohort person's outcome date: the earliest recorded death (any date; checked
    against the index later), or the earliest condition of ``outcome_concept_ids`` on or after
    the index date."""
    sa = _sqlalchemy()
    cohort = cohort_query(tables, omop).subquery("cohort")
    if omop.outcome == "death":
        d = tables["death"]
        person, when, where = d.c.person_id, d.c.death_date, ()
    else:
        c = tables["condition_occurrence"]
        person, when = c.c.person_id, c.c.condition_start_date
        where = (
            c.c.condition_concept_id.in_(sa.bindparam("outcome_concepts", expanding=True)),
            when >= cohort.c.index_date,
        )
    return (
        sa.select(person.label("person_id"), sa.func.min(when).label("outcome_date"))
        .join(cohort, cohort.c.person_id == person)
        .where(*where)
        .group_by(person)
        .order_by(person)
    )


@dataclass(frozen=True)
class Extraction:
    """What a cohort definition yields from one database (docs/omop.md).

    ``cohort``: person_id, index_start, index_date, age, male (1/0/NaN), observation_end,
    outcome_date (NaT: none). ``observations``: person_id, feature, time (minutes since the
    index time), value (NaN: an observation without a number, kept for a count): the
    measurement, condition and observation features' rows, ordered by person, time and row id
    within each domain, each row once per feature it belongs to.
    """

    origin: str
    cohort: pd.DataFrame
    observations: pd.DataFrame


def extract(url: str, credentials: str, omop: OmopConfig) -> Extraction:
    """Run the cohort definition ``omop`` on the database at ``url`` (read-only)."""
    sa = _sqlalchemy()
    engine = connect(url, credentials)
    tables = cdm_tables(omop.schema)
    params = cohort_parameters(omop)
    params["outcome_concepts"] = [int(c) for c in omop.outcome_concept_ids]
    domains = [d for d in DOMAINS if any(f.domain == d for f in omop.features)]
    try:
        with engine.connect() as connection:
            cohort = _frame(connection.execute(cohort_query(tables, omop), params))
            outcomes = _frame(connection.execute(outcome_query(omop, tables), params))
            rows = {
                domain: _frame(
                    connection.execute(
                        event_query(domain, omop, tables),
                        params | event_parameters(domain, omop),
                    )
                )
                for domain in domains
            }
    except sa.exc.SQLAlchemyError as exc:
        needed = ["person", INDEX_EVENTS[omop.index][0], "observation_period"]
        needed += [DOMAINS[d].table for d in domains]
        needed.append("death" if omop.outcome == "death" else "condition_occurrence")
        raise DataError(
            f"{shown(url)}: reading the OMOP cohort failed ({_reason(exc)}); check that the "
            f"database holds the CDM v5.4 tables {', '.join(dict.fromkeys(needed))} in schema "
            f"{echo(omop.schema or 'the default')} and that this user may read them"
        ) from None
    finally:
        engine.dispose()
    cohort = _cohort_frame(cohort, outcomes, omop)
    observations = _observations(rows, cohort, omop)
    return Extraction(shown(url), cohort, observations)


def _reason(exc: Exception) -> str:
    """The driver's first line, without the SQL or parameters SQLAlchemy appends."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return echo(text[0] if text else type(original).__name__, 160)


def _frame(result: Any) -> pd.DataFrame:
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def _cohort_frame(cohort: pd.DataFrame, outcomes: pd.DataFrame, omop: OmopConfig) -> pd.DataFrame:
    """Typed cohort rows with each person's outcome date; a death before the index is refused.

    Such a person cannot be at risk at the index date: the record is inconsistent, and
    reading it as "no death" or "death at 0" would both be a guess.
    """
    out = pd.DataFrame(
        {
            "person_id": cohort["person_id"].astype(np.int64),
            "index_start": pd.to_datetime(cohort["index_start"]),
            "index_date": pd.to_datetime(cohort["index_date"]),
            "age": pd.to_numeric(cohort["age"]).astype(np.float64),
            "male": cohort["gender_concept_id"].map({MALE: 1.0, FEMALE: 0.0}).astype(np.float64),
            "observation_end": pd.to_datetime(cohort["observation_end"]),
        }
    )
    dates = outcomes.set_index(outcomes["person_id"].astype(np.int64))["outcome_date"]
    out["outcome_date"] = pd.to_datetime(out["person_id"].map(dates))
    early = out["outcome_date"] < out["index_date"]
    if early.any():  # only a death can be (the condition query starts at the index date)
        person = int(out["person_id"][early].iloc[0])
        raise DataError(
            f"person {person} has a death dated before the index {omop.index} "
            f"({int(early.sum())} persons); fix the death or {omop.index} dates in the CDM"
        )
    return out.reset_index(drop=True)


def _observations(
    rows: dict[str, pd.DataFrame], cohort: pd.DataFrame, omop: OmopConfig
) -> pd.DataFrame:
    """Each domain's rows labelled with every feature they belong to (concept and window).

    A row without a number (an observation's) is kept only for a ``count``: the other
    aggregates, and the sequence task, read numbers.
    """
    starts = cohort.set_index("person_id")["index_start"]
    parts = []
    for domain, found in rows.items():
        minutes = (pd.to_datetime(found["time"]) - found["person_id"].map(starts)) / MINUTE
        base = pd.DataFrame(
            {
                "person_id": found["person_id"].astype(np.int64),
                "time": minutes.astype(np.float64),
                "value": found["value"].astype(np.float64),
                "concept_id": found["concept_id"].astype(np.int64),
            }
        )
        for feature in omop.features:
            if feature.domain != domain:
                continue
            low, high = window(feature, omop)
            mask = (
                base["concept_id"].isin([int(c) for c in feature.concept_ids])
                & (base["time"] >= low * 60)
                & (base["time"] <= high * 60)
            )
            if feature.aggregate != "count":
                mask &= base["value"].notna()
            part = base[mask].drop(columns="concept_id")
            part.insert(1, "feature", feature.name)
            part.insert(0, "domain", list(DOMAINS).index(domain))
            parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["person_id", "feature", "time", "value"])
    # Within a domain, the query's order (person, time, row id); each row's features together.
    merged = pd.concat(parts).rename_axis("row").reset_index()
    merged = merged.sort_values(["domain", "row"], kind="stable").drop(columns=["domain", "row"])
    return merged.reset_index(drop=True)


def labels(extraction: Extraction, omop: OmopConfig) -> pd.Series:
    """The outcome within ``horizon_days`` of the index date (0 = any time after), per person."""
    cohort = extraction.cohort
    event = cohort["outcome_date"].notna()
    if omop.horizon_days:
        limit = cohort["index_date"] + pd.Timedelta(days=omop.horizon_days)
        event &= cohort["outcome_date"] <= limit
    return pd.Series(event.astype(np.int64).to_numpy(), index=cohort["person_id"].to_numpy())


def survival(extraction: Extraction, omop: OmopConfig) -> pd.DataFrame:
    """Days from the index date to the outcome (event 1) or to the end of observation (0).

    With ``horizon_days`` a later outcome, or a longer observation, is censored at the horizon.
    An outcome after the end of the observation period still counts (the CDM recorded it).
    """
    cohort = extraction.cohort
    end = cohort["outcome_date"].fillna(cohort["observation_end"])
    event = cohort["outcome_date"].notna()
    days = (end - cohort["index_date"]).dt.days.astype(np.float64)
    if omop.horizon_days:
        event &= days <= omop.horizon_days
        days = days.clip(upper=omop.horizon_days)
    return pd.DataFrame({"time": days.to_numpy(), "event": event.astype(np.int64).to_numpy()})


def wide_table(extraction: Extraction, omop: OmopConfig, outcome: dict[str, str]) -> pd.DataFrame:
    """One row per person: each feature (as its name) and the outcome columns.

    ``outcome`` names the columns: {"target": NAME} for a 0/1 label, {"time": T, "event": E}
    for survival. Rows are numbered from 1 in person_id order (errors name a row, as for a
    file); a feature a person has no observation of is missing (count: 0).
    """
    cohort = extraction.cohort
    ids = cohort["person_id"].to_numpy()
    table = pd.DataFrame(index=pd.Index(ids, name="person_id"))
    grouped = extraction.observations.groupby(["feature", "person_id"], sort=False)["value"]
    for feature in omop.features:
        if feature.domain == "person":
            table[feature.name] = cohort[feature.aggregate].to_numpy()
            continue
        values = _aggregate(grouped, feature).reindex(ids)
        counted = feature.aggregate in ("count", "presence")
        table[feature.name] = values.fillna(0.0) if counted else values
    if "target" in outcome:
        table[outcome["target"]] = labels(extraction, omop).to_numpy()
    else:
        times = survival(extraction, omop)
        table[outcome["time"]] = times["time"].to_numpy()
        table[outcome["event"]] = times["event"].to_numpy()
    return table.reset_index(drop=True).set_axis(pd.RangeIndex(1, len(ids) + 1))


def _aggregate(grouped: Any, feature: OmopFeature) -> pd.Series:
    """One feature's per-person summary (rows arrive in time order, so last = the latest)."""
    # count: rows (an observation without a number counts; a measurement always has one).
    how = {"mean": "mean", "min": "min", "max": "max", "count": "size"}
    how |= {"last": "last", "first": "first", "presence": "size"}
    try:
        summary = grouped.agg(how[feature.aggregate]).loc[feature.name]
    except KeyError:  # no person has an observation of it
        return pd.Series(dtype=np.float64)
    if feature.aggregate == "presence":
        summary = summary > 0
    return summary.astype(np.float64)


def long_table(extraction: Extraction, omop: OmopConfig) -> pd.DataFrame:
    """The sequence task's long table: id, time (minutes), variable, value.

    Person features are observations at minute 0 (as PhysioNet's descriptors); a person
    without a value (unknown gender) has no row, nor has an observation without a number (a
    count's). Measurement rows keep their order.
    """
    cohort = extraction.cohort
    parts = []
    for feature in omop.features:
        if feature.domain == "person":
            known = cohort[cohort[feature.aggregate].notna()]
            parts.append(
                pd.DataFrame(
                    {
                        "id": known["person_id"].to_numpy(),
                        "time": 0.0,
                        "variable": feature.name,
                        "value": known[feature.aggregate].to_numpy(np.float64),
                    }
                )
            )
    obs = extraction.observations
    obs = obs[obs["value"].notna()]
    parts.append(
        pd.DataFrame(
            {
                "id": obs["person_id"].to_numpy(),
                "time": obs["time"].to_numpy(np.float64),
                "variable": obs["feature"].to_numpy(),
                "value": obs["value"].to_numpy(np.float64),
            }
        )
    )
    long = pd.concat(parts, ignore_index=True)
    long["id"] = long["id"].astype(np.int64)
    long["variable"] = long["variable"].astype("category")
    return long


def definition(omop: OmopConfig) -> dict[str, Any]:
    """The cohort definition as plain JSON values (what a registration records).

    Canonical: passed through the config parser once, so a definition built in code (48, an
    int) and the same one read from TOML (48.0, the field's float) are the same definition;
    keys added later are left out at their defaults (config.omop_dict), so a registration made
    before they existed still matches its study.
    """
    return omop_dict(parse_omop(plain(omop)))


def fingerprint(extraction: Extraction, omop: OmopConfig) -> str:
    """SHA-256 of the cohort definition and of every extracted row, in canonical order.

    Canonical: the definition as sorted JSON; the cohort sorted by person; the observations
    sorted by person, feature, time and value; numbers in Python's shortest round-trip form,
    dates in ISO form. Any change to what the definition yields (a person, a date, a value)
    changes it; the database's physical order or the driver does not.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(definition(omop), sort_keys=True).encode())
    cohort = extraction.cohort.sort_values("person_id")
    digest.update(
        b"\ncohort\n" + cohort.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S").encode()
    )
    obs = extraction.observations.sort_values(
        ["person_id", "feature", "time", "value"], kind="stable"
    )
    digest.update(b"\nobservations\n" + obs.to_csv(index=False).encode())
    return "sha256:" + digest.hexdigest()


def summary(extraction: Extraction, omop: OmopConfig) -> tuple[int, int]:
    """(persons, outcomes within the horizon): what a data steward checks first."""
    return len(extraction.cohort), int(labels(extraction, omop).sum())


def same_definition(registered: dict[str, Any], omop: OmopConfig) -> bool:
    """Whether a study's [data.omop] is the cohort definition a site registered."""
    return definition(parse_omop(registered)) == definition(omop)


__all__ = [
    "Extraction",
    "connect",
    "database_url",
    "definition",
    "describe_index",
    "extract",
    "fingerprint",
    "is_database_url",
    "labels",
    "long_table",
    "read_password",
    "same_definition",
    "shown",
    "survival",
    "wide_table",
]
