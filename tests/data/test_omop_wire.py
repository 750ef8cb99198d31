"""No row value and no SQL leaves a site that reads its OMOP database (issue #18's acceptance).

A federated study (training, then `fedmed stats`) runs in-process through Flower messages on
two sites, each an OMOP CDM DuckDB file; the cohort enters at a condition and reads
measurement, observation and condition features, so every new path of the extraction runs.
One site's database holds a planted measurement value that one cohort person's feature reads,
and planted strings (a person_source_value, a concept name). Every reply a site sends is
recorded as the bytes Flower serializes; neither planted value, nor the statements the sites
ran (nor their keywords and table names), nor the database's path is in any of them.
"""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, Message
from flwr.common.serde import message_to_proto

from fedmed.config import RunConfig, parse_run_config
from fedmed.coordinator.app import build_server_app
from fedmed.coordinator.stats import build_stats_app
from fedmed.data.omop import cohort
from fedmed.data.omop.physionet import write_database
from fedmed.errors import DataError, StudyFailed
from fedmed.runtime.inprocess import run_inprocess
from fedmed.runtime.run import plan_stats, preflight
from fedmed.site.app import app as site_app
from fedmed.study.plan import RunPlan, new_run_dir
from tests.data.test_omop_source import (
    AKI,
    CONDITION_INDEX,
    DIABETES,
    HR,
    PAIN,
    SEPSIS,
    SMOKER,
    _recorded,
    expected_cohort,
    synthetic_cdm,
)

duckdb = pytest.importorskip("duckdb", reason="OMOP databases are the optional 'omop' extra")

CANARY = 98765.432  # a heart rate no real row has (3 decimals: the CDM's NUMERIC keeps it)
PLANTED_PERSON = "PLANTED-MRN-7Q4Z"  # a person_source_value
PLANTED_CONCEPT = "Planted canary concept 9XK2"  # a concept name
# What generated SQL is made of: none of it may reach the wire.
SQL_WORDS = (
    "SELECT", "select ", " FROM ", " JOIN ", "WHERE", "row_number", "coalesce", "INTERVAL",
    "entry_events", "index_start", "visit_occurrence", "condition_occurrence",
    "observation_period", "measurement", "value_as_number", "person_id",
    "condition_start_datetime", "observation_datetime", "year_of_birth",
)  # fmt: skip
OMOP = {
    "index": "condition",
    "condition_concept_ids": [DIABETES],
    "min_age": 18,
    "max_age": 85,
    "outcome": "condition",
    "outcome_concept_ids": [AKI],
    "horizon_days": 180,
    "features": [
        {"name": "age", "domain": "person", "aggregate": "age"},
        {"name": "male", "domain": "person", "aggregate": "male"},
        {"name": "hr_max", "concept_ids": [HR], "aggregate": "max", "start_hours": -24 * 400,
         "end_hours": 24 * 400},
        {"name": "pain_mean", "domain": "observation", "concept_ids": [PAIN],
         "aggregate": "mean", "start_hours": -24 * 5, "end_hours": 24 * 10},
        {"name": "smoker_count", "domain": "observation", "concept_ids": [SMOKER],
         "aggregate": "count", "start_hours": -24 * 5, "end_hours": 24 * 10},
        {"name": "sepsis", "domain": "condition", "concept_ids": [SEPSIS],
         "aggregate": "presence", "start_hours": -24 * 365, "end_hours": 24 * 30},
    ],
}  # fmt: skip


def _site_database(path: Path, seed: int, *, planted: bool) -> Path:
    """A site's synthetic CDM (150 persons); with ``planted``, the canary value in one cohort
    person's heart-rate window and the planted strings in person and concept."""
    tables = synthetic_cdm(seed=seed, n=150)
    if planted:
        person = int(expected_cohort(tables, CONDITION_INDEX)["person_id"].iloc[0])
        start = expected_cohort(tables, CONDITION_INDEX)["start"].iloc[0]
        m = tables["measurement"]
        when = start + timedelta(hours=1)
        row = {"measurement_id": int(m["measurement_id"].max()) + 1, "person_id": person,
               "measurement_concept_id": HR, "measurement_date": when.date(),
               "measurement_datetime": when, "value_as_number": CANARY,
               "measurement_type_concept_id": 32817}  # fmt: skip
        tables["measurement"] = pd.concat([m, pd.DataFrame([row])], ignore_index=True)
        tables["person"]["person_source_value"] = [
            PLANTED_PERSON if pid == person else str(pid) for pid in tables["person"]["person_id"]
        ]
        tables["concept"] = pd.DataFrame(
            [(HR, PLANTED_CONCEPT, "Measurement", "LOINC", "Clinical Observation", "S",
              "8867-4", pd.Timestamp("1970-01-01").date(), pd.Timestamp("2099-12-31").date())],
            columns=["concept_id", "concept_name", "domain_id", "vocabulary_id",
                     "concept_class_id", "standard_concept", "concept_code", "valid_start_date",
                     "valid_end_date"],
        )  # fmt: skip
    write_database(duckdb, path, tables)
    return path


def _study(tmp_path: Path) -> RunConfig:
    alpha = _site_database(tmp_path / "a.duckdb", 0, planted=True)
    beta = _site_database(tmp_path / "b.duckdb", 5, planted=False)
    sites = [{"name": "alpha", "path": f"duckdb:///{alpha}"},
             {"name": "beta", "path": f"duckdb:///{beta}"}]  # fmt: skip
    return parse_run_config(
        {
            "name": "omop-wire",
            "task": "tabular-classification",
            "rounds": 2,
            "seed": 1,
            "output_dir": str(tmp_path / "runs"),
            "data": {
                "schema": {"target": "aki", "min_rows": 5, "missing": "mean"},
                "omop": OMOP,
            },
            "stats": {"min_cell": 3},
            "sites": sites,
        }
    )


class Wire:
    """The real site ClientApp, recording every reply's serialized bytes (what goes on the wire)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.kinds: list[str] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = site_app(msg, context)
        self.sent.append(message_to_proto(reply).SerializeToString())
        self.kinds.append(msg.metadata.message_type)
        return reply


def test_no_byte_an_omop_site_sends_holds_a_row_value_a_planted_string_or_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _study(tmp_path)
    alpha = cfg.sites[0]
    read = cohort.extract(alpha.path, "", cfg.data.omop)
    table = cohort.wide_table(read, cfg.data.omop, {"target": "aki"})
    assert table["hr_max"].max() == CANARY  # the planted value is a feature value at alpha
    assert table["smoker_count"].gt(0).any() and table["pain_mean"].notna().any()
    statements = _recorded(monkeypatch)  # every statement the sites send their databases
    wire = Wire()

    cfg, _ = preflight(cfg)
    plan = RunPlan(cfg, new_run_dir(cfg))
    run_inprocess(build_server_app(plan), wire, len(cfg.sites), plan.to_run_config(), workers=1)
    stats_plan = plan_stats(cfg)
    run_inprocess(
        build_stats_app(stats_plan), wire, len(cfg.sites), stats_plan.to_run_config(), workers=1
    )

    metrics = json.loads((plan.run_dir / "metrics.json").read_text())
    assert set(metrics["final"]["sites"]) == {"alpha", "beta"}  # both sites trained and answered
    released = json.loads((stats_plan.run_dir / "stats.json").read_text())
    assert set(released["cohort"]["sites"]) == {"alpha", "beta"}
    # Each site: a training and an evaluation reply per round, and the two statistics passes.
    assert len(wire.sent) == len(cfg.sites) * (2 * cfg.rounds + 2)
    assert {kind.split(".")[0] for kind in wire.kinds} == {"train", "evaluate", "query"}
    sent = b"".join(wire.sent)
    for form in (repr(CANARY), f"{CANARY:g}", "98765", "9.87654"):
        assert form.encode() not in sent, form
    for packed in (struct.pack("<d", CANARY), struct.pack("<f", CANARY), struct.pack(">d", CANARY)):
        assert packed not in sent
    for text in (PLANTED_PERSON, PLANTED_CONCEPT, str(tmp_path), "a.duckdb", "duckdb:"):
        assert text.encode() not in sent, text
    assert statements  # the sites did read their databases, in this process, through SQL
    for sql, _ in statements:
        assert sql.encode() not in sent
    for word in SQL_WORDS:
        assert word.encode() not in sent, word
        assert word.lower().encode() not in sent.lower(), word


def test_an_omop_site_whose_database_fails_says_only_that_its_data_failed(
    tmp_path: Path,
) -> None:
    """A database without the observation table: the site's error names its file and the
    driver's complaint about the table; its reply carries neither (they stay in its log)."""
    cfg, _ = preflight(_study(tmp_path))  # both databases whole when the study is planned
    broken = tmp_path / "b.duckdb"
    with duckdb.connect(str(broken)) as con:
        con.execute("DROP TABLE observation")
    with pytest.raises(DataError, match="observation") as err:  # what the site's log gets
        cohort.extract(f"duckdb:///{broken}", "", cfg.data.omop)
    assert str(broken) in str(err.value)
    wire = Wire()

    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(StudyFailed, match="released no model"):  # no round had both sites
        run_inprocess(build_server_app(plan), wire, len(cfg.sites), plan.to_run_config(), workers=1)

    recorded = (plan.run_dir / "metrics.json").read_text()
    assert "site 'beta': site data failed validation (details in the site's log)" in recorded
    assert "Catalog" not in recorded  # (the simulation's own config names the paths: not sent)
    sent = b"".join(wire.sent)
    assert b"site data failed validation (details in the site's log)" in sent
    for text in (str(broken), "b.duckdb", "Catalog Error", "observation", "SELECT", "select "):
        assert text.encode() not in sent, text
