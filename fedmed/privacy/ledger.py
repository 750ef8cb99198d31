"""A site's privacy ledger: every private step ever taken on a dataset, on the site's own disk.

Keyed by the dataset's fingerprint (in a deployment the registered files' SHA-256, taken before
any split or preprocessing, so another split_seed or schema does not open a fresh budget), not
by run: ε composes across rounds, runs and restarts; training twice on the same patients costs
twice. The coordinator never sees or sets the cap.

A round spends in two steps, both under the ledger's file lock:

1. ``reserve``: check that the round's PLANNED steps fit under the cap given everything already
   spent or reserved, and append the reservation. Two studies racing for the last of a budget
   cannot both pass: the second sees the first's reservation.
2. ``settle`` (after training) replaces the reservation by the steps actually taken, or
   ``cancel`` releases it when training failed before anything left the site. A reservation
   that is never settled (the process died) keeps counting: when in doubt, it was spent.

Format (JSON, one file per site, written atomically), a hash chain:
{"format": "fedmed-ledger/2", "site": "...", "entries": [
    {"seq": 0, "kind": "reserve", "id": "...", "dataset": "<sha256>", "study": "...",
     "round": 3, "release": "<sha256>", "steps": [[noise, rate, steps]], "time": "...",
     "prev": "<hash of entry seq-1>", "hash": "<sha256 of this entry without 'hash'>"},
    {"seq": 1, "kind": "settle", "id": "...", "steps": [...], ...}]}
and a head file next to it (``<site>.head.json``: the number of entries and the last hash).
An edited entry (negative steps, a lower noise), a removed or reordered one, a truncated or
deleted ledger are all detected, and the site refuses to train until the operator restores the
ledger from backup. Like the audit log, someone who rewrites ledger and head together is not
caught: copy the head off the machine when that matters.

``release`` identifies what a round computed: a hash of the global model it started from, its
seed and the study plan. A coordinator that resumes after a crash may ask for a round the site
already trained; with the same release the site's DP-SGD is deterministic and reproduces the very
same update, so publishing it again reveals nothing new and is not charged twice. Any change (a
different model, seed or plan) is a new release and is charged.

A fedmed-ledger/1 file (no chain) is upgraded in place on first use: its rows become settled
entries of the chain, under the dataset key they were recorded with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import PrivacyConfig, ledger_dir
from fedmed.errors import ConfigError, PrivacyBudgetExceeded
from fedmed.io import atomic_write, file_lock
from fedmed.privacy.accounting import Entry, epsilon_spent

FORMAT = "fedmed-ledger/2"
LEGACY_FORMAT = "fedmed-ledger/1"
KINDS = ("reserve", "settle", "cancel")
GENESIS = "0" * 64


class LedgerDamaged(ConfigError):
    """The ledger or its head does not verify: spending cannot be known, so nothing trains."""


def fingerprint(*arrays: np.ndarray) -> str:
    """SHA-256 over the exact training arrays (values, dtype and shape)."""
    digest = hashlib.sha256()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _valid_steps(steps: Any) -> bool:
    """[[noise > 0, 0 < rate <= 1, steps >= 0 (an integer)], ...]"""
    if not isinstance(steps, list):
        return False
    for item in steps:
        if not (isinstance(item, list) and len(item) == 3):
            return False
        noise, rate, n = item
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in item):
            return False
        if not (math.isfinite(noise) and noise > 0 and 0 < rate <= 1):
            return False
        if not (isinstance(n, int) and n >= 0):
            return False
    return True


@dataclass(frozen=True)
class Reservation:
    """A round's planned spending, held in the ledger until it is settled or cancelled."""

    id: str
    dataset: str


class PrivacyLedger:
    """The ledger file of one site (and its head file, in the same folder)."""

    def __init__(self, site: str, directory: Path | None = None) -> None:
        self.site = site
        folder = directory or ledger_dir()
        self.path = folder / f"{site}.json"
        self.head_path = folder / f"{site}.head.json"

    # -- reading and verifying ---------------------------------------------------------------

    def _damaged(self, what: str) -> LedgerDamaged:
        return LedgerDamaged(
            f"privacy ledger {self.path} {what}; restore it (and {self.head_path.name}) from "
            "backup; never delete or edit a ledger: that would forget privacy already spent"
        )

    def _read(self) -> list[dict[str, Any]]:
        """Every entry, verified against the chain and the head; LedgerDamaged if not."""
        head = self._read_head()
        if not self.path.is_file():
            if head["count"]:
                raise self._damaged("is missing but its head records entries")
            return []
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._damaged("is not valid JSON") from None
        if not isinstance(data, dict):
            raise self._damaged("is not a ledger")
        if data.get("format") == LEGACY_FORMAT and not head["count"]:
            return self._upgrade(data)
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise self._damaged(f"is not a {FORMAT} file")
        entries: list[dict[str, Any]] = data["entries"]
        self._verify(entries)
        last = entries[-1]["hash"] if entries else GENESIS
        if head["count"] != len(entries) or head["hash"] != last:
            raise self._damaged("does not match its head (entries removed, cut off or rewritten)")
        return entries

    def _read_head(self) -> dict[str, Any]:
        if not self.head_path.is_file():
            return {"count": 0, "hash": GENESIS}
        try:
            head = json.loads(self.head_path.read_text())
            return {"count": int(head["count"]), "hash": str(head["hash"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise self._damaged("has an unreadable head file") from None

    def _verify(self, entries: list[dict[str, Any]]) -> None:
        prev = GENESIS
        for seq, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("seq") != seq:
                raise self._damaged(f"has an entry out of place at #{seq}")
            if entry.get("prev") != prev or entry.get("hash") != _entry_hash(entry):
                raise self._damaged(f"has an edited entry at #{seq}")
            if entry.get("kind") not in KINDS or not _valid_steps(entry.get("steps", [])):
                raise self._damaged(f"has an invalid entry at #{seq}")
            prev = entry["hash"]

    def _upgrade(self, legacy: dict[str, Any]) -> list[dict[str, Any]]:
        """A fedmed-ledger/1 file as chain entries (settled), written back with a head."""
        entries: list[dict[str, Any]] = []
        for dataset, rows in legacy.get("datasets", {}).items():
            for row in rows:
                steps = [[float(row["noise"]), float(row["rate"]), int(row["steps"])]]
                common = {
                    "id": uuid.uuid4().hex,
                    "dataset": dataset,
                    "study": row["study"],
                    "round": int(row["round"]),
                    "release": row.get("release", ""),
                    "steps": steps,
                    "time": row.get("time", ""),
                }
                self._append(entries, {"kind": "reserve", **common})
                self._append(entries, {"kind": "settle", **common})
        self._verify(entries)
        self._write(entries)
        return entries

    def _append(self, entries: list[dict[str, Any]], fields: dict[str, Any]) -> None:
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **fields,
            "seq": len(entries),
            "prev": entries[-1]["hash"] if entries else GENESIS,
        }
        entry["hash"] = _entry_hash(entry)
        entries.append(entry)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Ledger first, then head: a crash in between leaves a head one step behind, which
        reads as damage (never as less spending)."""
        data = {"format": FORMAT, "site": self.site, "entries": entries}
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
        last = entries[-1]["hash"] if entries else GENESIS
        head = {"count": len(entries), "hash": last}
        atomic_write(self.head_path, (json.dumps(head) + "\n").encode())

    def verify(self) -> None:
        """Raise LedgerDamaged unless the ledger and its head verify."""
        with file_lock(self.path):
            self._read()

    # -- what has been spent -----------------------------------------------------------------

    @staticmethod
    def _effective(
        entries: Iterable[dict[str, Any]], datasets: set[str], study: str | None
    ) -> list[dict[str, Any]]:
        """Reservations of ``datasets`` with the steps that count: settled ones as settled,
        cancelled ones not at all, open ones as planned."""
        rows: dict[str, dict[str, Any]] = {}
        for e in entries:
            if e["kind"] == "reserve":
                if e["dataset"] in datasets and (study is None or e["study"] == study):
                    rows[e["id"]] = dict(e)
            elif e["id"] in rows:
                if e["kind"] == "settle":
                    rows[e["id"]]["steps"] = e["steps"]
                    rows[e["id"]]["kind"] = "settle"
                else:
                    del rows[e["id"]]
        return list(rows.values())

    def records(
        self, dataset: str, study: str | None = None, aliases: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """The rounds that count against ``dataset`` (study, round, release, steps, kind)."""
        with file_lock(self.path):
            entries = self._read()
        return self._effective(entries, {dataset, *aliases}, study)

    def entries(
        self, dataset: str, study: str | None = None, aliases: Iterable[str] = ()
    ) -> list[Entry]:
        return _steps(self.records(dataset, study, aliases))

    def spent(
        self,
        dataset: str,
        privacy: PrivacyConfig,
        study: str | None = None,
        aliases: Iterable[str] = (),
    ) -> float:
        """ε spent on ``dataset`` (all studies, or just ``study``), reservations included."""
        return epsilon_spent(self.entries(dataset, study, aliases), privacy)

    def spending(
        self, dataset: str, privacy: PrivacyConfig, study: str, aliases: Iterable[str] = ()
    ) -> tuple[float, float]:
        """(ε spent by ``study``, ε spent by all studies) on ``dataset``, from ONE verified read.

        What a site reports after every round: two ``spent`` calls would read, verify and
        parse the whole ledger twice, and a writer could slip in between the two.
        """
        with file_lock(self.path):
            entries = self._read()
        keys = {dataset, *aliases}
        held = self._effective(entries, keys, None)
        own = [r for r in held if r["study"] == study]
        return epsilon_spent(_steps(own), privacy), epsilon_spent(_steps(held), privacy)

    # -- spending ----------------------------------------------------------------------------

    def reserve(
        self,
        dataset: str,
        study: str,
        rnd: int,
        planned: list[Entry],
        privacy: PrivacyConfig,
        cap: float | None,
        *,
        release: str = "",
        aliases: Iterable[str] = (),
    ) -> Reservation | None:
        """Hold ``planned`` against the cap, atomically; None if this release is already held.

        PrivacyBudgetExceeded if everything spent or reserved plus ``planned`` would pass
        ``cap`` (at ``privacy.delta``, the site's own δ).
        """
        keys = {dataset, *aliases}
        with file_lock(self.path):
            entries = self._read()
            held = self._effective(entries, keys, None)
            if release and any(
                r["study"] == study and r["round"] == rnd and r["release"] == release for r in held
            ):
                return None
            if cap is not None:
                projected = epsilon_spent(_steps(held) + list(planned), privacy)
                if projected > cap:
                    raise PrivacyBudgetExceeded(
                        f"site '{self.site}': this round would bring ε to {projected:.3f}, over "
                        f"the site's cap of {cap:g}; raise the cap in the site's own config "
                        "only if the data steward agrees"
                    )
            reservation = Reservation(uuid.uuid4().hex, dataset)
            self._append(
                entries,
                {
                    "kind": "reserve",
                    "id": reservation.id,
                    "dataset": dataset,
                    "study": study,
                    "round": int(rnd),
                    "release": release,
                    "steps": [[float(n), float(q), int(s)] for n, q, s in planned],
                },
            )
            self._write(entries)
            return reservation

    def settle(self, reservation: Reservation, actual: list[Entry]) -> None:
        """Replace the reservation by the steps the round actually took."""
        self._close(reservation, "settle", [[float(n), float(q), int(s)] for n, q, s in actual])

    def cancel(self, reservation: Reservation) -> None:
        """Release a reservation whose round failed before anything left the site."""
        self._close(reservation, "cancel", [])

    def _close(self, reservation: Reservation, kind: str, steps: list[list[Any]]) -> None:
        with file_lock(self.path):
            entries = self._read()
            if not any(e["kind"] == "reserve" and e["id"] == reservation.id for e in entries):
                raise self._damaged(f"lost reservation {reservation.id}")
            self._append(entries, {"kind": kind, "id": reservation.id, "steps": steps})
            self._write(entries)

    # -- one-step forms (simulations' tests, tools) ------------------------------------------

    def check(
        self, dataset: str, privacy: PrivacyConfig, planned: list[Entry], cap: float | None
    ) -> None:
        """Refuse (PrivacyBudgetExceeded) if ``planned`` would take the dataset past ``cap``.

        Advisory only (nothing is held): spending paths use ``reserve``.
        """
        if cap is None:
            return
        projected = epsilon_spent(self.entries(dataset) + planned, privacy)
        if projected > cap:
            raise PrivacyBudgetExceeded(
                f"site '{self.site}': this round would bring ε to {projected:.3f}, over the "
                f"site's cap of {cap:g}; raise the cap in the site's own config only if the "
                "data steward agrees"
            )

    def has_release(self, dataset: str, study: str, rnd: int, release: str) -> bool:
        """Whether this exact round (same study, round and release) is already recorded."""
        return any(
            r["study"] == study and r["round"] == rnd and r["release"] == release
            for r in self.records(dataset)
        )

    def record(
        self, dataset: str, study: str, rnd: int, new: list[Entry], release: str = ""
    ) -> bool:
        """Append steps already taken (reserve + settle, no cap); False if already recorded."""
        held = self.reserve(dataset, study, rnd, new, _NO_CAP, None, release=release)
        if held is None:
            return False
        self.settle(held, new)
        return True


def _steps(records: Iterable[dict[str, Any]]) -> list[Entry]:
    """The accountant entries of ``records`` (effective reservations), in ledger order."""
    return [(float(s[0]), float(s[1]), int(s[2])) for r in records for s in r["steps"]]


_NO_CAP = PrivacyConfig(enabled=True)  # unused by reserve() when cap is None
