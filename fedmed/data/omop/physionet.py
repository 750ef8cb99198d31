"""PhysioNet 2012 set A as OMOP CDM v5.4: one DuckDB database per ICU type, one demo site each.

Real ICU stays in the layout hospitals' research databases use, so that reading cohorts from
OMOP can be built and tested on real data. The decisions, in short (docs/omop.md has them all,
with the concept table and where each id comes from):

- one ICU stay (RecordID) is one person and one visit_occurrence (32037 Intensive Care); both
  ids are the RecordID, and person_source_value / visit_source_value keep it as text, so a
  test or a cohort can join back to the source. Set A does not link stays of one patient.
- PhysioNet times are minutes since ICU admission, so every admission is put at ANCHOR
  (2012-01-01 00:00, the year set A was published) and measurement_datetime = ANCHOR + minutes.
  The visit ends at ANCHOR + 48 h: the challenge's window (stays shorter than 48 h were left
  out); the real ICU discharge is not in set A, and Length_of_stay leaks the outcome.
- Age gives year_of_birth = ANCHOR's year - Age (birthdays are unknown; ages are top-coded at
  90); Gender 1/0 gives 8507/8532, -1 gives 0 with the source value kept.
- ICUType is the care_site (one row per database); Height and Weight are measurements like the
  37 series; PhysioNet's missing code (-1) is not written.
- an in-hospital death is a death row dated ANCHOR + Survival days (set A gives only the flag
  and the day count); deaths after discharge (Survival > 0, flag 0) are not written, so
  ``death`` holds exactly the challenge's label.
"""

from __future__ import annotations

import csv
import os
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmed.config import data_dir, echo
from fedmed.data.omop.schema import OPTIONAL_TABLES, TABLES, create_statements
from fedmed.data.series import read_header
from fedmed.errors import ConfigError, DataError

ANCHOR = datetime(2012, 1, 1)
WINDOW = timedelta(hours=48)
MISSING = -1.0
DECIMALS = 3  # DuckDB's NUMERIC (OHDSI's type for value_as_number) is DECIMAL(18,3)
DESCRIPTORS = ("RecordID", "Age", "Gender", "ICUType")  # person / visit / care_site, not rows
GENDERS = {"0": 8532, "1": 8507}  # FEMALE, MALE; anything else -> 0
EHR = 32817  # type of measurements, visits and deaths (as OHDSI's MIMIC ETL)
EHR_EPISODE = 32828  # type of observation periods (as OHDSI's MIMIC ETL)
INTENSIVE_CARE = 32037
CDM_V54 = 756265
VOCABULARY_VERSION = "fedmed-subset-1"  # a hand-made subset, not an Athena release
SOURCE = "https://physionet.org/content/challenge-2012/1.0.0/"
SOURCE_RELEASE = date(2012, 1, 20)
LONG_COLUMNS = ("record_id", "time_min", "parameter", "value")


@dataclass(frozen=True)
class IcuSite:
    """One ICU type: a site's name (as in simulations/physionet2012.toml) and its care_site."""

    icu_type: int
    name: str
    unit: str
    abbreviation: str


SITES = (
    IcuSite(1, "coronary-care", "Coronary Care Unit", "CCU"),
    IcuSite(2, "cardiac-surgery", "Cardiac Surgery Recovery Unit", "CSRU"),
    IcuSite(3, "medical-icu", "Medical ICU", "MICU"),
    IcuSite(4, "surgical-icu", "Surgical ICU", "SICU"),
)


@dataclass(frozen=True)
class BuiltSite:
    """What one written database holds, for the command's summary."""

    site: IcuSite
    path: Path
    persons: int
    deaths: int
    measurements: int


def build_physionet_omop(
    out_dir: Path, *, force: bool = False, limit: int | None = None
) -> list[BuiltSite]:
    """Write OUT_DIR/<site>.duckdb for the four ICU types from $FEDMED_DATA_DIR/physionet2012.

    All four are built under temporary names and renamed into place only once every one is
    complete: an interrupted or failing run leaves no half-written database, and with
    ``force`` the old files stay as they were. ``limit`` keeps the first stays (by RecordID)
    of each ICU type, for a quick look.
    """
    targets = [out_dir / f"{site.name}.duckdb" for site in SITES]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; remove it or pass --force to replace it")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 stay per ICU type, got {limit}")
    duckdb = _duckdb()
    source = data_dir() / "physionet2012"
    long = read_long(source / "set_a_long.csv.gz")
    stays = read_stays(long, source / "outcomes_a.csv")
    mapping = read_mapping()
    measurements = measurement_rows(long, mapping)
    concepts = concept_rows(mapping)
    out_dir.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    temps = [t.with_name(f".{t.name}.{token}.tmp") for t in targets]
    built = []
    try:
        for site, temp, target in zip(SITES, temps, targets, strict=True):
            site_stays = stays[stays["icu_type"] == site.icu_type]
            if limit is not None:
                site_stays = site_stays.head(limit)
            rows = measurements[measurements["person_id"].isin(site_stays["record_id"])]
            tables = site_tables(site, site_stays, rows, concepts)
            write_database(duckdb, temp, tables)
            built.append(
                BuiltSite(site, target, len(tables["person"]), len(tables["death"]), len(rows))
            )
        for temp, target in zip(temps, targets, strict=True):
            os.replace(temp, target)
    finally:
        for temp in temps:  # after the renames, only a failed run leaves any
            for leftover in (temp, temp.with_name(temp.name + ".wal")):
                leftover.unlink(missing_ok=True)
    return built


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise ConfigError(
            "writing OMOP databases needs DuckDB; run: pip install 'fedmed[omop]'"
        ) from None
    return duckdb


def read_long(path: Path) -> pd.DataFrame:
    """Set A's long table: ids and minutes as integers, the value as a number AND as its text."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (set FEDMED_DATA_DIR to the datasets folder that holds "
            "physionet2012/)"
        )
    header = read_header(str(path))
    absent = [c for c in LONG_COLUMNS if c not in header]
    if absent:
        raise DataError(
            f"{path}: column '{absent[0]}' is missing (columns: {', '.join(header)}); this is "
            "not set A's long table (physionet2012/PROVENANCE.md describes it)"
        )
    types = {"record_id": "int64", "time_min": "int64", "parameter": "category", "value": str}
    try:
        df = pd.read_csv(path, usecols=list(LONG_COLUMNS), dtype=types, keep_default_na=False)
        df["number"] = df["value"].astype(np.float64)
    except ValueError:
        _first_bad_value(path)
        raise
    return df


def _first_bad_value(path: Path) -> None:
    """Name the row and column a typed read failed on (the slow path, only for the error)."""
    df = pd.read_csv(path, usecols=list(LONG_COLUMNS), dtype=str, keep_default_na=False)
    for column in ("record_id", "time_min", "value"):
        number = pd.to_numeric(df[column], errors="coerce")
        bad = number.isna().to_numpy()
        if column != "value":
            bad |= number.to_numpy() % 1 != 0
        if bad.any():
            row = int(np.argmax(bad))
            kind = "number" if column == "value" else "whole number"
            raise DataError(
                f"{path}: column '{column}' has value {echo(df[column].iloc[row])} at data row "
                f"{row + 1}, not a {kind}; fix it"
            )


def read_stays(long: pd.DataFrame, outcomes_path: Path) -> pd.DataFrame:
    """One row per stay, sorted by RecordID: age, gender text, ICU type, death flag and day."""
    static = long[(long["time_min"] == 0) & long["parameter"].isin(DESCRIPTORS[1:])]
    twice = static.duplicated(["record_id", "parameter"])
    if twice.any():
        row = static[twice].iloc[0]
        raise DataError(
            f"record {row['record_id']} has two time-0 '{row['parameter']}' rows; keep one"
        )
    wide = static.pivot(index="record_id", columns="parameter", values="value")
    ids = np.sort(long["record_id"].unique())
    wide = wide.reindex(index=ids, columns=list(DESCRIPTORS[1:]))
    for name in DESCRIPTORS[1:]:
        if wide[name].isna().any():
            record = wide.index[wide[name].isna()][0]
            raise DataError(f"record {record} has no time-0 '{name}' row; every stay needs one")
    icu = pd.to_numeric(wide["ICUType"])
    known = [s.icu_type for s in SITES]
    if not icu.isin(known).all():
        record = icu.index[~icu.isin(known)][0]
        raise DataError(
            f"record {record}: ICUType {echo(wide['ICUType'][record])} is not one of {known}"
        )
    age = pd.to_numeric(wide["Age"])
    if (age < 0).any():
        record = age.index[age < 0][0]
        raise DataError(f"record {record}: Age is missing ({wide['Age'][record]}); it is needed")
    outcomes = read_outcomes(outcomes_path)
    unlabeled = ids[~np.isin(ids, outcomes.index)]
    if len(unlabeled):
        raise DataError(
            f"{outcomes_path}: record {unlabeled[0]} has no row ({len(unlabeled)} records have "
            "none); use the outcomes file of the same set"
        )
    outcome = outcomes.loc[ids]
    return pd.DataFrame(
        {
            "record_id": ids,
            "age": age.to_numpy().astype(np.int64),
            "gender": wide["Gender"].to_numpy(),
            "icu_type": icu.to_numpy().astype(np.int64),
            "died": outcome["In-hospital_death"].to_numpy() == 1,
            "survival_days": outcome["Survival"].to_numpy().astype(np.int64),
        }
    )


def read_outcomes(path: Path) -> pd.DataFrame:
    """The in-hospital death flag and, for a death, its day: nothing else of the outcomes."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (set FEDMED_DATA_DIR to the datasets folder that holds "
            "physionet2012/)"
        )
    columns = ["RecordID", "In-hospital_death", "Survival"]
    header = read_header(str(path))
    absent = [c for c in columns if c not in header]
    if absent:
        raise DataError(
            f"{path}: column '{absent[0]}' is missing (columns: {', '.join(header)}); this is "
            "not set A's outcomes table"
        )
    df = pd.read_csv(path, usecols=columns).set_index("RecordID")
    if df.index.duplicated().any():
        record = df.index[df.index.duplicated()][0]
        raise DataError(f"{path}: record {record} has two rows; keep one per stay")
    flags = df["In-hospital_death"]
    if not flags.isin([0, 1]).all():
        record = flags.index[~flags.isin([0, 1])][0]
        raise DataError(f"{path}: record {record} has In-hospital_death {flags[record]}, not 0/1")
    undated = (flags == 1) & (df["Survival"] < 0)
    if undated.any():
        raise DataError(
            f"{path}: record {df.index[undated][0]} died in hospital but has no Survival days; "
            "the death date cannot be set"
        )
    return df


def read_mapping() -> pd.DataFrame:
    """physionet_concepts.csv, indexed by PhysioNet variable."""
    return _package_csv("physionet_concepts.csv").set_index("variable")


def _package_csv(name: str) -> pd.DataFrame:
    text = resources.files("fedmed.data.omop").joinpath(name).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    frame = pd.DataFrame(rows)
    for column in ("concept_id", "unit_concept_id"):
        if column in frame:
            frame[column] = frame[column].astype(np.int64)
    return frame


def concept_rows(mapping: pd.DataFrame) -> pd.DataFrame:
    """The concept table: the fixed concepts and units, plus each measurement's LOINC concept.

    Names, domains, classes and codes are as the cited sources give them (docs/omop.md);
    valid_start_date / valid_end_date are placeholders (1970-01-01 / 2099-12-31), not
    Athena's: load the real vocabulary from Athena to replace this table.
    """
    fixed = _package_csv("omop_concepts.csv").drop(columns=["source"])
    mapped = mapping[mapping["concept_id"] != 0]
    loinc = pd.DataFrame(
        {
            "concept_id": mapped["concept_id"].to_numpy(),
            "concept_name": mapped["concept_name"].to_numpy(),
            "domain_id": "Measurement",
            "vocabulary_id": "LOINC",
            "concept_class_id": mapped["concept_class_id"].to_numpy(),
            "standard_concept": "S",
            "concept_code": mapped["loinc_code"].to_numpy(),
        }
    )
    concepts = pd.concat([fixed, loinc], ignore_index=True).drop_duplicates("concept_id")
    concepts["standard_concept"] = concepts["standard_concept"].replace("", None)
    concepts["valid_start_date"] = date(1970, 1, 1)
    concepts["valid_end_date"] = date(2099, 12, 31)
    return concepts.sort_values("concept_id", ignore_index=True)


def measurement_rows(long: pd.DataFrame, mapping: pd.DataFrame) -> pd.DataFrame:
    """Every observation but the descriptors and PhysioNet's missing code, as CDM columns.

    measurement_id is left to each site (1, 2, ... in source order within its database).
    """
    rows = long[~long["parameter"].isin(DESCRIPTORS)]
    unknown = sorted(set(rows["parameter"].unique()) - set(mapping.index))
    if unknown:
        raise DataError(
            f"variable {echo(unknown[0])} has no OMOP concept; add a row for it to "
            "fedmed/data/omop/physionet_concepts.csv (docs/omop.md)"
        )
    rows = rows[rows["number"] != MISSING]
    finer = (np.round(rows["number"], DECIMALS) != rows["number"]).to_numpy()
    if finer.any():
        row = rows.iloc[int(np.argmax(finer))]
        raise DataError(
            f"record {row['record_id']}: {row['parameter']} {echo(row['value'])} has more than "
            f"{DECIMALS} decimals, which the CDM's NUMERIC value_as_number (DECIMAL(18,3) in "
            "DuckDB) would round; round it in the source"
        )
    variable = rows["parameter"].astype("category").cat.remove_unused_categories()
    concept = mapping.reindex(variable.cat.categories)
    codes = variable.cat.codes.to_numpy()
    when = ANCHOR + pd.to_timedelta(rows["time_min"].to_numpy(), unit="min")
    return pd.DataFrame(
        {
            "person_id": rows["record_id"].to_numpy(),
            "measurement_concept_id": concept["concept_id"].to_numpy()[codes],
            "measurement_date": when.normalize(),
            "measurement_datetime": when,
            "measurement_type_concept_id": EHR,
            "value_as_number": rows["number"].to_numpy(),
            "unit_concept_id": concept["unit_concept_id"].to_numpy()[codes],
            "visit_occurrence_id": rows["record_id"].to_numpy(),
            "measurement_source_value": variable.to_numpy(),
            "measurement_source_concept_id": 0,
            "unit_source_value": concept["unit_source_value"].replace("", None).to_numpy()[codes],
            "value_source_value": rows["value"].to_numpy(),
        }
    )


def site_tables(
    site: IcuSite, stays: pd.DataFrame, measurements: pd.DataFrame, concepts: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """One site's CDM tables, as frames whose columns are CDM columns (absent ones are NULL)."""
    ids = stays["record_id"].to_numpy()
    start, end = ANCHOR, ANCHOR + WINDOW
    dead = stays[stays["died"]]
    death_dates = [ANCHOR.date() + timedelta(days=int(d)) for d in dead["survival_days"]]
    last_day = pd.Series(end.date(), index=stays.index, dtype=object)
    last_day[dead.index] = [max(end.date(), d) for d in death_dates]
    measurement = measurements.reset_index(drop=True)
    measurement.insert(0, "measurement_id", np.arange(1, len(measurement) + 1))
    return {
        "person": pd.DataFrame(
            {
                "person_id": ids,
                "gender_concept_id": stays["gender"].map(GENDERS).fillna(0).astype(np.int64),
                "year_of_birth": ANCHOR.year - stays["age"],
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "care_site_id": site.icu_type,
                "person_source_value": stays["record_id"].astype(str),
                "gender_source_value": stays["gender"],
                "gender_source_concept_id": 0,
            }
        ),
        "observation_period": pd.DataFrame(
            {
                "observation_period_id": ids,
                "person_id": ids,
                "observation_period_start_date": start.date(),
                "observation_period_end_date": last_day.to_numpy(),
                "period_type_concept_id": EHR_EPISODE,
            }
        ),
        "visit_occurrence": pd.DataFrame(
            {
                "visit_occurrence_id": ids,
                "person_id": ids,
                "visit_concept_id": INTENSIVE_CARE,
                "visit_start_date": start.date(),
                "visit_start_datetime": start,
                "visit_end_date": end.date(),
                "visit_end_datetime": end,
                "visit_type_concept_id": EHR,
                "care_site_id": site.icu_type,
                "visit_source_value": stays["record_id"].astype(str),
                "visit_source_concept_id": 0,
            }
        ),
        "measurement": measurement,
        "death": pd.DataFrame(
            {
                "person_id": dead["record_id"].to_numpy(),
                "death_date": death_dates,
                "death_type_concept_id": EHR,
            }
        ),
        "care_site": pd.DataFrame(
            {
                "care_site_id": [site.icu_type],
                "care_site_name": [site.unit],
                "place_of_service_concept_id": [INTENSIVE_CARE],
                "care_site_source_value": [str(site.icu_type)],
                "place_of_service_source_value": [f"ICUType {site.icu_type}: {site.unit}"],
            }
        ),
        "cdm_source": pd.DataFrame(
            {
                "cdm_source_name": [f"PhysioNet 2012 set A, {site.unit} (ICUType {site.icu_type})"],
                "cdm_source_abbreviation": [f"PN2012A-{site.abbreviation}"],
                "cdm_holder": ["fedmed demo data (not a hospital's own CDM)"],
                "source_description": [
                    "PhysioNet/CinC Challenge 2012 training set A (MIMIC-II ICU stays, first "
                    "48 h), ODC-By 1.0; Silva et al., Comput Cardiol 2012;39:245-248"
                ],
                "source_documentation_reference": [SOURCE],
                "cdm_etl_reference": ["fedmed demo-data --omop (docs/omop.md)"],
                "source_release_date": [SOURCE_RELEASE],
                "cdm_release_date": [date.today()],
                "cdm_version": ["v5.4"],
                "cdm_version_concept_id": [CDM_V54],
                "vocabulary_version": [VOCABULARY_VERSION],
            }
        ),
        "concept": concepts,
    }


def write_database(duckdb: Any, path: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Create the CDM tables in a new DuckDB file and load each frame by column name.

    The frames go in through DuckDB's DataFrame scan (``INSERT ... BY NAME SELECT * FROM
    frame``): no value is formatted into SQL, and the table names are TABLES' constants.
    """
    connection = duckdb.connect(str(path))
    try:
        optional = tuple(name for name in tables if name in OPTIONAL_TABLES)
        for statement in create_statements(optional):
            connection.execute(statement)
        for name, frame in tables.items():
            if name not in TABLES and name not in OPTIONAL_TABLES:
                raise ValueError(f"{name} is not a CDM table of fedmed.data.omop.schema")
            connection.register("frame", frame)
            connection.execute(f"INSERT INTO {name} BY NAME SELECT * FROM frame")
            connection.unregister("frame")
    finally:
        connection.close()
