"""Time-dependent AUC and integrated Brier score, against scikit-survival and by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import brier_score, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from fedmed.config import load_run_config, parse_run_config
from fedmed.config import resolve_config_path as shipped
from fedmed.errors import ConfigError
from fedmed.tasks import build_model, load_site_data
from fedmed.tasks import survival_metrics as sm
from tests.tasks.test_survival import _run as _survival_study


def _cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer times (so ties happen), ~35 % censored, risk that carries signal plus ties."""
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)  # rounded: tied risks too
    event_time = np.ceil(rng.exponential(100 * np.exp(-0.7 * risk)))
    censor_time = np.ceil(rng.uniform(20, 400, n))
    time = np.minimum(event_time, censor_time)
    return time, (event_time <= censor_time).astype(np.float64), risk


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    t_train, e_train, r_train = _cohort(120, seed=1)
    t_test, e_test, r_test = _cohort(80, seed=2)
    keep = t_test <= t_train.max()  # scikit-survival refuses test times past the train split
    return {
        "t_train": t_train,
        "e_train": e_train,
        "r_train": r_train,
        "t_test": t_test[keep],
        "e_test": e_test[keep],
        "r_test": r_test[keep],
    }


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    return Surv.from_arrays(event=event > 0.5, time=time)


def test_uno_auc_and_its_mean_match_scikit_survival(data: dict[str, np.ndarray]) -> None:
    horizons = np.array([15.0, 40.0, 90.0, 150.0])
    censoring = sm.CensoringWeights(data["t_train"], data["e_train"])

    ours = sm.cumulative_dynamic_auc(
        censoring, data["t_test"], data["e_test"], data["r_test"], horizons
    )
    mean = sm.mean_auc(data["t_test"], data["e_test"], horizons, ours)

    theirs, their_mean = cumulative_dynamic_auc(
        _surv(data["t_train"], data["e_train"]),
        _surv(data["t_test"], data["e_test"]),
        data["r_test"],
        horizons,
    )
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert mean == pytest.approx(their_mean, abs=1e-12)
    assert 0.55 < ours.mean() < 0.95  # the risk carries signal: not a degenerate comparison


def test_breslow_baseline_matches_scikit_survival(data: dict[str, np.ndarray]) -> None:
    at = np.array([0.0, 3.0, 7.0, 30.5, 100.0, data["t_train"].max()])
    ours = sm.breslow_survival(
        data["t_train"], data["e_train"], data["r_train"], np.array([0.0, 0.8]), at
    )

    ref = BreslowEstimator().fit(data["r_train"], data["e_train"] > 0.5, data["t_train"])
    s0 = ref.baseline_survival_(at[2:])  # (it extends its first value back to t = 0)
    np.testing.assert_allclose(ours[0, 2:], s0, rtol=1e-10)
    np.testing.assert_allclose(ours[1, 2:], s0 ** np.exp(0.8), rtol=1e-10)
    # Before the first follow-up time (day 4 here) nobody can have had an event: S = 1.
    assert data["t_train"].min() == 4.0 and (ours[:, :2] == 1.0).all() and ours[0, 2] < 1.0


def test_brier_and_integrated_brier_match_scikit_survival(data: dict[str, np.ndarray]) -> None:
    grid = np.linspace(data["t_test"].min(), 200.0, 57)
    censoring = sm.CensoringWeights(data["t_train"], data["e_train"])
    survival = sm.breslow_survival(
        data["t_train"], data["e_train"], data["r_train"], data["r_test"], grid
    )
    args = (censoring, data["t_test"], data["e_test"], survival, grid)
    train, test = _surv(data["t_train"], data["e_train"]), _surv(data["t_test"], data["e_test"])

    _, theirs = brier_score(train, test, survival, grid)
    np.testing.assert_allclose(sm.brier_scores(*args), theirs, rtol=1e-12)
    ibs = integrated_brier_score(train, test, survival, grid)
    assert sm.integrated_brier_score(*args) == pytest.approx(ibs, rel=1e-12)
    # A model that knows nothing (S = 0.5 everywhere) scores worse than the fitted one.
    assert sm.integrated_brier_score(*args[:3], np.full_like(survival, 0.5), grid) > ibs


def test_tiny_table_by_hand() -> None:
    # Train: censoring at 2 (after the event at 2: events first) and at 4.
    # Reverse KM: at 2, at risk 4 - 1 event = 3, 1 censored -> G = 2/3; at 4: 1 of 1 -> 0.
    t_train, e_train = np.array([1.0, 2.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    censoring = sm.CensoringWeights(t_train, e_train)
    np.testing.assert_allclose(censoring(np.array([0.5, 1.0, 2.0, 3.5])), [1, 1, 2 / 3, 2 / 3])
    # Test: cases by t = 2.5 are the events at 1 (G = 1) and 2 (G = 2/3); controls 3 and 3.5.
    t_test, e_test = np.array([1.0, 2.0, 3.0, 3.5]), np.array([1.0, 1.0, 0.0, 1.0])
    risk = np.array([0.1, 2.0, 1.0, 0.1])  # case@1 ties control 3.5, loses to control 3
    auc = sm.cumulative_dynamic_auc(censoring, t_test, e_test, risk, np.array([2.5]))
    # weighted wins: case@1 weight 1 -> 0.5 (tie) + 0; case@2 weight 1.5 -> 2 wins
    assert auc[0] == pytest.approx((1 * 0.5 + 1.5 * 2) / ((1 + 1.5) * 2))
    # Brier at t = 2.5 with S(2.5|x) = 0.3 for everyone:
    # cases 0.3^2 / 1 and 0.3^2 / (2/3); controls (1 - 0.3)^2 / G(2.5) = 0.49 / (2/3) twice.
    s = np.full((4, 1), 0.3)
    expected = (0.09 + 0.09 * 1.5 + 2 * 0.49 * 1.5) / 4
    bs = sm.brier_scores(censoring, t_test, e_test, s, np.array([2.5]))
    assert bs[0] == pytest.approx(expected)


def test_horizons_past_a_sites_follow_up_are_nan_there() -> None:
    t, e = np.array([10.0, 20.0, 30.0, 40.0]), np.array([1.0, 0.0, 1.0, 1.0])
    y_train = np.column_stack([t, e])
    y_test = np.column_stack([np.array([5.0, 15.0, 25.0]), np.array([1.0, 1.0, 0.0])])
    risk_train, risk_test = np.array([1.0, 0.5, 0.0, -1.0]), np.array([1.0, 0.0, -1.0])

    ok = sm.time_dependent_metrics(y_train, risk_train, y_test, risk_test, (12.0,))
    past = sm.time_dependent_metrics(y_train, risk_train, y_test, risk_test, (12.0, 25.0))
    early = sm.time_dependent_metrics(y_train, risk_train, y_test, risk_test, (3.0,))

    assert ok["auc@12"] == 1.0 and 0 < ok["ibs"] < 1
    # 25 is the last test follow-up time: no patient is still followed after it.
    assert math.isnan(past["auc@25"]) and math.isnan(past["ibs"])
    assert past["auc@12"] == 1.0 and math.isnan(past["auc_mean"])
    assert math.isnan(early["auc@3"])  # no event by day 3 at this site


def test_horizons_are_checked_once_in_the_config() -> None:
    with pytest.raises(ConfigError, match="positive and increasing"):
        parse_run_config(_survival_study({"data.schema.horizons": [365, 180]}))
    with pytest.raises(ConfigError, match="is for task = 'survival'"):
        parse_run_config(
            _survival_study({"task": "tabular-classification", "data.schema.horizons": [1]})
        )


@pytest.mark.parametrize("mode", ["federated", "pooled"])
def test_sites_report_what_scikit_survival_computes_for_the_final_model(
    tmp_path: Path, mode: str
) -> None:
    from fedmed.cli.main import main

    args = ["simulate", "lung", "--quiet", "--mode", mode, "--output-dir", str(tmp_path / "runs")]
    assert main([*args, "--set", "rounds=3"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["sites"]
    cfg = load_run_config(shipped("lung"), ["rounds=3"])
    assert cfg.data.schema.horizons == (180.0, 365.0)  # the shipped study reports them
    if mode == "pooled":
        return _check_keys(final)
    model = build_model(cfg)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    site = cfg.sites[-1]  # inst-other: 34 test patients
    data = load_site_data(cfg, site)
    with torch.no_grad():
        r_train = model(torch.from_numpy(data.x_train)).squeeze(-1).numpy().astype(np.float64)
        r_test = model(torch.from_numpy(data.x_test)).squeeze(-1).numpy().astype(np.float64)
    train = _surv(data.y_train[:, 0], data.y_train[:, 1])
    test = _surv(data.y_test[:, 0], data.y_test[:, 1])
    aucs, _ = cumulative_dynamic_auc(train, test, r_test, [180.0, 365.0])
    grid = np.linspace(0.0, 365.0, sm.IBS_POINTS)
    s0 = BreslowEstimator().fit(r_train, data.y_train[:, 1] > 0.5, data.y_train[:, 0])
    survival = s0.baseline_survival_(grid)[None, :] ** np.exp(r_test)[:, None]
    survival[:, grid < data.y_train[:, 0].min()] = 1.0  # sksurv extends its first step to 0
    censoring = sm.CensoringWeights(data.y_train[:, 0], data.y_train[:, 1])
    ours = sm.brier_scores(censoring, data.y_test[:, 0], data.y_test[:, 1], survival, grid)
    ibs = np.trapezoid(ours, grid) / 365.0
    inside = grid >= data.y_test[:, 0].min()  # scikit-survival's own range check
    _, theirs = brier_score(train, test, survival[:, inside], grid[inside])
    np.testing.assert_allclose(ours[inside], theirs, rtol=1e-12)
    assert final[site.name]["auc@180"] == pytest.approx(aucs[0], abs=1e-6)
    assert final[site.name]["auc@365"] == pytest.approx(aucs[1], abs=1e-6)
    assert final[site.name]["ibs"] == pytest.approx(ibs, abs=1e-6)
    _check_keys(final)


def _check_keys(final: dict) -> None:
    for metrics in final.values():
        assert {"c_index", "auc@180", "auc@365", "auc_mean", "ibs"} <= set(metrics)
    finite = [m["ibs"] for m in final.values() if not math.isnan(m["ibs"])]
    assert finite and all(0 < v < 0.5 for v in finite)
