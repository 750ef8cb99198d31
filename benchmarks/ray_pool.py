"""Many sites on few CPUs: how many Ray actors Flower's engine starts, and what a round costs.

Flower sizes its actor pool from the cluster (per node, CPUs // cpus_per_site), not from the
number of sites; the sites' messages queue for the actors. This runs one round of a tiny study
(logistic regression, 40 rows per site, no DP) with N sites on this machine's Ray
(``fedmed simulate --engine ray``) and counts the ClientAppActor processes while it runs.

Usage: python benchmarks/ray_pool.py [--sites 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ray_pool.json"


def write_sites(folder: Path, sites: int) -> Path:
    """``sites`` CSVs of 40 rows (age, bp, smoker -> outcome) and a study TOML naming them."""
    entries = []
    for i in range(sites):
        rng = np.random.default_rng(i)
        age, bp = rng.normal(60, 10, 40).round(), rng.normal(130, 15, 40).round()
        smoker = rng.choice(["yes", "no"], 40)
        risk = 0.05 * (age - 60) + 0.03 * (bp - 130) + (smoker == "yes")
        outcome = (rng.random(40) < 1 / (1 + np.exp(-risk))).astype(int)
        path = folder / f"site{i}.csv"
        pd.DataFrame({"age": age, "bp": bp, "smoker": smoker, "outcome": outcome}).to_csv(
            path, index=False
        )
        entries.append(f'[[sites]]\nname = "site{i}"\npath = "{path}"\n')
    study = folder / "study.toml"
    study.write_text(
        f'name = "pool"\nrounds = 1\nseed = 1\noutput_dir = "{folder / "runs"}"\n'
        '[model]\nkind = "logreg"\n[train]\nlocal_steps = 1\n'
        '[data.schema]\ntarget = "outcome"\nfeatures = ["age", "bp", "smoker"]\n'
        'categorical = { smoker = ["no", "yes"] }\ndrop_first = true\nmin_rows = 5\n\n'
        + "\n".join(entries)
    )
    return study


def count_actors(stop: threading.Event, peak: list[int]) -> None:
    """Peak number of live ClientAppActor processes (Ray renames an actor's process)."""
    while not stop.is_set():
        live = 0
        for proc in psutil.process_iter(["cmdline"]):
            if "ClientAppActor" in " ".join(proc.info["cmdline"] or []):
                live += 1
        peak[0] = max(peak[0], live)
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-pool-") as tmp:
        study = write_sites(Path(tmp), args.sites)
        fedmed = str(Path(sys.executable).with_name("fedmed"))
        peak = [0]
        stop = threading.Event()
        watcher = threading.Thread(target=count_actors, args=(stop, peak))
        watcher.start()
        start = time.perf_counter()
        done = subprocess.run(
            [fedmed, "simulate", str(study), "--engine", "ray", "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, "FEDMED_LEDGER_DIR": str(Path(tmp) / "ledger")},
        )
        wall = time.perf_counter() - start
        stop.set()
        watcher.join()
        if done.returncode != 0:
            raise SystemExit(f"fedmed failed:\n{done.stderr[-3000:]}")
        run_dir = Path(done.stdout.strip().splitlines()[-1])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        pool_line = next(line for line in done.stderr.splitlines() if line.startswith("ray: "))
    result = {
        "sites": args.sites,
        "cpus": os.cpu_count(),
        "peak_actor_processes": peak[0],
        "pool": pool_line,
        "wall_s": round(wall, 1),
        "sites_with_final_metrics": len(metrics["final"]["sites"]),
        "failures": sum(len(h["failures"]) for h in metrics["history"]),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
