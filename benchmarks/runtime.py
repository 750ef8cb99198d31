"""Runtime cost of fedmed, measured side by side in one run.

1. The demo study end to end as a user runs it (`fedmed simulate --quiet`), in-process vs on
   Flower's Ray engine: wall time and peak resident memory of the whole process tree (Ray's
   raylet, GCS and workers included).
   Also seconds per round in steady state, read off the run's live.json.
2. fedmed's per-round overhead: the same federated rounds (same data, model, optimizer, steps,
   per-site evaluation, FedAvg) through fedmed's Flower apps in-process, with the sites one
   after another and on the worker pool, and as a bare PyTorch loop with no framework at all;
   without DP, and with DP (the loop then uses plain Opacus DP-SGD and computes ε once per
   round). Rounds are timed from the end of round 1 to the end of the last. The ratios are
   what the framework costs per round.

Usage: python benchmarks/runtime.py [--repeats 3] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fedmed_command, per_round, run_tree

from fedmed.config import sim_workers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtime.json"


def bench_engines(repeats: int, out_dir: str) -> dict[str, dict[str, float]]:
    """The demo as a user runs it on each engine: wall time, peak memory of the process tree and
    steady-state seconds per round (off the run's live.json)."""
    env = {**os.environ, "FEDMED_LEDGER_DIR": str(Path(out_dir) / "ledger")}
    results: dict[str, list[dict[str, Any]]] = {"inprocess": [], "ray": []}
    for repeat in range(repeats):  # interleaved, so both see the same machine state
        for engine in results:
            out = Path(out_dir) / f"{engine}-{repeat}"
            cmd = [*fedmed_command(), "simulate", "demo", "--quiet", "--engine", engine]
            cmd += ["--set", f"output_dir={out}"]
            results[engine].append(run_tree(cmd, env, out, "*/live.json"))
    return {
        engine: {
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "peak_pss_mib_median": statistics.median(r["peak_mib"] for r in runs),
            "s_per_round_median": statistics.median(per_round(r["round_marks"]) for r in runs),
        }
        for engine, runs in results.items()
    }


def steady(ends: list[float]) -> float:
    """Seconds per round from the end of round 1 to the end of the last: what a round costs
    once started, without the start-up and the end-of-study report (plots, metrics.json)."""
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def bench_overhead(rounds: int, repeats: int, out_dir: str, *, dp: bool) -> dict[str, Any]:
    """Per-round seconds: fedmed's Flower apps in-process (sites one after another, and on the
    worker pool) vs a bare PyTorch FedAvg loop of the same job; with ``dp``, the loop trains with
    plain Opacus DP-SGD and computes ε once per round (one site's: the issue's baseline; fedmed
    computes and records every site's). Both are timed per round in steady state (``steady``).

    Noise calibration (a one-off per site and study) is done before the clock starts, for both:
    the loop calibrates with Opacus, and fedmed's calibration cache is filled in this process
    before the pool forks (the serial runs find it there too).
    """
    import torch

    from fedmed.config import load_run_config, resolve_config_path
    from fedmed.coordinator.app import build_server_app
    from fedmed.coordinator.rounds import StudyRounds
    from fedmed.privacy.accounting import plan_for_site
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from fedmed.site.app import app as client_app
    from fedmed.study.plan import RunPlan, initial_model, new_run_dir
    from fedmed.tasks import get_task, load_site_data
    from fedmed.train import derive_seed, evaluate, make_loader, make_optimizer, run_steps
    from fedmed.train import steps_per_round as steps_for

    cfg = load_run_config(
        resolve_config_path("demo"),
        [f"rounds={rounds}", f"privacy.enabled={str(dp).lower()}", f"output_dir={out_dir}"],
    )
    cfg, _ = preflight(cfg)
    sites = [load_site_data(cfg, s) for s in cfg.sites]
    task = get_task(cfg.task)
    cpu = torch.device("cpu")
    noise = {}
    if dp:
        from opacus.accountants.utils import get_noise_multiplier

        for data in sites:
            plan_for_site(len(data.y_train), cfg)  # fedmed's calibration cache, before forking
            q = 1.0 / math.ceil(len(data.y_train) / cfg.train.batch_size)
            noise[data.name] = get_noise_multiplier(
                target_epsilon=cfg.privacy.target_epsilon,
                target_delta=cfg.privacy.delta,
                sample_rate=q,
                steps=steps_for(len(data.y_train), cfg.train) * cfg.rounds,
                accountant="rdp",
            )

    def train_site(model: torch.nn.Module, data: Any, seed: int, accountant: Any) -> None:
        steps = steps_for(len(data.y_train), cfg.train)
        torch.manual_seed(seed)
        loader = make_loader(data.x_train, data.y_train, cfg.train.batch_size, seed)
        optimizer = make_optimizer(model, cfg.train)
        if not dp:
            run_steps(model, optimizer, loader, task, steps, cpu)
            return
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = accountant  # the site's history across rounds
        dp_model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise[data.name],
            max_grad_norm=cfg.privacy.max_grad_norm,
            poisson_sampling=True,
        )
        run_steps(dp_model, optimizer, loader, task, steps, cpu)
        dp_model._close()

    def plain() -> float:
        from opacus.accountants import RDPAccountant

        # One intra-op thread, as every fedmed site trains (fedmed.runtime.inprocess): torch's
        # default (one per core) gains nothing on this tiny model and, when another process
        # holds a core, its OpenMP threads wait on each other (measured: x10 slower per round).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return plain_rounds(RDPAccountant)
        finally:
            torch.set_num_threads(threads)

    def plain_rounds(accountant_class: Any) -> float:
        accountants = {data.name: accountant_class() for data in sites}
        ends = []
        global_model = initial_model(RunPlan(cfg, Path(out_dir)))
        for rnd in range(1, cfg.rounds + 1):
            states, weights = [], []
            for data in sites:
                model = initial_model(RunPlan(cfg, Path(out_dir)))
                model.load_state_dict(global_model.state_dict())
                seed = derive_seed(cfg.seed, rnd, data.name)
                train_site(model, data, seed, accountants[data.name])
                states.append(model.state_dict())
                weights.append(len(data.y_train))
            total = sum(weights)
            global_model.load_state_dict(
                {
                    k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
                    for k in states[0]
                }
            )
            for data in sites:
                evaluate(global_model, data.x_test, data.y_test, task, cpu)
            if dp:  # one ε computation per round (issue #20's baseline): the first site's
                accountants[sites[0].name].get_epsilon(cfg.privacy.delta)
            ends.append(time.perf_counter())
        return steady(ends)

    def framework(workers: int) -> float:
        # A fresh ledger per run: the repeats are one study run again, not more of its budget.
        os.environ["FEDMED_LEDGER_DIR"] = tempfile.mkdtemp(dir=out_dir)
        plan = RunPlan(cfg, new_run_dir(cfg))
        ends: list[float] = []
        done = StudyRounds.round_done

        def timed(self: StudyRounds, rnd: int) -> None:  # the coordinator's end of a round
            done(self, rnd)
            ends.append(time.perf_counter())

        StudyRounds.round_done = timed  # type: ignore[method-assign]
        try:
            run_inprocess(
                build_server_app(plan),
                client_app,
                len(cfg.sites),
                plan.to_run_config(),
                workers=workers,
            )
        finally:
            StudyRounds.round_done = done  # type: ignore[method-assign]
        return steady(ends)

    pool = min(sim_workers(), len(cfg.sites))
    variants: dict[str, Callable[[], float]] = {
        "fedmed_serial": lambda: framework(1),
        f"fedmed_pool_{pool}": lambda: framework(pool),
        "plain_pytorch": plain,
    }
    for run in variants.values():  # warm-up: imports, data caches, first-call costs
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so each sees the same machine state
        for name, run in variants.items():
            times[name].append(run())
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "rounds": cfg.rounds,
        "dp": dp,
        "s_per_round_median": medians,
        "s_per_round_all": times,
        "ratio_over_plain": {
            name: m / medians["plain_pytorch"]
            for name, m in medians.items()
            if name != "plain_pytorch"
        },
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
        overhead = {
            "no_dp": bench_overhead(args.rounds, args.repeats, out_dir, dp=False),
            "dp": bench_overhead(args.rounds, args.repeats, out_dir, dp=True),
        }
    inproc, ray = engines["inprocess"], engines["ray"]
    print(f"command: python benchmarks/runtime.py --repeats {args.repeats} --rounds {args.rounds}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("\ndemo study (10 rounds, 4 sites, DP-SGD), whole process tree, median of repeats")
    print(f"{'engine':<10} {'wall s':>8} {'peak MiB':>9} {'s/round':>8}")
    for name, r in engines.items():
        print(
            f"{name:<10} {r['wall_s_median']:>8.1f} {r['peak_pss_mib_median']:>9.0f} "
            f"{r['s_per_round_median']:>8.3f}"
        )
    print(
        f"ray / inprocess: wall x{ray['wall_s_median'] / inproc['wall_s_median']:.2f}, "
        f"memory x{ray['peak_pss_mib_median'] / inproc['peak_pss_mib_median']:.2f}, "
        f"per round x{ray['s_per_round_median'] / inproc['s_per_round_median']:.2f}"
    )
    for key, result in overhead.items():
        print(f"\nper-round cost of the demo ({key.replace('_', ' ')}), in one process, median")
        for name, secs in result["s_per_round_median"].items():
            ratio = result["ratio_over_plain"].get(name)
            print(f"{name:<16} {secs * 1e3:>8.1f} ms" + (f"   x{ratio:.2f}" if ratio else ""))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"engines": engines, "overhead": overhead, "environment": environment()}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
