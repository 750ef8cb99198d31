"""The site's privacy ledger: persistent, composes across studies, enforces the site's cap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmed.config import PrivacyConfig, RunConfig, SiteSpec
from fedmed.errors import ConfigError, PrivacyBudgetExceeded
from fedmed.privacy.accounting import epsilon_spent
from fedmed.privacy.ledger import PrivacyLedger, fingerprint

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

    with pytest.raises(ConfigError, match="never delete or edit a ledger"):
        ledger.entries("abc")


def test_fingerprint_changes_with_the_data() -> None:
    x = np.ones((4, 2), np.float32)
    y = np.zeros(4, np.float32)

    assert fingerprint(x, y) == fingerprint(x.copy(), y.copy())
    assert fingerprint(x, y) != fingerprint(x * 2, y)


def test_site_at_its_cap_refuses_and_the_run_completes(
    demo_config: RunConfig, _private_ledger: Path
) -> None:
    from tests.runtime.test_runtime import _run

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
    # lakeview spent nothing (it refused before reserving); the others hold both rounds.
    lakeview = PrivacyLedger("lakeview", _private_ledger)
    assert not lakeview.path.exists() or json.loads(lakeview.path.read_text())["entries"] == []
    st_marys = PrivacyLedger("st-marys", _private_ledger)
    entries = json.loads(st_marys.path.read_text())["entries"]
    (dataset,) = {e["dataset"] for e in entries if "dataset" in e}
    assert [r["round"] for r in st_marys.records(dataset)] == [1, 2]
    assert {r["kind"] for r in st_marys.records(dataset)} == {"settle"}


# -- reservations: a budget that cannot be raced -------------------------------------------------

ROUND = [(1.0, 0.1, 50)]  # one round's planned steps


def _cap_for(rounds: int) -> float:
    """A cap that fits exactly ``rounds`` rounds (and not one more)."""
    fits = epsilon_spent(ROUND * rounds, PRIVACY)
    return (fits + epsilon_spent(ROUND * (rounds + 1), PRIVACY)) / 2


def _spend_once(directory: str, study: str, cap: float) -> bool:
    """One study's round against the shared ledger: reserve, 'train', settle."""
    import time

    ledger = PrivacyLedger("site", Path(directory))
    try:
        held = ledger.reserve("abc", study, 1, ROUND, PRIVACY, cap)
    except PrivacyBudgetExceeded:
        return False
    time.sleep(0.05)  # training: another study may try to spend meanwhile
    assert held is not None
    ledger.settle(held, ROUND)
    return True


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_concurrent_studies_never_spend_past_the_cap(tmp_path: Path, pool: str) -> None:
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    cap = _cap_for(2)
    executor = ThreadPoolExecutor if pool == "threads" else ProcessPoolExecutor
    with executor(max_workers=4) as workers:
        outcomes = list(
            workers.map(_spend_once, [str(tmp_path)] * 6, [f"s{i}" for i in range(6)], [cap] * 6)
        )

    assert outcomes.count(True) == 2
    assert PrivacyLedger("site", tmp_path).spent("abc", PRIVACY) <= cap


def test_an_open_reservation_counts_and_a_cancelled_one_does_not(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    cap = _cap_for(1)
    held = ledger.reserve("abc", "s1", 1, ROUND, PRIVACY, cap)
    assert held is not None
    with pytest.raises(PrivacyBudgetExceeded):  # s1 has not settled yet: its round counts
        ledger.reserve("abc", "s2", 1, ROUND, PRIVACY, cap)
    ledger.cancel(held)  # s1 failed before anything left the site
    assert ledger.reserve("abc", "s2", 1, ROUND, PRIVACY, cap) is not None


def test_a_replayed_release_is_held_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    held = ledger.reserve("abc", "s", 3, ROUND, PRIVACY, None, release="r")
    assert held is not None
    ledger.settle(held, ROUND)
    assert ledger.reserve("abc", "s", 3, ROUND, PRIVACY, None, release="r") is None
    assert ledger.entries("abc") == ROUND


def _record_round(folder: str, study: str, rnd: int) -> None:
    """Another process writing to the same ledger (a second study's site child)."""
    PrivacyLedger("site", Path(folder)).record("abc", study, rnd, [(1.3, 0.1, 7)])


def test_spending_always_reads_the_ledger_another_writer_and_a_restart_included(
    tmp_path: Path,
) -> None:
    """ε is composed from the ledger as it is on disk at every call: a second writer's rounds
    count at once, and a restarted process (no cached curve) reports the very same numbers."""
    from concurrent.futures import ProcessPoolExecutor

    from fedmed.privacy.accounting import rdp_curve

    ledger = PrivacyLedger("site", tmp_path)
    ledger.record("abc", "s1", 1, ROUND)
    before = ledger.spending("abc", PRIVACY, "s1")
    with ProcessPoolExecutor(max_workers=1) as other:
        other.submit(_record_round, str(tmp_path), "s2", 1).result()
        other.submit(_record_round, str(tmp_path), "s1", 2).result()
    open_round = ledger.reserve("abc", "s1", 3, ROUND, PRIVACY, None)  # held, not yet settled

    own, total = ledger.spending("abc", PRIVACY, "s1")
    rdp_curve.cache_clear()  # a restart: nothing remembered but the ledger on disk
    restarted = PrivacyLedger("site", tmp_path).spending("abc", PRIVACY, "s1")

    s1 = [*ROUND, (1.3, 0.1, 7), *ROUND]
    assert open_round is not None
    assert before == (epsilon_spent(ROUND, PRIVACY),) * 2
    assert own == pytest.approx(epsilon_spent(s1, PRIVACY), rel=1e-12)
    assert total == pytest.approx(epsilon_spent([*ROUND, (1.3, 0.1, 7), *s1[1:]], PRIVACY))
    assert total > own > before[0]
    assert (own, total) == (ledger.spent("abc", PRIVACY, "s1"), ledger.spent("abc", PRIVACY))
    assert restarted == (own, total)


# -- a ledger that cannot be reset ----------------------------------------------------------------


def _spent_ledger(tmp_path: Path) -> PrivacyLedger:
    ledger = PrivacyLedger("site", tmp_path)
    for rnd in (1, 2, 3):
        ledger.record("abc", "s", rnd, ROUND)
    return ledger


def _negative_steps(ledger: PrivacyLedger) -> None:
    data = json.loads(ledger.path.read_text())
    data["entries"][-1]["steps"] = [[1.0, 0.1, -150]]
    ledger.path.write_text(json.dumps(data))


def _rehashed_negative_steps(ledger: PrivacyLedger) -> None:
    """Edited AND re-chained by someone who read this module: still caught (invalid steps)."""
    from fedmed.privacy.ledger import _entry_hash

    data = json.loads(ledger.path.read_text())
    last = data["entries"][-1]
    last["steps"] = [[1.0, 0.1, -150]]
    last["hash"] = _entry_hash(last)
    ledger.path.write_text(json.dumps(data))
    ledger.head_path.write_text(json.dumps({"count": len(data["entries"]), "hash": last["hash"]}))


def _truncated(ledger: PrivacyLedger) -> None:
    data = json.loads(ledger.path.read_text())
    data["entries"] = data["entries"][:2]
    ledger.path.write_text(json.dumps(data))


def _lowered_noise(ledger: PrivacyLedger) -> None:
    data = json.loads(ledger.path.read_text())
    data["entries"][1]["steps"][0][0] = 50.0
    ledger.path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda ledger: ledger.path.unlink(),
        _truncated,
        _negative_steps,
        _rehashed_negative_steps,
        _lowered_noise,
        lambda ledger: ledger.head_path.unlink(),
    ],
    ids=["deleted", "truncated", "negative-steps", "rehashed", "lowered-noise", "head-deleted"],
)
def test_a_tampered_ledger_is_refused_with_the_fix(tmp_path: Path, tamper) -> None:
    from fedmed.privacy.ledger import LedgerDamaged

    ledger = _spent_ledger(tmp_path)
    tamper(ledger)

    with pytest.raises(LedgerDamaged, match="restore it") as err:
        ledger.reserve("abc", "s", 4, ROUND, PRIVACY, cap=100.0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tamper", [_truncated, _lowered_noise, _rehashed_negative_steps])
def test_spending_is_never_reported_from_a_tampered_ledger(tmp_path: Path, tamper) -> None:
    from fedmed.privacy.ledger import LedgerDamaged

    ledger = _spent_ledger(tmp_path)
    ledger.spending("abc", PRIVACY, "s")  # composed (and its curves cached) before the edit
    tamper(ledger)

    with pytest.raises(LedgerDamaged, match="restore it"):
        ledger.spending("abc", PRIVACY, "s")


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    ledger = _spent_ledger(tmp_path)
    ledger.verify()
    assert ledger.entries("abc") == ROUND * 3


def test_a_version_1_ledger_is_upgraded_without_forgetting(tmp_path: Path) -> None:
    ledger = PrivacyLedger("site", tmp_path)
    row = {"study": "old", "round": 1, "noise": 1.0, "rate": 0.1, "steps": 50, "release": ""}
    legacy = {"format": "fedmed-ledger/1", "site": "site", "datasets": {"abc": [row]}}
    ledger.path.write_text(json.dumps(legacy))

    assert ledger.entries("abc") == ROUND
    assert json.loads(ledger.path.read_text())["format"] == "fedmed-ledger/2"
    ledger.verify()


def test_another_split_seed_spends_from_the_same_budget(csv_study: RunConfig) -> None:
    from dataclasses import replace

    from flwr.app import Context, RecordDict

    from fedmed.site.app import _keyed_inputs

    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    schema = csv_study.data.schema
    other = csv_study.replace(
        data=replace(csv_study.data, schema=replace(schema, split_seed=7, test_fraction=0.2))
    )

    _, _, data, key = _keyed_inputs(csv_study.to_json(), context)
    _, _, other_data, other_key = _keyed_inputs(other.to_json(), context)

    assert fingerprint(data.x_train, data.y_train) != fingerprint(
        other_data.x_train, other_data.y_train
    )  # other training rows ...
    assert key == other_key  # ... from the same patients: the same ledger key
