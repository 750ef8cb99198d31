"""Concurrent simulated sites (issue #20): threads vs processes, and the demo's seconds per round.

1. Why the in-process pool forks processes: four demo sites' local rounds (DP-SGD, the
   ClientApp's own ``local_round``, caches warm) timed one after another, on 2 threads, and on
   2 forked processes (each site always on the same one, as the pool does), side by side, with
   one torch intra-op thread everywhere (what a pool worker runs with).
2. The demo study per round (4 sites, DP-SGD): in-process with 1 worker (serial), with the
   pool (one worker per usable core) and on Flower's Ray engine. Each variant runs in a fresh
   interpreter; a round's time is the gap between two rounds' callbacks (round 1, which loads
   data and calibrates noise, is reported apart), median over rounds 2..R.

Usage: python benchmarks/workers.py [--rounds 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "workers.json"


def _quiet() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("flwr").addFilter(lambda r: r.levelno >= logging.WARNING)


_SITES: dict[str, Any] = {}  # the demo's plan, contexts and start model (forked workers inherit)


def _site_round(site: int, rnd: int) -> None:
    """One demo site's local round (module level: a forked pool calls it by name)."""
    from fedmed.site.app import local_round

    config = {"server-round": rnd, "fedmed.study": f"bench-{rnd}"}
    local_round(_SITES["plan"], _SITES["contexts"][site], dict(_SITES["start"]), config)


def site_rounds(repeats: int) -> dict[str, float]:
    """Seconds for 4 demo sites' local rounds: serial, 2 threads, 2 forked processes."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from flwr.app import Context, RecordDict

    from fedmed.config import load_run_config, resolve_config_path
    from fedmed.runtime.run import preflight
    from fedmed.study.plan import RunPlan, initial_model

    torch.set_num_threads(1)
    out = tempfile.mkdtemp()
    os.environ["FEDMED_LEDGER_DIR"] = str(Path(out) / "ledger")
    cfg, _ = preflight(load_run_config(resolve_config_path("demo"), [f"output_dir={out}"]))
    _SITES.update(
        plan=cfg.to_json(),
        start=initial_model(RunPlan(cfg, Path(out))).state_dict(),
        contexts=[Context(0, i, {"partition-id": i}, RecordDict(), {}) for i in range(4)],
    )
    rounds = iter(range(1, 10**6))
    for _ in range(2):  # warm this process's caches (data, noise calibration)
        rnd = next(rounds)
        for site in range(4):
            _site_round(site, rnd)
    fork = multiprocessing.get_context("fork")
    workers = [fork.Pool(1) for _ in range(2)]  # forked warm; each keeps its two sites
    times: dict[str, list[float]] = {"serial": [], "2 threads": [], "2 processes": []}
    try:
        for _ in range(repeats):
            rnd = next(rounds)
            began = time.perf_counter()
            for site in range(4):
                _site_round(site, rnd)
            times["serial"].append(time.perf_counter() - began)

            rnd = next(rounds)
            began = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(_site_round, range(4), [rnd] * 4))
            times["2 threads"].append(time.perf_counter() - began)

            rnd = next(rounds)
            began = time.perf_counter()
            jobs = [workers[s % 2].apply_async(_site_round, (s, rnd)) for s in range(4)]
            for job in jobs:
                job.get()
            times["2 processes"].append(time.perf_counter() - began)
    finally:
        for pool in workers:
            pool.terminate()
            pool.join()
    return {name: statistics.median(t) for name, t in times.items()}


def one_study(engine: str, workers: str, rounds: int) -> dict[str, object]:
    """The demo for ``rounds`` rounds in this process: round 1 and the later rounds' seconds."""
    from fedmed.config import load_run_config, resolve_config_path
    from fedmed.runtime.run import plan_study, run

    out = tempfile.mkdtemp()
    os.environ["FEDMED_LEDGER_DIR"] = str(Path(out) / "ledger")
    if workers:
        os.environ["FEDMED_SIM_WORKERS"] = workers
    cfg = load_run_config(resolve_config_path("demo"), [f"rounds={rounds}", f"output_dir={out}"])
    plan = plan_study(cfg, engine=engine)
    stamps: list[float] = []
    began = time.perf_counter()
    metrics = run(plan, on_round=lambda *_: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "round_1_s": stamps[0] - began,
        "later_rounds_s": gaps,
        "accuracy": metrics["final"]["average"]["accuracy"],
    }


VARIANTS = {  # name: (engine, FEDMED_SIM_WORKERS)
    "in-process, 1 worker (serial)": ("inprocess", "1"),
    "in-process, pool": ("inprocess", ""),
    "Ray": ("ray", ""),
}


def demo(rounds: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Each variant in a fresh interpreter, interleaved so all see the same machine state."""
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, (engine, workers) in VARIANTS.items():
            cmd = [sys.executable, __file__, "--one", engine, workers, str(rounds)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        name: {
            "s_per_round_median": statistics.median(g for r in rs for g in r["later_rounds_s"]),
            "round_1_s_median": statistics.median(r["round_1_s"] for r in rs),
            "accuracies": sorted({r["accuracy"] for r in rs}),  # one value: same results
        }
        for name, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "WORKERS", "ROUNDS"))
    args = parser.parse_args()
    _quiet()
    if args.one:
        engine, workers, rounds = args.one
        print(json.dumps(one_study(engine, workers, int(rounds))))
        return
    from fedmed.config import usable_cores

    sites = site_rounds(args.repeats)
    studies = demo(args.rounds, args.repeats)
    print(f"command: python benchmarks/workers.py --rounds {args.rounds} --repeats {args.repeats}")
    print(f"machine: {platform.machine()}, {usable_cores()} usable cores")
    print("\n4 demo sites' local rounds (DP-SGD, warm), median seconds")
    for name, seconds in sites.items():
        print(f"  {name:<12} {seconds:6.2f}  (x{sites['serial'] / seconds:.2f} vs serial)")
    print(f"\ndemo study, {args.rounds} rounds: seconds per round (rounds 2..R), round 1 apart")
    serial = studies["in-process, 1 worker (serial)"]["s_per_round_median"]
    for name, r in studies.items():
        print(
            f"  {name:<30} {r['s_per_round_median']:5.2f} s/round "
            f"(x{serial / r['s_per_round_median']:.2f} vs serial)  round 1 "
            f"{r['round_1_s_median']:5.1f} s  accuracy {r['accuracies']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"site_rounds_s": sites, "demo": studies, "cores": usable_cores()}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
