"""The sha256 manifest of a model: MODEL.onnx.sha256 names every file the model consists of.

    <64 hex digits>  model.onnx
    <64 hex digits>  model.onnx.data

One `sha256sum` line per file, so `sha256sum -c model.onnx.sha256` checks it from the model's folder:
the model file itself first, then each external data file under the location the model names it by,
sorted. A model without external data has a one-line manifest: the sidecar bmc always wrote.

The model's digest (what `bmc serve --sha256` takes, what `bmc sign` signs, what export prints) is
the file's own sha256 for a one-file model, as before, and the sha256 of the manifest's canonical
text when the model has external data, so one digest still pins every byte. No torch here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from bmc.artifact import atomic_write_bytes, sha256_file
from bmc.errors import BmcError

SUFFIX = ".sha256"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# `sha256sum` writes "HASH  NAME" (text mode) or "HASH *NAME" (binary mode).
LINE_PATTERN = re.compile(r"^([0-9A-Fa-f]{64}) [ *](.+)$")
# A manifest lists a model and its data files: a few lines. Anything much larger is not one.
MAX_MANIFEST_BYTES = 1 << 20


class IntegrityError(BmcError):
    """A model's files do not match the sha256 they should have, or have none to check against."""


@dataclass(frozen=True)
class Manifest:
    """(name, sha256) of a model's files: the model file first, then its data files sorted by name."""

    entries: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise IntegrityError("a manifest lists at least the model file")
        model, *data = self.entries
        object.__setattr__(self, "entries", (model, *sorted(data)))
        names = [name for name, _ in self.entries]
        if len(set(names)) != len(names):
            raise IntegrityError(f"a manifest lists {_first_duplicate(names)!r} twice")
        for name, digest in self.entries:
            if not SHA256_PATTERN.match(digest):
                raise IntegrityError(f"{name!r}: {digest!r} is not a sha256 (64 lowercase hex digits)")

    @classmethod
    def of(cls, model_name: str, model_sha256: str, data_sha256: dict[str, str] | None = None) -> "Manifest":
        return cls(((model_name, model_sha256), *sorted((data_sha256 or {}).items())))

    @property
    def model_name(self) -> str:
        return self.entries[0][0]

    @property
    def model_sha256(self) -> str:
        return self.entries[0][1]

    @property
    def data(self) -> tuple[tuple[str, str], ...]:
        """(location, sha256) of each external data file."""
        return self.entries[1:]

    @property
    def text(self) -> str:
        return "".join(f"{digest}  {name}\n" for name, digest in self.entries)

    @property
    def digest(self) -> str:
        """The model's digest: the model file's sha256 alone, or the manifest's when it has data files."""
        return self.model_sha256 if not self.data else hashlib.sha256(self.text.encode()).hexdigest()


def manifest_path(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + SUFFIX)


def parse_manifest(text: str, model_name: str, source: str) -> Manifest:
    """The manifest in `text` for the model file `model_name`; IntegrityError naming `source` otherwise."""
    expected = f"expected '<64 hex digits>  {model_name}' and one such line per data file"
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = LINE_PATTERN.match(line.rstrip("\r"))
        if match is None:
            raise IntegrityError(f"{source}: line {number} is not a sha256 line ({expected})")
        digest, name = match.group(1).lower(), match.group(2)
        name = name[2:] if name.startswith("./") else name  # `sha256sum ./model.onnx` names it so
        if name in entries:
            raise IntegrityError(f"{source}: {name!r} is listed twice")
        entries[name] = digest
    if not entries:
        raise IntegrityError(f"{source}: empty; not a sha256 manifest ({expected})")
    if model_name not in entries:
        # Only the first field was read once: a sidecar naming another file was taken for this one's.
        named = ", ".join(repr(name) for name in list(entries)[:3])
        raise IntegrityError(f"{source}: names {named}, not {model_name!r}; refusing a manifest made for another file")
    model_sha256 = entries.pop(model_name)
    return Manifest.of(model_name, model_sha256, entries)


def read_manifest(model_path: Path) -> Manifest:
    """MODEL.onnx.sha256 of a model file, parsed; IntegrityError naming the sidecar when it is missing or malformed."""
    model_path = Path(model_path)
    path = manifest_path(model_path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise IntegrityError(f"{model_path}: no sidecar {path.name} and no --sha256; refusing to serve an unverified model") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{path}: over {MAX_MANIFEST_BYTES} bytes; not a sha256 manifest")
    return parse_manifest(raw.decode("utf-8", errors="replace"), model_path.name, str(path))


def write_manifest(model_path: Path, manifest: Manifest) -> Path:
    """Write MODEL.onnx.sha256 atomically; returns its path."""
    path = manifest_path(model_path)
    atomic_write_bytes(path, manifest.text.encode())
    return path


def manifest_of_files(model_path: Path) -> Manifest:
    """The manifest of a model as its files are now: the model file and every data file it references.

    The references are found by `open_model`, which refuses any that would leave the model's folder.
    """
    from bmc.runtime.model_file import open_model
    from bmc.sealed import is_sealed_file

    model_path = Path(model_path)
    if is_sealed_file(model_path):  # one file holds the model and its data, encrypted together
        return Manifest.of(model_path.name, sha256_file(model_path))
    opened = open_model(model_path)
    data = {_location(model_path, path): sha256_file(path) for path in opened.data_files}
    return Manifest.of(model_path.name, sha256_file(model_path), data)


def _location(model_path: Path, data_path: Path) -> str:
    return data_path.relative_to(model_path.parent).as_posix()


def _first_duplicate(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""
