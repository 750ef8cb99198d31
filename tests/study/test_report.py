"""metrics.json / metrics.png: averages say which sites they cover; plots stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmed.cli.display import _print_summary
from fedmed.study.history import RunHistory
from fedmed.study.outputs import write_metrics
from fedmed.tasks import get_task

SITES = ("st-marys", "riverside", "lakeview")


def _history_with_a_one_class_site() -> RunHistory:
    """riverside's test split holds one class, so the task gives it ROC-AUC NaN (undefined)."""
    task = get_task("tabular-classification")
    rng = np.random.default_rng(0)
    history = RunHistory(sites=SITES)
    for site in SITES:
        y = np.ones(20) if site == "riverside" else rng.integers(0, 2, 20).astype(float)
        scores = rng.uniform(size=20)
        history.record(1, "evaluate", site, {**task.evaluate(y, scores, loss=0.5)})
    return history


def test_averages_record_which_sites_they_cover(tmp_path: Path) -> None:
    header = {"name": "cov", "mode": "federated", "config": {"task": "tabular-classification"}}

    payload = write_metrics(tmp_path, _history_with_a_one_class_site(), header)

    saved = json.loads((tmp_path / "metrics.json").read_text())
    final = saved["final"]
    assert final["sites"]["riverside"]["roc_auc"] is None
    coverage = final["average_coverage"]
    assert coverage["sites"] == 3
    assert coverage["missing"] == {"roc_auc": ["riverside"]}
    assert coverage["covered"]["roc_auc"] == 2 and coverage["covered"]["accuracy"] == 3
    assert saved["history"][0]["average_coverage"] == coverage  # per round as well
    expected = np.mean([final["sites"][s]["roc_auc"] for s in ("st-marys", "lakeview")])
    assert final["average"]["roc_auc"] == pytest.approx(expected)
    assert payload["final"]["average_coverage"] == coverage


def test_a_site_absent_from_the_round_is_missing_from_every_average() -> None:
    history = RunHistory(sites=SITES)
    history.record(1, "evaluate", "st-marys", {"accuracy": 0.8, "num-examples": 10.0})

    coverage = history.average_coverage(1)

    assert coverage == {
        "sites": 3,
        "covered": {"accuracy": 1},
        "missing": {"accuracy": ["riverside", "lakeview"]},
    }


def test_the_console_summary_says_average_of_n_of_m_sites(tmp_path: Path, capsys) -> None:
    header = {"name": "cov", "mode": "federated", "config": {"task": "tabular-classification"}}
    payload = write_metrics(tmp_path, _history_with_a_one_class_site(), header)

    _print_summary(payload)  # as `fedmed simulate` does, NaN and all

    out = capsys.readouterr().out
    assert "roc_auc: average of 2/3 sites (no value from riverside)" in out
    assert "accuracy: average" not in out  # covered by every site: nothing to say


def _many_sites(n: int, rounds: int = 4) -> RunHistory:
    """``n`` sites; site-007 is the worst by accuracy, site-042 by loss, site-099 spends most ε."""
    sites = tuple(f"site-{i:03d}" for i in range(n))
    history = RunHistory(sites=sites)
    for rnd in range(1, rounds + 1):
        for i, site in enumerate(sites):
            accuracy = 0.2 if site == "site-007" else 0.6 + 0.003 * i
            loss = 3.0 if site == "site-042" else 0.5 + 0.001 * i
            history.record(rnd, "train", site, {"epsilon": 0.1 * rnd * (1 + i / n)})
            history.record(
                rnd, "evaluate", site, {"accuracy": accuracy, "loss": loss, "num-examples": 30.0}
            )
    return history


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_metrics_png_of_a_100_site_study_draws_a_band_and_the_worst_sites(tmp_path: Path) -> None:
    from fedmed.study.outputs import plot_history

    fig = plot_history(_many_sites(100), tmp_path / "metrics.png", title="many")

    assert (tmp_path / "metrics.png").stat().st_size > 1000
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert set(by_title) == {"accuracy", "loss", "ε spent"}
    for ax in fig.axes:
        assert len(ax.get_lines()) <= 8, ax.get_title()
        assert len(ax.collections) == 1  # the min–max band
    assert "worst: site-007" in _labels(by_title["accuracy"])
    assert "average" in _labels(by_title["accuracy"])
    assert "worst: site-042" in _labels(by_title["loss"])  # higher loss is worse
    assert "worst: site-099" in _labels(by_title["ε spent"])  # most ε spent is worst
    assert "worst: site-099" not in _labels(by_title["accuracy"])  # the best accuracy


def test_write_metrics_of_a_100_site_study_writes_the_png(tmp_path: Path) -> None:
    write_metrics(tmp_path, _many_sites(100), {"name": "many", "mode": "federated"})

    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_a_few_sites_keep_one_line_each(tmp_path: Path) -> None:
    from fedmed.study.outputs import plot_history

    fig = plot_history(_many_sites(5), tmp_path / "metrics.png")

    accuracy = next(ax for ax in fig.axes if ax.get_title() == "accuracy")
    assert _labels(accuracy) == [*(f"site-{i:03d}" for i in range(5)), "average"]


def test_a_study_without_dp_has_no_epsilon_panel(tmp_path: Path) -> None:
    from fedmed.study.outputs import plot_history

    history = RunHistory(sites=("a", "b"))
    for site in history.sites:  # what a site without DP reports: ε = 0
        history.record(1, "train", site, {"epsilon": 0.0, "epsilon_total": 0.0})
        history.record(1, "evaluate", site, {"accuracy": 0.7, "num-examples": 10.0})

    fig = plot_history(history, tmp_path / "metrics.png")

    assert [ax.get_title() for ax in fig.axes] == ["accuracy"]
