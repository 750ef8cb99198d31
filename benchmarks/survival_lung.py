"""NCCTG lung by institution: federated Cox models vs pooled and local, per-site C-index.

Why this script exists: the survival task claims that hospitals gain from federating a Cox
model. On lung's real institutions (simulations/lung.toml: the 5 largest + the 13 small ones
pooled into "inst-other") it puts FedAvg and FedAdam next to the two references, on the same
per-site test splits: pooled (one model on the union of the train splits, the upper reference)
and local (each site alone). A lifelines CoxPHFitter fitted on the same pooled train split is
the textbook reference for the pooled linear model.

Every run is a ``fedmed simulate lung`` subprocess (what a user types). Each seed sets both the
training seed and the train/test split seed (``data.schema.split_seed``): lung's sites have
6-11 test patients (inst-other: 34), so the split itself moves the C-index and is part of the
spread reported. Metric: Harrell's C per site, then the unweighted mean over the 6 sites;
mean ± sample sd (ddof=1) over seeds. Also per site: Uno's time-dependent AUC at 180 and 365
days and the integrated Brier score over [0, 365] (lung.toml's data.schema.horizons; see
fedmed/tasks/survival_metrics.py), averaged over the sites where they are defined.
Results: ``benchmarks/results/survival_lung.json``.

Run from the repository root:
    python benchmarks/survival_lung.py              # 5 seeds, ~3 min on 2 CPU cores
    python benchmarks/survival_lung.py --quick      # 1 seed, a smoke test
    python benchmarks/survival_lung.py --variants \
        --output benchmarks/results/survival_lung_references.json   # references only, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    Variant,
    environment,
    fmt,
    json_safe,
    note_source_change,
    print_table,
    run_variants,
    simulate,
    summarize,
)

CONFIG = "lung"
DEFAULT_SEEDS = (42, 43, 44, 45, 46)
RESULTS = Path(__file__).resolve().parent / "results" / "survival_lung.json"
FEDADAM = ("strategy.name=fedadam", "strategy.server_lr=0.05")
MLP = ("model.kind=mlp", "model.hidden=[16]")
TIMED = ("auc@180", "auc@365", "ibs")  # lung.toml: horizons = [180, 365]


VARIANTS = (
    Variant("pooled", "Pooled (linear Cox)", "pooled"),
    Variant("fedavg", "FedAvg (linear Cox)", "federated"),
    Variant("fedadam", "FedAdam (linear Cox, server lr 0.05)", "federated", FEDADAM),
    Variant("local", "Local (linear Cox, each site alone)", "local"),
    Variant("pooled_mlp", "Pooled (MLP 16)", "pooled", MLP),
    Variant("fedavg_mlp", "FedAvg (MLP 16)", "federated", MLP),
    Variant("local_mlp", "Local (MLP 16)", "local", MLP),
)


def run_once(variant: Variant, seed: int, runs_root: Path) -> dict[str, Any]:
    """One ``fedmed simulate`` subprocess; returns its final per-site C-index."""
    run_dir, payload, wall = simulate(CONFIG, variant, seed, runs_root)
    final = payload["final"]
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "wall_seconds": wall,
        "average_c_index": final["average"]["c_index"],
        "sites": {s: m["c_index"] for s, m in final["sites"].items()},
        "average_timed": {m: final["average"][m] for m in TIMED},
        "sites_timed": {s: {m: v[m] for m in TIMED} for s, v in final["sites"].items()},
    }


def _sites(seed: int) -> tuple[Any, Any, tuple[float, ...]]:
    """The pooled train split and each site's arrays (pooled preprocessing), and the horizons."""
    from fedmed.config import load_run_config, resolve_config_path
    from fedmed.study.baselines import pooled_site_data

    cfg = load_run_config(resolve_config_path(CONFIG), [f"data.schema.split_seed={seed}"])
    pooled, sites = pooled_site_data(cfg)
    return pooled, sites, cfg.data.schema.horizons


def _scored(seed: int, sites: Any, horizons: tuple[float, ...], beta: Any) -> dict[str, Any]:
    """A linear predictor x @ beta scored like a fedmed site scores its model."""
    from fedmed.tasks.survival import concordance_index
    from fedmed.tasks.survival_metrics import time_dependent_metrics

    per_site = {
        d.name: concordance_index(d.y_test[:, 0], d.y_test[:, 1], d.x_test @ beta) for d in sites
    }
    timed = {
        d.name: time_dependent_metrics(
            d.y_train, d.x_train @ beta, d.y_test, d.x_test @ beta, horizons
        )
        for d in sites
    }
    return {
        "seed": seed,
        "average_c_index": _finite_mean(list(per_site.values())),
        "sites": per_site,
        "average_timed": {m: _finite_mean([t[m] for t in timed.values()]) for m in TIMED},
        "sites_timed": {s: {m: t[m] for m in TIMED} for s, t in timed.items()},
    }


def lifelines_pooled(seed: int) -> dict[str, Any]:
    """lifelines' CoxPHFitter on the pooled train split, scored on each site's test split."""
    import numpy as np
    import pandas as pd
    from lifelines import CoxPHFitter

    pooled, sites, horizons = _sites(seed)
    frame = pd.DataFrame(pooled.x_train, columns=list(pooled.input_names))
    frame["T"], frame["E"] = pooled.y_train[:, 0], pooled.y_train[:, 1]
    fit = CoxPHFitter().fit(frame, "T", "E")
    beta = fit.params_[list(pooled.input_names)].to_numpy()
    return {
        **_scored(seed, sites, horizons, beta),
        "coefficients": dict(zip(pooled.input_names, np.round(beta, 4).tolist(), strict=True)),
    }


def null_model(seed: int) -> dict[str, Any]:
    """No covariates (risk 0 for everyone): each site's own Breslow curve, the same for all.

    The floor the time-dependent metrics are read against: AUC 0.5 by construction, and the
    IBS of a site-specific Kaplan-Meier-like curve that knows nothing about the patient.
    """
    import numpy as np

    pooled, sites, horizons = _sites(seed)
    return _scored(seed, sites, horizons, np.zeros(pooled.x_train.shape[1]))


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sites = list(runs[0]["sites"])
    return {
        "average": summarize([r["average_c_index"] for r in runs]),
        "timed": {
            m: summarize(
                [r["average_timed"][m] for r in runs if not math.isnan(r["average_timed"][m])]
            )
            for m in TIMED
        },
        "sites": {
            s: summarize([r["sites"][s] for r in runs if r["sites"][s] is not None]) for s in sites
        },
    }


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sites = list(next(iter(results.values()))["summary"]["sites"])
    header = ["method", "avg C-index", "avg AUC@180", "avg AUC@365", "avg IBS", *sites]
    rows = [
        [
            r["label"],
            fmt(r["summary"]["average"]),
            *(fmt(r["summary"]["timed"][m]) for m in TIMED),
            *(f"{r['summary']['sites'][s]['mean']:.3f}" for s in sites),
        ]
        for r in results.values()
    ]
    return header, rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--quick", action="store_true", help="one seed (the first), smoke test")
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "lung_runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--variants", nargs="*", default=[v.key for v in VARIANTS], help="none: references only"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    command = shlex.join(["python", "benchmarks/survival_lung.py", *argv])
    print(f"reproduce with: {command}", flush=True)
    env = environment()
    started = time.time()
    results = run_variants(
        CONFIG,
        tuple(v for v in VARIANTS if v.key in args.variants),
        seeds,
        lambda variant, seed: run_once(variant, seed, args.runs_dir),
        lambda run: (
            f"avg C {run['average_c_index']:.3f} AUC@365 {run['average_timed']['auc@365']:.3f} "
            f"IBS {run['average_timed']['ibs']:.3f} ({run['wall_seconds']:.1f} s)"
        ),
        summarize_runs,
    )
    for key, label, fit in (
        ("lifelines_pooled", "lifelines CoxPHFitter, pooled (reference)", lifelines_pooled),
        ("null", "No covariates: each site's baseline curve (reference)", null_model),
    ):
        reference = [fit(seed) for seed in seeds]
        results[key] = {
            "label": label,
            "mode": "reference",
            "runs": reference,
            "summary": summarize_runs(reference),
        }
    header, rows = table(results)
    print(
        f"\nlung by institution, Harrell's C, Uno's AUC(t), IBS [0, 365]; mean ± sd over seeds "
        f"{seeds} (ddof=1); site columns: C-index"
    )
    print_table(header, rows)
    note_source_change(env)
    payload = {
        "benchmark": "NCCTG lung by institution (survival, Cox)",
        "metric": "Harrell's C-index, Uno's AUC at 180/365 days and the integrated Brier score "
        "over [0, 365] per site test split; avg = unweighted mean over the sites where defined; "
        "sd = sample sd over seeds (each seed sets the training seed and the split seed)",
        "command": command,
        "measured_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seeds": seeds,
        "wall_seconds": round(time.time() - started, 1),
        "environment": env,
        "variants": results,
        "table": {"columns": header, "rows": rows},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
