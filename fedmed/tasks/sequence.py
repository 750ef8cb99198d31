"""Binary classification of per-patient time series (e.g. ICU mortality) with a GRU or GRU-D.

Input per patient: (bins, 3 x variables) from fedmed.data.series (values carried forward,
observation masks, time since last observation). A GRU reads the bins in order; its last
state goes through dropout to one logit. Loss and metrics are the tabular classifier's.

``model.kind = "grud"`` is GRU-D (Che et al. 2018, "Recurrent Neural Networks for Multivariate
Time Series with Missing Values"): instead of trusting a carried-forward value, it learns per
variable how fast the last observation decays towards the empirical mean (0 here: values are
standardized on the site's train patients) and how fast its hidden state fades while nothing
is observed. It is built from nn.Linear and one small decay module with its own Opacus
per-sample gradient rule, so the same model trains with and without DP-SGD (hooks mode).

Under DP-SGD the GRU must be Opacus' DPGRU: nn.GRU's fused kernel hides the per-example
activations Opacus needs. ``build_model`` builds a plain nn.GRU (fast) and
fedmed.tasks.build_model swaps it for a DPGRU when privacy is enabled (ModuleValidator.fix), so
private studies and their saved models use DPGRU throughout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmed.config import ModelConfig, RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.ensemble import ensemble_of
from fedmed.tasks.tabular import TabularClassification

INPUTS_PER_VARIABLE = 3  # value, mask, delta (fedmed.data.series.CHANNELS)


SUMMARIES = ("observed", "mean", "min", "max", "last")  # per variable, model.summaries


def window_summaries(x: torch.Tensor, n_variables: int) -> torch.Tensor:
    """Per patient and variable over the whole window: share of bins observed, mean, min and
    max of the observed (standardized) values, and the last value carried forward; 0 where a
    variable was never observed (= the train mean). Parameter-free, so DP-SGD is unaffected."""
    value, mask = x[..., :n_variables], x[..., n_variables : 2 * n_variables]
    seen = mask.sum(dim=1)
    any_seen = seen > 0
    far = torch.finfo(x.dtype).max
    lowest = torch.where(mask > 0, value, torch.full_like(value, far)).amin(dim=1)
    highest = torch.where(mask > 0, value, torch.full_like(value, -far)).amax(dim=1)
    parts = (
        seen / x.shape[1],
        (value * mask).sum(dim=1) / seen.clamp(min=1),
        torch.where(any_seen, lowest, torch.zeros_like(lowest)),
        torch.where(any_seen, highest, torch.zeros_like(highest)),
        value[:, -1],
    )
    return torch.cat(parts, dim=1)


class RecurrentClassifier(nn.Module):
    """The output end both recurrent models share: dropout -> one logit from the last state,
    which also reads the window summaries when model.summaries is on (fedmed's parameter names
    head.weight/head.bias stay those of models saved before summaries existed)."""

    def build_head(self, hidden: int, n_variables: int, cfg: ModelConfig) -> None:
        self.n_summarized = n_variables if cfg.summaries else 0
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(hidden + len(SUMMARIES) * self.n_summarized, 1)

    def logit(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.n_summarized:
            state = torch.cat([state, window_summaries(x, self.n_summarized)], dim=1)
        return self.head(self.dropout(state))


class SeriesGRU(RecurrentClassifier):
    """GRU over time bins -> last state -> dropout -> logit."""

    def __init__(self, n_variables: int, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden[0] if cfg.hidden else 32
        self.gru = nn.GRU(INPUTS_PER_VARIABLE * n_variables, hidden, batch_first=True)
        self.build_head(hidden, n_variables, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.logit(out[:, -1], x)


class DiagonalDecay(nn.Module):
    """Per-variable decay rate γ = exp(-relu(w * δ + b)) of GRU-D's input decay.

    Each variable decays on its own (diagonal W_γx in Che et al.), which nn.Linear cannot express
    without a full matrix. forward returns the pre-activation w * δ + b so that Opacus' rule
    (``_decay_grad_sample``) only has to differentiate an affine map.
    """

    def __init__(self, n_variables: int) -> None:
        super().__init__()
        # Small positive rates: relu(0) has no gradient, so w = 0 would never learn to decay.
        self.weight = nn.Parameter(torch.empty(n_variables).uniform_(0.0, 0.1))
        self.bias = nn.Parameter(torch.zeros(n_variables))

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.weight + self.bias


def _decay_grad_sample(
    layer: DiagonalDecay, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-patient gradients of w * δ + b over (patients, bins, variables): sum over bins."""
    delta = activations[0].to(backprops.dtype)
    return {
        layer.weight: torch.einsum("n...v,n...v->nv", backprops, delta),
        layer.bias: torch.einsum("n...v->nv", backprops),
    }


def register_grad_samplers() -> None:
    """Teach Opacus DiagonalDecay's per-sample gradient (idempotent; imports Opacus lazily)."""
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(DiagonalDecay)(_decay_grad_sample)


def last_observed(mask: torch.Tensor) -> torch.Tensor:
    """Per (patient, bin, variable): the index of the last bin BEFORE this one with an
    observation, or -1 if none (GRU-D's s_{t'} for δ_t)."""
    steps = torch.arange(mask.shape[1], device=mask.device).view(1, -1, 1)
    seen_at = torch.where(mask > 0, steps, torch.full_like(steps, -1))
    upto = torch.cummax(seen_at, dim=1).values  # last observation at or before t
    before = torch.cat([torch.full_like(upto[:, :1], -1), upto[:, :-1]], dim=1)
    return before.expand_as(mask)


class SeriesGRUD(RecurrentClassifier):
    """GRU-D: decayed inputs and hidden state from time since last observation -> logit.

    Per bin t, variable d (Che et al. 2018, eqs. 4-5, means = 0 after standardization):
        δ_t    = bins since the last observation before t (t + 1 if none yet)
        γx_t   = exp(-relu(w_d δ_t + b_d))                     input decay, per variable
        x̂_t    = m_t x_t + (1 - m_t) γx_t x_last                x_last: last OBSERVED value
        γh_t   = exp(-relu(W_γh δ_t + b_γh));  h ← γh_t ⊙ h      hidden decay
        h      = GRUCell([x̂_t, m_t], h)
    Only values where the mask is 1 are read: x_last and δ are recomputed here from the value
    and mask channels, so whatever the data layer carried forward cannot leak in.
    """

    def __init__(self, n_variables: int, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden[0] if cfg.hidden else 32
        self.n_variables, self.hidden_size = n_variables, hidden
        self.input_decay = DiagonalDecay(n_variables)
        self.hidden_decay = nn.Linear(n_variables, hidden)
        with torch.no_grad():  # start near "keep the state": 40 variables x up to 48 bins of δ
            self.hidden_decay.weight.mul_(0.01)
            self.hidden_decay.bias.zero_()
        self.ih = nn.Linear(2 * n_variables, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        bound = 1 / math.sqrt(hidden)  # nn.GRU's initialization
        for p in (*self.ih.parameters(), *self.hh.parameters()):
            nn.init.uniform_(p, -bound, bound)
        self.build_head(hidden, n_variables, cfg)
        register_grad_samplers()

    def decayed_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̂, mask, δ) from the (value, mask, delta) channels; the delta channel is unused."""
        value, mask = x[..., : self.n_variables], x[..., self.n_variables : 2 * self.n_variables]
        before = last_observed(mask)
        steps = torch.arange(x.shape[1], device=x.device, dtype=x.dtype).view(1, -1, 1)
        delta = steps - before.to(x.dtype)  # = t + 1 when nothing was observed before t
        observed = value * mask
        x_last = torch.gather(observed, 1, before.clamp(min=0)) * (before >= 0).to(x.dtype)
        gamma_x = torch.exp(-torch.relu(self.input_decay(delta)))
        x_hat = mask * value + (1 - mask) * gamma_x * x_last
        return x_hat, mask, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat, mask, delta = self.decayed_inputs(x)
        gamma_h = torch.exp(-torch.relu(self.hidden_decay(delta)))
        gates_x = self.ih(torch.cat([x_hat, mask], dim=2))  # all bins at once: one hook call
        h = x.new_zeros(x.shape[0], self.hidden_size)
        for t in range(x.shape[1]):
            h = gamma_h[:, t] * h
            r_x, z_x, n_x = gates_x[:, t].chunk(3, dim=1)
            r_h, z_h, n_h = self.hh(h).chunk(3, dim=1)
            r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
            h = (1 - z) * torch.tanh(n_x + r * n_h) + z * h
        return self.logit(h, x)


MODELS = {"gru": SeriesGRU, "grud": SeriesGRUD}


class SequenceClassification(TabularClassification):
    name = "sequence-classification"
    target = "series"

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.kind not in MODELS:
            raise ConfigError(
                f"task 'sequence-classification' trains a recurrent model; set model.kind to "
                f"one of {', '.join(sorted(MODELS))} (got '{cfg.model.kind}') and model.hidden "
                "= [state size], e.g. [64]"
            )
        series = cfg.data.series
        if series.bin_minutes <= 0 or series.hours <= 0:
            raise ConfigError("data.series.hours and data.series.bin_minutes must be > 0")
        n = len(cfg.data.schema.features)
        if (series.mean or series.std) and not len(series.mean) == len(series.std) == n:
            raise ConfigError(
                f"data.series.mean and data.series.std need one value per feature ({n}); got "
                f"{len(series.mean)} and {len(series.std)}; or leave both out"
            )
        if any(sd <= 0 for sd in series.std):
            raise ConfigError("data.series.std values must be > 0")
        if series.standardize == "consortium" and cfg.strategy.secure_aggregation:
            raise ConfigError(
                "data.series.standardize = 'consortium' needs a statistics exchange before "
                "round 1, which Flower's SecAgg+ path cannot carry; use standardize = 'site' or "
                "write the agreed reference in data.series.mean/std"
            )
        unknown = [v for v in series.log_variables if v not in cfg.data.schema.features]
        if unknown:
            raise ConfigError(
                f"data.series.log_variables names '{unknown[0]}', which is not one of "
                "data.schema.features; list only variables the model reads"
            )

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        return ensemble_of(lambda: MODELS[cfg.kind](n_inputs, cfg), cfg)
