"""The wire between sites and coordinator: record keys, message actions and how replies decode.

Both wings import this module and nothing of each other: a key spelled here is the one spelling
of it on either side. It holds no logic beyond encoding and decoding what crosses the wire.
"""

from __future__ import annotations

import numpy as np
import torch

# --- what the coordinator sends -----------------------------------------------------------------
SITE_CONFIG_KEY = "fedmed-site"  # node config entry: path to the site's own TOML
RUN_KEY = "fedmed.run"  # ConfigRecord entry carrying the study plan as JSON
STUDY_KEY = "fedmed.study"  # ConfigRecord entry: this study's id
PLAN_RECORD = "fedmed.plan"  # RecordDict entry the secure coordinator adds to every message
SECAGG_RECORD = "secaggplus_configs"  # Flower's SecAgg+ record (flwr...secaggplus_constants)

# --- what a site replies ------------------------------------------------------------------------
SITE_KEY = "site"  # reply record (and SecAgg+ metrics key) naming the replying site
STATISTICS_KEY = "statistics"  # reply ConfigRecord entry: the site's fitted statistics as JSON
PHASES = ("before", "after")  # personalization metrics: the global model, then fine-tuned


def flatten(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"before": {...}, "after": {...}} -> {"before/accuracy": ...} (a flat MetricRecord)."""
    return {f"{phase}/{k}": v for phase in PHASES for k, v in result[phase].items()}


def unflatten(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The inverse of ``flatten``; keys of no known phase are dropped."""
    out: dict[str, dict[str, float]] = {phase: {} for phase in PHASES}
    for key, value in metrics.items():
        phase, _, name = key.partition("/")
        if phase in out and name:
            out[phase][name] = value
    return out


def to_state(keys: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Flower's legacy parameter list (in state_dict order) -> a state dict of tensors."""
    return {k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(keys, arrays, strict=True)}
