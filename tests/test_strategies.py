"""Strategy registry and metric aggregation (ε is a max, never an average)."""

from __future__ import annotations

import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.strategies import STRATEGIES, aggregate_metrics, build_strategy


def _reply(**metrics: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_aggregation_is_unweighted_mean_with_max_epsilon_and_ignores_nan() -> None:
    replies = [
        _reply(**{"num-examples": 100, "accuracy": 0.9, "epsilon": 1.0, "roc_auc": math.nan}),
        _reply(**{"num-examples": 10, "accuracy": 0.5, "epsilon": 2.5, "roc_auc": 0.8}),
    ]

    out = aggregate_metrics(replies, "num-examples")

    assert out["accuracy"] == pytest.approx(0.7)  # FLamby's average over centers
    assert out["epsilon"] == 2.5
    assert out["roc_auc"] == pytest.approx(0.8)
    assert "num-examples" not in out


def test_registry_builds_flower_strategies(demo_config: RunConfig) -> None:
    fedavg = build_strategy(demo_config)
    adam = build_strategy(
        demo_config.replace(strategy=demo_config.strategy.__class__(name="fedadam", server_lr=0.05))
    )

    assert isinstance(fedavg, FedAvg)
    assert isinstance(adam, FedAdam) and adam.eta == pytest.approx(0.05)
    assert fedavg.min_available_nodes == len(demo_config.sites)
    assert set(STRATEGIES) >= {"fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm"}


def test_unknown_strategy_lists_valid_names(demo_config: RunConfig) -> None:
    bad = demo_config.replace(strategy=demo_config.strategy.__class__(name="fedsgd"))

    with pytest.raises(ConfigError, match="fedadam.*fedavg"):
        build_strategy(bad)
