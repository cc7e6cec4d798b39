"""Encrypted models at rest: `bmc export --encrypt-key-file KEY` seals, `bmc serve --decrypt-key-file KEY`
opens in memory only. No torch here: serve decrypts on a box without it.

A sealed file holds a model and its external data files, encrypted and authenticated together:

    magic       8 bytes   89 42 4D 43 53 45 41 4C  ("\\x89BMCSEAL": not text, not protobuf, not ONNX)
    version     2 bytes   little-endian, 1
    header_len  4 bytes   little-endian, at most 1 MiB
    header      JSON, UTF-8: {"cipher": "AES-256-GCM", "key_id": 16 hex digits,
                              "files": [{"name": "model.onnx", "nonce": 24 hex digits, "bytes": N}, ...]}
    then, per file in header order: N bytes of AES-256-GCM ciphertext and its 16-byte tag

The first file is the ONNX model, the others its external data under the locations the model names.
Each file has its own random 96-bit nonce, and each file's associated data is everything before the
first ciphertext (magic, version, header), so a change to any name, size, nonce, order, or to any
byte of any file fails authentication, and nothing is decrypted. `key_id` (a hash of the key, not
the key) only tells a wrong key from a modified file in the error.

A key file is 64 hex digits (256 bits) on one line: `bmc export --new-encrypt-key PATH` makes one
with mode 0600, as `openssl rand -hex 32` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import tempfile
from pathlib import Path

from bmc.artifact import FILE_MODE
from bmc.errors import BmcError, UsageError

MAGIC = b"\x89BMCSEAL"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
PREFIX = struct.Struct("<8sHI")  # magic, version, header length
MAX_HEADER_BYTES = 1 << 20
MAX_FILES = 4096
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_MODE = 0o600
KEY_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
# cryptography's one-shot AESGCM takes at most 2**31 - 1 bytes; larger files are streamed.
ONE_SHOT_LIMIT_BYTES = 2**31 - 1 - TAG_BYTES
CHUNK_BYTES = 16 << 20


class SealedError(BmcError):
    """An encrypted model cannot be opened: wrong key, modified or truncated file, unknown format."""


def is_sealed(data: bytes | memoryview) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def is_sealed_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return is_sealed(handle.read(len(MAGIC)))
    except OSError:
        return False


def sealed_message(path: Path) -> str:
    return (
        f"{path}: encrypted by bmc export --encrypt-key-file; only bmc serve --decrypt-key-file KEY opens it "
        "(bench and info need the plaintext model)"
    )


def new_key(path: Path) -> Path:
    """Write a new random AES-256 key to path (mode 0600); refuses to overwrite a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    except FileExistsError:
        raise UsageError(f"{path} exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_key(path: Path) -> bytes:
    """The 32-byte key in a key file; UsageError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            text = handle.read(4096).decode("ascii", errors="replace").strip()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    if not KEY_PATTERN.match(text):
        raise UsageError(f"{path}: not an AES-256 key file (64 hex digits; make one with bmc export --new-encrypt-key PATH)")
    return bytes.fromhex(text)


def key_id(key: bytes) -> str:
    """16 hex digits that name a key without revealing it."""
    return hashlib.sha256(b"bmc-sealed-key-id\x00" + key).hexdigest()[:16]


def seal_files(target: Path, files: list[tuple[str, Path]], key: bytes) -> str:
    """Encrypt files (the ONNX model first, then its data files by location) into one sealed file at
    target, written atomically and streamed, so no file needs to fit in memory; returns its sha256."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    target = Path(target)
    entries = [{"name": name, "nonce": secrets.token_bytes(NONCE_BYTES).hex(), "bytes": Path(source).stat().st_size} for name, source in files]
    header = json.dumps({"cipher": CIPHER, "key_id": key_id(key), "files": entries}, separators=(",", ":")).encode()
    associated = PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    digest = hashlib.sha256()

    def write(out, data: bytes) -> None:
        out.write(data)
        digest.update(data)

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            write(out, associated)
            for entry, (_, source) in zip(entries, files):
                encryptor = Cipher(algorithms.AES(key), modes.GCM(bytes.fromhex(entry["nonce"]))).encryptor()
                encryptor.authenticate_additional_data(associated)
                done_bytes = 0
                with open(source, "rb") as plain:
                    while chunk := plain.read(CHUNK_BYTES):
                        write(out, encryptor.update(chunk))
                        done_bytes += len(chunk)
                if done_bytes != entry["bytes"]:
                    raise SealedError(f"{source} changed size while it was being encrypted")
                write(out, encryptor.finalize())
                write(out, encryptor.tag)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def unseal(path: Path, sealed: bytes, key: bytes):
    """The model and its data files decrypted into memory (a ModelBytes, data keyed by location);
    SealedError with one line for a wrong key, a modified or truncated file, or an unknown format."""
    from bmc.runtime.model_file import ModelBytes

    path = Path(path)
    view = memoryview(sealed)
    header, body_start = _read_header(path, view)
    if header["key_id"] != key_id(key):
        raise SealedError(
            f"{path}: encrypted with another key (key id {header['key_id']}); --decrypt-key-file is key id {key_id(key)}"
        )
    associated = bytes(view[:body_start])
    decrypted = []
    offset = body_start
    for entry in header["files"]:
        end = offset + entry["bytes"] + TAG_BYTES
        decrypted.append(_decrypt(path, key, bytes.fromhex(entry["nonce"]), view[offset:end], associated))
        offset = end
    model, *data = decrypted
    names = [entry["name"] for entry in header["files"]]
    return ModelBytes(path, model, dict(zip(names[1:], data)))


def _read_header(path: Path, view: memoryview) -> tuple[dict, int]:
    corrupt = f"{path}: not a readable bmc encrypted model"
    if len(view) < PREFIX.size or not is_sealed(view):
        raise SealedError(f"{path}: not a bmc encrypted model (no {MAGIC!r} magic)")
    _, version, header_bytes = PREFIX.unpack(view[: PREFIX.size])
    if version != FORMAT_VERSION:
        raise SealedError(f"{path}: encrypted model format version {version}; this bmc reads version {FORMAT_VERSION}")
    body_start = PREFIX.size + header_bytes
    if header_bytes > MAX_HEADER_BYTES or body_start > len(view):
        raise SealedError(f"{corrupt} (header of {header_bytes} bytes; truncated or corrupt)")
    try:
        header = json.loads(bytes(view[PREFIX.size : body_start]).decode("utf-8"))
        files = header["files"]
        valid = (
            header.get("cipher") == CIPHER
            and isinstance(header.get("key_id"), str)
            and isinstance(files, list)
            and 1 <= len(files) <= MAX_FILES
            and all(_valid_entry(entry) for entry in files)
            and len({entry["name"] for entry in files}) == len(files)
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise SealedError(f"{corrupt} (malformed header)")
    expected = body_start + sum(entry["bytes"] + TAG_BYTES for entry in files)
    if expected != len(view):
        raise SealedError(f"{corrupt} ({len(view)} bytes where its header says {expected}: truncated or extended)")
    return header, body_start


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and 0 < len(entry["name"]) <= 4096
        and isinstance(entry.get("nonce"), str)
        and re.fullmatch(r"[0-9a-f]{24}", entry["nonce"]) is not None
        and isinstance(entry.get("bytes"), int)
        and not isinstance(entry["bytes"], bool)
        and entry["bytes"] >= 0
    )


def _decrypt(path: Path, key: bytes, nonce: bytes, ciphertext: memoryview, associated: bytes) -> bytes | bytearray:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    refused = f"{path}: authentication failed; the file was modified or corrupted, refusing to decrypt it"
    if len(ciphertext) - TAG_BYTES <= ONE_SHOT_LIMIT_BYTES:
        # One call, one bytes object: an ONNX model (under protobuf's 2 GiB) goes to onnxruntime as is.
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            raise SealedError(refused) from None
    # Larger data files: decrypted in chunks into one buffer, used only once the tag has been checked.
    length = len(ciphertext) - TAG_BYTES
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, bytes(ciphertext[length:]))).decryptor()
    decryptor.authenticate_additional_data(associated)
    plain = bytearray(length)
    for start in range(0, length, CHUNK_BYTES):
        chunk = decryptor.update(ciphertext[start : min(start + CHUNK_BYTES, length)])
        plain[start : start + len(chunk)] = chunk
    try:
        decryptor.finalize()
    except InvalidTag:
        raise SealedError(refused) from None
    return plain
