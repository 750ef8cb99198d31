"""Coordinator checkpoints: what a killed run needs to continue from its last completed round.

One file, ``RUN_DIR/checkpoint.safetensors``, replaced atomically after every round, so a kill at
any instant leaves either the previous round's checkpoint or this one, never a mix. It holds the
global model and the strategy's own state (server-optimizer moments, momentum) as tensors, and in
the safetensors metadata the round counter, the metric history and the config with its hash.
safetensors, never pickle: a checkpoint is a file on disk that someone else could have written.

It is also authenticated: the metadata carries an HMAC-SHA256 over every tensor (name, dtype,
shape, bytes) and every other metadata entry, keyed by a per-run secret in
``RUN_DIR/checkpoint.key`` (32 random bytes, mode 0600, created with the first checkpoint).
``--resume`` refuses a checkpoint whose MAC does not verify (zeroed weights, a round set to -3
or 99, a swapped history) in one line. Why a per-run key in the run directory rather than a
coordinator-wide key: a run directory may be moved and still resume, and the secret never has
to leave it. What it does not stop: someone who can read the coordinator's files (the key) can
forge a checkpoint; they could equally run the coordinator. The MAC sits inside the one file
that is replaced atomically, so a kill at any instant still leaves a checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import RunConfig
from fedmed.errors import ConfigError
from fedmed.io import atomic_write, private_secret
from fedmed.study.history import RunHistory

FORMAT = "fedmed-checkpoint/2"  # /1 had no MAC: such a checkpoint is refused
FILENAME = "checkpoint.safetensors"
KEY_FILE = "checkpoint.key"
MAC = "mac"  # metadata entry: HMAC-SHA256 (hex) of the rest
MODEL = "model"  # tensor-name prefix of the global model; strategy state uses "state/<name>"
# Where a run's outputs go, and on which Ray resources its sites run, are not part of what it
# computes: a moved run may still resume, on another machine or cluster.
NOT_HASHED = ("output_dir", "simulation")


@dataclass(frozen=True)
class Checkpoint:
    """The coordinator's state after ``round`` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]  # the global model after ``round``
    history: RunHistory
    # e.g. {"m_t": {param: array}, "v_t": {...}} for FedAdam; {} for stateless strategies
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # What the run derived before round 1 and must keep: the text vocabulary (else empty).
    vocabulary: tuple[str, ...] = ()


def _hashed(cfg: RunConfig) -> dict[str, Any]:
    """The config as it shapes the run, less what the run itself derives before round 1.

    The text vocabulary is built from the sites' counts when the run starts (and reused from
    the checkpoint on resume), so a run's own config file resumes it.
    """
    out = {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED}
    out.get("data", {}).get("text", {}).pop(DERIVED_TEXT, None)
    return out


DERIVED_TEXT = "vocabulary"


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of everything that shapes the run's numbers (all of the config but output_dir)."""
    text = json.dumps(_hashed(cfg), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _run_key(run_dir: Path, *, create: bool) -> bytes:
    """The run's checkpoint secret; created (0600) on the first save, required on resume."""
    path = run_dir / KEY_FILE
    if create:
        private_secret(path)
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing, so the checkpoint cannot be authenticated; restore it, or start "
            "a new run without --resume"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{path} is readable by others; run `chmod 600 {path}` and retry")
    key = path.read_bytes()
    if len(key) < 32:
        raise ConfigError(f"{path} is damaged; start a new run without --resume")
    return key


def _mac(key: bytes, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """HMAC-SHA256 over the metadata (but the MAC) and every tensor's name, dtype, shape, bytes."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    body = {k: v for k, v in metadata.items() if k != MAC}
    mac.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        mac.update(f"|{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        mac.update(array.tobytes())
    return mac.hexdigest()


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
    metadata[MAC] = _mac(_run_key(run_dir, create=True), tensors, metadata)
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
        raise ConfigError(
            f"{path} is not a {FORMAT} file (older ones carry no MAC); start a new run without "
            "--resume"
        )
    expected = _mac(_run_key(run_dir, create=False), tensors, metadata)
    if not hmac.compare_digest(str(metadata.get(MAC, "")), expected):
        raise ConfigError(
            f"{path} failed authentication: it was edited or damaged after the coordinator wrote "
            "it; restore it from backup, or start a new run without --resume"
        )
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
    done = int(metadata["round"])
    if not 0 < done <= cfg.rounds:  # authenticated, so only a bug could get here; still refuse
        raise ConfigError(
            f"{path} says round {done} of {cfg.rounds}; start a new run without --resume"
        )
    vocabulary = RunConfig.from_json(metadata["config"]).data.text.vocabulary
    return Checkpoint(done, arrays, history, state, vocabulary)


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
