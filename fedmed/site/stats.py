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
from typing import Any

from flwr.app import Context

from fedmed.config import PrivacyConfig, RunConfig, SiteConfig, SiteSpec
from fedmed.data.summary import first_pass, read_site_rows, second_pass, sensitivity
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
from fedmed.protocol import STATS_PASSES, decode_edges, encode_stats
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
    # noise would give their difference away exactly).
    what = f"{phase}/{edges_json}/{inputs.plan.digest}/{inputs.ledger_key}"
    release = hashlib.sha256(what.encode()).hexdigest()
    if own is not None:
        _answer_once(own, inputs.ledger_key, inputs.plan.digest, phase, release)
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
        cells = add_noise(cells, sigma, noise_generator(_noise_seed(run, site, release, own)))
        spent = ledger.spending(inputs.ledger_key, privacy, charged)[0]
        log.info(
            "site %s: statistics %s of %s with noise σ=%.2f, ε=%.3f",
            site.name,
            phase,
            study,
            sigma,
            spent,
        )
    out: dict[str, Any] = suppress(cells, min_cell)
    # Pass 1 as this site sent it decides which sums may go (never any under noise).
    first = suppress(first_pass(rows), min_cell) if sums and not epsilon else {}
    shown = publishable_sums(sums, first, min_cell, bool(epsilon))
    return site, encode_stats(out, shown, epsilon=spent, min_cell=min_cell)


ANSWERED = "statistics.json"  # in a deployed site's state_dir: what each pass released
ANSWERED_FORMAT = "fedmed-statistics-answered/1"


def _answer_once(own: SiteConfig, dataset: str, plan: str, phase: str, release: str) -> None:
    """A deployed site answers each pass of an approved plan on a dataset with ONE release.

    Suppression protects one table, not two: asked again with shifted edges, a site's counts
    could be differenced down to a single patient. The shared edges follow from the pooled
    pass-1 counts, so rerunning the same plan asks the same question (a replay, answered
    again); other edges for the same plan and data are refused, and a new question needs a new
    plan, which the steward approves by hash.
    """
    path = own.state_path / ANSWERED
    empty = {"format": ANSWERED_FORMAT, "answered": {}}
    with file_lock(path):
        state = read_state_json(path, ANSWERED_FORMAT, empty, "restore it from backup")
        key = f"{dataset}/{plan}/{phase}"
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
