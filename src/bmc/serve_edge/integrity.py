"""What is verified is what is served: every file of a model read once into memory, checked there,
and the session built from those bytes, never from the path again.

A model's files are its ONNX file and any external data files; MODEL.onnx.sha256 (bmc.manifest)
lists each one's sha256, and `--sha256` pins the model's digest (the manifest's, for a model with
data files). With `--public-key`, the signature covers the same digest; with `--decrypt-key-file`,
the file is a sealed one (bmc.sealed) and is decrypted in memory. Then bmc's ONNX checks run on
the bytes held. A file replaced, negated, truncated or swapped on disk after the read changes nothing
that runs, and onnxruntime never maps a file that could shrink under it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bmc.manifest import IntegrityError, Manifest, manifest_path, read_manifest
from bmc.runtime.model_file import ModelBytes, TensorInfo, data_file_path, open_model_bytes

__all__ = ["IntegrityError", "VerifiedModel", "read_verified_model", "verify_model_file"]


@dataclass(frozen=True)
class VerifiedModel:
    """A model read into memory, verified and checked: sessions are built from `held`."""

    path: Path
    digest: str  # the model's digest: its file's sha256, or its manifest's with data files
    manifest: Manifest
    held: ModelBytes  # external data keyed by location exactly as the model names it
    metadata_props: dict[str, str]
    encrypted: bool = False
    # The graph's inputs and outputs as the file declares them: what serve checks before it listens.
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()


def read_verified_model(
    path: Path, given_sha256: str | None = None, public_key: Path | None = None, decrypt_key: bytes | None = None
) -> VerifiedModel:
    """Read every file of the model once, verify the bytes read, decrypt them if sealed, and check the
    ONNX model they make; a one-line BmcError naming the file when any of it fails."""
    from bmc.sealed import is_sealed, unseal

    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: {'a directory, not a model file' if path.is_dir() else 'no such file'}")
    manifest, source = _expected_manifest(path, given_sha256)
    raw = _read(path)
    _check_digest(path, raw, manifest.model_sha256, source)
    files = {}
    for location, expected in manifest.data:
        data_path = data_file_path(path, location)
        data = _read(data_path)
        _check_digest(data_path, data, expected, source)
        files[location] = data
    if public_key is not None:
        from bmc.signing import verify_manifest_signature

        verify_manifest_signature(path, manifest, public_key)
    sealed = is_sealed(raw)
    if sealed:
        if decrypt_key is None:
            raise IntegrityError(f"{path}: encrypted (bmc export --encrypt-key-file); give bmc serve --decrypt-key-file KEY")
        if files:
            raise IntegrityError(f"{path}: an encrypted model holds its data itself; {manifest_path(path).name} must list it alone")
        held = unseal(path, raw, decrypt_key)
    elif decrypt_key is not None:
        # A plaintext file where an encrypted one is expected: someone swapped it, or forgot to encrypt.
        raise IntegrityError(f"{path}: not encrypted, but --decrypt-key-file was given; refusing to serve a plaintext model")
    else:
        held = ModelBytes(path, raw, files)
    del raw  # a sealed file's ciphertext is not needed once decrypted
    # The parsed copy the checks ran on is dropped here: for a one-file model it is as large as the model.
    checked = open_model_bytes(held)
    return VerifiedModel(
        path, manifest.digest, manifest, checked.held, checked.metadata_props, sealed, checked.inputs, checked.outputs
    )


def verify_model_file(model_path: Path, given: str | None = None) -> str:
    """The model's digest when all its files match what is expected; IntegrityError naming the file otherwise."""
    return read_verified_model(model_path, given).digest


def _expected_manifest(path: Path, given: str | None) -> tuple[Manifest, str]:
    """(the manifest to check against, where it came from): --sha256 pins the model's digest, which is
    the model file's own sha256 or, for a model with data files, its manifest's; else the sidecar."""
    sidecar = manifest_path(path)
    if given:
        if sidecar.is_file():
            try:
                listed = read_manifest(path)
            except IntegrityError:
                listed = None
            if listed is not None and listed.digest == given:
                return listed, f"{sidecar.name} (pinned by --sha256)"
        return Manifest.of(path.name, given), "--sha256"
    return read_manifest(path), str(sidecar)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _check_digest(path: Path, data: bytes, expected: str, source: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise IntegrityError(
            f"{path}: sha256 {actual[:16]}... does not match {source} ({expected[:16]}...); "
            "the file was modified or corrupted, refusing to serve it"
        )
