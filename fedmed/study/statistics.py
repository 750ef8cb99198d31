"""Consortium-wide statistics combined from the sites' own (standardization, series reference)."""

from __future__ import annotations

import json
from typing import Any

from fedmed.config import RunConfig
from fedmed.errors import ConfigError


def combine_site_statistics(sites: list[dict[str, Any]]) -> str:
    """Serving preprocessing from each site's OWN fitted statistics (deployment).

    Each entry is a site's ``Preprocessor.to_dict()`` plus ``n`` (train rows). Means and variances
    combine exactly as the union's would (n-weighted moments); the imputation means are weighted by
    train rows, not by each column's non-missing count, so with missing values they are close to,
    not equal to, the union's. Same output format as serving_preprocessing.
    """
    import numpy as np

    if not sites:
        return ""
    if "pixels" in sites[0]:
        return json.dumps(_combine_images(sites))
    if "variables" in sites[0]:
        return json.dumps(_combine_series(sites))
    if "vocabulary_size" in sites[0]:  # text: the tokenizer itself is saved with the model
        return json.dumps(
            {
                "fitted_on": "the study's vocabulary (data.text.vocabulary)",
                "sites": len(sites),
                "max_tokens": sites[0]["max_tokens"],
                "truncated": sum(
                    int(s["truncated_train"]) + int(s["truncated_test"]) for s in sites
                ),
            }
        )
    inputs = sites[0]["inputs"]
    if any(s["inputs"] != inputs for s in sites):
        raise ConfigError("sites reported different input layouts; check their schemas")
    n = np.array([float(s["n"]) for s in sites])
    weights = n / n.sum()
    mean, std = _pooled_moments(weights, sites)
    fill = {
        k: float(sum(w * s["impute_mean"][k] for w, s in zip(weights, sites, strict=True)))
        for k in sites[0]["impute_mean"]
    }
    return json.dumps(
        {
            "fitted_on": f"n-weighted combination of {len(sites)} sites' train statistics",
            "sites": len(sites),
            "inputs": inputs,
            "impute_mean": fill,
            "mean": mean.tolist(),
            "std": std.tolist(),
        }
    )


def _pooled_moments(weights: Any, sites: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The union's mean and std from each site's (mean, std), weighted by ``weights``."""
    import numpy as np

    means = np.array([s["mean"] for s in sites], dtype=np.float64)
    stds = np.array([s["std"] for s in sites], dtype=np.float64)
    mean = weights @ means
    var = weights @ (stds**2 + means**2) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return mean, np.where(std > 1e-12, std, 1.0)


def _combine_images(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """Images: a fixed pixel transform; the served input size is the sites' common one."""
    shapes = {(s.get("height"), s.get("width")) for s in sites}
    out = {k: v for k, v in sites[0].items() if k not in ("n", "height", "width")}
    if len(shapes) == 1:  # else the sites' sizes differ and the size-agnostic CNN takes any
        out["height"], out["width"] = shapes.pop()
    return {"fitted_on": f"{len(sites)} sites' image sizes", "sites": len(sites), **out}


def _combine_series(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """Series: the scale the sites trained with, for the served model.

    With a consortium reference (data.series.mean/std) every site used it and so does the
    served model. Otherwise each site used its own statistics and the served model gets the
    union's (``series_reference``).
    """
    layout = ("variables", "bins", "bin_minutes", "hours", "missing_code", "log_variables")
    first = {k: sites[0].get(k) for k in layout}
    if any({k: s.get(k) for k in layout} != first for s in sites):
        raise ConfigError("sites reported different series layouts; check their data.series")
    if sites[0].get("reference"):
        fitted_on, mean, std = (
            "the consortium reference every site trained with",
            *(list(sites[0][k]) for k in ("mean", "std")),
        )
    else:
        fitted_on = f"union of {len(sites)} sites' train statistics (exact combination)"
        mean, std = series_reference(sites)
    return {"fitted_on": fitted_on, "sites": len(sites), **first, "mean": mean, "std": std}


def with_series_reference(cfg: RunConfig, sites: list[dict[str, Any]]) -> RunConfig:
    """``cfg`` with the union's per-variable scale as every site's reference (consortium)."""
    from dataclasses import replace

    mean, std = series_reference(sites)
    series = replace(cfg.data.series, mean=tuple(mean), std=tuple(std))
    return cfg.replace(data=replace(cfg.data, series=series))


def series_reference(sites: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-variable mean and sd of the union of the sites' observed train bins.

    Each site reports, per variable, how many (patient, bin) cells it observed and their mean
    and sd ("own"); weighting by those counts gives exactly the union's moments (a site that
    never observed a variable adds nothing to it). Used for the served model's scale and for
    consortium standardization (fedmed.coordinator.app.consortium_scale).
    """
    import numpy as np

    owns = [s.get("own") or {**s, "count": [float(s["n"])] * len(s["mean"])} for s in sites]
    counts = np.array([o["count"] for o in owns], dtype=np.float64)
    means = np.array([o["mean"] for o in owns], dtype=np.float64)
    stds = np.array([o["std"] for o in owns], dtype=np.float64)
    total = counts.sum(axis=0)
    weights = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    mean = (weights * means).sum(axis=0)
    var = (weights * (stds**2 + means**2)).sum(axis=0) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return mean.tolist(), np.where(std > 1e-9, std, 1.0).tolist()
