"""strategy.average_last: the released model is the mean of the last rounds' global models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmed.config import RunConfig, StrategyConfig
from fedmed.coordinator.checkpoint import FILENAME, load_checkpoint
from fedmed.coordinator.strategies import AverageRounds
from fedmed.errors import ConfigError
from fedmed.runtime.run import preflight
from fedmed.study.baselines import run_pooled
from fedmed.study.plan import RunPlan, new_run_dir
from fedmed.train import mean_of_models
from tests.coordinator.test_checkpoint import (
    Killed,
    _fresh,
    _kill_after,
    _metrics,
    _numbers,
    _resume,
    _run,
)


def _with_window(cfg: RunConfig, k: int) -> RunConfig:
    return cfg.replace(strategy=StrategyConfig(name="fedavg", average_last=k))


def _trajectory(cfg: RunConfig) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """A run and the global model after each of its rounds (read from its checkpoints)."""
    models: list[dict[str, np.ndarray]] = []

    def keep(rnd: int, _history) -> None:
        models.append(load_checkpoint(plan.run_dir, cfg).arrays)

    plan = RunPlan(cfg, new_run_dir(cfg))
    return _run(plan, keep), models


def test_the_window_holds_the_last_k_models_and_averages_floats_only() -> None:
    models = [
        {"w": np.full(3, float(i), dtype=np.float32), "count": np.array([i], dtype=np.int64)}
        for i in range(1, 6)
    ]
    averager = AverageRounds(inner=None, window=3)  # type: ignore[arg-type]
    for m in models:
        averager.add(m)

    mean = {k: averager.averaged()[k].numpy() for k in ("w", "count")}
    np.testing.assert_array_equal(mean["w"], np.full(3, 4.0, dtype=np.float32))  # (3+4+5)/3
    assert mean["w"].dtype == np.float32
    assert mean["count"].tolist() == [5]  # a counter is not averaged: the latest one
    restored = AverageRounds(inner=None, window=3)  # type: ignore[arg-type]
    restored.restore(averager.state())
    assert [m["count"].item() for m in restored.models] == [3, 4, 5]
    assert mean_of_models(models[:1])["w"].tolist() == [1.0, 1.0, 1.0]


def test_sites_train_from_the_latest_model_and_the_saved_one_is_the_tail_mean(
    csv_study: RunConfig,
) -> None:
    plain, _ = preflight(csv_study.replace(rounds=4))
    averaged, _ = preflight(_with_window(plain, 3))
    plain_dir, plain_models = _trajectory(plain)
    avg_dir, avg_models = _trajectory(averaged)

    # Training is untouched: every round's global model (what the sites train from) is the same.
    for a, b in zip(plain_models, avg_models, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # The saved model is the mean of rounds 2-4, not round 4's model.
    saved = load_file(avg_dir / "model.safetensors")
    expected = mean_of_models(plain_models[1:])
    for key, value in expected.items():
        np.testing.assert_allclose(saved[key], value, rtol=1e-6)
    weight = next(k for k in expected if k.endswith("weight"))
    assert not np.allclose(saved[weight], plain_models[-1][weight])
    np.testing.assert_array_equal(
        load_file(plain_dir / "model.safetensors")[weight], plain_models[-1][weight]
    )
    # What the sites evaluated: round 1 is a window of one (the same model), round 4 the mean.
    plain_hist, avg_hist = _metrics(plain_dir)["history"], _metrics(avg_dir)["history"]
    site = plain.site_names[0]
    assert avg_hist[0]["sites"][site]["evaluate"] == plain_hist[0]["sites"][site]["evaluate"]
    assert avg_hist[-1]["sites"][site]["evaluate"] != plain_hist[-1]["sites"][site]["evaluate"]
    assert json.loads((avg_dir / "metrics.json").read_text())["final"]


def test_a_resumed_averaging_run_restores_its_window(csv_study: RunConfig) -> None:
    cfg, _ = preflight(_with_window(csv_study.replace(rounds=4), 3))
    reference = _fresh(cfg)
    run_dir = new_run_dir(cfg)
    with pytest.raises(Killed):
        _run(RunPlan(cfg, run_dir), _kill_after(2))
    assert {"average-0", "average-1"} <= set(load_checkpoint(run_dir, cfg).strategy_state)

    _resume(cfg, run_dir)

    assert (run_dir / FILENAME).exists()
    assert _numbers(_metrics(run_dir)) == _numbers(_metrics(reference))
    ref = load_file(reference / "model.safetensors")
    for key, value in load_file(run_dir / "model.safetensors").items():
        np.testing.assert_array_equal(value, ref[key])


def test_pooled_baseline_averages_its_last_epochs_like_the_federation(
    csv_study: RunConfig,
) -> None:
    plain, _ = preflight(csv_study.replace(rounds=3))
    averaged, _ = preflight(_with_window(plain, 2))
    a = run_pooled(RunPlan(plain, new_run_dir(plain)))
    b = run_pooled(RunPlan(averaged, new_run_dir(averaged)))
    site = plain.site_names[0]
    first = [p["history"][0]["sites"][site]["evaluate"] for p in (a, b)]
    last = [p["history"][-1]["sites"][site]["evaluate"] for p in (a, b)]
    assert first[0] == first[1]  # a window of one
    assert last[0] != last[1]  # the mean of epochs 2-3, not epoch 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"average_last": 0}, r"average_last must be >= 1 \(got 0\)"),
        (
            {"average_last": 3, "secure_aggregation": True, "validate_updates": False},
            r"secure_aggregation = true needs strategy.average_last = 1",
        ),
    ],
)
def test_bad_windows_are_refused_naming_the_fix(
    csv_study: RunConfig, overrides: dict, message: str
) -> None:
    from fedmed.config import parse_run_config

    raw = json.loads(csv_study.to_json())
    raw["strategy"] = {**raw["strategy"], **overrides}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw)
