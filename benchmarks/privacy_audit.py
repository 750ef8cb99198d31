"""Membership inference on the demo, with and without DP: does the audit see leakage at all?

Why this script exists: ``fedmed audit-privacy`` prints an attack AUC next to epsilon, but an
audit that always says "0.5" proves nothing unless it also flags a model that does leak. So the
demo (``fedmed simulate demo``) is run, from the user-facing CLI, in four variants:

1. ``demo_dp``       as shipped: DP-SGD at every site, whole-study ε = 3, δ = 1e-5;
2. ``demo_nodp``     the same without DP (``privacy.enabled=false``);
3. ``overfit_nodp``  an overfitting-prone variant without DP: 40 rounds, MLP [256, 256],
                     5 local epochs per round, momentum 0.9;
4. ``overfit_dp``    the same variant with DP (ε = 3, δ = 1e-5, as shipped).

Two controls, not run by default (``--variants``): ``heart_overfit_nodp`` / ``heart_overfit_dp``,
Fed-Heart-Disease with an MLP [256, 256] (lr 0.01, momentum 0.9, 30 x 100 steps) without and with
DP (ε = 3, δ = 1e-3, clip 1.1). On that harder task the MLP does memorize, so they show whether
the audit flags leakage when there is some (the demo generalizes too well to show it).

Each run gets a fresh privacy ledger (FEDMED_LEDGER_DIR), then ``fedmed audit-privacy RUN_DIR``
runs the loss-threshold attack per site (train rows = members, held-out rows = non-members); the
script collects per-site attack AUC, TPR at 1 % FPR and ε, and the run's final average accuracy.

One supplementary diagnostic is computed here (NOT part of fedmed's audit): the same
loss-threshold attack scored with the signed logit margin (2y-1)*logit in float64. The BCE loss is
a strictly decreasing function of that margin, so the attack is identical in exact arithmetic;
fedmed's float32 loss rounds to exactly 0 once the margin passes about 16.6, and all such rows
tie. ``zero_loss_fraction`` reports how many rows tied at 0.

Run from the repository root (one fedmed process at a time):
    python benchmarks/privacy_audit.py                        # seeds 0,1,2 for every variant
    python benchmarks/privacy_audit.py --variant-seeds overfit_dp=0
    python benchmarks/privacy_audit.py --quick                # seed 0, demo_dp and demo_nodp
    python benchmarks/privacy_audit.py --variants heart_overfit_nodp,heart_overfit_dp \
        --seeds 42,43,44 --merge                             # add the controls to the results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import environment, fedmed_command, fmt, json_safe, parse_seeds, print_table, summarize

DEFAULT_SEEDS = (0, 1, 2)
DEMO_SITES = ("st-marys", "riverside", "northgate", "lakeview")
HEART_SITES = ("cleveland", "hungary", "switzerland", "long-beach-va")
RESULTS = Path(__file__).resolve().parent / "results" / "privacy_audit.json"
OVERFIT = ("rounds=40", "model.hidden=[256,256]", "train.local_epochs=5", "train.momentum=0.9")
# A control on a harder task, where an over-parameterized model does memorize: Fed-Heart-Disease
# (about 0.72 accuracy at best) with an MLP [256, 256] instead of the logistic regression.
HEART_OVERFIT = (
    "model.kind=mlp",
    "model.hidden=[256,256]",
    "train.lr=0.01",
    "train.momentum=0.9",
    "rounds=30",
)
HEART_DP = ("privacy.target_epsilon=3", "privacy.delta=0.001", "privacy.max_grad_norm=1.1")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    overrides: tuple[str, ...]
    dp: bool
    config: str = "demo"
    sites: tuple[str, ...] = DEMO_SITES


VARIANTS = (
    Variant("demo_dp", "demo as shipped (DP, ε=3, δ=1e-5)", (), True),
    Variant("demo_nodp", "demo, no DP", ("privacy.enabled=false",), False),
    Variant(
        "overfit_nodp",
        "overfit-prone (40 rounds, [256,256], 5 epochs, mom 0.9), no DP",
        ("privacy.enabled=false", *OVERFIT),
        False,
    ),
    Variant(
        "overfit_dp",
        "overfit-prone, DP (ε=3, δ=1e-5)",
        ("privacy.enabled=true", *OVERFIT),
        True,
    ),
    # Controls (not the demo): does the audit flag a model that memorizes?
    Variant(
        "heart_overfit_nodp",
        "control: Fed-Heart-Disease, MLP [256,256], lr 0.01, mom 0.9, 30x100 steps, no DP",
        ("privacy.enabled=false", *HEART_OVERFIT),
        False,
        "heart_disease",
        HEART_SITES,
    ),
    Variant(
        "heart_overfit_dp",
        "control: the same with DP (ε=3, δ=1e-3, clip 1.1)",
        ("privacy.enabled=true", *HEART_DP, *HEART_OVERFIT),
        True,
        "heart_disease",
        HEART_SITES,
    ),
)
DEMO_VARIANTS = ("demo_dp", "demo_nodp", "overfit_nodp", "overfit_dp")
BY_KEY = {v.key: v for v in VARIANTS}


# ------------------------------------------------------------------------------------------------
# Running the CLI
# ------------------------------------------------------------------------------------------------


def cli_args(variant: Variant, seed: int | str, output_dir: Path | str) -> list[str]:
    args = ["simulate", variant.config, "--quiet", "--set", f"seed={seed}"]
    for item in variant.overrides:
        args += ["--set", item]
    return [*args, "--set", f"output_dir={output_dir}"]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


def run_once(variant: Variant, seed: int, runs_root: Path) -> dict[str, Any]:
    """``fedmed simulate`` (fresh ledger), then ``fedmed audit-privacy`` on its run directory."""
    out = runs_root / f"{variant.key}-seed{seed}"
    ledger = Path(tempfile.mkdtemp(prefix=f"ledger-{variant.key}-{seed}-", dir=runs_root))
    env = {**os.environ, "FEDMED_LEDGER_DIR": str(ledger)}
    started = time.time()
    proc = run([*fedmed_command(), *cli_args(variant, seed, out)], env)
    train_seconds = time.time() - started
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics["config"]["privacy"]["enabled"] != variant.dp:
        raise RuntimeError(f"{run_dir}: privacy.enabled is not {variant.dp}")
    run([*fedmed_command(), "audit-privacy", str(run_dir)], env)
    audit = json.loads((run_dir / "privacy_audit.json").read_text())
    final = metrics["final"]
    sites = {}
    exact = exact_margin_attack(run_dir)
    for site in variant.sites:
        a = audit["sites"][site]
        sites[site] = {
            "attack_auc": a["attack_auc"],
            "tpr_at_1pct_fpr": a["tpr_at_1pct_fpr"],
            "advantage": a.get("advantage"),
            "epsilon": a["epsilon"],
            "members": a["members"],
            "non_members": a["non_members"],
            "accuracy": final["sites"][site]["accuracy"],
            **exact.get(site, {}),
        }
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "ledger_dir": str(ledger),
        "train_wall_seconds": round(train_seconds, 2),
        "average_accuracy": final["average"]["accuracy"],
        "mean_attack_auc": audit["mean_attack_auc"],
        "sites": sites,
        "exact_error": exact.get("_error"),
    }


def exact_margin_attack(run_dir: Path) -> dict[str, Any]:
    """Supplementary: the loss-threshold attack scored with the float64 logit margin."""
    try:
        import numpy as np
        import torch
        from sklearn.metrics import roc_auc_score

        from fedmed.config import parse_run_config
        from fedmed.privacy.membership import per_example_loss
        from fedmed.serving.export import load_model
        from fedmed.tasks import load_site_data

        payload = json.loads((run_dir / "metrics.json").read_text())
        cfg = parse_run_config(payload["config"])
        model, _ = load_model(run_dir / "model.safetensors")
        model.eval()

        def margin(x: Any, y: Any) -> Any:
            with torch.no_grad():
                logits = model(torch.from_numpy(x)).squeeze(-1).double().numpy()
            return (2 * y.astype("float64") - 1) * logits

        out: dict[str, Any] = {}
        for spec in cfg.sites:
            data = load_site_data(cfg, spec)
            members = margin(data.x_train, data.y_train)
            others = margin(data.x_test, data.y_test)
            labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
            losses = np.r_[
                per_example_loss(model, data.x_train, data.y_train),
                per_example_loss(model, data.x_test, data.y_test),
            ]
            out[data.name] = {
                "exact_attack_auc": float(roc_auc_score(labels, np.r_[members, others])),
                "zero_loss_fraction": float(np.mean(losses == 0.0)),
            }
        return out
    except Exception as exc:  # a diagnostic must not sink the benchmark
        return {"_error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def summarize_runs(runs: list[dict[str, Any]], sites: Sequence[str]) -> dict[str, Any]:
    def per_site(field: str) -> dict[str, Any]:
        return {
            s: summarize(
                [r["sites"][s][field] for r in runs if r["sites"][s].get(field) is not None]
            )
            for s in sites
            if any(r["sites"][s].get(field) is not None for r in runs)
        }

    exact_means = [
        statistics.fmean(r["sites"][s]["exact_attack_auc"] for s in sites)
        for r in runs
        if all("exact_attack_auc" in r["sites"][s] for s in sites)
    ]
    eps = [r["sites"][s]["epsilon"] for r in runs for s in sites if r["sites"][s]["epsilon"]]
    return {
        "seeds": [r["seed"] for r in runs],
        "average_accuracy": summarize([r["average_accuracy"] for r in runs]),
        "mean_attack_auc": summarize([r["mean_attack_auc"] for r in runs]),
        "max_site_attack_auc": max(r["sites"][s]["attack_auc"] for r in runs for s in sites),
        "max_tpr_at_1pct_fpr": max(r["sites"][s]["tpr_at_1pct_fpr"] for r in runs for s in sites),
        "max_epsilon": max(eps) if eps else 0.0,
        "mean_exact_attack_auc": summarize(exact_means) if exact_means else None,
        "sites": {
            "attack_auc": per_site("attack_auc"),
            "tpr_at_1pct_fpr": per_site("tpr_at_1pct_fpr"),
            "epsilon": per_site("epsilon"),
            "exact_attack_auc": per_site("exact_attack_auc"),
            "zero_loss_fraction": per_site("zero_loss_fraction"),
        },
    }


SUMMARY_HEADER = [
    "variant",
    "seeds",
    "avg acc",
    "mean attack AUC",
    "max site AUC",
    "max TPR@1%FPR",
    "max ε",
    "exact-score AUC*",
]
SITE_HEADER = [
    "variant",
    "site",
    "members/non",
    "attack AUC",
    "TPR@1%FPR",
    "ε",
    "exact AUC*",
    "loss=0",
]


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for k, res in results.items():
        s = res["summary"]
        rows.append(
            [
                k,
                ",".join(map(str, s["seeds"])),
                fmt(s["average_accuracy"]),
                fmt(s["mean_attack_auc"]),
                f"{s['max_site_attack_auc']:.3f}",
                f"{s['max_tpr_at_1pct_fpr']:.3f}",
                f"{s['max_epsilon']:.3f}" if s["max_epsilon"] else "— (no DP)",
                fmt(s["mean_exact_attack_auc"]),
            ]
        )
    return rows


def site_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for k, res in results.items():
        s = res["summary"]["sites"]
        first = res["runs"][0]["sites"]
        for site in res["sites"]:
            eps = s["epsilon"].get(site)
            rows.append(
                [
                    k,
                    site,
                    f"{first[site]['members']}/{first[site]['non_members']}",
                    fmt(s["attack_auc"][site]),
                    fmt(s["tpr_at_1pct_fpr"][site]),
                    f"{eps['mean']:.3f}" if eps else "—",
                    fmt(s["exact_attack_auc"].get(site)),
                    fmt(s["zero_loss_fraction"].get(site), 2),
                ]
            )
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=parse_seeds, default=list(DEFAULT_SEEDS), help="comma list (default 0,1,2)"
    )
    parser.add_argument(
        "--variant-seeds",
        action="append",
        default=[],
        metavar="VARIANT=SEEDS",
        help=f"other seeds for one variant ({', '.join(BY_KEY)}), e.g. overfit_dp=0",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEMO_VARIANTS),
        help=f"comma list of variants to run, from {', '.join(BY_KEY)} (default: the 4 demo ones)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other variants already in --output (re-running a variant replaces it)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: first seed, demo_dp and demo_nodp only"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "privacy_audit_runs",
        help="where run directories and fresh ledgers go (default: <tmp>/privacy_audit_runs)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON")
    return parser.parse_args(argv)


def reproduce_command(argv: Sequence[str]) -> str:
    env = os.environ.get("FEDMED_DATA_DIR")
    prefix = f"FEDMED_DATA_DIR={shlex.quote(env)} " if env else ""
    return prefix + shlex.join(["python", "benchmarks/privacy_audit.py", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = reproduce_command(argv)
    print(f"reproduce with: {command}", flush=True)
    keys = ["demo_dp", "demo_nodp"] if args.quick else args.variants.split(",")
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(BY_KEY)}")
    per_variant = {}
    for item in args.variant_seeds:
        name, _, seeds = item.partition("=")
        if name not in BY_KEY or not seeds:
            raise SystemExit(
                f"--variant-seeds {item!r}: expected VARIANT=SEED,... ({list(BY_KEY)})"
            )
        per_variant[name] = parse_seeds(seeds)
    seeds_for = {
        k: (args.seeds[:1] if args.quick else per_variant.get(k, args.seeds)) for k in keys
    }
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    env_before = environment()
    started = time.time()
    results: dict[str, Any] = {}
    for k in keys:
        variant = BY_KEY[k]
        runs = []
        for seed in seeds_for[k]:
            r = run_once(variant, seed, args.runs_dir)
            runs.append(r)
            print(
                f"  {k:<13} seed {seed}: avg acc {r['average_accuracy']:.3f}, mean attack AUC "
                f"{r['mean_attack_auc']:.3f} ({r['train_wall_seconds']:.1f} s training)",
                flush=True,
            )
        results[k] = {
            "label": variant.label,
            "config": variant.config,
            "sites": list(variant.sites),
            "command": shlex.join(["fedmed", *cli_args(variant, "SEED", "OUT")]),
            "audit_command": "fedmed audit-privacy RUN_DIR",
            "runs": runs,
            "summary": summarize_runs(runs, variant.sites),
        }
    total = time.time() - started
    invocation = {
        "command": command,
        "measured_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "variants": keys,
        "seeds": seeds_for,
        "wall_seconds": round(total, 1),
        "environment": env_before,
        "environment_after": environment()["git"],
    }
    invocations = [invocation]
    if args.merge and args.output.is_file():
        old = json.loads(args.output.read_text())
        invocations = [*previous_invocations(old), invocation]
        for k, res in old.get("results", {}).items():
            if k not in results and k in BY_KEY:
                res.setdefault("config", BY_KEY[k].config)
                res.setdefault("sites", list(BY_KEY[k].sites))
                results[k] = res
    results = {k: results[k] for k in BY_KEY if k in results}  # canonical order

    srows, prows = summary_rows(results), site_rows(results)
    print()
    print("Membership inference (loss threshold); mean ± sd over seeds (ddof=1)")
    print_table(SUMMARY_HEADER, srows)
    print()
    print("Per site (mean ± sd over seeds)")
    print_table(SITE_HEADER, prows)
    print(
        "\n* exact-score AUC: the same attack scored with the float64 logit margin (what "
        "fedmed's audit uses since the tie fix; the 'attack AUC' column is what the audit "
        "reported when the recorded results were measured); loss=0: fraction of rows whose "
        "float32 loss is exactly 0 (tied)"
    )
    n_runs = sum(len(r["runs"]) for r in results.values())
    print(f"{n_runs} fedmed runs in this table; this invocation took {total:.0f} s")

    payload = {
        "benchmark": "membership inference (loss threshold) on the demo, with and without DP",
        "metric": "attack ROC-AUC per site (train rows = members, held-out rows = non-members), "
        "TPR at 1 % FPR, ε spent this study per site (fresh ledger per run); mean ± sample sd "
        "over seeds (ddof=1)",
        "commands": [inv["command"] for inv in invocations],
        "invocations": invocations,
        "results": results,
        "tables": {
            "summary": {"columns": SUMMARY_HEADER, "rows": srows},
            "sites": {"columns": SITE_HEADER, "rows": prows},
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.output}")
    print(f"reproduce with: {command}")
    return 0


def previous_invocations(old: dict[str, Any]) -> list[dict[str, Any]]:
    """The invocations recorded in an earlier results file (older files held just one)."""
    if "invocations" in old:
        return list(old["invocations"])
    keep = ("command", "measured_at", "seeds", "wall_seconds", "environment", "environment_after")
    return [{k: old[k] for k in keep if k in old} | {"variants": list(old.get("results", {}))}]


if __name__ == "__main__":
    sys.exit(main())
