"""A site's audit log: every message received and sent, append-only and hash-chained.

One JSON object per line in STATE_DIR/audit.jsonl. Each entry carries the SHA-256 of the previous
entry's hash and its own content, so editing, deleting or reordering any entry breaks the chain
from there on; STATE_DIR/audit.head (rewritten atomically after each append) holds the last
sequence number and hash, so cutting entries off the END is detected too. What the log proves:
the entries are the ones written, in order. What it cannot prove: that nobody with write access
rewrote the whole chain and the head together — ship the head hash off-site (e.g. print it in the
daily report) when that matters.

Entries hold metadata only (run, round, plan hash, sizes, SHA-256 of the update, ε, outcome):
never a row, a path or model weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError
from fedmed.io import atomic_write, file_lock

GENESIS = "sha256:" + "0" * 64
FORMAT = "fedmed-audit/1"


def _digest(prev: str, body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(f"{prev}\n{text}".encode()).hexdigest()


class AuditLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "audit.jsonl"
        self.head = Path(state_dir) / "audit.head"

    def _head(self) -> tuple[int, str]:
        if not self.head.is_file():
            return 0, GENESIS
        data = json.loads(self.head.read_text())
        return int(data["seq"]), str(data["hash"])

    def append(self, **fields: Any) -> dict[str, Any]:
        """Write one entry (under an exclusive lock: ClientApp processes may overlap)."""
        with file_lock(self.path):
            seq, prev = self._head()
            body = {
                "format": FORMAT,
                "seq": seq + 1,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                **fields,
            }
            entry = {**body, "prev": prev, "hash": _digest(prev, body)}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
                f.flush()
            atomic_write(self.head, json.dumps({"seq": seq + 1, "hash": entry["hash"]}).encode())
            return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{self.path} line {n} is not JSON: the log was edited") from None
        return out

    def verify(self) -> list[str]:
        """Every break in the chain, as 'line N: what is wrong' (empty list = intact)."""
        problems: list[str] = []
        prev = GENESIS
        try:
            entries = self.entries()
        except ConfigError as exc:
            return [str(exc)]
        for n, entry in enumerate(entries, start=1):
            body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
            if entry.get("seq") != n:
                problems.append(f"line {n}: sequence {entry.get('seq')} where {n} was expected")
            if entry.get("prev") != prev:
                problems.append(f"line {n}: does not follow the entry before it")
            if _digest(str(entry.get("prev")), body) != entry.get("hash"):
                problems.append(f"line {n}: content does not match its hash (edited)")
            prev = str(entry.get("hash"))
        seq, head_hash = self._head()
        if (seq, head_hash) != (len(entries), prev):
            problems.append(
                f"the head records {seq} entries ending {head_hash[:19]}…, the log has "
                f"{len(entries)} ending {prev[:19]}… (entries removed or appended by hand)"
            )
        return problems
