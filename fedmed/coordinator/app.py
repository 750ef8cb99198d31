"""The coordinator side: a thin Flower ServerApp (strategy stack from the plan, run, hand off)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmed.config import RunConfig
from fedmed.coordinator.rounds import StudyRounds
from fedmed.protocol import (
    RUN_KEY,
    SITE_KEY,
    STATISTICS_KEY,
    STUDY_KEY,
    WORDS_KEY,
    decode_word_counts,
    read_error,
    unflatten,
)
from fedmed.study.history import RoundCallback, RunHistory
from fedmed.study.outputs import finish_run
from fedmed.study.plan import RunPlan, initial_model
from fedmed.study.statistics import combine_site_statistics
from fedmed.tasks.local_layers import check_model, split

log = logging.getLogger("fedmed.coordinator")
PERSONALIZE = "evaluate.personalize"  # the ClientApp's named evaluate action
QUERY_TIMEOUT = 300.0  # seconds a query before or after the rounds waits for sites and replies


def run_federated(
    grid: Grid, context: Context, plan: RunPlan, on_round: RoundCallback | None = None
) -> dict:
    """Run the study's rounds on ``grid`` and write its outputs; returns metrics.json.

    The rounds (``StudyRounds``: strategy, recorder, resume, a checkpoint after every round) are
    the same for every study; what differs is the loop that drives them: Flower's Message API
    strategy loop, or for a secure study (SecAgg+) Flower's legacy workflow in ``context``.
    """
    started = time.time()
    history = RunHistory(sites=plan.config.site_names)
    if plan.engine == "deployment":
        from fedmed.coordinator.grid import PromptGrid

        grid = PromptGrid(grid, nodes=plan.site_nodes())
    series = plan.config.data.series
    if plan.config.task == "sequence-classification" and series.standardize == "consortium":
        plan = consortium_scale(grid, plan, history) if not series.mean else plan
    if plan.config.task == "text-classification" and not plan.config.data.text.vocabulary:
        plan = consortium_vocabulary(grid, plan, history)
    cfg = plan.config
    model = initial_model(plan)
    # FedBN: the sites keep their normalization layers; the coordinator exchanges the rest.
    kept = check_model(model) if cfg.personalize.local_normalization else frozenset()
    rounds = StudyRounds(plan, model, history, on_round, kept)
    if cfg.strategy.secure_aggregation:  # Flower's SecAgg+ exists on its legacy API only
        from fedmed.coordinator.secure import run_secure_rounds

        run_secure_rounds(grid, plan, context, rounds)
    else:
        rounds.strategy.start(
            grid=grid,
            initial_arrays=rounds.initial_arrays,
            num_rounds=cfg.rounds - rounds.done,
            timeout=cfg.strategy.round_timeout,
            train_config=ConfigRecord(dict(rounds.study)),
            evaluate_config=ConfigRecord(dict(rounds.study)),
        )
    rounds.release(model)
    history = rounds.history
    if cfg.personalize.local_epochs or kept:
        shared = split(model.state_dict(), kept)[0]
        personalize_sites(grid, plan, ArrayRecord(shared), history)
    # The coordinator never saw a table: ask the sites (not a secure study's: the SecAgg+
    # ClientApp, site.secure_app, has no statistics query).
    if plan.engine == "deployment" and not cfg.strategy.secure_aggregation:
        plan = replace(plan, serving=collect_statistics(grid, plan, history))
    return finish_run(plan, history, {"model": model}, started)


def personalize_sites(grid: Grid, plan: RunPlan, arrays: ArrayRecord, history: RunHistory) -> None:
    """Ask every site for its own model's metrics next to the global model's (before/after).

    The site's own model is the final global model fine-tuned locally (personalize.local_epochs)
    and/or with its own normalization layers (personalize.local_normalization).
    """
    cfg = plan.config
    config = ConfigRecord({RUN_KEY: cfg.to_json(), STUDY_KEY: plan.run_dir.name})
    messages = [
        grid.create_message(
            RecordDict({"arrays": arrays, "config": config}),
            PERSONALIZE,
            node,
            "personalize",
        )
        for node in grid.get_node_ids()
    ]
    failed = 0
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            failure = read_error(reply.error)
            history.record_failure(
                cfg.rounds, "personalize", failure.site or "unknown", failure.detail
            )
            failed += 1
            continue
        site = str(reply.content["site"]["name"])
        metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
        history.personalized[site] = unflatten(metrics)
    if len(history.personalized) + failed < len(cfg.sites):  # some never answered: name them
        named = {
            f["site"] for f in history.failures.get(cfg.rounds, []) if f["phase"] == "personalize"
        }
        for site in sorted(set(cfg.site_names) - set(history.personalized) - named):
            reason = "no personalization reply (timed out or disconnected)"
            history.record_failure(cfg.rounds, "personalize", site, reason)


def ask_statistics(
    grid: Grid, plan: RunPlan, history: RunHistory, rnd: int, *, wait: bool = True
) -> tuple[dict[str, dict], dict[str, str]]:
    """Each site's fitted statistics by site name, and the refusals (site -> reason)."""
    return ask_sites(grid, plan, history, rnd, "statistics", STATISTICS_KEY, json.loads, wait=wait)


def ask_sites(
    grid: Grid,
    plan: RunPlan,
    history: RunHistory,
    rnd: int,
    phase: str,
    key: str,
    decode: Callable[[str], Any],
    extra: dict[str, str] | None = None,
    *,
    wait: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Send every site the query ``query.<phase>`` (with ``extra`` config entries); (decoded
    ``key`` of each reply by site name, the refusals: who -> reason). A reply that does not
    decode counts as a refusal.

    ``wait``: first wait (up to QUERY_TIMEOUT) until every site's node is listed, as a query
    before round 1 must (site_nodes). A query after the rounds, or a second pass, asks the
    nodes there now: waiting then only waits out a site that died (QUERY_TIMEOUT, 5 minutes).
    """
    nodes = site_nodes(grid, len(plan.config.sites), QUERY_TIMEOUT) if wait else grid.get_node_ids()
    study = ConfigRecord(
        {RUN_KEY: plan.config.to_json(), STUDY_KEY: plan.run_dir.name, **(extra or {})}
    )
    messages = [
        grid.create_message(RecordDict({"config": study}), f"query.{phase}", node, group_id=phase)
        for node in nodes
    ]
    sites, refused = {}, {}
    for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT):
        if reply.has_error():
            failure = read_error(reply.error)
            history.record_failure(rnd, phase, failure.site or "unknown", failure.detail)
            refused[f"node {reply.metadata.src_node_id}"] = str(failure)
            continue
        name = str(reply.content[SITE_KEY]["name"])
        try:
            sites[name] = decode(str(reply.content[SITE_KEY][key]))
        except (ValueError, KeyError) as exc:
            history.record_failure(rnd, phase, name, f"malformed {phase} reply ({exc})")
            refused[f"site '{name}'"] = f"malformed {phase} reply"
    return sites, refused


def site_nodes(grid: Grid, sites: int, timeout: float) -> list[int]:
    """The grid's nodes once all ``sites`` are there, or those there after ``timeout`` seconds.

    A query sent before round 1 (the vocabulary, the consortium scale) can come before the
    runtime has registered every node: Ray's simulation engine lists none for its first
    seconds. Flower's strategies wait for their nodes the same way before sampling.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= sites or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.1)


def collect_statistics(grid: Grid, plan: RunPlan, history: RunHistory) -> str:
    """Serving preprocessing from the sites that opted in (share_statistics); "" if none did."""
    sites, _ = ask_statistics(grid, plan, history, history.last_round(), wait=False)
    return combine_site_statistics([sites[name] for name in sorted(sites)])


def consortium_scale(grid: Grid, plan: RunPlan, history: RunHistory) -> RunPlan:
    """data.series.standardize = "consortium": the union's scale, from every site, before round 1.

    Sites send per-variable counts, means and sds of their train bins (what share_statistics
    already allows for the served model); every site then trains and evaluates on inputs scaled
    alike, so the shared model sees each ICU's real levels. All sites or none: a study whose
    sites scale differently would not be the study that was approved.
    """
    from fedmed.study.statistics import with_series_reference

    sites, refused = ask_statistics(grid, plan, history, 0)
    _every_site(
        plan.config,
        sites,
        refused,
        "data.series.standardize = 'consortium' needs every site's statistics",
        "use standardize = 'site'",
    )
    cfg = with_series_reference(plan.config, [sites[name] for name in plan.config.site_names])
    log.info("consortium scale from %d sites' statistics", len(sites))
    return replace(plan, config=cfg)


def _every_site(
    cfg: RunConfig, sites: dict[str, Any], refused: dict[str, str], need: str, otherwise: str
) -> None:
    """A ConfigError naming who did not answer, when a step that shapes every site's model
    (the consortium scale, the vocabulary) lacks a site: all sites or none."""
    from fedmed.errors import ConfigError

    missing = sorted(set(cfg.site_names) - set(sites))
    if missing or refused:
        why = "; ".join(f"{who}: {reason}" for who, reason in refused.items()) or "no reply"
        raise ConfigError(
            f"{need}, but {', '.join(missing) or 'a site'} did not send them ({why}); set "
            f"share_statistics = true in those sites' configs, or {otherwise}"
        )


def consortium_vocabulary(grid: Grid, plan: RunPlan, history: RunHistory) -> RunPlan:
    """The text vocabulary, from every site's shared word counts, before round 1.

    Each site sends only the words of its train texts it counts at least data.text.min_count
    times (fedmed.site.app; checked again here); the vocabulary is built from their sum
    (fedmed.data.text.build_vocabulary) and travels in the plan from round 1 on. A resumed run
    keeps the vocabulary its checkpoint was trained with. All sites or none, as for the
    consortium scale: the vocabulary shapes the model every site trains.
    """
    from fedmed.coordinator.checkpoint import load_checkpoint
    from fedmed.data.text import with_vocabulary

    cfg = plan.config
    if plan.resume:
        vocabulary = load_checkpoint(plan.run_dir, cfg).vocabulary
        text = replace(cfg.data.text, vocabulary=vocabulary)
        return replace(plan, config=cfg.replace(data=replace(cfg.data, text=text)))
    min_count = cfg.data.text.min_count
    sites, refused = ask_sites(
        grid, plan, history, 0, "vocabulary", WORDS_KEY, lambda t: decode_word_counts(t, min_count)
    )
    _every_site(
        cfg,
        sites,
        refused,
        "the text vocabulary needs every site's shared word counts",
        "write an agreed data.text.vocabulary",
    )
    cfg = with_vocabulary(cfg, [sites[name] for name in cfg.site_names])
    log.info(
        "text vocabulary of %d tokens from %d sites' words counted >= %d times",
        len(cfg.data.text.vocabulary),
        len(sites),
        min_count,
    )
    return replace(plan, config=cfg)


def build_server_app(
    plan: RunPlan | None = None, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp for ``plan``; without one it reads the plan from Flower's run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        the_plan = plan or RunPlan.from_run_config(dict(context.run_config))
        if the_plan.stats:  # `fedmed run --stats`: the deployed app serves both
            from fedmed.coordinator.stats import federated_statistics

            federated_statistics(grid, the_plan, context=context)
            return
        run_federated(grid, context, the_plan, on_round)

    return app


app = build_server_app()
