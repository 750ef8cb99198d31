"""Sites whose data is not a table of features: images and time series.

Their readers (fedmed.data.images, fedmed.data.series) validate, split and preprocess in one go
and hand back an ArrayTable: the same facts a SiteTable gives a data steward (origin, outcome
counts, input layout) plus the model-ready arrays. Which reader a study uses is decided by its
task's outcome kind (``Task.target``), like OUTCOMES decides it for tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedmed.config import RunConfig, SchemaConfig, SiteSpec
from fedmed.data.partition import partition_rows
from fedmed.data.table import OUTCOMES, SiteData, _split
from fedmed.errors import DataError


@dataclass(frozen=True)
class ArrayTable:
    """A validated, split and preprocessed non-tabular site dataset.

    ``features`` is the input layout the shared model is built for (image channels, series
    variables): every site must report the same one.
    """

    name: str
    origin: str
    features: tuple[str, ...]
    data: SiteData
    target: str

    @property
    def y_train(self) -> np.ndarray:
        return self.data.y_train

    @property
    def y_test(self) -> np.ndarray:
        return self.data.y_test

    def outcome_summary(self) -> str:
        return OUTCOMES["binary"].summary(np.concatenate([self.y_train, self.y_test]))


def binary_labels(raw: np.ndarray, origin: str, fix: str) -> np.ndarray:
    """0/1 labels as float32, or a DataError naming the first bad value, its position and fix."""
    values = np.asarray(raw).reshape(-1)
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{origin}: labels must be numbers 0/1, got dtype {values.dtype}; {fix}")
    bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if len(bad):
        raise DataError(
            f"{origin}: label {values[bad[0]].item()!r} at position {bad[0]} "
            f"(and {len(bad) - 1} more) "
            f"is not 0 or 1; the task is binary: {fix}"
        )
    return values.astype(np.float32)


def shard(cfg: RunConfig, site: SiteSpec, labels: np.ndarray) -> np.ndarray:
    """Row positions of ``site`` when one file is split across the simulated sites."""
    shards = partition_rows(
        labels,
        sizes=cfg.data.partition_sizes or (1.0,) * len(cfg.sites),
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.data.partition_seed,
    )
    return shards[cfg.site_names.index(site.name)]


def split_checked(
    x: np.ndarray, y: np.ndarray, schema: SchemaConfig, origin: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Enough rows, both classes, then the site's stratified train/test split (as for tables).

    With data.schema.validation_fraction > 0 the "test" part returned is a validation split of
    the train rows and the real test rows are never returned: settings chosen on it cannot have
    seen the test set.
    """
    if len(y) < schema.min_rows:
        raise DataError(
            f"{origin}: only {len(y)} usable examples (need at least {schema.min_rows}); add "
            "data or lower data.schema.min_rows"
        )
    OUTCOMES["binary"].check(y, schema, origin)
    x_tr, y_tr, x_te, y_te = _split(x, y, y, None, schema, origin)
    if schema.validation_fraction > 0:
        inner = replace(schema, test_fraction=schema.validation_fraction)
        x_tr, y_tr, x_te, y_te = _split(x_tr, y_tr, y_tr, None, inner, f"{origin} (validation)")
    return np.asarray(x_tr), y_tr, np.asarray(x_te), y_te
