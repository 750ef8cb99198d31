"""`fedmed pki|coordinator|site|run|plan|demo-data`: the commands of a real federation.

Kept apart from cli.py (simulation, serving) so each file reads as one story: here, a consortium
makes its PKI, starts a coordinator, hospitals start site daemons that decide what runs on their
data, and a study is submitted and followed to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fedmed.errors import ConfigError, FedmedError

Handler = Callable[[argparse.Namespace], int]


def _group(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse._SubParsersAction:
    p = sub.add_parser(name, help=help_text, description=help_text)
    return p.add_subparsers(dest="action", required=True, metavar="ACTION")


def add_commands(sub: argparse._SubParsersAction, add_config_args: Callable) -> None:
    pki = _group(sub, "pki", "consortium PKI: CA, coordinator TLS certificate, site node keys")
    p = pki.add_parser("init", help="create the consortium CA (ca.crt, ca.key)")
    p.add_argument("--dir", type=Path, default=Path("pki"), help="PKI folder (default pki)")
    p = pki.add_parser("issue-coordinator", help="TLS certificate for the coordinator")
    p.add_argument("--dir", type=Path, default=Path("pki"))
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP the sites dial (repeat; default localhost and 127.0.0.1)",
    )
    p = pki.add_parser(
        "issue-site", help="a site's node key pair + CA bundle, registered with the coordinator"
    )
    p.add_argument("name", help="site name, e.g. st-marys")
    p.add_argument("--dir", type=Path, default=Path("pki"))
    p = pki.add_parser(
        "issue-operator",
        help="an operator's client certificate: the credential that submits, lists, reads and "
        "stops runs and registers sites (through the coordinator's gate)",
    )
    p.add_argument("name", help="operator name, e.g. admin")
    p.add_argument("--dir", type=Path, default=Path("pki"))

    coord = _group(sub, "coordinator", "run the consortium's coordinator (Flower SuperLink)")
    p = coord.add_parser("start", help="start the SuperLink (foreground; Ctrl-C stops it)")
    _coordinator_args(p)
    p.add_argument(
        "--cold",
        action="store_true",
        help="Flower's default 3 s reply polling (slower; for comparison, see docs/benchmarks.md)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="Flower's log here, not in DIR/superlink.log"
    )
    p = coord.add_parser("register", help="admit a site by its public key (node.pub)")
    p.add_argument("name")
    p.add_argument("public_key", type=Path)
    _control_args(p)
    p = coord.add_parser("unregister", help="revoke a site: its daemon is cut off at once")
    p.add_argument("name")
    _control_args(p)

    run = sub.add_parser(
        "run",
        help="submit a study to a running coordinator and follow it to the end",
        description="Submit CONFIG to the coordinator started with `fedmed coordinator start "
        "--dir DIR` on this machine; prints progress per round and the run directory last.",
    )
    add_config_args(run)
    run.add_argument("--coordinator", type=Path, default=Path("coordinator"), help="its --dir")
    _operator_arg(run)
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--timeout", type=float, default=3600, help="give up after SECONDS")
    run.add_argument(
        "--stats",
        action="store_true",
        help="no training: ask every site for its federated statistics (counts only, each "
        "site's own minimum cell count and noise; docs/statistics.md) and write stats.json, "
        "stats.md and plots",
    )

    site = _group(sub, "site", "run a hospital's site daemon and manage its data and audit log")
    p = site.add_parser("init", help="write a site config (sites/NAME.toml) to review and edit")
    p.add_argument("name", help="site name, e.g. st-marys")
    p.add_argument("--coordinator", default="127.0.0.1:9092", help="host:port of the SuperLink")
    p.add_argument("--bundle", type=Path, help="folder with ca.crt and node.key (issue-site)")
    p.add_argument("--runtime-port", type=int, default=9094, help="local ClientApp API port")
    p.add_argument("--approve", action="append", default=[], help="an approved plan hash")
    p.add_argument("--epsilon-cap", type=float, default=None, help="this site's cap on ε")
    p.add_argument("--min-rows", type=int, default=20)
    p.add_argument("--insecure", action="store_true", help="local experiments only")
    p.add_argument(
        "--no-require-privacy",
        dest="require_privacy",
        action="store_false",
        help="also accept plans that train without local DP-SGD (default: refuse them)",
    )
    p.add_argument(
        "--share-statistics",
        action="store_true",
        help="send feature means/stds once per study so the served model can preprocess rows",
    )
    p.add_argument("--out", type=Path, default=None, help="default sites/NAME.toml")
    p = site.add_parser("start", help="start the site daemon (Flower SuperNode; Ctrl-C stops)")
    p.add_argument("site_config", type=Path, help="sites/<name>.toml")
    p.add_argument("--max-wait", type=float, default=None, help="give up connecting after SECONDS")
    p.add_argument(
        "--verbose", action="store_true", help="Flower's log here, not in STATE/supernode.log"
    )
    data = site.add_parser("data", help="the site's dataset registry")
    data_sub = data.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    p = data_sub.add_parser(
        "add",
        help="register a table, images or a series under a name studies use",
        description="PATH is a CSV/Parquet table; a .npz of images (MedMNIST format), a labels "
        "CSV listing PNGs (--kind images) or the folder holding it; or a long table of "
        "observations with --outcomes (a series). Every file is fingerprinted. Or, with "
        "--omop URL --config STUDY instead of PATH, an OMOP CDM v5.4 database (duckdb:///FILE "
        "or postgresql://USER@HOST/DB, no password in it): the study's [data.omop] cohort is "
        "extracted (read-only) and fingerprinted (docs/omop.md).",
    )
    p.add_argument("site_config", type=Path)
    p.add_argument("name")
    p.add_argument("path", type=Path, nargs="?", default=None)
    p.add_argument(
        "--omop",
        metavar="URL",
        default=None,
        help="an OMOP CDM database instead of a file: duckdb:///FILE or postgresql://USER@HOST/DB",
    )
    p.add_argument(
        "--config", default=None, help="with --omop: the study whose [data.omop] is the cohort"
    )
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-env",
        metavar="VARIABLE",
        default=None,
        help="with --omop: the environment variable holding the database password",
    )
    secret.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="with --omop: a file holding the database password (chmod 600)",
    )
    p.add_argument("--replace", action="store_true", help="point an existing name elsewhere")
    p.add_argument(
        "--kind",
        choices=("table", "images", "series"),
        help="default: images for a .npz or a folder, series with --outcomes, else table",
    )
    p.add_argument("--outcomes", type=Path, help="series: the outcomes table (one row/patient)")
    p.add_argument(
        "--image-column", default="image", help="labels CSV: the column naming the PNG files"
    )
    p.add_argument(
        "--series-columns",
        default="record_id,time_min,parameter,value",
        metavar="ID,TIME,VARIABLE,VALUE",
        help="series: the long table's column names (default: %(default)s)",
    )
    p.add_argument(
        "--outcome-id-column", default="RecordID", help="series: patient id in the outcomes"
    )
    p = data_sub.add_parser("list", help="registered datasets")
    p.add_argument("site_config", type=Path)
    p = data_sub.add_parser("check", help="is each table unchanged (and valid for a study)?")
    p.add_argument("site_config", type=Path)
    p.add_argument("--config", default=None, help="also validate against this study's schema")
    audit = site.add_parser("audit", help="the site's hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    p = audit_sub.add_parser("show", help="print the entries")
    p.add_argument("site_config", type=Path)
    p.add_argument("--last", type=int, default=0, help="only the last N entries")
    p = audit_sub.add_parser("verify", help="check the chain: exit 1 if anything was altered")
    p.add_argument("site_config", type=Path)

    plan = _group(sub, "plan", "what a study asks of a site")
    p = plan.add_parser("hash", help="content hash of a study's task, model and schema")
    add_config_args(p)

    demo = sub.add_parser(
        "demo-data",
        help="write each simulated site's share of a demo study's data, as a hospital would",
        description="For trying a real federation on one machine: each site's share of the "
        "config's data (default: the demo), as the hospital would export it: a CSV per site "
        "(packaged tables), a .npz per site (image studies), a long table and an outcomes table "
        "per site (series studies). With --omop OUT_DIR instead: PhysioNet 2012 set A as one "
        "OMOP CDM v5.4 DuckDB database per ICU type (docs/omop.md; needs "
        "pip install 'fedmed[omop]').",
    )
    demo.add_argument("out", type=Path, nargs="?", default=None, help="output folder")
    add_config_args(demo)
    demo.add_argument(
        "--omop",
        type=Path,
        default=None,
        metavar="OUT_DIR",
        help="write OUT_DIR/coronary-care.duckdb, cardiac-surgery.duckdb, medical-icu.duckdb "
        "and surgical-icu.duckdb from $FEDMED_DATA_DIR/physionet2012 (OMOP CDM v5.4)",
    )
    demo.add_argument(
        "--force", action="store_true", help="with --omop: replace databases already there"
    )
    demo.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="with --omop: only the first N stays (by RecordID) of each ICU type",
    )


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("coordinator"), help="state folder")
    p.add_argument("--pki", type=Path, default=Path("pki"), help="PKI folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument(
        "--insecure", action="store_true", help="no TLS, no node auth: local experiments only"
    )


def _operator_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--operator",
        type=Path,
        default=None,
        help="an operator's folder (fedmed pki issue-operator NAME): the coordinator's Control "
        "API takes only operator certificates",
    )


def _control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("coordinator"), help="the coordinator's")
    p.add_argument("--pki", type=Path, default=Path("pki"), help="PKI folder")
    _operator_arg(p)


# -- pki -----------------------------------------------------------------------------------------


def cmd_pki(args: argparse.Namespace) -> int:
    from fedmed.security import pki

    if args.action == "init":
        cert = pki.init_ca(args.dir)
        print(f"consortium CA created: {cert} (keep {args.dir / pki.CA_KEY} offline and private)")
    elif args.action == "issue-coordinator":
        hosts = args.host or ["localhost", "127.0.0.1"]
        cert = pki.issue_coordinator(args.dir, hosts)
        print(f"coordinator certificate for {', '.join(hosts)}: {cert}")
    elif args.action == "issue-operator":
        folder = pki.issue_operator(args.dir, args.name)
        print(
            f"operator '{args.name}': {folder}/ (operator.crt, operator.key); pass "
            f"--operator {folder} to `fedmed run` and `fedmed coordinator register|unregister`"
        )
    else:
        bundle = pki.issue_site(args.dir, args.name)
        print(
            f"site '{args.name}': send {bundle}/ (node.key, node.pub, ca.crt) to the site over a "
            "trusted channel; its key is registered with the coordinator"
        )
    return 0


# -- coordinator ---------------------------------------------------------------------------------


def _coordinator(args: argparse.Namespace):
    from fedmed.runtime.deployment import Coordinator

    c = Coordinator(
        home=args.dir.resolve(),
        pki_dir=None if args.insecure else args.pki.resolve(),
        host=args.host,
        port=args.port,
        insecure=args.insecure,
    )
    c.check()
    return c


def _save_settings(c) -> None:
    c.home.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": c.host,
        "port": c.port,
        "insecure": c.insecure,
        "pki": str(c.pki_dir) if c.pki_dir else None,
        "internal_port": c.internal_port,
    }
    (c.home / "coordinator.json").write_text(json.dumps(settings, indent=1) + "\n")


def load_coordinator(home: Path, operator: Path | None = None):
    """The settings `fedmed coordinator start --dir HOME` recorded."""
    from fedmed.runtime.deployment import Coordinator

    try:
        s = json.loads((home / "coordinator.json").read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{home} holds no coordinator; start one with `fedmed coordinator start --dir {home}`"
        ) from None
    return Coordinator(
        home=home.resolve(),
        pki_dir=Path(s["pki"]) if s.get("pki") else None,
        host=s["host"],
        port=int(s["port"]),
        insecure=bool(s["insecure"]),
        internal_port=int(s.get("internal_port", 0)),
        operator=operator.resolve() if operator else None,
    )


def _supervise(
    cmd: list[str],
    env: dict[str, str],
    after_start: Callable[[], None],
    companions: list[Callable[[int], list[str]]] = (),  # type: ignore[assignment]
    log: Path | None = None,
) -> int:
    """Run a Flower daemon (and companions given its pid) in the foreground until one exits.

    SIGINT/SIGTERM stop both and everything they started (each runs in its own process group).
    With ``log``, Flower's own output (several lines a second while sites poll) goes to that
    file, and the terminal keeps fedmed's few status lines.
    """
    import os

    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "a")  # noqa: SIM115 - closed below, after the daemons
        print(f"Flower's log: {log}", flush=True)
    streams = {"stdout": out, "stderr": subprocess.STDOUT} if out else {}
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True, **streams)]

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for companion in companions:
            procs.append(
                subprocess.Popen(
                    companion(procs[0].pid), env=env, start_new_session=True, **streams
                )
            )
        after_start()
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        code = next(proc.returncode for proc in procs if proc.poll() is not None)
    finally:
        stop()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            # Flower's helpers (superexec, app processes) share the group: leave none behind.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if out is not None:
            out.close()
    if log is not None and code not in (0, -signal.SIGTERM, -signal.SIGINT):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"Flower stopped with exit code {code}; end of {log}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    return code


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedmed.runtime import deployment as dep
    from fedmed.security import pki

    if args.action in ("register", "unregister"):
        return _coordinator_control(args)
    c = _coordinator(args)
    if c.insecure:
        print(dep.INSECURE_WARNING, file=sys.stderr)
    else:
        from fedmed.runtime.gate import nginx_bin

        nginx_bin()  # a clear error before anything starts
        c = replace(c, internal_port=dep.free_local_port())
        dep.make_secret(c.secret_file)
    c.home.mkdir(parents=True, exist_ok=True)
    _save_settings(c)
    dep.write_connection(c)

    def admit_sites() -> None:
        dep.wait_for_port(*c.superlink, timeout=60)
        if not c.insecure:
            dep.wait_for_port(c.host, c.port, timeout=60)  # the gate
            assert c.pki_dir is not None
            for name, key in pki.registered_sites(c.pki_dir).items():
                state = dep.register_with_superlink(c, name, key, local=True)
                print(f"site '{name}': {state}", flush=True)
        mode = "INSECURE" if c.insecure else "TLS + node authentication + operator gate"
        dep.ready_file(c.home).write_text(f"{c.address}\n")
        print(f"coordinator ready on {c.address} ({mode}); state in {c.home}", flush=True)

    dep.ready_file(c.home).unlink(missing_ok=True)
    env = dep.flower_env(c.flwr_home)
    if args.cold:
        from fedmed.coordinator.grid import GRID_POLL_ENV

        env[GRID_POLL_ENV] = "3"
    log = None if args.verbose else c.home / "superlink.log"
    companions = (
        []
        if c.insecure
        else [
            lambda pid: dep.coordinator_executor_command(c, pid),
            lambda _pid: dep.gate_command(c),
        ]
    )
    try:
        return _supervise(dep.superlink_command(c), env, admit_sites, companions, log=log)
    finally:
        dep.ready_file(c.home).unlink(missing_ok=True)


def _coordinator_control(args: argparse.Namespace) -> int:
    """register / unregister: the registry in --pki, and the running coordinator (operators)."""
    from fedmed.runtime import deployment as dep
    from fedmed.security import pki

    running = (args.dir / "coordinator.json").is_file() and dep.ready_file(args.dir).is_file()
    c = load_coordinator(args.dir, args.operator) if running else None
    if c is not None and not c.insecure:
        dep.operator_files(c)  # no credential: refuse before touching anything
    if args.action == "register":
        pki.register_site(args.pki, args.name, args.public_key)
        print(f"site '{args.name}' added to {args.pki}/registered")
        if c is None:
            print("the coordinator is not running: the key is registered when it starts")
            return 0
        print(f"site '{args.name}': {dep.register_with_superlink(c, args.name, args.public_key)}")
        return 0
    if c is not None:
        node = dep.unregister_from_superlink(c, args.name)
        print(f"site '{args.name}' (node {node}) unregistered: its daemon is cut off")
    key = args.pki / "registered" / f"{pki.check_site_name(args.name)}.pub"
    if key.is_file():
        key.unlink()
        print(f"{key} removed: the site is not admitted at the next start")
    elif c is None:
        raise ConfigError(f"site '{args.name}' is not registered in {args.pki}/registered")
    return 0


# -- site ----------------------------------------------------------------------------------------


def cmd_site(args: argparse.Namespace) -> int:
    from fedmed.config import load_site_config

    if args.action == "init":
        return _site_init(args)
    site = load_site_config(args.site_config)
    if args.action == "start":
        return _site_start(site, args)
    if args.action == "data":
        return _site_data(site, args)
    return _site_audit(site, args)


def _site_init(args: argparse.Namespace) -> int:
    """A reviewed-by-a-human starting point: every policy line is visible in the file."""
    import os

    from fedmed.config import load_site_config

    out = args.out or Path("sites") / f"{args.name}.toml"
    if out.exists():
        raise ConfigError(f"{out} exists; edit it, or pass --out for a new file")
    out.parent.mkdir(parents=True, exist_ok=True)

    def rel(path: Path) -> str:
        return os.path.relpath(path.resolve(), out.parent.resolve())

    lines = [f'name = "{args.name}"', f'coordinator = "{args.coordinator}"']
    if args.bundle:
        lines += [
            f'ca_certificate = "{rel(args.bundle / "ca.crt")}"',
            f'node_key = "{rel(args.bundle / "node.key")}"',
        ]
    lines += [
        f"insecure = {str(args.insecure).lower()}",
        f"runtime_port = {args.runtime_port}",
        f'state_dir = "{rel(Path("state") / args.name)}"  # registry, audit log, privacy ledger',
        "# Plans (fedmed plan hash CONFIG) this site's data steward approved:",
        f"approved_plans = {json.dumps(args.approve)}",
        f"min_rows = {args.min_rows}",
        "# true: refuse any plan that trains without local DP-SGD (--no-require-privacy: false)",
        f"require_privacy = {str(args.require_privacy).lower()}",
        "require_secure_aggregation = false  # true: only SecAgg+ studies (no update in the clear)",
        "# Feature means/stds (train split) for the served model's preprocessing, once per study:",
        f"share_statistics = {str(args.share_statistics).lower()}",
        "# Text studies: share only words this site counts at least this often (a plan asking",
        "# for rarer words is refused even when approved)",
        "min_word_count = 5",
    ]
    if args.epsilon_cap is not None:
        lines.append(f"epsilon_cap = {args.epsilon_cap}")
    out.write_text("\n".join(lines) + "\n")
    try:
        load_site_config(out)
    except ConfigError:
        out.unlink()
        raise
    print(out)
    return 0


def _site_start(site, args: argparse.Namespace) -> int:
    from fedmed.runtime import deployment as dep

    if site.insecure:
        print(dep.INSECURE_WARNING, file=sys.stderr)
    cmd = dep.supernode_command(site, args.site_config, max_wait=args.max_wait)
    site.state_path.mkdir(parents=True, exist_ok=True)
    dep.make_secret(dep.site_secret(site))
    approved = len(site.approved_plans)
    print(
        f"site '{site.name}' connecting to {site.coordinator}; {approved} approved plan(s); "
        f"audit log {site.state_path / 'audit.jsonl'}",
        flush=True,
    )
    log = None if args.verbose else site.state_path / "supernode.log"
    env = dep.flower_env(site.state_path / "flwr")
    companions = [lambda pid: dep.executor_command(site, pid)]
    return _supervise(cmd, env, lambda: None, companions, log=log)


def _site_data(site, args: argparse.Namespace) -> int:
    from fedmed.data.registry import DatasetRegistry

    registry = DatasetRegistry(site.state_path)
    if args.data_action == "add" and args.omop is not None:
        return _site_data_add_omop(registry, args)
    if args.data_action == "add":
        if args.path is None:
            raise ConfigError(
                "give the PATH of the data to register (or --omop URL --config STUDY for an "
                "OMOP database)"
            )
        if args.config or args.password_env or args.password_file:
            raise ConfigError(
                "--config, --password-env and --password-file belong to --omop URL; drop them"
            )
        ds = registry.add(
            args.name,
            args.path,
            kind=args.kind,
            outcomes=args.outcomes,
            layout=_layout(args),
            replace=args.replace,
        )
        files = f", {len(ds.files)} files" if ds.files else ""
        print(f"registered '{ds.name}': {ds.summary()}{files}, {ds.sha256}")
        return 0
    if args.data_action == "list":
        for ds in registry.list():
            where = f"{ds.path} + {ds.outcomes}" if ds.outcomes else ds.path
            print(f"{ds.name}\t{ds.summary()}\t{ds.sha256}\t{where}")
        return 0
    return _site_data_check(site, registry, args)


def _site_data_add_omop(registry, args: argparse.Namespace) -> int:
    """Register an OMOP database with the cohort of the study given by --config."""
    from fedmed.config import load_run_config, resolve_config_path

    if args.path is not None:
        raise ConfigError(f"give either PATH ({args.path}) or --omop URL, not both")
    if args.kind or args.outcomes:
        raise ConfigError(
            "--kind and --outcomes describe files; an OMOP database's cohort, features and "
            "outcome come from the study's [data.omop] (--config): drop them"
        )
    if not args.config:
        raise ConfigError(
            "--omop needs the study that defines the cohort: --config STUDY.toml (its "
            "[data.omop] section)"
        )
    credentials = ""
    if args.password_env:
        credentials = f"env:{args.password_env}"
    elif args.password_file:
        credentials = f"file:{args.password_file.expanduser().resolve()}"
    run = load_run_config(resolve_config_path(args.config))
    ds = registry.add_omop(
        args.name, args.omop, run.data.omop, credentials=credentials, replace=args.replace
    )
    print(f"registered '{ds.name}': {ds.summary()} from {ds.path}, {ds.sha256}")
    return 0


def _layout(args: argparse.Namespace) -> dict[str, str]:
    """The site's own column names (fedmed.data.registry.DatasetRegistry.add's layout)."""
    from fedmed.data.registry import SERIES_COLUMNS

    names = [c.strip() for c in args.series_columns.split(",")]
    if len(names) != len(SERIES_COLUMNS) or not all(names):
        raise ConfigError(
            f"--series-columns '{args.series_columns}' must name 4 columns: ID,TIME,VARIABLE,VALUE"
        )
    return {
        "column": args.image_column,
        **dict(zip(SERIES_COLUMNS, names, strict=True)),
        "outcome_id_column": args.outcome_id_column,
    }


def _site_data_check(site, registry, args: argparse.Namespace) -> int:
    problems = 0
    run = None
    if args.config:
        from fedmed.config import load_run_config, resolve_config_path

        run = load_run_config(resolve_config_path(args.config))
    for ds in registry.list():
        if run is not None and ds.name != run.data.dataset:
            continue
        try:
            registry.verify(ds.name)
            detail = f"{ds.summary()}, unchanged"
            if run is not None:
                from fedmed.tasks import load_site_table, site_view

                local, spec = site_view(run, ds, site.name)
                table = load_site_table(local, spec)
                detail += f", valid for '{run.name}': {len(table.y_train)} train examples"
            print(f"{ds.name}: ok ({detail})")
        except FedmedError as exc:
            problems += 1
            print(f"{ds.name}: FAILED: {exc}")
    if run is not None and run.data.dataset not in {d.name for d in registry.list()}:
        problems += 1
        print(f"{run.data.dataset}: FAILED: the study's dataset is not registered at this site")
    return 1 if problems else 0


def _site_audit(site, args: argparse.Namespace) -> int:
    from fedmed.security.audit import AuditLog

    log = AuditLog(site.state_path)
    if args.audit_action == "verify":
        problems = log.verify()
        n = len(log.entries()) if not problems else 0
        for p in problems:
            print(f"FAILED {p}")
        if not problems:
            print(f"ok: {n} entries, chain intact ({log.path})")
        return 1 if problems else 0
    entries = log.entries()
    for e in entries[-args.last :] if args.last else entries:
        outcome = e.get("outcome", "")
        eps = f" ε={e['epsilon']:.3f}" if "epsilon" in e else ""
        print(
            f"{e['seq']:>5} {e['time']} {e['direction']:<8} run {e.get('run_id')} "
            f"round {e.get('round', '-')} {e.get('message_type')} {e.get('bytes')} B "
            f"{e.get('plan_hash', '')[:19]} {outcome}{eps}"
        )
    return 0


# -- run -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from fedmed.cli.display import _load, _print_summary
    from fedmed.runtime import deployment as dep
    from fedmed.study.plan import RunPlan, new_run_dir

    cfg = _load(args)
    if not cfg.data.dataset:
        raise ConfigError(
            "a federation reads each site's registered dataset: set data.dataset in the config "
            "(sites register it with `fedmed site data add`)"
        )
    if cfg.data.partition_file or cfg.data.series.outcomes:
        raise ConfigError(
            "data.partition_file and data.series.outcomes are files of a simulation; in a "
            "federation each site registers its own (`fedmed site data add SITE_CONFIG NAME "
            "LONG.csv --outcomes OUTCOMES.csv` for a series): drop them from the study"
        )
    placed = [s.name for s in cfg.sites if s.path or s.credentials]
    if cfg.data.omop.active and placed:
        raise ConfigError(
            f"site '{placed[0]}' has a path or credentials: in a federation each site "
            "registers its own database (`fedmed site data add SITE_CONFIG NAME --omop URL "
            "--config STUDY`); drop them from the study's [[sites]]"
        )
    if not cfg.data.schema.features:
        raise ConfigError(
            "list data.schema.features: the coordinator cannot see the sites' tables to infer them"
        )
    c = load_coordinator(args.coordinator, args.operator)
    if not c.insecure:
        dep.operator_files(c)
    cfg = cfg.replace(output_dir=str(Path(cfg.output_dir).resolve()))
    # Which node speaks for which site: the coordinator's registry, never a reply's own claim.
    nodes = dep.read_nodes(c)
    if not c.insecure and not nodes:
        raise ConfigError(
            f"the coordinator in {c.home} has no site registry ({c.nodes_file}): restart it "
            "with `fedmed coordinator start` (it registers the sites in its --pki), or admit "
            "them with `fedmed coordinator register NAME node.pub --operator DIR`"
        )
    run_dir = new_run_dir(cfg, "stats" if args.stats else "")
    plan = RunPlan(cfg, run_dir, engine="deployment", nodes=json.dumps(nodes), stats=args.stats)
    online = dep.online_sites(c)
    run_id = dep.submit(c, plan)
    print(
        f"{online} site(s) online; run {run_id} submitted to {c.address}; outputs in "
        f"{plan.run_dir}",
        file=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the run like Ctrl-C does
    try:
        status = _follow(c, run_id, plan.run_dir, args.quiet, args.timeout)
    except KeyboardInterrupt:
        dep.stop_run(c, run_id)
        print(f"run {run_id} stopped on the coordinator", file=sys.stderr)
        raise
    if args.stats:
        return _stats_done(plan.run_dir, run_id, status, args.quiet)
    metrics = plan.run_dir / "metrics.json"
    if not metrics.is_file():
        raise FedmedError(
            f"run {run_id} ended ({status}) without results; see the coordinator's output, or "
            f"FLWR_HOME={c.flwr_home} flwr log {run_id} {dep.CONNECTION}"
        )
    payload = json.loads(metrics.read_text())
    if payload.get("status") == "failed":  # the coordinator released no model (fedmed.study)
        from fedmed.errors import StudyFailed

        raise StudyFailed(
            f"run {run_id} released no model: {payload.get('error', 'see metrics.json')}; see "
            f"{metrics} (failures per round)"
        )
    if not args.quiet:
        _print_summary(payload)
    print(plan.run_dir)
    return 0


def _stats_done(run_dir: Path, run_id: int, status: str, quiet: bool) -> int:
    """The end of `fedmed run --stats`: the summary table, the report, the run folder."""
    from fedmed.cli.display import _print_stats

    stats = run_dir / "stats.json"
    if not stats.is_file():
        raise FedmedError(
            f"run {run_id} ended ({status}) without statistics; see the coordinator's output "
            "(every site may have refused: share_statistics, plan approval, ε cap)"
        )
    if not quiet:
        _print_stats(json.loads(stats.read_text()))
    print(run_dir / "stats.md")
    print(run_dir)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _follow(c, run_id: int, run_dir: Path, quiet: bool, timeout: float) -> str:
    """Poll live.json (the ServerApp rewrites it each round) until Flower says the run ended."""
    from fedmed.runtime import deployment as dep

    deadline = time.monotonic() + timeout
    shown = 0
    status = "unknown"
    next_status = 0.0
    while time.monotonic() < deadline:
        # Asking Flower costs a `flwr` process (~1 s of CPU): do it every 5 s, or when the run
        # has written its final metrics. Asked before the rounds are read, so that the last
        # round written just before the run ended is still shown.
        finished = (run_dir / "metrics.json").is_file() or (run_dir / "stats.json").is_file()
        if finished or time.monotonic() >= next_status:
            status = dep.run_status(c, run_id)
            next_status = time.monotonic() + 5.0
        # metrics.json holds the whole history too: a live.json replaced late is not a gap.
        sources = ("live.json", "metrics.json") if finished else ("live.json",)
        for entry in (e for name in sources for e in _new_rounds(run_dir / name, shown)):
            if entry["round"] <= shown:
                continue
            shown = entry["round"]
            if not quiet:
                print(_round_line(entry), file=sys.stderr, flush=True)
        if status.startswith("finished"):
            return status
        time.sleep(0.5)
    raise FedmedError(f"run {run_id} still '{status}' after {timeout:.0f} s; it keeps running")


def _new_rounds(live: Path, after: int) -> list[dict]:
    try:
        history = json.loads(live.read_text()).get("history", [])
    except (OSError, json.JSONDecodeError):  # not written yet, or mid-replace
        return []
    return [h for h in history if h["round"] > after]


def _round_line(entry: dict) -> str:
    avg = entry.get("average", {})
    parts = [f"round {entry['round']}"]
    for key in ("accuracy", "roc_auc"):
        if avg.get(key) is not None:
            parts.append(f"{key} {avg[key]:.3f}")
    eps = [v for v in entry.get("epsilon", {}).values() if v]
    if eps:
        parts.append(f"ε≤{max(eps):.2f}")
    for f in entry.get("failures", []):
        parts.append(f"{f['phase']} failed: {f['reason']}")
    return " · ".join(parts)


# -- plan / demo data ----------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from fedmed.cli.display import _load
    from fedmed.security.policy import plan_hash

    print(plan_hash(_load(args)))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from fedmed.cli.display import _load
    from fedmed.data.sources import load_site_frame

    if args.omop is not None:
        return _demo_omop(args)
    if args.out is None:
        raise ConfigError(
            "demo-data needs an output folder: fedmed demo-data OUT [CONFIG], or "
            "fedmed demo-data --omop OUT_DIR for OMOP databases"
        )
    if args.force or args.limit is not None:
        raise ConfigError("--force and --limit go with --omop OUT_DIR; drop them or add --omop")
    cfg = _load(args)
    if cfg.task == "imaging-classification" and cfg.data.partition_file:
        return _demo_images(cfg, args.out)
    if cfg.task == "sequence-classification" and cfg.data.site_column:
        return _demo_series(cfg, args.out)
    if not cfg.data.builtin:
        raise ConfigError(
            "demo-data exports a simulation's shared data: pick a config with data.builtin, an "
            "image study with data.partition_file, or a series study with data.site_column"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for site in cfg.sites:
        frame, _ = load_site_frame(cfg, site)
        path = args.out / f"{site.name}.csv"
        frame.to_csv(path, index=False)
        print(f"{site.name}: {len(frame)} rows -> {path}")
    return 0


def _demo_omop(args: argparse.Namespace) -> int:
    """PhysioNet 2012 set A as four sites' OMOP databases; the folder is printed last."""
    from fedmed.data.omop import build_physionet_omop

    if args.out is not None or args.config is not None or args.overrides:
        raise ConfigError(
            "demo-data --omop OUT_DIR reads PhysioNet 2012 set A and takes no OUT, CONFIG or "
            "--set; drop them"
        )
    for built in build_physionet_omop(args.omop, force=args.force, limit=args.limit):
        print(
            f"{built.site.name}: {built.persons} stays, {built.deaths} in-hospital deaths, "
            f"{built.measurements} measurements -> {built.path}"
        )
    print(args.omop)
    return 0


def _demo_images(cfg, out: Path) -> int:
    """One MedMNIST-format .npz per site: its share of the study's partition_file."""
    import numpy as np

    from fedmed.data.arrays import shard
    from fedmed.data.images import load_images
    from fedmed.data.sources import resolve_site_path

    path = resolve_site_path(cfg.data.partition_file)
    images, labels = load_images(
        path, cfg.data.schema.target, cfg.data.images.column, cfg.data.images.size
    )
    out.mkdir(parents=True, exist_ok=True)
    for site in cfg.sites:
        rows = shard(cfg, site, labels)
        mine = images[rows]
        file = out / f"{site.name}.npz"
        np.savez(
            file,
            train_images=mine[..., 0] if mine.shape[-1] == 1 else mine,
            train_labels=labels[rows].astype(np.uint8),
        )
        print(f"{site.name}: {len(rows)} images -> {file}")
    return 0


def _demo_series(cfg, out: Path) -> int:
    """Per site: the long-table rows of its patients and their outcome rows (id + target only)."""
    import pandas as pd

    from fedmed.data.series import load_long
    from fedmed.data.sources import resolve_site_path

    series = cfg.data.series
    outcomes = pd.read_csv(
        resolve_site_path(series.outcomes),
        usecols=[series.outcome_id_column, cfg.data.schema.target],
    )
    for site in cfg.sites:
        long = load_long(resolve_site_path(site.path), series)
        rows = long[long["variable"] == cfg.data.site_column]
        ids = rows["id"][rows["value"].isin([float(v) for v in site.site_values])].unique()
        folder = out / site.name
        folder.mkdir(parents=True, exist_ok=True)
        mine = long[long["id"].isin(ids)].set_axis(
            [series.id_column, series.time_column, series.variable_column, series.value_column],
            axis=1,
        )
        mine.to_csv(folder / "long.csv.gz", index=False)
        outcomes[outcomes[series.outcome_id_column].isin(ids)].to_csv(
            folder / "outcomes.csv", index=False
        )
        print(f"{site.name}: {len(ids)} patients -> {folder}/long.csv.gz + outcomes.csv")
    return 0


COMMANDS: dict[str, Handler] = {
    "pki": cmd_pki,
    "coordinator": cmd_coordinator,
    "run": cmd_run,
    "site": cmd_site,
    "plan": cmd_plan,
    "demo-data": cmd_demo_data,
}
