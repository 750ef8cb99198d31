"""Membership-inference audit of a finished run: does the model give away who trained it?

The loss-threshold attack (Yeom et al., 2018): rows the model trained on tend to have lower loss
than rows it never saw. For each site we score its train rows (members) and its held-out test rows
(non-members) by -loss and report the attack's ROC-AUC (0.5 = no leakage) and its TPR at 1 % FPR
(the regime that matters for individual patients), next to the ε the site spent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import RunConfig, parse_run_config
from fedmed.data.table import SiteData
from fedmed.errors import ConfigError
from fedmed.io import write_json
from fedmed.privacy.membership import loss_threshold_attack, per_example_loss
from fedmed.serving.export import load_model
from fedmed.tasks import get_task, load_site_data


def _site_arrays(cfg: RunConfig) -> list[SiteData]:
    if cfg.mode == "pooled":
        from fedmed.study.baselines import pooled_site_data

        return pooled_site_data(cfg)[1]
    return [load_site_data(cfg, s) for s in cfg.sites]


def audit_run(run_dir: Path) -> dict[str, Any]:
    """Run the attack on every site of ``run_dir`` and write privacy_audit.json there."""
    metrics_path = Path(run_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json; give the directory of a finished run")
    payload = json.loads(metrics_path.read_text())
    cfg = parse_run_config(payload["config"])
    if cfg.task == "survival":
        raise ConfigError(
            f"the loss-threshold audit needs a per-patient loss; task '{cfg.task}' has none "
            "(a Cox partial likelihood is defined per risk set), so it cannot be audited this way"
        )
    if get_task(cfg.task).target != "binary":
        raise ConfigError(
            f"the loss-threshold audit is implemented for one-logit tabular models; task "
            f"'{cfg.task}' is not audited this way yet (its ε is in metrics.json)"
        )
    final_sites = payload["final"]["sites"]
    results: dict[str, Any] = {}
    for data in _site_arrays(cfg):
        stem = f"model-{data.name}" if cfg.mode == "local" else "model"
        # An audit reads a run's own files: the weights' hash is checked, a signature is not
        # required (older or unsigned runs can still be audited).
        model, _ = load_model(Path(run_dir) / f"{stem}.safetensors", require_signature=False)
        attack = loss_threshold_attack(
            per_example_loss(model, data.x_train, data.y_train),
            per_example_loss(model, data.x_test, data.y_test),
        )
        results[data.name] = {
            **attack,
            "members": len(data.y_train),
            "non_members": len(data.y_test),
            "epsilon": final_sites.get(data.name, {}).get("epsilon"),
        }
    report = {
        "attack": "loss-threshold membership inference (train rows vs held-out rows per site)",
        "privacy": payload["config"]["privacy"],
        "sites": results,
        "mean_attack_auc": float(np.mean([r["attack_auc"] for r in results.values()])),
    }
    write_json(Path(run_dir) / "privacy_audit.json", report)
    return report
