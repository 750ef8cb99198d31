"""The coordinator side: a thin Flower ServerApp (strategy stack from the plan, run, hand off)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedmed.client_app import RUN_KEY, SITE_KEY, STATISTICS_KEY, STUDY_KEY
from fedmed.report import RunHistory
from fedmed.strategies import SiteRecorder, UpdateValidator, build_strategy, central_epsilon
from fedmed.study import RunPlan, combine_site_statistics, finish_run, live_reporter
from fedmed.tasks import build_model

RoundCallback = Callable[[int, RunHistory], None]


def initial_model(plan: RunPlan) -> torch.nn.Module:
    """The round-0 global model, seeded by the run seed (same in every runtime)."""
    torch.manual_seed(plan.config.seed)
    return build_model(plan.config)


def run_federated(grid: Grid, plan: RunPlan, on_round: RoundCallback | None = None) -> dict:
    """Run the study's rounds on ``grid`` and write its outputs; returns metrics.json."""
    started = time.time()
    cfg = plan.config
    history = RunHistory(sites=cfg.site_names)
    model = initial_model(plan)

    report = live_reporter(plan, on_round)

    def round_done(rnd: int) -> None:
        if cfg.privacy.central != "off":
            history.central_epsilon[rnd] = central_epsilon(cfg, rnd)
        report(rnd, history)

    strategy: Strategy = SiteRecorder(build_strategy(cfg), history, on_round=round_done)
    if cfg.strategy.validate_updates:
        strategy = UpdateValidator(
            strategy,
            history,
            max_norm_ratio=cfg.strategy.max_norm_ratio,
            min_sites=cfg.strategy.min_sites or len(cfg.sites),
        )
    if plan.engine == "deployment":
        from fedmed.runtime.polling import PromptGrid

        grid = PromptGrid(grid)
    study = {RUN_KEY: cfg.to_json(), STUDY_KEY: plan.run_dir.name}
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord(dict(study)),
        evaluate_config=ConfigRecord(dict(study)),
    )
    if len(result.arrays):  # empty when no round could aggregate: keep the initial model
        model.load_state_dict(result.arrays.to_torch_state_dict())
    if plan.engine == "deployment":  # the coordinator never saw a table: ask the sites
        plan = replace(plan, serving=collect_statistics(grid, plan, history))
    return finish_run(plan, history, {"model": model}, started)


def collect_statistics(grid: Grid, plan: RunPlan, history: RunHistory) -> str:
    """Serving preprocessing from the sites that opted in (share_statistics); "" if none did."""
    study = ConfigRecord({RUN_KEY: plan.config.to_json(), STUDY_KEY: plan.run_dir.name})
    messages = [
        grid.create_message(
            RecordDict({"config": study}), "query.statistics", node, group_id="statistics"
        )
        for node in grid.get_node_ids()
    ]
    sites = []
    for reply in grid.send_and_receive(messages, timeout=300):
        if reply.has_error():
            history.record_failure(history.last_round(), "statistics", reply.error.reason)
            continue
        sites.append(json.loads(str(reply.content[SITE_KEY][STATISTICS_KEY])))
    return combine_site_statistics(sites)


def build_server_app(
    plan: RunPlan | None = None, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp for ``plan``; without one it reads the plan from Flower's run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, plan or RunPlan.from_run_config(dict(context.run_config)), on_round)

    return app


app = build_server_app()
