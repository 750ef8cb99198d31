"""Aggregation that survives hospitals: robust strategies, FedProx, update validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmed.config import ModelConfig, RunConfig, StrategyConfig, TrainConfig
from fedmed.coordinator.strategies import STRATEGIES, build_strategy
from fedmed.errors import StudyFailed
from fedmed.site.app import evaluate_global, train
from fedmed.tasks import get_task
from fedmed.train import train_plain
from tests.runtime.test_runtime import _run


@pytest.mark.parametrize("name", ["fedprox", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_and_proximal_strategies_run_end_to_end(csv_study: RunConfig, name: str) -> None:
    cfg = csv_study.replace(rounds=2, strategy=StrategyConfig(name=name, num_malicious=0))

    out = _run(cfg)

    assert name in STRATEGIES and type(build_strategy(cfg)).__name__.lower() == name
    assert out["final"]["round"] == 2 and set(out["final"]["sites"]) == {"alpha", "beta", "gamma"}


def test_proximal_term_keeps_local_weights_near_the_global_model() -> None:
    task = get_task("tabular-classification")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    drift = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        model = task.build_model(5, ModelConfig(kind="logreg"))
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_plain(
            model,
            x,
            y,
            task,
            TrainConfig(local_steps=50, lr=0.1),
            seed=1,
            device=torch.device("cpu"),
            proximal_mu=mu,
        )
        drift[mu] = float(
            torch.norm(torch.cat([p.detach().flatten() for p in model.parameters()]) - start)
        )

    assert drift[5.0] < 0.5 * drift[0.0]


def _poisoned_app(site_index: int, poison) -> ClientApp:
    app = ClientApp()

    def bad_train(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        if int(context.node_config["partition-id"]) == site_index and not reply.has_error():
            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord(poison(state))
        return reply

    app.train()(bad_train)
    app.evaluate()(evaluate_global)
    return app


def _nan(state: dict) -> dict:
    return {k: torch.full_like(v, float("nan")) for k, v in state.items()}


def _huge(state: dict) -> dict:
    return {k: v * 1e4 for k, v in state.items()}


def _wrong_shape(state: dict) -> dict:
    key = next(iter(state))
    return {**state, key: torch.zeros(7, 7)}


@pytest.mark.parametrize(
    ("poison", "why"),
    [
        (_nan, "contains NaN or Inf"),
        (_huge, "median"),
        (_wrong_shape, "expected float32"),
    ],
)
def test_bad_updates_are_rejected_and_the_run_continues(csv_study: RunConfig, poison, why) -> None:
    cfg = csv_study.replace(rounds=2, strategy=StrategyConfig(min_sites=2))

    out = _run(cfg, _poisoned_app(1, poison))

    for h in out["history"]:
        (failure,) = h["failures"]
        assert failure["site"] == "beta" and "update rejected" in failure["reason"]
        assert why in failure["reason"]
    assert all(np.isfinite(s["loss"]) for s in out["final"]["sites"].values())
    assert out["final"]["average"]["accuracy"] > 0.6


def test_too_few_valid_updates_keep_the_previous_model(csv_study: RunConfig) -> None:
    from fedmed.runtime.run import preflight
    from fedmed.study.plan import RunPlan, initial_model
    from fedmed.tasks import load_site_data
    from fedmed.train import evaluate

    cfg = csv_study.replace(rounds=1, strategy=StrategyConfig(min_sites=3))

    with pytest.raises(StudyFailed, match="no round aggregated an update"):
        _run(cfg, _poisoned_app(0, _nan))

    (run_dir,) = Path(cfg.output_dir).iterdir()
    out = json.loads((run_dir / "metrics.json").read_text()) | {"_dir": str(run_dir)}
    assert out["status"] == "failed" and "no round aggregated" in out["error"]
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "model.card.json").exists()
    assert [f["site"] for f in out["history"][0]["failures"]] == ["alpha"]
    # No aggregation happened: every site evaluated the untouched initial model.
    ready, _ = preflight(cfg)
    model = initial_model(RunPlan(ready, out["_dir"]))
    task = get_task(cfg.task)
    for site in ready.sites:
        data = load_site_data(ready, site)
        expected = evaluate(model, data.x_test, data.y_test, task, torch.device("cpu"))["loss"]
        assert out["final"]["sites"][site.name]["loss"] == pytest.approx(expected, rel=1e-5)


# -- replies a coordinator must not believe -------------------------------------------------------


def _lying_app(site_index: int, phase: str, lie) -> ClientApp:
    """Site ``site_index`` rewrites its ``phase`` reply with ``lie(reply, msg, round)``."""
    app = ClientApp()

    def tampered(handler):
        def run(msg: Message, context: Context) -> Message:
            reply = handler(msg, context)
            mine = int(context.node_config["partition-id"]) == site_index
            if mine and msg.metadata.message_type.startswith(phase) and not reply.has_error():
                lie(reply, msg, int(msg.content["config"]["server-round"]))
            return reply

        return run

    app.train()(tampered(train))
    app.evaluate()(tampered(evaluate_global))
    return app


def _claim(**metrics: float):
    def lie(reply: Message, msg: Message, rnd: int) -> None:
        for key, value in metrics.items():
            reply.content["metrics"][key] = value

    return lie


def _flipped(factor: float, **metrics: float):
    """The update pushed the other way, ``factor`` times as far, with claimed ``metrics``."""

    def lie(reply: Message, msg: Message, rnd: int) -> None:
        start = msg.content["arrays"].to_torch_state_dict()
        trained = reply.content["arrays"].to_torch_state_dict()
        flipped = {k: start[k] - factor * (trained[k] - start[k]) for k in trained}
        reply.content["arrays"] = ArrayRecord(flipped)
        _claim(**metrics)(reply, msg, rnd)

    return lie


def _more_rows_from_round_2(reply: Message, msg: Message, rnd: int) -> None:
    if rnd >= 2:
        reply.content["metrics"]["num-examples"] = reply.content["metrics"]["num-examples"] * 2


@pytest.mark.parametrize(
    ("lie", "why"),
    [
        (_flipped(5.0, **{"num-examples": 1e9}), "num-examples must be a positive whole number"),
        (_claim(**{"num-examples": float("nan")}), "num-examples must be a positive whole number"),
        (_claim(**{"num-examples": -56}), "num-examples must be a positive whole number"),
        (_claim(**{"num-examples": 56.5}), "num-examples must be a positive whole number"),
        (_claim(epsilon=-0.372), "'epsilon' = -0.372 is negative"),
        (_claim(train_loss=float("nan")), "'train_loss' is NaN"),
    ],
    ids=[
        "flipped-x5-1e9-rows",
        "nan-rows",
        "negative-rows",
        "fractional-rows",
        "negative-eps",
        "nan-loss",
    ],
)
def test_a_train_reply_that_cannot_be_believed_is_never_aggregated(
    csv_study: RunConfig, lie, why: str
) -> None:
    cfg = csv_study.replace(rounds=2, strategy=StrategyConfig(min_sites=2))

    out = _run(cfg, _lying_app(1, "train", lie))

    for h in out["history"]:
        (failure,) = h["failures"]
        assert failure["site"] == "beta" and failure["phase"] == "train"
        assert "reply rejected" in failure["reason"] and why in failure["reason"]
        assert "train" not in h["sites"]["beta"]
    assert out["final"]["average"]["accuracy"] > 0.6


def test_a_site_cannot_claim_more_rows_than_it_first_reported(csv_study: RunConfig) -> None:
    cfg = csv_study.replace(rounds=2, strategy=StrategyConfig(min_sites=2))

    out = _run(cfg, _lying_app(1, "train", _more_rows_from_round_2))

    assert out["history"][0]["failures"] == []
    (failure,) = out["history"][1]["failures"]
    assert failure["site"] == "beta" and "num-examples changed from" in failure["reason"]


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({"accuracy": 1.7}, "'accuracy' = 1.7 is outside [0, 1]"),
        ({"roc_auc": -0.2}, "'roc_auc' = -0.2 is outside [0, 1]"),
        ({"f1": float("inf")}, "'f1' is infinite"),
        ({"loss": float("nan")}, "'loss' is NaN"),
        ({"num-examples": 1e12}, "num-examples must be a positive whole number"),
    ],
)
def test_fake_evaluate_metrics_are_recorded_as_failures(
    csv_study: RunConfig, metrics: dict, why: str
) -> None:
    cfg = csv_study.replace(rounds=1)

    out = _run(cfg, _lying_app(2, "evaluate", _claim(**metrics)))

    (failure,) = out["history"][0]["failures"]
    assert failure["site"] == "gamma" and failure["phase"] == "evaluate"
    assert why in failure["reason"]
    assert "accuracy" not in out["final"]["sites"].get("gamma", {})  # no metric believed
    assert 0.0 <= out["final"]["average"]["accuracy"] <= 1.0


def test_the_norm_check_works_with_two_sites(csv_study: RunConfig) -> None:
    two = csv_study.replace(
        rounds=2, sites=csv_study.sites[:2], strategy=StrategyConfig(min_sites=1)
    )

    out = _run(two, _lying_app(1, "train", _flipped(50.0)))

    for h in out["history"]:
        (failure,) = h["failures"]
        assert failure["site"] == "beta" and "median of the other sites'" in failure["reason"]
    assert out["final"]["average"]["accuracy"] > 0.6


def test_a_non_finite_aggregate_keeps_the_previous_model(csv_study: RunConfig) -> None:
    # Without update validation a NaN update reaches FedAvg: the mean is NaN and is refused,
    # and a study that never aggregated anything releases no model.
    cfg = csv_study.replace(rounds=1, strategy=StrategyConfig(min_sites=2, validate_updates=False))

    with pytest.raises(StudyFailed, match="no round aggregated"):
        _run(cfg, _poisoned_app(1, _nan))

    (run_dir,) = Path(cfg.output_dir).iterdir()
    out = json.loads((run_dir / "metrics.json").read_text())
    (failure,) = out["history"][0]["failures"]
    assert failure["site"] == "coordinator" and "NaN or Inf" in failure["reason"]
    assert all(np.isfinite(s["loss"]) for s in out["final"]["sites"].values())
    assert not (run_dir / "model.safetensors").exists()
