"""Same study, same seed: Flower's Ray engine and the in-process Grid give the same metrics."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmed.cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _own_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts a Ray cluster of its own, never joins another, and leaves nothing behind.

    Without RAY_TMPDIR every Ray on the host shares /tmp/ray, and ray.init() joins the cluster
    named in /tmp/ray/ray_current_cluster (a `ray start` by anyone). The folder is short on
    purpose: Ray's socket paths live under it, and a Unix socket path has at most 107 bytes.
    A run also changes this process's environment: Flower's Ray backend prepends all of sys.path
    to $PYTHONPATH (which every later subprocess would inherit, growing with each Ray test),
    ray.init() and run_ray set PYTHONBREAKPOINT and RAY_* variables. All of it is put back,
    as is a Ray left running by a failed test.
    """
    import flwr.simulation  # noqa: F401 - its and Ray's import-time settings stay, as they would
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    environ = dict(os.environ)
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_and_inprocess_agree(demo_config, tmp_path, capsys) -> None:
    from tests.cli.test_cli import _write_toml

    config = _write_toml(demo_config, tmp_path / "demo.toml")
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray"
    for site in demo_config.site_names:
        for metric in ("accuracy", "roc_auc", "loss", "epsilon"):
            assert a["final"]["sites"][site][metric] == pytest.approx(
                b["final"]["sites"][site][metric], abs=1e-5
            )


def test_a_run_killed_in_process_resumes_on_ray(demo_config, tmp_path, capsys) -> None:
    from fedmed.coordinator.app import build_server_app
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from fedmed.site.app import app
    from fedmed.study.plan import RunPlan, new_run_dir
    from tests.cli.test_cli import _write_toml

    def killed_after_round_1(rnd: int, history) -> None:
        if rnd == 1:
            raise KeyboardInterrupt  # stands in for the coordinator dying

    config = _write_toml(demo_config, tmp_path / "demo.toml")
    cfg, _ = preflight(demo_config)
    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(build_server_app(plan, killed_after_round_1), app, 4, plan.to_run_config())
    assert main(["simulate", str(config), "--quiet"]) == 0  # uninterrupted, in-process
    reference = Path(capsys.readouterr().out.strip().splitlines()[-1])

    args = ["simulate", str(config), "--engine", "ray", "--resume", str(plan.run_dir), "--quiet"]
    assert main(args) == 0

    resumed = json.loads((plan.run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert resumed["engine"] == "ray" and [h["round"] for h in resumed["history"]] == [1, 2]
    for site in demo_config.site_names:
        for metric in ("accuracy", "loss", "epsilon"):
            assert resumed["final"]["sites"][site][metric] == pytest.approx(
                expected["final"]["sites"][site][metric], abs=1e-6
            )


def test_local_normalization_on_ray_matches_inprocess(tmp_path, capsys, monkeypatch) -> None:
    """FedBN's site-local layers persist across rounds in Ray actors as they do in-process.

    Without $FEDMED_SITE_STATE_DIR they live in the run's own folder, found from a RELATIVE
    output_dir by Ray's worker processes as by the in-process sites.
    """
    from tests.tasks.test_imaging import _study, _to_toml

    monkeypatch.delenv("FEDMED_SITE_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    raw = _study(tmp_path, rounds=3)
    raw["output_dir"] = "runs"
    raw["personalize"] = {"local_normalization": True}
    config = tmp_path / "img.toml"
    config.write_text(_to_toml(raw))
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())
        for site in ("a", "b"):
            stored = list(
                (tmp_path / run_dir / "sites" / site / "local-layers").rglob("*.safetensors")
            )
            assert stored, f"{engine}: site {site} kept no layers in its run folder"

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray"
    for site in ("a", "b"):
        for phase in ("before", "after"):
            assert a["final"]["personalized"]["sites"][site][phase]["loss"] == pytest.approx(
                b["final"]["personalized"]["sites"][site][phase]["loss"], abs=1e-5
            )
        for h_a, h_b in zip(a["history"], b["history"], strict=True):
            assert h_a["sites"][site]["evaluate"]["loss"] == pytest.approx(
                h_b["sites"][site]["evaluate"]["loss"], abs=1e-5
            )


def _survival(tmp_path: Path) -> dict:
    from tests.tasks.test_survival import _run

    # (Local DP-SGD cannot apply to Cox; central DP's noise is drawn at the coordinator,
    # unseeded, so runs would not compare: tests/test_survival.py covers it in-process.)
    return _run({"strategy.name": "fedadam", "train.local_steps": 3}, tmp_path)


def _imaging(tmp_path: Path) -> dict:
    from tests.tasks.test_imaging import _study

    return _study(tmp_path, strategy={"name": "fedprox", "proximal_mu": 0.1})


def _sequence(tmp_path: Path) -> dict:
    from tests.tasks.test_sequence import _study

    return _study(tmp_path, privacy={"enabled": True, "target_epsilon": 8.0})  # Opacus DPGRU


@pytest.mark.parametrize("study", [_survival, _imaging, _sequence], ids=lambda f: f.__name__)
def test_every_task_runs_on_ray_as_in_process(study, tmp_path, capsys) -> None:
    """Survival, imaging and sequence studies (2 sites, 1 round) give the same metrics on Ray."""
    from tests.tasks.test_imaging import _to_toml

    raw = {**study(tmp_path), "rounds": 1, "seed": 3}
    config = tmp_path / "study.toml"
    config.write_text(_to_toml(raw))
    results = {}
    for engine in ("inprocess", "ray"):
        assert main(["simulate", str(config), "--engine", engine, "--quiet"]) == 0
        run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
        results[engine] = json.loads((run_dir / "metrics.json").read_text())

    a, b = results["inprocess"], results["ray"]
    assert b["engine"] == "ray" and set(b["final"]["sites"]) == {s["name"] for s in raw["sites"]}
    assert not any(h["failures"] for h in b["history"]), b["history"]
    for site, metrics in a["final"]["sites"].items():
        for metric, value in metrics.items():
            assert b["final"]["sites"][site][metric] == pytest.approx(value, abs=1e-4), metric
