"""Time-series sites: irregular observations per patient -> fixed time bins with masks.

A site holds a long table (patient, time in minutes since admission, variable, value) and an
outcomes table (patient, 0/1 target). Each patient becomes a (bins, 3 x variables) array:

- value: the bin's mean observation (of log(1 + x) for data.series.log_variables),
  standardized with the site's TRAIN patients' statistics, carried forward after the last
  observation (0 = the train mean before the first one), clipped to +-5 sd (PhysioNet has
  0 °F temperatures and similar artefacts);
- mask: 1 where the variable was observed in that bin;
- delta: time since the variable was last observed (or since admission), in windows, the
  input GRU-D's decay is computed from; the GRU learns its own use of it.

Observations after the window, and the site's missing-value code (PhysioNet: -1), are dropped.
Only the target column is read from the outcomes table, so outcome-derived fields next to it
(PhysioNet's SAPS-I, SOFA, Length_of_stay, Survival) can never become inputs. The variables are
data.schema.features, declared in the config so that every site builds the same layout.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from fedmed.config import RunConfig, SeriesConfig, SiteSpec
from fedmed.data.arrays import ArrayTable, binary_labels, split_checked
from fedmed.data.sources import resolve_site_path
from fedmed.data.table import SiteData
from fedmed.errors import ConfigError, DataError

CLIP = 5.0
CHANNELS = ("value", "mask", "delta")


@functools.lru_cache(maxsize=4)
def load_long(path: str, series: SeriesConfig) -> pd.DataFrame:
    """The long table with typed columns (id, time, variable, value); cached per process."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (set FEDMED_DATA_DIR to the datasets folder)")
    cols = (series.id_column, series.time_column, series.variable_column, series.value_column)
    header = read_header(path)
    absent = [c for c in cols if c not in header]
    if absent:
        raise DataError(
            f"{path}: column '{absent[0]}' is missing (columns: {', '.join(header)}); fix the "
            "table or set data.series.id_column/time_column/variable_column/value_column"
        )
    df = pd.read_csv(path, usecols=list(cols), dtype={series.variable_column: "category"})
    df.columns = ["id", "time", "variable", "value"]
    for col in ("time", "value"):
        if not pd.api.types.is_numeric_dtype(df[col]):
            parsed = pd.to_numeric(df[col], errors="coerce")
            bad = parsed.isna() & df[col].notna()
            raise DataError(
                f"{path}: column '{cols[1] if col == 'time' else cols[3]}' has non-numeric "
                f"value {df[col][bad].iloc[0]!r} at data row {int(bad.idxmax()) + 1}; fix it"
            )
    return df


@functools.lru_cache(maxsize=4)
def load_outcomes(path: str, id_column: str, target: str) -> pd.Series:
    """The target per patient id; no other column of the outcomes table is ever read."""
    if not path:
        raise ConfigError(
            "task 'sequence-classification' needs the outcomes table: set data.series.outcomes "
            "(or an outcomes path per [[sites]]); in a federation each site registers it with "
            "`fedmed site data add SITE_CONFIG NAME LONG.csv --outcomes OUTCOMES.csv`"
        )
    header = _outcome_header(path)
    for col in (id_column, target):
        if col not in header:
            raise DataError(
                f"{path}: column '{col}' is missing (columns: {', '.join(header)}); set "
                "data.series.outcome_id_column and data.schema.target"
            )
    df = pd.read_csv(path, usecols=[id_column, target])
    if df[id_column].duplicated().any():
        raise DataError(
            f"{path}: patient {df[id_column][df[id_column].duplicated()].iloc[0]} has two "
            "outcome rows; keep one per patient"
        )
    labels = binary_labels(df[target].to_numpy(), f"{path}: column '{target}'", "code it 0/1")
    return pd.Series(labels, index=df[id_column].to_numpy())


def _outcome_header(path: str) -> pd.Index:
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (set FEDMED_DATA_DIR to the datasets folder)")
    return read_header(path)


def read_header(path: str) -> pd.Index:
    """A CSV's column names (plain or .gz), or a DataError saying it is not a readable table."""
    try:
        return pd.read_csv(path, nrows=0).columns
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise DataError(
            f"{path}: not a readable CSV table ({type(exc).__name__}); export it as UTF-8 CSV "
            "(optionally .gz) with a header row"
        ) from None


def read_outcome_ids(path: str, id_column: str) -> np.ndarray:
    """The patient ids an outcomes table covers (registration checks every patient has one)."""
    header = _outcome_header(path)
    if id_column not in header:
        raise DataError(
            f"{path}: column '{id_column}' is missing (columns: {', '.join(header)}); name the "
            "patient id column with --outcome-id-column"
        )
    return pd.read_csv(path, usecols=[id_column])[id_column].to_numpy()


def require_variables(cfg: RunConfig) -> None:
    """The variables must be declared: every site builds the same input layout from them."""
    if not cfg.data.schema.features:
        raise ConfigError(
            "task 'sequence-classification' needs data.schema.features: the variables to use, "
            "in the same order at every site"
        )


def read_series_site(cfg: RunConfig, site: SiteSpec) -> ArrayTable:
    """One site's patients: binned, masked, split, standardized on its own train patients."""
    series, schema = cfg.data.series, cfg.data.schema
    require_variables(cfg)
    path = resolve_site_path(site.path)
    long = load_long(path, series)
    outcomes_path = resolve_site_path(site.outcomes or series.outcomes)
    outcomes = load_outcomes(outcomes_path, series.outcome_id_column, schema.target)
    origin = path
    if cfg.data.site_column:
        rows = long[long["variable"] == cfg.data.site_column]
        ids = rows["id"][rows["value"].isin([float(v) for v in site.site_values])].unique()
        origin = f"{path}[{cfg.data.site_column} in {list(site.site_values)}]"
    else:
        ids = long["id"].unique()
    ids = np.sort(ids)
    unlabeled = ids[~np.isin(ids, outcomes.index)]
    if len(unlabeled):
        raise DataError(
            f"{origin}: {len(unlabeled)} patients have no row in {outcomes_path} (first: "
            f"{unlabeled[0]}); add their outcomes or remove their observations"
        )
    y = outcomes.loc[ids].to_numpy(np.float32)
    return series_table(cfg, site, long[long["id"].isin(ids)], ids, y, origin)


def series_table(
    cfg: RunConfig, site: SiteSpec, obs: pd.DataFrame, ids: np.ndarray, y: np.ndarray, origin: str
) -> ArrayTable:
    """Patients ``ids`` (sorted) with labels ``y``: split, binned and standardized.

    ``obs`` is the long table (id, time, variable, value) of those patients, from a file or
    from an OMOP database (fedmed.data.omop.source): the same steps follow either way.
    """
    schema, series = cfg.data.schema, cfg.data.series
    id_tr, y_tr, id_te, y_te = split_checked(ids, y, schema, origin)
    order_tr, order_te = np.argsort(id_tr), np.argsort(id_te)  # bin_means needs sorted ids
    id_tr, y_tr, id_te, y_te = id_tr[order_tr], y_tr[order_tr], id_te[order_te], y_te[order_te]
    x_tr, x_te, stats = bin_and_scale(obs, id_tr, id_te, schema.features, series)
    data = SiteData(
        name=site.name,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        input_names=tuple(schema.features),
        preprocessing=stats,
    )
    return ArrayTable(site.name, origin, tuple(schema.features), data, "series")


def bin_and_scale(
    obs: pd.DataFrame,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
    variables: tuple[str, ...],
    series: SeriesConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """(train, test) arrays of shape (patients, bins, 3 x variables) and the fitted statistics."""
    n_bins = max(1, series.hours * 60 // series.bin_minutes)
    sums_tr, counts_tr = bin_means(obs, train_ids, variables, series, n_bins)
    sums_te, counts_te = bin_means(obs, test_ids, variables, series, n_bins)
    observed = counts_tr > 0
    means_tr = np.divide(sums_tr, counts_tr, out=np.zeros_like(sums_tr), where=observed)
    mean = np.array(
        [
            means_tr[..., v][observed[..., v]].mean() if observed[..., v].any() else 0.0
            for v in range(len(variables))
        ]
    )
    std = np.array(
        [
            means_tr[..., v][observed[..., v]].std() if observed[..., v].any() else 1.0
            for v in range(len(variables))
        ]
    )
    std = np.where(std > 1e-9, std, 1.0)
    # count: observed (patient, bin) cells per variable, so that sites' moments combine exactly.
    own = {"mean": mean.tolist(), "std": std.tolist(), "count": observed.sum(axis=(0, 1)).tolist()}
    if series.mean:  # a consortium reference: every site scales alike
        mean, std = np.asarray(series.mean, np.float64), np.asarray(series.std, np.float64)
    stats = {"variables": list(variables), "mean": mean.tolist(), "std": std.tolist(),
             "bins": n_bins, "bin_minutes": series.bin_minutes, "hours": series.hours,
             "missing_code": series.missing_code, "log_variables": list(series.log_variables),
             "reference": bool(series.mean), "own": own}  # fmt: skip
    return (
        features_of(sums_tr, counts_tr, mean, std),
        features_of(sums_te, counts_te, mean, std),
        stats,
    )


def bin_means(
    obs: pd.DataFrame,
    ids: np.ndarray,
    variables: tuple[str, ...],
    series: SeriesConfig,
    n_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per (patient, bin, variable): the sum and count of observations (vectorized bincount)."""
    var_index = {name: i for i, name in enumerate(variables)}
    rows = obs[obs["id"].isin(ids) & obs["variable"].isin(list(variables))]
    if series.missing_code is not None:
        rows = rows[rows["value"] != series.missing_code]
    window = series.hours * 60
    rows = rows[(rows["time"] >= 0) & (rows["time"] <= window) & rows["value"].notna()]
    patient = np.searchsorted(ids, rows["id"].to_numpy())
    # The window's last minute (e.g. 48:00) belongs to the last bin.
    bin_ = np.minimum(rows["time"].to_numpy() // series.bin_minutes, n_bins - 1).astype(np.int64)
    var = rows["variable"].astype(str).map(var_index).to_numpy(np.int64)
    values = rows["value"].to_numpy(np.float64)
    if series.log_variables:
        logged = np.isin(var, [var_index[name] for name in series.log_variables])
        values = np.where(logged, np.log1p(np.maximum(values, 0.0)), values)
    flat = (patient * n_bins + bin_) * len(variables) + var
    size = len(ids) * n_bins * len(variables)
    shape = (len(ids), n_bins, len(variables))
    sums = np.bincount(flat, weights=values, minlength=size)
    counts = np.bincount(flat, minlength=size)
    return sums.reshape(shape), counts.reshape(shape)


def features_of(
    sums: np.ndarray, counts: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Standardized carried-forward values, masks and time since last observation."""
    n_bins = sums.shape[1]
    mask = counts > 0
    value = np.divide(sums, counts, out=np.zeros_like(sums), where=mask)
    value = np.clip((value - mean) / std, -CLIP, CLIP)
    steps = np.arange(n_bins)[None, :, None]
    last = np.maximum.accumulate(np.where(mask, steps, -1), axis=1)
    seen = last >= 0
    carried = np.take_along_axis(value, np.maximum(last, 0), axis=1)
    carried = np.where(seen, carried, 0.0)
    delta = np.where(seen, steps - last, steps + 1) / n_bins
    out = np.concatenate([carried, mask, delta], axis=2)
    return out.astype(np.float32)
