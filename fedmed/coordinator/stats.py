"""The coordinator's side of federated statistics: two queries to every site, pooled, reported.

Pass 1 (``query.stats_cells``) asks for counts on public coarse edges; the coordinator pools
them and sets the study's shared histogram edges and life-table intervals
(fedmed.study.fedstats.shared_edges); pass 2 (``query.stats_histograms``) asks for counts on
those edges. Each reply is a peer's data: decoded against the exact shape asked for
(fedmed.protocol.decode_stats), and in a deployment tied to its authenticated node by
PromptGrid. The coordinator never receives a row: only counts (None where a site suppressed
one) and, without noise, sums.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.coordinator.app import ask_sites
from fedmed.errors import StudyFailed
from fedmed.privacy.release import suppress
from fedmed.protocol import STATS_EDGES_KEY, STATS_KEY, STATS_PASSES, decode_stats, encode_edges
from fedmed.study.fedstats import first_shapes, second_shapes, shared_edges, summarize, write_report
from fedmed.study.history import RunHistory
from fedmed.study.plan import RunPlan

if TYPE_CHECKING:
    from fedmed.coordinator.secure_stats import SecurePass

log = logging.getLogger("fedmed.coordinator")
Progress = Callable[[str], None]


def federated_statistics(
    grid: Grid, plan: RunPlan, progress: Progress | None = None, context: Context | None = None
) -> dict[str, Any]:
    """Both passes at every site; writes stats.json, stats.md and the plots to the run folder.

    ``context``: the ServerApp's, needed when the plan sums the counts under SecAgg+."""
    say = progress or log.info
    cfg = plan.config
    history = RunHistory(sites=cfg.site_names)
    if plan.engine == "deployment":
        from fedmed.coordinator.grid import PromptGrid

        grid = PromptGrid(grid, nodes=plan.site_nodes())
    started = time.monotonic()
    if cfg.secure_statistics:
        if context is None:
            raise StudyFailed("secure statistics run in a ServerApp; call build_stats_app(plan)")
        stats = _secure_statistics(grid, context, plan, history, say)
    else:
        stats = _clear_statistics(grid, plan, history, say)
    stats["seconds"] = round(time.monotonic() - started, 2)
    written = write_report(plan.run_dir, stats)
    say(f"wrote {', '.join(p.name for p in written)}")
    return stats


def _clear_statistics(
    grid: Grid, plan: RunPlan, history: RunHistory, say: Progress
) -> dict[str, Any]:
    """Each site's suppressed (and optionally noisy) counts, pooled here."""
    cfg = plan.config
    shapes = first_shapes(cfg)
    say(f"pass 1: counts on the public coarse edges from {len(cfg.sites)} sites")
    first, _ = ask_sites(
        grid, plan, history, 0, STATS_PASSES[0], STATS_KEY, lambda t: decode_stats(t, shapes.get)
    )
    if not first:
        raise StudyFailed(
            "no site sent statistics (" + "; ".join(_refusals(history).values()) + "); fix the "
            "sites' data or policies named there and rerun"
        )
    edges = shared_edges(cfg, first)
    second_shape = second_shapes(edges)
    say(f"pass 2: histograms on shared edges for {len(edges['features'])} features")
    second, _ = ask_sites(
        grid,
        plan,
        history,
        0,
        STATS_PASSES[1],
        STATS_KEY,
        lambda t: decode_stats(t, second_shape.get),
        extra={STATS_EDGES_KEY: encode_edges(edges)},
        wait=False,  # pass 1 waited for the sites
    )
    return summarize(cfg, first, second, edges, _refusals(history))


POOLED = "SecAgg+ sum"  # the one "site" of a secure report: the sum of the sites' counts


def _secure_statistics(
    grid: Grid, context: Context, plan: RunPlan, history: RunHistory, say: Progress
) -> dict[str, Any]:
    """Both passes under SecAgg+: only the pooled counts reach this side, and the minimum cell
    count (the largest any site asked for) is applied to the POOLED cells, here; the report
    then treats the sum as one site (so its pooled tables, edges, quantiles and Kaplan-Meier
    are computed as usual) and names the sites in it."""
    from fedmed.coordinator.secure_stats import secure_pass

    cfg = plan.config
    say(f"pass 1 under SecAgg+: pooled counts on the public coarse edges of {len(cfg.sites)} sites")
    first = secure_pass(grid, context, plan, history, STATS_PASSES[0], first_shapes(cfg))
    if first.pooled is None:
        raise StudyFailed(
            "the secure statistics produced no sum ("
            + ("; ".join(_refusals(history).values()) or first.error)
            + "); fix the sites named there and rerun"
        )
    min_cell = max([cfg.stats.min_cell, *(int(c["min-cell"]) for c in first.clear.values())])
    one = {POOLED: _pooled_reply(first, min_cell)}
    edges = shared_edges(cfg, one)
    second_shape = second_shapes(edges)
    say(f"pass 2 under SecAgg+: pooled histograms for {len(edges['features'])} features")
    second = secure_pass(
        grid,
        context,
        plan,
        history,
        STATS_PASSES[1],
        second_shape,
        extra={STATS_EDGES_KEY: encode_edges(edges)},
        same_as=first.sites,
    )
    lost = second.pooled is None and not second.error  # named in the history
    two = {} if lost else {POOLED: _pooled_reply(second, min_cell)}
    stats = summarize(cfg, one, two, edges, _refusals(history), sites=[POOLED])
    spent = {s: c["epsilon"] for s, c in first.clear.items()}
    for site, clear in second.clear.items():
        spent[site] = max(spent.get(site, 0.0), clear["epsilon"])
    stats["epsilon"] = spent
    stats["secure_aggregation"] = {
        "passes": {STATS_PASSES[0]: first.sites, STATS_PASSES[1]: second.sites},
        "min_cell": min_cell,
    }
    return stats


def _pooled_reply(result: SecurePass, min_cell: int) -> dict[str, Any]:
    """A masked pass's sum as a site's reply: clipped at 0 (noisy parts may sum below it:
    post-processing), then suppressed as a site suppresses its own counts."""
    if result.error:
        raise StudyFailed(f"the secure statistics sum was unreadable ({result.error}); rerun")
    assert result.pooled is not None
    noisy = any(c["epsilon"] for c in result.clear.values())
    if not noisy and any(c < 0 for v in result.pooled.values() for c in v):
        raise StudyFailed("a site masked a negative count without noise; check the sites' versions")
    cells = {k: [max(0, c) for c in v] for k, v in result.pooled.items()}
    return {"cells": suppress(cells, min_cell), "sums": {}, "epsilon": 0.0, "min_cell": min_cell}


def _refusals(history: RunHistory) -> dict[str, str]:
    """Who did not contribute, and why (as each site said it, or as the coordinator saw it)."""
    return {row["site"]: row["reason"] for row in history.failures.get(0, [])}


def build_stats_app(plan: RunPlan | None = None, progress: Progress | None = None) -> ServerApp:
    """A ServerApp that runs the statistics queries instead of training rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federated_statistics(
            grid, plan or RunPlan.from_run_config(dict(context.run_config)), progress, context
        )

    return app
