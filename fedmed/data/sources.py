"""Where a site's raw table comes from: a local CSV/Parquet file, or a packaged demo table.

Rows keep their position in the source as the DataFrame index (1-based line numbers for files)
so that validation errors can point a data steward at the exact rows to fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedmed.config import RunConfig, SchemaConfig, SiteSpec, data_dir, echo
from fedmed.data.partition import partition_rows
from fedmed.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pathlib import Path


def resolve_site_path(path: str) -> str:
    """Expand ``{data_dir}`` (FEDMED_DATA_DIR, default ../shared/datasets) in a site path."""
    return path.replace("{data_dir}", str(data_dir()))


def read_table(path: str, schema: SchemaConfig) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file into a DataFrame indexed by the file's line numbers."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        hint = (
            " (set FEDMED_DATA_DIR to the folder holding the datasets)" if "{" not in path else ""
        )
        raise DataError(f"{path}: file not found{hint}")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; export the table again with a header row")
    suffix = file.suffix.lower()
    names = list(schema.column_names) or None
    if names:
        _no_duplicates(names, f"{path}: data.schema.column_names", "data.schema.column_names")
    try:
        if suffix in (".parquet", ".pq"):
            try:
                df = pd.read_parquet(file)
            except ImportError:
                raise DataError(
                    f"{path}: reading Parquet needs pyarrow; run: pip install 'fedmed[parquet]'"
                ) from None
            first_line = 1
        else:
            sep = "\t" if suffix in (".tsv", ".tab") else ","
            _no_nul_bytes(file, sep, path)
            df = pd.read_csv(
                file,
                sep=sep,
                header=None if names else "infer",
                names=names,
                na_values=list(schema.na_values) or None,
                skipinitialspace=True,
                dtype=str,
            )
            first_line = 1 if names else 2
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file has no rows; export the table again") from None
    except pd.errors.ParserError as exc:
        raise DataError(
            f"{path}: not a well-formed table ({echo(str(exc))}); fix the file"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 CSV") from None
    if not names and suffix not in (".parquet", ".pq"):
        _no_duplicates(_header(file, sep), f"{path}: the header row", "the header row")
    if df.empty:
        raise DataError(f"{path}: file has a header but no data rows")
    df.index = pd.RangeIndex(first_line, first_line + len(df))
    return df


def _no_nul_bytes(file: Path, sep: str, path: str) -> None:
    """Refuse a text table with a NUL byte, naming its line and column.

    pandas' C parser silently cuts a cell at a NUL ("7\\x003" reads as 7): a corrupted
    export would be read as plausible, wrong numbers.
    """
    data = file.read_bytes()
    at = data.find(b"\x00")
    if at < 0:
        return
    start = data.rfind(b"\n", 0, at) + 1
    line = data.count(b"\n", 0, at) + 1
    index = data.count(sep.encode(), start, at)
    header = data[: data.find(b"\n")].decode("utf-8", "replace").split(sep)
    column = header[index].strip() if index < len(header) else f"#{index + 1}"
    raise DataError(
        f"{path}: column {echo(column)} has a NUL byte at row {line} (a binary or corrupted "
        "export); export the table again as plain UTF-8 text"
    )


def _header(file: object, sep: str) -> list[str]:
    """The header row as written: read_csv renames a repeated column (age, age.1) silently."""
    row = pd.read_csv(file, sep=sep, header=None, nrows=1, dtype=str, skipinitialspace=True)
    return ["" if pd.isna(v) else str(v).strip() for v in row.iloc[0]]


def _no_duplicates(names: list[str], where: str, fix_in: str) -> None:
    """Two columns with one name: which one is 'age'? Refused, naming the column."""
    seen: set[str] = set()
    for name in names:
        if name and name in seen:  # unnamed columns get pandas' own unique names
            raise DataError(
                f"{where} names column {echo(name)} twice; rename or remove one of them in {fix_in}"
            )
        seen.add(name)


def builtin_table(name: str) -> pd.DataFrame:
    """A real medical table shipped inside an installed package (works offline)."""
    if name == "sklearn:breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer(as_frame=True)
        df = bunch.frame.copy()
        # sklearn codes 0 = malignant; hospitals think "positive = disease", so flip it.
        df["malignant"] = (df.pop("target") == 0).astype(int)
        df.columns = [c.replace(" ", "_") for c in df.columns]
    elif name == "lifelines:lung":
        from lifelines.datasets import load_lung

        # NCCTG advanced lung cancer (Loprinzi et al. 1994), 228 patients from 18 institutions
        # ("inst"); lifelines codes status 1 = dead, 0 = censored (R's survival::lung: 2 / 1).
        df = load_lung()
    else:
        raise ConfigError(
            f"data.builtin='{name}' is not a packaged table; choose one of: {', '.join(BUILTINS)}"
        )
    df.index = pd.RangeIndex(1, len(df) + 1)
    return df


BUILTINS = ("sklearn:breast_cancer", "lifelines:lung")


def load_site_frame(cfg: RunConfig, site: SiteSpec) -> tuple[pd.DataFrame, str]:
    """The raw table of one site and a human label for where it came from."""
    if cfg.data.builtin:
        table = builtin_table(cfg.data.builtin)
        if cfg.data.site_column:
            return _rows_of_site(table, cfg, site), f"{cfg.data.builtin}[{site.name}]"
        # The partition spreads each outcome class (the event indicator for survival) across
        # the sites, so every site gets some of each.
        target = cfg.data.schema.event or cfg.data.schema.target
        if target not in table.columns:
            raise ConfigError(
                f"data.schema.target='{target}' is not a column of {cfg.data.builtin}; "
                f"columns: {', '.join(table.columns)}"
            )
        labels = np.asarray(table[target])
        shards = partition_rows(
            labels,
            sizes=cfg.data.partition_sizes or (1.0,) * len(cfg.sites),
            alpha=cfg.data.dirichlet_alpha,
            seed=cfg.data.partition_seed,
        )
        index = cfg.site_names.index(site.name)
        return table.iloc[shards[index]], f"{cfg.data.builtin}[{site.name}]"
    if not site.path:
        raise ConfigError(
            f"site '{site.name}' has no path: data.dataset='{cfg.data.dataset}' is read from each "
            "site's own registry, so run this study on a federation (`fedmed run`), or give "
            "[[sites]] paths to simulate it here"
        )
    path = resolve_site_path(site.path)
    frame = read_table(path, cfg.data.schema)
    if cfg.data.site_column:
        frame = _rows_of_site(frame, cfg, site)
    return frame, path


def _rows_of_site(table: pd.DataFrame, cfg: RunConfig, site: SiteSpec) -> pd.DataFrame:
    """The rows whose ``data.site_column`` holds one of the site's ``site_values``."""
    column = cfg.data.site_column
    if column not in table.columns:
        raise ConfigError(
            f"data.site_column='{column}' is not a column of the table; columns: "
            f"{', '.join(map(str, table.columns))}"
        )
    wanted = list(site.site_values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in wanted):
        values = pd.to_numeric(table[column], errors="coerce")
    else:  # text codes: compare as trimmed text
        values = table[column].astype("string").str.strip()
        wanted = [str(v) for v in wanted]
    rows = table[values.isin(wanted)]
    if rows.empty:
        present = sorted(values.dropna().unique().tolist(), key=str)
        raise DataError(
            f"site '{site.name}': no rows with {column} in {wanted}; values present: "
            f"{', '.join(map(str, present))}"
        )
    return rows
