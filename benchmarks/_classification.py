"""Shared driver of the classification benchmarks (imaging, sequence): variants x seeds.

Every run is a ``fedmed simulate CONFIG`` subprocess (what a user types); each seed sets the
training seed and the sites' train/test split seed, so the spread reported includes the split.
Per site: ROC-AUC and accuracy on the site's own test split, then the unweighted mean over
sites; mean ± sample sd (ddof=1) over seeds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
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

METRICS = ("roc_auc", "accuracy")
NAMES = {"roc_auc": "ROC-AUC", "accuracy": "accuracy", "macro_f1": "macro-F1"}


def union_roc_auc(run_dir: Path, payload: dict[str, Any]) -> float:
    """ROC-AUC of the run's final model(s) over the union of the sites' test splits.

    Federated and pooled runs save one model; local runs one per site, each scoring its own
    site's patients. Each site's test arrays are rebuilt from the run's own config, and the
    per-site ROC-AUCs recomputed from them must match metrics.json (else the reload is wrong).
    """
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from fedmed.config import parse_run_config
    from fedmed.serving.export import load_model
    from fedmed.tasks import load_site_data

    cfg = parse_run_config(payload["config"])
    single = run_dir / "model.safetensors"
    scores, labels = [], []
    for site in cfg.sites:
        data = load_site_data(cfg, site)
        path = single if single.is_file() else run_dir / f"model-{site.name}.safetensors"
        model, _ = load_model(path, require_signature=False)
        with torch.no_grad():
            score = model(torch.from_numpy(data.x_test)).reshape(-1).numpy()
        reported = payload["final"]["sites"][site.name]["roc_auc"]
        if not math.isclose(roc_auc_score(data.y_test, score), reported, abs_tol=1e-6):
            raise RuntimeError(f"{run_dir}: reloaded {site.name} ROC-AUC differs from its metrics")
        scores.append(score)
        labels.append(data.y_test)
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))


def run_once(
    config: str,
    variant: Variant,
    seed: int,
    runs_root: Path,
    *,
    union: bool = False,
    metrics: tuple[str, ...] = METRICS,
) -> dict[str, Any]:
    """One subprocess; its final per-site metrics, the worst site ε and the wall time."""
    run_dir, payload, wall = simulate(config, variant, seed, runs_root)
    final = payload["final"]
    last = payload["history"][-1]["sites"]
    epsilon = max((s.get("train", {}).get("epsilon", 0.0) for s in last.values()), default=0.0)
    run = {
        "seed": seed,
        "run_dir": str(run_dir),
        "wall_seconds": wall,
        "epsilon": epsilon,
        **{f"average_{m}": final["average"][m] for m in metrics},
        "sites": {s: {m: v[m] for m in metrics} for s, v in final["sites"].items()},
        # Per-site global model vs the site's own (personalization / local normalization).
        **({"personalized": final["personalized"]} if "personalized" in final else {}),
    }
    if union:
        run["union_roc_auc"] = union_roc_auc(run_dir, payload)
    return run


def summarize_runs(
    runs: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS
) -> dict[str, Any]:
    sites = list(runs[0]["sites"])
    out: dict[str, Any] = {m: summarize([r[f"average_{m}"] for r in runs]) for m in metrics}
    out["epsilon"] = max(r["epsilon"] for r in runs)
    if "union_roc_auc" in runs[0]:
        out["union_roc_auc"] = summarize([r["union_roc_auc"] for r in runs])
    out["sites"] = {
        s: {
            m: summarize([r["sites"][s][m] for r in runs if not math.isnan(r["sites"][s][m])])
            for m in metrics
        }
        for s in sites
    }
    return out


def run_benchmark(
    *,
    title: str,
    config: str,
    variants: tuple[Variant, ...],
    seeds: list[int],
    runs_dir: Path,
    output: Path,
    command: str,
    union: bool = False,
    metrics: tuple[str, ...] = METRICS,
) -> dict[str, Any]:
    """Run every variant for every seed, print the table and write the results JSON.

    ``metrics``: the per-site metrics kept and tabled (averages, then the first one per site);
    ROC-AUC and accuracy unless the task reports others (macro-F1 for text)."""
    print(f"reproduce with: {command}", flush=True)
    env = environment()
    started = time.time()
    results = run_variants(
        config,
        variants,
        seeds,
        lambda variant, seed: run_once(
            config, variant, seed, runs_dir, union=union, metrics=metrics
        ),
        lambda run: (
            " ".join(f"{NAMES.get(m, m)} {run[f'average_{m}']:.3f}" for m in metrics)
            + (f" union AUC {run['union_roc_auc']:.3f}" if union else "")
            + f" ε {run['epsilon']:.2f} ({run['wall_seconds']:.0f} s)"
        ),
        lambda runs: summarize_runs(runs, metrics),
    )
    sites = list(next(iter(results.values()))["summary"]["sites"])
    first = metrics[0]
    header = ["method", f"avg {NAMES.get(first, first)}", *(["union ROC-AUC"] if union else [])]
    header += [f"avg {NAMES.get(m, m)}" for m in metrics[1:]]
    header += ["ε (max site)", *sites]
    rows = [
        [
            r["label"],
            fmt(r["summary"][first]),
            *([fmt(r["summary"]["union_roc_auc"])] if union else []),
            *(fmt(r["summary"][m]) for m in metrics[1:]),
            f"{r['summary']['epsilon']:.2f}" if r["summary"]["epsilon"] else "—",
            *(f"{r['summary']['sites'][s][first]['mean']:.3f}" for s in sites),
        ]
        for r in results.values()
    ]
    print(
        f"\n{title}, mean ± sd over seeds {seeds} (ddof=1); site columns: {NAMES.get(first, first)}"
    )
    print_table(header, rows)
    note_source_change(env)
    payload = {
        "benchmark": title,
        "metric": f"{', '.join(NAMES.get(m, m) for m in metrics)} per site test split "
        "(accuracy: threshold 0.5, or the most probable class); avg = unweighted "
        "mean over sites; sd = sample sd over seeds (each seed sets training and split seed)"
        + (
            "; union = one ROC-AUC of the final model(s) over the union of the sites' test splits"
            if union
            else ""
        ),
        "command": command,
        "measured_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seeds": seeds,
        "wall_seconds": round(time.time() - started, 1),
        "environment": env,
        "variants": results,
        "table": {"columns": header, "rows": rows},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    print(f"wrote {output}")
    return payload


def cli_main(
    argv: Sequence[str] | None,
    *,
    script: str,
    title: str,
    config: str,
    variants: tuple[Variant, ...],
    seeds: tuple[int, ...],
    output: Path,
    default_variants: tuple[str, ...] = (),
    union: bool = False,
    metrics: tuple[str, ...] = METRICS,
) -> int:
    """The command line every classification benchmark shares (--seeds, --quick, --variants)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--quick", action="store_true", help="one seed (the first), smoke test")
    parser.add_argument(
        "--variants", nargs="+", default=list(default_variants or [v.key for v in variants])
    )
    default_runs = Path(tempfile.gettempdir()) / f"{config}_runs"
    parser.add_argument("--runs-dir", type=Path, default=default_runs)
    parser.add_argument("--output", type=Path, default=output)
    args = parser.parse_args(argv)
    run_benchmark(
        title=title,
        config=config,
        variants=tuple(v for v in variants if v.key in args.variants),
        seeds=args.seeds[:1] if args.quick else args.seeds,
        runs_dir=args.runs_dir,
        output=args.output,
        command=shlex.join(["python", script, *argv]),
        union=union,
        metrics=metrics,
    )
    return 0
