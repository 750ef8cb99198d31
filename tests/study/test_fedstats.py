"""Pooling what the sites sent: shared edges, quantiles, Kaplan-Meier, partial cells."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.data.summary import COARSE_EDGES, cells_of
from fedmed.study.fedstats import imputed, kaplan_meier, pool, quantiles, shared_edges
from tests.coordinator.test_stats import _study


def test_pooled_cells_say_how_many_sites_suppressed_them() -> None:
    total, hidden = pool([[0, None, 12], [5, 11, None]])

    assert total == [5, 11, 12] and hidden == [0, 1, 1]


def test_quantiles_interpolate_within_bins_and_stop_at_the_open_tails() -> None:
    edges = [0.0, 10.0, 20.0, 30.0, 40.0]
    counts = [0, 25, 25, 25, 25, 0]  # uniform on [0, 40)

    q = quantiles(counts, edges)

    assert q == pytest.approx({"q05": 2.0, "q25": 10.0, "q50": 20.0, "q75": 30.0, "q95": 38.0})
    assert quantiles([10, 80, 0, 0, 0, 10], edges)["q05"] is None  # in the lower tail


def test_a_suppressed_cell_is_imputed_from_the_sites_published_total() -> None:
    assert imputed([20, None, None, 30], 60, 10) == [20.0, 5.0, 5.0, 30.0]
    assert imputed([20, None], None, 10) == [20.0, 5.0]  # total unknown: min_cell / 2


def test_shared_edges_come_from_pooled_coarse_cells_only(tmp_path) -> None:
    cfg = _study(tmp_path, {"bins": 4})
    ages = np.array([55.0, 60.0, 65.0, np.nan])
    reply = {"feature/age": [1, *cells_of(ages, COARSE_EDGES)]}
    empty = [0] * (len(COARSE_EDGES) + 2)
    first = {
        "a": {"cells": {**reply, "feature/bp": empty}},
        "b": {"cells": {**reply, "feature/bp": empty}},
    }

    edges = shared_edges(cfg, first)

    assert edges["features"]["age"] == [50.0, 57.5, 65.0, 72.5, 80.0]  # R10 cells [50, 63, 80)
    assert "bp" not in edges["features"]  # nothing published: no edges, no histogram
    assert edges["km"] is None


def test_kaplan_meier_of_complete_life_tables_is_the_product_of_interval_survivals() -> None:
    tables = {
        "a": {"km/at_risk": [100, 80, 50], "km/events": [10, 20, 5]},
        "b": {"km/at_risk": [50, 40, 20], "km/events": [10, 10, 0]},
    }

    km = kaplan_meier([0.0, 10.0, 20.0], tables, {"a": 35, "b": 20}, 10)

    assert km["times"] == [10.0, 20.0]
    assert km["sites"]["a"] == pytest.approx([0.9, 0.9 * 0.75])
    pooled = [1 - 20 / 150, (1 - 20 / 150) * (1 - 30 / 120)]
    assert km["pooled"]["survival"] == pytest.approx(pooled)
    assert km["pooled"]["low"] == pytest.approx(pooled) == km["pooled"]["high"]
    assert km["pooled"]["approximate"] == [False, False]


def test_a_suppressed_step_ends_the_sites_curve_and_widens_the_pooled_band() -> None:
    tables = {
        "a": {"km/at_risk": [100, 80, 50], "km/events": [10, None, None]},
        "b": {"km/at_risk": [50, 40, 20], "km/events": [10, 10, 0]},
    }

    km = kaplan_meier([0.0, 10.0, 20.0], tables, {"a": 35, "b": 20}, 10)

    assert km["sites"]["a"] == [pytest.approx(0.9), None]
    truth = (1 - 20 / 150) * (1 - 30 / 120)  # a's hidden 20 events
    assert km["pooled"]["low"][1] <= truth <= km["pooled"]["high"][1]
    assert km["pooled"]["approximate"] == [False, True]
