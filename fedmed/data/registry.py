"""A site's dataset registry: the names its tables are known by, with schema and fingerprint.

Studies name datasets ("heart"), never paths: the path stays in this file on the site's disk.
Registering records the columns, the row count and a SHA-256 of the file's bytes, so the site can
tell (``fedmed site data check``) — and the ClientApp refuses to train — when a table changed
since the data steward registered it.

Format: STATE_DIR/datasets.json, {"format": "fedmed-datasets/1", "datasets": {name: entry}}.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.config import SchemaConfig
from fedmed.data.sources import read_table
from fedmed.errors import ConfigError, DataError
from fedmed.report import atomic_write, read_state_json

FORMAT = "fedmed-datasets/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    name: str
    path: str
    columns: tuple[str, ...]
    rows: int
    sha256: str
    added: str


def _dataset(name: str, entry: dict[str, Any]) -> Dataset:
    return Dataset(name=name, **{**entry, "columns": tuple(entry["columns"])})


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

    def add(self, name: str, table: Path, replace: bool = False) -> Dataset:
        """Read the table once (it must parse) and record its shape and fingerprint."""
        if not NAME.match(name):
            raise ConfigError(
                f"dataset name '{name}' is not allowed; use letters, digits, '.', '-' and '_'"
            )
        table = Path(table).expanduser().resolve()
        data = self._read()
        if name in data["datasets"] and not replace:
            raise ConfigError(
                f"dataset '{name}' is already registered; pass --replace to point it at a new "
                "table (privacy spent on the old one stays in the ledger)"
            )
        frame = read_table(str(table), SchemaConfig())
        entry = {
            "path": str(table),
            "columns": [str(c) for c in frame.columns],
            "rows": len(frame),
            "sha256": file_sha256(table),
            "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        data["datasets"][name] = entry
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
        return _dataset(name, entry)

    def verify(self, name: str) -> Dataset:
        """The entry, if the file on disk is still the one registered (else DataError)."""
        ds = self.get(name)
        file = Path(ds.path)
        if not file.is_file():
            raise DataError(
                f"dataset '{name}': {ds.path} is gone; restore it or register the new location "
                f"with `fedmed site data add SITE_CONFIG {name} PATH --replace`"
            )
        if file_sha256(file) != ds.sha256:
            raise DataError(
                f"dataset '{name}': {ds.path} changed since it was registered ({ds.added}); "
                "check the new export, then re-register it with --replace"
            )
        return ds
