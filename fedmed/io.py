"""File helpers with no domain logic (the ground floor STYLE.md names; atomic_write and
file_lock still live in fedmed.report until the restructure moves them here)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


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
