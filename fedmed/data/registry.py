"""A site's dataset registry: the names its data is known by, with layout and fingerprint.

Studies name datasets ("heart"), never paths: the paths stay in this file on the site's disk.
Registering reads the data once (it must parse), records its shape and a SHA-256 of EVERY file
it is made of, so the site can tell (``fedmed site data check``) — and the ClientApp refuses to
train — when anything changed since the data steward registered it: a table, one image of a
PNG folder, its labels CSV, or a series' outcomes table.

Three kinds, one per way a hospital exports data (KINDS):

- ``table``: a CSV/TSV/Parquet file (tabular and survival studies);
- ``images``: a MedMNIST-format .npz, or a labels CSV listing PNG files (or the folder holding
  that CSV), for imaging studies;
- ``series``: a long table of observations (id, time, variable, value) plus the site's OWN
  outcomes table, for sequence studies;
- ``omop``: an OMOP CDM v5.4 database (a DuckDB file or a PostgreSQL server) and the cohort
  definition of a study's [data.omop] (tabular, survival and sequence studies). Its fingerprint
  is that of the cohort it yields (fedmed.data.omop.cohort.fingerprint), checked like a file's;
  a study must ask for exactly the registered cohort. The entry keeps the URL without any
  password and, for a server, where the password is kept ("env:NAME" / "file:PATH").

The registry also records the site's own file layout (which column lists the PNGs, what the
series columns are called): in a federation the site reads its files with that layout
(``site_view``) and never opens a path that came from the coordinator.

Format: STATE_DIR/datasets.json, {"format": "fedmed-datasets/1", "datasets": {name: entry}}.
Entries written before kinds existed are tables.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.config import (
    CREDENTIALS,
    OmopConfig,
    RunConfig,
    SchemaConfig,
    SeriesConfig,
    SiteSpec,
    parse_omop,
)
from fedmed.data.sources import read_table
from fedmed.errors import ConfigError, DataError
from fedmed.io import atomic_write, read_state_json

FORMAT = "fedmed-datasets/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SERIES_COLUMNS = ("id_column", "time_column", "variable_column", "value_column")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def combined_sha256(files: dict[str, str]) -> str:
    """One fingerprint for a dataset made of several files (a single file: its own hash)."""
    if len(files) == 1:
        return next(iter(files.values()))
    digest = hashlib.sha256()
    for path, sha in sorted(files.items()):
        digest.update(f"{path}\t{sha}\n".encode())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    name: str
    path: str
    columns: tuple[str, ...]
    rows: int
    sha256: str
    added: str
    kind: str = "table"
    outcomes: str = ""  # series: the site's outcomes table
    # Every file the dataset is made of -> its SHA-256 (multi-file kinds only).
    files: dict[str, str] = field(default_factory=dict)
    # The site's own file layout: images {"column"}, series {"id_column", ..., "outcome_id_column"}.
    layout: dict[str, str] = field(default_factory=dict)
    # omop: the registered cohort definition ([data.omop] as plain JSON values).
    cohort: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        unit = {"table": "rows", "images": "images", "series": "patients", "omop": "persons"}
        what = {"table": "columns", "images": "channels", "series": "variables"}
        return f"{self.kind}, {self.rows} {unit[self.kind]}, {len(self.columns)} " + what.get(
            self.kind, "features"
        )


def _dataset(name: str, entry: dict[str, Any]) -> Dataset:
    return Dataset(name=name, **{**entry, "columns": tuple(entry["columns"])})


@dataclass(frozen=True)
class Inspected:
    """What registering found: the entry's shape and the files it fingerprints."""

    columns: list[str]
    rows: int
    files: list[Path]
    layout: dict[str, str]


def _inspect_table(path: Path, outcomes: Path | None, layout: dict[str, str]) -> Inspected:
    _no_outcomes(path, outcomes, "table")
    frame = read_table(str(path), SchemaConfig())
    return Inspected([str(c) for c in frame.columns], len(frame), [path], {})


def _inspect_images(path: Path, outcomes: Path | None, layout: dict[str, str]) -> Inspected:
    from fedmed.data.images import CHANNELS, load_npz

    _no_outcomes(path, outcomes, "images")
    if path.suffix.lower() == ".npz":
        images, _ = load_npz(str(path))  # refuses a file without the expected arrays
        return Inspected(list(CHANNELS[images.shape[-1]]), len(images), [path], {})
    return _inspect_png_folder(_labels_csv(path), layout.get("column", "image"))


def _labels_csv(path: Path) -> Path:
    """The labels CSV itself, or the only CSV in the folder given."""
    if not path.is_dir():
        return path
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(
            f"{path}: expected one labels CSV in the folder (found: {names}); give the labels "
            "CSV itself: fedmed site data add SITE_CONFIG NAME FOLDER/labels.csv"
        )
    return found[0]


def _inspect_png_folder(labels: Path, column: str) -> Inspected:
    """Every PNG the labels CSV names must exist and decode; all of them are fingerprinted."""
    from PIL import Image, UnidentifiedImageError

    table = read_table(str(labels), SchemaConfig())
    if column not in table.columns:
        raise DataError(
            f"{labels}: no column '{column}' listing the PNG files (columns: "
            f"{', '.join(map(str, table.columns))}); pass --image-column COLUMN"
        )
    files, modes = [labels], set()
    for line, name in zip(table.index, table[column], strict=True):
        file = labels.parent / str(name)
        try:
            with Image.open(file) as img:
                img.verify()
                modes.add("L" if img.mode in ("L", "I", "I;16", "1", "P") else "RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise DataError(
                f"{labels}: row {line} names image {file}, which cannot be read "
                f"({type(exc).__name__}); fix the path (relative to the CSV's folder) or the file"
            ) from None
        files.append(file)
    channels = ["gray"] if modes == {"L"} else ["red", "green", "blue"]
    return Inspected(channels, len(table), files, {"column": column})


def _inspect_series(path: Path, outcomes: Path | None, layout: dict[str, str]) -> Inspected:
    from fedmed.data.series import load_long, read_header, read_outcome_ids

    if outcomes is None:
        raise ConfigError(
            f"{path}: a series dataset needs its outcomes table too; pass --outcomes "
            "OUTCOMES.csv (one row per patient with its 0/1 outcome)"
        )
    series = SeriesConfig(**{k: v for k, v in layout.items() if k in SERIES_FIELDS})
    header = read_header(str(path))
    names = [getattr(series, k) for k in SERIES_COLUMNS]
    absent = [c for c in names if c not in header]
    if absent:
        raise DataError(
            f"{path}: no column '{absent[0]}' (columns: {', '.join(map(str, header))}); a long "
            "table has one observation per row: patient id, time (minutes), variable, value; "
            f"name this table's columns with --series-columns ID,TIME,VARIABLE,VALUE (now: "
            f"{','.join(names)})"
        )
    long = load_long(str(path), series)
    ids = read_outcome_ids(str(outcomes), series.outcome_id_column)
    patients = long["id"].unique()
    unlabeled = sorted(set(patients.tolist()) - set(ids.tolist()))
    if unlabeled:
        raise DataError(
            f"{path}: {len(unlabeled)} patients have no row in {outcomes} (first: "
            f"{unlabeled[0]}); add their outcomes, or remove their observations"
        )
    variables = sorted(map(str, long["variable"].astype(str).unique()))
    return Inspected(
        variables,
        len(patients),
        [path, outcomes],
        {k: getattr(series, k) for k in SERIES_FIELDS},
    )


SERIES_FIELDS = (*SERIES_COLUMNS, "outcome_id_column")


def _no_outcomes(path: Path, outcomes: Path | None, kind: str) -> None:
    if outcomes is not None:
        raise ConfigError(
            f"{path}: --outcomes belongs to a series dataset, not a {kind}; drop it, or pass "
            "--kind series"
        )


Inspector = Callable[[Path, Path | None, dict[str, str]], Inspected]
KINDS: dict[str, Inspector] = {
    "table": _inspect_table,
    "images": _inspect_images,
    "series": _inspect_series,
}
# Which kind of dataset each task outcome reads (fedmed.tasks: Task.target).
KIND_OF_TARGET = {
    "binary": "table",
    "survival": "table",
    "text": "table",
    "image": "images",
    "series": "series",
}


def guess_kind(path: Path, outcomes: Path | None) -> str:
    """A .npz or a folder holds images; a table with outcomes is a series; else a table."""
    if outcomes is not None:
        return "series"
    if path.suffix.lower() == ".npz" or path.is_dir():
        return "images"
    return "table"


class DatasetRegistry:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "datasets.json"

    def _read(self) -> dict[str, Any]:
        return read_state_json(
            self.path,
            FORMAT,
            {"format": FORMAT, "datasets": {}},
            "restore it, or register the datasets again with `fedmed site data add`",
        )

    def list(self) -> list[Dataset]:
        return [_dataset(k, v) for k, v in sorted(self._read()["datasets"].items())]

    def get(self, name: str) -> Dataset:
        entry = self._read()["datasets"].get(name)
        if entry is None:
            known = ", ".join(d.name for d in self.list()) or "none yet"
            raise ConfigError(
                f"dataset '{name}' is not registered at this site (registered: {known}); "
                f"add it with: fedmed site data add SITE_CONFIG {name} PATH"
            )
        return _dataset(name, entry)

    def add(
        self,
        name: str,
        path: Path,
        *,
        kind: str | None = None,
        outcomes: Path | None = None,
        layout: dict[str, str] | None = None,
        replace: bool = False,
    ) -> Dataset:
        """Read the data once (it must parse) and record its shape and every file's hash.

        ``layout`` names the site's own columns: {"column": ...} for a PNG labels CSV,
        {"id_column", "time_column", "variable_column", "value_column", "outcome_id_column"}
        for a series (defaults: fedmed.config.SeriesConfig).
        """
        if not NAME.match(name):
            raise ConfigError(
                f"dataset name '{name}' is not allowed; use letters, digits, '.', '-' and '_'"
            )
        path = Path(path).expanduser().resolve()
        outcomes = Path(outcomes).expanduser().resolve() if outcomes is not None else None
        if not path.exists():
            what = {"images": "image folder or .npz", "series": "long table", "table": "table"}
            raise DataError(
                f"{path}: {what.get(kind or '', 'file or folder')} not found; check the path "
                "(relative to the current directory) of the data to register"
            )
        kind = kind or guess_kind(path, outcomes)
        if kind not in KINDS:
            raise ConfigError(f"dataset kind '{kind}' is not one of: {', '.join(KINDS)}")
        data = self._read()
        if name in data["datasets"] and not replace:
            raise ConfigError(
                f"dataset '{name}' is already registered; pass --replace to point it at new "
                "files (privacy spent on the old data stays in the ledger)"
            )
        found = KINDS[kind](path, outcomes, dict(layout or {}))
        files = {str(f): file_sha256(f) for f in found.files}
        entry: dict[str, Any] = {
            "path": str(found.files[0]),
            "columns": found.columns,
            "rows": found.rows,
            "sha256": combined_sha256(files),
            "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kind": kind,
        }
        if kind == "series":
            entry["outcomes"] = str(outcomes)
        if len(files) > 1:
            entry["files"] = files
        if found.layout:
            entry["layout"] = found.layout
        data["datasets"][name] = entry
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
        return _dataset(name, entry)

    def add_omop(
        self,
        name: str,
        url: str,
        omop: OmopConfig,
        *,
        credentials: str = "",
        replace: bool = False,
    ) -> Dataset:
        """Register an OMOP CDM database with the cohort ``omop`` yields, and its fingerprint.

        The cohort is extracted once (it must be readable and not empty); the entry records the
        URL (a DuckDB path made absolute; never a password), where a server's password is kept
        (``credentials``), the cohort definition, and the fingerprint of the rows it yields.
        """
        from fedmed.data.omop import cohort

        self._check_new(name, replace)
        if not omop.active:
            raise ConfigError(
                "the study has no [data.omop] cohort (data.omop.visit_concept_ids or "
                "condition_concept_ids); register the database with the study that defines its "
                "cohort: --config STUDY.toml"
            )
        if credentials and not CREDENTIALS.match(credentials):
            raise ConfigError('credentials must be "env:VARIABLE" or "file:PATH"')
        parsed = cohort.database_url(url)
        if parsed.drivername == "duckdb" and parsed.database:
            parsed = parsed.set(database=str(Path(parsed.database).expanduser().resolve()))
        url = parsed.render_as_string(hide_password=True)
        extraction = cohort.extract(url, credentials, omop)
        if extraction.cohort.empty:
            raise DataError(
                f"{extraction.origin}: the cohort is empty (no {cohort.describe_index(omop)} "
                "meets the study's criteria); check [data.omop]"
            )
        entry: dict[str, Any] = {
            "path": url,
            "columns": [f.name for f in omop.features],
            "rows": len(extraction.cohort),
            "sha256": cohort.fingerprint(extraction, omop),
            "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kind": "omop",
            "cohort": cohort.definition(omop),
        }
        if credentials:
            entry["layout"] = {"credentials": credentials}
        data = self._read()
        data["datasets"][name] = entry
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
        return _dataset(name, entry)

    def _check_new(self, name: str, replace: bool) -> None:
        if not NAME.match(name):
            raise ConfigError(
                f"dataset name '{name}' is not allowed; use letters, digits, '.', '-' and '_'"
            )
        if name in self._read()["datasets"] and not replace:
            raise ConfigError(
                f"dataset '{name}' is already registered; pass --replace to point it at new "
                "data (privacy spent on the old data stays in the ledger)"
            )

    def verify(self, name: str) -> Dataset:
        """The entry, if every file on disk is still the one registered (else DataError).

        An OMOP database: if the cohort it yields today has the registered fingerprint.
        """
        ds = self.get(name)
        if ds.kind == "omop":
            return _verify_omop(ds)
        files = ds.files or {ds.path: ds.sha256}
        fix = (
            f"check the new export, then re-register it: fedmed site data add SITE_CONFIG {name} "
            "PATH --replace"
        )
        for path, sha in sorted(files.items()):
            file = Path(path)
            if not file.is_file():
                raise DataError(f"dataset '{name}': {path} is gone; restore it, or {fix}")
            if file_sha256(file) != sha:
                raise DataError(
                    f"dataset '{name}': {path} changed since it was registered ({ds.added}); {fix}"
                )
        return ds


def _verify_omop(ds: Dataset) -> Dataset:
    """Extract the registered cohort again; a different fingerprint is refused with the fix."""
    from fedmed.data.omop import cohort

    omop = parse_omop(ds.cohort)
    extraction = cohort.extract(ds.path, ds.layout.get("credentials", ""), omop)
    if cohort.fingerprint(extraction, omop) != ds.sha256:
        raise DataError(
            f"dataset '{ds.name}': the cohort {ds.path} yields changed since it was registered "
            f"({ds.added}); check the database, then re-register it: fedmed site data add "
            f"SITE_CONFIG {ds.name} --omop URL --config STUDY --replace"
        )
    return ds


OMOP_TARGETS = ("binary", "survival", "series")


def _omop_view(
    run: RunConfig, ds: Dataset, site: str, epsilon_cap: float | None, target: str
) -> tuple[RunConfig, SiteSpec]:
    """An OMOP dataset serves a study that asks for exactly the cohort registered with it."""
    from fedmed.data.omop import cohort

    if target not in OMOP_TARGETS:
        raise DataError(
            f"dataset '{ds.name}' is an OMOP database but task '{run.task}' reads neither a "
            "table nor a series from it; register the study's data under another name"
        )
    if not run.data.omop.active or not cohort.same_definition(ds.cohort, run.data.omop):
        raise DataError(
            f"dataset '{ds.name}': the study's [data.omop] cohort is not the one registered "
            f"with it ({ds.added}); review the study's cohort, then register it: fedmed site "
            f"data add SITE_CONFIG {ds.name} --omop URL --config STUDY --replace"
        )
    local = run.replace(
        data=dataclasses.replace(run.data, builtin="", partition_file="", site_column=""),
        sites=tuple(SiteSpec(s.name) for s in run.sites),
    )
    spec = SiteSpec(
        site,
        path=ds.path,
        credentials=ds.layout.get("credentials", ""),
        epsilon_cap=epsilon_cap,
    )
    return local, spec


def site_view(
    run: RunConfig, ds: Dataset, site: str, epsilon_cap: float | None = None, *, target: str
) -> tuple[RunConfig, SiteSpec]:
    """The study as THIS site runs it on its registered dataset ``ds``.

    Every path comes from the registry: paths a plan might carry (data.partition_file,
    data.series.outcomes) are dropped, and the site's own layout (the PNG column, the series
    column names) replaces the study's. A dataset of the wrong kind for the task's outcome
    ``target`` is refused (fedmed.tasks.site_view passes the study task's target).
    """
    if ds.kind == "omop":
        return _omop_view(run, ds, site, epsilon_cap, target)
    wanted = KIND_OF_TARGET[target]
    if run.data.omop.active:
        raise DataError(
            f"dataset '{ds.name}' is registered as {ds.kind} but the study reads an OMOP "
            "cohort ([data.omop]); register the site's database: fedmed site data add "
            "SITE_CONFIG NAME --omop URL --config STUDY"
        )
    if ds.kind != wanted:
        raise DataError(
            f"dataset '{ds.name}' is registered as {ds.kind} but task '{run.task}' reads "
            f"{wanted}; register the study's data under another name with --kind {wanted}"
        )
    data = run.data
    images, series = data.images, data.series
    if ds.kind == "images" and "column" in ds.layout:
        images = dataclasses.replace(images, column=ds.layout["column"])
    if ds.kind == "series":
        layout = {k: v for k, v in ds.layout.items() if k in SERIES_FIELDS}
        series = dataclasses.replace(series, outcomes="", **layout)
    # Rows chosen by a column (site_column) are a simulation's way to carve sites out of one
    # file; a site's registered dataset is all its own.
    local = run.replace(
        data=dataclasses.replace(
            data, builtin="", partition_file="", site_column="", images=images, series=series
        ),
        sites=tuple(SiteSpec(s.name) for s in run.sites),
    )
    return local, SiteSpec(site, path=ds.path, outcomes=ds.outcomes, epsilon_cap=epsilon_cap)
