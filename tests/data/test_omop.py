"""PhysioNet 2012 set A as OMOP CDM v5.4 DuckDB databases, checked against pandas on the source.

The reference side reads set_a_long.csv.gz and outcomes_a.csv with plain pandas (all text, no
fedmed code) and recomputes what each database must hold; the small hand-written set tests
the refusals and the all-or-nothing write without the shared data.
"""

from __future__ import annotations

import csv
import gzip
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.data.omop import SITES, build_physionet_omop
from fedmed.data.omop import physionet as omop_physionet
from fedmed.errors import ConfigError, DataError
from tests.conftest import DATA_DIR, needs_shared_data

duckdb = pytest.importorskip("duckdb", reason="OMOP databases are the optional 'omop' extra")

ANCHOR = datetime(2012, 1, 1)
DESCRIPTORS = {"RecordID", "Age", "Gender", "ICUType"}
NAMES = {1: "coronary-care", 2: "cardiac-surgery", 3: "medical-icu", 4: "surgical-icu"}
# Column order of OHDSI's CDM v5.4 DDL (OHDSI/CommonDataModel inst/ddl/5.4/duckdb), typed here
# from that file, not from fedmed's schema module.
PERSON_COLUMNS = [
    "person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth",
    "birth_datetime", "race_concept_id", "ethnicity_concept_id", "location_id", "provider_id",
    "care_site_id", "person_source_value", "gender_source_value", "gender_source_concept_id",
    "race_source_value", "race_source_concept_id", "ethnicity_source_value",
    "ethnicity_source_concept_id",
]  # fmt: skip
MEASUREMENT_COLUMNS = [
    "measurement_id", "person_id", "measurement_concept_id", "measurement_date",
    "measurement_datetime", "measurement_time", "measurement_type_concept_id",
    "operator_concept_id", "value_as_number", "value_as_concept_id", "unit_concept_id",
    "range_low", "range_high", "provider_id", "visit_occurrence_id", "visit_detail_id",
    "measurement_source_value", "measurement_source_concept_id", "unit_source_value",
    "unit_source_concept_id", "value_source_value", "measurement_event_id",
    "meas_event_field_concept_id",
]  # fmt: skip


def _query(path: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params).fetchdf()


@pytest.fixture(scope="module")
def source() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference: set A's rows as text, with each record's ICU type; the outcomes."""
    folder = DATA_DIR / "physionet2012"
    long = pd.read_csv(folder / "set_a_long.csv.gz", dtype=str, keep_default_na=False)
    icu = long[long["parameter"] == "ICUType"].set_index("record_id")["value"].astype(int)
    long["icu"] = long["record_id"].map(icu)
    outcomes = pd.read_csv(folder / "outcomes_a.csv")
    outcomes["icu"] = outcomes["RecordID"].astype(str).map(icu)
    return long, outcomes


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four databases from all 4,000 stays, built once for this module."""
    out = tmp_path_factory.mktemp("omop")
    build_physionet_omop(out)
    return out


@needs_shared_data
def test_stays_persons_and_deaths_per_icu_type_match_the_source(built: Path, source) -> None:
    long, outcomes = source
    expected_stays = long[long["parameter"] == "ICUType"].groupby("icu").size()
    expected_deaths = outcomes[outcomes["In-hospital_death"] == 1].groupby("icu").size()

    for icu, name in NAMES.items():
        db = built / f"{name}.duckdb"
        counts = _query(
            db,
            "SELECT (SELECT count(*) FROM person) AS persons, "
            "(SELECT count(DISTINCT person_id) FROM visit_occurrence) AS visits, "
            "(SELECT count(*) FROM observation_period) AS periods, "
            "(SELECT count(*) FROM death) AS deaths",
        ).iloc[0]
        assert counts["persons"] == counts["visits"] == counts["periods"] == expected_stays[icu]
        assert counts["deaths"] == expected_deaths[icu]
    # PROVENANCE.md's per-ICUType table, independently of both computations above.
    assert expected_stays.tolist() == [577, 874, 1481, 1068]
    assert expected_deaths.tolist() == [81, 43, 275, 155]


@needs_shared_data
def test_measurement_rows_per_variable_match_the_source(built: Path, source) -> None:
    long, _ = source
    rows = long[~long["parameter"].isin(DESCRIPTORS) & (long["value"] != "-1")]
    expected = rows.groupby(["icu", "parameter"]).size()

    for icu, name in NAMES.items():
        got = _query(
            built / f"{name}.duckdb",
            "SELECT measurement_source_value AS parameter, count(*) AS n FROM measurement "
            "GROUP BY 1",
        ).set_index("parameter")["n"]
        assert got.sort_index().to_dict() == expected[icu].sort_index().to_dict()
    # 1,757,980 rows - 6 descriptor rows x 4,000 + Weight (4,000) and Height at time 0,
    # less the -1 (missing) Height and Weight rows: PROVENANCE.md's counts.
    assert len(rows) == 1_757_980 - 6 * 4000 + 4000 + 4000 - 1894 - 326


@needs_shared_data
def test_sampled_stays_keep_every_value_time_and_unit(built: Path, source) -> None:
    long, outcomes = source
    mapping = pd.read_csv(
        Path(omop_physionet.__file__).with_name("physionet_concepts.csv"), dtype=str
    ).set_index("variable")
    rows = long[~long["parameter"].isin(DESCRIPTORS) & (long["value"] != "-1")]
    by_record = dict(tuple(rows.groupby("record_id", sort=False)))
    rng = np.random.default_rng(7)
    for icu, name in NAMES.items():
        ids = long.loc[long["icu"] == icu, "record_id"].unique()
        died = outcomes.loc[(outcomes["icu"] == icu) & (outcomes["In-hospital_death"] == 1)]
        sample = {ids[0], ids[-1], str(died["RecordID"].iloc[0]), *rng.choice(ids, 3)}
        for record in sorted(sample):
            src = by_record.get(record, rows.iloc[:0])
            got = _query(
                built / f"{name}.duckdb",
                "SELECT * FROM measurement WHERE person_id = ? ORDER BY measurement_id",
                [int(record)],
            )
            assert len(got) == len(src)
            minutes = src["time_min"].astype(int).to_numpy()
            assert (
                got["measurement_datetime"].to_numpy()
                == (ANCHOR + pd.to_timedelta(minutes, unit="min")).to_numpy()
            ).all()
            assert got["measurement_source_value"].tolist() == src["parameter"].tolist()
            assert got["value_source_value"].tolist() == src["value"].tolist()
            assert np.array_equal(got["value_as_number"], src["value"].astype(float))
            assert (got["visit_occurrence_id"] == int(record)).all()
            concepts = mapping.loc[src["parameter"]]
            assert (
                got["measurement_concept_id"].tolist()
                == concepts["concept_id"].astype(int).tolist()
            )
            assert (
                got["unit_concept_id"].tolist() == concepts["unit_concept_id"].astype(int).tolist()
            )


@needs_shared_data
def test_persons_keep_record_gender_age_and_death_date(built: Path, source) -> None:
    long, outcomes = source
    static = long[long["time_min"] == "0"].pivot_table(
        index="record_id", columns="parameter", values="value", aggfunc="first"
    )
    unknown = 0
    for icu, name in NAMES.items():
        db = built / f"{name}.duckdb"
        person = _query(db, "SELECT * FROM person").set_index("person_source_value")
        descr = static.loc[person.index]
        gender = descr["Gender"].map({"1": 8507, "0": 8532}).fillna(0).astype(int)
        assert (person["gender_concept_id"] == gender).all()
        assert (person["gender_source_value"] == descr["Gender"]).all()
        assert (person["year_of_birth"] == 2012 - descr["Age"].astype(int)).all()
        assert (person["person_id"].astype(str) == person.index).all()
        assert (person["care_site_id"] == icu).all()
        unknown += int((person["gender_concept_id"] == 0).sum())

        visit = _query(db, "SELECT * FROM visit_occurrence")
        assert (visit["visit_source_value"] == visit["person_id"].astype(str)).all()
        assert (visit["visit_start_datetime"] == ANCHOR).all()
        assert (visit["visit_end_datetime"] == ANCHOR + timedelta(hours=48)).all()
        assert set(visit["visit_concept_id"]) == {32037}
        assert (visit["care_site_id"] == icu).all()
        site = _query(db, "SELECT * FROM care_site")
        assert site["care_site_id"].tolist() == [icu]

        death = _query(db, "SELECT person_id, death_date FROM death").set_index("person_id")
        died = outcomes[(outcomes["icu"] == icu) & (outcomes["In-hospital_death"] == 1)]
        expected = {
            int(r): date(2012, 1, 1) + timedelta(days=int(s))
            for r, s in zip(died["RecordID"], died["Survival"], strict=True)
        }
        assert {int(k): v.date() for k, v in death["death_date"].items()} == expected
        period = _query(db, "SELECT * FROM observation_period").set_index("person_id")
        ends = period.loc[list(expected), "observation_period_end_date"].dt.date
        assert (ends >= pd.Series(expected)).all()
    assert unknown == 3  # PROVENANCE.md: Gender is -1 in 3 records


@needs_shared_data
def test_concept_table_covers_every_concept_id_used(built: Path) -> None:
    for name in NAMES.values():
        db = built / f"{name}.duckdb"
        with duckdb.connect(str(db), read_only=True) as con:
            columns = con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() "
                "WHERE column_name LIKE '%concept_id' AND table_name <> 'concept'"
            ).fetchall()
            used: set[int] = set()
            for table, column in columns:  # identifiers from the catalog, not data values
                values = con.execute(f'SELECT DISTINCT "{column}" FROM "{table}"').fetchall()
                used |= {int(v) for (v,) in values if v is not None}
            known = {v for (v,) in con.execute("SELECT concept_id FROM concept").fetchall()}
        assert used <= known, used - known
        assert {8507, 8532, 32037, 32817, 3027018, 8541} <= used  # the query found real ids
        source = _query(db, "SELECT * FROM cdm_source").iloc[0]
        assert source["cdm_version"] == "v5.4"
        assert source["cdm_version_concept_id"] in known


def test_mapping_units_and_concepts_are_in_the_concept_file() -> None:
    folder = Path(omop_physionet.__file__).parent
    with open(folder / "physionet_concepts.csv", encoding="utf-8") as handle:
        mapping = list(csv.DictReader(handle))
    with open(folder / "omop_concepts.csv", encoding="utf-8") as handle:
        fixed = {int(r["concept_id"]): r for r in csv.DictReader(handle)}

    assert len(mapping) == 38  # 37 series (Weight included) + Height: PROVENANCE.md
    for row in mapping:
        assert int(row["unit_concept_id"]) in fixed, row["variable"]
        assert row["source"], f"{row['variable']}: every id says where it comes from"
        if row["concept_id"] != "0":
            assert row["loinc_code"] and row["concept_name"], row["variable"]
    assert all(r["source"] for r in fixed.values())


# --- a hand-written set: refusals and all-or-nothing writes, no shared data needed ---------


def _write_small_set(root: Path) -> Path:
    """Four stays (one per ICU type): an unknown gender, a missing Height, one death."""
    folder = root / "physionet2012"
    folder.mkdir(parents=True)
    lines = ["record_id,time_min,parameter,value"]
    for record, icu, gender, age, height in [
        (900001, 1, "1", "54", "180.3"),
        (900002, 2, "0", "90", "-1"),
        (900003, 3, "-1", "40", "165"),
        (900004, 4, "1", "71", "170"),
    ]:
        for parameter, value in [
            ("RecordID", str(record)), ("Age", age), ("Gender", gender), ("Height", height),
            ("ICUType", str(icu)), ("Weight", "80.5"),
        ]:  # fmt: skip
            lines.append(f"{record},0,{parameter},{value}")
        lines += [f"{record},7,HR,73", f"{record},7,MechVent,1", f"{record},95,Weight,-1"]
        lines += [f"{record},2880,ALT,1.044e+04"]  # set A writes 26 lab values this way
    with gzip.open(folder / "set_a_long.csv.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    (folder / "outcomes_a.csv").write_text(
        "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
        "900001,6,1,5,-1,0\n900002,16,8,8,5,1\n900003,7,1,9,575,0\n900004,9,2,4,-1,0\n"
    )
    return folder


@pytest.fixture
def small_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_small_set(tmp_path / "datasets")
    monkeypatch.setenv("FEDMED_DATA_DIR", str(tmp_path / "datasets"))
    return tmp_path / "out"


def test_small_set_maps_every_field(small_set: Path) -> None:
    built = build_physionet_omop(small_set)

    assert [(b.site.name, b.persons, b.deaths, b.measurements) for b in built] == [
        ("coronary-care", 1, 0, 5),  # Height, Weight, HR, MechVent, ALT (the -1 Weight dropped)
        ("cardiac-surgery", 1, 1, 4),  # Height is -1
        ("medical-icu", 1, 0, 5),
        ("surgical-icu", 1, 0, 5),
    ]
    db = small_set / "cardiac-surgery.duckdb"
    person = _query(db, "SELECT * FROM person").iloc[0]
    assert (person["person_id"], person["gender_concept_id"], person["year_of_birth"]) == (
        900002, 8532, 1922,
    )  # fmt: skip
    assert _query(db, "SELECT death_date FROM death")["death_date"].dt.date.tolist() == [
        date(2012, 1, 6)
    ]
    unknown = _query(small_set / "medical-icu.duckdb", "SELECT * FROM person").iloc[0]
    assert (unknown["gender_concept_id"], unknown["gender_source_value"]) == (0, "-1")
    alt = _query(
        small_set / "coronary-care.duckdb",
        "SELECT value_as_number, value_source_value, measurement_datetime, unit_concept_id "
        "FROM measurement WHERE measurement_source_value = 'ALT'",
    ).iloc[0]
    assert alt["value_as_number"] == 10440.0
    assert alt["value_source_value"] == "1.044e+04"  # the source text, exactly
    assert alt["measurement_datetime"] == datetime(2012, 1, 3)
    assert alt["unit_concept_id"] == 8923
    vent = _query(
        small_set / "coronary-care.duckdb",
        "SELECT measurement_concept_id FROM measurement WHERE measurement_source_value = "
        "'MechVent'",
    )
    assert vent["measurement_concept_id"].tolist() == [0]


def test_tables_have_the_cdm_54_columns_in_order(small_set: Path) -> None:
    build_physionet_omop(small_set, limit=1)
    db = small_set / "surgical-icu.duckdb"

    assert _query(db, "SELECT * FROM person LIMIT 0").columns.tolist() == PERSON_COLUMNS
    assert _query(db, "SELECT * FROM measurement LIMIT 0").columns.tolist() == MEASUREMENT_COLUMNS
    types = _query(db, "DESCRIBE measurement").set_index("column_name")["column_type"]
    assert types["value_as_number"] == "DECIMAL(18,3)"  # OHDSI's NUMERIC, as DuckDB reads it
    assert types["measurement_datetime"] == "TIMESTAMP" and types["measurement_date"] == "DATE"
    tables = set(_query(db, "SELECT table_name FROM duckdb_tables()")["table_name"])
    assert tables == {
        "person", "observation_period", "visit_occurrence", "measurement", "death",
        "care_site", "cdm_source", "concept",
    }  # fmt: skip


def test_an_existing_database_is_refused_without_force(small_set: Path) -> None:
    build_physionet_omop(small_set)
    before = {p.name: p.read_bytes() for p in small_set.iterdir()}

    with pytest.raises(ConfigError, match=r"coronary-care\.duckdb already exists.*--force"):
        build_physionet_omop(small_set)
    assert {p.name: p.read_bytes() for p in small_set.iterdir()} == before

    build_physionet_omop(small_set, force=True)
    assert sorted(p.name for p in small_set.iterdir()) == sorted(before)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_build_leaves_no_partial_database(
    small_set: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    real = omop_physionet.write_database
    calls = []

    def fail_on_third(duckdb_module, path, tables) -> None:
        calls.append(path)
        real(duckdb_module, path, tables)  # a complete temporary file exists now
        if len(calls) == 3:
            raise error

    monkeypatch.setattr(omop_physionet, "write_database", fail_on_third)

    with pytest.raises(type(error)):
        build_physionet_omop(small_set)
    assert len(calls) == 3
    assert list(small_set.iterdir()) == []  # no database, no temporary file, no WAL


def test_a_failed_forced_build_keeps_the_old_databases(
    small_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_physionet_omop(small_set, limit=1)
    before = {p.name: p.read_bytes() for p in small_set.iterdir()}

    def fail(*_args) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(omop_physionet, "write_database", fail)
    with pytest.raises(RuntimeError):
        build_physionet_omop(small_set, force=True)
    assert {p.name: p.read_bytes() for p in small_set.iterdir()} == before


def test_missing_dataset_names_fedmed_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMED_DATA_DIR", str(tmp_path / "nowhere"))

    with pytest.raises(DataError, match=r"set_a_long\.csv\.gz: file not found.*FEDMED_DATA_DIR"):
        build_physionet_omop(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unmapped_variable_names_the_mapping_file(small_set: Path) -> None:
    folder = small_set.parent / "datasets" / "physionet2012"
    with gzip.open(folder / "set_a_long.csv.gz", "at") as handle:
        handle.write("900004,60,Ferritin,300\n")

    with pytest.raises(DataError, match=r"'Ferritin' has no OMOP concept.*physionet_concepts"):
        build_physionet_omop(small_set)


def test_text_in_the_value_column_names_the_row(small_set: Path) -> None:
    folder = small_set.parent / "datasets" / "physionet2012"
    with gzip.open(folder / "set_a_long.csv.gz", "at") as handle:
        handle.write("900004,60,HR,fast\n")

    with pytest.raises(DataError, match=r"column 'value' has value 'fast' at data row 41"):
        build_physionet_omop(small_set)


def test_a_value_numeric_would_round_is_refused(small_set: Path) -> None:
    folder = small_set.parent / "datasets" / "physionet2012"
    with gzip.open(folder / "set_a_long.csv.gz", "at") as handle:
        handle.write("900004,60,Creatinine,0.0125\n")

    with pytest.raises(DataError, match=r"record 900004: Creatinine '0.0125' has more than 3"):
        build_physionet_omop(small_set)
    assert not small_set.exists()


def test_a_stay_without_outcome_is_refused(small_set: Path) -> None:
    outcomes = small_set.parent / "datasets" / "physionet2012" / "outcomes_a.csv"
    outcomes.write_text(outcomes.read_text().replace("900004,9,2,4,-1,0\n", ""))

    with pytest.raises(DataError, match=r"record 900004 has no row"):
        build_physionet_omop(small_set)
    outcomes.write_text(outcomes.read_text() + "900003,7,1,9,575,0\n900004,9,2,4,-1,0\n")
    with pytest.raises(DataError, match=r"record 900003 has two rows; keep one"):
        build_physionet_omop(small_set)


def test_limit_keeps_the_first_stays_of_each_icu_type(small_set: Path) -> None:
    with pytest.raises(ConfigError, match="--limit must be at least 1"):
        build_physionet_omop(small_set, limit=0)

    built = build_physionet_omop(small_set, limit=1)
    assert [b.persons for b in built] == [1, 1, 1, 1]
    assert sorted(p.name for p in small_set.iterdir()) == sorted(f"{s.name}.duckdb" for s in SITES)


def test_without_duckdb_the_error_names_the_extra(
    small_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)

    with pytest.raises(ConfigError, match=r"pip install 'fedmed\[omop\]'"):
        build_physionet_omop(small_set)
    assert not small_set.exists()
