"""Where an export is written: a staging folder beside the target, then the verified files moved (or
sealed) into place, then the manifest of every file. No torch here.

The staging folder (`.bmc-export-*`) is private (0700) and removed when the export ends, however it
ends; one left by a killed export is removed by the next export into the same folder, which holds
a lock on that folder while it works, so it never takes a running export's folder for a stale one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bmc.artifact import sha256_file
from bmc.manifest import Manifest, write_manifest

STAGING_PREFIX = ".bmc-export-"

log = logging.getLogger("bmc.export")


@contextmanager
def staging_folder(parent: Path) -> Iterator[Path]:
    """A fresh private folder in parent for an export's files, removed on the way out; stale ones of
    killed exports into parent are removed first."""
    parent = Path(parent)
    with _folder_lock(parent) as locked:
        if locked:
            for stale in sorted(parent.glob(f"{STAGING_PREFIX}*")):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                    log.info("removed %s, left by an export that was interrupted", stale)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _folder_lock(parent: Path) -> Iterator[bool]:
    """An exclusive flock on the folder itself while an export writes into it (True), or False where
    the file system has no flock (then nothing is cleaned up, rather than risk another's files).

    The kernel drops the lock when its process dies, even by SIGKILL: a folder whose lock can be
    taken has no export running in it.
    """
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        fd = None
    if fd is None:
        yield False
        return
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another bmc export writing into %s", parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def publish(staged: Path, target: Path, encrypt_key: bytes | None = None) -> Manifest:
    """Move a verified staged model (and the data files beside it) to target, or seal them all into
    target when encrypt_key is given; then write target's manifest. Returns the manifest."""
    staged, target = Path(staged), Path(target)
    data_names = sorted(p.name for p in staged.parent.iterdir() if p.name != staged.name)
    if encrypt_key is not None:
        from bmc.sealed import seal_files

        files = [(target.name, staged), *((name, staged.parent / name) for name in data_names)]
        manifest = Manifest.of(target.name, seal_files(target, files, encrypt_key))
        written: set[str] = set()
    else:
        manifest = Manifest.of(target.name, sha256_file(staged), {name: sha256_file(staged.parent / name) for name in data_names})
        # Data files first, the model file last: a reader never sees a model without its weights.
        for name in data_names:
            os.replace(staged.parent / name, target.parent / name)
        os.replace(staged, target)
        written = set(data_names)
    # An earlier export under the same name may have left weights beside it (plaintext ones, next to an
    # encrypted model): they are no part of this model any more.
    companion = target.with_name(f"{target.name}.data")
    if companion.name not in written and companion.is_file():
        companion.unlink()
    write_manifest(target, manifest)
    return manifest
