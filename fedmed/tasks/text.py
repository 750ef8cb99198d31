"""Multi-class (or binary) classification of free text: a bag of embeddings or a small Transformer.

Input per text: data.text.max_tokens token ids from the study's vocabulary (fedmed.data.text),
0 = padding; the mask is derived from the ids, so a model's whole interface is
``ids (texts, tokens) -> logits (texts, classes)`` and a served model can be fed raw text
through the saved tokenizer. One logit per declared class (data.text.classes), softmax
cross-entropy; two classes are the binary case of the same model.

Models (model.kind), both trainable by Opacus' DP-SGD:

- ``bag``: token embeddings (width model.hidden[0]) averaged over the text's tokens, dropout,
  a linear layer. Fast, and a strong baseline for topic-like labels.
- ``transformer``: token + position embeddings, one pre-norm encoder layer per model.hidden
  entry (attention with model.heads heads, a 2x-wide GELU feed-forward, LayerNorm), a final
  LayerNorm, the mean over the text's tokens, dropout, a linear layer. Built with
  nn.MultiheadAttention (its fused kernel); under DP fedmed.tasks.build_model swaps it for
  Opacus' DPMultiheadAttention (ModuleValidator.fix), whose per-example gradients Opacus can
  compute, as the sequence task does with its GRU.

No BatchNorm (it mixes examples; DP-SGD refuses it). FedBN keeps the Transformer's LayerNorms
at the sites; the bag model has no normalization layer, so FedBN is refused for it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

from fedmed.config import ModelConfig, RunConfig
from fedmed.errors import ConfigError

METRICS = ("accuracy", "macro_f1", "roc_auc", "loss")


def _padding(ids: torch.Tensor) -> torch.Tensor:
    """(texts, tokens) True where a token is padding (id 0)."""
    return ids == 0


def masked_mean(states: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` (texts, tokens, width) over each text's real tokens."""
    keep = (~pad).unsqueeze(-1).to(states.dtype)
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class BagOfEmbeddings(nn.Module):
    """Mean of the text's token embeddings -> dropout -> one logit per class."""

    def __init__(self, vocabulary: int, classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.hidden[0]
        self.embed = nn.Embedding(vocabulary, width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(self.embed(ids), _padding(ids))
        return self.head(self.dropout(pooled))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + attention(LN(x)), then x + FF(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff_norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        attended, _ = self.attention(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.ff_norm(x)))


class TextTransformer(nn.Module):
    """Token + position embeddings -> encoder layers -> LayerNorm -> mean -> logits."""

    def __init__(self, vocabulary: int, classes: int, max_tokens: int, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.hidden[0]
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(max_tokens, width)
        self.layers = nn.ModuleList(
            EncoderLayer(width, cfg.heads, cfg.dropout) for _ in range(len(cfg.hidden))
        )
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = _padding(ids)
        # Attention needs one key per text: an all-padding text (nothing left after cleaning)
        # attends to its first position instead of producing NaN.
        keys_pad = pad.clone()
        keys_pad[:, 0] = False
        # Positions per text (not one shared row): Opacus computes per-text gradients from them.
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.embed(ids) + self.position(positions)
        for layer in self.layers:
            x = layer(x, keys_pad)
        pooled = masked_mean(self.norm(x), pad)
        return self.head(self.dropout(pooled))


MODELS = ("bag", "transformer")


def macro_roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """One-vs-rest ROC-AUC, averaged over the classes this split holds with some texts outside.

    NaN when no class qualifies (a split of one class), like the binary tasks' ROC-AUC. With two
    classes both one-vs-rest AUCs are the binary AUC of class 1.
    """
    aucs = []
    for c in range(probabilities.shape[1]):
        positive = y_true == c
        if positive.any() and not positive.all():
            aucs.append(roc_auc_score(positive, probabilities[:, c]))
    return float(np.mean(aucs)) if aucs else math.nan


class TextClassification:
    name = "text-classification"
    target = "text"
    metrics = METRICS
    prediction_fields: ClassVar[dict[str, type]] = {"label": int, "probability": float}
    prediction_doc = (
        "The most probable class (label: its index in data.text.classes) and its probability"
    )

    def check(self, cfg: RunConfig) -> None:
        model, text, schema = cfg.model, cfg.data.text, cfg.data.schema
        if schema.time or schema.event:
            raise ConfigError(
                "data.schema.time/event describe a survival outcome, which task = "
                "'text-classification' has not; remove them (the label is data.schema.target)"
            )
        if schema.positive_above is not None:
            raise ConfigError(
                "data.schema.positive_above makes a binary label from a number; a text study "
                "declares its labels instead: remove it and list them in data.text.classes"
            )
        if model.kind not in MODELS:
            raise ConfigError(
                f"task 'text-classification' trains model.kind 'bag' or 'transformer' (got "
                f"'{model.kind}'); set model.kind and model.hidden (e.g. [64], or [64, 64] for "
                "two Transformer layers)"
            )
        if not model.hidden:
            raise ConfigError("model.hidden is empty; give the embedding width, e.g. [64]")
        if model.kind == "transformer":
            if len(set(model.hidden)) != 1:
                raise ConfigError(
                    f"model.hidden = {list(model.hidden)}: a Transformer's layers share one "
                    f"width (residual connections); use e.g. [{model.hidden[0]}] * layers"
                )
            if model.heads < 1 or model.hidden[0] % model.heads:
                raise ConfigError(
                    f"model.heads = {model.heads} must divide model.hidden[0] = "
                    f"{model.hidden[0]}; e.g. heads = 2 or 4 with width 64"
                )
        if model.members != 1:
            raise ConfigError(
                "model.members > 1 (an ensemble) is built for one-logit tasks; text models "
                "give one logit per class: set model.members = 1"
            )
        if len(text.classes) < 2 or len(set(map(str, text.classes))) != len(text.classes):
            raise ConfigError(
                f"data.text.classes = {list(text.classes)}: declare the label values, at least "
                "two and each once, in the order of the model's outputs (e.g. [1, 2, 3, 4, 5])"
            )
        if cfg.strategy.secure_aggregation and not text.vocabulary:
            raise ConfigError(
                "the text vocabulary is built from the sites' word counts before round 1, which "
                "Flower's SecAgg+ path cannot carry; write an agreed vocabulary in "
                "data.text.vocabulary or set strategy.secure_aggregation = false"
            )

    def build_for(self, cfg: RunConfig) -> nn.Module:
        """The study's model: sizes come from its vocabulary, classes and token length."""
        vocabulary, text = len(cfg.data.text.vocabulary), cfg.data.text
        if not vocabulary:
            raise ConfigError(
                "the text model is sized by data.text.vocabulary, which is empty; the study "
                "builds it from the sites' word counts before round 1 (fedmed simulate / run)"
            )
        if cfg.model.kind == "transformer":
            return TextTransformer(vocabulary, len(text.classes), text.max_tokens, cfg.model)
        return BagOfEmbeddings(vocabulary, len(text.classes), cfg.model)

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        """Not enough to size a text model (classes, token length): use ``build_for``."""
        raise ConfigError(
            "a text model is built from the whole study (vocabulary, classes, max_tokens): "
            "call fedmed.tasks.build_model(cfg)"
        )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target.long())

    def scores(self, output: torch.Tensor) -> np.ndarray:
        """Class probabilities, (texts, classes)."""
        return torch.softmax(output, dim=-1).detach().cpu().numpy()

    def predictions(self, scores: np.ndarray, reference: float) -> dict[str, np.ndarray]:
        """Probabilities are absolute: ``reference`` is not needed."""
        return {"label": scores.argmax(axis=1), "probability": scores.max(axis=1)}

    def evaluate(self, y_true: np.ndarray, scores: np.ndarray, loss: float) -> dict[str, float]:
        """Accuracy; F1 averaged over the classes the split holds (macro); one-vs-rest AUC."""
        y = y_true.astype(np.int64)
        pred = scores.argmax(axis=1)
        present = np.unique(y)
        return {
            "accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
            "roc_auc": macro_roc_auc(y, scores),
            "loss": float(loss),
        }
