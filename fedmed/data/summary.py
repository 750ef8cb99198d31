"""A site's rows as descriptive statistics count them, and the counts themselves (no privacy).

Statistics describe the cohort the site HOLDS, so they are counted before the study's missing
value policy: ``data.schema.missing = "drop"`` removes rows with an empty feature from training,
but the steward still wants to see how many were empty. The table is validated first by the
caller (``tasks.load_site_table``), so every value read here already parsed.

Everything here is counting: a site's release is a set of named count vectors (``cells``) and,
optionally, per-feature sums (``sums``). Which counts leave the site, with what noise and what
suppression, is privacy's business (fedmed.privacy.release); the edges they are counted on come
from the coordinator (pass 2) or are the public ``COARSE_EDGES`` (pass 1): no value of a row
ever decides an edge at a site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedmed.config import RunConfig, SiteSpec
from fedmed.data.sources import load_site_frame, resolve_site_path
from fedmed.data.table import OUTCOMES, parse_column, resolve_features
from fedmed.errors import ConfigError


def _coarse_edges() -> np.ndarray:
    """Public, data-free edges on a signed log scale (ten per decade) from 1e-3 to 1e7.

    Wide enough for any clinical unit (a platelet count, a cost in cents) and fine enough
    (a factor 1.26 per cell: pH 7.0-7.6 falls in [6.3, 8)) to place the study's histogram
    edges; a cell of its own holds
    (-1e-3, 1e-3), so zeros are not smeared over a decade.
    """
    steps = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)  # Renard's R10 series
    positive = [float(f"{m * 10.0**e:.6g}") for e in range(-3, 7) for m in steps] + [1e7]
    return np.array([-v for v in reversed(positive)] + positive)


COARSE_EDGES = _coarse_edges()


@dataclass(frozen=True)
class SiteRows:
    """One site's cohort, one entry per patient (or ICU stay), NaN where a value is missing.

    ``outcome`` is "binary" (``label`` 0/1) or "survival" (``time``, ``event`` 0/1).
    """

    name: str
    n: int
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    categorical: dict[str, tuple[pd.Series, tuple]] = field(default_factory=dict)
    outcome: str = "binary"
    label: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None


def read_site_rows(cfg: RunConfig, site: SiteSpec, target: str) -> SiteRows:
    """The rows ``fedmed stats`` counts at ``site``, for an outcome of kind ``target``."""
    if cfg.data.omop.active and (target in OUTCOMES or target == "series"):
        return _omop_rows(cfg, site, target)
    if target in OUTCOMES:
        frame, origin = load_site_frame(cfg, site)
        return _table_rows(cfg, site, target, frame, origin)
    if target == "series":
        return _series_rows(cfg, site)
    raise ConfigError(
        f"federated statistics cover table, survival and series studies, not '{target}' ones; "
        "run `fedmed check-data` for this study's per-site counts"
    )


def _omop_rows(cfg: RunConfig, site: SiteSpec, target: str) -> SiteRows:
    """The same rows from the site's OMOP database: the cohort its [data.omop] section defines,
    as the tabular/survival tasks (wide table) or the sequence task (long table) read it."""
    from fedmed.data.omop import cohort
    from fedmed.data.omop.source import extracted

    omop, schema = cfg.data.omop, cfg.data.schema
    extraction = extracted(cfg, site)
    if target == "series":
        ids = extraction.cohort["person_id"].to_numpy(np.int64)
        label = cohort.labels(extraction, omop).loc[ids].to_numpy(np.float64)
        return _stay_means(cfg, site, cohort.long_table(extraction, omop), ids, label)
    columns = (
        {"time": schema.time, "event": schema.event}
        if target == "survival"
        else {"target": schema.target}
    )
    frame = cohort.wide_table(extraction, omop, columns)
    return _table_rows(cfg, site, target, frame, extraction.origin)


def _table_rows(
    cfg: RunConfig, site: SiteSpec, target: str, frame: pd.DataFrame, origin: str
) -> SiteRows:
    schema = cfg.data.schema
    frame = frame.drop(columns=[c for c in schema.drop_columns if c in frame.columns])
    numeric: dict[str, np.ndarray] = {}
    categorical: dict[str, tuple[pd.Series, tuple]] = {}
    for col in resolve_features(list(frame.columns), schema, target):
        values = parse_column(frame[col], col, schema, origin)
        if col in schema.categorical:
            categorical[col] = (values.reset_index(drop=True), tuple(schema.categorical[col]))
        else:
            numeric[col] = values.to_numpy(dtype=np.float64)
    raw = OUTCOMES[target].parse(frame, schema, origin)
    rows = SiteRows(site.name, len(frame), numeric, categorical, target)
    if target == "survival":
        time = raw[schema.time].to_numpy(dtype=np.float64)
        event = raw[schema.event].to_numpy(dtype=np.float64)
        return _with(rows, time=time, event=event)
    label = raw[schema.target].to_numpy(dtype=np.float64)
    if schema.positive_above is not None:
        label = np.where(np.isnan(label), np.nan, (label > schema.positive_above).astype(float))
    return _with(rows, label=label)


def _with(rows: SiteRows, **arrays: np.ndarray) -> SiteRows:
    from dataclasses import replace

    return replace(rows, **arrays)


def _series_rows(cfg: RunConfig, site: SiteSpec) -> SiteRows:
    """One row per ICU stay: each variable's mean over the study window, in raw units.

    A variable never observed in the window is missing for that stay. The site's missing-value
    code (PhysioNet: -1) is not an observation; log_variables are not logged (raw units read
    better in a table, and the histogram edges do not need the log).
    """

    from fedmed.data.series import load_long, load_outcomes

    series, schema = cfg.data.series, cfg.data.schema
    long = load_long(resolve_site_path(site.path), series)
    outcomes_path = resolve_site_path(site.outcomes or series.outcomes)
    outcomes = load_outcomes(outcomes_path, series.outcome_id_column, schema.target)
    if cfg.data.site_column:
        rows = long[long["variable"] == cfg.data.site_column]
        ids = rows["id"][rows["value"].isin([float(v) for v in site.site_values])].unique()
    else:
        ids = long["id"].unique()
    ids = np.sort(ids)
    label = outcomes.reindex(ids).to_numpy(dtype=np.float64)
    return _stay_means(cfg, site, long[long["id"].isin(ids)], ids, label)


def _stay_means(
    cfg: RunConfig, site: SiteSpec, obs: pd.DataFrame, ids: np.ndarray, label: np.ndarray
) -> SiteRows:
    """Per stay, each variable's mean over the study window (NaN when never observed)."""
    from dataclasses import replace

    from fedmed.data.series import bin_means

    series, schema = cfg.data.series, cfg.data.schema
    sums, counts = bin_means(obs, ids, schema.features, replace(series, log_variables=()), 1)
    means = np.divide(
        sums[:, 0], counts[:, 0], out=np.full(sums[:, 0].shape, np.nan), where=counts[:, 0] > 0
    )
    numeric = {name: means[:, i] for i, name in enumerate(schema.features)}
    return SiteRows(site.name, len(ids), numeric, {}, "binary", label=label)


# -- counting ------------------------------------------------------------------------------------


def cells_of(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of the present values in the open tail below ``edges[0]``, each [edges[i],
    edges[i+1]) and the open tail from ``edges[-1]`` on: len(edges) + 1 counts."""
    present = values[~np.isnan(values)]
    index = np.searchsorted(edges, present, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(int).tolist()


def _outcome_cells(rows: SiteRows) -> list[int]:
    """[missing, 0, 1] labels, or [missing, censored, event] for survival."""
    values = rows.event if rows.outcome == "survival" else rows.label
    assert values is not None
    if rows.outcome == "survival":  # a row without a time has no usable outcome either
        values = np.where(np.isnan(rows.time), np.nan, values)  # type: ignore[arg-type]
    missing = int(np.isnan(values).sum())
    return [missing, int((values == 0).sum()), int((values == 1).sum())]


def first_pass(rows: SiteRows) -> dict[str, list[int]]:
    """Pass 1: the cohort, each feature's missing count and cells on the public coarse edges
    (categories for a categorical feature), the outcome and, for survival, the follow-up times
    on the coarse edges. Each vector is a partition of the cohort (but ``cohort``)."""
    cells: dict[str, list[int]] = {"cohort": [rows.n]}
    for name, values in rows.numeric.items():
        cells[f"feature/{name}"] = [int(np.isnan(values).sum()), *cells_of(values, COARSE_EDGES)]
    for name, (values, categories) in rows.categorical.items():
        counts = [int((values == c).sum()) for c in categories]
        cells[f"category/{name}"] = [int(values.isna().sum()), *counts]
    cells["outcome"] = _outcome_cells(rows)
    if rows.outcome == "survival":
        assert rows.time is not None
        cells["time"] = cells_of(rows.time, COARSE_EDGES)
    return cells


def second_pass(
    rows: SiteRows, edges: dict[str, list[float]], km_edges: list[float] | None
) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Pass 2: each numeric feature's histogram on the study's shared ``edges`` (two open
    tails), the sum and sum of squares of its values winsorized at those edges, and for
    survival the life table on ``km_edges``: patients at risk at the start of each interval
    and events in it (the last interval open).

    A feature the coordinator sent no edges for (all its pass-1 cells were suppressed) is
    left out.
    """
    cells: dict[str, list[int]] = {}
    sums: dict[str, list[float]] = {}
    for name, feature_edges in edges.items():
        values = rows.numeric[name]
        cells[f"bins/{name}"] = cells_of(values, np.asarray(feature_edges, dtype=np.float64))
        # Winsorized at the shared edges: one outlier (a unit slip, a planted value) cannot be
        # read back out of a sum, and each row moves a sum by at most max(|edges|).
        present = np.clip(values[~np.isnan(values)], feature_edges[0], feature_edges[-1])
        sums[name] = [float(present.sum()), float((present**2).sum())]
    if km_edges is not None:
        assert rows.time is not None and rows.event is not None
        usable = ~(np.isnan(rows.time) | np.isnan(rows.event))
        time, event = rows.time[usable], rows.event[usable]
        starts = np.asarray(km_edges, dtype=np.float64)
        cells["km/at_risk"] = [int((time >= t).sum()) for t in starts]
        interval = np.searchsorted(starts, time[event == 1], side="right") - 1
        cells["km/events"] = np.bincount(interval, minlength=len(starts)).astype(int).tolist()
    return cells, sums


def sensitivity(cells: dict[str, list[int]]) -> float:
    """L2 sensitivity of a pass's count vectors to adding or removing one patient.

    A patient adds 1 to the cohort and to exactly one cell of every other partition (a feature's
    missing/coarse cells, its categories, the outcome, the coarse follow-up time, a histogram's
    cells): 1 per vector. The at-risk counts are not a partition: a patient is at risk at the
    start of every interval up to their own time, so they add up to len(km/at_risk).
    """
    total = sum(len(v) if key == "km/at_risk" else 1 for key, v in cells.items())
    return float(np.sqrt(total))
