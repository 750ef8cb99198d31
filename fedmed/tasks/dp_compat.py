"""Make a model trainable by Opacus (same model at the coordinator and every site)."""

from __future__ import annotations

from torch import nn


def make_compatible(model: nn.Module) -> nn.Module:
    """Swap layers DP-SGD cannot handle (BatchNorm -> GroupNorm, LSTM -> DPLSTM)."""
    from opacus.validators import ModuleValidator

    return model if ModuleValidator.is_valid(model) else ModuleValidator.fix(model)
