"""Model files: safetensors weights + a JSON model card. Never pickle.

The card carries everything a clinic needs to use the weights correctly (task, input layout,
schema, preprocessing) and to judge them (sites, rounds, per-site metrics, ε), plus the SHA-256
of the weights file so a swapped or edited file is detected on load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmed import __version__
from fedmed.config import RunConfig
from fedmed.data.table import input_names
from fedmed.errors import ConfigError
from fedmed.report import atomic_write, json_safe
from fedmed.serving.signing import sign_card, verify_card
from fedmed.tasks import get_task

CARD_FORMAT = "fedmed-model/1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# FedBN (fedmed.local_layers): a reader of the card must not take the per-site metrics for these
# weights' performance.
LOCAL_LAYERS_NOTE = (
    "normalization layers stayed at each site (FedBN): these weights hold the study's initial "
    "ones, so they perform like metrics.json's final.personalized.*.before; the per-site "
    "metrics are those of the sites' own models, which never left the sites"
)


def _local_layers(cfg: RunConfig) -> bool:
    return cfg.personalize.local_normalization and cfg.mode == "federated"


def save_model(
    out_dir: Path, stem: str, model: torch.nn.Module, cfg: RunConfig, extra: dict[str, Any]
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.card.json``; returns the weights path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.safetensors"
    tmp = out_dir / f".{stem}.safetensors.tmp"
    # clone(): Opacus' DPGRU/DPLSTM expose each weight under two names (nn.GRU's and their
    # own) sharing one storage, which safetensors refuses to write.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": CARD_FORMAT})
    tmp.replace(weights)
    schema = cfg.data.schema
    card = {
        "format": CARD_FORMAT,
        "fedmed_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "weights": weights.name,
        "weights_sha256": _sha256(weights),
        "task": cfg.task,
        "model": cfg.to_dict()["model"],
        "inputs": list(input_names(schema.features, schema)),
        "schema": {
            "target": schema.target,
            "features": list(schema.features),
            "categorical": {k: list(v) for k, v in schema.categorical.items()},
            "drop_first": schema.drop_first,
            "positive_above": schema.positive_above,
            "time": schema.time,
            "event": schema.event,
            "event_value": schema.event_value,
            "censored_value": schema.censored_value,
            "missing": schema.missing,
            "standardize": schema.standardize,
        },
        "study": {
            "name": cfg.name,
            "mode": cfg.mode,
            "rounds": cfg.rounds,
            "seed": cfg.seed,
            "strategy": cfg.strategy.name,
            "sites": list(cfg.site_names),
        },
        "privacy": cfg.to_dict()["privacy"],
        **({"local_normalization": LOCAL_LAYERS_NOTE} if _local_layers(cfg) else {}),
        **extra,
    }
    signed = sign_card(json_safe(card))
    atomic_write(out_dir / f"{stem}.card.json", (json.dumps(signed, indent=2) + "\n").encode())
    return weights


def resolve_model_path(path: Path) -> Path:
    """A run directory or a .safetensors file -> the weights file."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        names = ", ".join(p.name for p in found) or "none"
        raise ConfigError(
            f"{path}: expected one model.safetensors (found: {names}); name the model file"
        )
    return path


def load_model(
    weights: Path, *, require_signature: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load weights + card, checking the hash and (unless told not to) the card's signature."""
    weights = resolve_model_path(weights)
    card_path = weights.with_name(weights.name.removesuffix(".safetensors") + ".card.json")
    if not weights.is_file():
        raise ConfigError(f"{weights}: model file not found")
    if not card_path.is_file():
        raise ConfigError(f"{card_path}: model card missing; export the model again with fedmed")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{card_path}: not valid JSON ({exc}); export the model again") from None
    if card.get("format") != CARD_FORMAT:
        raise ConfigError(f"{card_path}: not a {CARD_FORMAT} card")
    if require_signature:
        verify_card(card, str(card_path))
    if _sha256(weights) != card.get("weights_sha256"):
        raise ConfigError(
            f"{weights}: SHA-256 does not match its model card; the file was changed or "
            "corrupted: re-export it from the run directory"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{weights}: not a readable safetensors file ({exc})") from None
    from fedmed.config import ModelConfig, _build

    model = get_task(card["task"]).build_model(
        len(card["inputs"]), _build(ModelConfig, card["model"], "model.")
    )
    if card.get("privacy", {}).get("enabled"):
        from fedmed.privacy import make_compatible

        model = make_compatible(model)
    model.load_state_dict(state)
    return model.eval(), card
