"""A model file's sha256 against --sha256 or its sidecar, checked before onnxruntime ever reads it."""

from __future__ import annotations

from pathlib import Path

from bmc.artifact import sha256_file
from bmc.errors import BmcError
from bmc.serve_edge import SHA256_PATTERN


class IntegrityError(BmcError):
    """A model file does not match the sha256 it should have, or has none to check against."""


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".sha256")


def expected_sha256(model_path: Path, given: str | None) -> tuple[str, str]:
    """(hex digest, where it came from): the one given, else the sidecar's first field."""
    if not model_path.is_file():
        raise IntegrityError(f"{model_path}: {'a directory, not a model file' if model_path.is_dir() else 'no such file'}")
    if given:
        return given, "--sha256"
    sidecar = sidecar_path(model_path)
    if not sidecar.is_file():
        raise IntegrityError(
            f"{model_path}: no sidecar {sidecar.name} and no --sha256; refusing to serve an unverified model"
        )
    try:
        fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    except OSError as exc:
        raise IntegrityError(f"{sidecar}: cannot read it ({exc.strerror or exc})") from None
    digest = fields[0].lower() if fields else ""
    if not SHA256_PATTERN.match(digest):
        raise IntegrityError(f"{sidecar}: not a sha256 sidecar (expected '<64 hex digits>  {model_path.name}')")
    return digest, str(sidecar)


def verify_model_file(model_path: Path, given: str | None = None) -> str:
    """The file's sha256 when it matches what is expected; IntegrityError naming the file otherwise."""
    model_path = Path(model_path)
    expected, source = expected_sha256(model_path, given)
    if not model_path.is_file():
        raise IntegrityError(f"{model_path}: no such file")
    actual = sha256_file(model_path)
    if actual != expected:
        raise IntegrityError(
            f"{model_path}: sha256 {actual[:16]}... does not match {source} ({expected[:16]}...); "
            "the file was modified or corrupted, refusing to serve it"
        )
    return actual
