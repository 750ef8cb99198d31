"""File helpers with no domain logic (the ground floor STYLE.md names; atomic_write and
file_lock still live in fedmed.report until the restructure moves them here)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def private_secret(path: Path, *, fresh: bool = False, nbytes: int = 32) -> bytes:
    """A random secret kept in a 0600 file: made on first use, then read back.

    ``fresh`` replaces it now (a daemon's per-start secret). A new file is written whole under a
    temporary name and then linked (or renamed) into place, so two processes racing to create it
    end up sharing one secret and a reader never sees it half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh or not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(nbytes))
        if fresh:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
    return path.read_bytes()


def json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write null (e.g. ROC-AUC on a one-class test split)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock (PATH.lock) around a read-modify-write of PATH shared by processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state_json(path: Path, fmt: str, empty: dict[str, Any], fix: str) -> dict[str, Any]:
    """A site's state file (ledger, registry): ``empty`` when absent, refused when damaged."""
    from fedmed.errors import ConfigError

    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; {fix}") from None
    if data.get("format") != fmt:
        raise ConfigError(f"{path} is not a {fmt} file; {fix}")
    return data


def write_json(path: Path, payload: dict[str, Any], *, indent: int | None = 2) -> None:
    """``indent=None`` for files rewritten often and read by programs (live.json): Python's
    json encodes indented output in pure Python, ~5x slower than its C encoder."""
    text = json.dumps(json_safe(payload), indent=indent, sort_keys=False)
    atomic_write(path, (text + "\n").encode())
