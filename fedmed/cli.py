"""The `fedmed` command.

Progress goes to stderr (rich); results go to stdout, whose LAST line is the run directory, so
scripts can do ``run=$(fedmed simulate --quiet | tail -1)``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

# Offline by default: no telemetry, no update checks, no per-run dependency installs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from fedmed.config import RunConfig, load_run_config, resolve_config_path
from fedmed.errors import ConfigError, DataError, FedmedError

ENGINES = ("inprocess", "ray")
# Metrics shown in the progress bar and the summary table, in this order, when the task has them.
SHOWN = {"accuracy": "acc", "roc_auc": "auc", "f1": "f1", "precision": "prec", "recall": "rec",
         "c_index": "C-index"}  # fmt: skip


def _shown(task: str) -> list[str]:
    from fedmed.tasks import get_task

    return [m for m in SHOWN if m in get_task(task).metrics]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="run config: a TOML path or a shipped name (default: demo)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set rounds=20 --set train.lr=0.01",
    )


def _add_http_args(p: argparse.ArgumentParser, default_port: int) -> None:
    # 127.0.0.1 by default: pages and predictions about patients stay on this machine unless
    # the operator chooses otherwise.
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmed",
        description="Federated learning for hospitals: Flower federation with differential "
        "privacy and honest per-site evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a multi-hospital study on this machine",
        description="Run a study (default: the shipped demo) with every site simulated on this "
        "machine. Writes runs/<name>-<mode>-<timestamp>/ and prints its path last.",
    )
    _add_config_args(sim)
    sim.add_argument(
        "--mode",
        choices=("federated", "pooled", "local"),
        default=None,
        help="federated (default), pooled (train on the union: upper reference) "
        "or local (each site alone)",
    )
    sim.add_argument(
        "--engine",
        choices=ENGINES,
        default="inprocess",
        help="inprocess (fast, default) or ray (Flower's Ray simulation engine)",
    )
    sim.add_argument("--output-dir", default=None, help="parent folder of the run directory")
    sim.add_argument("--quiet", action="store_true", help="no progress display or summary")
    sim.add_argument(
        "--dashboard",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the live dashboard on 127.0.0.1:PORT while the study runs",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue a killed federated run from its last completed round (same config)",
    )

    chk = sub.add_parser(
        "check-data",
        help="validate every site's table against the schema, without training",
        description="Load and validate each site's table as a run would; print rows and class "
        "balance per site, or the first problem found with how to fix it.",
    )
    _add_config_args(chk)

    aud = sub.add_parser(
        "audit-privacy",
        help="membership-inference audit of a finished run (attack AUC per site next to ε)",
        description="Run the loss-threshold membership-inference attack on the final model of "
        "RUN_DIR, per site (train rows = members, held-out rows = non-members); writes "
        "RUN_DIR/privacy_audit.json.",
    )
    aud.add_argument("run_dir", type=Path, help="a run directory written by fedmed simulate")

    dash = sub.add_parser(
        "dashboard",
        help="web dashboard of a run: per-site metrics and ε by round, who replied or refused",
        description="Serve the dashboard of RUN_DIR (finished or running: it polls live.json).",
    )
    dash.add_argument("run_dir", type=Path, help="a run directory written by fedmed simulate")
    _add_http_args(dash, default_port=8050)

    srv = sub.add_parser(
        "serve",
        help="serve a trained model over HTTP (POST /predict, GET /model, GET /health)",
        description="Serve the model of a run directory (or a .safetensors file) with FastAPI "
        "under uvicorn. OpenAPI docs at /docs. Refuses unsigned or tampered models unless "
        "--allow-unsigned.",
    )
    srv.add_argument("model", type=Path, help="run directory or model .safetensors file")
    _add_http_args(srv, default_port=8000)
    srv.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="serve a model whose card is unsigned (not for clinical use); a signature that "
        "is present is still checked, and a failed check is warned about on stderr",
    )
    srv.add_argument(
        "--max-body-mb",
        type=float,
        default=5.0,
        help="largest request body accepted, in MB (default 5); larger requests get HTTP 413",
    )

    prd = sub.add_parser(
        "predict",
        help="batch predictions for a CSV of patient rows (or a .npz of images, or a long "
        "CSV of observations)",
        description="Predict every row of a CSV (columns = the model's features) and write the "
        "rows with probability and label columns. An imaging model takes a .npz of images; "
        "with --explain it writes saliency PNGs next to --output. A sequence model takes a long "
        "CSV (patient id, time in minutes, variable, value) and writes one row per patient.",
    )
    prd.add_argument("model", type=Path, help="run directory or model .safetensors file")
    prd.add_argument(
        "rows",
        type=Path,
        help="CSV with one patient per row, a .npz of images, or a long CSV of observations",
    )
    prd.add_argument("--output", type=Path, default=None, help="write CSV here (default stdout)")
    prd.add_argument(
        "--explain",
        action="store_true",
        help="add explain:<feature> columns (integrated-gradients attributions; per variable "
        "for sequence models)",
    )
    prd.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="use a model whose card is unsigned (not for clinical use)",
    )
    for name in ("id", "time", "variable", "value"):
        prd.add_argument(
            f"--{name}-column",
            default=None,
            help=f"sequence models: the long CSV's {name} column (default: the study's)",
        )

    from fedmed.cli_deploy import add_commands

    add_commands(sub, _add_config_args)

    show = sub.add_parser(
        "show-config",
        help="print a run config with defaults and overrides",
        description="Print the fully resolved run config as JSON.",
    )
    _add_config_args(show)
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    cfg = load_run_config(resolve_config_path(args.config), args.overrides)
    changes = {}
    if getattr(args, "mode", None):
        changes["mode"] = args.mode
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    return cfg.replace(**changes) if changes else cfg


def preflight(cfg: RunConfig) -> tuple[RunConfig, list]:
    """Validate every site's table up front; fix the feature list in the config for the sites.

    In a simulation all tables are on this machine, so a malformed CSV is reported once, here,
    as a one-line error instead of as failed replies from a site in round 1.
    """
    from dataclasses import replace

    from fedmed.data import load_site_table

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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedmed.study import RunPlan, new_run_dir, serving_preprocessing
    from fedmed.train import resolve_device

    cfg = _load(args)
    resolve_device(cfg.device)  # device="cuda" without a GPU: refused before any run folder
    cfg, tables = preflight(cfg)
    if args.engine == "ray" and cfg.mode != "federated":
        raise FedmedError("--engine ray runs federated studies; drop it for pooled/local")
    if not args.verbose:
        # Flower resets its logger's level while starting apps; a filter sticks.
        logging.getLogger("flwr").addFilter(lambda record: record.levelno >= logging.WARNING)
    plan = RunPlan(
        cfg,
        _resumable(args.resume, cfg) if args.resume else new_run_dir(cfg),
        engine=args.engine if cfg.mode == "federated" else "-",
        serving=serving_preprocessing(cfg, tables),
        resume=args.resume is not None,
    )
    progress = None if args.quiet else _Progress(cfg)
    live = None
    try:
        if args.dashboard is not None:
            live = _start_live_dashboard(plan.run_dir, args.dashboard)
        payload = _dispatch(plan, args, progress)
    except BaseException as exc:
        _mark_failed(plan.run_dir, exc)
        raise
    finally:
        if progress:
            progress.close()
        if live:
            live.stop()
            print(
                f"dashboard stopped; reopen with: fedmed dashboard {plan.run_dir}", file=sys.stderr
            )
    if not args.quiet:
        _print_summary(payload)
    print(plan.run_dir)
    return 0


def _resumable(run_dir: Path, cfg: RunConfig) -> Path:
    """``run_dir`` if it can be resumed with ``cfg``; checked here, before anything starts."""
    from fedmed.checkpoint import load_checkpoint

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

    from fedmed.report import write_json

    if run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
        return
    live = run_dir / "live.json"
    if live.is_file() and not (run_dir / "metrics.json").is_file():
        payload = json.loads(live.read_text())
        payload.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        write_json(live, payload)


def _dispatch(plan, args: argparse.Namespace, progress) -> dict:
    on_round = progress.update if progress else None
    cfg = plan.config
    if cfg.mode == "pooled":
        from fedmed.baselines import run_pooled

        return run_pooled(plan, on_round)
    if cfg.mode == "local":
        from fedmed.baselines import run_local

        return run_local(plan, on_round)
    from fedmed.server_app import build_server_app

    if cfg.strategy.secure_aggregation:
        from fedmed.secagg import client_app
    else:
        from fedmed.client_app import app as client_app

    server_app = build_server_app(plan, on_round)
    if args.engine == "ray":
        from fedmed.runtime.ray import run_ray

        run_ray(server_app, client_app, len(cfg.sites), verbose=args.verbose)
    else:
        from fedmed.runtime.inprocess import run_inprocess

        run_inprocess(server_app, client_app, len(cfg.sites), plan.to_run_config())
    metrics = plan.run_dir / "metrics.json"
    if not metrics.is_file():
        raise FedmedError(
            "the federation ended without results; rerun with --verbose to see Flower's log"
        )
    import json

    return json.loads(metrics.read_text())


class _Progress:
    """A rich progress bar on stderr with the running average metrics and the worst ε."""

    def __init__(self, cfg: RunConfig) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        label = f"{cfg.name} ({cfg.mode}, {len(cfg.sites)} sites)"
        self.task = self.progress.add_task(label, total=cfg.rounds, info="")
        self.shown = _shown(cfg.task)[:2]

    def update(self, rnd: int, history) -> None:
        avg = history.average(rnd)
        parts = [f"{SHOWN[m]} {avg.get(m, math.nan):.3f}" for m in self.shown]
        eps = history.epsilon(rnd)
        if any(eps.values()):
            parts.append(f"ε≤{max(eps.values()):.2f}")
        failed = {f["site"] for f in history.failures.get(rnd, [])}
        if failed:
            parts.append(f"[red]failed: {', '.join(sorted(failed))}[/red]")
        self.progress.update(self.task, completed=rnd, info=" · ".join(parts))

    def close(self) -> None:
        self.progress.stop()


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value.is_integer() and value > 1:
        return str(int(value))
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_summary(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    final = payload["final"]
    table = Table(title=f"{payload['name']} · {payload['mode']} · round {final['round']}")
    # Survival's time-dependent metrics (data.schema.horizons), when the study asked for them.
    timed = [k for k in final["average"] if k.startswith("auc@") or k == "ibs"]
    cols = [*_shown(payload["config"]["task"]), *timed, "num-examples", "epsilon"]
    table.add_column("site")
    for c in cols:
        table.add_column(c, justify="right")
    order = payload.get("sites") or list(final["sites"])
    for site in order:
        m = final["sites"].get(site)
        if m is None:
            continue
        table.add_row(site, *[_fmt(m.get(c)) for c in cols])
    avg = final["average"]
    table.add_row(
        "[bold]average[/bold]",
        *[_fmt(avg.get(c)) if c not in ("num-examples", "epsilon") else "" for c in cols],
    )
    Console(file=sys.stdout, width=120).print(table)
    for line in _coverage_lines(final.get("average_coverage"), [c for c in cols if c in avg]):
        print(line)
    if final.get("personalized"):
        _print_personalized(final["personalized"], order, payload["config"]["personalize"])
    if final.get("central_epsilon") is not None:
        privacy = payload["config"]["privacy"]
        print(
            f"central DP ({privacy['central']} clipping): site-level ε = "
            f"{final['central_epsilon']:.3f} at δ = {privacy['delta']:g}"
        )
    failures = [f for h in payload["history"] for f in h["failures"]]
    if failures:
        rounds_by_reason: dict[str, list[int]] = {}
        for h in payload["history"]:
            for f in h["failures"]:
                rounds_by_reason.setdefault(f"{f['phase']}: {f['reason']}", []).append(h["round"])
        for reason, rounds in rounds_by_reason.items():
            print(f"failed or refused in round(s) {','.join(map(str, rounds))} — {reason}")
    if final.get("missing_sites"):
        print(f"sites without results in the last round: {', '.join(final['missing_sites'])}")
    for site, why in payload.get("failed_models", {}).items():
        print(f"no model released for {site}: {why} (its final metrics are n/a)")


def _coverage_lines(coverage: dict | None, shown: list[str]) -> list[str]:
    """One line per group of shown metrics whose average leaves sites out: 'average of N/M'.

    Without it a mean over 2 of 3 sites reads like a mean over all 3. Metrics missing the same
    sites share a line; long site lists are cut so the line stays one line.
    """
    if not coverage:
        return []
    groups: dict[tuple[str, ...], list[str]] = {}
    for metric in shown:
        gaps = tuple(coverage["missing"].get(metric, ()))
        if gaps:
            groups.setdefault(gaps, []).append(metric)
    total = coverage["sites"]
    lines = []
    for gaps, metrics in groups.items():
        names = ", ".join(gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        lines.append(
            f"{', '.join(metrics)}: average of {total - len(gaps)}/{total} sites "
            f"(no value from {names})"
        )
    return lines


def _print_personalized(personalized: dict, order: list[str], settings: dict) -> None:
    """Per-site test metrics of the final global model before -> after local fine-tuning."""
    from rich.console import Console
    from rich.table import Table

    cols = ("accuracy", "roc_auc", "f1", "loss")
    how = [f"{settings['local_epochs']:g} local epoch(s) per site"] * bool(settings["local_epochs"])
    how += ["own normalization layers"] * bool(settings.get("local_normalization"))
    table = Table(title=f"personalized: {' + '.join(how)} (before → after)")
    table.add_column("site")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [(s, personalized["sites"][s]) for s in order if s in personalized["sites"]]
    for label, m in [*rows, ("[bold]average[/bold]", personalized["average"])]:
        table.add_row(
            label, *[f"{_fmt(m['before'].get(c))} → {_fmt(m['after'].get(c))}" for c in cols]
        )
    Console(file=sys.stdout, width=120).print(table)


def cmd_check_data(args: argparse.Namespace) -> int:
    cfg, tables = preflight(_load(args))
    for t in tables:
        print(
            f"{t.name}: {len(t.y_train)} train / {len(t.y_test)} test rows, "
            f"{t.outcome_summary()}, {len(t.features)} features "
            f"({t.origin})"
        )
    print(f"ok: {len(tables)} sites valid for {cfg.task}")
    return 0


def cmd_audit_privacy(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedmed.audit import audit_run

    report = audit_run(args.run_dir)
    table = Table(title=f"membership inference (loss threshold) · {args.run_dir}")
    for col in ("site", "attack AUC", "TPR @ 1% FPR", "advantage", "members", "non-members", "ε"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, r in report["sites"].items():
        table.add_row(
            site,
            _fmt(r["attack_auc"]),
            _fmt(r["tpr_at_1pct_fpr"]),
            _fmt(r["advantage"]),
            str(r["members"]),
            str(r["non_members"]),
            _fmt(r["epsilon"]),
        )
    Console(file=sys.stdout, width=120).print(table)
    print(f"mean attack AUC {report['mean_attack_auc']:.3f} (0.5 = no better than chance)")
    print(args.run_dir / "privacy_audit.json")
    return 0


def _start_live_dashboard(run_dir: Path, port: int):
    """The dashboard of ``run_dir`` in a background thread, for the duration of a run."""
    from fedmed.serving.dashboard import create_dashboard_app
    from fedmed.serving.server import start_in_thread

    try:
        live = start_in_thread(create_dashboard_app(run_dir), port=port)
    except RuntimeError:
        raise FedmedError(
            f"could not start the dashboard on 127.0.0.1:{port} (port in use?); "
            "choose another --dashboard PORT"
        ) from None
    print(f"live dashboard: {live.url}", file=sys.stderr)
    return live


def cmd_dashboard(args: argparse.Namespace) -> int:
    from fedmed.serving.dashboard import create_dashboard_app
    from fedmed.serving.server import serve

    if not args.run_dir.is_dir():
        raise FedmedError(f"{args.run_dir} is not a directory; give a run directory")
    from fedmed.serving.server import exposure_warning

    if warning := exposure_warning(args.host, "the dashboard (per-hospital results)"):
        print(warning, file=sys.stderr)
    print(f"dashboard of {args.run_dir} on http://{args.host}:{args.port}", file=sys.stderr)
    serve(create_dashboard_app(args.run_dir), args.host, args.port)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fedmed.serving.api import create_app, open_model
    from fedmed.serving.server import serve

    served = open_model(args.model, allow_unsigned=args.allow_unsigned)
    if args.allow_unsigned and "signature" not in served.card:
        print("fedmed: warning: serving an UNSIGNED model", file=sys.stderr)
    from fedmed.serving.server import exposure_warning

    if warning := exposure_warning(args.host, "the model API"):
        print(warning, file=sys.stderr)
    print(f"serving {served.path} on http://{args.host}:{args.port} (docs: /docs)", file=sys.stderr)
    if not 0 < args.max_body_mb <= 1000:
        raise FedmedError(f"--max-body-mb must be in (0, 1000], got {args.max_body_mb}")
    serve(create_app(served, max_body_bytes=int(args.max_body_mb * 1e6)), args.host, args.port)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedmed.serving.api import ServedModel, open_model, predict_csv
    from fedmed.serving.arrays import ServedSeries, predict_series_csv

    if args.rows.suffix.lower() == ".npz":
        from fedmed.serving.saliency import predict_images

        result = predict_images(
            args.model,
            args.rows,
            args.output,
            explain=args.explain,
            allow_unsigned=args.allow_unsigned,
        )
    else:
        served = open_model(args.model, allow_unsigned=args.allow_unsigned)
        if isinstance(served, ServedSeries):
            result = predict_series_csv(
                served,
                args.rows,
                args.output,
                explain=args.explain,
                columns=_columns(args, served.pre.get("columns")),
            )
        elif isinstance(served, ServedModel):
            result = predict_csv(served, args.rows, args.output, explain=args.explain)
        else:
            raise ConfigError(
                f"{served.path} is a '{served.card['task']}' model; give it a .npz of images "
                f"(an 'images' array), not {args.rows}"
            )
    if args.output is None:
        result.to_csv(sys.stdout, index=False)
    else:
        print(args.output)
    return 0


def _columns(args: argparse.Namespace, recorded: list[str] | None) -> tuple[str, ...] | None:
    """The long CSV's columns: each flag given overrides the card's (or the default) name."""
    flags = (args.id_column, args.time_column, args.variable_column, args.value_column)
    if all(f is None for f in flags):
        return None
    from fedmed.serving.arrays import DEFAULT_COLUMNS

    known = tuple(recorded or DEFAULT_COLUMNS)
    return tuple(f or k for f, k in zip(flags, known, strict=True))


def cmd_show_config(args: argparse.Namespace) -> int:
    import json

    print(json.dumps(_load(args).to_dict(), indent=2))
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "check-data": cmd_check_data,
    "audit-privacy": cmd_audit_privacy,
    "dashboard": cmd_dashboard,
    "serve": cmd_serve,
    "predict": cmd_predict,
    "show-config": cmd_show_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    from fedmed.cli_deploy import COMMANDS as DEPLOY_COMMANDS

    COMMANDS.update(DEPLOY_COMMANDS)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedmedError as exc:
        print(f"fedmed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Path", "main"]
