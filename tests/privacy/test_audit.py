"""Membership-inference audit: the attack detects leakage when there is some, and runs on a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.privacy.membership import loss_threshold_attack
from fedmed.study.audit import audit_run


def test_attack_is_chance_without_leak_and_high_with_one() -> None:
    rng = np.random.default_rng(0)
    same = loss_threshold_attack(rng.exponential(1, 2000), rng.exponential(1, 2000))
    leaky = loss_threshold_attack(rng.exponential(0.1, 2000), rng.exponential(1, 2000))

    assert same["attack_auc"] == pytest.approx(0.5, abs=0.03)
    assert leaky["attack_auc"] > 0.85 and leaky["tpr_at_1pct_fpr"] > 0.05


def test_audit_of_a_finished_run_reports_every_site(
    demo_config: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.runtime.test_runtime import _run

    run_dir = Path(_run(demo_config)["_dir"])

    assert main(["audit-privacy", str(run_dir)]) == 0

    report = json.loads((run_dir / "privacy_audit.json").read_text())
    assert set(report["sites"]) == set(demo_config.site_names)
    for site in report["sites"].values():
        assert 0.0 <= site["attack_auc"] <= 1.0
        assert site["epsilon"] > 0 and site["members"] > site["non_members"]
    assert "mean attack AUC" in capsys.readouterr().out


def test_audit_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no metrics.json"):
        audit_run(tmp_path)


def test_confident_rows_do_not_tie_at_zero_loss() -> None:
    import torch

    from fedmed.privacy.membership import per_example_loss

    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x = np.array([[20.0], [30.0], [40.0]], dtype=np.float32)  # margins far past float32's 16.6
    y = np.ones(3, dtype=np.float32)

    loss = per_example_loss(model, x, y)

    assert loss[0] > loss[1] > loss[2] > 0.0
