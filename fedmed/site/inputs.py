"""A message's inputs at a site: the plan it carries, which site this node is, and its data.

Every message carries the whole plan (all N sites), and what a site makes of it is the same for
the whole run, so it is worked out once per plan in a process and kept until other plans arrive:
the parsed plan (``config.plan_from_json``), its per-round train settings (``train.lr_decay``),
and each site's loaded, validated and preprocessed data with its ledger key.

Kept per plan, not in a small LRU of sites: an in-process simulation of 1,000 sites, or a Ray
actor serving hundreds, reuses every site's data every round, where an LRU of 32 sites missed on
almost every message and re-read, re-validated and re-preprocessed the table (35-50 ms each).
The last ``PLANS_KEPT`` plans are kept (a study interleaving with another does not evict it);
an older plan and all its sites' data are dropped together.

Keyed by the plan's exact text, not its plan hash (``security.policy.plan_digest``): the hash
leaves out, by design, settings a site need not approve that still change what it loads (a
consortium's series mean/std filled in during the run; in a simulation the site-owned file and
column names), so two plans with one hash may need different data. The text's digest is taken
once per plan; within a plan, data is keyed by the site and its registered files' fingerprint,
so data re-registered at a site is read afresh.

A deployed site runs every message in a fresh child forked by its warm executor
(fedmed.runtime.executor), where memory starts empty. There the prepared arrays are also kept on
the site's own disk, in the executor's cache folder ($FEDMED_CACHE_DIR = <state_dir>/cache,
files 0600): one folder per plan digest (the last ``PLANS_KEPT`` kept), one .npz per site view
and registered fingerprint, read without pickle. What is cached is derived from data already on
that machine and never leaves it; a file that fails to read is ignored and the data loaded again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context

from fedmed.config import (
    RunConfig,
    SiteConfig,
    SiteSpec,
    cache_dir,
    data_dir,
    plain,
    plan_from_json,
)
from fedmed.data import clear_file_caches
from fedmed.data.table import SiteData
from fedmed.errors import FedmedError, PolicyViolation
from fedmed.io import atomic_write, private_secret
from fedmed.privacy.ledger import fingerprint
from fedmed.security.policy import site_config
from fedmed.tasks import load_site_data

PLANS_KEPT = 2  # plans whose sites' data are kept (see the module docstring)
NOISE_KEY = "noise.key"  # in a deployed site's state_dir: the secret part of its noise seeds
log = logging.getLogger("fedmed.site")


@dataclass(frozen=True)
class SiteInputs:
    """What one message at one site works with.

    ``run`` is the study as this site runs it (in a deployment, mapped onto its registered
    dataset); ``ledger_key`` the identity of its data for the privacy ledger (see
    ``ledger_key``); ``plan`` the per-plan cache it came from.
    """

    run: RunConfig
    site: SiteSpec
    data: SiteData
    ledger_key: str
    plan: PlanInputs


@dataclass(frozen=True)
class _Loaded:
    data: SiteData
    ledger_key: str


class PlanInputs:
    """One plan (its JSON text) as this process runs it: parsed once, each site loaded once."""

    def __init__(self, text: str) -> None:
        self.run = plan_from_json(text)
        self.digest = hashlib.sha256(text.encode()).hexdigest()  # once per plan, not message
        self._sites: dict[Hashable, _Loaded] = {}
        self._rounds: dict[int, RunConfig] = {}

    def at_round(self, run: RunConfig, server_round: int) -> RunConfig:
        """``run`` with round ``server_round``'s train settings (lr_decay), built once per round.

        A RunConfig is validated whole when built (every site listed), so it is not rebuilt per
        message; without a decay the plan itself is returned.
        """
        train = run.train.at_round(server_round)
        if train == run.train:  # no decay, or round 1
            return run
        if run is not self.run:  # a deployed site's own view: one per message anyway
            return run.replace(train=train)
        if server_round not in self._rounds:
            self._rounds[server_round] = run.replace(train=train)
        return self._rounds[server_round]

    def site_data(self, run: RunConfig, site: SiteSpec, registered: str) -> _Loaded:
        """The site's prepared data and ledger key, loaded on first use within this plan.

        ``registered`` (the registered files' SHA-256; "" in a simulation) is part of the key:
        data re-registered at the same path is read afresh, never served from memory. A deployed
        site's ``run`` is its own view of the plan (its registry's layout): keyed too.
        """
        key = (site, registered, None if run is self.run else run.data)
        loaded = self._sites.get(key)
        if loaded is None:
            disk = self._disk_path(run, site, registered)
            data = _read_cached(disk) if disk is not None else None
            if data is None:
                if registered:
                    # The readers also cache files by path (simulated sites share one file); a
                    # deployment site reads them afresh, so re-registered files are read again.
                    clear_file_caches()
                data = load_site_data(run, site)
                if disk is not None:
                    _write_cached(disk, data)
            loaded = _Loaded(data, registered or simulated_key(run, site, data))
            self._sites[key] = loaded  # one assignment: safe with the grid's site threads
        return loaded

    def _disk_path(self, run: RunConfig, site: SiteSpec, registered: str) -> Path | None:
        """Where a deployed site's forked children share this data: only with a cache folder
        (set by the site executor) and registered files (their SHA-256 is in the key)."""
        root = cache_dir()
        if root is None or not registered:
            return None
        view = json.dumps([plain(run.data), plain(site), registered], sort_keys=True, default=str)
        name = hashlib.sha256(view.encode()).hexdigest()[:32]
        return root / "site-data" / self.digest[:32] / f"{name}.npz"


ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cached(path: Path) -> SiteData | None:
    """A site's data as a sibling child left it; None when absent or unreadable (reload)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in ARRAYS}
            meta = json.loads(str(saved["meta"]))
        os.utime(path.parent)  # in use: the plan folders kept are the recently used ones
        return SiteData(
            name=str(meta["name"]),
            input_names=tuple(meta["input_names"]),
            preprocessing=meta["preprocessing"],
            **arrays,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the cached data in %s (%s); loading it again", path, exc)
        return None


def _write_cached(path: Path, data: SiteData) -> None:
    """Keep ``data`` for the next children (when it is plain arrays and JSON: no pickle), and
    drop the folders of plans older than the last ``PLANS_KEPT``."""
    meta = {"name": data.name, "input_names": list(data.input_names)}
    try:
        text = json.dumps({**meta, "preprocessing": data.preprocessing})
    except (TypeError, ValueError):
        return
    arrays = {k: getattr(data, k) for k in ARRAYS}
    if json.loads(text)["preprocessing"] != data.preprocessing or any(
        a.dtype.hasobject for a in arrays.values()
    ):
        return  # would not read back as it is (tuples, objects): load it each time instead
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(text), **arrays)
    try:
        atomic_write(path, buffer.getvalue())  # 0600, and never seen half-written
        plans = sorted(path.parent.parent.iterdir(), key=_mtime, reverse=True)
    except OSError as exc:  # e.g. another child dropping this folder: the next one writes it
        log.warning("could not keep the data in %s (%s)", path, exc)
        return
    for old in plans[PLANS_KEPT:]:
        if old != path.parent:
            shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another child
        return 0.0


@functools.lru_cache(maxsize=PLANS_KEPT)
def plan_inputs(text: str) -> PlanInputs:
    """The per-plan cache of plan ``text``; a new plan evicts the least recently used one."""
    return PlanInputs(text)


def site_inputs(text: str, context: Context) -> SiteInputs:
    """The plan ``text`` as this node's site runs it, with the site's data and ledger key."""
    plan = plan_inputs(text)
    run, site, registered = site_of(plan.run, context)
    loaded = plan.site_data(run, site, registered)
    own = site_config(context)
    if own is not None and loaded.data.n_train + len(loaded.data.y_test) < own.min_rows:
        raise PolicyViolation(
            f"the dataset has fewer rows than the site's minimum ({own.min_rows})"
        )
    return SiteInputs(run, site, loaded.data, loaded.ledger_key, plan)


def site_of(run: RunConfig, context: Context) -> tuple[RunConfig, SiteSpec, str]:
    """Which site this node is, the study as it runs here, and its data's fingerprint.

    A deployment site's paths, file layout and cap come from its own config and dataset
    registry (fedmed.data.registry.site_view), never from the plan; the registry verifies the
    files' SHA-256 on every message, so a changed file is never trained on unnoticed.
    """
    own = site_config(context)
    if own is not None:
        from fedmed.data.registry import DatasetRegistry
        from fedmed.tasks import site_view

        registry = DatasetRegistry(own.state_path)
        if run.data.dataset not in {d.name for d in registry.list()}:
            raise PolicyViolation(f"dataset '{run.data.dataset}' is not registered at this site")
        dataset = registry.verify(run.data.dataset)
        local, site = site_view(run, dataset, own.name, own.epsilon_cap)
        return local, site, dataset.sha256
    index = int(context.node_config.get("partition-id", -1))
    if not 0 <= index < len(run.sites):
        raise FedmedError(
            f"node has partition-id {index} but the study lists {len(run.sites)} sites"
        )
    return run, run.sites[index], ""


def simulated_key(run: RunConfig, site: SiteSpec, data: SiteData) -> str:
    """A simulated site's data identity for its ledger: its file (and the rows chosen by
    site_values), else the training arrays of a builtin or partitioned table (those have no file
    of their own).

    The identity is taken BEFORE any split or preprocessing, so a plan with another split_seed,
    test_fraction or schema spends from the same budget.
    """
    path = Path(site.path.replace("{data_dir}", str(data_dir()))) if site.path else None
    if path is None or run.data.builtin or run.data.partition_file or not path.is_file():
        return fingerprint(data.x_train, data.y_train)
    digest = hashlib.sha256(json.dumps(list(site.site_values), default=str).encode())
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def site_secret(own: SiteConfig) -> bytes:
    """The deployed site's 256-bit secret (created 0600 in its state_dir on first use) that keys
    every noise it draws: DP-SGD's seeds (fedmed.site.app) and its statistics' noise
    (fedmed.site.stats), so no one who knows the plan can regenerate and subtract the noise."""
    path = own.state_path / NOISE_KEY
    secret = private_secret(path)
    if len(secret) < 32:
        raise FedmedError(f"{path} is damaged; delete it (a new secret is made) and retry")
    return secret
