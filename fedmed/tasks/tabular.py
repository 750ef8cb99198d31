"""Binary classification from a clinical table: logistic regression or a small MLP.

Models end in one logit; the loss is BCE-with-logits (stable in float32, and what DP-SGD clips).
Only Linear/ReLU/Dropout layers: every one of them is Opacus-compatible as is.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from torch import nn

from fedmed.config import ModelConfig, RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.ensemble import ensemble_of

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "loss")


class Task(Protocol):
    """What a task family provides to training, evaluation and the coordinator."""

    name: str
    # The outcome kind its data carries: a key of fedmed.data.table.OUTCOMES (tables) or of
    # fedmed.data.arrays.readers() (images, series).
    target: str
    metrics: tuple[str, ...]
    # What a served prediction reports per patient (field -> type), and what it means.
    prediction_fields: dict[str, type]
    prediction_doc: str

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError when the study asks for something this task cannot do."""

    def predictions(self, scores: np.ndarray, reference: float) -> dict[str, np.ndarray]:
        """Served values per patient from ``scores``; ``reference`` scores the all-zero input."""

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module: ...

    def build_for(self, cfg: RunConfig) -> nn.Module:
        """The study's model (``build_model`` sized by the study's input layout)."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def scores(self, output: torch.Tensor) -> np.ndarray: ...

    def evaluate(self, y_true: np.ndarray, scores: np.ndarray, loss: float) -> dict[str, float]: ...


def study_inputs(cfg: RunConfig) -> int:
    """How many inputs the study's table, image or series layout gives the model."""
    from fedmed.data.table import input_names

    return len(input_names(cfg.data.schema.features, cfg.data.schema))


def mlp(n_inputs: int, cfg: ModelConfig, *, bias_out: bool = True) -> nn.Module:
    """Linear (kinds ``linear``/``logreg``) or ReLU MLP ending in one output unit."""
    layers: list[nn.Module] = []
    width = n_inputs
    if cfg.kind == "mlp":
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = hidden
    layers.append(nn.Linear(width, 1, bias=bias_out))
    return nn.Sequential(*layers)


class TabularClassification:
    name = "tabular-classification"
    target = "binary"
    metrics = METRICS
    prediction_fields: ClassVar[dict[str, type]] = {"probability": float, "label": int}
    prediction_doc = "Probability of the positive class (label: probability >= 0.5)"

    def check(self, cfg: RunConfig) -> None:
        schema = cfg.data.schema
        if schema.time or schema.event:
            raise ConfigError(
                "data.schema.time/event describe a survival outcome but task = "
                "'tabular-classification'; set task = 'survival' (or remove time/event)"
            )

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        return ensemble_of(lambda: mlp(n_inputs, cfg), cfg)

    def build_for(self, cfg: RunConfig) -> nn.Module:
        return self.build_model(study_inputs(cfg), cfg.model)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = output.squeeze(-1)
        if logits.dim() == 2:  # an ensemble while training: the mean of the members' own losses
            target = target.unsqueeze(-1).expand_as(logits)
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    def scores(self, output: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(output.squeeze(-1)).detach().cpu().numpy()

    def predictions(self, scores: np.ndarray, reference: float) -> dict[str, np.ndarray]:
        """Probabilities are absolute: ``reference`` is not needed."""
        return {"probability": scores, "label": (scores >= 0.5).astype(int)}

    def evaluate(self, y_true: np.ndarray, scores: np.ndarray, loss: float) -> dict[str, float]:
        """Threshold 0.5. ROC-AUC is NaN when the test split holds one class (undefined)."""
        pred = (scores >= 0.5).astype(int)
        both = len(np.unique(y_true)) == 2
        return {
            "accuracy": float(accuracy_score(y_true, pred)),
            "precision": float(precision_score(y_true, pred, zero_division=0)),
            "recall": float(recall_score(y_true, pred, zero_division=0)),
            "f1": float(f1_score(y_true, pred, zero_division=0)),
            "roc_auc": float(roc_auc_score(y_true, scores)) if both else math.nan,
            "loss": float(loss),
        }
