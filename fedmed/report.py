"""Per-round, per-site metrics -> metrics.json, metrics.csv and a PNG plot.

The history is recorded as replies arrive (see strategies.SiteRecorder) and written once at the
end, atomically: a crashed run leaves no half-written report that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Plot panels, in this order, for the metrics a run's task reports (classification or survival).
SUMMARY_METRICS = ("accuracy", "roc_auc", "f1", "c_index", "loss")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class RunHistory:
    """What every site reported, round by round."""

    sites: tuple[str, ...]
    rounds: dict[int, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    failures: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    central_epsilon: dict[int, float] = field(default_factory=dict)  # coordinator-side DP
    # site -> {"before": metrics, "after": metrics} of end-of-study fine-tuning (fedmed.personalize)
    personalized: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def record(self, rnd: int, phase: str, site: str, metrics: dict[str, float]) -> None:
        self.rounds.setdefault(rnd, {}).setdefault(phase, {})[site] = dict(metrics)

    def record_failure(self, rnd: int, phase: str, reason: str) -> None:
        match = re.match(r"site '([^']+)'", reason)
        site = match.group(1) if match else "unknown"
        self.failures.setdefault(rnd, []).append({"site": site, "phase": phase, "reason": reason})
        self.rounds.setdefault(rnd, {})

    # -- checkpointing (coordinator resume) ---------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything recorded so far, JSON-ready (NaN kept: this is a checkpoint, not a report)."""
        return {
            "sites": list(self.sites),
            "rounds": {str(r): phases for r, phases in self.rounds.items()},
            "failures": {str(r): rows for r, rows in self.failures.items()},
            "central_epsilon": {str(r): eps for r, eps in self.central_epsilon.items()},
            "personalized": self.personalized,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunHistory:
        """The inverse of ``to_state``: a resumed run continues the very same history."""
        return cls(
            sites=tuple(state["sites"]),
            rounds={int(r): phases for r, phases in state["rounds"].items()},
            failures={int(r): rows for r, rows in state["failures"].items()},
            central_epsilon={int(r): eps for r, eps in state["central_epsilon"].items()},
            personalized=state.get("personalized", {}),
        )

    # -- summaries -------------------------------------------------------------------------------
    def evaluated(self, rnd: int) -> dict[str, dict[str, float]]:
        return self.rounds.get(rnd, {}).get("evaluate", {})

    def average(self, rnd: int) -> dict[str, float]:
        """Unweighted mean over the sites that reported (FLamby's 'average over centers')."""
        per_site = self.evaluated(rnd)
        keys = sorted({k for m in per_site.values() for k in m if k != "num-examples"})
        return {k: _mean([m[k] for m in per_site.values() if k in m]) for k in keys}

    def average_coverage(self, rnd: int) -> dict[str, Any]:
        """Which sites each average of round ``rnd`` covers, so a mean of 2 of 3 sites says so.

        ``sites`` is the number of study sites; ``covered[metric]`` how many gave a value;
        ``missing[metric]`` (only metrics with a gap) the sites with no value: absent from the
        round, or NaN (e.g. ROC-AUC on a one-class test split, a diverged local model).
        """
        per_site = self.evaluated(rnd)
        sites = list(dict.fromkeys([*self.sites, *per_site]))
        keys = sorted({k for m in per_site.values() for k in m if k != "num-examples"})
        missing = {
            k: [s for s in sites if math.isnan(per_site.get(s, {}).get(k, math.nan))] for k in keys
        }
        return {
            "sites": len(sites),
            "covered": {k: len(sites) - len(gaps) for k, gaps in missing.items()},
            "missing": {k: gaps for k, gaps in missing.items() if gaps},
        }

    def weighted_average(self, rnd: int) -> dict[str, float]:
        """Mean weighted by each site's number of test rows."""
        per_site = self.evaluated(rnd)
        keys = sorted({k for m in per_site.values() for k in m if k != "num-examples"})
        out = {}
        for k in keys:
            pairs = [
                (m[k], m.get("num-examples", 0.0))
                for m in per_site.values()
                if k in m and not math.isnan(m[k])
            ]
            weight = sum(w for _, w in pairs)
            out[k] = sum(v * w for v, w in pairs) / weight if pairs and weight else math.nan
        return out

    def epsilon(self, rnd: int) -> dict[str, float]:
        """ε spent so far by each site, as of round ``rnd`` (carried forward if it sat out)."""
        out: dict[str, float] = {}
        for r in sorted(self.rounds):
            if r > rnd:
                break
            for site, m in self.rounds[r].get("train", {}).items():
                if "epsilon" in m:
                    out[site] = m["epsilon"]
        return out

    def last_round(self) -> int:
        done = [r for r in self.rounds if self.evaluated(r)]
        return max(done) if done else 0

    def final(self) -> dict[str, Any]:
        rnd = self.last_round()
        sites = {s: dict(m) for s, m in self.evaluated(rnd).items()}
        for site, eps in self.epsilon(rnd).items():
            sites.setdefault(site, {})["epsilon"] = eps
        return {
            "round": rnd,
            "average": self.average(rnd),
            "average_coverage": self.average_coverage(rnd),
            "weighted_average": self.weighted_average(rnd),
            "sites": sites,
            "missing_sites": sorted(set(self.sites) - set(self.evaluated(rnd))),
            "central_epsilon": self.central_epsilon.get(rnd),
            **({"personalized": self._personalized()} if self.personalized else {}),
        }

    def _personalized(self) -> dict[str, Any]:
        """Per-site before/after metrics, and their unweighted means over sites."""
        average = {}
        for phase in ("before", "after"):
            rows = [r[phase] for r in self.personalized.values()]
            keys = sorted({k for m in rows for k in m if k != "num-examples"})
            average[phase] = {k: _mean([m[k] for m in rows if k in m]) for k in keys}
        return {"sites": self.personalized, "average": average}

    def to_dict(self) -> dict[str, Any]:
        history = []
        for rnd in sorted(self.rounds):
            phases = self.rounds[rnd]
            history.append(
                {
                    "round": rnd,
                    "average": self.average(rnd),
                    "average_coverage": self.average_coverage(rnd),
                    "sites": {
                        site: {
                            ph: phases.get(ph, {}).get(site)
                            for ph in ("train", "evaluate")
                            if phases.get(ph, {}).get(site) is not None
                        }
                        for site in self.sites
                    },
                    "epsilon": self.epsilon(rnd),
                    "central_epsilon": self.central_epsilon.get(rnd),
                    "failures": self.failures.get(rnd, []),
                }
            )
        return {"sites": list(self.sites), "final": self.final(), "history": history}

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (round, site, phase, metric)."""
        out = []
        for rnd in sorted(self.rounds):
            for phase, per_site in sorted(self.rounds[rnd].items()):
                for site, metrics in sorted(per_site.items()):
                    for name, value in sorted(metrics.items()):
                        out.append(
                            {
                                "round": rnd,
                                "site": site,
                                "phase": phase,
                                "metric": name,
                                "value": value,
                            }
                        )
            for name, value in sorted(self.average(rnd).items()):
                out.append(
                    {
                        "round": rnd,
                        "site": "average",
                        "phase": "evaluate",
                        "metric": name,
                        "value": value,
                    }
                )
        return out


# -- writing -------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write null (e.g. ROC-AUC on a one-class test split)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock (PATH.lock) around a read-modify-write of PATH shared by processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state_json(path: Path, fmt: str, empty: dict[str, Any], fix: str) -> dict[str, Any]:
    """A site's state file (ledger, registry): ``empty`` when absent, refused when damaged."""
    from fedmed.errors import ConfigError

    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; {fix}") from None
    if data.get("format") != fmt:
        raise ConfigError(f"{path} is not a {fmt} file; {fix}")
    return data


def write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(json_safe(payload), indent=2, sort_keys=False)
    atomic_write(path, (text + "\n").encode())


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
    has_eps = any(history.epsilon(r) for r in rounds) or bool(history.central_epsilon)
    reported = {k for r in rounds for m in history.evaluated(r).values() for k in m}
    panels = [m for m in SUMMARY_METRICS if m in reported] + (["epsilon"] if has_eps else [])
    if not panels:  # no site ever reported (e.g. every site refused the plan): nothing to plot
        return None
    many = len(history.sites) > MAX_SITE_LINES
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        series = {site: _site_series(history, metric, site, rounds) for site in history.sites}
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


def _site_series(history: RunHistory, metric: str, site: str, rounds: list[int]) -> list[float]:
    if metric == "epsilon":
        return [history.epsilon(r).get(site, math.nan) for r in rounds]
    return [history.evaluated(r).get(site, {}).get(metric, math.nan) for r in rounds]


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
