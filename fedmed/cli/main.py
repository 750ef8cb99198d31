"""The `fedmed` command.

Progress goes to stderr (rich); results go to stdout, whose LAST line is the run directory, so
scripts can do ``run=$(fedmed simulate --quiet | tail -1)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedmed.cli.display import _fmt, _load, _print_stats, _print_summary, _Progress

# Offline by default: no telemetry, no update checks, no per-run dependency installs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from fedmed.errors import ConfigError, FedmedError

ENGINES = ("inprocess", "ray")


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
        help="inprocess (fast, default) or ray (Flower's Ray simulation engine: each site in a "
        "Ray actor reserving [simulation] cpus_per_site / gpus_per_site; as many actors as the "
        "cluster's nodes fit, the sites queue for them)",
    )
    sim.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="with --engine ray: run the sites on this existing Ray cluster (the head's "
        "HOST:PORT as `ray start --head` prints it, ray://HOST:PORT, or auto) instead of a Ray "
        "started for the run; fedmed disconnects afterwards and never stops the cluster",
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

    sta = sub.add_parser(
        "stats",
        help="federated statistics before any training: per site and pooled, no row leaves a site",
        description="Ask every simulated site for counts only (cohort, missing values, "
        "histograms on shared edges, outcome rates, Kaplan-Meier life tables), pool them and "
        "write runs/<name>-stats-<timestamp>/ (stats.json, stats.md, plots); prints its path "
        "last. A count from 1 to --min-cell - 1 is suppressed at the site (docs/statistics.md).",
    )
    _add_config_args(sta)
    sta.add_argument(
        "--min-cell",
        type=int,
        default=None,
        metavar="N",
        help="smallest count a site releases (default: the study's stats.min_cell, 10)",
    )
    sta.add_argument(
        "--epsilon",
        type=float,
        default=None,
        metavar="EPS",
        help="Gaussian noise on every count, costing EPS per site (recorded in each site's "
        "privacy ledger); default: the study's stats.epsilon, 0 = no noise",
    )
    sta.add_argument(
        "--bins", type=int, default=None, help="histogram bins between the shared edges"
    )
    sta.add_argument("--engine", choices=ENGINES, default="inprocess", help="as for simulate")
    sta.add_argument("--output-dir", default=None, help="parent folder of the run directory")
    sta.add_argument("--quiet", action="store_true", help="no progress or summary")
    sta.add_argument("--verbose", action="store_true", help="show Flower's own logs")

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
        help="batch predictions for a CSV of patient rows (or a .npz of images, a long CSV of "
        "observations, or a CSV of texts)",
        description="Predict every row of a CSV (columns = the model's features) and write the "
        "rows with probability and label columns. An imaging model takes a .npz of images; "
        "with --explain it writes saliency PNGs next to --output. A sequence model takes a long "
        "CSV (patient id, time in minutes, variable, value) and writes one row per patient. A "
        "text model takes a CSV with the card's text column; with --explain it writes "
        "<output stem>-explanations.html next to --output (tokens highlighted).",
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
        "for sequence models; an HTML page of highlighted tokens for text models)",
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

    from fedmed.cli.federation import add_commands

    add_commands(sub, _add_config_args)

    show = sub.add_parser(
        "show-config",
        help="print a run config with defaults and overrides",
        description="Print the fully resolved run config as JSON.",
    )
    _add_config_args(show)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedmed.runtime.run import plan_study, run

    plan = plan_study(
        _load(args), engine=args.engine, resume=args.resume, ray_address=args.ray_address
    )
    if not args.verbose:
        # Flower resets its logger's level while starting apps; a filter sticks.
        logging.getLogger("flwr").addFilter(lambda record: record.levelno >= logging.WARNING)
    progress = None if args.quiet else _Progress(plan.config)
    live = None
    try:
        if args.dashboard is not None:
            live = _start_live_dashboard(plan.run_dir, args.dashboard)
        payload = run(plan, on_round=progress.update if progress else None, verbose=args.verbose)
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


def cmd_stats(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedmed.runtime.run import plan_stats, run_stats

    cfg = _load(args)
    chosen = {"min_cell": args.min_cell, "epsilon": args.epsilon, "bins": args.bins}
    stats = replace(cfg.stats, **{k: v for k, v in chosen.items() if v is not None})
    plan = plan_stats(cfg.replace(stats=stats), engine=args.engine)
    if not args.verbose:
        logging.getLogger("flwr").addFilter(lambda record: record.levelno >= logging.WARNING)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"fedmed stats: {line}", file=sys.stderr)

    result = run_stats(plan, progress=say, verbose=args.verbose)
    if not args.quiet:
        _print_stats(result)
    print(plan.run_dir / "stats.md")
    print(plan.run_dir)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from fedmed.runtime.run import preflight

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

    from fedmed.study.audit import audit_run

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
    from fedmed.serving.text import ServedText, predict_text_csv

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
        elif isinstance(served, ServedText):
            result = predict_text_csv(served, args.rows, args.output, explain=args.explain)
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
    "stats": cmd_stats,
    "check-data": cmd_check_data,
    "audit-privacy": cmd_audit_privacy,
    "dashboard": cmd_dashboard,
    "serve": cmd_serve,
    "predict": cmd_predict,
    "show-config": cmd_show_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    from fedmed.cli.federation import COMMANDS as DEPLOY_COMMANDS

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
