"""A site's answer to the study's statistics queries (Flower-free; the handlers are in app.py).

Only counts leave, on edges the site did not choose from its own rows: pass 1 on the public
coarse grid (fedmed.data.summary.COARSE_EDGES), pass 2 on the edges the coordinator set from
the POOLED pass-1 counts. The site's own controls decide what is sent (fedmed.privacy.release):
its minimum cell count (never below the plan's) and, when it sets statistics_epsilon, Gaussian
noise whose ε is recorded in its privacy ledger for this dataset before anything is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context

from fedmed.config import PrivacyConfig, RunConfig, SiteConfig, SiteSpec, plan_from_json
from fedmed.data.summary import SiteRows, first_pass, read_site_rows, second_pass, sensitivity
from fedmed.errors import FedmedError, PolicyViolation
from fedmed.io import file_lock, read_state_json, write_json
from fedmed.privacy.accounting import site_delta
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import (
    add_noise,
    ledger_entry,
    noise_generator,
    noise_multiplier,
    publishable_sums,
    suppress,
)
from fedmed.protocol import STATS_PASSES, decode_edges, encode_stats, flatten_counts
from fedmed.security.policy import site_config
from fedmed.site.inputs import site_inputs, site_secret
from fedmed.tasks import get_task

log = logging.getLogger("fedmed.site")
STATS_ROUND = 0  # the ledger's round of a statistics release (training rounds start at 1)


def controls(run: RunConfig, own: SiteConfig | None) -> tuple[int, float]:
    """(minimum cell count, ε) this site applies: its own config's, never laxer than the plan's.

    A simulated site follows the study's [stats]. A deployed one uses the larger of its own and
    the plan's minimum, and the smaller non-zero ε of the two (a study may ask for more noise;
    it can never ask for less than the site's).
    """
    if own is None:
        return run.stats.min_cell, run.stats.epsilon
    epsilons = [e for e in (own.statistics_epsilon, run.stats.epsilon) if e]
    return max(own.statistics_min_cell, run.stats.min_cell), min(epsilons, default=0.0)


def statistics_reply(
    run_json: str, context: Context, phase: str, study: str, edges_json: str = ""
) -> tuple[SiteSpec, str]:
    """This site's protected counts for pass ``phase`` of study ``study``, as wire JSON."""
    own = site_config(context)
    if own is not None and own.require_secure_aggregation:
        raise PolicyViolation(
            "the site releases statistics only under SecAgg+ ([stats] secure_aggregation = true)"
        )
    if plan_from_json(run_json).secure_statistics:
        raise PolicyViolation("the plan sums statistics under SecAgg+; they are not sent in clear")
    release = _release(run_json, context, phase, study, edges_json)
    min_cell, epsilon = release.min_cell, release.epsilon
    out: dict[str, Any] = suppress(release.cells, min_cell)
    # Pass 1 as this site sent it decides which sums may go (never any under noise).
    sums = release.sums
    first = suppress(first_pass(release.rows), min_cell) if sums and not epsilon else {}
    shown = publishable_sums(sums, first, min_cell, bool(epsilon))
    return release.site, encode_stats(out, shown, epsilon=release.spent, min_cell=min_cell)


def masked_statistics(
    run_json: str, context: Context, phase: str, study: str, edges_json: str, layout_json: str
) -> tuple[SiteSpec, np.ndarray, dict[str, float]]:
    """This site's counts for pass ``phase`` as the one vector it masks under SecAgg+, and the
    metrics that travel beside it in the clear (the ε it spent, the minimum it asks for).

    Unsuppressed: the only output of a masked vector is the sum over the sites, and suppressing
    a site's small cells before summing would only bias the pooled cell the coordinator
    suppresses anyway. With noise, each site adds its OWN full noise before masking (σ = z·Δ,
    not clipped at 0), so its ε holds even if every other site colludes with the
    coordinator. No sums of values: they are not counts, and Flower's quantization is exact
    only for counts (fedmed.protocol.flatten_counts).
    """
    release = _release(run_json, context, phase, study, edges_json, layout_json=layout_json)
    vector = _masked_vector(release.cells, layout_json)
    metrics = {"epsilon": release.spent, "min-cell": float(release.min_cell)}
    return release.site, vector, metrics


def _masked_vector(cells: dict[str, list[int]], layout_json: str) -> np.ndarray:
    try:
        return flatten_counts(cells, layout_json)
    except ValueError as exc:
        raise PolicyViolation(str(exc)) from None


@dataclass(frozen=True)
class _Release:
    """One pass's counts at this site, noised if it says so and charged to its ledger."""

    site: SiteSpec
    rows: SiteRows
    cells: dict[str, list[int]]
    sums: dict[str, list[float]]
    min_cell: int
    epsilon: float  # the ε this site applies to the study's statistics (0: no noise)
    spent: float  # the ε its ledger holds for them


def _release(
    run_json: str,
    context: Context,
    phase: str,
    study: str,
    edges_json: str,
    *,
    layout_json: str | None = None,
) -> _Release:
    """The counts of pass ``phase`` (and sums, when they may go), charged before anything is
    sent. ``layout_json``: masked under SecAgg+ in that layout, so the noisy counts are not
    clipped at 0 (a sum of clipped counts would be biased upward)."""
    masked = layout_json is not None
    own = site_config(context)
    if own is not None and not own.share_statistics:
        raise PolicyViolation("the site does not share statistics (share_statistics)")
    if phase not in STATS_PASSES:
        raise FedmedError(f"unknown statistics pass '{phase}'")
    inputs = site_inputs(run_json, context)  # validated data, the site's min_rows, ledger key
    run, site = inputs.run, inputs.site
    rows = read_site_rows(run, site, get_task(run.task).target)
    min_cell, epsilon = controls(run, own)
    sums: dict[str, list[float]] = {}
    if phase == STATS_PASSES[0]:
        cells = first_pass(rows)
    else:
        edges = decode_edges(edges_json)
        unknown = set(edges["features"]) - set(rows.numeric)
        if unknown or (edges["km"] is not None and rows.time is None):
            raise PolicyViolation("the statistics query asks for features this study lacks")
        cells, sums = second_pass(rows, edges["features"], edges["km"])
    # What is released: this pass, its edges, the plan, and the data itself (data registered
    # anew is a new release with new noise: two releases of different counts under the same
    # noise would give their difference away exactly). Masked or not is part of the question.
    if layout_json is not None:  # a query this site cannot mask is refused before any charge
        _masked_vector(cells, layout_json)
    how = "/secagg" if masked else ""
    what = f"{phase}/{edges_json}/{inputs.plan.digest}/{inputs.ledger_key}{how}"
    release = hashlib.sha256(what.encode()).hexdigest()
    if own is not None:
        _answer_once(own, inputs.ledger_key, inputs.plan.digest, phase, release, replay=not masked)
    spent = 0.0
    if epsilon:
        # Charged under the plan it answers, not the run that asked: another run of the plan
        # asks the same question, draws the same noise, learns nothing new and pays nothing.
        charged = f"statistics {inputs.plan.digest[:16]}"
        delta = site_delta(own.delta if own else None, rows.n)
        z = noise_multiplier(epsilon, delta)
        ledger = PrivacyLedger(site.name, own.state_path / "ledger" if own else None)
        privacy = PrivacyConfig(enabled=True, delta=delta)
        held = ledger.reserve(
            inputs.ledger_key,
            charged,
            STATS_ROUND,
            ledger_entry(z),
            privacy,
            site.epsilon_cap,
            release=release,
        )  # None: this very release was charged before, and replays the same noise
        if held is not None:
            ledger.settle(held, ledger_entry(z))
        sigma = z * sensitivity(cells)
        rng = noise_generator(_noise_seed(run, site, release, own))
        cells = add_noise(cells, sigma, rng, floor=None if masked else 0)
        spent = ledger.spending(inputs.ledger_key, privacy, charged)[0]
        log.info(
            "site %s: statistics %s of %s with noise σ=%.2f, ε=%.3f",
            site.name,
            phase,
            study,
            sigma,
            spent,
        )
    return _Release(site, rows, cells, {} if masked else sums, min_cell, epsilon, spent)


ANSWERED = "statistics.json"  # in a deployed site's state_dir: what each pass released
ANSWERED_FORMAT = "fedmed-statistics-answered/1"


def _answer_once(
    own: SiteConfig, dataset: str, plan: str, phase: str, release: str, *, replay: bool = True
) -> None:
    """A deployed site answers each pass of an approved plan on a dataset with ONE release.

    Suppression protects one table, not two: asked again with shifted edges, a site's counts
    could be differenced down to a single patient. The shared edges follow from the pooled
    pass-1 counts, so rerunning the same plan asks the same question (a replay, answered
    again); other edges for the same plan and data are refused, and a new question needs a new
    plan, which the steward approves by hash.

    Not under SecAgg+ (``replay=False``): there a replay is a new SUM, and a coordinator that
    left one site out of the second (or claimed it dropped out) would get that site's counts
    by subtracting the two. A masked release is answered once; a rerun needs a new plan.
    """
    path = own.state_path / ANSWERED
    empty = {"format": ANSWERED_FORMAT, "answered": {}}
    with file_lock(path):
        state = read_state_json(path, ANSWERED_FORMAT, empty, "restore it from backup")
        key = f"{dataset}/{plan}/{phase}"
        if not replay and key in state["answered"]:
            raise PolicyViolation(
                "this site already answered these statistics under SecAgg+; another sum could "
                "be differenced against the first, so a rerun needs a newly approved plan"
            )
        if state["answered"].get(key, release) != release:
            raise PolicyViolation(
                "this site already answered these statistics for this plan with other edges; "
                "a new question needs a newly approved plan"
            )
        if key not in state["answered"]:
            state["answered"][key] = release
            write_json(path, state)


def _noise_seed(run: RunConfig, site: SiteSpec, release: str, own: SiteConfig | None) -> str:
    """The seed of a release's noise: keyed by the deployed site's secret (as its DP-SGD seeds,
    fedmed.site.app._training_seed), so the coordinator cannot regenerate and subtract it; the
    same release draws the same noise (a replay reveals nothing new). A simulation, with one
    owner of all the data, uses the plan's seed."""
    if own is None:
        return f"{run.seed}/{site.name}/{release}"
    return hmac.new(site_secret(own), release.encode(), hashlib.sha256).hexdigest()
