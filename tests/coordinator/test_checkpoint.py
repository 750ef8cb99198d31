"""Coordinator resume: a killed run continues from its last completed round, same numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmed.cli.main import main
from fedmed.config import RunConfig, SimulationConfig, StrategyConfig
from fedmed.coordinator.app import build_server_app
from fedmed.coordinator.checkpoint import FILENAME, load_checkpoint
from fedmed.errors import ConfigError
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.runtime.inprocess import InProcessGrid, run_inprocess
from fedmed.runtime.run import preflight
from fedmed.site.app import app as client_app
from fedmed.study.plan import RunPlan, new_run_dir


class Killed(Exception):
    """Stands in for the coordinator process dying."""


def _run(plan: RunPlan, on_round=None) -> Path:
    run_inprocess(
        build_server_app(plan, on_round), client_app, len(plan.config.sites), plan.to_run_config()
    )
    return plan.run_dir


def _fresh(cfg: RunConfig, on_round=None) -> Path:
    return _run(RunPlan(cfg, new_run_dir(cfg)), on_round)


def _resume(cfg: RunConfig, run_dir: Path, on_round=None) -> Path:
    return _run(RunPlan(cfg, run_dir, resume=True), on_round)


def _kill_after(rnd: int):
    def on_round(done: int, history) -> None:
        if done == rnd:
            raise Killed(f"coordinator killed after round {rnd}")

    return on_round


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _numbers(payload: dict) -> dict:
    """What must match between runs: every round's per-site metrics and the final ones.

    ``epsilon_total`` counts every study ever run on a dataset (both runs share the ledger),
    so it is the one number expected to differ.
    """

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "epsilon_total"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip({"history": payload["history"], "final": payload["final"]})


@pytest.mark.parametrize(
    "strategy",
    [StrategyConfig(name="fedavg"), StrategyConfig(name="fedadam", server_lr=0.05)],
    ids=["fedavg", "fedadam"],
)
def test_killed_after_round_2_of_5_resumes_to_the_same_result(
    csv_study: RunConfig, strategy: StrategyConfig
) -> None:
    cfg, _ = preflight(csv_study.replace(rounds=5, strategy=strategy))
    reference_dir = _fresh(cfg)
    run_dir = new_run_dir(cfg)

    with pytest.raises(Killed):
        _run(RunPlan(cfg, run_dir), _kill_after(2))

    checkpoint = load_checkpoint(run_dir, cfg)
    assert checkpoint.round == 2 and sorted(checkpoint.history.rounds) == [1, 2]
    if strategy.name == "fedadam":  # the server optimizer's moments travel with the checkpoint
        assert set(checkpoint.strategy_state) == {"m_t", "v_t"}
    assert not (run_dir / "metrics.json").exists()

    resumed_rounds: list[int] = []
    _resume(cfg, run_dir, on_round=lambda rnd, _: resumed_rounds.append(rnd))

    resumed = _metrics(run_dir)
    assert resumed_rounds == [3, 4, 5]  # only the remaining rounds ran, with their true numbers
    assert [h["round"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    # Exact: same seeds per (round, site), the same float32 model and float moments restored.
    assert _numbers(resumed) == _numbers(_metrics(reference_dir))
    ref_model = load_file(reference_dir / "model.safetensors")
    for key, value in load_file(run_dir / "model.safetensors").items():
        np.testing.assert_array_equal(value, ref_model[key])


def test_resume_with_a_different_config_is_refused_naming_the_change(csv_study: RunConfig) -> None:
    cfg, _ = preflight(csv_study.replace(rounds=3))
    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(Killed):
        _run(plan, _kill_after(1))

    with pytest.raises(ConfigError, match=r"rounds was 3, now 4.*resume with the run's own config"):
        load_checkpoint(plan.run_dir, cfg.replace(rounds=4))
    with pytest.raises(ConfigError, match="no checkpoint.safetensors"):
        load_checkpoint(plan.run_dir.parent, cfg)
    # Where outputs go is not part of the computation: a moved run still resumes, and so does
    # one continued on a Ray cluster whose sites reserve other resources.
    assert load_checkpoint(plan.run_dir, cfg.replace(output_dir="elsewhere")).round == 1
    on_a_cluster = SimulationConfig(cpus_per_site=4.0, gpus_per_site=0.5)
    assert load_checkpoint(plan.run_dir, cfg.replace(simulation=on_a_cluster)).round == 1


def test_a_replayed_private_round_is_not_charged_twice(
    demo_config: RunConfig, monkeypatch: pytest.MonkeyPatch, _private_ledger: Path
) -> None:
    # The coordinator dies in round 3 AFTER the sites trained (and charged) it, before it could
    # evaluate: the resumed run asks for round 3 again from the round-2 checkpoint.
    cfg, _ = preflight(demo_config.replace(rounds=3))
    reference = _metrics(_fresh(cfg))
    real = InProcessGrid.send_and_receive
    calls = {"n": 0}

    def dies_in_round_3_evaluate(self, messages, *, timeout=None):
        calls["n"] += 1
        if calls["n"] == 6:  # train 1, eval 1, train 2, eval 2, train 3, >eval 3<
            raise Killed("coordinator died mid-round 3")
        return real(self, messages, timeout=timeout)

    run_dir = new_run_dir(cfg)
    monkeypatch.setattr(InProcessGrid, "send_and_receive", dies_in_round_3_evaluate)
    with pytest.raises(Killed):
        _run(RunPlan(cfg, run_dir))
    monkeypatch.setattr(InProcessGrid, "send_and_receive", real)
    _resume(cfg, run_dir)

    for site in cfg.site_names:
        ledger = PrivacyLedger(site, _private_ledger)
        entries = json.loads(ledger.path.read_text())["entries"]
        datasets = {e["dataset"] for e in entries if "dataset" in e}
        (dataset,) = datasets
        rounds = [r["round"] for r in ledger.records(dataset, study=run_dir.name)]
        assert rounds == [1, 2, 3]  # round 3 trained twice, recorded once
    assert _numbers(_metrics(run_dir)) == _numbers(reference)


# Runs the CLI and SIGKILLs its own process the moment round 2's checkpoint is on disk. Polling
# for the file from outside raced the run: a demo round takes ~0.1 s, so round 3 could finish
# (and metrics.json appear) between the poll seeing the checkpoint and the kill landing.
_KILLED_AFTER_ROUND_2 = """
import os, signal, sys
import fedmed.coordinator.rounds as rounds
real = rounds.save_checkpoint
def save_then_die(run_dir, cfg, checkpoint):
    path = real(run_dir, cfg, checkpoint)
    if checkpoint.round >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
rounds.save_checkpoint = save_then_die
from fedmed.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_resumes_a_coordinator_killed_with_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["simulate", "demo", "--set", "rounds=3", "--set", "privacy.enabled=false"]
    args += ["--output-dir", str(out), "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_ROUND_2, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (checkpoint,) = out.glob(f"*/{FILENAME}")
    assert _round_of(checkpoint) == 2
    run_dir = checkpoint.parent
    assert not (run_dir / "metrics.json").exists()

    assert main([*args, "--resume", str(run_dir)]) == 0
    assert main(args) == 0  # an uninterrupted run with the same seed, for comparison
    reference = next(p for p in out.iterdir() if p != run_dir)

    resumed = _metrics(run_dir)
    assert [h["round"] for h in resumed["history"]] == [1, 2, 3]
    assert _numbers(resumed) == _numbers(_metrics(reference))
    assert main([*args, "--resume", str(run_dir)]) == 2  # finished: nothing left to resume


def _round_of(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return int((handle.metadata() or {}).get("round", 0))
    except Exception:  # caught mid-replace: not there yet
        return 0


def _rewrite(run_dir: Path, edit) -> None:
    """Change a checkpoint the way someone with write access to the run directory could."""
    from safetensors import safe_open
    from safetensors.numpy import save

    path = run_dir / FILENAME
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    edit(tensors, metadata)
    path.write_bytes(save(tensors, metadata=metadata))


def _zeroed(tensors: dict, metadata: dict) -> None:
    for name in tensors:
        tensors[name] = np.zeros_like(tensors[name])


def _round(value: str):
    def edit(tensors: dict, metadata: dict) -> None:
        metadata["round"] = value

    return edit


@pytest.mark.parametrize(
    "edit", [_zeroed, _round("-3"), _round("99"), _round("2")], ids=["zeroed", "-3", "99", "2"]
)
def test_an_edited_checkpoint_is_refused_on_resume(csv_study: RunConfig, edit) -> None:
    cfg, _ = preflight(csv_study.replace(rounds=3))
    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(Killed):
        _run(plan, _kill_after(1))
    key = plan.run_dir / "checkpoint.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_checkpoint(plan.run_dir, cfg).round == 1  # untouched: verifies

    _rewrite(plan.run_dir, edit)

    with pytest.raises(ConfigError, match="failed authentication") as err:
        _resume(cfg, plan.run_dir)
    assert "\n" not in str(err.value)


def test_a_checkpoint_without_its_key_is_refused(csv_study: RunConfig) -> None:
    cfg, _ = preflight(csv_study.replace(rounds=3))
    plan = RunPlan(cfg, new_run_dir(cfg))
    with pytest.raises(Killed):
        _run(plan, _kill_after(1))

    (plan.run_dir / "checkpoint.key").unlink()

    with pytest.raises(ConfigError, match="cannot be authenticated"):
        load_checkpoint(plan.run_dir, cfg)
