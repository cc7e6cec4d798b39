"""Ed25519 signatures for model files: `bmc sign` makes them, `bmc serve --public-key` checks them.

A sha256 sidecar catches a corrupted or swapped file only if the sidecar itself is trusted; a
signature by a key the server was given catches a file replaced together with its sidecar. The
signed message is the model's digest (bmc.manifest) with a fixed prefix: the file's sha256 for a
one-file model, as signatures always were, and its manifest's, under another prefix, for a model
with external data, so every file it consists of is signed and a large model is read once.
Uses the `cryptography` package (part of every bmc install); no torch.
"""

from __future__ import annotations

import base64
from pathlib import Path

from bmc.artifact import atomic_write_bytes
from bmc.errors import BmcError, UsageError
from bmc.manifest import Manifest, manifest_of_files, manifest_path, read_manifest, write_manifest

SIGNED_PREFIX = b"bmc-model-sha256:"
# A different prefix for manifests: a signed file digest can never be replayed as a manifest's.
SIGNED_MANIFEST_PREFIX = b"bmc-model-manifest-sha256:"
PRIVATE_KEY_MODE = 0o600


class SignatureError(BmcError):
    """A model's signature is missing, malformed or not made by the given key."""


def signature_path(model_path: Path) -> Path:
    return Path(model_path).with_name(Path(model_path).name + ".sig")


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError("signatures need the cryptography package: pip install cryptography") from None
    return serialization, ed25519, InvalidSignature


def new_key_pair(private_path: Path) -> Path:
    """Write a new Ed25519 private key (mode 0600) and its public key beside it (PRIVATE.pub); returns the public path."""
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(private_path, private_pem, mode=PRIVATE_KEY_MODE)
    atomic_write_bytes(public_path, public_pem)
    return public_path


def _load_key(path: Path, private: bool):
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not a PEM {'private' if private else 'public'} key ({exc})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise UsageError(f"{path}: not an Ed25519 key")
    return key


def signed_message(manifest: Manifest) -> bytes:
    """What a signature signs: the model's digest under the prefix of its kind."""
    prefix = SIGNED_MANIFEST_PREFIX if manifest.data else SIGNED_PREFIX
    return prefix + bytes.fromhex(manifest.digest)


def sign_model(model_path: Path, private_key_path: Path) -> Path:
    """Sign every file of the model (its manifest); writes MODEL.onnx.sig (base64, one line) and returns its path.

    The manifest is made from the files as they are; a sidecar MODEL.onnx.sha256 that says otherwise
    is refused rather than signed over, and a missing one is written, since serve needs it to check
    the data files.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UsageError(f"{model_path}: no such file")
    key = _load_key(private_key_path, private=True)
    manifest = manifest_of_files(model_path)
    sidecar = manifest_path(model_path)
    if sidecar.is_file():
        if read_manifest(model_path) != manifest:
            raise SignatureError(
                f"{sidecar}: does not match the model's files as they are now; refusing to sign "
                "(export again, or delete the sidecar to sign the files as they are)"
            )
    else:
        write_manifest(model_path, manifest)
    path = signature_path(model_path)
    atomic_write_bytes(path, base64.b64encode(key.sign(signed_message(manifest))) + b"\n")
    return path


def verify_manifest_signature(model_path: Path, manifest: Manifest, public_key_path: Path) -> None:
    """SignatureError naming the file unless MODEL.onnx.sig is the public key's signature of this
    manifest, whose files the caller has checked against the bytes it holds."""
    _, _, invalid = _crypto()
    model_path = Path(model_path)
    key = _load_key(public_key_path, private=False)
    path = signature_path(model_path)
    if not path.is_file():
        raise SignatureError(f"{model_path}: no signature {path.name}; refusing to serve an unsigned model (bmc sign)")
    try:
        signature = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (ValueError, OSError):
        raise SignatureError(f"{path}: not a bmc signature (base64 of 64 bytes)") from None
    try:
        key.verify(signature, signed_message(manifest))
    except invalid:
        covered = "this file" if not manifest.data else f"this file and its {len(manifest.data)} data file(s)"
        raise SignatureError(
            f"{model_path}: the signature does not match {covered} and {Path(public_key_path).name}; "
            "the file was modified or signed by another key, refusing to serve it"
        ) from None


def verify_model_signature(model_path: Path, public_key_path: Path) -> None:
    """SignatureError naming the file unless MODEL.onnx.sig signs the model's files as they are now."""
    verify_manifest_signature(model_path, manifest_of_files(model_path), public_key_path)
