"""How fedmed scales with the number of sites, measured side by side in one run.

For each N (generated hospitals, 50-200 rows each, a tiny MLP, one local epoch) and each engine
(in-process, Ray), with and without DP-SGD: seconds per round in steady state, milliseconds per
site-round, and the peak resident memory of the whole process tree (Ray's raylet, GCS and
workers included). The anchor is the same job on plain Flower (a bare ServerApp/ClientApp pair
with Flower's FedAvg, no fedmed code) on Flower's Ray engine at N = 100; the ratios to it are
printed in the same table.

Seconds per round are read off the run's live.json (the coordinator rewrites it after every
round): the time between the first and the last round ending, over the rounds in between, so
start-up (imports, Ray, the first read of every site's table) is not counted as a round. The
milliseconds per site-round are s/round x 1000 / N: the framework's overhead plus the site's
own compute (a few ms for this model), so they bound the overhead from above.

Usage:
  python benchmarks/scale.py                         # N = 10, 100, 1000; both engines; DP off/on
  python benchmarks/scale.py --sites 10000 --engines inprocess --dp off --rounds 2
  python benchmarks/scale.py --sites 10,100,1000,10000 --max-ray-sites 100  # what docs record
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fedmed_command, per_round, print_table, run_tree

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
FEATURES = ("age", "bp", "chol", "smoker")
ANCHOR_SITES = 100


def write_sites(folder: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` small clinical-looking tables (50-200 rows, a learnable binary outcome)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sites = []
    for i in range(n):
        rows = int(rng.integers(50, 201))
        age = rng.normal(60, 10, rows).round(0)
        bp = rng.normal(130, 15, rows).round(0)
        chol = rng.normal(220, 40, rows).round(0)
        smoker = rng.integers(0, 2, rows)
        risk = 0.05 * (age - 60) + 0.03 * (bp - 130) + 0.01 * (chol - 220) + smoker
        outcome = (risk + rng.normal(0, 0.7, rows) > np.median(risk)).astype(int)
        path = folder / f"site{i:05d}.csv"
        lines = ["age,bp,chol,smoker,outcome"]
        lines += [
            f"{a:g},{b:g},{c:g},{s},{o}"
            for a, b, c, s, o in zip(age, bp, chol, smoker, outcome, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
        sites.append({"name": f"site{i:05d}", "path": str(path)})
    return sites


def write_study(folder: Path, sites: list[dict[str, str]], rounds: int) -> Path:
    """The study: a tiny MLP, one local epoch, FedAvg over every site, every round."""
    site_lines = "\n".join(
        f'[[sites]]\nname = "{s["name"]}"\npath = {json.dumps(s["path"])}\n' for s in sites
    )
    study = folder / "study.toml"
    study.write_text(
        f"""name = "scale"
rounds = {rounds}
seed = 42

[model]
kind = "mlp"
hidden = [8]

[train]
local_epochs = 1
batch_size = 32
lr = 0.05

[data.schema]
target = "outcome"
features = {json.dumps(list(FEATURES))}
test_fraction = 0.25

{site_lines}"""
    )
    return study


def bench_fedmed(
    study: Path, engine: str, dp: bool, work: Path, n: int, rounds: int
) -> dict[str, Any]:
    out = work / f"runs-{engine}-{'dp' if dp else 'nodp'}"
    cmd = [
        *fedmed_command(),
        "simulate",
        str(study),
        "--quiet",
        "--engine",
        engine,
        "--set",
        f"output_dir={out}",
        "--set",
        f"privacy.enabled={'true' if dp else 'false'}",
        "--set",
        f"strategy.round_timeout={max(600, n)}",
    ]
    env = {**os.environ, "FEDMED_LEDGER_DIR": str(work / "ledger"), "RAY_DEDUP_LOGS": "0"}
    result = run_tree(cmd, env, out, "*/live.json")
    return _summary(result, n, rounds, shlex.join(["fedmed", *cmd[1:]]))


def bench_plain_flower(sites: list[dict[str, str]], work: Path, rounds: int) -> dict[str, Any]:
    """The same job with no fedmed code: plain Flower apps on Flower's Ray engine."""
    spec = work / "plain-sites.json"
    spec.write_text(json.dumps({"sites": sites, "features": FEATURES, "rounds": rounds}))
    live = work / "plain" / "run" / "live.json"
    cmd = [sys.executable, str(Path(__file__).with_name("_plain_flower.py")), str(spec), str(live)]
    result = run_tree(cmd, {**os.environ, "RAY_DEDUP_LOGS": "0"}, live.parent, live.name)
    return _summary(result, len(sites), rounds, "python benchmarks/_plain_flower.py SPEC LIVE")


def _summary(result: dict[str, Any], n: int, rounds: int, command: str) -> dict[str, Any]:
    seconds = per_round(result["round_marks"])
    return {
        "sites": n,
        "rounds": rounds,
        "s_per_round": seconds,
        "ms_per_site_round": seconds * 1000 / n,
        "wall_s": result["wall_s"],
        "peak_mib": result["peak_mib"],
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,100,1000", help="comma-separated site counts")
    parser.add_argument("--engines", default="inprocess,ray")
    parser.add_argument("--dp", choices=("off", "on", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--max-ray-sites",
        type=int,
        default=1000,
        help="run Ray only up to this N (on 2 cores a 1,000-site Ray round takes ~4 minutes)",
    )
    parser.add_argument("--no-anchor", action="store_true", help="skip plain Flower at N=100")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = [int(s) for s in args.sites.split(",") if s.strip()]
    engines = [e for e in args.engines.split(",") if e]
    dps = {"off": [False], "on": [True], "both": [False, True]}[args.dp]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedmed-scale-") as tmp:
        work = Path(tmp)
        anchor = None
        if not args.no_anchor:
            sites = write_sites(work / f"sites-{ANCHOR_SITES}", ANCHOR_SITES)
            anchor = bench_plain_flower(sites, work, args.rounds)
            anchor.update(engine="plain Flower (ray)", dp=False)
            print(f"anchor: plain Flower on Ray, N={ANCHOR_SITES}: "
                  f"{anchor['s_per_round']:.2f} s/round", flush=True)  # fmt: skip
        for n in counts:
            sites = write_sites(work / f"sites-{n}", n)
            study = write_study(work / f"sites-{n}", sites, args.rounds)
            for engine in engines:
                if engine == "ray" and n > args.max_ray_sites:
                    continue
                for dp in dps:
                    scratch = work / f"w-{n}-{engine}-{dp}"
                    row = bench_fedmed(study, engine, dp, scratch, n, args.rounds)
                    row.update(engine=engine, dp=dp)
                    rows.append(row)
                    print(f"N={n} {engine} dp={'on' if dp else 'off'}: "
                          f"{row['s_per_round']:.2f} s/round, {row['ms_per_site_round']:.1f} "
                          f"ms/site-round, {row['peak_mib']:.0f} MiB", flush=True)  # fmt: skip

    header = ["sites", "engine", "DP", "s/round", "ms/site-round", "peak MiB", "wall s", "÷ anchor"]
    table = []
    for r in ([anchor] if anchor else []) + rows:
        ratio = "—"
        if anchor and r is not anchor and r["sites"] == ANCHOR_SITES:
            ratio = f"x{r['s_per_round'] / anchor['s_per_round']:.2f}"
        table.append(
            [
                str(r["sites"]),
                r["engine"],
                "on" if r["dp"] else "off",
                f"{r['s_per_round']:.2f}",
                f"{r['ms_per_site_round']:.1f}",
                f"{r['peak_mib']:.0f}",
                f"{r['wall_s']:.1f}",
                ratio,
            ]
        )
    print(f"\ncommand: python benchmarks/scale.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {os.cpu_count()} CPUs; rounds per run: {args.rounds}\n")
    print_table(header, table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "anchor": anchor, "runs": rows}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
