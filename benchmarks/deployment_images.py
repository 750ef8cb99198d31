"""BreastMNIST as a real federation vs the same study simulated in one process.

Each of the 3 simulated hospitals' shares is exported as its own .npz (`fedmed demo-data`) and
registered by its site daemon (`fedmed site data add`); the coordinator runs
simulations/breastmnist-federation.toml, which names the dataset and no file. The same rounds
are simulated in-process from the shared file (simulations/breastmnist.toml). Same data per
site, same seeds: the per-site metrics should agree (up to the order in which FedAvg sums the
sites' replies), and the wall time per round is compared side by side.

Loopback only, TLS and node authentication on (as `fedmed pki` sets them up).

Usage: FEDMED_DATA_DIR=../shared/datasets python benchmarks/deployment_images.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import deployment as dep
from _common import environment, json_safe

from fedmed.config import resolve_config_path
from fedmed.serving.server import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "deployment_images.json"
SITES = ("st-marys", "riverside", "northgate")
dep.SITES = SITES  # deployment.deployment() starts and waits for these site daemons
fedmed, round_times = dep.fedmed, dep.round_times
METRICS = ("roc_auc", "accuracy", "loss")


def setup(root: Path, port: int, rounds: int) -> Path:
    fedmed(root, "pki", "init")
    fedmed(root, "pki", "issue-coordinator", "--host", "localhost", "--host", "127.0.0.1")
    fedmed(root, "demo-data", "exports", "breastmnist")
    study = root / "study.toml"
    text = resolve_config_path("breastmnist-federation").read_text()
    study.write_text(text.replace("rounds = 15", f"rounds = {rounds}"))
    approved = fedmed(root, "plan", "hash", str(study))
    for name in SITES:
        fedmed(root, "pki", "issue-site", name)
        fedmed(root, "site", "init", name, "--coordinator", f"127.0.0.1:{port}", "--bundle",
               f"pki/sites/{name}", "--runtime-port", str(free_port()), "--approve", approved,
               "--share-statistics")  # fmt: skip
        fedmed(root, "site", "data", "add", f"sites/{name}.toml", "scans", f"exports/{name}.npz")
    return study


def final_metrics(runs: Path) -> dict[str, dict[str, float]]:
    (run_dir,) = [p for p in runs.iterdir() if (p / "metrics.json").is_file()]
    return json.loads((run_dir / "metrics.json").read_text())["final"]["sites"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        study = setup(root, port, args.rounds)
        started = time.perf_counter()
        deployed = dep.deployment(root, port, study, cold=False)
        deployed["with_startup_s"] = time.perf_counter() - started
        deployed_metrics = final_metrics(root / "runs")
        sim_runs = root / "sim-runs"
        sets = [f"rounds={args.rounds}", f"output_dir={sim_runs}"]
        simulate = [*dep.FEDMED, "simulate", "breastmnist", "--quiet"]
        simulate += [arg for s in sets for arg in ("--set", s)]
        simulated = round_times(simulate, root, sim_runs)
        simulated_metrics = final_metrics(sim_runs)
    print(f"BreastMNIST, 3 sites, {args.rounds} rounds: deployment (TLS, warm executors) vs "
          "in-process simulation")  # fmt: skip
    print(f"{'site':<10} {'metric':<9} {'deployment':>11} {'simulation':>11} {'|diff|':>9}")
    diffs = []
    for site in SITES:
        for metric in METRICS:
            # A metric a site could not compute (e.g. ROC-AUC on a one-class test split) is NaN.
            a = deployed_metrics.get(site, {}).get(metric, math.nan)
            b = simulated_metrics.get(site, {}).get(metric, math.nan)
            if not (math.isnan(a) and math.isnan(b)):
                diffs.append(abs(a - b))
            print(f"{site:<10} {metric:<9} {a:>11.4f} {b:>11.4f} {abs(a - b):>9.1e}")
    d, s = deployed["per_round_median_s"], simulated["per_round_median_s"]
    print(
        f"per round (median of rounds 2..R): deployment {d:.1f} s, simulation {s:.1f} s, "
        f"x{d / s:.1f}; whole run with daemon start-up {deployed['with_startup_s']:.0f} s"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "rounds": args.rounds,
        "deployment": {**deployed, "final_sites": deployed_metrics},
        "simulation": {**simulated, "final_sites": simulated_metrics},
        "max_abs_metric_diff": max(diffs),
        "environment": environment(),
    }
    RESULTS.write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    print(RESULTS)


if __name__ == "__main__":
    main()
