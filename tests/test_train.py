"""Local training and metrics: checked against scikit-learn and plain expectations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from fedmed.config import ModelConfig, TrainConfig
from fedmed.errors import ConfigError
from fedmed.tasks import get_task
from fedmed.train import derive_seed, evaluate, resolve_device, steps_per_round, train_plain


def test_metrics_match_sklearn() -> None:
    task = get_task("tabular-classification")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(np.float32)
    scores = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)

    m = task.evaluate(y, scores, loss=0.5)

    pred = (scores >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, scores))


def test_roc_auc_is_nan_for_one_class_test_split() -> None:
    m = get_task("tabular-classification").evaluate(np.ones(5), np.full(5, 0.7), loss=0.1)

    assert math.isnan(m["roc_auc"]) and m["accuracy"] == 1.0


def test_unknown_task_lists_valid_tasks() -> None:
    with pytest.raises(ConfigError, match="tabular-classification"):
        get_task("segmentation")


def test_training_learns_a_separable_problem() -> None:
    task = get_task("tabular-classification")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    model = task.build_model(4, ModelConfig(kind="logreg"))
    cfg = TrainConfig(local_epochs=5, batch_size=16, lr=0.5)

    before = evaluate(model, x, y, task, torch.device("cpu"))["accuracy"]
    result = train_plain(model, x, y, task, cfg, seed=0, device=torch.device("cpu"))
    after = evaluate(model, x, y, task, torch.device("cpu"))["accuracy"]

    assert result.steps == steps_per_round(300, cfg) == math.ceil(5 * 300 / 16)
    assert after > 0.95 and after > before


def test_same_seed_same_weights() -> None:
    task = get_task("tabular-classification")
    x = np.random.default_rng(2).normal(size=(64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task.build_model(3, ModelConfig(kind="mlp", hidden=(8,)))
        train_plain(
            model,
            x,
            y,
            task,
            TrainConfig(local_steps=10),
            seed=derive_seed(1, 2, "a"),
            device=torch.device("cpu"),
        )
        runs.append(torch.cat([p.flatten() for p in model.parameters()]))

    assert torch.equal(runs[0], runs[1])
    assert derive_seed(1, 2, "a") != derive_seed(1, 2, "b")


def test_device_auto_falls_back_to_cpu_and_absent_cuda_is_an_error() -> None:
    device = resolve_device("auto")

    assert device.type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("mode", ["federated", "pooled"])
def test_lr_decay_trains_round_r_at_lr_times_decay_to_the_r_minus_1(
    mode: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import fedmed.site.app
    import fedmed.study.baselines
    from fedmed.cli.main import main

    seen: list[float] = []
    module = fedmed.site.app if mode == "federated" else fedmed.study.baselines
    original = module.train_plain

    def recording(*args, **kwargs):  # the lr the round's optimizer actually steps with
        optimizer = kwargs.get("optimizer")
        seen.append(optimizer.param_groups[0]["lr"] if optimizer else args[4].lr)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "train_plain", recording)
    # The spy records in this process: the sites must train here, not in forked workers.
    monkeypatch.setenv("FEDMED_SIM_WORKERS", "1")
    args = ["--set", "rounds=3", "--set", "train.lr=0.08", "--set", "train.lr_decay=0.5"]
    plain = ["--set", "privacy.enabled=false", "--mode", mode, "--set", f"output_dir={tmp_path}"]

    assert main(["simulate", "demo", "--quiet", *args, *plain]) == 0, capsys.readouterr().err

    per_round = 4 if mode == "federated" else 1  # 4 sites, or one pooled model
    assert seen == pytest.approx([0.08] * per_round + [0.04] * per_round + [0.02] * per_round)
    assert TrainConfig(lr=0.1).at_round(5) == TrainConfig(lr=0.1)  # 1.0: unchanged
    with pytest.raises(ConfigError, match=r"lr_decay must be in \(0, 1\]"):
        TrainConfig(lr_decay=1.5)
