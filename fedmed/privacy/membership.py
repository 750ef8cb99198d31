"""Membership-inference attack: how much a released model tells about who trained it."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve


def per_example_loss(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """BCE per row, computed from the signed logit margin in float64.

    float32 BCE rounds to exactly 0 once the margin passes ~16.6, so confident rows tie and the
    attack's AUC and low-FPR TPR collapse; softplus(-margin) in float64 keeps their order.
    """
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).squeeze(-1).double()
    margin = (2.0 * torch.from_numpy(y).double() - 1.0) * logits
    return torch.nn.functional.softplus(-margin).numpy()


def loss_threshold_attack(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """Attack AUC, TPR at 1 % FPR and the best TPR-FPR advantage."""
    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    scores = -np.r_[member_loss, nonmember_loss]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "attack_auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "advantage": float(np.max(tpr - fpr)),
    }
