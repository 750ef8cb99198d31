"""The site's privacy ledger: persistent, composes across studies, enforces the site's cap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmed.config import PrivacyConfig, RunConfig, SiteSpec
from fedmed.errors import ConfigError, PrivacyBudgetExceeded
from fedmed.ledger import PrivacyLedger, fingerprint
from fedmed.privacy import epsilon_spent

PRIVACY = PrivacyConfig(enabled=True, target_epsilon=1.0, delta=1e-5)


def test_ledger_survives_a_restart(tmp_path: Path) -> None:
    PrivacyLedger("st-marys", tmp_path).record("abc", "study-1", 1, [(1.1, 0.05, 20)])

    reopened = PrivacyLedger("st-marys", tmp_path)  # a new process would do exactly this

    assert reopened.entries("abc") == [(1.1, 0.05, 20)]
    assert reopened.spent("abc", PRIVACY) == epsilon_spent([(1.1, 0.05, 20)], PRIVACY)


def test_epsilon_composes_across_studies_but_is_reported_per_study(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    ledger.record("abc", "study-1", 1, [(1.1, 0.05, 20)])
    ledger.record("abc", "study-2", 1, [(1.1, 0.05, 20)])
    ledger.record("other-data", "study-2", 1, [(1.1, 0.05, 500)])

    one = ledger.spent("abc", PRIVACY, study="study-1")
    total = ledger.spent("abc", PRIVACY)

    assert total > one > 0
    assert total == pytest.approx(epsilon_spent([(1.1, 0.05, 40)], PRIVACY))


def test_cap_refuses_a_round_that_would_exceed_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    ledger.record("abc", "s", 1, [(1.0, 0.1, 50)])
    spent = ledger.spent("abc", PRIVACY)

    ledger.check("abc", PRIVACY, [(1.0, 0.1, 1)], cap=spent * 2)  # fits
    with pytest.raises(PrivacyBudgetExceeded, match="over the site's cap"):
        ledger.check("abc", PRIVACY, [(1.0, 0.1, 50)], cap=spent * 1.01)
    ledger.check("abc", PRIVACY, [(1.0, 0.1, 10_000)], cap=None)  # no cap, no refusal


def test_corrupt_ledger_is_an_error_not_a_reset(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    ledger.path.parent.mkdir(parents=True, exist_ok=True)
    ledger.path.write_text("{not json")

    with pytest.raises(ConfigError, match="never delete a ledger"):
        ledger.entries("abc")


def test_fingerprint_changes_with_the_data() -> None:
    x = np.ones((4, 2), np.float32)
    y = np.zeros(4, np.float32)

    assert fingerprint(x, y) == fingerprint(x.copy(), y.copy())
    assert fingerprint(x, y) != fingerprint(x * 2, y)


def test_site_at_its_cap_refuses_and_the_run_completes(
    demo_config: RunConfig, _private_ledger: Path
) -> None:
    from tests.test_runtime import _run

    capped = tuple(
        SiteSpec(name=s.name, epsilon_cap=0.5 if s.name == "lakeview" else None)
        for s in demo_config.sites
    )
    cfg = demo_config.replace(sites=capped, strategy=demo_config.strategy.__class__(min_sites=3))

    out = _run(cfg)

    # Every round: lakeview refused to train (and said only that), the other three trained.
    for h in out["history"]:
        assert h["failures"] == [
            {
                "site": "lakeview",
                "phase": "train",
                "reason": "site 'lakeview': privacy budget exhausted",
            }
        ]
        assert "train" not in h["sites"]["lakeview"]
        assert all("train" in h["sites"][s] for s in ("st-marys", "riverside", "northgate"))
    assert out["final"]["round"] == 2
    # lakeview spent nothing: its ledger holds no entries.
    ledger = (
        json.loads((_private_ledger / "lakeview.json").read_text())
        if (_private_ledger / "lakeview.json").exists()
        else {"datasets": {}}
    )
    assert not any(ledger["datasets"].values())
    # the others trained and their ledgers hold both rounds
    ledger = json.loads((_private_ledger / "st-marys.json").read_text())
    (rows,) = ledger["datasets"].values()
    assert [r["round"] for r in rows] == [1, 2]
