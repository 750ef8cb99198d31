"""Model files: safetensors weights + a JSON model card. Never pickle.

The card carries everything a clinic needs to use the weights correctly (task, input layout,
schema, preprocessing) and to judge them (sites, rounds, per-site metrics, ε), plus the SHA-256
of the weights file so a swapped or edited file is detected on load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmed import __version__
from fedmed.config import RunConfig, echo
from fedmed.data.table import input_names
from fedmed.errors import ConfigError
from fedmed.io import atomic_write, json_safe
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
    if cfg.data.text.vocabulary:  # text: the tokenizer a served model feeds raw text through
        card["tokenizer"] = _save_tokenizer(out_dir, stem, cfg)
        card.update(_frozen_embedding(model))
    signed = sign_card(json_safe(card))
    atomic_write(out_dir / f"{stem}.card.json", (json.dumps(signed, indent=2) + "\n").encode())
    return weights


def _frozen_embedding(model: torch.nn.Module) -> dict[str, Any]:
    """A text model's fixed token table is not in the weights file: the card says how to
    rebuild it (its seed) and binds it by its SHA-256, as it binds the weights."""
    from fedmed.tasks.text import frozen_embedding_of

    frozen = frozen_embedding_of(model)
    return {"frozen_embedding": frozen.record()} if frozen is not None else {}


def _save_tokenizer(out_dir: Path, stem: str, cfg: RunConfig) -> dict[str, Any]:
    """``<stem>.tokenizer.json`` (HuggingFace tokenizers' own JSON) and what the card says of it.

    The card binds the file by its SHA-256, as it binds the weights; the card is signed.
    """
    from fedmed.data.text import tokenizer_json

    path = out_dir / f"{stem}.tokenizer.json"
    atomic_write(path, tokenizer_json(cfg.data.text.vocabulary).encode())
    text = cfg.data.text
    return {
        "file": path.name,
        "sha256": _sha256(path),
        "vocabulary_size": len(text.vocabulary),
        "max_tokens": text.max_tokens,
        "column": text.column,
        "classes": list(text.classes),
        "padding_id": 0,
    }


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
    model, card, _ = load_model_and_tokenizer(weights, require_signature=require_signature)
    return model, card


def load_model_and_tokenizer(
    weights: Path, *, require_signature: bool = True
) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """``load_model``, plus the text model's tokenizer (a ``tokenizers.Tokenizer``; else None).

    The tokenizer file is checked against the card's SHA-256 like the weights: it decides which
    ids a text becomes, so a swapped vocabulary would silently feed the model other words.
    """
    weights = resolve_model_path(weights)
    card_path = weights.with_name(weights.name.removesuffix(".safetensors") + ".card.json")
    if not weights.is_file():
        raise ConfigError(f"{weights}: model file not found")
    if not card_path.is_file():
        raise ConfigError(f"{card_path}: model card missing; export the model again with fedmed")
    card = read_card(card_path)
    if require_signature:
        verify_card(card, str(card_path))
    elif "signature" in card:
        _warn_if_forged(card, str(card_path))
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

    with malformed_card(card_path):
        text = get_task(card["task"]).target == "text"
    if text != ("tokenizer" in card):
        raise ConfigError(
            f"{card_path}: a '{card['task']}' model card "
            + ("without a tokenizer" if text else "with a tokenizer")
            + " does not describe these weights; export the model again from its run directory"
        )
    tokenizer = _load_tokenizer(weights, card, card_path) if text else None
    with malformed_card(card_path):
        model_cfg = _build(ModelConfig, card["model"], "model.")
        if text:
            from fedmed.tasks.text import build_text_model

            info = card["tokenizer"]
            frozen = card["frozen_embedding"] if model_cfg.frozen_embedding else {"seed": 0}
            model = build_text_model(
                int(info["vocabulary_size"]),
                len(info["classes"]),
                int(info["max_tokens"]),
                model_cfg,
                seed=int(frozen["seed"]),
            )
            _check_frozen_embedding(model, frozen, card, card_path)
        else:
            model = get_task(card["task"]).build_model(len(card["inputs"]), model_cfg)
        if card.get("privacy", {}).get("enabled"):
            from fedmed.tasks.dp_compat import make_compatible

            model = make_compatible(model)
        model.load_state_dict(state)
    return model.eval(), card, tokenizer


def _check_frozen_embedding(
    model: torch.nn.Module, recorded: dict[str, Any], card: dict[str, Any], card_path: Path
) -> None:
    """The fixed token table this fedmed rebuilds must be the one the model was trained with.

    It is drawn from a seed, not read from a file (fedmed.tasks.text.frozen_table); were the
    drawing ever to change, the head's weights would silently meet another table.
    """
    from fedmed.tasks.text import frozen_embedding_of

    frozen = frozen_embedding_of(model)
    if frozen is None:
        return
    if frozen.record()["sha256"] != str(recorded["sha256"]):
        raise ConfigError(
            f"{card_path}: the frozen token embedding rebuilt from seed {frozen.seed} does not "
            "match the SHA-256 on the card; serve the model with the fedmed version that "
            f"trained it ({echo(str(card.get('fedmed_version')))}), or retrain it"
        )


def _load_tokenizer(weights: Path, card: dict[str, Any], card_path: Path) -> Any:
    """The card's tokenizer file, read once, checked against the card's SHA-256, then parsed
    from those same bytes (``tokenizers``' JSON: no pickle)."""
    from tokenizers import Tokenizer

    from fedmed.data.text import PAD

    with malformed_card(card_path):
        info = card["tokenizer"]
        name, expected, size = str(info["file"]), str(info["sha256"]), int(info["vocabulary_size"])
    if not name or Path(name).name != name:  # the file sits next to the weights, nowhere else
        raise ConfigError(
            f"{card_path}: the card's tokenizer file {echo(name)} is not a plain file name; "
            "export the model again from its run directory"
        )
    path = weights.with_name(name)
    if not path.is_file():
        raise ConfigError(
            f"{path}: tokenizer file not found; copy it from the run directory next to "
            f"{weights.name} (a text model cannot read raw text without it)"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ConfigError(
            f"{path}: SHA-256 does not match its model card; the tokenizer file was changed or "
            "corrupted: copy it again from the run directory (or re-export the model)"
        )
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise ConfigError(
            f"{path}: not a readable tokenizer ({echo(str(exc))}); export the model again"
        ) from None
    if tokenizer.get_vocab_size() != size or tokenizer.token_to_id(PAD) != 0:
        raise ConfigError(
            f"{path}: the tokenizer's vocabulary does not match its model card ({size} tokens, "
            f"{PAD} = 0); export the model again from its run directory"
        )
    return tokenizer


def read_card(card_path: Path) -> dict[str, Any]:
    """The model card as a dict; binary, malformed or non-object JSON is a one-line ConfigError."""
    try:
        card = json.loads(card_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(
            f"{card_path}: model card is not valid JSON ({echo(str(exc))}); export the model "
            "again from its run directory"
        ) from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ConfigError(
            f"{card_path}: not a {CARD_FORMAT} model card; export the model again from its run "
            "directory"
        )
    return card


@contextmanager
def malformed_card(card_path: Path) -> Iterator[None]:
    """Turn a card field of the wrong type or shape into one line naming the card.

    The card passed the format check, so such a field means an edited or foreign card: the
    weights cannot be trusted to match it, and a KeyError deep in model building says nothing.
    """
    try:
        yield
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ConfigError(
            f"{card_path}: model card does not describe these weights ({type(exc).__name__}: "
            f"{echo(str(exc))}); export the model again from its run directory"
        ) from None


def _warn_if_forged(card: dict[str, Any], where: str) -> None:
    """--allow-unsigned accepts an unsigned card, never silently a card whose signature fails.

    A signature that does not verify means the card or weights were changed after export;
    serving it may still be what a developer wants, but it must be said, loudly, on stderr.
    """
    try:
        verify_card(card, where)
    except ConfigError as exc:
        print(
            f"fedmed: WARNING: SIGNATURE CHECK FAILED ({exc}); serving anyway because of "
            "--allow-unsigned: NOT FOR CLINICAL USE",
            file=sys.stderr,
        )
