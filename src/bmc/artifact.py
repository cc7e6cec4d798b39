"""The run directory: bmc.json, weights, atomic writes, sha256 and runs/latest.

A run directory holds
  model.safetensors       the weights (never pickle, so loading runs no code)
  train_state.safetensors optimizer state, for --resume
  bmc.json                how the run was made and what it measured; written last, so it is the
                          commit point of a checkpoint

This module imports no torch at module level: bench and serve use its file helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bmc.errors import CheckpointError
from bmc.meta_schema import SchemaError, validate_meta

RUN_META = "bmc.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.safetensors"
RUNS_ROOT = Path("runs")
LATEST = "latest"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# mkstemp creates 0600 files; written artifacts get the permissions a plain open() would give.
FILE_MODE = 0o666 & ~_umask()
META_FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write data to path so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write obj as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so multi-GB weights fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_sidecar_sha256(path: Path, digest: str | None = None) -> Path:
    """Write PATH.sha256 in `sha256sum` format next to a model file; returns the sidecar's path."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    atomic_write_bytes(sidecar, f"{digest or sha256_file(path)}  {path.name}\n".encode())
    return sidecar


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Save a dict of tensors as safetensors atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # safetensors refuses shared or non-contiguous storage; weights are saved as plain copies.
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict:
    """Load a safetensors file (no unpickling), checking its sha256 when one is expected."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"{path}: sha256 does not match the one recorded in {RUN_META} (corrupt or replaced)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_meta(run_dir: Path) -> dict:
    """Read and check RUN_DIR/bmc.json."""
    path = Path(run_dir) / RUN_META
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {RUN_META}; not a bmc run directory")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{path}: not a bmc run description (no format_version)")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: field format_version: must be a positive integer; got {version!r}")
    if version > META_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this bmc understands "
            f"({META_FORMAT_VERSION}); upgrade bmc"
        )
    # Every command reads these; one wrong is a broken or hand-edited file, said here with the field
    # rather than as a TypeError deep in a stage, or as a weights file read from outside the run.
    try:
        validate_meta(meta)
    except SchemaError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return meta


def run_file_path(run_dir: Path, name: str) -> Path:
    """RUN_DIR/name, refused unless it is a regular file that resolves inside the run directory (no symlink out)."""
    run_dir = Path(run_dir)
    path = run_dir / name
    label = f"{run_dir / RUN_META}: field weights.file"
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise CheckpointError(f"{label}: {name!r} resolves outside the run directory ({path.resolve()})")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return path


def resolve_run_dir(run_dir: Path | None) -> Path:
    """RUN_DIR as given, or what runs/latest points at."""
    if run_dir is None:
        latest = RUNS_ROOT / LATEST
        if not latest.exists():
            raise CheckpointError(f"no run given and {latest} does not exist; run `bmc train` first")
        return latest.resolve()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    return run_dir


def point_latest_at(run_dir: Path) -> None:
    """Make RUNS_ROOT/latest a symlink to run_dir, replacing the old link atomically."""
    run_dir = Path(run_dir).resolve()
    root = run_dir.parent
    if root.resolve() != RUNS_ROOT.resolve():
        # Runs written elsewhere (--out /some/dir) still become the newest run.
        root = RUNS_ROOT
    root.mkdir(parents=True, exist_ok=True)
    link = root / LATEST
    target = os.path.relpath(run_dir, root.resolve())
    tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def new_run_dir(dataset: str, model: str, root: Path = RUNS_ROOT) -> Path:
    """A fresh, unique directory name under root: DATASET-MODEL-N."""
    stem = f"{dataset}-{model}".replace(":", "-").replace("/", "-")
    root.mkdir(parents=True, exist_ok=True)
    index = 1
    while True:
        candidate = root / f"{stem}-{index}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            index += 1
