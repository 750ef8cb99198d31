"""Per-round wall time of a real federation vs the in-process simulation of the same study.

Deployment: `fedmed coordinator start` (Flower SuperLink, TLS + node auth) and 4 `fedmed site
start` daemons (SuperNodes) on 127.0.0.1, running the demo task (4 hospitals, MLP, DP-SGD) from
each site's exported CSV — measured twice, side by side in one run:

- cold: the coordinator polls for replies at Flower's default 3 s (`fedmed coordinator start
  --cold`). Sites have no cold mode any more: Flower's stock launcher would install and import a
  run's app, so every site runs fedmed's checking executor (docs/security.md); results recorded
  before that change also had a fresh `flwr-clientapp` interpreter per message at the sites;
- warm: fedmed's executor (`fedmed site start`): one process per site imports torch/Opacus once and
  forks a child per message; the ServerApp and SuperNodes poll every 0.2 s instead of 3 s.

Simulation: `fedmed simulate` of the same data, model and rounds in one process.

A round's time is the gap between consecutive rounds appearing in RUN_DIR/live.json (the
ServerApp rewrites it when a round's evaluation is aggregated), so start-up is excluded; the
median over rounds 2..R is reported, with the first round's latency separately.

Usage: python benchmarks/deployment.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, json_safe

from fedmed.config import resolve_config_path
from fedmed.runtime.deployment import Coordinator, online_sites, wait_until_ready
from fedmed.serving.server import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "deployment.json"
FEDMED = [sys.executable, "-m", "fedmed.cli"]
SITES = ("st-marys", "riverside", "northgate", "lakeview")


def fedmed(root: Path, *args: str) -> str:
    res = subprocess.run([*FEDMED, *args], cwd=root, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"fedmed {' '.join(args)} failed: {res.stderr[-2000:]}")
    return res.stdout.strip()


def round_times(cmd: list[str], root: Path, runs: Path) -> dict[str, float]:
    """Run ``cmd`` (a fedmed run/simulate) and time each round as it lands in live.json."""
    before = set(runs.glob("*")) if runs.is_dir() else set()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        for live in (set(runs.glob("*")) - before) if runs.is_dir() else ():
            try:
                history = json.loads((live / "live.json").read_text()).get("history", [])
            except (OSError, json.JSONDecodeError):
                continue
            for h in history:
                seen.setdefault(h["round"], time.perf_counter() - started)
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    wall = time.perf_counter() - started
    marks = [seen[r] for r in sorted(seen)]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    return {
        "wall_s": wall,
        "first_round_s": marks[0] if marks else float("nan"),
        "per_round_median_s": statistics.median(gaps) if gaps else float("nan"),
        "per_round_s": gaps,
    }


OPERATOR = "pki/operators/admin"


def setup(root: Path, port: int, rounds: int) -> Path:
    fedmed(root, "pki", "init")
    fedmed(root, "pki", "issue-coordinator", "--host", "localhost", "--host", "127.0.0.1")
    fedmed(root, "pki", "issue-operator", "admin")
    fedmed(root, "demo-data", "tables")
    study = root / "study.toml"
    text = resolve_config_path("federation").read_text().replace("rounds = 3", f"rounds = {rounds}")
    study.write_text(text + '[[sites]]\nname = "northgate"\n[[sites]]\nname = "lakeview"\n')
    approved = fedmed(root, "plan", "hash", str(study))
    for name in SITES:
        fedmed(root, "pki", "issue-site", name)
        fedmed(
            root,
            "site",
            "init",
            name,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--bundle",
            f"pki/sites/{name}",
            "--runtime-port",
            str(free_port()),
            "--approve",
            approved,
        )
        fedmed(root, "site", "data", "add", f"sites/{name}.toml", "breast", f"tables/{name}.csv")
    return study


def deployment(root: Path, port: int, study: Path, cold: bool) -> dict[str, float]:
    """A fresh coordinator (own state folder) and 4 site daemons, then one timed `fedmed run`."""
    extra = ["--cold"] if cold else []
    home = root / ("coordinator-cold" if cold else "coordinator-warm")
    c = Coordinator(home=home, pki_dir=root / "pki", port=port, operator=root / OPERATOR)
    quiet = {"cwd": root, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [*FEDMED, "coordinator", "start", "--dir", home.name, "--port", str(port), *extra],
            **quiet,
        )
    ]
    try:
        wait_until_ready(home, timeout=120, proc=procs[0])
        procs += [
            subprocess.Popen([*FEDMED, "site", "start", f"sites/{n}.toml"], **quiet) for n in SITES
        ]
        deadline = time.monotonic() + 120
        while online_sites(c) < len(SITES):
            if time.monotonic() > deadline:
                raise SystemExit("sites did not come online")
            time.sleep(1)
        run = [*FEDMED, "run", str(study), "--quiet", "--coordinator", home.name]
        run += ["--operator", OPERATOR]
        return round_times(run, root, root / "runs")
    finally:
        for proc in reversed(procs):  # sites first, then the coordinator
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        study = setup(root, port, args.rounds)
        for label, cold in (
            ("deployment, cold (Flower defaults)", True),
            ("deployment, warm (fedmed executor + polling)", False),
        ):
            results[label] = deployment(root, port, study, cold)
            print(label, results[label], flush=True)
        demo = ["demo", "--set", f"rounds={args.rounds}", "--quiet", "--output-dir", "sim"]
        results["simulation, in-process"] = round_times(
            [*FEDMED, "simulate", *demo], root, root / "sim"
        )
    base = results["simulation, in-process"]["per_round_median_s"]
    print(f"\n{'runtime':<46} {'per round':>10} {'x in-process':>13} {'round 1':>9} {'wall':>8}")
    for label, r in results.items():
        print(
            f"{label:<46} {r['per_round_median_s']:>9.2f}s {r['per_round_median_s'] / base:>12.1f}x"
            f" {r['first_round_s']:>8.1f}s {r['wall_s']:>7.1f}s"
        )
    payload = {"rounds": args.rounds, "sites": len(SITES), "results": results, **environment()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    print(RESULTS)


if __name__ == "__main__":
    main()
