"""Helpers every benchmark script shares: what was measured (environment) and argument parsing.

Each results JSON records the code and machine it measured, so a number can be traced to a commit.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedmed.io import json_safe

__all__ = [
    "Variant",
    "cli_args",
    "environment",
    "fedmed_command",
    "fmt",
    "git_state",
    "json_safe",
    "parse_seeds",
    "print_table",
    "run_variants",
    "simulate",
    "summarize",
]

ROOT = Path(__file__).resolve().parents[1]


def git_state() -> dict[str, Any]:
    """The commit measured, and which fedmed source files differed from it (uncommitted work)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "fedmed", "simulations")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_fedmed_changes": [line[3:] for line in (changed or "").splitlines()],
    }


def environment() -> dict[str, Any]:
    """Package versions, interpreter, machine and git state at the time of the call."""
    versions: dict[str, str | None] = {}
    for dist in ("fedmed", "torch", "flwr", "opacus", "numpy", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "packages": versions,
    }


def parse_seeds(text: str) -> list[int]:
    """'42,43,44' -> [42, 43, 44]."""
    return [int(s) for s in text.split(",") if s.strip()]


def fedmed_command() -> list[str]:
    """The installed ``fedmed`` console script (next to this interpreter first): what users type."""
    beside = Path(sys.executable).with_name("fedmed")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("fedmed")
    return [found] if found else [sys.executable, "-m", "fedmed.cli"]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample sd (ddof=1; NaN for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """'mean ± sd' (just the mean when sd is undefined); an em dash when there is nothing."""
    if not stat:
        return "—"
    sd = stat.get("sd", math.nan)
    text = f"{stat['mean']:.{digits}f}"
    return text if sd is None or math.isnan(sd) else f"{text} ± {sd:.{digits}f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table with left-aligned columns and a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


@dataclass(frozen=True)
class Variant:
    """One row of a benchmark table: a mode and the --set overrides that make it."""

    key: str
    label: str
    mode: str
    overrides: tuple[str, ...] = ()


def cli_args(config: str, variant: Variant, seed: int | str, out: Path | str) -> list[str]:
    """`fedmed simulate` arguments for one seed of ``variant`` (the seed also fixes the split)."""
    args = ["simulate", config, "--mode", variant.mode, "--quiet"]
    for item in (f"seed={seed}", f"data.schema.split_seed={seed}", *variant.overrides):
        args += ["--set", item]
    return [*args, "--set", f"output_dir={out}"]


def simulate(
    config: str, variant: Variant, seed: int, runs_root: Path
) -> tuple[Path, dict[str, Any], float]:
    """One `fedmed simulate` subprocess: its run dir, metrics.json and wall seconds.

    A run whose final round lacks a site is an error, not a silently smaller average.
    """
    cmd = [*fedmed_command(), *cli_args(config, variant, seed, runs_root / f"{variant.key}-{seed}")]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    payload = json.loads((run_dir / "metrics.json").read_text())
    missing = payload["final"].get("missing_sites")
    if missing:
        raise RuntimeError(f"{run_dir}: no final metrics for {missing}")
    return run_dir, payload, round(time.time() - started, 2)


def run_variants(
    config: str,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    run_once: Callable[[Variant, int], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    summarize_runs: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """Every variant x seed, one line of progress per run; results keyed by variant."""
    results: dict[str, Any] = {}
    for variant in variants:
        runs = []
        for seed in seeds:
            run = run_once(variant, seed)
            runs.append(run)
            print(f"  {variant.key:<14} seed {seed}: {describe(run)}", flush=True)
        results[variant.key] = {
            "label": variant.label,
            "mode": variant.mode,
            "command": shlex.join(["fedmed", *cli_args(config, variant, "SEED", "OUT")]),
            "runs": runs,
            "summary": summarize_runs(runs),
        }
    return results


def note_source_change(env: dict[str, Any]) -> None:
    """Record (and say) when fedmed's source changed while a benchmark ran."""
    if git_state() != env["git"]:
        env["git_at_end"] = git_state()
        print("warning: fedmed's source changed while the benchmark ran (see environment.git*)")
