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

Frozen embedding (model.frozen_embedding = true, either model): the token table is a fixed
random one (``FrozenEmbedding``), drawn from the study's seed and the table's shape alone, so
every site, the coordinator and a served model rebuild the same table bit for bit without it
ever being sent. It is not trained: only the layers after it learn. Why: under DP-SGD every
trained weight gets Gaussian noise at every step, and the bag model's 4,000 x 64 table is 99 %
of its weights while each text touches a few hundred of its rows; ~600 texts per site cannot
pay for that noise (docs/benchmarks.md, "Text"). A fixed table costs no privacy (it depends on
no data), and the mean of its rows over a text is a random projection of the text's token
counts, which a linear head can still read topics from. It is a non-persistent buffer: not in
the state_dict, so it never travels, is never averaged (an average of identical tables is not
always bit-exact, and FedAdam would turn rounding into steps), is never checkpointed and is not
in the weights file; the model card records its seed and SHA-256 instead, and loading a
model checks the rebuilt table against that hash.

No BatchNorm (it mixes examples; DP-SGD refuses it). FedBN keeps the Transformer's LayerNorms
at the sites; the bag model has no normalization layer, so FedBN is refused for it.

Explanations (``token_attributions``): both models also read token EMBEDDINGS with a pooling
weight per token (``from_embeddings``), 1 for a token and 0 for padding. Every weight at 0 pools
to exactly 0, the empty text's pooled state, so integrated gradients can walk continuously from
the empty text to the text, and a text's token attributions add up to
logit(text) - logit(empty text) (up to the quadrature error: ``explain_tokens`` bounds it).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
from typing import Any, ClassVar

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


def masked_mean(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` (texts, tokens, width) over each text's tokens, weighted by ``keep``.

    ``keep`` is 1 for a token and 0 for padding (fractions only on an explanation's path). At
    most one token's worth of weight divides: the empty text pools to exactly 0, and so does a
    text whose tokens all fade to 0, which is what makes that path start at the empty text.
    """
    weight = keep.unsqueeze(-1).to(states.dtype)
    return (states * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


def _keep(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(texts, tokens) 1.0 for a token, 0.0 for padding."""
    return (~_padding(ids)).to(dtype)


def frozen_table(vocabulary: int, width: int, seed: int) -> torch.Tensor:
    """(vocabulary, width) float32 entries drawn from N(0, 1), a pure function of its arguments.

    numpy's legacy RandomState, not torch's or numpy's newer generators: its stream is frozen
    by numpy's compatibility policy (NEP 19), so a model served years later, on another
    machine, rebuilds the very table it was trained with. The seed is hashed with a label so
    the table's draws are not the ones any other use of the study's seed makes. Unit-variance
    entries, not the 1/sqrt(width) of a trained table's init: a text's mean row is then long
    (about 2 at width 256, 9 at 4,096 on the medical abstracts), so the head's per-text
    gradients exceed DP-SGD's clip (max_grad_norm = 1) and every text contributes a full-size,
    clipped direction instead of a small one that the noise would drown.
    """
    return torch.from_numpy(_frozen_draws(vocabulary, width, seed).copy())


@functools.lru_cache(maxsize=4)
def _frozen_draws(vocabulary: int, width: int, seed: int) -> np.ndarray:
    """The draws, made once per process: a site builds its model every round, and 4,000 x
    4,096 normal draws take ~2 s (2-core machine); the copy each model gets, ~20 ms.
    Read-only, so no caller can change what later models get."""
    digest = hashlib.sha256(f"fedmed/frozen-embedding/{seed}".encode()).digest()
    rng = np.random.RandomState(int.from_bytes(digest[:4], "little"))
    draws = rng.standard_normal((vocabulary, width)).astype(np.float32)
    draws.flags.writeable = False
    return draws


class FrozenEmbedding(nn.Module):
    """A fixed token table (``frozen_table``), held as a buffer left out of the state_dict.

    No parameter: optimizers, Opacus (no per-text gradient, no noise), aggregation, checkpoints
    and weight files never see it, and every process that builds the model rebuilds it.
    """

    weight: torch.Tensor

    def __init__(self, vocabulary: int, width: int, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.register_buffer("weight", frozen_table(vocabulary, width, seed), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)

    def mean(self, ids: torch.Tensor) -> torch.Tensor:
        """(texts, width) ``masked_mean`` of each text's rows, summed straight from the table."""
        keep = _keep(ids, self.weight.dtype)
        summed = nn.functional.embedding_bag(ids, self.weight, per_sample_weights=keep, mode="sum")
        return summed / keep.sum(dim=1, keepdim=True).clamp(min=1.0)

    def record(self) -> dict[str, Any]:
        """What the model card says of the table: how to rebuild it, and how to check that."""
        table = self.weight.detach().cpu().contiguous().numpy()
        return {
            "seed": self.seed,
            "shape": list(table.shape),
            "sha256": hashlib.sha256(table.tobytes()).hexdigest(),
        }


def token_embedding(
    vocabulary: int, width: int, cfg: ModelConfig, seed: int
) -> nn.Embedding | FrozenEmbedding:
    """The model's token table: trained (nn.Embedding), or fixed if model.frozen_embedding."""
    if cfg.frozen_embedding:
        return FrozenEmbedding(vocabulary, width, seed)
    return nn.Embedding(vocabulary, width)


def frozen_embedding_of(model: nn.Module) -> FrozenEmbedding | None:
    """The model's frozen token table, if it has one (wrapped by Opacus or not)."""
    return next((m for m in model.modules() if isinstance(m, FrozenEmbedding)), None)


class _TextModel(nn.Module, abc.ABC):
    """Token ids -> embeddings -> ``from_embeddings``, which explanations call directly."""

    embed: nn.Embedding | FrozenEmbedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(ids)
        return self.from_embeddings(tokens, _keep(ids, tokens.dtype))

    @abc.abstractmethod
    def from_embeddings(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits from (texts, tokens, width) embeddings and the 0/1 mask of real tokens."""


class BagOfEmbeddings(_TextModel):
    """Mean of the text's token embeddings -> dropout -> one logit per class."""

    def __init__(self, vocabulary: int, classes: int, cfg: ModelConfig, seed: int) -> None:
        super().__init__()
        width = cfg.hidden[0]
        self.embed = token_embedding(vocabulary, width, cfg, seed)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``from_embeddings`` on the text's embeddings; with a frozen table, without holding
        them all at once: it can be wide (4,096), and (texts, tokens, width) floats would take
        a gigabyte per batch. (A trained table goes through its nn.Embedding module, whose
        per-text gradients Opacus computes.)"""
        if not isinstance(self.embed, FrozenEmbedding):
            return super().forward(ids)
        return self.head(self.dropout(self.embed.mean(ids)))

    def from_embeddings(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The model on token embeddings (texts, tokens, width), each weighted by ``keep``."""
        return self.head(self.dropout(masked_mean(tokens, keep)))


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


class TextTransformer(_TextModel):
    """Token + position embeddings -> encoder layers -> LayerNorm -> mean -> logits."""

    def __init__(
        self, vocabulary: int, classes: int, max_tokens: int, cfg: ModelConfig, seed: int
    ) -> None:
        super().__init__()
        width = cfg.hidden[0]
        self.embed = token_embedding(vocabulary, width, cfg, seed)
        self.position = nn.Embedding(max_tokens, width)
        self.layers = nn.ModuleList(
            EncoderLayer(width, cfg.heads, cfg.dropout) for _ in range(len(cfg.hidden))
        )
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, classes)

    def from_embeddings(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The model on token embeddings (texts, tokens, width), each pooled with weight ``keep``.

        Attention reads every position whose weight is above 0 (its mask does not fade: on an
        explanation's path the pooling weights alone take the text to the empty one).
        """
        # Attention needs one key per text: an all-padding text (nothing left after cleaning)
        # attends to its first position instead of producing NaN.
        keys_pad = keep <= 0
        keys_pad[:, 0] = False
        # Positions per text (not one shared row): Opacus computes per-text gradients from them.
        n, length = keep.shape
        positions = torch.arange(length, device=tokens.device).expand(n, -1)
        x = tokens + self.position(positions)
        for layer in self.layers:
            x = layer(x, keys_pad)
        pooled = masked_mean(self.norm(x), keep)
        return self.head(self.dropout(pooled))


MODELS = ("bag", "transformer")
IG_STEPS = 64  # quadrature points to start with: smooth paths are exact to float32 here
MAX_IG_STEPS = 1024  # a text whose attributions still miss the logit difference is reported
# Attributions are accepted once they add up to logit(text) - logit(empty text) within this
# fraction of max(1, |difference|) (Captum calls the gap the "convergence delta").
COMPLETENESS_TOL = 1e-3


def build_text_model(
    vocabulary: int, classes: int, max_tokens: int, cfg: ModelConfig, *, seed: int
) -> BagOfEmbeddings | TextTransformer:
    """A text model of these sizes: a study builds it from its config, a server from the card.

    ``seed`` (the study's) draws the frozen token table when model.frozen_embedding is set.
    """
    if cfg.kind == "transformer":
        return TextTransformer(vocabulary, classes, max_tokens, cfg, seed)
    return BagOfEmbeddings(vocabulary, classes, cfg, seed)


def token_attributions(
    model: nn.Module, ids: torch.Tensor, target: torch.Tensor, steps: int = IG_STEPS
) -> torch.Tensor:
    """(texts, tokens) integrated gradients of logit ``target`` (per text) from the empty text.

    The path, alpha from 0 to 1: each token's embedding moves in a straight line from [PAD]'s
    embedding to its own, and its pooling weight from 0 to 1; padding stays padding. At alpha = 0
    every weight is 0 and the model pools exactly 0, the empty text's pooled state, so the path
    starts at logit(empty text) and ends at logit(text). A token's attribution is its
    embedding's change dotted with the mean gradient, plus its weight's change (1) times that
    weight's mean gradient: its whole part in moving the logit. Per text they add up to
    logit(text) - logit(empty text) up to the quadrature error; padding gets exactly 0.

    The pooling divides by max(total weight, 1), whose slope jumps where the total reaches one
    token's worth (alpha = 1/n for n tokens); the integral is taken on each side of that point
    (``_ig_grid``), so the quadrature only ever sees a smooth path.
    """
    model.eval()
    with torch.no_grad():
        tokens = model.embed(ids)
        start = model.embed(torch.zeros_like(ids))
    keep = _keep(ids, tokens.dtype)
    delta = tokens - start
    alphas, widths = _ig_grid(keep.sum(dim=1), steps)
    grad_tokens, grad_keep = torch.zeros_like(tokens), torch.zeros_like(keep)
    pick = target.long().reshape(-1, 1)
    for alpha, width in zip(alphas.T, widths.T, strict=True):  # (texts,) per step
        a, w = alpha[:, None], width[:, None]
        point = (start + a[..., None] * delta).requires_grad_(True)
        weight = (a * keep).requires_grad_(True)
        logit = model.from_embeddings(point, weight).gather(1, pick).sum()
        g_tokens, g_keep = torch.autograd.grad(logit, (point, weight))
        grad_tokens += w[..., None] * g_tokens
        grad_keep += w * g_keep
    return (delta * grad_tokens).sum(dim=-1) + keep * grad_keep


def explain_tokens(
    model: nn.Module, ids: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_attributions`` with as many steps as each text needs: (attributions, completeness
    gap = sum - (logit(text) - logit(empty text)), steps used), per text.

    Starts at IG_STEPS and doubles, for the texts whose gap exceeds COMPLETENESS_TOL only, up to
    MAX_IG_STEPS. A trained Transformer's path can hold a sharp turn (attention flipping between
    keys) that a fixed number of points misses by a tenth of a logit (measured); the gap says
    so instead of hiding it.
    """
    with torch.no_grad():
        reached = model(ids).gather(1, target.long().reshape(-1, 1))[:, 0]
        empty = model(torch.zeros_like(ids[:1]))[0, target.long()]
    difference = reached - empty
    attributions = torch.zeros(ids.shape, dtype=difference.dtype)
    gaps = torch.zeros_like(difference)
    used = torch.zeros(len(ids), dtype=torch.long)
    todo = torch.arange(len(ids))
    steps = IG_STEPS
    while len(todo):
        found = token_attributions(model, ids[todo], target[todo], steps)
        attributions[todo] = found
        gaps[todo] = found.sum(dim=1) - difference[todo]
        used[todo] = steps
        short = gaps[todo].abs() > COMPLETENESS_TOL * difference[todo].abs().clamp(min=1.0)
        steps *= 2
        todo = todo[short] if steps <= MAX_IG_STEPS else todo[:0]
    return attributions, gaps, used


def _ig_grid(lengths: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text, ``steps`` points in (0, 1) and their weights (summing to 1): Gauss-Legendre
    nodes on [0, 1/n] (steps // 4) and on [1/n, 1] (the rest), n = the text's tokens; on [0, 1]
    when n <= 1. Gauss-Legendre (Captum's default for integrated gradients) converges far
    faster than midpoints on a smooth path, and the split keeps the pooling's kink at a
    boundary, never inside a cell."""
    kink = 1.0 / lengths.clamp(min=1.0).to(torch.float64)[:, None]
    below = max(1, steps // 4)
    low_x, low_w = _legendre(below)
    high_x, high_w = _legendre(steps - below)
    all_x, all_w = _legendre(steps)
    single = kink >= 1.0  # one token (or none): no kink inside the path
    alphas = torch.where(
        single, all_x[None, :], torch.cat([kink * low_x, kink + (1 - kink) * high_x], dim=1)
    )
    widths = torch.where(
        single, all_w[None, :], torch.cat([kink * low_w, (1 - kink) * high_w], dim=1)
    )
    return alphas.float(), widths.float()


def _legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gauss-Legendre nodes and weights on [0, 1] (float64)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


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
        return build_text_model(
            vocabulary, len(text.classes), text.max_tokens, cfg.model, seed=cfg.seed
        )

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
