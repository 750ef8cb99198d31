"""What a study leaves behind: metrics files and plots, the live view, the released model."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedmed import __version__
from fedmed.config import RunConfig
from fedmed.errors import StudyFailed
from fedmed.io import write_json
from fedmed.security.policy import plan_hash
from fedmed.serving.export import save_model
from fedmed.study.history import SUMMARY_METRICS, RunHistory
from fedmed.study.plan import RunPlan
from fedmed.study.statistics import combine_site_statistics


def write_metrics(run_dir: Path, history: RunHistory, header: dict[str, Any]) -> dict[str, Any]:
    """metrics.json, metrics.csv and metrics.png; returns the JSON payload."""
    payload = {**header, **history.to_dict()}
    write_json(run_dir / "metrics.json", payload)
    rows = history.rows()
    tmp = run_dir / ".metrics.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["round", "site", "phase", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "metrics.csv")
    plot_history(history, run_dir / "metrics.png", title=str(header.get("name", "")))
    return payload


# Above this many sites, one line per site is a hairball: draw a band and the worst sites instead.
MAX_SITE_LINES = 12

WORST_SHOWN = 3

# Panels where a higher value is the worse one (the rest: accuracy, ROC-AUC, F1, C-index).
HIGHER_IS_WORSE = ("loss", "epsilon")


def plot_history(history: RunHistory, path: Path, title: str = "") -> Figure | None:
    """Per-site lines and the average (black) by round, one panel per metric (+ ε if private).

    With more than ``MAX_SITE_LINES`` sites each panel shows instead the average, the min–max
    band across sites and the ``WORST_SHOWN`` worst sites by their last value, so a 100-site
    study stays readable. Returns the (closed) figure so callers can inspect what was drawn;
    None when no site ever reported.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in sorted(history.rounds) if history.evaluated(r)]
    # A study without DP reports ε = 0 at every site: no panel for it.
    has_eps = any(any(history.epsilon(r).values()) for r in rounds) or bool(history.central_epsilon)
    reported = {k for r in rounds for m in history.evaluated(r).values() for k in m}
    panels = [m for m in SUMMARY_METRICS if m in reported] + (["epsilon"] if has_eps else [])
    if not panels:  # no site ever reported (e.g. every site refused the plan): nothing to plot
        return None
    many = len(history.sites) > MAX_SITE_LINES
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    # Each round's per-site values, looked up once: per (site, round) it was O(sites) again
    # (history.epsilon scans every site), hours of work at 10,000 sites.
    per_round = {
        metric: [
            history.epsilon(r) if metric == "epsilon" else _metric_of(history, r, metric)
            for r in rounds
        ]
        for metric in panels
    }
    for ax, metric in zip(axes[0], panels, strict=True):
        series = {
            site: [values.get(site, math.nan) for values in per_round[metric]]
            for site in history.sites
        }
        if many:
            _draw_band_and_worst(ax, rounds, series, metric)
        else:
            for site, ys in series.items():
                ax.plot(rounds, ys, marker="o", markersize=3, linewidth=1.2, label=site)
        if metric == "epsilon" and history.central_epsilon:
            ax.plot(
                rounds,
                [history.central_epsilon.get(r, math.nan) for r in rounds],
                color="black",
                linestyle="--",
                linewidth=2,
                label="central DP",
            )
        if metric != "epsilon":
            ax.plot(
                rounds,
                [history.average(r).get(metric, math.nan) for r in rounds],
                color="black",
                linewidth=2.2,
                label="average",
            )
        ax.set_title("ε spent" if metric == "epsilon" else metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if many:  # the worst sites differ from panel to panel: each needs its own legend
            ax.legend(fontsize=7, loc="best")
    if not many:
        axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return fig


def _metric_of(history: RunHistory, rnd: int, metric: str) -> dict[str, float]:
    """``metric`` of each site that reported it in round ``rnd``."""
    return {site: m[metric] for site, m in history.evaluated(rnd).items() if metric in m}


def _draw_band_and_worst(
    ax: Axes, rounds: list[int], series: dict[str, list[float]], metric: str
) -> None:
    """The min–max band across sites per round, and the worst sites by their last finite value."""
    columns = [
        [ys[i] for ys in series.values() if not math.isnan(ys[i])] for i in range(len(rounds))
    ]
    low = [min(c) if c else math.nan for c in columns]
    high = [max(c) if c else math.nan for c in columns]
    ax.fill_between(
        rounds, low, high, color="tab:blue", alpha=0.2, label=f"min–max of {len(series)} sites"
    )
    last = {
        site: next((v for v in reversed(ys) if not math.isnan(v)), math.nan)
        for site, ys in series.items()
    }
    ranked = sorted(
        (site for site, v in last.items() if not math.isnan(v)),
        key=lambda site: last[site],
        reverse=metric in HIGHER_IS_WORSE,
    )
    for site in ranked[:WORST_SHOWN]:
        ax.plot(
            rounds, series[site], marker="o", markersize=3, linewidth=1.2, label=f"worst: {site}"
        )


def _header(plan: RunPlan) -> dict[str, Any]:
    cfg = plan.config
    return {
        "name": cfg.name,
        "mode": cfg.mode,
        "engine": plan.engine,
        "fedmed_version": __version__,
        "rounds_planned": cfg.rounds,
        "config": cfg.to_dict(),
    }


def live_reporter(
    plan: RunPlan, on_round: Callable[[int, RunHistory], None] | None = None
) -> Callable[[int, RunHistory], None]:
    """After each round: rewrite RUN_DIR/live.json (what the dashboard polls), then ``on_round``."""

    def report(rnd: int, history: RunHistory) -> None:
        write_json(
            plan.run_dir / "live.json",
            {**_header(plan), "status": "running", **history.to_dict()},
            indent=None,  # rewritten every round, for the dashboard and `fedmed run`
        )
        if on_round:
            on_round(rnd, history)

    return report


def release_problem(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> str:
    """Why ``model`` must not be released ("" if it may): non-finite weights, or weights that
    are still the untrained ``initial`` ones (no round ever aggregated an update)."""
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"its weights hold NaN or Inf ('{key}'): training diverged"
    if all(key in initial and torch.equal(v.cpu(), initial[key]) for key, v in state.items()):
        return "no round aggregated an update (it is still the initial model)"
    return ""


def _initial_state(plan: RunPlan) -> dict[str, torch.Tensor]:
    """The study's round-0 model (seeded, so the same one every runtime started from)."""
    from fedmed.study.plan import initial_model

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        model = initial_model(plan)
    if plan.config.privacy.enabled:
        from fedmed.tasks.dp_compat import make_compatible

        model = make_compatible(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _void_final_metrics(history: RunHistory, sites: list[str]) -> None:
    """A diverged model's final scores are not results: NaN (null in metrics.json, "n/a" on the
    console, left out of the averages), so a broken model never reads as a real 0.0."""
    import math

    rnd = history.last_round()
    for site in sites:
        metrics = history.evaluated(rnd).get(site)
        if metrics:
            void = {k: v if k == "num-examples" else math.nan for k, v in metrics.items()}
            history.record(rnd, "evaluate", site, void)


def finish_run(
    plan: RunPlan, history: RunHistory, models: dict[str, torch.nn.Module], started: float
) -> dict[str, Any]:
    """Write metrics (json/csv/png) and the model(s) with their cards; returns metrics.json.

    Nothing broken is released: a model with NaN/Inf weights, or one no round ever updated, is
    not written (nor signed). A local-mode site whose own model diverged is named under
    ``failed_models`` and its final metrics are null (never a misleading 0.0); when no model is
    left to release the study fails (StudyFailed, one line naming the cause) after writing
    its metrics with status "failed".
    """
    cfg = plan.config
    initial = _initial_state(plan)
    failed = {
        stem: why for stem, model in models.items() if (why := release_problem(model, initial))
    }
    header = {
        **_header(plan),
        "status": "failed" if len(failed) == len(models) else "finished",
        "wall_seconds": round(time.time() - started, 3),
    }
    if failed:
        header["failed_models"] = {stem.removeprefix("model-"): why for stem, why in failed.items()}
    _void_final_metrics(history, [stem.removeprefix("model-") for stem in failed])
    payload = write_metrics(plan.run_dir, history, header)
    if len(failed) == len(models):
        stem, why = next(iter(failed.items()))
        payload["error"] = f"no model released: {why}"
        write_json(plan.run_dir / "metrics.json", payload)
        write_json(plan.run_dir / "live.json", payload)
        raise StudyFailed(
            f"study '{cfg.name}' released no model: {why}; see {plan.run_dir / 'metrics.json'} "
            "(failures per round) and fix the sites or settings before running it again"
        )
    write_json(plan.run_dir / "live.json", payload)
    serving = json.loads(plan.serving) if plan.serving else None
    final = payload["final"]
    for stem, model in models.items():
        if stem in failed:
            continue
        save_model(
            plan.run_dir,
            stem,
            model,
            cfg,
            {
                "metrics": {
                    "round": final["round"],
                    "average": final["average"],
                    "sites": final["sites"],
                },
                "preprocessing": serving,
                "plan_hash": plan_hash(cfg),
            },
        )
    return payload


def serving_preprocessing(cfg: RunConfig, tables: list) -> str:
    """Imputation/one-hot/standardization fitted on the union of the sites' train splits.

    Sites standardize with their own statistics while training; a clinic calling the served model
    needs ONE transform. The pooled fit equals the sample-size-weighted combination of the sites'
    (n, mean, variance), so it is what federated standardization would compute. In a simulation
    the coordinator holds every table, so it is computed directly here.
    """
    import pandas as pd

    from fedmed.data.arrays import ArrayTable
    from fedmed.data.table import Preprocessor
    from fedmed.data.text import TextTable

    if isinstance(tables[0], TextTable):  # the tokenizer itself is saved next to the model
        text = cfg.data.text
        return json.dumps(
            {
                "fitted_on": "the study's vocabulary (data.text.vocabulary)",
                "column": text.column,
                "max_tokens": text.max_tokens,
                "classes": list(text.classes),
            }
        )
    if isinstance(tables[0], ArrayTable):  # images, series: combined as in a deployment
        combined = combine_site_statistics(
            [{**t.data.preprocessing, "n": t.data.n_train} for t in tables]
        )
        if tables[0].target == "series":  # `fedmed predict` reads a long CSV named alike
            s = cfg.data.series
            columns = [s.id_column, s.time_column, s.variable_column, s.value_column]
            combined = json.dumps({**json.loads(combined), "columns": columns})
        return combined
    pooled = pd.concat([t.x_train for t in tables], ignore_index=True)
    fitted = Preprocessor(cfg.data.schema.features, cfg.data.schema).fit(pooled)
    return json.dumps({"fitted_on": "union of the sites' train splits", **fitted.to_dict()})
