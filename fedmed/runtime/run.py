"""One façade for a study on this machine, used by the CLI, the tests and the benchmarks.

A study goes the same way whoever starts it: ``plan_study`` checks every site's data and fixes the
run folder (new, or the one to resume); ``run`` executes the plan — federated on the in-process or
Ray runtime, or as a pooled/local baseline — and returns what metrics.json holds. A run that fails
leaves no empty folder and no live.json still saying "running". Deployments (SuperLink and site
daemons) go through fedmed.runtime.deployment instead: there the plan runs at the coordinator.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmed.config import RunConfig
from fedmed.errors import ConfigError, DataError, FedmedError
from fedmed.study.history import RoundCallback
from fedmed.study.plan import RunPlan, new_run_dir


def preflight(cfg: RunConfig) -> tuple[RunConfig, list]:
    """Validate every site's table up front; fix the feature list in the config for the sites.

    In a simulation all tables are on this machine, so a malformed CSV is reported once, here,
    as a one-line error instead of as failed replies from a site in round 1.
    """
    from dataclasses import replace

    from fedmed.tasks import load_site_table

    tables = []
    failures: list[tuple[str, FedmedError]] = []
    for site in cfg.sites:  # every site is checked, so one run lists every table to fix
        try:
            tables.append(load_site_table(cfg, site))
        except (DataError, ConfigError) as exc:
            failures.append((site.name, exc))
    if failures:
        raise _site_failures(failures, len(cfg.sites))
    features = tables[0].features
    for t in tables[1:]:
        if t.features != features:
            raise FedmedError(
                f"sites '{tables[0].name}' and '{t.name}' have different feature columns; "
                "list the shared ones in data.schema.features"
            )
    schema = replace(cfg.data.schema, features=features)
    return cfg.replace(data=replace(cfg.data, schema=schema)), tables


def _site_failures(failures: list[tuple[str, FedmedError]], sites: int) -> FedmedError:
    """One error for all failing sites: each site's own message (file, column, rows, fix).

    A failure shared by every site (a config problem, not a table problem) is said once.
    """
    messages = {str(exc) for _, exc in failures}
    if len(failures) == 1 or len(messages) == 1:
        return failures[0][1]
    listed = "; ".join(f"[{name}] {exc}" for name, exc in failures)
    return DataError(f"{len(failures)} of {sites} sites failed the data checks: {listed}")


def _resumable(run_dir: Path, cfg: RunConfig) -> Path:
    """``run_dir`` if it can be resumed with ``cfg``; checked here, before anything starts."""
    from fedmed.coordinator.checkpoint import load_checkpoint

    if cfg.mode != "federated":
        raise FedmedError("--resume continues federated runs; pooled/local runs simply rerun")
    if (run_dir / "metrics.json").is_file():
        raise FedmedError(f"{run_dir} already finished (it has metrics.json); nothing to resume")
    checkpoint = load_checkpoint(run_dir, cfg)  # refuses a different config, naming the change
    print(f"resuming {run_dir} after round {checkpoint.round} of {cfg.rounds}", file=sys.stderr)
    return run_dir


def _mark_failed(run_dir: Path, exc: BaseException) -> None:
    """A failed run leaves no empty folder, and never a live.json that still says 'running'."""
    import json

    from fedmed.io import write_json

    if run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
        return
    live = run_dir / "live.json"
    if live.is_file() and not (run_dir / "metrics.json").is_file():
        payload = json.loads(live.read_text())
        payload.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        write_json(live, payload)


ENGINES = ("inprocess", "ray")


def plan_study(
    cfg: RunConfig,
    *,
    engine: str = "inprocess",
    resume: Path | None = None,
    ray_address: str | None = None,
) -> RunPlan:
    """Check the sites' data and fix where the run goes (a resumed run keeps its folder).

    ``ray_address`` (with engine "ray") runs the sites on that existing Ray cluster instead of a
    Ray started for the run; its form is checked here, before any data is read.
    """
    from fedmed.study.outputs import serving_preprocessing
    from fedmed.train import resolve_device

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; valid engines: {', '.join(ENGINES)}")
    if ray_address:
        if engine != "ray":
            raise ConfigError("--ray-address runs the sites on a Ray cluster: add --engine ray")
        from fedmed.runtime.ray import parse_address

        parse_address(ray_address)
    resolve_device(cfg.device)  # device="cuda" without a GPU: refused before any run folder
    cfg, tables = preflight(cfg)
    if engine == "ray" and cfg.mode != "federated":
        raise FedmedError("--engine ray runs federated studies; drop it for pooled/local")
    return RunPlan(
        cfg,
        _resumable(resume, cfg) if resume else new_run_dir(cfg),
        engine=engine if cfg.mode == "federated" else "-",
        serving=serving_preprocessing(cfg, tables),
        resume=resume is not None,
        ray_address=ray_address or "",
    )


def run(
    plan: RunPlan, *, on_round: RoundCallback | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Execute a planned study; returns the contents of its metrics.json."""
    try:
        return _execute(plan, on_round, verbose)
    except BaseException as exc:
        _mark_failed(plan.run_dir, exc)
        raise


def run_study(cfg: RunConfig, **options: Any) -> tuple[Path, dict[str, Any]]:
    """``plan_study`` then ``run``: (run folder, metrics) of a whole study in one call."""
    keys = ("engine", "resume", "ray_address")
    plan = plan_study(cfg, **{k: options.pop(k) for k in keys if k in options})
    return plan.run_dir, run(plan, **options)


def plan_stats(cfg: RunConfig, *, engine: str = "inprocess") -> RunPlan:
    """``fedmed stats``: check every site's data (one error naming each failing site and its
    fix) and make the run folder, runs/<name>-stats-s<seed>-<timestamp>."""
    from fedmed.data.summary import read_site_rows
    from fedmed.tasks import get_task

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; valid engines: {', '.join(ENGINES)}")
    cfg, _ = preflight(cfg)
    read_site_rows(cfg, cfg.sites[0], get_task(cfg.task).target)  # a task it cannot describe
    run_dir = new_run_dir(cfg, "stats")
    return RunPlan(cfg.replace(mode="federated"), run_dir, engine=engine, stats=True)


def run_stats(
    plan: RunPlan, *, progress: Callable[[str], None] | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Federated statistics of a planned study (no training); returns stats.json's contents.

    The same apps as a study: the coordinator's statistics ServerApp and the sites' ClientApp,
    on the in-process or Ray runtime, so a site answers exactly as it would in a federation.
    """
    from fedmed.coordinator.stats import build_stats_app

    if plan.config.secure_statistics:  # the counts are masked by the sites' SecAgg+ ClientApp
        from fedmed.site.secure_app import client_app
    else:
        from fedmed.site.app import app as client_app

    try:
        _run_apps(plan, build_stats_app(plan, progress), client_app, verbose)
    except BaseException as exc:
        _mark_failed(plan.run_dir, exc)
        raise
    stats = plan.run_dir / "stats.json"
    if not stats.is_file():
        raise FedmedError(
            "the statistics queries ended without results; rerun with --verbose to see Flower's log"
        )
    return json.loads(stats.read_text())


def _run_apps(plan: RunPlan, server_app: Any, client_app: Any, verbose: bool) -> None:
    """Run a ServerApp against the plan's simulated sites on the plan's runtime."""
    cfg = plan.config
    if plan.engine == "ray":
        from fedmed.runtime.ray import run_ray
        from fedmed.site.fedbn import simulation_state_dir

        run_ray(
            server_app,
            client_app,
            len(cfg.sites),
            simulation=cfg.simulation,
            address=plan.ray_address,
            device=cfg.device,
            site_state=simulation_state_dir(cfg, plan.run_dir.name),
            verbose=verbose,
        )
    else:
        from fedmed.runtime.inprocess import run_inprocess

        run_inprocess(server_app, client_app, len(cfg.sites), plan.to_run_config())


def _execute(plan: RunPlan, on_round: RoundCallback | None, verbose: bool) -> dict[str, Any]:
    cfg = plan.config
    if cfg.mode == "pooled":
        from fedmed.study.baselines import run_pooled

        return run_pooled(plan, on_round)
    if cfg.mode == "local":
        from fedmed.study.baselines import run_local

        return run_local(plan, on_round)
    from fedmed.coordinator.app import build_server_app

    if cfg.strategy.secure_aggregation:
        from fedmed.site.secure_app import client_app
    else:
        from fedmed.site.app import app as client_app

    _run_apps(plan, build_server_app(plan, on_round), client_app, verbose)
    metrics = plan.run_dir / "metrics.json"
    if not metrics.is_file():
        raise FedmedError(
            "the federation ended without results; rerun with --verbose to see Flower's log"
        )
    return json.loads(metrics.read_text())
