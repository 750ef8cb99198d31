"""Ed25519 signatures on model cards, so a clinic serves only models its consortium released.

The card already pins the weights by SHA-256, so signing the card signs the model. The signature
records the signer's public key; verification also requires that key to be TRUSTED (the local
coordinator key, or a .pub file in the trusted folder), otherwise anyone could re-sign an edited
model with a key of their own. Until the consortium PKI lands, the coordinator key is generated
locally on first use (``$FEDMED_KEY_DIR``, default ~/.fedmed/keys, private key mode 0600).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmed.config import key_dir
from fedmed.errors import ConfigError

ALGORITHM = "ed25519"


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def coordinator_key() -> Ed25519PrivateKey:
    """The local signing key, created (0600) on first use."""
    path = key_dir() / "coordinator.key"
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    (path.with_suffix(".pub")).write_text(base64.b64encode(_raw(key.public_key())).decode() + "\n")
    return key


def trusted_keys() -> set[bytes]:
    """Raw public keys trusted to sign models: the local coordinator's and trusted/*.pub."""
    keys = set()
    own = key_dir() / "coordinator.pub"
    files = [own] if own.is_file() else []
    trusted = key_dir() / "trusted"
    if trusted.is_dir():
        files += sorted(trusted.glob("*.pub"))
    for file in files:
        try:
            keys.add(base64.b64decode(file.read_text().strip(), validate=True))
        except ValueError:
            raise ConfigError(f"{file} is not a base64 Ed25519 public key") from None
    return keys


def _message(card: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in card.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign_card(card: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``card`` with a signature over everything else in it."""
    key = coordinator_key()
    signature = key.sign(_message(card))
    return {
        **card,
        "signature": {
            "algorithm": ALGORITHM,
            "public_key": base64.b64encode(_raw(key.public_key())).decode(),
            "value": base64.b64encode(signature).decode(),
        },
    }


def verify_card(card: dict[str, Any], where: str) -> None:
    """Raise ConfigError unless ``card`` carries a valid signature by a trusted key."""
    sig = card.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise ConfigError(
            f"{where}: model card is not signed; export it with fedmed, or pass "
            "--allow-unsigned to serve it anyway (not for clinical use)"
        )
    try:
        public_raw = base64.b64decode(sig["public_key"], validate=True)
        value = base64.b64decode(sig["value"], validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(value, _message(card))
    except (InvalidSignature, ValueError, KeyError):
        raise ConfigError(
            f"{where}: model card signature is invalid: the card or weights were changed "
            "after export; re-export the model from its run directory"
        ) from None
    if public_raw not in trusted_keys():
        raise ConfigError(
            f"{where}: signed by an untrusted key; add the signer's public key to "
            f"{key_dir() / 'trusted'}/<name>.pub if your consortium trusts it"
        )
