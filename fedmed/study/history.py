"""Per-round, per-site metrics -> metrics.json, metrics.csv and a PNG plot.

The history is recorded as replies arrive (see strategies.SiteRecorder) and written once at the
end, atomically: a crashed run leaves no half-written report that looks complete.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmed.protocol import failure_text

# Plot panels, in this order, for the metrics a run's task reports (classification or survival).
SUMMARY_METRICS = ("accuracy", "roc_auc", "f1", "macro_f1", "c_index", "loss")


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

    def record_failure(self, rnd: int, phase: str, site: str, reason: str) -> None:
        """``site`` failed ``phase`` of round ``rnd``; ``reason`` is its detail, without the site.

        The row keeps the human-readable "site 'x': reason" that reports and dashboards show.
        """
        row = {"site": site, "phase": phase, "reason": failure_text(site, reason)}
        self.failures.setdefault(rnd, []).append(row)
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


# Called after every round with the history so far (progress bars, live.json, dashboards).
RoundCallback = Callable[[int, RunHistory], None]
