"""A site's table -> validated, split, preprocessed arrays.

Order of operations is the order a data steward would check by hand: the columns exist, the
values parse, nothing is empty, there are enough rows and enough outcomes (both classes, or
enough events); only then split, and fit preprocessing on the site's OWN train split (never on
its test rows, never on other sites).

What the outcome is depends on the task (``Task.target``): a 0/1 label ("binary") or a
follow-up time with an event indicator ("survival"). Each kind is one entry in OUTCOMES; the
features and their preprocessing are the same for every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fedmed.config import SchemaConfig, echo
from fedmed.errors import ConfigError, DataError

MAX_ROWS_SHOWN = 5
# Models compute in float32: a value beyond this (1e39, inf) would become inf and every
# prediction and update it touches NaN, so it is refused when the table is read.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SiteTable:
    """A validated table, split into train and test, still in raw units."""

    name: str
    origin: str
    features: tuple[str, ...]
    x_train: pd.DataFrame
    y_train: np.ndarray
    x_test: pd.DataFrame
    y_test: np.ndarray
    target: str = "binary"  # the outcome kind (a key of OUTCOMES)

    def outcome_summary(self) -> str:
        """The outcome counts a data steward checks first ("57 positive", "40 events ...")."""
        return OUTCOMES[self.target].summary(np.concatenate([self.y_train, self.y_test]))


@dataclass(frozen=True)
class SiteData:
    """Model-ready arrays for one site: float32 features and outcomes.

    Outcomes are {0,1} labels (binary) or (time, event) rows of shape (n, 2) (survival).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_names: tuple[str, ...]
    preprocessing: dict[str, Any]

    @property
    def n_train(self) -> int:
        return len(self.y_train)


def _rows(index: pd.Index) -> str:
    shown = ", ".join(str(i) for i in list(index[:MAX_ROWS_SHOWN]))
    more = f" and {len(index) - MAX_ROWS_SHOWN} more" if len(index) > MAX_ROWS_SHOWN else ""
    return f"row{'s' if len(index) > 1 else ''} {shown}{more}"


def resolve_features(
    columns: list[str], schema: SchemaConfig, target: str = "binary"
) -> tuple[str, ...]:
    """The feature columns: as declared, or every column but the outcome and split columns."""
    if schema.features:
        return schema.features
    skip = {*OUTCOMES[target].columns(schema), schema.split_column, *schema.drop_columns}
    return tuple(c for c in columns if c not in skip)


def validate_table(
    name: str, df: pd.DataFrame, schema: SchemaConfig, origin: str, target: str = "binary"
) -> SiteTable:
    """Check a raw table against the schema and split it; every failure is a DataError.

    ``target`` is the task's outcome kind (``Task.target``): which columns hold the outcome and
    how they are checked.
    """
    outcome = OUTCOMES[target]
    df = df.drop(columns=[c for c in schema.drop_columns if c in df.columns])
    features = resolve_features(list(df.columns), schema, target)
    label_columns = outcome.columns(schema)
    needed = [*label_columns, *features] + ([schema.split_column] if schema.split_column else [])
    absent = [c for c in needed if c not in df.columns]
    if absent:
        raise DataError(
            f"{origin}: column '{absent[0]}' is missing (columns present: "
            f"{', '.join(map(str, df.columns))}); add it to the table or fix the schema"
        )
    x = pd.DataFrame(index=df.index)
    for col in features:
        x[col] = parse_column(df[col], col, schema, origin)
    y_raw = outcome.parse(df, schema, origin)

    # Missing values: the policy decides; the outcome is never imputed.
    missing_y = y_raw.isna().any(axis=1)
    if missing_y.any() and schema.missing != "drop":
        col = y_raw.columns[y_raw.isna().any()][0]
        raise DataError(
            f"{origin}: outcome column '{col}' is empty at {_rows(df.index[y_raw[col].isna()])}; "
            "fill it in or set data.schema.missing='drop'"
        )
    missing_x = x.isna().any(axis=1)
    if schema.missing == "error" and missing_x.any():
        bad_col = x.columns[x.isna().any()][0]
        raise DataError(
            f"{origin}: column '{bad_col}' has missing values at "
            f"{_rows(df.index[x[bad_col].isna()])}; fill them or set data.schema.missing="
            "'drop' or 'mean'"
        )
    keep = ~missing_y
    if schema.missing == "drop":
        keep &= ~missing_x
    x, y_raw = x[keep], y_raw[keep]
    split_values = df.loc[keep, schema.split_column] if schema.split_column else None

    y = outcome.labels(y_raw, schema, origin)
    if len(y) < schema.min_rows:
        raise DataError(_too_few_rows(origin, len(y), missing_x, missing_y, schema))
    outcome.check(y, schema, origin)
    if schema.validation_fraction:
        raise ConfigError(
            "data.schema.validation_fraction is implemented for image, series and text sites "
            "only; set it to 0 for table sites"
        )
    x_tr, y_tr, x_te, y_te = _split(x, y, outcome.strata(y), split_values, schema, origin)
    return SiteTable(name, origin, features, x_tr, y_tr, x_te, y_te, target)


def _too_few_rows(
    origin: str, usable: int, missing_x: pd.Series, missing_y: pd.Series, schema: SchemaConfig
) -> str:
    """Why a table is too small, suggesting missing='mean' only when it would bring rows back.

    Rows with an empty outcome are never imputed, so 'mean' helps only when rows were dropped
    for an empty feature; suggesting it for a table that is simply small sends a steward astray.
    """
    by_features = int((missing_x & ~missing_y).sum()) if schema.missing == "drop" else 0
    by_outcome = int(missing_y.sum())
    removed = by_features + by_outcome
    need = f"need at least {schema.min_rows}"
    if not removed:
        return f"{origin}: only {usable} rows ({need}); add rows or lower data.schema.min_rows"
    fixes = "add rows, " + ("set data.schema.missing='mean', " if by_features else "")
    return (
        f"{origin}: only {usable} usable rows after removing {removed} with missing values "
        f"({by_features} for a feature, {by_outcome} for the outcome; {need}); {fixes}or lower "
        "data.schema.min_rows"
    )


def parse_column(raw: pd.Series, col: str, schema: SchemaConfig, origin: str) -> pd.Series:
    if raw.isna().all():
        raise DataError(
            f"{origin}: column '{col}' is empty in all {len(raw)} rows; fill it or drop it "
            "from data.schema.features"
        )
    if col not in schema.categorical:
        return _numeric(raw, col, origin)
    allowed = schema.categorical[col]
    numeric_cats = all(isinstance(c, int | float) for c in allowed)
    values = _numeric(raw, col, origin) if numeric_cats else raw.astype("string").str.strip()
    bad = values.notna() & ~values.isin(list(allowed))
    if bad.any():
        raise DataError(
            f"{origin}: column '{col}' has value {echo(values[bad].iloc[0])} at "
            f"{_rows(raw.index[bad])}, not among the declared categories {echo(list(allowed))}; "
            f"fix the rows or add the value to data.schema.categorical.{col}"
        )
    return values


def _numeric(raw: pd.Series, col: str, origin: str) -> pd.Series:
    """A column of numbers, read strictly: every failure names the file, column and rows.

    Refused: text that is not a number, NUL bytes (a binary or corrupted export), and values
    that are not finite in float32 (inf, -inf, 1e39), which would otherwise turn a model's
    inputs, and so its updates and predictions, into inf/NaN. The echoed value is cut short.
    """
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        values = raw.astype(float)
    else:
        text = raw.astype("string").str.strip()
        text = text.mask(text == "")
        nul = text.str.contains("\x00", regex=False).fillna(False).astype(bool)
        if nul.any():
            raise DataError(
                f"{origin}: column '{col}' has a NUL byte at {_rows(raw.index[nul])} (a binary "
                "or corrupted export); export the table again as plain UTF-8 text"
            )
        values = pd.to_numeric(text, errors="coerce").astype(float)
        # pandas gives up on numbers beyond float64 ("1e400"); Python reads them as inf, so
        # they are reported below as out of range, not as "non-numeric".
        retry = text.notna() & values.isna()
        if retry.any():
            values.loc[retry] = text[retry].map(_float_or_nan).astype(float)
        bad = text.notna() & values.isna()
        if bad.any():
            raise DataError(
                f"{origin}: column '{col}' has non-numeric value {echo(text[bad].iloc[0])} at "
                f"{_rows(raw.index[bad])}; fix those rows, mark them missing "
                f"(data.schema.na_values), or declare '{col}' in data.schema.categorical"
            )
    huge = values.notna() & ~(values.abs() <= FLOAT32_MAX)
    if huge.any():
        raise DataError(
            f"{origin}: column '{col}' has value {values[huge].iloc[0]!r} at "
            f"{_rows(raw.index[huge])}, not a finite number within float32 (|x| <= 3.4e38); "
            "fix those rows (a unit or export error?) or mark them missing (data.schema.na_values)"
        )
    return values


def _float_or_nan(text: str) -> float:
    """inf for a number too large for float64 ("1e400"), else NaN (still not a number).

    Only overflow is taken from Python's float(): it also reads "1_000", which pandas
    rightly calls non-numeric.
    """
    try:
        value = float(text)
    except ValueError:
        return float("nan")
    return value if value in (float("inf"), float("-inf")) else float("nan")


class BinaryOutcome:
    """A 0/1 column (or a number made binary by ``positive_above``); both classes required."""

    def columns(self, schema: SchemaConfig) -> tuple[str, ...]:
        return (schema.target,)

    def parse(self, df: pd.DataFrame, schema: SchemaConfig, origin: str) -> pd.DataFrame:
        return pd.DataFrame({schema.target: _numeric(df[schema.target], schema.target, origin)})

    def labels(self, raw: pd.DataFrame, schema: SchemaConfig, origin: str) -> np.ndarray:
        y = raw[schema.target]
        if schema.positive_above is not None:
            return (y.to_numpy() > schema.positive_above).astype(np.float32)
        bad = ~y.isin([0.0, 1.0])
        if bad.any():
            raise DataError(
                f"{origin}: target '{schema.target}' has value {y[bad].iloc[0]:g} at "
                f"{_rows(y.index[bad])}; a binary target must be 0/1, or set "
                "data.schema.positive_above (label = value > threshold)"
            )
        return y.to_numpy().astype(np.float32)

    def check(self, y: np.ndarray, schema: SchemaConfig, origin: str) -> None:
        classes = np.unique(y)
        if len(classes) < 2:
            raise DataError(
                f"{origin}: every usable row has label {int(classes[0])}; a site needs both "
                "classes to train a classifier (check the target column or "
                "data.schema.positive_above)"
            )

    def strata(self, y: np.ndarray) -> np.ndarray:
        return y

    def summary(self, y: np.ndarray) -> str:
        return f"{int(y.sum())} positive"


class SurvivalOutcome:
    """Follow-up time (>= 0) and an event indicator coded by event_value / censored_value.

    Output rows are (time, event) with event in {0, 1}; a code that is neither declared value
    is an error naming the rows, so a typo is never read as "censored".
    """

    def columns(self, schema: SchemaConfig) -> tuple[str, ...]:
        return (schema.time, schema.event)

    def parse(self, df: pd.DataFrame, schema: SchemaConfig, origin: str) -> pd.DataFrame:
        time = _numeric(df[schema.time], schema.time, origin)
        codes = (schema.censored_value, schema.event_value)
        raw = df[schema.event]
        if all(isinstance(c, int | float) and not isinstance(c, bool) for c in codes):
            values: pd.Series = _numeric(raw, schema.event, origin)
        else:
            values = raw.astype("string").str.strip().mask(lambda v: v == "")
            codes = tuple(str(c) for c in codes)
        bad = values.notna() & ~values.isin(list(codes))
        if bad.any():
            raise DataError(
                f"{origin}: event column '{schema.event}' has value {values[bad].iloc[0]!r} at "
                f"{_rows(df.index[bad])}; expected {codes[1]!r} (event) or {codes[0]!r} "
                "(censored): fix the rows or set data.schema.event_value / censored_value"
            )
        event = (values == codes[1]).astype(float).where(values.notna())
        return pd.DataFrame({schema.time: time, schema.event: event})

    def labels(self, raw: pd.DataFrame, schema: SchemaConfig, origin: str) -> np.ndarray:
        time = raw[schema.time]
        bad = (time < 0) | ~np.isfinite(time)
        if bad.any():
            raise DataError(
                f"{origin}: time column '{schema.time}' has value {time[bad].iloc[0]:g} at "
                f"{_rows(time.index[bad])}; follow-up times must be finite and >= 0"
            )
        return raw[[schema.time, schema.event]].to_numpy(dtype=np.float32)

    def check(self, y: np.ndarray, schema: SchemaConfig, origin: str) -> None:
        events = int(y[:, 1].sum())
        if events < schema.min_events:
            raise DataError(
                f"{origin}: only {events} events (column '{schema.event}' = "
                f"{schema.event_value!r}) among {len(y)} usable rows; a Cox model needs at least "
                f"{schema.min_events} events per site (data.schema.min_events): merge this site "
                "with another, or lower data.schema.min_events"
            )

    def strata(self, y: np.ndarray) -> np.ndarray:
        return y[:, 1]

    def summary(self, y: np.ndarray) -> str:
        events = int(y[:, 1].sum())
        return f"{events} events, {len(y) - events} censored"


OUTCOMES: dict[str, BinaryOutcome | SurvivalOutcome] = {
    "binary": BinaryOutcome(),
    "survival": SurvivalOutcome(),
}


def _split(
    x: pd.DataFrame,
    y: np.ndarray,
    strata: np.ndarray,
    split_values: pd.Series | None,
    schema: SchemaConfig,
    origin: str,
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    if split_values is not None:
        tag = split_values.astype("string").str.strip().str.lower()
        bad = ~tag.isin(["train", "test"])
        if bad.any():
            raise DataError(
                f"{origin}: split column '{schema.split_column}' must be 'train' or 'test'; "
                f"found {tag[bad].iloc[0]!r} at {_rows(tag.index[bad])}"
            )
        is_test = (tag == "test").to_numpy()
        if is_test.all() or not is_test.any():
            raise DataError(
                f"{origin}: split column '{schema.split_column}' puts every row in one split; "
                "mark some rows 'train' and some 'test'"
            )
        return x[~is_test], y[~is_test], x[is_test], y[is_test]
    # Stratify (by class, or by event for survival) when sklearn can, as FLamby does.
    counts = np.unique(strata, return_counts=True)[1]
    stratify = strata if schema.stratify and counts.min() > 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x,
        y,
        train_size=1 - schema.test_fraction,
        test_size=schema.test_fraction,
        random_state=schema.split_seed,
        shuffle=True,
        stratify=stratify,
    )
    return x_tr, y_tr, x_te, y_te


class Preprocessor:
    """Imputation, one-hot and standardization fitted on one train split.

    The layout (columns, one-hot order) depends only on the schema, so every site yields the
    same inputs for the shared model; the statistics are the site's own.
    """

    def __init__(self, features: tuple[str, ...], schema: SchemaConfig) -> None:
        self.features = features
        self.schema = schema
        layout = self._layout()
        self.input_names = tuple(name for name, _ in layout)
        self._numeric_mask = np.array([numeric for _, numeric in layout], dtype=bool)
        self.fill: dict[str, float] = {}
        self.mean = np.zeros(len(self.input_names), dtype=np.float64)
        self.std = np.ones(len(self.input_names), dtype=np.float64)

    def _layout(self) -> list[tuple[str, bool]]:
        """(input name, is numeric) per model input, from the schema alone."""
        names: list[tuple[str, bool]] = []
        for col in self.features:
            cats = self.schema.categorical.get(col)
            if cats is None:
                names.append((col, True))
            else:
                kept = cats[1:] if self.schema.drop_first else cats
                names.extend((f"{col}={c}", False) for c in kept)
        return names

    def fit(self, x: pd.DataFrame) -> Preprocessor:
        numeric = [c for c in self.features if c not in self.schema.categorical]
        self.fill = {c: float(x[c].mean()) if x[c].notna().any() else 0.0 for c in numeric}
        encoded = self._encode(x)
        scale = self._scaled_columns()
        mean = encoded.mean(axis=0)
        std = encoded.std(axis=0)
        # A constant column (e.g. Switzerland's cholesterol, all 0) keeps std 1: dividing by 0
        # would turn a harmless column into NaN.
        std = np.where(std > 1e-12, std, 1.0)
        self.mean = np.where(scale, mean, 0.0)
        self.std = np.where(scale, std, 1.0)
        return self

    def transform(self, x: pd.DataFrame) -> np.ndarray:
        return ((self._encode(x) - self.mean) / self.std).astype(np.float32)

    def _encode(self, x: pd.DataFrame) -> np.ndarray:
        blocks = []
        for col in self.features:
            cats = self.schema.categorical.get(col)
            if cats is None:
                blocks.append(x[col].fillna(self.fill.get(col, 0.0)).to_numpy(dtype=np.float64))
                continue
            kept = cats[1:] if self.schema.drop_first else cats
            for c in kept:
                blocks.append((x[col] == c).to_numpy(dtype=np.float64))
        return np.stack(blocks, axis=1) if blocks else np.zeros((len(x), 0))

    def _scaled_columns(self) -> np.ndarray:
        if self.schema.standardize == "none":
            return np.zeros(len(self.input_names), dtype=bool)
        if self.schema.standardize == "all":
            return np.ones(len(self.input_names), dtype=bool)
        return self._numeric_mask

    @classmethod
    def from_dict(
        cls, features: tuple[str, ...], schema: SchemaConfig, params: dict[str, Any]
    ) -> Preprocessor:
        """Rebuild a fitted preprocessor from a model card (serving)."""
        pre = cls(features, schema)
        if list(params.get("inputs", [])) != list(pre.input_names):
            raise DataError(
                "the model card's preprocessing does not match its schema; export the model again"
            )
        pre.fill = {str(k): float(v) for k, v in params["impute_mean"].items()}
        pre.mean = np.asarray(params["mean"], dtype=np.float64)
        pre.std = np.asarray(params["std"], dtype=np.float64)
        return pre

    def to_dict(self) -> dict[str, Any]:
        """Fitted parameters, for the model card (so a served model can reuse them)."""
        return {
            "inputs": list(self.input_names),
            "impute_mean": self.fill,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }


def prepare(table: SiteTable, schema: SchemaConfig, fitted: Preprocessor | None = None) -> SiteData:
    """Arrays for training; ``fitted`` reuses another fit (pooled baseline), else fit on train."""
    pre = fitted or Preprocessor(table.features, schema).fit(table.x_train)
    return SiteData(
        name=table.name,
        x_train=pre.transform(table.x_train),
        y_train=table.y_train.astype(np.float32),
        x_test=pre.transform(table.x_test),
        y_test=table.y_test.astype(np.float32),
        input_names=pre.input_names,
        preprocessing=pre.to_dict(),
    )


def input_names(features: tuple[str, ...], schema: SchemaConfig) -> tuple[str, ...]:
    """The model's input layout from the schema alone (what the coordinator needs)."""
    return Preprocessor(features, schema).input_names
