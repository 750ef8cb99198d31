"""Which parts of a model stay at the sites (FedBN): both sides must agree, so it lives here."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedmed.errors import ConfigError

# Every torch normalization layer with parameters or running statistics. LocalResponseNorm has
# neither, so there is nothing of it to keep local.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def local_keys(model: nn.Module) -> frozenset[str]:
    """state_dict keys of the model's normalization layers (parameters and buffers)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + key for key in module.state_dict())
    return frozenset(keys)


def check_model(model: nn.Module) -> frozenset[str]:
    """The local keys, or a ConfigError when the option would change nothing."""
    keys = local_keys(model)
    if not keys:
        raise ConfigError(
            "personalize.local_normalization = true, but the model has no normalization layer "
            "with parameters to keep at the sites (it needs nn.GroupNorm/BatchNorm/LayerNorm, "
            "e.g. model.kind = 'cnn'); set personalize.local_normalization = false"
        )
    return keys


def split(
    state: Mapping[str, torch.Tensor], local: frozenset[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local) parts of a state dict."""
    shared = {k: v for k, v in state.items() if k not in local}
    return shared, {k: v for k, v in state.items() if k in local}
