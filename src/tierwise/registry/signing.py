"""Ed25519 signatures over registry manifests (`cryptography`).

A manifest is signed over its canonical JSON (sorted keys, no spaces), so the signature does
not depend on how a server happens to serialise it. A verifier trusts exactly the public keys
it was configured with: a manifest signed by any other key, or not signed, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
TOKEN_FILE = "token"


class VerificationError(Exception):
    """An artifact that must not be loaded; the message says which check failed."""


def canonical_json(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(keys_dir: Path, overwrite: bool = False) -> tuple[Path, Path, Path]:
    """A new signing key pair under `keys_dir`, and an operator API token if there is none:
    (private key, public key, token). `overwrite` replaces the key pair only, never the
    token (`rotate_token` does that). Both are readable by their owner only."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = keys_dir / PRIVATE_KEY_FILE, keys_dir / PUBLIC_KEY_FILE
    token_path = keys_dir / TOKEN_FILE
    if private_path.exists() and not overwrite:
        raise FileExistsError(f"{private_path} exists; pass --force to replace it (every "
                              "subscriber must then be given the new public key)")
    private = Ed25519PrivateKey.generate()
    write_private(private_path, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if not token_path.exists():  # a new signing key leaves the credentials alone
        write_private(token_path, secrets.token_urlsafe(32).encode())
    return private_path, public_path, token_path


def rotate_token(keys_dir: Path) -> Path:
    """A new operator API token under `keys_dir`, the signing key untouched (a leaked
    token is not a leaked key). Per-device tokens: `tierwise devices rotate`."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    token_path = keys_dir / TOKEN_FILE
    write_private(token_path, secrets.token_urlsafe(32).encode())
    return token_path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by its owner only (0600, also over a looser file)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # also when the file existed with looser permissions
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no signing key; run `tierwise registry keygen`") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no public key to verify manifests with (registry."
                                "public_key; `tierwise registry keygen` writes one)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign(manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature block that travels with `manifest`."""
    signature = private_key.sign(canonical_json(manifest))
    return {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
            "signature": base64.b64encode(signature).decode()}


def verify(manifest: dict[str, Any], signature: dict[str, str] | None,
           trusted: Ed25519PublicKey, what: str | None = None) -> None:
    """Raise VerificationError unless `signature` is `trusted`'s signature of `manifest`
    (any signed document; `what` names it in errors, default the manifest's model)."""
    if not isinstance(manifest, dict):
        raise VerificationError(f"the manifest is a {type(manifest).__name__}, not an object")
    what = what or f"manifest {manifest.get('model')!r} version {manifest.get('version')!r}"
    if signature is not None and not isinstance(signature, dict):
        raise VerificationError(f"{what}: the signature block is a {type(signature).__name__}, "
                                "not an object")
    if not signature or not signature.get("signature"):
        raise VerificationError(f"{what}: unsigned (no signature)")
    if signature.get("algorithm") != "ed25519":
        raise VerificationError(f"{what}: signature algorithm {signature.get('algorithm')!r}, "
                                "expected 'ed25519'")
    expected_id = key_id(trusted)
    if signature.get("key_id") != expected_id:
        raise VerificationError(f"{what}: signed by key {signature.get('key_id')!r}, not by the "
                                f"trusted key {expected_id!r}")
    try:
        raw = base64.b64decode(signature["signature"], validate=True)
        trusted.verify(raw, canonical_json(manifest))
    except (InvalidSignature, ValueError, TypeError):
        raise VerificationError(f"{what}: the signature does not verify with key "
                                f"{expected_id!r} (the manifest was altered, or signed by "
                                "another key)") from None
