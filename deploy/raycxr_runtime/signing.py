"""Keyed model signatures: Ed25519 over a manifest of a model file's digests.

The digests ``raycxr export`` embeds in an ONNX file (``raycxr.weights_sha256``,
``raycxr.metadata_sha256``) catch a corrupted copy, but they are unkeyed: whoever edits the weights
can recompute them and the file still loads as "verified". A signature closes that: the publisher
(the hospital's AI team, or whoever exports the model) holds an Ed25519 private key and writes a
*detached* signature next to each model file, ``<model>.sig``; the runtime holds only the public
key (``--trusted-key``) and, with ``--require-signature``, refuses a file that is unsigned, signed
by another key, or changed after signing.

``<model>.sig`` is JSON: the manifest (format, file sha256, graph digest, raycxr.* metadata digest,
model version, kind, key id) and ``signature``, the base64 Ed25519 signature of the manifest's
canonical JSON (sorted keys, no spaces). The runtime recomputes every digest from the bytes it
loads, so the manifest cannot vouch for other bytes. The file name is not signed: a renamed or
copied file (a MONAI bundle's ``models/model.onnx``) keeps its signature.

Needs ``cryptography`` (``pip install 'raycxr-runtime[sign]'``), imported only when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import contract

__all__ = ["SIGNATURE_SUFFIX", "SignatureError", "TrustedKey", "generate_key", "load_private_key",
           "load_trusted_keys", "manifest", "sign_file", "signature_path", "verify_signature"]

FORMAT = "raycxr-signature-v1"
SIGNATURE_SUFFIX = ".sig"
_INSTALL = "model signatures need the cryptography package: pip install 'raycxr-runtime[sign]'"


class SignatureError(Exception):
    """A key or signature that cannot be used; ``str()`` is one line naming the file and the problem."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key the runtime trusts.

    Args:
        key_id: the first 16 hex digits of sha256 of the raw 32-byte public key.
        path: the PEM file it came from (for messages).
        key: the ``Ed25519PublicKey``.
    """

    key_id: str
    path: str
    key: Any


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError(_INSTALL) from None
    return serialization, ed25519


def key_id(public_key: Any) -> str:
    """The short id of an Ed25519 public key: sha256 of its 32 raw bytes, 16 hex digits."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_path(model: str | os.PathLike[str]) -> Path:
    """``<model>.sig``: where a model file's detached signature lives."""
    p = Path(model)
    return p.with_name(p.name + SIGNATURE_SUFFIX)


def manifest(data: bytes) -> dict[str, str]:
    """The signed facts about a serialized model: sha256 of the whole file, the graph digest and the
    ``raycxr.*`` metadata digest (recomputed, never read from the file), model version and kind.

    Raises ``ValueError`` when the bytes are not a well-formed ONNX protobuf."""
    raw = contract.read_metadata_props(data)
    meta = contract.strip_prefix(raw)
    return {"format": FORMAT, "file_sha256": hashlib.sha256(data).hexdigest(),
            contract.WEIGHTS_DIGEST: contract.graph_digest(data),
            contract.METADATA_DIGEST: contract.metadata_digest(raw),
            "model_version": str(meta.get("model_version", "")), "kind": str(meta.get("kind", ""))}


def _canonical(fields: dict[str, str]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# ------------------------------------------------------------------------------------------------ keys


def generate_key(private_out: str | os.PathLike[str],
                 public_out: str | os.PathLike[str] | None = None) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600, unencrypted: keep it offline) and its
    public key (SubjectPublicKeyInfo PEM, for ``--trusted-key``). Refuses to overwrite either file.

    Returns ``(private path, public path, key id)``."""
    serialization, ed25519 = _crypto()
    priv_path = Path(private_out)
    pub_path = Path(public_out) if public_out else priv_path.with_name(priv_path.stem + ".pub.pem")
    for p in (priv_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(key.public_key())


def _read_pem(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the key ({exc.strerror or exc})") from None


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> Any:
    """An Ed25519 private key from a PEM file (``raycxr-infer keygen`` writes one)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_pem(path), password=password)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a usable PEM private key ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:120]})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: is a {type(key).__name__.lstrip('_')}, an Ed25519 private key is needed")
    return key


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> list[TrustedKey]:
    """Ed25519 public keys from PEM files (a private key file is refused: hand the runtime the public one)."""
    out = []
    for path in paths:
        serialization, ed25519 = _crypto()
        data = _read_pem(path)
        if b"PRIVATE KEY" in data:
            raise SignatureError(f"{path}: is a private key; give the runtime the public key (.pub.pem) only")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"{path}: not a usable PEM public key ({type(exc).__name__})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"{path}: is a {type(key).__name__.lstrip('_')}, an Ed25519 public key is needed")
        out.append(TrustedKey(key_id(key), str(path), key))
    return out


# ------------------------------------------------------------------------------------------- sign, verify


def sign_file(model: str | os.PathLike[str], private_key: Any) -> Path:
    """Write ``<model>.sig`` for the model file as it is now; returns its path."""
    path = Path(model)
    try:
        data = path.read_bytes()
        fields = manifest(data)
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise SignatureError(f"{path}: not an ONNX model ({exc})") from None
    fields["key_id"] = key_id(private_key.public_key())
    signature = base64.b64encode(private_key.sign(_canonical(fields))).decode("ascii")
    out = signature_path(path)
    out.write_text(json.dumps({**fields, "signature": signature}, indent=2, sort_keys=True) + "\n")
    return out


def verify_signature(model: str | os.PathLike[str], data: bytes, keys: Sequence[TrustedKey]) -> dict[str, str] | None:
    """Check ``<model>.sig`` against the model's bytes ``data`` and the trusted ``keys``.

    Returns ``None`` when there is no signature file, the signed manifest (with the key id and the
    trusted key's file) when it verifies; raises :class:`SignatureError` (one line, no key material)
    when the signature is malformed, made by a key not in ``keys``, wrong, or for other bytes."""
    sig_path = signature_path(model)
    if not sig_path.is_file():
        return None
    try:
        doc = json.loads(sig_path.read_text(encoding="utf-8"))
        signature = base64.b64decode(doc.pop("signature"), validate=True)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        claimed = str(doc["key_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"{sig_path.name}: malformed signature file ({type(exc).__name__})") from None
    key = next((k for k in keys if k.key_id == claimed), None)
    if key is None:
        raise SignatureError(f"{sig_path.name}: signed by key {claimed}, which is not a trusted key "
                             f"(trusted: {', '.join(k.key_id for k in keys) or 'none'})")
    from cryptography.exceptions import InvalidSignature

    try:
        key.key.verify(signature, _canonical(doc))
    except InvalidSignature:
        raise SignatureError(f"{sig_path.name}: the signature does not verify with key {claimed} "
                             "(the signature file was edited)") from None
    actual = manifest(data)
    changed = [k for k in (contract.WEIGHTS_DIGEST, contract.METADATA_DIGEST, "file_sha256") if doc.get(k) != actual[k]]
    if changed:
        what = {contract.WEIGHTS_DIGEST: "the weights/graph", contract.METADATA_DIGEST: "the raycxr.* metadata",
                "file_sha256": "the file's bytes"}[changed[0]]
        raise SignatureError(f"{sig_path.name}: {what} changed after signing (signed model_version "
                             f"{doc.get('model_version', '?')}); not the file key {claimed} signed")
    return {**doc, "trusted_key": key.path}
