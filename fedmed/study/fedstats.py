"""Federated statistics at the coordinator: shared edges, pooling, and the report (Flower-free).

The coordinator only ever holds what the sites sent (fedmed.site.stats): counts, None where a
site suppressed one, and for exact means the sums. Pooling adds what was published; a pooled
cell any site suppressed is *partial* (its true value is larger by 1 to min_cell - 1 per
suppressed site), and stats.json says so cell by cell. docs/statistics.md explains the method.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import RunConfig
from fedmed.data.summary import COARSE_EDGES
from fedmed.errors import ConfigError

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)
EDGE_QUANTILES = (0.01, 0.99)  # the span of the shared histogram edges (pooled, coarse)
KM_SPAN = 0.9  # the life table covers follow-up up to the pooled 90th percentile
Vector = list[int | None]


# -- what the coordinator asks for ---------------------------------------------------------------


def feature_kinds(cfg: RunConfig) -> tuple[list[str], dict[str, tuple[Any, ...]]]:
    """(numeric features, {categorical feature: its categories}) in the study's order."""
    schema = cfg.data.schema
    if not schema.features:
        raise ConfigError(
            "federated statistics need the study's features: list them in data.schema.features"
        )
    numeric = [f for f in schema.features if f not in schema.categorical]
    categorical = {f: tuple(schema.categorical[f]) for f in schema.features if f not in numeric}
    return numeric, categorical


def is_survival(cfg: RunConfig) -> bool:
    return cfg.task == "survival"


def first_shapes(cfg: RunConfig) -> dict[str, int]:
    """Pass 1's count vectors and their lengths: every reply must hold exactly these."""
    numeric, categorical = feature_kinds(cfg)
    cells = len(COARSE_EDGES) + 1
    shapes = {"cohort": 1, "outcome": 3}
    shapes.update({f"feature/{name}": cells + 1 for name in numeric})
    shapes.update({f"category/{name}": len(c) + 1 for name, c in categorical.items()})
    if is_survival(cfg):
        shapes["time"] = cells
    return shapes


def second_shapes(edges: dict[str, Any]) -> dict[str, int]:
    """Pass 2's count vectors (histograms with two open tails; the life table)."""
    shapes = {f"bins/{name}": len(e) + 1 for name, e in edges["features"].items()}
    if edges["km"] is not None:
        shapes["km/at_risk"] = shapes["km/events"] = len(edges["km"])
    return shapes


def pool(vectors: list[Vector]) -> tuple[list[int], list[int]]:
    """(sum of the published counts, number of sites that suppressed it) per cell."""
    width = len(vectors[0]) if vectors else 0
    total = [sum(v[i] or 0 for v in vectors) for i in range(width)]
    hidden = [sum(v[i] is None for v in vectors) for i in range(width)]
    return total, hidden


def _coarse_quantile(counts: list[int], q: float, lower: bool) -> float | None:
    """The lower (or upper) edge of the coarse cell holding the pooled ``q`` quantile."""
    total = sum(counts)
    if total == 0:
        return None
    cell = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    edges = COARSE_EDGES
    if lower:
        return float(edges[max(cell - 1, 0)])
    return float(edges[min(cell, len(edges) - 1)])


def shared_edges(cfg: RunConfig, first: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pass 2's edges from the POOLED pass-1 coarse cells (no site's values decide them).

    Each numeric feature gets ``stats.bins`` equal bins from the lower edge of the coarse cell
    holding the pooled 1st percentile to the upper edge of the one holding the 99th (values
    beyond fall in two open tails); a feature with no published coarse cell gets none. The
    life table has ``stats.km_bins`` equal intervals from 0 to the upper edge of the coarse
    cell holding the pooled 90th percentile of follow-up, then an open one.
    """
    numeric, _ = feature_kinds(cfg)
    replies = [r["cells"] for r in first.values()]
    features: dict[str, list[float]] = {}
    for name in numeric:
        counts, _ = pool([r[f"feature/{name}"][1:] for r in replies])
        low = _coarse_quantile(counts, EDGE_QUANTILES[0], lower=True)
        high = _coarse_quantile(counts, EDGE_QUANTILES[1], lower=False)
        if low is None or high is None:
            continue
        if high <= low:
            high = low + max(abs(low), 1.0)
        features[name] = _nice(np.linspace(low, high, cfg.stats.bins + 1))
    km = None
    if is_survival(cfg):
        counts, _ = pool([r["time"] for r in replies])
        high = _coarse_quantile(counts, KM_SPAN, lower=False)
        km = _nice(np.linspace(0.0, high, cfg.stats.km_bins + 1)) if high else None
    return {"features": features, "km": km}


def _nice(edges: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in edges]


# -- pooling -------------------------------------------------------------------------------------


def _cell(total: int, hidden: int) -> dict[str, Any]:
    return {"count": total, "partial": hidden > 0, "suppressed_sites": hidden}


def _share(part: int | None, whole: int | None) -> float | None:
    return None if part is None or not whole else part / whole


def _histogram_moments(counts: list[int], edges: list[float]) -> tuple[float, float] | None:
    """Mean and sd from a histogram (bin midpoints; the open tails at their edge)."""
    total = sum(counts)
    if total == 0:
        return None
    points = np.array([edges[0], *((a + b) / 2 for a, b in itertools.pairwise(edges)), edges[-1]])
    weights = np.asarray(counts, dtype=np.float64) / total
    mean = float(weights @ points)
    return mean, float(np.sqrt(max(weights @ (points - mean) ** 2, 0.0)))


def quantiles(counts: list[int] | list[float], edges: list[float]) -> dict[str, float | None]:
    """Quantiles interpolated within the histogram's bins; None where one falls in a tail."""
    total = sum(counts)
    out: dict[str, float | None] = {}
    cum = np.cumsum(counts)
    for q in QUANTILES:
        key = QUANTILE_KEYS[QUANTILES.index(q)]
        if total == 0:
            out[key] = None
            continue
        cell = int(np.searchsorted(cum, q * total, side="left"))
        if cell == 0 or cell > len(edges) - 1:
            out[key] = None
            continue
        before = cum[cell - 1] if cell else 0
        inside = counts[cell] or 1
        low, high = edges[cell - 1], edges[cell]
        out[key] = float(low + (high - low) * (q * total - before) / inside)
    return out


def hidden_most(vector: Vector, total: int | None, min_cell: int) -> int:
    """The most one suppressed cell of ``vector`` can hold: its cells add up to at most
    ``total`` (None: the site's cohort was itself suppressed, so below ``min_cell``), and every
    other suppressed cell holds at least 1. A complementary suppression can hide a large cell,
    so the bound is the vector's unexplained remainder, not ``min_cell`` - 1."""
    bound = min_cell - 1 if total is None else total
    hidden = sum(c is None for c in vector)
    return max(1, bound - sum(c or 0 for c in vector) - (hidden - 1))


def imputed(vector: Vector, total: int | None, min_cell: int) -> list[float]:
    """``vector`` with its suppressed mass spread evenly over its suppressed cells: what the
    site's published total leaves (``total``; unknown: each cell min_cell / 2). For
    approximate quantiles and survival, always marked as such in the report."""
    hidden = sum(c is None for c in vector)
    if not hidden:
        return [float(c or 0) for c in vector]
    if total is None:
        share = min_cell / 2
    else:
        share = max(1.0, (total - sum(c or 0 for c in vector)) / hidden)
    return [share if c is None else float(c) for c in vector]


def _moments(
    cohort: int | None, missing: int | None, pair: list[float] | None
) -> tuple[int, float, float] | None:
    """(n, sum, sum of squares) of a site's exact sums, or None."""
    if pair is None or cohort is None or missing is None or cohort - missing <= 0:
        return None
    return cohort - missing, pair[0], pair[1]


def _mean_sd(n: float, total: float, squares: float) -> tuple[float, float]:
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean**2, 0.0) * n / max(n - 1, 1))


def summarize(
    cfg: RunConfig,
    first: dict[str, dict[str, Any]],
    second: dict[str, dict[str, Any]],
    edges: dict[str, Any],
    refused: dict[str, str],
    sites: list[str] | None = None,
) -> dict[str, Any]:
    """stats.json: per site and pooled, from what the sites sent (``first``, ``second``).

    ``sites``: the replies' names in report order (default: the study's sites that answered;
    a secure report has one, the SecAgg+ sum)."""
    sites = [s for s in (sites or cfg.site_names) if s in first]
    one = {s: first[s]["cells"] for s in sites}
    two = {s: second.get(s, {"cells": {}, "sums": {}}) for s in sites}
    numeric, categorical = feature_kinds(cfg)
    cohort = {s: one[s]["cohort"][0] for s in sites}
    # The largest minimum any site applied: what a suppressed count may have been below.
    min_cell = max([cfg.stats.min_cell, *(first[s]["min_cell"] for s in sites)])
    out: dict[str, Any] = {
        "study": cfg.name,
        "task": cfg.task,
        "min_cell": min_cell,
        "sites": sites,
        "refused": refused,
        "epsilon": {
            s: max(first[s]["epsilon"], second.get(s, {}).get("epsilon", 0.0)) for s in sites
        },
        "cohort": {
            "sites": cohort,
            "pooled": _cell(*[v[0] for v in pool([one[s]["cohort"] for s in sites])]),
        },
        "outcome": _outcome(cfg, sites, one),
        "features": {},
        "categories": {},
    }
    for name in numeric:
        out["features"][name] = _feature(name, sites, one, two, edges, cohort, min_cell)
    for name, levels in categorical.items():
        vectors = {s: one[s][f"category/{name}"] for s in sites}
        total, hidden = pool(list(vectors.values()))
        out["categories"][name] = {
            "levels": ["missing", *map(str, levels)],
            "sites": vectors,
            "pooled": [_cell(t, h) for t, h in zip(total, hidden, strict=True)],
        }
    if edges["km"] is not None:
        out["km"] = kaplan_meier(
            edges["km"],
            {s: two[s]["cells"] for s in sites if "km/at_risk" in two[s]["cells"]},
            {
                s: one[s]["outcome"][2] if one[s]["outcome"][2] is not None else cohort[s]
                for s in sites
                if "km/at_risk" in two[s]["cells"]
            },
            min_cell,
        )

    return out


def _outcome(cfg: RunConfig, sites: list[str], one: dict[str, Any]) -> dict[str, Any]:
    labels = ["missing", "censored", "event"] if is_survival(cfg) else ["missing", "0", "1"]
    vectors = {s: one[s]["outcome"] for s in sites}
    total, hidden = pool(list(vectors.values()))
    rate = {s: _share(v[2], None if None in v[1:] else v[1] + v[2]) for s, v in vectors.items()}
    return {
        "labels": labels,
        "sites": vectors,
        "pooled": [_cell(t, h) for t, h in zip(total, hidden, strict=True)],
        "rate": {
            "sites": rate,
            "pooled": _share(total[2], total[1] + total[2]),
            "pooled_partial": bool(hidden[1] or hidden[2]),
        },
    }


def _feature(
    name: str,
    sites: list[str],
    one: dict[str, Any],
    two: dict[str, Any],
    edges: dict[str, Any],
    cohort: dict[str, int | None],
    min_cell: int,
) -> dict[str, Any]:
    missing = {s: one[s][f"feature/{name}"][0] for s in sites}
    total, hidden = pool([[m] for m in missing.values()])
    entry: dict[str, Any] = {
        "missing": {"sites": missing, "pooled": _cell(total[0], hidden[0])},
        "missing_share": {s: _share(missing[s], cohort[s]) for s in sites},
    }
    feature_edges = edges["features"].get(name)
    if feature_edges is None:
        entry["note"] = "every coarse cell was suppressed: no shared edges, no histogram"
        return entry
    histograms = {s: two[s]["cells"].get(f"bins/{name}") for s in sites}
    present = [h for h in histograms.values() if h is not None]
    counts, hidden_bins = pool(present) if present else ([], [])
    entry["histogram"] = {
        "edges": feature_edges,
        "sites": histograms,
        "pooled": counts,
        "partial": [h > 0 for h in hidden_bins],
    }
    per_site: dict[str, dict[str, Any]] = {}
    exact = []
    pooled_filled = [0.0] * (len(feature_edges) + 1)
    for s in sites:
        moments = _moments(cohort[s], missing[s], two[s]["sums"].get(name))
        hist = histograms[s]
        row: dict[str, Any] = {}
        if moments is not None:
            exact.append(moments)
            row["n"], (row["mean"], row["sd"]) = moments[0], _mean_sd(*moments)
            row["moments"] = "sums (winsorized at the edges)"
        elif hist is not None and None not in hist:
            approx = _histogram_moments(hist, feature_edges)
            if approx is not None:
                (row["mean"], row["sd"]), row["moments"] = approx, "from histogram"
        if hist is not None:
            present = None if cohort[s] is None else cohort[s] - (missing[s] or 0)
            filled = imputed(hist, present, min_cell)
            row["quantiles"] = quantiles(filled, feature_edges)
            row["quantiles_imputed"] = None in hist
            pooled_filled = [a + b for a, b in zip(pooled_filled, filled, strict=True)]
        per_site[s] = row
    pooled: dict[str, Any] = {"quantiles": quantiles(pooled_filled, feature_edges)}
    pooled["quantiles_imputed"] = any(hidden_bins)
    pooled["partial"] = any(hidden_bins)
    if exact and len(exact) == len(sites):
        n, total_sum, squares = (sum(m[i] for m in exact) for i in range(3))
        pooled["n"], (pooled["mean"], pooled["sd"]) = n, _mean_sd(n, total_sum, squares)
        pooled["moments"] = "sums (winsorized at the edges)"
    elif counts:
        approx = _histogram_moments(counts, feature_edges)
        if approx is not None:
            (pooled["mean"], pooled["sd"]), pooled["moments"] = approx, "from histogram"
    entry["sites"], entry["pooled"] = per_site, pooled
    return entry


def kaplan_meier(
    starts: list[float],
    tables: dict[str, dict[str, Vector]],
    events_total: dict[str, int | None],
    min_cell: int,
) -> dict[str, Any]:
    """Survival at the end of each interval from the sites' life tables (risk set at each
    interval's start, events within it): per site until its first suppressed step, pooled
    where every site published the step, and a pooled band that holds whatever the suppressed
    counts were (an at-risk count 1 to min_cell - 1; an event count 1 to what the site's
    event total leaves, ``hidden_most``)."""
    times = starts[1:]  # survival at the end of each closed interval
    out: dict[str, Any] = {"times": times, "sites": {}}
    for site, cells in tables.items():
        at_risk, events = cells["km/at_risk"], cells["km/events"]
        curve: list[float | None] = []
        survival: float | None = 1.0
        for k in range(len(times)):
            n, d = at_risk[k], events[k]
            survival = (
                None
                if survival is None or n is None or d is None or n == 0
                else (survival * (1 - min(d / n, 1.0)))
            )
            curve.append(survival)
        out["sites"][site] = curve
    risk, risk_hidden = pool([c["km/at_risk"] for c in tables.values()])
    died, died_hidden = pool([c["km/events"] for c in tables.values()])
    point: list[float] = []
    low, high = [], []
    s_point = 1.0
    s_low = s_high = 1.0
    event_most = {
        s: hidden_most(c["km/events"], events_total[s], min_cell) for s, c in tables.items()
    }
    filled_events = {
        s: imputed(c["km/events"], events_total[s], min_cell) for s, c in tables.items()
    }
    filled_risk = {  # at-risk counts are not a partition: no total, each hidden one min_cell / 2
        s: imputed(c["km/at_risk"], None, min_cell) for s, c in tables.items()
    }
    approximate = False
    flags: list[bool] = []
    for k in range(len(times)):
        n, d, hn, hd = risk[k], died[k], risk_hidden[k], died_hidden[k]
        n_filled = sum(filled_risk[s][k] for s in tables)
        d_filled = sum(filled_events[s][k] for s in tables)
        s_point *= 1 - min(d_filled / n_filled, 1.0) if n_filled > 0 else 1.0
        approximate = approximate or bool(hn or hd)
        hidden_events = sum(event_most[s] for s, c in tables.items() if c["km/events"][k] is None)
        most = (d + hidden_events) / max(n + hn, 1)
        least = (d + hd) / max(n + hn * (min_cell - 1), 1)
        s_low *= 1 - min(most, 1.0)
        s_high *= 1 - min(least, 1.0)
        point.append(s_point)
        flags.append(approximate)
        low.append(s_low)
        high.append(s_high)
    out["pooled"] = {
        "survival": point,
        "approximate": flags,
        "low": low,
        "high": high,
        "at_risk": [_cell(t, h) for t, h in zip(risk, risk_hidden, strict=True)],
        "events": [_cell(t, h) for t, h in zip(died, died_hidden, strict=True)],
    }
    return out


# -- the report ----------------------------------------------------------------------------------


def write_report(run_dir: Path, stats: dict[str, Any]) -> list[Path]:
    """stats.json, stats.md and the plots (histograms.png, km.png) in ``run_dir``."""
    from fedmed.io import write_json

    write_json(run_dir / "stats.json", stats)
    written = [run_dir / "stats.json"]
    plots = []
    if any(f.get("histogram", {}).get("pooled") for f in stats["features"].values()):
        plots.append(_plot_histograms(run_dir / "histograms.png", stats))
    if "km" in stats:
        plots.append(_plot_km(run_dir / "km.png", stats))
    (run_dir / "stats.md").write_text(markdown(stats, [p.name for p in plots]))
    return [*written, run_dir / "stats.md", *plots]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "<suppressed>"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pooled(cell: dict[str, Any]) -> str:
    return f"≥{cell['count']}" if cell["partial"] else str(cell["count"])


def markdown(stats: dict[str, Any], plots: list[str]) -> str:
    """The report: per-site and pooled tables, then the plots."""
    secure = stats.get("secure_aggregation")
    # Under SecAgg+ the one reply is the sum: its rows would repeat the pooled ones.
    sites = [] if secure else stats["sites"]
    if secure:
        summed = next(iter(secure["passes"].values()))
        about = (
            f"{len(summed)} sites summed under SecAgg+ ({', '.join(summed)}): the coordinator "
            f"saw only the pooled counts, and a pooled count from 1 to {secure['min_cell'] - 1} "
            "is suppressed in this report (`<suppressed>`). No site's own counts left it."
        )
    else:
        about = (
            f"{len(sites)} sites. A count from 1 to {stats['min_cell'] - 1} is suppressed at the "
            "site (`<suppressed>`); a pooled count marked ≥ is partial (some site suppressed its "
            "part). No row left any site."
        )

    def pooled(cell: dict[str, Any]) -> str:
        return "<suppressed>" if secure and cell["partial"] else _pooled(cell)

    lines = [
        f"# Federated statistics: {stats['study']}",
        "",
        f"Task `{stats['task']}`, {about}",
        "",
    ]
    noisy = {s: e for s, e in stats["epsilon"].items() if e}
    if noisy:
        spent = ", ".join(f"{s} ε={e:.3g}" for s, e in noisy.items())
        lines += [f"Gaussian noise on the counts of: {spent} (each site's own ledger).", ""]
    if stats["refused"]:
        lines += [
            "Not included: " + "; ".join(f"{k}: {v}" for k, v in stats["refused"].items()),
            "",
        ]
    outcome = stats["outcome"]
    head = ["site", "cohort", *(f"outcome {label}" for label in outcome["labels"]), "rate"]
    lines += ["## Cohort and outcome", "", _row(head), _row(["---"] * len(head))]
    for s in sites:
        rate = outcome["rate"]["sites"][s]
        lines.append(
            _row(
                [s, _fmt(stats["cohort"]["sites"][s]), *map(_fmt, outcome["sites"][s]), _fmt(rate)]
            )
        )
    pooled_rate = _fmt(outcome["rate"]["pooled"]) + (
        "*" if outcome["rate"]["pooled_partial"] else ""
    )
    lines.append(
        _row(
            [
                "**pooled**",
                pooled(stats["cohort"]["pooled"]),
                *map(pooled, outcome["pooled"]),
                pooled_rate,
            ]
        )
    )
    lines += ["", "## Numeric features", ""]
    head = ["feature", "site", "missing", "mean", "sd", "q05", "q25", "median", "q75", "q95"]
    lines += [_row(head), _row(["---"] * len(head))]
    for name, entry in stats["features"].items():
        for s in [*sites, "pooled"]:
            row = entry.get("pooled" if s == "pooled" else "sites", {})
            row = row if s == "pooled" else row.get(s, {})
            missing = entry["missing"]["pooled"] if s == "pooled" else None
            shown_missing = pooled(missing) if missing else _fmt(entry["missing"]["sites"][s])
            q = row.get("quantiles", {})
            mean = _fmt(row.get("mean")) + ("~" if row.get("moments") == "from histogram" else "")
            lines.append(
                _row(
                    [
                        name if s == [*sites, "pooled"][0] else "",
                        f"**{s}**" if s == "pooled" else s,
                        shown_missing,
                        mean,
                        _fmt(row.get("sd")),
                        *(_approx(q.get(k), row.get("quantiles_imputed")) for k in QUANTILE_KEYS),
                    ]
                )
            )
    lines += [
        "",
        "Means and sds are of the values winsorized at the shared edges (`~`: from the histogram's "
        "bin midpoints, where a site sent no sums). `≈`: some bin was "
        "suppressed and its count estimated (the site's unexplained remainder spread over its "
        "suppressed bins). A quantile in an open tail, or a statistic the site suppressed, "
        "shows `<suppressed>`.",
        "",
    ]
    if stats["categories"]:
        lines += ["## Categorical features", ""]
        for name, entry in stats["categories"].items():
            head = ["site", *entry["levels"]]
            lines += [f"**{name}**", "", _row(head), _row(["---"] * len(head))]
            lines += [_row([s, *map(_fmt, entry["sites"][s])]) for s in sites]
            lines += [_row(["**pooled**", *map(pooled, entry["pooled"])]), ""]
    if "km" in stats:
        km = stats["km"]
        head = ["time", *sites, "pooled", "pooled band"]
        lines += ["## Kaplan-Meier survival", "", _row(head), _row(["---"] * len(head))]
        for k, t in enumerate(km["times"]):
            band = f"{km['pooled']['low'][k]:.3f}-{km['pooled']['high'][k]:.3f}"
            lines.append(
                _row(
                    [
                        _fmt(t, 6),
                        *(
                            _fmt(km["sites"][s][k]) if s in km["sites"] else "no reply"
                            for s in sites
                        ),
                        _approx(km["pooled"]["survival"][k], km["pooled"]["approximate"][k]),
                        band,
                    ]
                )
            )
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _approx(value: float | None, approximate: bool | None) -> str:
    return ("≈" if approximate and value is not None else "") + _fmt(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _plot_histograms(path: Path, stats: dict[str, Any]) -> Path:
    """One panel per numeric feature: pooled bars, each site's share as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {n: f for n, f in stats["features"].items() if f.get("histogram", {}).get("pooled")}
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, shown.items(), strict=False):
        hist = entry["histogram"]
        edges = np.asarray(hist["edges"])
        inner = np.asarray(hist["pooled"][1:-1], dtype=float)
        total = max(sum(hist["pooled"]), 1)
        ax.bar(
            edges[:-1],
            inner / total,
            width=np.diff(edges),
            align="edge",
            color="#c8d6e5",
            label="pooled",
        )
        for site, cells in hist["sites"].items():
            if cells is None:
                continue
            values = np.array([np.nan if c is None else c for c in cells[1:-1]], dtype=float)
            share = values / max(sum(c or 0 for c in cells), 1)
            ax.stairs(share, edges, label=site)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(
        f"{stats['study']}: histograms on shared edges (share of each site's values)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_km(path: Path, stats: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    km = stats["km"]
    times = [0.0, *km["times"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pooled = km["pooled"]
    ax.fill_between(
        times,
        [1.0, *pooled["low"]],
        [1.0, *pooled["high"]],
        step="post",
        color="#c8d6e5",
        label="pooled (band: suppressed counts)",
    )
    ax.step(
        times,
        [1.0, *[np.nan if v is None else v for v in pooled["survival"]]],
        where="post",
        color="black",
        lw=2,
        label="pooled (approximate once a site suppressed a count)",
    )
    for site, curve in km["sites"].items():
        ax.step(
            times,
            [1.0, *[np.nan if v is None else v for v in curve]],
            where="post",
            lw=1,
            label=site,
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time")
    ax.set_ylabel("survival")
    ax.set_title(f"{stats['study']}: Kaplan-Meier (life table on shared intervals)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
