"""Aggregation that survives hospitals: robust strategies, FedProx, update validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmed.client_app import evaluate_global, train
from fedmed.config import ModelConfig, RunConfig, StrategyConfig, TrainConfig
from fedmed.strategies import STRATEGIES, build_strategy
from fedmed.tasks import get_task
from fedmed.train import train_plain

from .test_runtime import _run


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
    from fedmed.cli import preflight
    from fedmed.data import load_site_data
    from fedmed.server_app import initial_model
    from fedmed.study import RunPlan
    from fedmed.train import evaluate

    cfg = csv_study.replace(rounds=1, strategy=StrategyConfig(min_sites=3))

    out = _run(cfg, _poisoned_app(0, _nan))

    assert [f["site"] for f in out["history"][0]["failures"]] == ["alpha"]
    # No aggregation happened: every site evaluated the untouched initial model.
    ready, _ = preflight(cfg)
    model = initial_model(RunPlan(ready, out["_dir"]))
    task = get_task(cfg.task)
    for site in ready.sites:
        data = load_site_data(ready, site)
        expected = evaluate(model, data.x_test, data.y_test, task, torch.device("cpu"))["loss"]
        assert out["final"]["sites"][site.name]["loss"] == pytest.approx(expected, rel=1e-5)
