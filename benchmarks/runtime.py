"""Runtime cost of fedmed, measured side by side in one run.

1. The demo study end to end as a user runs it (`fedmed simulate --quiet`), in-process vs on
   Flower's Ray engine: wall time and peak resident memory of the whole process tree (Ray's
   raylet, GCS and workers included).
2. fedmed's per-round overhead: the same federated rounds (same data, model, optimizer, steps,
   per-site evaluation, FedAvg) once through fedmed's Flower apps in-process and once as a bare
   PyTorch loop with no framework at all. The ratio is what the framework costs per round.

Usage: python benchmarks/runtime.py [--repeats 3] [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtime.json"


def run_tree(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) summed over the process and all its descendants."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += p.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 2**20


def bench_engines(repeats: int, out_dir: str) -> dict[str, dict[str, float]]:
    env = {**os.environ, "FEDMED_LEDGER_DIR": str(Path(out_dir) / "ledger")}
    fedmed = str(Path(sys.executable).with_name("fedmed"))
    results: dict[str, list[tuple[float, float]]] = {"inprocess": [], "ray": []}
    for _ in range(repeats):  # interleaved, so both see the same machine state
        for engine in results:
            cmd = [
                fedmed,
                "simulate",
                "demo",
                "--quiet",
                "--engine",
                engine,
                "--set",
                f"output_dir={out_dir}",
            ]
            results[engine].append(run_tree(cmd, env))
    return {
        engine: {
            "wall_s_median": statistics.median(w for w, _ in runs),
            "peak_rss_mib_median": statistics.median(m for _, m in runs),
        }
        for engine, runs in results.items()
    }


def bench_overhead(rounds: int, repeats: int, out_dir: str) -> dict[str, float]:
    """Per-round seconds: fedmed's Flower apps in-process vs a bare PyTorch FedAvg loop."""
    import numpy as np
    import torch

    from fedmed.config import load_run_config, resolve_config_path
    from fedmed.coordinator.app import build_server_app
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from fedmed.site.app import app as client_app
    from fedmed.study.plan import RunPlan, initial_model, new_run_dir
    from fedmed.tasks import get_task, load_site_data
    from fedmed.train import derive_seed, evaluate, train_plain

    cfg = load_run_config(
        resolve_config_path("demo"),
        [f"rounds={rounds}", "privacy.enabled=false", f"output_dir={out_dir}"],
    )
    cfg, _ = preflight(cfg)
    sites = [load_site_data(cfg, s) for s in cfg.sites]
    task = get_task(cfg.task)
    cpu = torch.device("cpu")

    def plain() -> float:
        start = time.perf_counter()
        global_model = initial_model(RunPlan(cfg, Path(out_dir)))
        for rnd in range(1, cfg.rounds + 1):
            states, weights = [], []
            for data in sites:
                model = initial_model(RunPlan(cfg, Path(out_dir)))
                model.load_state_dict(global_model.state_dict())
                result = train_plain(
                    model,
                    data.x_train,
                    data.y_train,
                    task,
                    cfg.train,
                    seed=derive_seed(cfg.seed, rnd, data.name),
                    device=cpu,
                )
                states.append(model.state_dict())
                weights.append(result.num_examples)
            total = sum(weights)
            global_model.load_state_dict(
                {
                    k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
                    for k in states[0]
                }
            )
            for data in sites:
                evaluate(global_model, data.x_test, data.y_test, task, cpu)
        return (time.perf_counter() - start) / cfg.rounds

    def framework() -> float:
        plan = RunPlan(cfg, new_run_dir(cfg))
        start = time.perf_counter()
        run_inprocess(build_server_app(plan), client_app, len(cfg.sites), plan.to_run_config())
        return (time.perf_counter() - start) / cfg.rounds

    framework()  # warm-up: imports, data caches, first-call costs
    plain()
    fed, bare = [], []
    for _ in range(repeats):
        fed.append(framework())
        bare.append(plain())
    del np
    return {
        "rounds": cfg.rounds,
        "fedmed_s_per_round_median": statistics.median(fed),
        "plain_pytorch_s_per_round_median": statistics.median(bare),
        "ratio_fedmed_over_plain": statistics.median(fed) / statistics.median(bare),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").addFilter(lambda r: r.levelno >= logging.WARNING)
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ["FEDMED_LEDGER_DIR"] = str(Path(out_dir) / "ledger")
        engines = bench_engines(args.repeats, out_dir)
        overhead = bench_overhead(args.rounds, args.repeats, out_dir)
    inproc, ray = engines["inprocess"], engines["ray"]
    print(f"command: python benchmarks/runtime.py --repeats {args.repeats} --rounds {args.rounds}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("\ndemo study (10 rounds, 4 sites, DP-SGD), whole process tree, median of repeats")
    print(f"{'engine':<10} {'wall s':>8} {'peak MiB':>9}")
    for name, r in engines.items():
        print(f"{name:<10} {r['wall_s_median']:>8.1f} {r['peak_rss_mib_median']:>9.0f}")
    print(
        f"ray / inprocess: wall x{ray['wall_s_median'] / inproc['wall_s_median']:.2f}, "
        f"memory x{ray['peak_rss_mib_median'] / inproc['peak_rss_mib_median']:.2f}"
    )
    print("\nper-round cost, demo without DP, in one process")
    print(f"fedmed (Flower apps, in-process): {overhead['fedmed_s_per_round_median'] * 1e3:.1f} ms")
    print(
        f"plain PyTorch loop:               "
        f"{overhead['plain_pytorch_s_per_round_median'] * 1e3:.1f} ms"
    )
    print(f"ratio fedmed / plain: x{overhead['ratio_fedmed_over_plain']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"engines": engines, "overhead": overhead, "cpus": os.cpu_count()}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
