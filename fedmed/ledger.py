"""A site's privacy ledger: every private step ever taken on a dataset, on the site's own disk.

Keyed by a fingerprint of the dataset (not by run), so ε composes across rounds, runs and restarts:
training twice on the same patients costs twice. The site's cap is checked against the ledger
BEFORE a round trains; the coordinator never sees or sets it.

Format (JSON, one file per site, written atomically under an exclusive lock):
{"format": "fedmed-ledger/1", "site": "...", "datasets": {"<sha256>": [
    {"study": "...", "round": 3, "noise": 1.2, "rate": 0.05, "steps": 40, "time": "...",
     "release": "<sha256>"}]}}

``release`` identifies what a round computed: a hash of the global model it started from, its
seed and the study plan. A coordinator that resumes after a crash may ask for a round the site
already trained; with the same release the site's DP-SGD is deterministic and reproduces the very
same update, so publishing it again reveals nothing new and is not charged twice. Any change (a
different model, seed or plan) is a new release and is charged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import PrivacyConfig
from fedmed.errors import PrivacyBudgetExceeded
from fedmed.privacy import Entry, epsilon_spent
from fedmed.report import atomic_write, file_lock, read_state_json

FORMAT = "fedmed-ledger/1"


def ledger_dir() -> Path:
    """$FEDMED_LEDGER_DIR, else ~/.fedmed/ledger."""
    return Path(os.environ.get("FEDMED_LEDGER_DIR", Path.home() / ".fedmed" / "ledger"))


def fingerprint(*arrays: np.ndarray) -> str:
    """SHA-256 over the exact training arrays (values, dtype and shape)."""
    digest = hashlib.sha256()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class PrivacyLedger:
    """The ledger file of one site."""

    def __init__(self, site: str, directory: Path | None = None) -> None:
        self.site = site
        self.path = (directory or ledger_dir()) / f"{site}.json"

    def _read(self) -> dict[str, Any]:
        return read_state_json(
            self.path,
            FORMAT,
            {"format": FORMAT, "site": self.site, "datasets": {}},
            "restore it from backup (never delete a ledger: that would forget privacy already "
            "spent)",
        )

    def entries(self, dataset: str, study: str | None = None) -> list[Entry]:
        rows = self._read()["datasets"].get(dataset, [])
        return [
            (r["noise"], r["rate"], r["steps"])
            for r in rows
            if study is None or r["study"] == study
        ]

    def spent(self, dataset: str, privacy: PrivacyConfig, study: str | None = None) -> float:
        """ε spent on ``dataset`` (all studies, or just ``study``)."""
        return epsilon_spent(self.entries(dataset, study), privacy)

    def check(
        self, dataset: str, privacy: PrivacyConfig, planned: list[Entry], cap: float | None
    ) -> None:
        """Refuse (PrivacyBudgetExceeded) if ``planned`` would take the dataset past ``cap``."""
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
            r["study"] == study and r["round"] == rnd and r.get("release") == release
            for r in self._read()["datasets"].get(dataset, [])
        )

    def record(
        self, dataset: str, study: str, rnd: int, new: list[Entry], release: str = ""
    ) -> bool:
        """Append this round's steps (under lock, atomically); False if already recorded.

        A replay of a recorded ``release`` (see the module docstring) adds nothing.
        """
        with file_lock(self.path):
            if release and self.has_release(dataset, study, rnd, release):
                return False
            data = self._read()
            rows = data["datasets"].setdefault(dataset, [])
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            for noise, rate, steps in new:
                rows.append(
                    {
                        "study": study,
                        "round": rnd,
                        "noise": float(noise),
                        "rate": float(rate),
                        "steps": int(steps),
                        "time": now,
                        "release": release,
                    }
                )
            atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
            return True
