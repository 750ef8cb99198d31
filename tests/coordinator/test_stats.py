"""Federated statistics (`fedmed stats`): suppression, noise in the ledger, no row on the wire."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message
from flwr.common.serde import message_to_proto

from fedmed.config import (
    PrivacyConfig,
    RunConfig,
    load_run_config,
    parse_run_config,
    resolve_config_path,
)
from fedmed.coordinator.stats import build_stats_app
from fedmed.errors import StudyFailed
from fedmed.privacy.accounting import epsilon_spent, site_delta
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import noise_multiplier
from fedmed.runtime.inprocess import run_inprocess
from fedmed.runtime.run import plan_stats
from fedmed.site.app import app as site_app

CANARY = 987654.321  # a planted age no real row has: it must appear in no byte a site sends
PLANTED = 3  # a planted small cell: alpha has exactly this many patients with bp missing


def _table(path: Path, n: int, seed: int, *, canary: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.normal(60, 10, n).round(0),
            "bp": rng.normal(130, 15, n).round(0),
            "smoker": rng.choice(["no", "yes"], n),
            "outcome": (rng.random(n) < 0.4).astype(int),
        }
    )
    if canary:
        frame.loc[0, "age"] = CANARY
        frame["bp"] = frame["bp"].astype(object)
        frame.loc[1:PLANTED, "bp"] = ""  # rows 1-3: missing blood pressure
    frame.to_csv(path, index=False)
    return path


def _study(
    tmp_path: Path, stats: dict[str, Any] | None = None, cap: float | None = None
) -> RunConfig:
    sites = []
    for i, (name, n) in enumerate([("alpha", 150), ("beta", 120), ("gamma", 90)]):
        site: dict[str, Any] = {"name": name}
        site["path"] = str(_table(tmp_path / f"{name}.csv", n, i, canary=name == "alpha"))
        if cap is not None and name == "beta":
            site["epsilon_cap"] = cap
        sites.append(site)
    return parse_run_config(
        {
            "name": "statstudy",
            "seed": 3,
            "output_dir": str(tmp_path / "runs"),
            "data": {
                "schema": {
                    "target": "outcome",
                    "features": ["age", "bp", "smoker"],
                    "categorical": {"smoker": ["no", "yes"]},
                    "missing": "drop",
                }
            },
            "stats": stats or {},
            "sites": sites,
        }
    )


class Wire:
    """The real site ClientApp, recording every reply's serialized bytes (what goes on the wire)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies: list[dict[str, Any]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = site_app(msg, context)
        self.sent.append(message_to_proto(reply).SerializeToString())
        self.replies.append(json.loads(str(reply.content["site"]["stats"])))
        return reply


def _run(cfg: RunConfig, client: Any = site_app) -> tuple[Path, dict[str, Any]]:
    plan = plan_stats(cfg)
    run_inprocess(build_stats_app(plan), client, len(cfg.sites), plan.to_run_config(), workers=1)
    return plan.run_dir, json.loads((plan.run_dir / "stats.json").read_text())


def _every_count(stats: dict[str, Any]) -> list[int | None]:
    """Every count a site sent, as the coordinator recorded it per site."""
    counts: list[int | None] = list(stats["cohort"]["sites"].values())
    for vector in stats["outcome"]["sites"].values():
        counts += vector
    for entry in stats["features"].values():
        counts += entry["missing"]["sites"].values()
        for vector in entry.get("histogram", {}).get("sites", {}).values():
            counts += vector or []
    for entry in stats["categories"].values():
        for vector in entry["sites"].values():
            counts += vector
    return counts


def test_a_planted_small_cell_is_suppressed_and_no_count_below_the_minimum_leaves(
    tmp_path: Path,
) -> None:
    cfg = _study(tmp_path)

    run_dir, stats = _run(cfg)

    bp = stats["features"]["bp"]
    assert bp["missing"]["sites"] == {"alpha": None, "beta": 0, "gamma": 0}
    assert bp["missing"]["pooled"] == {"count": 0, "partial": True, "suppressed_sites": 1}
    assert "mean" not in bp["sites"]["alpha"]  # its sums would give cohort - 3 away
    counts = _every_count(stats)
    assert None in counts
    assert all(c is None or c == 0 or c >= cfg.stats.min_cell for c in counts)
    assert stats["cohort"]["sites"] == {"alpha": 150, "beta": 120, "gamma": 90}
    assert stats["cohort"]["pooled"]["count"] == 360
    assert (run_dir / "stats.md").is_file() and (run_dir / "histograms.png").is_file()
    assert "<suppressed>" in (run_dir / "stats.md").read_text()


def test_a_larger_minimum_suppresses_more(tmp_path: Path) -> None:
    cfg = _study(tmp_path, {"min_cell": 100})

    _, stats = _run(cfg)

    assert stats["cohort"]["sites"] == {"alpha": 150, "beta": 120, "gamma": None}
    assert all(c is None or c == 0 or c >= 100 for c in _every_count(stats))


def test_no_byte_any_site_sends_holds_a_row_value(tmp_path: Path) -> None:
    cfg = _study(tmp_path)
    wire = Wire()

    _, stats = _run(cfg, wire)

    assert len(wire.sent) == 2 * len(cfg.sites)  # two passes, every site answered
    assert [r["min_cell"] for r in wire.replies] == [cfg.stats.min_cell] * len(wire.sent)
    sent = b"".join(wire.sent)
    for form in (repr(CANARY), f"{CANARY:g}", "987654", "9.87654"):
        assert form.encode() not in sent, form
    for packed in (struct.pack("<d", CANARY), struct.pack("<f", CANARY), struct.pack(">d", CANARY)):
        assert packed not in sent
    age = stats["features"]["age"]
    assert age["histogram"]["sites"]["alpha"][-1] is None  # the canary's tail cell holds 1
    assert age["sites"]["alpha"]["mean"] < 100  # sums are winsorized at the shared edges


def test_noise_is_recorded_in_each_sites_ledger(tmp_path: Path, _private_ledger: Path) -> None:
    cfg = _study(tmp_path, {"epsilon": 1.0})

    _, stats = _run(cfg)

    assert stats["epsilon"] == pytest.approx({s: 1.0 for s in cfg.site_names}, abs=0.02)
    for site in cfg.sites:
        rows = _charged(site.name, _private_ledger)
        assert len(rows) == 2  # one release per pass, charged under the plan it answers
        assert rows[0]["study"] == rows[1]["study"] and rows[0]["study"].startswith("statistics ")
        delta = site_delta(None, stats["cohort"]["sites"][site.name] or 90)
        z = noise_multiplier(1.0, delta)
        assert [r["steps"] for r in rows] == [[[z, 1.0, 1]]] * 2
        privacy = PrivacyConfig(enabled=True, delta=delta)
        assert epsilon_spent([(z, 1.0, 2)], privacy) == pytest.approx(1.0, abs=0.02)
    features = stats["features"]["age"]
    assert features["pooled"]["moments"] == "from histogram"  # no exact sums under noise
    # Another run of the same plan asks the same question: the same noise, charged once.
    _, again = _run(cfg)
    assert again["cohort"] == stats["cohort"]
    assert [len(_charged(s, _private_ledger)) for s in cfg.site_names] == [2, 2, 2]


def _charged(site: str, folder: Path) -> list[dict[str, Any]]:
    """The releases that count against ``site``'s dataset in its ledger."""
    ledger = PrivacyLedger(site, folder)
    return ledger.records(_dataset_key(ledger))


def _dataset_key(ledger: PrivacyLedger) -> str:
    data = json.loads(ledger.path.read_text())
    return next(e["dataset"] for e in data["entries"] if e["kind"] == "reserve")


def test_a_site_whose_cap_the_release_would_pass_refuses(tmp_path: Path) -> None:
    cfg = _study(tmp_path, {"epsilon": 1.0}, cap=0.6)

    _, stats = _run(cfg)

    assert stats["sites"] == ["alpha", "gamma"]
    assert "privacy budget exhausted" in stats["refused"]["beta"]
    assert stats["epsilon"]["alpha"] == pytest.approx(1.0, abs=0.02)


def test_every_site_refusing_is_one_error_naming_why(tmp_path: Path) -> None:
    cfg = _study(tmp_path, {"epsilon": 1.0})
    cfg = cfg.replace(sites=tuple(replace(s, epsilon_cap=0.1) for s in cfg.sites))

    with pytest.raises(StudyFailed, match="no site sent statistics.*privacy budget exhausted"):
        _run(cfg)


def test_a_site_that_answers_pass_one_but_refuses_pass_two_is_kept_where_it_answered(
    tmp_path: Path,
) -> None:
    # Two releases at ε = 1 cost 0.68 then 1.0: inst-other's cap of 0.8 admits only pass 1.
    cfg = load_run_config(resolve_config_path("lung"), ["stats.epsilon=1.0"])
    sites = tuple(replace(s, epsilon_cap=0.8) if s.name == "inst-other" else s for s in cfg.sites)
    cfg = cfg.replace(output_dir=str(tmp_path / "runs"), sites=sites)

    run_dir, stats = _run(cfg)

    assert "inst-other" in stats["sites"]  # its pass-1 counts are in the tables
    assert "privacy budget exhausted" in stats["refused"]["inst-other"]
    assert stats["cohort"]["sites"]["inst-other"] is not None
    assert set(stats["km"]["sites"]) == set(cfg.site_names) - {"inst-other"}
    assert stats["features"]["age"]["histogram"]["sites"]["inst-other"] is None
    assert stats["epsilon"]["inst-other"] == pytest.approx(0.68, abs=0.01)
    assert (run_dir / "km.png").is_file()
