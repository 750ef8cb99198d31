"""Survival from a clinical table: Cox proportional hazards, linear or an MLP (DeepSurv-style).

The model outputs one number per patient, the log relative hazard (risk; higher = earlier
event). Training minimizes the negative Cox partial log-likelihood with Efron's correction for
tied event times; censored patients contribute only through the risk sets they belong to.

Risk sets are formed within each minibatch (as DeepSurv and most deep-survival code do): with a
batch that holds a whole site's train split it is the exact Cox likelihood of that site; with
smaller batches it is a stochastic approximation whose risk sets are subsets of the true ones.
Pick ``train.batch_size`` >= the sites' train rows when the sites are small (as lung's are).

Local DP-SGD is refused: the partial likelihood couples every patient in a batch (each risk set
sums over the others), so one patient changes the gradient terms of the others too. Opacus
clips each patient's term, but that no longer bounds one patient's influence on the update, and
the ε its accountant prints would not hold. Site-level DP at the coordinator
(``privacy.central``) clips and noises whole site updates and does not depend on that, so it is
allowed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedmed.config import ModelConfig, RunConfig
from fedmed.errors import ConfigError
from fedmed.tasks.survival_metrics import time_dependent_metrics
from fedmed.tasks.tabular import mlp, study_inputs

METRICS = ("c_index", "loss")
C_INDEX_CHUNK = 1024  # rows per block of the pairwise comparison (bounds memory at n x 1024)

DP_REFUSED = (
    "task 'survival' cannot use local DP-SGD (privacy.enabled): the Cox partial likelihood "
    "couples the patients of a batch, so per-patient clipping does not bound one patient's "
    "influence and the ε Opacus reports would not hold; use site-level DP instead "
    "(privacy.central = 'client-side' or 'server-side') or set privacy.enabled = false"
)


def cox_partial_nll(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Efron ties) of one batch, divided by its size.

    For the d events tied at time t, with R the patients still at risk at t and D the tied
    events, Efron's term is sum_{i in D} risk_i - sum_{l=0}^{d-1} log(S_R - (l/d) S_D), where
    S_X = sum_{j in X} exp(risk_j). Each tied event i takes one l (its rank among the tied
    events), so the sum runs over rows. Without ties this is Breslow's (= the exact) likelihood.
    Dividing by the batch size (not the event count) keeps a batch without events at 0 and
    matches lifelines' log-likelihood / n on a full batch.
    """
    n = risk.shape[0]
    if n == 0:  # an empty batch: no information, a zero gradient
        return risk.sum() * 0.0
    shift = risk.detach().max()
    weight = torch.exp(risk - shift)
    is_event = event > 0.5
    same_time = time.unsqueeze(1) == time.unsqueeze(0)  # [i, j]
    at_risk = (time.unsqueeze(0) >= time.unsqueeze(1)).to(weight.dtype)  # j at risk at t_i
    tied = (same_time & is_event.unsqueeze(0)).to(weight.dtype)  # j an event at t_i
    earlier = torch.ones(n, n, dtype=torch.bool, device=risk.device).tril(diagonal=-1)
    rank = (tied.bool() & earlier).sum(dim=1).to(weight.dtype)  # l_i among the tied events
    n_tied = tied.sum(dim=1).clamp(min=1.0)
    denominator = at_risk @ weight - (rank / n_tied) * (tied @ weight)
    log_lik = torch.where(is_event, (risk - shift) - torch.log(denominator), 0.0)
    return -log_lik.sum() / n


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs, the share ordered correctly by risk (ties = 1/2).

    A pair (i, j) is comparable when i had the event before j left the study (t_i < t_j), or
    at the same time as j was censored; pairs of tied events are not comparable (lifelines'
    convention). Higher risk must mean the earlier event. NaN when no pair is comparable.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event) > 0.5
    risk = np.asarray(risk, dtype=np.float64)
    pairs = concordant = 0.0
    for start in range(0, len(time), C_INDEX_CHUNK):
        rows = slice(start, start + C_INDEX_CHUNK)
        t_i, e_i, r_i = time[rows, None], event[rows, None], risk[rows, None]
        comparable = e_i & ((t_i < time) | ((t_i == time) & ~event))
        pairs += comparable.sum()
        concordant += (comparable & (r_i > risk)).sum() + 0.5 * (comparable & (r_i == risk)).sum()
    return float(concordant / pairs) if pairs else float("nan")


class Survival:
    name = "survival"
    target = "survival"
    metrics = METRICS
    prediction_fields: ClassVar[dict[str, type]] = {
        "log_hazard_ratio": float,
        "hazard_ratio": float,
    }
    prediction_doc = (
        "Hazard ratio relative to the reference patient (the all-zero model input: numeric "
        "covariates at the training mean, categorical ones at their first level); explanations "
        "are in log-hazard units and add up to log_hazard_ratio"
    )

    def check(self, cfg: RunConfig) -> None:
        schema = cfg.data.schema
        if not schema.time or not schema.event:
            raise ConfigError(
                "task 'survival' needs data.schema.time (the follow-up time column) and "
                "data.schema.event (the event indicator column)"
            )
        if schema.event_value == schema.censored_value:
            raise ConfigError(
                f"data.schema.event_value and censored_value are both {schema.event_value!r}; "
                "give the event and the censoring different codes"
            )
        if cfg.model.kind == "logreg":
            raise ConfigError(
                "model.kind='logreg' is logistic regression; for survival use 'linear' (Cox "
                "proportional hazards) or 'mlp' (a DeepSurv-style network)"
            )
        if cfg.privacy.enabled:
            raise ConfigError(DP_REFUSED)
        if cfg.model.members > 1:
            raise ConfigError(
                "model.members > 1 (an ensemble) is for the classification tasks; a Cox model's "
                "risk scores are only defined up to a constant per member, so their mean is not "
                "one model's score: set model.members = 1"
            )

    def build_model(self, n_inputs: int, cfg: ModelConfig) -> nn.Module:
        # No output bias: a constant cancels from every risk set, so it would never be learned.
        return mlp(n_inputs, cfg, bias_out=False)

    def build_for(self, cfg: RunConfig) -> nn.Module:
        return self.build_model(study_inputs(cfg), cfg.model)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cox_partial_nll(output.squeeze(-1), target[:, 0], target[:, 1])

    def scores(self, output: torch.Tensor) -> np.ndarray:
        return output.squeeze(-1).detach().cpu().numpy()

    def predictions(self, scores: np.ndarray, reference: float) -> dict[str, np.ndarray]:
        """A Cox model identifies risk only up to a constant: report it relative to a patient."""
        log_hr = scores - reference
        return {"log_hazard_ratio": log_hr, "hazard_ratio": np.exp(log_hr)}

    def horizon_metrics(
        self,
        y_train: np.ndarray,
        train_scores: np.ndarray,
        y_test: np.ndarray,
        test_scores: np.ndarray,
        horizons: tuple[float, ...],
    ) -> dict[str, float]:
        """Uno's AUC at each horizon and the integrated Brier score (survival_metrics)."""
        return time_dependent_metrics(y_train, train_scores, y_test, test_scores, horizons)

    def evaluate(self, y_true: np.ndarray, scores: np.ndarray, loss: float) -> dict[str, float]:
        """Harrell's C on the site's test split (NaN when it holds no comparable pair)."""
        return {
            "c_index": concordance_index(y_true[:, 0], y_true[:, 1], scores),
            "loss": float(loss),
        }
