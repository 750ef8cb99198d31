"""A planned run: the frozen config, where its outputs go, and how its results are written.

The plan travels to the ServerApp as two plain strings in Flower's run_config (JSON + a path), so
the same ServerApp works in-process, on Ray and on a SuperLink.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmed import __version__
from fedmed.config import RunConfig, SiteSpec, plain, plan_from_json
from fedmed.errors import ConfigError, StudyFailed
from fedmed.report import RunHistory, write_json, write_metrics
from fedmed.serving.export import save_model

CONFIG_KEY = "fedmed-config"
SERVING_KEY = "fedmed-serving"
RUN_DIR_KEY = "fedmed-run-dir"
ENGINE_KEY = "fedmed-engine"
RESUME_KEY = "fedmed-resume"
NODES_KEY = "fedmed-nodes"


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig
    run_dir: Path
    engine: str = "inprocess"
    # Preprocessing a served model applies to a clinic's raw rows (see serving_preprocessing).
    serving: str = ""  # JSON
    # Continue run_dir from its checkpoint instead of starting at round 1 (fedmed.checkpoint).
    resume: bool = False
    # Deployment: {site name: Flower node id} from the coordinator's registry (JSON). Replies
    # are attributed to the site their authenticated node was registered as, never to the name
    # a reply claims; "" (simulations, --insecure) trusts the in-process or unauthenticated sites.
    nodes: str = ""

    def to_run_config(self) -> dict[str, str]:
        return {
            CONFIG_KEY: self.config.to_json(),
            RUN_DIR_KEY: str(self.run_dir),
            ENGINE_KEY: self.engine,
            SERVING_KEY: self.serving,
            RESUME_KEY: "1" if self.resume else "",
            NODES_KEY: self.nodes,
        }

    def site_nodes(self) -> dict[int, str]:
        """Flower node id -> site name, for the sites this study lists."""
        if not self.nodes:
            return {}
        listed = set(self.config.site_names)
        return {int(n): s for s, n in json.loads(self.nodes).items() if s in listed}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunPlan:
        if CONFIG_KEY not in run_config:
            raise ConfigError(
                f"the ServerApp needs '{CONFIG_KEY}' in its run config; start runs with "
                "`fedmed simulate` (or pass --run-config with the study JSON)"
            )
        return cls(
            plan_from_json(str(run_config[CONFIG_KEY])),
            Path(str(run_config.get(RUN_DIR_KEY, "runs/unnamed"))),
            str(run_config.get(ENGINE_KEY, "deployment")),
            str(run_config.get(SERVING_KEY, "")),
            bool(run_config.get(RESUME_KEY, "")),
            str(run_config.get(NODES_KEY, "")),
        )


def new_run_dir(cfg: RunConfig) -> Path:
    """runs/<name>-<mode>[-<strategy>]-s<seed>-<timestamp>[-N]; never reuses an earlier run.

    The strategy (federated runs) and the seed are in the name so that a sweep's folders tell
    runs apart without opening metrics.json. mkdir without exist_ok is the lock: two runs
    started in the same second get -2, -3, ...
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    strategy = f"-{cfg.strategy.name}" if cfg.mode == "federated" else ""
    base = Path(cfg.output_dir) / f"{cfg.name}-{cfg.mode}{strategy}-s{cfg.seed}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"cannot create a run directory next to {base}; clean up {base.parent}")


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
            plan.run_dir / "live.json", {**_header(plan), "status": "running", **history.to_dict()}
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
    from fedmed.server_app import initial_model

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        model = initial_model(plan)
    if plan.config.privacy.enabled:
        from fedmed.privacy import make_compatible

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

    from fedmed.data import ArrayTable
    from fedmed.data.table import Preprocessor

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
    consortium standardization (fedmed.server_app.consortium_scale).
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


def _asdict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples -> lists), like RunConfig.to_dict."""
    return json.loads(json.dumps(plain(obj)))


# What a plan hash leaves out: where results go, and how the coordinator combines what sites send
# (these never reach a site's data, its privacy loss or what it releases).
PLAN_OUTPUT_ONLY = frozenset({"name", "output_dir"})
COORDINATOR_ONLY_STRATEGY = frozenset(
    {
        "min_sites",
        "server_lr",
        "server_momentum",
        "beta_1",
        "beta_2",
        "tau",
        "trim_beta",
        "num_malicious",
        "krum_select",
        "validate_updates",
        "max_norm_ratio",
        "round_timeout",
        "average_last",
    }
)
# Settings that set a site's privacy loss or its release: hashed with their values even at
# their defaults, so an approved hash means the same ε whichever fedmed version parsed the plan.
PRIVACY_BINDING = ("rounds", "seed", "train", "privacy", "personalize")
RELEASE_STRATEGY = ("name", "proximal_mu", "secure_aggregation")


def _defaults(cls: type) -> dict[str, Any]:
    """The default values of a config dataclass's fields as plain JSON (required ones left out)."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(
        json.dumps(out, default=lambda o: _asdict(o) if dataclasses.is_dataclass(o) else list(o))
    )


def plan_hash(cfg: RunConfig) -> str:
    """Content hash of everything a site is asked to run and spend on its data.

    A hospital approves one hash, so the hash must bind every setting that determines what is
    computed on its data, what leaves the site and its privacy loss: the task, model and data
    schema, and also rounds, local steps/epochs, batch size, learning rate schedule, the seed,
    local and central DP settings, personalization, FedProx's mu and secure aggregation. Left
    out are only the output settings (name, output_dir) and the coordinator's own aggregation
    knobs (PLAN_OUTPUT_ONLY, COORDINATOR_ONLY_STRATEGY), plus the files and columns a site maps
    from its own registry. Other settings left at their defaults are omitted, so a fedmed
    upgrade that adds an unrelated config key does not void every approval; the privacy-binding
    ones (PRIVACY_BINDING, RELEASE_STRATEGY) are always hashed with their values.
    """
    import hashlib

    from fedmed.config import ImageConfig, SeriesConfig

    default = _defaults(RunConfig)

    def changed(values: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict) and base[key]:
                nested = changed(value, base[key])
                if nested:
                    out[key] = nested
            elif base.get(key) != value:
                out[key] = value
        return out

    spec = cfg.to_dict()
    content: dict[str, Any] = {
        key: value
        for key, value in changed(spec, default).items()
        if key not in PLAN_OUTPUT_ONLY and key not in ("strategy", "data", "sites")
    }
    for key in PRIVACY_BINDING:
        content[key] = spec[key]
    content["strategy"] = {k: spec["strategy"][k] for k in RELEASE_STRATEGY}
    content["sites"] = [
        # Defaults of a site entry (its name is always "changed": every site is listed).
        changed(site, {**_asdict(SiteSpec("site")), "name": None})
        for site in spec["sites"]
    ]
    data = changed(spec["data"], default["data"])
    # What images and series become (size; window, bins, missing code) is part of what runs;
    # file names and columns are the site's own (its registry), so they are left out.
    site_owned = {
        "outcomes",
        "column",
        "mean",  # the consortium reference: derived from the sites' statistics during the run
        "std",
        *(k for k in spec["data"]["series"] if k.endswith("_column")),
    }
    for key, base in (("images", ImageConfig()), ("series", SeriesConfig())):
        values = {k: v for k, v in spec["data"][key].items() if k not in site_owned}
        data.pop(key, None)
        if changed(values, _asdict(base)):
            data[key] = changed(values, _asdict(base))
    content["data"] = data
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
