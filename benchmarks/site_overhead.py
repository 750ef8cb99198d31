"""What fedmed costs per site and round beyond the training itself, for 10 to 1,000 sites.

N synthetic hospitals (a generated 100-row table each, written to a temporary folder), a tiny MLP,
the in-process engine, FedAvg, with and without DP-SGD. Two clocks, in the same process:

* fedmed: the study through ``fedmed.runtime.run`` (Flower apps, site mods, data loading,
  ledger and ε at every site, the coordinator's validation, checkpoint and live report); a
  round's time is the gap between two round callbacks.
* compute: the same local work as a bare PyTorch loop over the already-loaded data: per site,
  a fresh model loaded with the global state, one local round (``train_plain``, or
  ``train_private``: DP-SGD's own mechanics and noise), a fresh model to evaluate on its test
  rows, and the weighted mean. No ledger, no ε, no messages.

Overhead per site-round = (fedmed round - compute round) / N, median over rounds 2..R (round 1
carries first-use costs: noise calibration, model compilation, file caches; it is reported
apart). Because the compute clock runs the same functions on the same data, what remains is
what the framework adds. Each clock runs in a fresh process of its own: run one after the other
in one process, the second inherits the first's live objects (and the garbage collector's work
over them), which slowed a 1,000-site compute loop by ~40 % and hid that cost from the overhead.

Usage: python benchmarks/site_overhead.py [--sites 10 100 1000] [--rounds 3] [--dp both]
Runs against whichever ``fedmed`` is imported (PYTHONPATH picks a checkout); the commit of that
checkout is printed, so before/after numbers come from two runs of this same script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROWS = 100


def fedmed_source() -> dict[str, str | None]:
    """Which checkout of fedmed this process imported, and its commit (and whether it is dirty)."""
    import fedmed

    root = Path(fedmed.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "fedmed")
    return {"checkout": str(root), "commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty}


def write_sites(folder: Path, n: int) -> list[dict[str, str]]:
    """``n`` CSV tables of ROWS patients with a learnable binary outcome, one per site."""
    sites = []
    for i in range(n):
        rng = np.random.default_rng(i)
        age = rng.normal(60, 10, ROWS).round(0)
        bp = rng.normal(130, 15, ROWS).round(0)
        chol = rng.normal(200, 30, ROWS).round(0)
        smoker = rng.choice(["yes", "no"], ROWS)
        risk = 0.05 * (age - 60) + 0.03 * (bp - 130) + (smoker == "yes") * 1.0
        outcome = (risk + rng.normal(0, 0.5, ROWS) > np.median(risk)).astype(int)
        frame = pd.DataFrame(
            {"age": age, "bp": bp, "chol": chol, "smoker": smoker, "outcome": outcome}
        )
        path = folder / f"site-{i:04d}.csv"
        frame.to_csv(path, index=False)
        sites.append({"name": f"site-{i:04d}", "path": str(path)})
    return sites


def study(sites: list[dict[str, str]], rounds: int, dp: bool, out: Path) -> Any:
    from fedmed.config import parse_run_config

    return parse_run_config(
        {
            "name": "overhead",
            "rounds": rounds,
            "seed": 1,
            "device": "cpu",
            "output_dir": str(out),
            "model": {"kind": "mlp", "hidden": [8]},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "privacy": {"enabled": dp, "target_epsilon": 10.0, "delta": 1e-5},
            "data": {
                "schema": {
                    "target": "outcome",
                    "features": ["age", "bp", "chol", "smoker"],
                    "categorical": {"smoker": ["no", "yes"]},
                    "drop_first": True,
                    "test_fraction": 0.3,
                }
            },
            "sites": sites,
        }
    )


def fedmed_rounds(cfg: Any) -> tuple[list[float], float]:
    """Seconds of each round through fedmed, and of planning (every site's table checked)."""
    from fedmed.runtime.run import plan_study, run

    start = time.perf_counter()
    plan = plan_study(cfg)
    planned = time.perf_counter() - start
    marks = [time.perf_counter()]
    run(plan, on_round=lambda rnd, history: marks.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(marks)], planned


def compute_rounds(cfg: Any) -> list[float]:
    """Seconds of each round of the same local work as a bare PyTorch loop (data preloaded)."""
    import torch

    from fedmed.privacy.dpsgd import train_private
    from fedmed.runtime.run import preflight
    from fedmed.tasks import build_model, get_task, load_site_data
    from fedmed.train import derive_seed, evaluate, train_plain

    cfg, _ = preflight(cfg)
    sites = [load_site_data(cfg, s) for s in cfg.sites]
    task, cpu = get_task(cfg.task), torch.device("cpu")
    global_state = build_model(cfg).state_dict()
    times = []
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        states, weights = [], []
        for data in sites:
            model = build_model(cfg)
            model.load_state_dict(global_state)
            seed = derive_seed(cfg.seed, rnd, data.name)
            if cfg.privacy.enabled:
                result, _ = train_private(
                    model, data.x_train, data.y_train, task, cfg, seed=seed, device=cpu
                )
            else:
                result = train_plain(
                    model, data.x_train, data.y_train, task, cfg.train, seed=seed, device=cpu
                )
            states.append(model.state_dict())
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {
            k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
            for k in states[0]
        }
        for data in sites:  # each site builds its model to evaluate, as a real one must
            model = build_model(cfg)
            model.load_state_dict(global_state)
            evaluate(model, data.x_test, data.y_test, task, cpu, train=(data.x_train, data.y_train))
        times.append(time.perf_counter() - start)
    return times


def clock(args: argparse.Namespace) -> None:
    """One clock in this (fresh) process, on the tables in --data; round seconds as JSON."""
    folder = Path(args.data)
    sites = [{"name": p.stem, "path": str(p)} for p in sorted(folder.glob("site-*.csv"))]
    out = Path(args.json_out).with_suffix("")  # runs, ledger and site state of this clock
    os.environ["FEDMED_LEDGER_DIR"] = str(out / "ledger")  # a fresh budget for each study
    os.environ["FEDMED_SITE_STATE_DIR"] = str(out / "sites")
    cfg = study(sites, args.rounds, args.dp == "on", out)
    if args.clock == "fedmed":
        times, planned = fedmed_rounds(cfg)
    else:
        times, planned = compute_rounds(cfg), 0.0
    Path(args.json_out).write_text(json.dumps({"rounds": times, "plan_s": planned}))


def run_clock(which: str, rounds: int, dp: bool, folder: Path) -> dict:
    """Run ``which`` clock in a child process with this process's environment (PYTHONPATH)."""
    result = folder / f"{which}-{'dp' if dp else 'plain'}.json"
    cmd = [sys.executable, __file__, "--clock", which, "--data", str(folder)]
    cmd += ["--rounds", str(rounds), "--dp", "on" if dp else "off", "--json-out", str(result)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def measure(n: int, rounds: int, dp: bool, folder: Path) -> dict:
    bare = run_clock("compute", rounds, dp, folder)["rounds"]
    fedmed = run_clock("fedmed", rounds, dp, folder)
    fed, planned = fedmed["rounds"], fedmed["plan_s"]
    steady = slice(1, None) if rounds > 1 else slice(None)
    fed_s, bare_s = statistics.median(fed[steady]), statistics.median(bare[steady])
    return {
        "sites": n,
        "dp": dp,
        "rounds": rounds,
        "plan_s": planned,
        "fedmed_round_s": fed,
        "compute_round_s": bare,
        "overhead_ms_per_site_round": (fed_s - bare_s) / n * 1e3,
        "round1_overhead_ms_per_site_round": (fed[0] - bare[0]) / n * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", choices=("off", "on", "both"), default="both")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    for internal in ("--clock", "--data", "--json-out"):  # one clock in a child process
        parser.add_argument(internal, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("flwr").addFilter(lambda r: r.levelno >= logging.WARNING)
    torch_threads()
    if args.clock:
        clock(args)
        return
    source = fedmed_source()
    commit = source["commit"] or "(not a git checkout: say which code it is)"
    print(f"fedmed from {source['checkout']} at {commit}", end="")
    print(" (uncommitted changes)" if source["dirty"] else "")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.dp]
    results = []
    print(
        f"{'sites':>6} {'DP':>4} {'fedmed s/round':>15} {'compute s/round':>16} "
        f"{'overhead ms/site-round':>23} {'(round 1)':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.sites:
            folder = root / f"data-{n}"
            folder.mkdir()
            write_sites(folder, n)
            for dp in modes:
                r = measure(n, args.rounds, dp, folder)
                results.append(r)
                print(
                    f"{n:>6} {'on' if dp else 'off':>4} "
                    f"{statistics.median(r['fedmed_round_s'][1:] or r['fedmed_round_s']):>15.2f} "
                    f"{statistics.median(r['compute_round_s'][1:] or r['compute_round_s']):>16.2f} "
                    f"{r['overhead_ms_per_site_round']:>23.1f} "
                    f"{r['round1_overhead_ms_per_site_round']:>10.1f}",
                    flush=True,
                )
    if args.output:
        payload = {"source": source, "cpus": os.cpu_count(), "results": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")


def torch_threads() -> None:
    """One intra-op thread: a tiny MLP gains nothing from more, and both clocks use the same."""
    import torch

    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
