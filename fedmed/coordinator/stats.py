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
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.coordinator.app import ask_sites
from fedmed.errors import StudyFailed
from fedmed.protocol import STATS_EDGES_KEY, STATS_KEY, STATS_PASSES, decode_stats, encode_edges
from fedmed.study.fedstats import first_shapes, second_shapes, shared_edges, summarize, write_report
from fedmed.study.history import RunHistory
from fedmed.study.plan import RunPlan

log = logging.getLogger("fedmed.coordinator")
Progress = Callable[[str], None]


def federated_statistics(
    grid: Grid, plan: RunPlan, progress: Progress | None = None
) -> dict[str, Any]:
    """Both passes at every site; writes stats.json, stats.md and the plots to the run folder."""
    say = progress or log.info
    cfg = plan.config
    history = RunHistory(sites=cfg.site_names)
    if plan.engine == "deployment":
        from fedmed.coordinator.grid import PromptGrid

        grid = PromptGrid(grid, nodes=plan.site_nodes())
    started = time.monotonic()
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
    )
    stats = summarize(cfg, first, second, edges, _refusals(history))
    stats["seconds"] = round(time.monotonic() - started, 2)
    written = write_report(plan.run_dir, stats)
    say(f"wrote {', '.join(p.name for p in written)}")
    return stats


def _refusals(history: RunHistory) -> dict[str, str]:
    """Who did not contribute, and why (as each site said it, or as the coordinator saw it)."""
    return {row["site"]: row["reason"] for row in history.failures.get(0, [])}


def build_stats_app(plan: RunPlan | None = None, progress: Progress | None = None) -> ServerApp:
    """A ServerApp that runs the statistics queries instead of training rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federated_statistics(
            grid, plan or RunPlan.from_run_config(dict(context.run_config)), progress
        )

    return app
