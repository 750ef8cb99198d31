"""A study's cohort read from OMOP CDM databases (DuckDB files and a real PostgreSQL server).

Checked against independent pandas computations: a synthetic CDM with several visits per
person, visits without a time, persons outside the age window or without prior observation,
deaths inside and outside the horizon (every count, feature value and outcome); and PhysioNet
2012 set A as four ICU-type databases against its long CSV (cohort sizes, deaths, feature
aggregates, survival times, and the sequence study: the same arrays and the same AUROC on the
same stays and seed). Also: hostile config values never reach SQL, connections are read-only,
a password is never stored or shown, and a changed cohort is refused until re-registered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.cli.main import main
from fedmed.config import OmopConfig, OmopFeature, SiteSpec, load_run_config, parse_run_config
from fedmed.data.omop import cohort
from fedmed.data.omop.physionet import SITES, build_physionet_omop, write_database
from fedmed.data.registry import DatasetRegistry
from fedmed.errors import ConfigError, DataError
from fedmed.tasks import load_site_data, load_site_table, site_view
from tests.conftest import DATA_DIR, needs_shared_data
from tests.data import postgres

duckdb = pytest.importorskip("duckdb", reason="OMOP databases are the optional 'omop' extra")
pytest.importorskip("duckdb_engine", reason="OMOP databases are the optional 'omop' extra")

ROOT = Path(__file__).resolve().parents[2]
HR, TEMP, BUN = 3027018, 3020891, 3013682
DIABETES, SEPSIS, AKI = 201826, 132797, 197320
# Two observation concepts of the synthetic CDM: a score recorded with a number (sometimes
# without), and a fact recorded without one (as a smoking status usually is).
PAIN, SMOKER = 43055141, 4298794
ICU, INPATIENT = 32037, 9201
LIMIT = 100  # PhysioNet stays per ICU type: every site has deaths in both splits


# --- a synthetic CDM: the cohort rules' corner cases, reference in plain pandas -----------------


def synthetic_cdm(seed: int = 0, n: int = 90) -> dict[str, pd.DataFrame]:
    """Persons with 1-3 visits (ICU or inpatient; some without a start time), one observation
    period (some start too late, some persons have none), measurements around the visits
    (some without a value), deaths on or after the last visit, conditions around the first
    visit (some without a time) and observations around the first condition or visit (some
    without a number or a time)."""
    rng = np.random.default_rng(seed)
    persons, visits, periods, rows, deaths = [], [], [], [], []
    for pid in range(1, n + 1):
        gender = int(rng.choice([8507, 8532, 0]))
        persons.append((pid, gender, int(rng.integers(1930, 2012)), 0, 0))
        day0 = datetime(2015, 1, 1) + timedelta(days=int(rng.integers(0, 1500)))
        starts = []
        for k in range(int(rng.integers(1, 4))):
            start = day0 + timedelta(days=int(rng.integers(0, 400)), hours=int(rng.integers(0, 24)))
            timed = rng.random() > 0.15
            vid = pid * 10 + k
            concept = ICU if rng.random() < 0.6 else INPATIENT
            visits.append(
                (vid, pid, concept, start.date(), start if timed else None, start.date(), 32817)
            )
            starts.append(start if timed else datetime.combine(start.date(), datetime.min.time()))
            for _ in range(int(rng.integers(0, 14))):
                when = start + timedelta(minutes=int(rng.integers(-600, 72 * 60)))
                value = None if rng.random() < 0.05 else round(float(rng.normal(80, 20)), 3)
                concept_id = int(rng.choice([HR, TEMP, BUN]))
                rows.append((pid, concept_id, when.date(), when, value, vid))
        first, last = min(starts), max(starts)
        if rng.random() > 0.1:
            begin = first.date() - timedelta(days=int(rng.integers(-3, 800)))
            end = last.date() + timedelta(days=int(rng.integers(0, 400)))
            periods.append((pid, pid, begin, end, 32828))
        if rng.random() < 0.35:
            deaths.append((pid, last.date() + timedelta(days=int(rng.integers(0, 90))), 32817))
    measurement = pd.DataFrame(
        rows,
        columns=[
            "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime",
            "value_as_number", "visit_occurrence_id",
        ],
    )  # fmt: skip
    measurement.insert(0, "measurement_id", np.arange(1, len(measurement) + 1))
    measurement["measurement_type_concept_id"] = 32817
    conditions = []  # their own generator: the rows above stay as they were
    crng = np.random.default_rng(seed + 1)
    for pid in range(1, n + 1):
        first = min(v[3] for v in visits if v[1] == pid)
        for _ in range(int(crng.integers(0, 5))):
            day = first + timedelta(days=int(crng.integers(-300, 240)))
            when = datetime.combine(day, datetime.min.time()) + timedelta(
                hours=int(crng.integers(0, 24))
            )
            concept = int(crng.choice([DIABETES, SEPSIS, AKI]))
            timed = when if crng.random() > 0.3 else None
            conditions.append((len(conditions) + 1, pid, concept, day, timed, 32817))
        if crng.random() < 0.4:  # sepsis around the first visit: inside some 48 h windows
            day = first + timedelta(days=int(crng.integers(0, 3)))
            when = datetime.combine(day, datetime.min.time()) + timedelta(hours=12)
            conditions.append((len(conditions) + 1, pid, SEPSIS, day, when, 32817))
    for pid in range(3, n + 1, 6):  # two diagnoses on one day, the later one written first:
        day = min(v[3] for v in visits if v[1] == pid) - timedelta(days=40)  # ties need times
        for hour in (18, 6):
            when = datetime.combine(day, datetime.min.time()) + timedelta(hours=hour)
            conditions.append((len(conditions) + 1, pid, DIABETES, day, when, 32817))
    observations = []  # their own generator too: the rows above stay as they were
    orng = np.random.default_rng(seed + 2)
    for pid in range(1, n + 1):
        mine = [c[4] or datetime.combine(c[3], datetime.min.time())
                for c in conditions if c[1] == pid]  # fmt: skip
        anchor = (
            min(mine)
            if mine
            else datetime.combine(min(v[3] for v in visits if v[1] == pid), datetime.min.time())
        )
        for _ in range(int(orng.integers(0, 9))):
            when = anchor + timedelta(minutes=int(orng.integers(-5 * 24 * 60, 10 * 24 * 60)))
            concept = PAIN if orng.random() < 0.6 else SMOKER
            value = round(float(orng.integers(0, 11)), 3) if concept == PAIN else None
            if concept == PAIN and orng.random() < 0.15:
                value = None  # a pain score recorded without its number
            timed = when if orng.random() > 0.2 else None
            observations.append(
                (len(observations) + 1, pid, concept, when.date(), timed, value, 32817)
            )
    return {
        "observation": pd.DataFrame(
            observations,
            columns=[
                "observation_id",
                "person_id",
                "observation_concept_id",
                "observation_date",
                "observation_datetime",
                "value_as_number",
                "observation_type_concept_id",
            ],
        ),
        "condition_occurrence": pd.DataFrame(
            conditions,
            columns=[
                "condition_occurrence_id",
                "person_id",
                "condition_concept_id",
                "condition_start_date",
                "condition_start_datetime",
                "condition_type_concept_id",
            ],
        ),
        "person": pd.DataFrame(
            persons,
            columns=[
                "person_id",
                "gender_concept_id",
                "year_of_birth",
                "race_concept_id",
                "ethnicity_concept_id",
            ],
        ),
        "visit_occurrence": pd.DataFrame(
            visits,
            columns=[
                "visit_occurrence_id",
                "person_id",
                "visit_concept_id",
                "visit_start_date",
                "visit_start_datetime",
                "visit_end_date",
                "visit_type_concept_id",
            ],
        ),
        "observation_period": pd.DataFrame(
            periods,
            columns=[
                "observation_period_id",
                "person_id",
                "observation_period_start_date",
                "observation_period_end_date",
                "period_type_concept_id",
            ],
        ),
        "measurement": measurement,
        "death": pd.DataFrame(deaths, columns=["person_id", "death_date", "death_type_concept_id"]),
    }


SYNTHETIC = OmopConfig(
    visit_concept_ids=(ICU,),
    min_age=18,
    max_age=85,
    prior_observation_days=30,
    window_hours=48,
    horizon_days=30,
    features=(
        OmopFeature("age", domain="person", aggregate="age"),
        OmopFeature("male", domain="person", aggregate="male"),
        OmopFeature("hr_mean_24h", concept_ids=(HR,), aggregate="mean", end_hours=24),
        OmopFeature("hr_max_6_12h", concept_ids=(HR,), aggregate="max", start_hours=6,
                    end_hours=12),
        OmopFeature("temp_last", concept_ids=(TEMP,), aggregate="last"),
        OmopFeature("temp_first", concept_ids=(TEMP,), aggregate="first"),
        OmopFeature("bun_min", concept_ids=(BUN,), aggregate="min"),
        OmopFeature("labs_count", concept_ids=(BUN, TEMP), aggregate="count"),
    ),
)  # fmt: skip


def expected_cohort(tables: dict[str, pd.DataFrame], omop: OmopConfig) -> pd.DataFrame:
    """The cohort by hand: first index event per person (a visit, or a condition with
    index = "condition"), then the age and observation rules."""
    kind = "condition" if omop.index == "condition" else "visit"
    table, row_id = f"{kind}_occurrence", f"{kind}_occurrence_id"
    v = tables[table].copy()
    v = v[v[f"{kind}_concept_id"].isin(omop.index_concept_ids)]
    v["start"] = pd.to_datetime(v[f"{kind}_start_datetime"]).fillna(
        pd.to_datetime(v[f"{kind}_start_date"])
    )
    v = v.sort_values(["person_id", "start", row_id]).groupby("person_id").head(1)
    v = v.merge(tables["person"], on="person_id")
    v["date"] = pd.to_datetime(v[f"{kind}_start_date"])
    v["age"] = v["date"].dt.year - v["year_of_birth"]
    v = v[(v["age"] >= omop.min_age) & (v["age"] <= omop.max_age)]
    op = tables["observation_period"].merge(v[["person_id", "date"]], on="person_id")
    op = op[
        (pd.to_datetime(op["observation_period_start_date"])
         <= op["date"] - pd.Timedelta(days=omop.prior_observation_days))
        & (pd.to_datetime(op["observation_period_end_date"]) >= op["date"])
    ]  # fmt: skip
    end = op.groupby("person_id")["observation_period_end_date"].max()
    v = v[v["person_id"].isin(end.index)].copy()
    v["end"] = pd.to_datetime(v["person_id"].map(end))
    death = tables["death"].groupby("person_id")["death_date"].min()
    v["death"] = pd.to_datetime(v["person_id"].map(death))
    return v.sort_values("person_id").reset_index(drop=True)


def expected_features(tables: dict[str, pd.DataFrame], ref: pd.DataFrame, omop: OmopConfig):
    """Each feature per person, by hand from the measurement rows in source order."""
    m = tables["measurement"].merge(ref[["person_id", "start"]], on="person_id")
    m = m[m["value_as_number"].notna()].sort_values(["person_id", "measurement_datetime",
                                                      "measurement_id"])  # fmt: skip
    m["hours"] = (pd.to_datetime(m["measurement_datetime"]) - m["start"]).dt.total_seconds() / 3600
    out = pd.DataFrame(index=ref["person_id"])
    out["age"] = ref.set_index("person_id")["age"].astype(float)
    genders = ref.set_index("person_id")["gender_concept_id"]
    out["male"] = genders.map({8507: 1.0, 8532: 0.0})
    for f in omop.features[2:]:
        end = omop.window_hours if f.end_hours is None else f.end_hours
        rows = m[m["measurement_concept_id"].isin(f.concept_ids)]
        rows = rows[(rows["hours"] >= f.start_hours) & (rows["hours"] <= end)]
        agg = rows.groupby("person_id")["value_as_number"].agg(f.aggregate)
        out[f.name] = agg.reindex(out.index).astype(float)
        if f.aggregate == "count":
            out[f.name] = out[f.name].fillna(0.0)
    return out


@pytest.fixture(scope="module")
def synthetic_duckdb(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    tables = synthetic_cdm()
    path = tmp_path_factory.mktemp("synthetic") / "cdm.duckdb"
    write_database(duckdb, path, tables)
    return f"duckdb:///{path}", tables


@pytest.fixture(scope="module")
def server() -> Iterator[postgres.Server]:
    yield from postgres.start_server()


@pytest.fixture(scope="module")
def synthetic_postgres(server: postgres.Server) -> tuple[str, str]:
    """The same synthetic CDM in PostgreSQL schema 'cdm', read by a password-only role."""
    server.create_cdm("synthetic", synthetic_cdm(), "cdm")
    password = "s3cret-" + os.urandom(6).hex()
    server.create_reader("fedmed_reader", password, ["synthetic"], "cdm")
    return server.url("synthetic", "fedmed_reader"), password


def _backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, name: str):
    """(url, credentials, omop, tables) of the synthetic CDM on DuckDB or PostgreSQL."""
    url, tables = request.getfixturevalue("synthetic_duckdb")
    if name == "duckdb":
        return url, "", SYNTHETIC, tables
    pg_url, password = request.getfixturevalue("synthetic_postgres")
    monkeypatch.setenv("OMOP_TEST_PASSWORD", password)
    omop = replace(SYNTHETIC, schema="cdm")
    return pg_url, "env:OMOP_TEST_PASSWORD", omop, tables


BACKENDS = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cohort_and_outcomes_equal_a_pandas_computation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, omop, tables = _backend(request, monkeypatch, backend)
    ref = expected_cohort(tables, omop)

    got = cohort.extract(url, credentials, omop)

    assert 20 < len(ref) < 80  # the rules removed persons, and kept enough to mean something
    assert got.cohort["person_id"].tolist() == ref["person_id"].tolist()
    assert got.cohort["index_start"].tolist() == ref["start"].tolist()
    assert got.cohort["observation_end"].tolist() == ref["end"].tolist()
    in_horizon = ref["death"].notna() & (ref["death"] <= ref["date"] + pd.Timedelta(days=30))
    assert cohort.labels(got, omop).tolist() == in_horizon.astype(int).tolist()
    assert 0 < in_horizon.sum() < (ref["death"].notna()).sum()  # the horizon cut some deaths
    times = cohort.survival(got, omop)
    days = (ref["death"].fillna(ref["end"]) - ref["date"]).dt.days.clip(upper=30)
    assert times["time"].tolist() == days.astype(float).tolist()
    assert times["event"].tolist() == in_horizon.astype(int).tolist()
    # Each rule matters here: without the age window, or the prior observation, more persons.
    for looser in (replace(omop, min_age=0, max_age=150), replace(omop, prior_observation_days=0)):
        wider = expected_cohort(tables, looser)["person_id"].tolist()
        assert len(wider) > len(ref)
        assert cohort.extract(url, credentials, looser).cohort["person_id"].tolist() == wider


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_aggregates_equal_a_pandas_computation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, omop, tables = _backend(request, monkeypatch, backend)
    expected = expected_features(tables, expected_cohort(tables, omop), omop)

    got = cohort.wide_table(cohort.extract(url, credentials, omop), omop, {"target": "died"})

    assert list(got.columns) == [*expected.columns, "died"]
    for name in expected.columns:
        np.testing.assert_allclose(
            got[name].to_numpy(float), expected[name].to_numpy(float), rtol=1e-12, err_msg=name
        )
    assert expected["hr_max_6_12h"].isna().any() and expected["labs_count"].gt(0).any()


CONDITIONS = replace(
    SYNTHETIC,
    outcome="condition",
    outcome_concept_ids=(AKI,),
    horizon_days=45,
    features=(
        OmopFeature("diabetes_history", domain="condition", concept_ids=(DIABETES,),
                    aggregate="presence", start_hours=-24 * 365, end_hours=0),
        OmopFeature("sepsis_48h", domain="condition", concept_ids=(SEPSIS, AKI),
                    aggregate="presence"),
        OmopFeature("hr_mean_24h", concept_ids=(HR,), aggregate="mean", end_hours=24),
    ),
)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_condition_features_and_outcome_equal_a_pandas_computation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, omop, tables = _backend(request, monkeypatch, backend)
    omop = replace(CONDITIONS, schema=omop.schema)
    ref = expected_cohort(tables, omop)
    c = tables["condition_occurrence"].merge(ref[["person_id", "start", "date"]], on="person_id")
    when = pd.to_datetime(c["condition_start_datetime"]).fillna(
        pd.to_datetime(c["condition_start_date"])
    )
    c["hours"] = (when - c["start"]).dt.total_seconds() / 3600
    expected = {}
    for f in omop.features[:2]:
        low, high = f.start_hours, omop.window_hours if f.end_hours is None else f.end_hours
        hit = c[c["condition_concept_id"].isin(f.concept_ids) & c["hours"].between(low, high)]
        expected[f.name] = ref["person_id"].isin(hit["person_id"]).astype(float).tolist()
    later = c[(c["condition_concept_id"] == AKI) & (pd.to_datetime(c["condition_start_date"])
                                                     >= c["date"])]  # fmt: skip
    first = ref["person_id"].map(
        pd.to_datetime(later.groupby("person_id")["condition_start_date"].min())
    )
    days = (first.fillna(ref["end"]) - ref["date"]).dt.days
    event = first.notna() & (days <= 45)

    got = cohort.extract(url, credentials, omop)
    table = cohort.wide_table(got, omop, {"time": "days", "event": "aki"})

    for name, values in expected.items():
        assert table[name].tolist() == values, name
        assert 0 < sum(values) < len(values), name  # present for some, absent for others
    assert table["aki"].tolist() == event.astype(int).tolist()
    assert table["days"].tolist() == days.clip(upper=45).astype(float).tolist()
    assert cohort.labels(got, omop).tolist() == event.astype(int).tolist()
    assert 0 < event.sum() < first.notna().sum()  # the horizon cut some outcomes
    long = cohort.long_table(got, omop)
    sepsis = long[long["variable"] == "sepsis_48h"]
    assert set(sepsis["value"]) == {1.0} and sepsis["time"].between(0, 48 * 60).all()


# --- a condition as the index, observation features --------------------------------------------

CONDITION_INDEX = OmopConfig(
    index="condition",
    condition_concept_ids=(DIABETES,),
    min_age=18,
    max_age=85,
    prior_observation_days=30,
    outcome="condition",
    outcome_concept_ids=(AKI,),
    horizon_days=180,
    features=(
        OmopFeature("age", domain="person", aggregate="age"),
        OmopFeature("male", domain="person", aggregate="male"),
        OmopFeature("hr_last_before", concept_ids=(HR,), aggregate="last", start_hours=-24 * 400,
                    end_hours=0),
        OmopFeature("hr_max_after", concept_ids=(HR,), aggregate="max", end_hours=24 * 400),
        OmopFeature("sepsis_30d", domain="condition", concept_ids=(SEPSIS,),
                    aggregate="presence", end_hours=24 * 30),
        OmopFeature("pain_mean", domain="observation", concept_ids=(PAIN,), aggregate="mean",
                    start_hours=-24 * 5, end_hours=24 * 10),
        OmopFeature("smoker_count", domain="observation", concept_ids=(SMOKER,),
                    aggregate="count", start_hours=-24 * 5, end_hours=24 * 10),
    ),
)  # fmt: skip

OBSERVATIONS = replace(
    SYNTHETIC,
    features=(
        OmopFeature("pain_last", domain="observation", concept_ids=(PAIN,), aggregate="last",
                    start_hours=-24 * 400, end_hours=24 * 400),
        OmopFeature("pain_first", domain="observation", concept_ids=(PAIN,), aggregate="first",
                    start_hours=-24 * 400, end_hours=24 * 400),
        OmopFeature("pain_mean", domain="observation", concept_ids=(PAIN,), aggregate="mean",
                    start_hours=-24 * 60, end_hours=24 * 60),
        OmopFeature("pain_min", domain="observation", concept_ids=(PAIN,), aggregate="min",
                    start_hours=-24 * 400),
        OmopFeature("pain_max", domain="observation", concept_ids=(PAIN,), aggregate="max",
                    end_hours=24 * 400),
        OmopFeature("pain_count", domain="observation", concept_ids=(PAIN,), aggregate="count",
                    start_hours=-24 * 400, end_hours=24 * 400),
        OmopFeature("smoker_count", domain="observation", concept_ids=(SMOKER,),
                    aggregate="count", start_hours=-24 * 400, end_hours=24 * 400),
        OmopFeature("hr_mean_24h", concept_ids=(HR,), aggregate="mean", end_hours=24),
    ),
)  # fmt: skip

# domain -> (table, concept, datetime, date, value (None: 1), row id) for the pandas reference
REFERENCE = {
    "measurement": ("measurement", "measurement_concept_id", "measurement_datetime",
                    "measurement_date", "value_as_number", "measurement_id"),
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_datetime",
                  "condition_start_date", None, "condition_occurrence_id"),
    "observation": ("observation", "observation_concept_id", "observation_datetime",
                    "observation_date", "value_as_number", "observation_id"),
}  # fmt: skip


def expected_rows(
    tables: dict[str, pd.DataFrame], ref: pd.DataFrame, omop: OmopConfig, feature: OmopFeature
) -> pd.DataFrame:
    """One feature's rows by hand: its concepts in its window (hours from each person's index
    time), in time then row-id order; a measurement needs a number, and so does an
    observation unless the feature counts rows."""
    table, concept, stamp, day, value, row_id = REFERENCE[feature.domain]
    rows = tables[table].merge(ref[["person_id", "start"]], on="person_id")
    rows["when"] = pd.to_datetime(rows[stamp]).fillna(pd.to_datetime(rows[day]))
    rows["hours"] = (rows["when"] - rows["start"]).dt.total_seconds() / 3600
    rows["value"] = rows[value].astype(float) if value else 1.0
    end = omop.window_hours if feature.end_hours is None else feature.end_hours
    rows = rows[rows[concept].isin(feature.concept_ids)
                & rows["hours"].between(feature.start_hours, end)]  # fmt: skip
    if feature.domain == "measurement" or feature.aggregate != "count":
        rows = rows[rows["value"].notna()]
    return rows.sort_values(["person_id", "when", row_id])


def expected_table(
    tables: dict[str, pd.DataFrame], ref: pd.DataFrame, omop: OmopConfig
) -> pd.DataFrame:
    """Every feature per person, by hand (count and presence: 0 without a row)."""
    ids = ref["person_id"]
    out = pd.DataFrame(index=ids)
    for f in omop.features:
        if f.domain == "person":
            source = ref.set_index("person_id")
            male = source["gender_concept_id"].map({8507: 1.0, 8532: 0.0})
            out[f.name] = source["age"].astype(float) if f.aggregate == "age" else male
            continue
        rows = expected_rows(tables, ref, omop, f)
        how = {"count": "size", "presence": "size"}.get(f.aggregate, f.aggregate)
        agg = rows.groupby("person_id")["value"].agg(how).reindex(ids).astype(float)
        if f.aggregate == "presence":
            agg = (agg > 0).astype(float)
        out[f.name] = agg.fillna(0.0) if f.aggregate in ("count", "presence") else agg
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_condition_index_cohort_equals_a_pandas_computation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, schema_omop, tables = _backend(request, monkeypatch, backend)
    omop = replace(CONDITION_INDEX, schema=schema_omop.schema)
    ref = expected_cohort(tables, omop)
    c = tables["condition_occurrence"].merge(ref[["person_id", "date"]], on="person_id")
    later = c[(c["condition_concept_id"] == AKI)
              & (pd.to_datetime(c["condition_start_date"]) >= c["date"])]  # fmt: skip
    first = ref["person_id"].map(
        pd.to_datetime(later.groupby("person_id")["condition_start_date"].min())
    )
    days = (first.fillna(ref["end"]) - ref["date"]).dt.days
    event = first.notna() & (days <= omop.horizon_days)
    expected = expected_table(tables, ref, omop)

    got = cohort.extract(url, credentials, omop)
    table = cohort.wide_table(got, omop, {"time": "days", "event": "aki"})

    assert 15 < len(ref) < 80  # the rules removed persons and kept enough to mean something
    assert got.cohort["person_id"].tolist() == ref["person_id"].tolist()
    # Minute 0 is the condition's start: its datetime, else 00:00 of its date (both occur).
    assert got.cohort["index_start"].tolist() == ref["start"].tolist()
    assert (ref["start"] == ref["date"]).any() and (ref["start"] != ref["date"]).any()
    assert got.cohort["observation_end"].tolist() == ref["end"].tolist()
    assert got.cohort["age"].tolist() == ref["age"].astype(float).tolist()
    for name in expected.columns:
        np.testing.assert_allclose(
            table[name].to_numpy(float), expected[name].to_numpy(float), rtol=1e-12, err_msg=name
        )
        assert expected[name].nunique() > 1, name  # the feature tells persons apart
    assert table["aki"].tolist() == event.astype(int).tolist()
    assert table["days"].tolist() == days.clip(upper=omop.horizon_days).astype(float).tolist()
    # The sequence task's rows: minutes since the condition's start, each feature's window.
    long = cohort.long_table(got, omop)
    hr = expected_rows(tables, ref, omop, omop.features[2])
    mine = long[long["variable"] == "hr_last_before"]
    assert mine["id"].tolist() == hr["person_id"].tolist()
    np.testing.assert_allclose(mine["time"], hr["hours"] * 60, rtol=0, atol=1e-9)
    assert (mine["time"] <= 0).all() and mine["id"].nunique() > 5
    # Each rule matters: without the age window, or the prior observation, more persons.
    for looser in (replace(omop, min_age=0, max_age=150), replace(omop, prior_observation_days=0)):
        wider = expected_cohort(tables, looser)["person_id"].tolist()
        assert len(wider) > len(ref)
        assert cohort.extract(url, credentials, looser).cohort["person_id"].tolist() == wider


def test_a_condition_index_sequence_study_bins_minutes_from_the_diagnosis(
    synthetic_duckdb: tuple[str, dict],
) -> None:
    """The sequence task's minute 0 is the diagnosis's start: every variable's observed
    (person, bin) cells equal pandas' on the rows from it to data.series.hours (a look-back
    window's rows, at negative minutes, are not binned)."""
    url, tables = synthetic_duckdb
    keep = ("age", "hr_last_before", "hr_max_after", "sepsis_30d", "pain_mean")
    omop = replace(CONDITION_INDEX, features=tuple(
        f for f in CONDITION_INDEX.features if f.name in keep))  # fmt: skip
    hours, bin_minutes = 24 * 400, 60 * 24 * 20  # 20 bins of 20 days
    cfg = parse_run_config(
        {
            "task": "sequence-classification",
            "mode": "local",
            "model": {"kind": "gru", "hidden": [8]},
            "data": {
                "schema": {"target": "aki", "features": list(keep), "min_rows": 5},
                "series": {"hours": hours, "bin_minutes": bin_minutes},
                "omop": cohort.definition(omop),
            },
            "sites": [{"name": "a", "path": url}],
        }
    )
    ref = expected_cohort(tables, omop)
    n_bins = hours * 60 // bin_minutes
    cells = {"age": len(ref)}  # every age, at minute 0
    for f in omop.features[1:]:
        rows = expected_rows(tables, ref, omop, f)
        minutes = rows["hours"] * 60
        rows = rows[(minutes >= 0) & (minutes <= hours * 60)]
        bins = np.minimum(rows["hours"] * 60 // bin_minutes, n_bins - 1)
        cells[f.name] = len(set(zip(rows["person_id"], bins, strict=True)))

    data = load_site_data(cfg, cfg.sites[0])

    assert data.n_train + len(data.y_test) == len(ref)
    mask = np.concatenate([data.x_train, data.x_test])[:, :, len(keep) : 2 * len(keep)]
    observed = dict(zip(keep, mask.sum(axis=(0, 1)).astype(int).tolist(), strict=True))
    assert observed == cells
    assert cells["hr_last_before"] == 0 < cells["hr_max_after"]  # only before the diagnosis
    assert cells["sepsis_30d"] > 0 and cells["pain_mean"] > 0


def test_a_death_before_the_index_condition_is_refused_naming_the_person(
    synthetic_duckdb: tuple[str, dict],
) -> None:
    url, tables = synthetic_duckdb
    omop = replace(CONDITION_INDEX, outcome="death", outcome_concept_ids=())
    ref = expected_cohort(tables, omop)
    early = ref[ref["death"] < ref["date"]]
    assert len(early) > 0  # the synthetic CDM has diagnoses dated after a recorded death

    with pytest.raises(DataError, match="before the index condition") as err:
        cohort.extract(url, "", omop)

    assert f"person {early['person_id'].iloc[0]} " in str(err.value)


def test_an_empty_condition_cohort_names_its_entry(
    synthetic_duckdb: tuple[str, dict], tmp_path: Path
) -> None:
    url, _ = synthetic_duckdb
    nobody = replace(CONDITION_INDEX, condition_concept_ids=(4000001,))

    with pytest.raises(DataError, match=r"no first condition of concepts \[4000001\]"):
        DatasetRegistry(tmp_path / "state").add_omop("icu", url, nobody)


@pytest.mark.parametrize("backend", BACKENDS)
def test_observation_features_equal_a_pandas_computation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, schema_omop, tables = _backend(request, monkeypatch, backend)
    omop = replace(OBSERVATIONS, schema=schema_omop.schema)
    ref = expected_cohort(tables, omop)
    expected = expected_table(tables, ref, omop)

    got = cohort.extract(url, credentials, omop)
    table = cohort.wide_table(got, omop, {"target": "died"})

    assert list(table.columns) == [*expected.columns, "died"]
    for name in expected.columns:
        np.testing.assert_allclose(
            table[name].to_numpy(float), expected[name].to_numpy(float), rtol=1e-12, err_msg=name
        )
    assert expected["smoker_count"].gt(0).any()  # counted although no row has a number
    with_number = expected_rows(tables, ref, omop, replace(omop.features[5], aggregate="last"))
    assert (
        expected["pain_count"]
        > with_number.groupby("person_id").size().reindex(expected.index).fillna(0)
    ).any()  # a pain score without its number still counts
    assert expected["pain_mean"].isna().any() and expected["pain_mean"].notna().any()
    # The sequence task reads numbers: no smoker row, no pain row without one.
    long = cohort.long_table(got, omop)
    assert "smoker_count" not in set(long["variable"]) and long["value"].notna().all()
    pain = long[long["variable"] == "pain_last"]
    assert len(pain) == len(with_number)
    np.testing.assert_allclose(pain["value"], with_number["value"])


@pytest.mark.postgres
@pytest.mark.parametrize("study", ["visit", "condition"])
def test_duckdb_and_postgres_yield_the_same_fingerprint(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, study: str
) -> None:
    url, _, omop, _ = _backend(request, monkeypatch, "duckdb")
    pg_url, credentials, pg_omop, _ = _backend(request, monkeypatch, "postgres")
    if study == "condition":  # a condition index with observation features (some valueless)
        names = {f.name for f in CONDITION_INDEX.features}
        more = tuple(f for f in OBSERVATIONS.features if f.name not in names)
        omop = replace(CONDITION_INDEX, features=CONDITION_INDEX.features + more)
        pg_omop = replace(omop, schema="cdm")

    a, b = cohort.extract(url, "", omop), cohort.extract(pg_url, credentials, pg_omop)

    pd.testing.assert_frame_equal(a.observations, b.observations)
    pd.testing.assert_frame_equal(a.cohort, b.cohort)
    same_schema = replace(pg_omop, schema="")
    assert cohort.fingerprint(b, same_schema) == cohort.fingerprint(a, omop)


def test_a_visit_cohort_registered_before_condition_indexes_keeps_its_fingerprint(
    synthetic_duckdb: tuple[str, dict],
) -> None:
    """index and condition_concept_ids are left out of a visit study's definition, so a site's
    registration from before they existed still verifies (value computed before the change)."""
    url, _ = synthetic_duckdb

    got = cohort.extract(url, "", SYNTHETIC)

    assert not {"index", "condition_concept_ids"} & set(cohort.definition(SYNTHETIC))
    assert cohort.fingerprint(got, SYNTHETIC) == (
        "sha256:ab59e8dc9a7839a90e2b7f449bc1bc895581b0393a369320d0bf7db2aa69ccf0"
    )
    condition = cohort.definition(CONDITION_INDEX)
    assert condition["index"] == "condition" and condition["condition_concept_ids"] == [DIABETES]


# --- SQL injection, read-only connections, credentials -----------------------------------------

HOSTILE = "hr'); DROP TABLE person; --"


def _recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Every statement and its parameters sent to any database opened through cohort.connect."""
    import sqlalchemy as sa

    sent: list[tuple[str, object]] = []
    connect = cohort.connect

    def recording(url: str, credentials: str = ""):
        engine = connect(url, credentials)
        sa.event.listen(
            engine,
            "before_cursor_execute",
            lambda c, cur, sql, params, *_: sent.append((sql, params)),
        )
        return engine

    monkeypatch.setattr(cohort, "connect", recording)
    return sent


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_values_never_enter_sql(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, omop, tables = _backend(request, monkeypatch, backend)
    hostile = replace(omop, features=(OmopFeature(HOSTILE, concept_ids=(HR,), aggregate="max"),))
    sent = _recorded(monkeypatch)

    table = cohort.wide_table(cohort.extract(url, credentials, hostile), hostile, {"target": "y"})

    assert list(table.columns) == [HOSTILE, "y"]  # the name labels a column, nothing more
    assert sent and all(HOSTILE not in sql and "DROP" not in sql for sql, _ in sent)
    # Values travel as parameters: no concept id, age or day count is written into the SQL.
    for literal in (str(ICU), str(HR), "85", "30"):
        assert not any(literal in sql for sql, _ in sent), literal
    assert any(str(ICU) in repr(params) for _, params in sent)  # ...but as a bound value
    assert len(cohort.extract(url, credentials, omop).cohort) == len(
        expected_cohort(tables, omop)
    )  # person is still there


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_condition_index_and_observation_features_send_values_only_as_parameters(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    url, credentials, schema_omop, tables = _backend(request, monkeypatch, backend)
    hostile = replace(
        CONDITION_INDEX,
        schema=schema_omop.schema,
        features=(
            OmopFeature(HOSTILE, domain="observation", concept_ids=(PAIN,), aggregate="count",
                        start_hours=-24 * 5, end_hours=24 * 10),
        ),
    )  # fmt: skip
    sent = _recorded(monkeypatch)

    got = cohort.extract(url, credentials, hostile)
    table = cohort.wide_table(got, hostile, {"target": "y"})

    assert list(table.columns) == [HOSTILE, "y"] and table[HOSTILE].gt(0).any()
    assert sent and all(HOSTILE not in sql and "DROP" not in sql for sql, _ in sent)
    for literal in (str(DIABETES), str(PAIN), str(AKI), "85", "180"):
        assert not any(literal in sql for sql, _ in sent), literal
    bound = " ".join(repr(params) for _, params in sent)
    assert str(DIABETES) in bound and str(PAIN) in bound and str(AKI) in bound
    assert len(got.cohort) == len(expected_cohort(tables, hostile))  # person is intact


def test_hostile_values_are_refused_before_any_sql() -> None:
    with pytest.raises(ConfigError, match="not a plain schema name"):
        OmopConfig(schema="cdm; DROP TABLE person", visit_concept_ids=(ICU,))
    with pytest.raises(ConfigError, match="choose one of: visit, condition"):
        OmopConfig(index="condition_occurrence; DROP TABLE person", condition_concept_ids=(1,))
    with pytest.raises(ConfigError, match="condition_concept_ids must be whole numbers"):
        OmopConfig(index="condition", condition_concept_ids=("201826) OR (1=1",))
    raw = {
        "task": "tabular-classification",
        "sites": [{"name": "a", "path": "duckdb:///a.duckdb"}],
        "mode": "local",
        "data": {"omop": {"visit_concept_ids": [ICU], "features": [
            {"name": "hr", "concept_ids": ["3027018 OR 1=1"]}]}},
    }  # fmt: skip
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_run_config(raw)
    raw["data"]["omop"]["visit_concept_ids"] = ["32037) OR (1=1"]
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_run_config(raw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_connections_are_read_only(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    import sqlalchemy as sa

    url, credentials, omop, _ = _backend(request, monkeypatch, backend)
    table = f"{omop.schema}.person" if omop.schema else "person"
    engine = cohort.connect(url, credentials)

    with pytest.raises(sa.exc.DBAPIError, match="(?i)read-only|read only"), engine.begin() as con:
        con.execute(sa.text(f"DELETE FROM {table}"))
    engine.dispose()
    assert len(cohort.extract(url, credentials, omop).cohort) > 0


def test_url_parameters_cannot_undo_the_read_only_session() -> None:
    url = "postgresql://reader@/cdm?host=/tmp&options=-c%20default_transaction_read_only%3Doff"
    with pytest.raises(ConfigError, match="parameter 'options' is not allowed"):
        cohort.connect(url)
    with pytest.raises(ConfigError, match="parameter 'access_mode' is not allowed"):
        cohort.connect("duckdb:///cdm.duckdb?access_mode=read_write")
    kept = cohort.database_url("postgresql://r@db/cdm?sslmode=verify-full&port=5433")
    assert kept.query == {"sslmode": "verify-full", "port": "5433"}  # where and how: allowed


def test_a_password_in_the_url_is_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError, match="carries a password") as err:
        cohort.database_url("postgresql://reader:hunter2@db.example/omop")
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in cohort.shown("postgresql://reader:hunter2@db.example/omop")


def test_password_files_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {secret}") as err:
        cohort.read_password(f"file:{secret}")
    assert "hunter2" not in str(err.value)
    secret.chmod(0o600)
    assert cohort.read_password(f"file:{secret}") == "hunter2"
    monkeypatch.delenv("NO_SUCH_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="export NO_SUCH_PASSWORD"):
        cohort.read_password("env:NO_SUCH_PASSWORD")
    with pytest.raises(ConfigError, match="never the password itself"):
        parse_run_config({"mode": "local", "sites": [{"name": "a", "credentials": "hunter2"}]})


@pytest.mark.postgres
def test_postgres_credentials_come_from_the_environment_or_a_private_file(
    synthetic_postgres: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = synthetic_postgres
    omop = replace(SYNTHETIC, schema="cdm")
    monkeypatch.setenv("OMOP_WRONG", "not-the-password")
    secret = tmp_path / "pw"
    secret.write_text(password + "\n")
    secret.chmod(0o600)

    with pytest.raises(DataError, match="password authentication failed") as err:
        cohort.extract(url, "env:OMOP_WRONG", omop)
    from_file = cohort.extract(url, f"file:{secret}", omop)

    assert "not-the-password" not in str(err.value) and password not in str(err.value)
    assert len(from_file.cohort) > 0


# --- registration: the cohort's fingerprint, a changed cohort refused until re-registered ------


def _study_toml(path: Path, omop: OmopConfig, sites: list[dict]) -> Path:
    """A tabular study on each site's registered dataset 'icu' (TOML written by hand: the
    features are inline tables)."""
    feats = ",\n".join(
        "  { "
        + ", ".join(
            f"{k} = {json.dumps(v if not isinstance(v, tuple) else list(v))}"
            for k, v in f.__dict__.items()
            if v is not None  # TOML has no null: a default left out
        )
        + " }"
        for f in omop.features
    )
    head = {k: v for k, v in omop.__dict__.items() if k != "features"}
    lines = [
        'name = "omop-study"', 'task = "tabular-classification"', 'mode = "local"', "rounds = 1",
        "[data]", 'dataset = "icu"',  # a deployment's study: the site maps the name
        "[data.schema]", 'target = "died"', "min_rows = 5", 'missing = "mean"',
        "[data.omop]",
        *(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in head.items()),
        f"features = [\n{feats}\n]",
    ]  # fmt: skip
    for site in sites:
        lines += ["[[sites]]", *(f"{k} = {json.dumps(v)}" for k, v in site.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _site_toml(tmp_path: Path) -> Path:
    path = tmp_path / "st-marys.toml"
    path.write_text(f'name = "st-marys"\ninsecure = true\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_register_check_and_a_changed_cohort_is_refused(
    synthetic_duckdb: tuple[str, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, tables = synthetic_duckdb
    db = tmp_path / "cdm.duckdb"
    write_database(duckdb, db, tables)  # a copy this test may change
    study = _study_toml(tmp_path / "study.toml", SYNTHETIC, [{"name": "st-marys"}])
    site = _site_toml(tmp_path)

    code = main(["site", "data", "add", str(site), "icu", "--omop", f"duckdb:///{db}",
                 "--config", str(study)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    ds = DatasetRegistry(tmp_path / "state").get("icu")
    assert ds.kind == "omop" and ds.path == f"duckdb:///{db}"
    assert ds.rows == len(expected_cohort(tables, SYNTHETIC))
    assert f"{ds.rows} persons" in out and ds.sha256 in out
    assert main(["site", "data", "check", str(site)]) == 0
    assert "icu: ok" in capsys.readouterr().out

    local, spec = site_view(load_run_config(study), ds, "st-marys")
    table = load_site_table(local, spec)
    assert len(table.y_train) + len(table.y_test) == ds.rows

    with duckdb.connect(str(db)) as con:  # a row no feature reads: the cohort is unchanged
        con.execute(
            "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id, "
            "measurement_date, measurement_type_concept_id, value_as_number) "
            "SELECT max(measurement_id) + 1, 1, 4000000, DATE '2016-01-01', 32817, 1 "
            "FROM measurement"
        )
    assert main(["site", "data", "check", str(site)]) == 0
    with duckdb.connect(str(db)) as con:  # the values of one feature change
        con.execute(
            "UPDATE measurement SET value_as_number = value_as_number + 1 "
            "WHERE measurement_concept_id = ?",
            [TEMP],
        )
    assert main(["site", "data", "check", str(site)]) == 1
    out = capsys.readouterr().out
    assert "changed since it was registered" in out and "--replace" in out
    with pytest.raises(DataError, match="re-register"):
        DatasetRegistry(tmp_path / "state").verify("icu")

    assert main(["site", "data", "add", str(site), "icu", "--omop", f"duckdb:///{db}",
                 "--config", str(study), "--replace"]) == 0  # fmt: skip
    assert main(["site", "data", "check", str(site)]) == 0


def test_a_study_must_ask_for_the_registered_cohort(
    synthetic_duckdb: tuple[str, dict], tmp_path: Path
) -> None:
    url, _ = synthetic_duckdb
    registry = DatasetRegistry(tmp_path / "state")
    ds = registry.add_omop("icu", url, SYNTHETIC)
    study = load_run_config(
        _study_toml(tmp_path / "s.toml", SYNTHETIC, [{"name": "a"}, {"name": "b"}])
    )
    wider = study.replace(data=replace(study.data, omop=replace(SYNTHETIC, max_age=90)))

    local, spec = site_view(study, ds, "a")
    assert spec.path == url and load_site_data(local, spec).n_train > 0
    with pytest.raises(DataError, match="not the one registered"):
        site_view(wider, ds, "a")


def test_a_deployed_site_trains_only_on_the_registered_cohort(
    synthetic_duckdb: tuple[str, dict], tmp_path: Path
) -> None:
    """The site's message path (fedmed.site.inputs) verifies the cohort on every message."""
    from flwr.app import Context, RecordDict

    from fedmed.protocol import SITE_CONFIG_KEY
    from fedmed.site.inputs import site_inputs

    _, tables = synthetic_duckdb
    db = tmp_path / "cdm.duckdb"
    write_database(duckdb, db, tables)
    study = _study_toml(tmp_path / "s.toml", SYNTHETIC, [{"name": "st-marys"}, {"name": "b"}])
    registry = DatasetRegistry(tmp_path / "state")
    registry.add_omop("icu", f"duckdb:///{db}", SYNTHETIC)
    text = load_run_config(study).to_json()
    context = Context(1, 1, {SITE_CONFIG_KEY: str(_site_toml(tmp_path))}, RecordDict(), {})
    before = site_inputs(text, context).data

    with duckdb.connect(str(db)) as con:  # a new person enters the cohort
        con.execute("UPDATE person SET year_of_birth = 1990 WHERE year_of_birth < 1930")
        con.execute("UPDATE person SET year_of_birth = 1960")
    with pytest.raises(DataError, match="changed since it was registered"):
        site_inputs(text, context)
    registry.add_omop("icu", f"duckdb:///{db}", SYNTHETIC, replace=True)
    after = site_inputs(text, context).data

    assert before.n_train + len(before.y_test) < after.n_train + len(after.y_test)


def test_a_federation_plan_names_no_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sites = [{"name": "a", "path": "duckdb:///a.duckdb"}, {"name": "b"}]
    study = _study_toml(tmp_path / "s.toml", SYNTHETIC, sites)

    code = main(["run", str(study)])

    assert code == 2
    assert "site 'a' has a path or credentials" in capsys.readouterr().err


@pytest.mark.postgres
def test_postgres_registration_keeps_no_password(
    synthetic_postgres: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    url, password = synthetic_postgres
    monkeypatch.setenv("OMOP_READER_PASSWORD", password)
    omop = replace(SYNTHETIC, schema="cdm")
    study = _study_toml(tmp_path / "study.toml", omop, [{"name": "st-marys"}])
    site = _site_toml(tmp_path)

    code = main(["site", "data", "add", str(site), "icu", "--omop", url, "--config", str(study),
                 "--password-env", "OMOP_READER_PASSWORD"])  # fmt: skip
    assert code == 0
    assert main(["site", "data", "check", str(site)]) == 0
    monkeypatch.setenv("OMOP_READER_PASSWORD", "wrong")
    assert main(["site", "data", "check", str(site)]) == 1
    printed = capsys.readouterr()

    stored = (tmp_path / "state" / "datasets.json").read_text()
    assert "env:OMOP_READER_PASSWORD" in stored
    for text in (stored, printed.out, printed.err, study.read_text()):
        assert password not in text
    ds = DatasetRegistry(tmp_path / "state").get("icu")
    local, spec = site_view(load_run_config(study), ds, "st-marys")
    assert spec.credentials == "env:OMOP_READER_PASSWORD"
    assert password not in local.to_json()


# --- PhysioNet 2012 set A: four ICU-type databases against the long CSV ------------------------


@pytest.fixture(scope="module")
def physionet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first LIMIT stays of each ICU type as four DuckDB files, and the same stays' CSV."""
    if not (DATA_DIR / "physionet2012" / "set_a_long.csv.gz").is_file():
        pytest.skip("shared datasets not found (FEDMED_DATA_DIR)")
    out = tmp_path_factory.mktemp("physionet-omop")
    build_physionet_omop(out, limit=LIMIT)
    long = pd.read_csv(DATA_DIR / "physionet2012" / "set_a_long.csv.gz")
    icu = long[long["parameter"] == "ICUType"].set_index("record_id")["value"]
    kept = pd.Index(
        np.concatenate([np.sort(icu.index[icu == t].to_numpy())[:LIMIT] for t in (1, 2, 3, 4)])
    )
    long[long["record_id"].isin(kept)].to_csv(out / "subset.csv.gz", index=False)
    return out


def _reference(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The subset's long rows and outcomes, read with plain pandas (no fedmed code)."""
    long = pd.read_csv(folder / "subset.csv.gz")
    outcomes = pd.read_csv(DATA_DIR / "physionet2012" / "outcomes_a.csv")
    icu = long[long["parameter"] == "ICUType"].set_index("record_id")["value"].astype(int)
    outcomes = outcomes[outcomes["RecordID"].isin(icu.index)].copy()
    outcomes["icu"] = outcomes["RecordID"].map(icu)
    return long, outcomes


def _omop_study(folder: Path) -> Path:
    """simulations/physionet2012-omop.toml with its sites pointed at ``folder``."""
    text = (ROOT / "simulations" / "physionet2012-omop.toml").read_text()
    path = folder / "omop.toml"
    path.write_text(text.replace("duckdb:///omop/", f"duckdb:///{folder}/"))
    return path


def _csv_study(folder: Path) -> Path:
    """simulations/physionet2012.toml reading the same stays from their long CSV."""
    text = (ROOT / "simulations" / "physionet2012.toml").read_text()
    path = folder / "csv.toml"
    path.write_text(
        text.replace("{data_dir}/physionet2012/set_a_long.csv.gz", str(folder / "subset.csv.gz"))
    )
    return path


@needs_shared_data
def test_physionet_cohorts_and_deaths_equal_the_source(physionet: Path) -> None:
    long, outcomes = _reference(physionet)
    ages = long[long["parameter"] == "Age"].set_index("record_id")["value"]
    omop = OmopConfig(
        visit_concept_ids=(ICU,),
        min_age=40,
        max_age=80,
        features=(OmopFeature("age", domain="person", aggregate="age"),),
    )

    for site in SITES:
        got = cohort.extract(f"duckdb:///{physionet / site.name}.duckdb", "", omop)
        ids = outcomes["RecordID"][outcomes["icu"] == site.icu_type]
        kept = ids[ages.loc[ids].between(40, 80).to_numpy()]
        assert got.cohort["person_id"].tolist() == sorted(kept.tolist()), site.name
        deaths = outcomes.set_index("RecordID").loc[kept, "In-hospital_death"]
        assert cohort.labels(got, omop).tolist() == deaths.sort_index().tolist()
        assert 0 < len(kept) < LIMIT


@needs_shared_data
def test_physionet_tabular_features_and_survival_equal_the_source(physionet: Path) -> None:
    long, outcomes = _reference(physionet)
    omop = OmopConfig(
        visit_concept_ids=(ICU,),
        features=(
            OmopFeature("Age", domain="person", aggregate="age"),
            OmopFeature("Gender", domain="person", aggregate="male"),
            OmopFeature("HR", concept_ids=(HR,), aggregate="mean", end_hours=24),
            OmopFeature("Temp", concept_ids=(TEMP,), aggregate="last"),
            OmopFeature("Creatinine", concept_ids=(3016723,), aggregate="max"),
            OmopFeature("MAP", concept_ids=(3027598,), aggregate="min", start_hours=12),
            OmopFeature("Urine", concept_ids=(3014315,), aggregate="count"),
        ),
    )
    site = SITES[2]  # medical ICU
    got = cohort.wide_table(
        cohort.extract(f"duckdb:///{physionet / site.name}.duckdb", "", omop),
        omop,
        {"time": "days", "event": "died"},
    )

    ids = np.sort(outcomes["RecordID"][outcomes["icu"] == site.icu_type].to_numpy())
    rows = long[long["record_id"].isin(ids)]
    static = rows[rows["time_min"] == 0].pivot_table(
        index="record_id", columns="parameter", values="value", aggfunc="first"
    )
    np.testing.assert_array_equal(got["Age"], static.loc[ids, "Age"])
    gender = static.loc[ids, "Gender"].where(lambda g: g >= 0)
    np.testing.assert_array_equal(got["Gender"], gender)
    windows = {"HR": (0, 24, "mean"), "Temp": (0, 48, "last"), "Creatinine": (0, 48, "max"),
               "MAP": (12, 48, "min"), "Urine": (0, 48, "count")}  # fmt: skip
    for name, (low, high, how) in windows.items():
        part = rows[(rows["parameter"] == name) & rows["time_min"].between(low * 60, high * 60)]
        expected = part.groupby("record_id")["value"].agg(how).reindex(ids)
        if how == "count":
            expected = expected.fillna(0)
        np.testing.assert_allclose(got[name], expected, rtol=1e-12, err_msg=name)
    out = outcomes.set_index("RecordID").loc[ids]
    died = out["In-hospital_death"] == 1
    np.testing.assert_array_equal(got["died"], died.astype(int))
    np.testing.assert_array_equal(got["days"], np.where(died, out["Survival"], 2))


@needs_shared_data
def test_physionet_sequence_study_from_omop_equals_the_long_csv(
    physionet: Path, capsys: pytest.CaptureFixture
) -> None:
    omop_cfg, csv_cfg = (
        load_run_config(_omop_study(physionet)),
        load_run_config(_csv_study(physionet)),
    )

    for a, b in zip(omop_cfg.sites, csv_cfg.sites, strict=True):
        x, y = load_site_data(omop_cfg, a), load_site_data(csv_cfg, b)
        for part in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(x, part), getattr(y, part), err_msg=a.name)
        assert x.preprocessing == y.preprocessing

    auroc = {}
    for kind, study in (("omop", _omop_study(physionet)), ("csv", _csv_study(physionet))):
        small = ["--set", "rounds=2", "--set", "model.members=1", "--set", "model.hidden=[8]"]
        code = main(["simulate", str(study), "--quiet", "--output-dir", str(physionet / kind),
                     *small])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        final = json.loads((run_dir / "metrics.json").read_text())["final"]["sites"]
        auroc[kind] = {site: m["roc_auc"] for site, m in final.items()}
    assert auroc["omop"] == auroc["csv"]
    assert len(auroc["omop"]) == 4 and all(0 < v < 1 for v in auroc["omop"].values())


@pytest.mark.postgres
@needs_shared_data
def test_physionet_from_postgres_equals_duckdb(
    physionet: Path, server: postgres.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = SITES[0]
    with duckdb.connect(str(physionet / f"{site.name}.duckdb"), read_only=True) as con:
        tables = {
            name: con.execute(f"SELECT * FROM {name}").fetchdf()
            for name in ("person", "visit_occurrence", "observation_period", "measurement", "death")
        }
    server.create_cdm("physionet_ccu", tables, "cdm")
    cfg = load_run_config(_omop_study(physionet))
    pg = cfg.replace(data=replace(cfg.data, omop=replace(cfg.data.omop, schema="cdm")))
    monkeypatch.setenv("OMOP_PG_ADMIN", server.password)
    spec = SiteSpec(site.name, path=server.url("physionet_ccu"), credentials="env:OMOP_PG_ADMIN")

    from_pg, from_duckdb = load_site_data(pg, spec), load_site_data(cfg, cfg.sites[0])

    assert from_pg.n_train + len(from_pg.y_test) == LIMIT
    for part in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_pg, part), getattr(from_duckdb, part))


@needs_shared_data
def test_federated_statistics_from_omop_equal_those_from_the_long_csv(
    physionet: Path, capsys: pytest.CaptureFixture
) -> None:
    """`fedmed stats` reads a site's cohort from its OMOP database as training does: the same
    counts, histograms and pooled tables as from the long CSV on the same stays."""
    released = {}
    for kind, study in (("omop", _omop_study(physionet)), ("csv", _csv_study(physionet))):
        out = ["--output-dir", str(physionet / f"stats-{kind}")]
        assert main(["stats", str(study), *out]) == 0, capsys.readouterr().err
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        released[kind] = json.loads((run_dir / "stats.json").read_text())
    for report in released.values():
        report.pop("study"), report.pop("seconds")

    assert released["omop"] == released["csv"]
    assert released["omop"]["cohort"]["pooled"]["count"] == 400  # 100 stays per ICU type
