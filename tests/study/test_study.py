"""Study outputs: nothing broken is ever released."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch

from fedmed.config import RunConfig
from fedmed.errors import StudyFailed
from fedmed.study.history import RunHistory
from fedmed.study.outputs import finish_run
from fedmed.study.plan import RunPlan, initial_model, new_run_dir
from tests.cli.test_cli import _write_toml


def _history(cfg: RunConfig) -> RunHistory:
    history = RunHistory(sites=cfg.site_names)
    for site in cfg.site_names:
        history.record(1, "train", site, {"num-examples": 50.0, "train_loss": 0.5})
        loss = 5.0 if site == "beta" else 0.7  # beta's model is the one that diverges below
        history.record(1, "evaluate", site, {"num-examples": 20.0, "accuracy": 0.0, "loss": loss})
    return history


def _trained(plan: RunPlan) -> torch.nn.Module:
    model = initial_model(plan)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


def _diverged(plan: RunPlan) -> torch.nn.Module:
    model = initial_model(plan)
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    return model


@pytest.mark.parametrize(
    ("model", "why"),
    [(_diverged, "NaN or Inf"), (initial_model, "no round aggregated")],
    ids=["non-finite", "never-updated"],
)
def test_a_broken_final_model_is_never_written(csv_study: RunConfig, model, why: str) -> None:
    plan = RunPlan(csv_study, new_run_dir(csv_study))

    with pytest.raises(StudyFailed, match=why) as err:
        finish_run(plan, _history(csv_study), {"model": model(plan)}, time.time())

    assert "\n" not in str(err.value)
    assert not (plan.run_dir / "model.safetensors").exists()
    assert not (plan.run_dir / "model.card.json").exists()
    metrics = json.loads((plan.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and why in metrics["error"]


def test_a_diverged_local_model_is_named_and_its_metrics_are_null(csv_study: RunConfig) -> None:
    cfg = csv_study.replace(mode="local")
    plan = RunPlan(cfg, new_run_dir(cfg))
    models = {"model-alpha": _trained(plan), "model-beta": _diverged(plan)}
    models["model-gamma"] = _trained(plan)

    payload = finish_run(plan, _history(cfg), models, time.time())

    assert set(payload["failed_models"]) == {"beta"}
    assert "NaN or Inf" in payload["failed_models"]["beta"]
    saved = json.loads((plan.run_dir / "metrics.json").read_text())
    beta = saved["final"]["sites"]["beta"]
    assert beta["accuracy"] is None and beta["loss"] is None  # not 0.0
    assert saved["final"]["sites"]["alpha"]["accuracy"] == 0.0  # a real (bad) score stays
    assert saved["final"]["average"]["loss"] == pytest.approx(0.7)  # beta left out
    assert saved["final"]["average_coverage"]["missing"]["loss"] == ["beta"]  # and says so
    assert not (plan.run_dir / "model-beta.safetensors").exists()
    assert (plan.run_dir / "model-alpha.safetensors").is_file()


def test_the_cli_exits_non_zero_with_one_line_when_nothing_is_released(
    csv_study: RunConfig, tmp_path: Path, capsys
) -> None:
    from fedmed.cli.main import main

    # Every site's cap is below what one round costs: every site refuses, nothing aggregates.
    capped = tuple(dataclasses.replace(s, epsilon_cap=0.01) for s in csv_study.sites)
    config = _write_toml(csv_study.replace(sites=capped), tmp_path / "study.toml")

    code = main(["simulate", str(config), "--set", "rounds=1", "--set", "privacy.enabled=true"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith("fedmed: error: study 'csvstudy' released no model")
    assert not list((tmp_path / "runs").glob("*/model.safetensors"))


@pytest.mark.parametrize(
    ("mode", "strategy", "expected"),
    [
        ("federated", "fedprox", "csvstudy-federated-fedprox-s7-"),
        ("pooled", "fedavg", "csvstudy-pooled-s7-"),
        ("local", "fedavg", "csvstudy-local-s7-"),
    ],
)
def test_run_folders_name_the_strategy_and_seed(
    csv_study: RunConfig, mode: str, strategy: str, expected: str
) -> None:
    from fedmed.config import StrategyConfig

    cfg = csv_study.replace(mode=mode, seed=7, strategy=StrategyConfig(name=strategy))

    run_dir = new_run_dir(cfg)

    assert run_dir.name.startswith(expected) and run_dir.is_dir()
    assert re.fullmatch(r"\d{8}-\d{6}", run_dir.name.removeprefix(expected))
