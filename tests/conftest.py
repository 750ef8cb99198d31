"""Shared fixtures: small, fast studies built from packaged data or tables written by the test."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.config import RunConfig, load_run_config, parse_run_config, resolve_config_path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

DATA_DIR = Path(os.environ.get("FEDMED_DATA_DIR", "../shared/datasets"))
HEART_DIR = DATA_DIR / "uci_heart_disease"

needs_shared_data = pytest.mark.shared_data


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Shared-data tests skip on a laptop without ../shared, but FAIL in CI (which has it)."""
    if item.get_closest_marker("shared_data") is None or HEART_DIR.is_dir():
        return
    reason = f"shared datasets not found at {DATA_DIR.resolve()} (set FEDMED_DATA_DIR)"
    if os.environ.get("FEDMED_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"{reason}; FEDMED_REQUIRE_SHARED_DATA=1 makes them required")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own privacy ledger folder (never the user's ~/.fedmed)."""
    path = tmp_path / "ledger"
    monkeypatch.setenv("FEDMED_LEDGER_DIR", str(path))
    monkeypatch.setenv("FEDMED_KEY_DIR", str(tmp_path / "keys"))  # model-signing key, per test
    monkeypatch.setenv("FEDMED_SITE_STATE_DIR", str(tmp_path / "sites"))  # simulated sites' state
    return path


@pytest.fixture(autouse=True)
def _process_globals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees what an earlier one left in this process, nor leaves anything behind.

    Flower's TaskIdentity is process-global: its runtimes (and fedmed's in-process one) set it and
    never clear it, and every Message() built outside a runtime reads it. Each test starts with it
    unset and the previous values come back afterwards, so a test that needs it says so
    (``task_identity``) instead of borrowing it from whichever test ran before (issue: alone or
    first, tests/coordinator/test_central_dp.py failed).

    The serial in-process grid abandons a site that misses its round deadline in a daemon thread
    ("site-<node>"); once the test releases it, it finishes its work (training included, on
    torch's process-wide RNG). Wait for it here, so it never runs during the next test. A pool's
    worker processes must be gone by then too (a run, or the test, closes its grid).
    """
    from flwr.supercore.task_identity import TaskIdentity

    from fedmed.runtime.workers import WORKER_NAME

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("site-"):
            thread.join(timeout=60)
            assert not thread.is_alive(), f"abandoned site thread {thread.name} still runs"
    workers = [p.name for p in multiprocessing.active_children() if p.name.startswith(WORKER_NAME)]
    assert not workers, f"site worker processes still run: {workers}"


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's TaskIdentity as the coordinator's runtime would set it (run 1, task 1), for tests
    that build Messages by hand; undone after the test."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture
def demo_config(tmp_path: Path) -> RunConfig:
    """The shipped demo, shortened to 2 rounds and writing under tmp_path."""
    cfg = load_run_config(resolve_config_path("demo"), ["rounds=2"])
    return cfg.replace(output_dir=str(tmp_path / "runs"))


def write_site_csv(path: Path, n: int, seed: int, positive_rate: float = 0.4) -> Path:
    """A small clinical-looking table with a learnable binary outcome."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 10, n).round(0)
    bp = rng.normal(130, 15, n).round(0)
    smoker = rng.choice(["yes", "no"], n)
    risk = 0.05 * (age - 60) + 0.03 * (bp - 130) + (smoker == "yes") * 1.0
    threshold = np.quantile(risk, 1 - positive_rate)
    outcome = (risk + rng.normal(0, 0.5, n) > threshold).astype(int)
    df = pd.DataFrame({"age": age, "bp": bp, "smoker": smoker, "outcome": outcome})
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def csv_study(tmp_path: Path) -> RunConfig:
    """Three hospitals with their own CSV files (a categorical column included)."""
    sites = []
    for i, (name, n) in enumerate([("alpha", 120), ("beta", 90), ("gamma", 60)]):
        path = write_site_csv(tmp_path / f"{name}.csv", n, seed=i)
        sites.append({"name": name, "path": str(path)})
    return parse_run_config(
        {
            "name": "csvstudy",
            "rounds": 3,
            "seed": 1,
            "output_dir": str(tmp_path / "runs"),
            "model": {"kind": "logreg"},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "data": {
                "schema": {
                    "target": "outcome",
                    "features": ["age", "bp", "smoker"],
                    "categorical": {"smoker": ["no", "yes"]},
                    "drop_first": True,
                    "test_fraction": 0.3,
                }
            },
            "sites": sites,
        }
    )
