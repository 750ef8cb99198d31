"""Helpers every benchmark script shares: what was measured (environment) and argument parsing.

Each results JSON records the code and machine it measured, so a number can be traced to a commit.
"""

from __future__ import annotations

import contextlib
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

import psutil

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
    "per_round",
    "print_table",
    "run_tree",
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
        "load_average_1_5_15_min": list(os.getloadavg()),  # other work sharing the cores
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


def run_tree(cmd: list[str], env: dict[str, str], folder: Path, pattern: str) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak memory of the process tree (Ray's raylet, GCS and workers
    included) and when rounds ended: the run whose live.json (rewritten by the coordinator after
    every round) first matches ``folder``/``pattern``.

    Memory is the proportional set size (PSS) summed over the tree: a page shared by N
    processes (forked workers, Ray's object store) counts 1/N in each, so the sum is what the
    tree holds; RSS would count shared pages once per process. ``round_marks`` are (rounds
    done, seconds since start) taken from live.json's modification time, so a poll that comes
    late does not move a round's end.
    """
    start_wall, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak, marks, live = 0, [], None
    while proc.poll() is None:
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_full_info().pss
        peak = max(peak, total)
        if live is None:
            live = next(folder.glob(pattern), None)  # the run's folder appears once it starts
        if live is not None:
            mark = _rounds_done(live)
            if mark and (not marks or mark[0] > marks[-1][0]):
                marks.append((mark[0], mark[1] - start_wall))
        time.sleep(0.1)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_mib": peak / 2**20, "round_marks": marks}


def _rounds_done(live: Path) -> tuple[int, float] | None:
    """(rounds in live.json, when it was written), or None while it is not readable."""
    try:
        written = live.stat().st_mtime
        return len(json.loads(live.read_text()).get("history", [])), written
    except (OSError, ValueError):  # not written yet, or mid-replace
        return None


def per_round(marks: list[tuple[int, float]]) -> float:
    """Steady-state seconds per round: from the first round end seen to the last, over the
    rounds between (start-up and the end-of-study report are not rounds)."""
    if len(marks) < 2:
        raise RuntimeError("fewer than 2 round ends observed: run with more rounds")
    (first, t0), (last, t1) = marks[0], marks[-1]
    return (t1 - t0) / (last - first)
