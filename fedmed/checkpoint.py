"""Coordinator checkpoints: what a killed run needs to continue from its last completed round.

One file, ``RUN_DIR/checkpoint.safetensors``, replaced atomically after every round, so a kill at
any instant leaves either the previous round's checkpoint or this one, never a mix. It holds the
global model and the strategy's own state (server-optimizer moments, momentum) as tensors, and in
the safetensors metadata the round counter, the metric history and the config with its hash.
safetensors, never pickle: a checkpoint is a file on disk that someone else could have written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.report import RunHistory, atomic_write

FORMAT = "fedmed-checkpoint/1"
FILENAME = "checkpoint.safetensors"
MODEL = "model"  # tensor-name prefix of the global model; strategy state uses "state/<name>"
# Where a run's outputs go is not part of what it computes: a moved run may still resume.
NOT_HASHED = ("output_dir",)


@dataclass(frozen=True)
class Checkpoint:
    """The coordinator's state after ``round`` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]  # the global model after ``round``
    history: RunHistory
    # e.g. {"m_t": {param: array}, "v_t": {...}} for FedAdam; {} for stateless strategies
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _hashed(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED}


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of everything that shapes the run's numbers (all of the config but output_dir)."""
    text = json.dumps(_hashed(cfg), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(run_dir: Path, cfg: RunConfig, checkpoint: Checkpoint) -> Path:
    """Write (atomically replace) the run's checkpoint; returns its path."""
    from safetensors.numpy import save

    tensors = {f"{MODEL}/{k}": np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()}
    for name, arrays in checkpoint.strategy_state.items():
        tensors.update({f"state/{name}/{k}": np.ascontiguousarray(v) for k, v in arrays.items()})
    metadata = {
        "format": FORMAT,
        "round": str(checkpoint.round),
        "config_hash": config_hash(cfg),
        "config": cfg.to_json(),
        "history": json.dumps(checkpoint.history.to_state()),
    }
    path = run_dir / FILENAME
    atomic_write(path, save(tensors, metadata=metadata))
    return path


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> Checkpoint:
    """The checkpoint of ``run_dir``, refused unless it was written for this very config."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / FILENAME
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {FILENAME}: it never completed a round (or is not a federated "
            "run directory); start a new run without --resume"
        )
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"{path} is not a readable checkpoint ({exc}); start a new run without --resume"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} file; start a new run without --resume")
    if metadata["config_hash"] != config_hash(cfg):
        changed = _differences(_hashed(RunConfig.from_json(metadata["config"])), _hashed(cfg))
        raise ConfigError(
            f"{run_dir} was started with a different config (changed: {', '.join(changed[:5])}); "
            "resume with the run's own config file and --set overrides, or start a new run "
            "without --resume"
        )
    arrays: dict[str, np.ndarray] = {}
    state: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        group, _, key = name.partition("/")
        if group == MODEL:
            arrays[key] = value
        else:
            attr, _, param = key.partition("/")
            state.setdefault(attr, {})[param] = value
    history = RunHistory.from_state(json.loads(metadata["history"]))
    return Checkpoint(int(metadata["round"]), arrays, history, state)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values (for the refusal message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.')} was {json.dumps(old)}, now {json.dumps(new)}"]
