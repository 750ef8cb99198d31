"""A planned run: the frozen config, where its outputs go, and how its results are written.

The plan travels to the ServerApp as two plain strings in Flower's run_config (JSON + a path), so
the same ServerApp works in-process, on Ray and on a SuperLink.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmed.config import RunConfig, plan_from_json
from fedmed.errors import ConfigError
from fedmed.tasks import build_model

CONFIG_KEY = "fedmed-config"
SERVING_KEY = "fedmed-serving"
RUN_DIR_KEY = "fedmed-run-dir"
ENGINE_KEY = "fedmed-engine"
RESUME_KEY = "fedmed-resume"
NODES_KEY = "fedmed-nodes"
STATS_KEY = "fedmed-stats"  # "1": run the federated statistics queries, not training rounds


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
    # --engine ray: the address of an existing Ray cluster to run the sites on ("" = a Ray of the
    # run's own on this machine). Read by the runtime only; never sent to the ServerApp or sites.
    ray_address: str = ""
    # `fedmed stats` / `fedmed run --stats`: the ServerApp asks the sites for their statistics
    # (fedmed.coordinator.stats) instead of training.
    stats: bool = False

    def to_run_config(self) -> dict[str, str]:
        config = {
            CONFIG_KEY: self.config.to_json(),
            RUN_DIR_KEY: str(self.run_dir),
            ENGINE_KEY: self.engine,
            SERVING_KEY: self.serving,
            RESUME_KEY: "1" if self.resume else "",
            NODES_KEY: self.nodes,
        }
        if self.stats:  # only then: a training run's app declares the keys it always did
            config[STATS_KEY] = "1"
        return config

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
            stats=bool(run_config.get(STATS_KEY, "")),
        )


def new_run_dir(cfg: RunConfig, kind: str = "") -> Path:
    """runs/<name>-<mode>[-<strategy>]-s<seed>-<timestamp>[-N]; never reuses an earlier run.

    The strategy (federated runs) and the seed are in the name so that a sweep's folders tell
    runs apart without opening metrics.json. mkdir without exist_ok is the lock: two runs
    started in the same second get -2, -3, ... ``kind`` replaces mode and strategy for runs
    that train nothing (``fedmed stats``: runs/<name>-stats-s<seed>-<timestamp>).
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    strategy = f"-{cfg.strategy.name}" if cfg.mode == "federated" else ""
    label = kind or f"{cfg.mode}{strategy}"
    base = Path(cfg.output_dir) / f"{cfg.name}-{label}-s{cfg.seed}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"cannot create a run directory next to {base}; clean up {base.parent}")


def initial_model(plan: RunPlan) -> torch.nn.Module:
    """The round-0 global model, seeded by the run seed (same in every runtime)."""
    torch.manual_seed(plan.config.seed)
    return build_model(plan.config)
