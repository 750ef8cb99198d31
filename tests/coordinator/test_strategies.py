"""Strategy registry and metric aggregation (ε is a max, never an average)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedmed.config import RunConfig
from fedmed.coordinator.strategies import STRATEGIES, aggregate_metrics, build_strategy
from fedmed.errors import ConfigError


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


def test_fedadam_keeps_float32_so_no_update_is_rejected(csv_study: RunConfig, capsys) -> None:
    """Flower's FedAdam step promotes float32 to float64 (NumPy 2); fedmed casts it back."""
    import json
    from pathlib import Path

    import torch

    from fedmed.cli.main import main
    from fedmed.serving.export import load_model
    from tests.cli.test_cli import _write_toml

    config = _write_toml(csv_study, Path(csv_study.output_dir).parent / "study.toml")

    assert main(["simulate", str(config), "--quiet", "--set", "strategy.name=fedadam"]) == 0

    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds_planned"] >= 3
    assert all(not h["failures"] for h in metrics["history"])
    model, _ = load_model(run_dir / "model.safetensors")
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())


def _parsed(strategy: dict[str, object]) -> RunConfig:
    from fedmed.config import parse_run_config

    sites = [{"name": "a", "path": "a.csv"}, {"name": "b", "path": "b.csv"}]
    return parse_run_config({"strategy": strategy, "sites": sites})


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedopt_moments_and_tau_reach_flowers_strategy(name: str) -> None:
    cfg = _parsed({"name": name, "beta_1": 0.8, "beta_2": 0.999, "tau": 1e-8, "server_lr": 0.02})

    strategy = build_strategy(cfg)

    assert type(strategy).__name__ == {"fedadam": "FedAdam", "fedyogi": "FedYogi"}[name]
    assert (strategy.beta_1, strategy.beta_2) == (0.8, 0.999)
    assert strategy.tau == 1e-8 and strategy.eta == 0.02


def test_fedadagrad_takes_tau_and_refuses_moments_it_would_ignore() -> None:
    assert build_strategy(_parsed({"name": "fedadagrad", "tau": 1e-6})).tau == 1e-6

    with pytest.raises(ConfigError, match=r"strategy.beta_2 = 0.999 has no effect.*fedadam"):
        _parsed({"name": "fedadagrad", "beta_2": 0.999})


@pytest.mark.parametrize(
    ("key", "value"),
    [("beta_1", 1.0), ("beta_1", -0.1), ("beta_2", 1.5), ("tau", 0.0), ("tau", 2.0)],
)
def test_fedopt_settings_out_of_range_are_refused_at_parse_time(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"strategy\.{key} = .* is out of range") as err:
        _parsed({"name": "fedadam", key: value})

    assert "\n" not in str(err.value) and f"--set strategy.{key}=" in str(err.value)


def test_each_sites_median_of_the_others_is_numpys_without_it() -> None:
    from fedmed.coordinator.strategies import others_medians

    rng = np.random.default_rng(0)
    for n, extra in [(1, 0), (1, 3), (2, 0), (5, 0), (6, 4), (50, 7), (51, 0)]:
        values = list(rng.choice([0.5, 1.0, 2.0, 3.5], n) if n % 2 else rng.random(n))
        previous = list(rng.random(extra))
        expected = [
            float(np.median(values[:i] + values[i + 1 :] + previous)) if n - 1 + extra else math.nan
            for i in range(n)
        ]
        got = others_medians(values, previous)
        assert got == pytest.approx(expected, nan_ok=True), (n, extra)
