"""A deep ensemble inside one model: K networks, one set of weights to federate, serve and explain.

Independently initialized copies of a small network disagree where the data say little, and the
mean of their logits ranks patients better than a typical member (Lakshminarayanan et al. 2017).
Keeping them in ONE module means every part of fedmed handles an ensemble unchanged: FedAvg
averages each member's weights with the same member at the other sites, DP-SGD clips each
patient's gradient over all members together (one privacy budget for the whole model), the
model file and card are one, and serving and explanations see one logit.

In training mode the module returns every member's logit, (batch, members), and the task's loss
averages the members' own losses, so each member learns as if it were trained alone (no member
is pulled towards fixing the others' errors). In eval mode it returns the mean logit, (batch, 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmed.config import ModelConfig


class Ensemble(nn.Module):
    """Members' logits side by side while training; their mean otherwise."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([m(x).reshape(len(x), 1) for m in self.members], dim=1)
        return logits if self.training else logits.mean(dim=1, keepdim=True)


def ensemble_of(build: Callable[[], nn.Module], cfg: ModelConfig) -> nn.Module:
    """``build()`` once, or an Ensemble of ``cfg.members`` builds (each drawing its own init)."""
    if cfg.members == 1:
        return build()
    return Ensemble([build() for _ in range(cfg.members)])
