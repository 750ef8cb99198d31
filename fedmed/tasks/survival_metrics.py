"""Time-dependent survival metrics for one site: Uno's cumulative/dynamic AUC and the IBS.

Harrell's C ranks patients over the whole follow-up; clinicians ask narrower questions ("who
dies within a year?") and want calibrated survival curves, not only a ranking. Both need
inverse-probability-of-censoring weights (IPCW): a patient censored early says nothing about a
later horizon, so the patients still observed stand in for them. Here:

- the censoring distribution G(t) = P(C > t) is the Kaplan-Meier estimate on the site's TRAIN
  split with the event/censoring roles swapped (at tied times events come first, so a patient
  censored at t is still "at risk of censoring" there; scikit-survival's convention);
- survival curves are S(t | x) = S0(t) ** exp(risk(x)), with S0 = exp(-H0) and H0 Breslow's
  baseline cumulative hazard fitted on the site's train split with the model's own risks.

Definitions follow scikit-survival 0.28 (``cumulative_dynamic_auc``, ``brier_score``,
``integrated_brier_score``), against which the tests check these functions. Where a metric is
undefined at a site (a horizon past its test follow-up, no event before the horizon, G beyond
the train split's last time), it is NaN, like ROC-AUC on a one-class split: sites run one
plan, and one site's short follow-up must not fail the others.
"""

from __future__ import annotations

import math

import numpy as np

IBS_POINTS = 101  # trapezoid grid on [0, tau] for the integrated Brier score


def kaplan_meier(
    time: np.ndarray, event: np.ndarray, *, censoring: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Unique times and the KM survival just after each (of the event, or of censoring).

    With ``censoring`` the censored patients are the "events" and the patients with an event
    at a time leave the risk set before those censored then (events come first).
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event) > 0.5
    unique, inverse = np.unique(time, return_inverse=True)
    n_events = np.bincount(inverse, weights=event, minlength=len(unique))
    n_total = np.bincount(inverse, minlength=len(unique)).astype(np.float64)
    at_risk = n_total[::-1].cumsum()[::-1]  # still followed at each unique time
    if censoring:
        at_risk = at_risk - n_events
        n_events = n_total - n_events
    ratio = np.divide(n_events, at_risk, out=np.zeros_like(at_risk), where=n_events > 0)
    return unique, np.cumprod(1.0 - ratio)


def step(times: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A right-continuous step function (1 before the first time) evaluated at ``at``."""
    idx = np.searchsorted(times, np.asarray(at, dtype=np.float64), side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], 1.0)


class CensoringWeights:
    """G(t), the train split's censoring survival; undefined after its last follow-up time."""

    def __init__(self, train_time: np.ndarray, train_event: np.ndarray) -> None:
        self.times, self.values = kaplan_meier(train_time, train_event, censoring=True)
        self.last = float(self.times[-1])

    def covers(self, t: float) -> bool:
        """Whether G is known at t (KM says nothing after the last observed time)."""
        return t <= self.last or self.values[-1] == 0.0

    def __call__(self, at: np.ndarray) -> np.ndarray:
        return step(self.times, self.values, at)


def breslow_survival(
    train_time: np.ndarray,
    train_event: np.ndarray,
    train_risk: np.ndarray,
    risk: np.ndarray,
    at: np.ndarray,
) -> np.ndarray:
    """S(t | x) = exp(-H0(t) exp(risk)) for each patient (rows) and time in ``at`` (columns).

    H0 is Breslow's estimator: at each distinct train event time u, the events there divided by
    the sum of exp(risk) over the train patients still followed at u. Risks are shifted by the
    train maximum first (it cancels: H0 scales by exp(shift), exp(risk) by exp(-shift)).
    """
    train_time = np.asarray(train_time, dtype=np.float64)
    train_event = np.asarray(train_event) > 0.5
    shift = float(np.max(train_risk))
    weight = np.exp(np.asarray(train_risk, dtype=np.float64) - shift)
    event_times = np.unique(train_time[train_event])
    at_risk = np.array([weight[train_time >= u].sum() for u in event_times])
    deaths = np.array([np.sum(train_event & (train_time == u)) for u in event_times])
    cumulative = np.cumsum(deaths / at_risk)
    h0 = np.concatenate([[0.0], cumulative])[
        np.searchsorted(event_times, np.asarray(at, dtype=np.float64), side="right")
    ]
    relative = np.exp(np.asarray(risk, dtype=np.float64) - shift)
    return np.exp(-np.outer(relative, h0))


def cumulative_dynamic_auc(
    censoring: CensoringWeights,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    horizons: np.ndarray,
) -> np.ndarray:
    """Uno's IPCW AUC(t): P(risk_i > risk_j | T_i <= t with an event, T_j > t), ties count 1/2.

    Cases (an event by t) are weighted by 1 / G(T_i); controls (still event-free after t)
    count 1 each. NaN at a horizon without cases or controls, or where G is unknown or 0.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event) > 0.5
    risk = np.asarray(risk, dtype=np.float64)
    out = np.full(len(horizons), math.nan)
    for k, t in enumerate(horizons):
        cases = event & (time <= t)
        controls = time > t
        if not cases.any() or not controls.any() or not censoring.covers(t):
            continue
        g = censoring(time[cases])
        if (g == 0).any():
            continue
        r_case, r_control = risk[cases, None], risk[None, controls]
        wins = (r_case > r_control).sum(axis=1) + 0.5 * (r_case == r_control).sum(axis=1)
        out[k] = float(np.sum(wins / g) / (np.sum(1.0 / g) * controls.sum()))
    return out


def mean_auc(time: np.ndarray, event: np.ndarray, horizons: np.ndarray, aucs: np.ndarray) -> float:
    """AUC(t) averaged over the horizons, weighted by the test split's KM drop at each one.

    scikit-survival's ``mean_auc``: sum_k AUC(t_k) (S(t_{k-1}) - S(t_k)) / (1 - S(t_last)).
    """
    if len(horizons) == 1:
        return float(aucs[0])
    surv = step(*kaplan_meier(time, event), horizons)
    drop = -np.diff(np.concatenate([[1.0], surv]))
    total = 1.0 - surv[-1]
    return float(np.sum(aucs * drop) / total) if total > 0 else math.nan


def brier_scores(
    censoring: CensoringWeights,
    time: np.ndarray,
    event: np.ndarray,
    survival: np.ndarray,
    at: np.ndarray,
) -> np.ndarray:
    """Graf's IPCW Brier score at each time in ``at``; ``survival`` is (patients, len(at)).

    A patient with an event by t contributes S(t|x)^2 / G(T_i), one still followed after t
    contributes (1 - S(t|x))^2 / G(t), one censored by t contributes 0; mean over all patients.
    A zero G gives that term weight 0 (scikit-survival's convention).
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event) > 0.5
    with np.errstate(divide="ignore"):
        inv_g_time = np.where((g := censoring(time)) > 0, 1.0 / g, 0.0)
        inv_g_at = np.where((g_at := censoring(at)) > 0, 1.0 / g_at, 0.0)
    cases = (time[:, None] <= at[None, :]) & event[:, None]
    controls = time[:, None] > at[None, :]
    terms = survival**2 * cases * inv_g_time[:, None] + (1 - survival) ** 2 * controls * inv_g_at
    return terms.mean(axis=0)


def integrated_brier_score(
    censoring: CensoringWeights,
    time: np.ndarray,
    event: np.ndarray,
    survival: np.ndarray,
    at: np.ndarray,
) -> float:
    """The Brier score integrated over ``at`` (trapezoid rule), divided by its length."""
    scores = brier_scores(censoring, time, event, survival, at)
    return float(np.trapezoid(scores, at) / (at[-1] - at[0]))


def time_dependent_metrics(
    y_train: np.ndarray,
    train_risk: np.ndarray,
    y_test: np.ndarray,
    test_risk: np.ndarray,
    horizons: tuple[float, ...],
) -> dict[str, float]:
    """``auc@<h>`` per horizon, ``auc_mean`` and ``ibs`` over [0, max horizon] for one site.

    ``y_*`` are (time, event) rows, ``*_risk`` the model's log relative hazards. Computed at
    the site from its own splits; only these numbers leave it.
    """
    t_train, e_train = y_train[:, 0], y_train[:, 1]
    t_test, e_test = y_test[:, 0], y_test[:, 1]
    points = np.asarray(horizons, dtype=np.float64)
    censoring = CensoringWeights(t_train, e_train)
    aucs = cumulative_dynamic_auc(censoring, t_test, e_test, test_risk, points)
    out = {f"auc@{h:g}": float(a) for h, a in zip(horizons, aucs, strict=True)}
    out["auc_mean"] = mean_auc(t_test, e_test, points, aucs)
    tau = float(points[-1])
    if tau < t_test.max() and censoring.covers(tau) and (e_train > 0.5).any():
        grid = np.linspace(0.0, tau, IBS_POINTS)
        survival = breslow_survival(t_train, e_train, train_risk, test_risk, grid)
        out["ibs"] = integrated_brier_score(censoring, t_test, e_test, survival, grid)
    else:  # past this site's follow-up: undefined here (see the module docstring)
        out["ibs"] = math.nan
    return out
