"""Binary classification of 2D medical images with a small CNN (grayscale or RGB, any size).

Conv3x3 -> GroupNorm -> ReLU -> MaxPool blocks, global average pooling, one logit. GroupNorm
instead of BatchNorm: BatchNorm mixes the examples of a batch, which DP-SGD's per-example
clipping cannot allow (Opacus refuses it) and which leaks batch statistics in federated
updates. Global average pooling makes the network size-agnostic (28x28 MedMNIST or 224x224).

Augmentation is the model's first layer and acts only in training mode (see AugmentConfig for
why left-right flips and small shifts, and no up-down flip): evaluation, the served model and
saliency maps see the image as it is. It has no parameters, so Opacus, the exchanged weights
and the model file are unaffected. Loss, metrics and served fields are the tabular
classifier's (BCE on one logit; accuracy, ROC-AUC, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmed.config import AugmentConfig, ModelConfig, RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.ensemble import ensemble_of
from fedmed.tasks.tabular import TabularClassification

IG_STEPS = 32
BASELINE = -1.0  # a black image in model units ((0 / 255 - 0.5) / 0.5)


class Augment(nn.Module):
    """Random left-right / up-down flips and integer shifts, per image, in training mode only.

    Shifts replicate the border pixels (no wrap-around: a lesion never reappears on the other
    side). Randomness comes from torch's generator, which the training loop seeds per round.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.hflip, self.vflip, self.max_shift = cfg.hflip, cfg.vflip, cfg.max_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or len(x) == 0:
            return x
        n = len(x)
        if self.hflip:
            x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
        if self.vflip:
            x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(-2), x)
        if self.max_shift > 0:
            x = self._shift(x)
        return x

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        n, _, h, w = x.shape
        padded = nn.functional.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * s + 1, (n,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, chan, rows, cols]


def cnn(n_channels: int, cfg: ModelConfig) -> nn.Sequential:
    """Augment + one conv block per ``cfg.hidden`` entry + global pooling + a logit."""
    layers: list[nn.Module] = [Augment(cfg.augment)]
    width = n_channels
    for channels in cfg.hidden:
        layers += [
            nn.Conv2d(width, channels, kernel_size=3, padding=1),
            nn.GroupNorm(math.gcd(channels, 8), channels),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        width = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class ImagingClassification(TabularClassification):
    name = "imaging-classification"
    target = "image"
    prediction_doc = (
        "Probability of the positive class (label: probability >= 0.5); explanations are "
        "saliency maps (integrated gradients against a black image)"
    )

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.kind != "cnn":
            raise ConfigError(
                f"task 'imaging-classification' trains a CNN; set model.kind = 'cnn' (got "
                f"'{cfg.model.kind}') and model.hidden to the conv channels, e.g. [16, 32]"
            )
        if cfg.model.augment.max_shift < 0:
            raise ConfigError("model.augment.max_shift must be >= 0 (pixels)")

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        return ensemble_of(lambda: cnn(n_inputs, cfg), cfg)


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    steps: int = IG_STEPS,
    *,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-input integrated gradients of the logit, from ``baseline`` (default: a black image).

    Same shape as ``inputs``; per example the attributions sum (up to the Riemann error of
    ``steps`` midpoints, larger where ReLUs and max-pools switch along the path) to
    logit(input) - logit(baseline). Positive = pushes towards label 1. ``baseline`` broadcasts
    against ``inputs``: a series model passes its "nothing observed" patient, whose layout only
    its data layer knows. Where an input equals the baseline its attribution is exactly 0.
    """
    model.eval()
    start = torch.full_like(inputs, BASELINE) if baseline is None else baseline.expand_as(inputs)
    total = torch.zeros_like(inputs)
    for alpha in (torch.arange(steps) + 0.5) / steps:  # midpoint rule: the smaller error
        point = (start + alpha * (inputs - start)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point).sum(), point)
        total += grad
    return (inputs - start) * total / steps
