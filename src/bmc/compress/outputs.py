"""The output folder: a compress run writes into a staging folder beside it, which replaces it whole
only when the run finishes. A failed or killed run leaves the previous results as they were.

    runs/x/compressed/                 the last finished run's results
    runs/x/.compressed.staging-PID/    the run in progress (deleted when it fails)
    runs/x/.compressed.previous-PID/   the results it replaced, for the moment of the swap

A staging or previous folder whose process is gone was left by a kill: the next run deletes it,
or puts the previous results back where the kill fell between the two renames of the swap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from bmc.errors import UsageError

STAGING, PREVIOUS = "staging", "previous"


class Staging:
    """`with Staging(out_dir) as staging:` write into staging.path, then staging.commit()."""

    def __init__(self, out_dir: Path, report_name: str, sources: tuple[Path, ...] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.report_name = report_name
        self.sources = sources
        self.path = self._sibling(STAGING, os.getpid())
        self.committed = False

    def __enter__(self) -> Staging:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._recover_from_kills()
        self._check_out_dir()
        self.path.mkdir()
        return self

    def commit(self) -> None:
        """Put the finished run's folder where the results go, and delete the results it replaces."""
        previous = self._sibling(PREVIOUS, os.getpid())
        if self.out_dir.exists():
            self.out_dir.rename(previous)
        self.path.rename(self.out_dir)
        self.committed = True
        shutil.rmtree(previous, ignore_errors=True)

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def _sibling(self, kind: str, pid: int) -> Path:
        return self.out_dir.with_name(f".{self.out_dir.name}.{kind}-{pid}")

    def _recover_from_kills(self) -> None:
        for kind in (PREVIOUS, STAGING):
            for leftover in sorted(self.out_dir.parent.glob(f".{self.out_dir.name}.{kind}-*")):
                pid = leftover.name.rsplit("-", 1)[1]
                if pid.isdigit() and _alive(int(pid)):
                    continue  # another compress into the same folder is still running
                if kind == PREVIOUS and not self.out_dir.exists():
                    leftover.rename(self.out_dir)  # killed between the swap's two renames
                else:
                    shutil.rmtree(leftover, ignore_errors=True)

    def _check_out_dir(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"{self.out_dir} is a file; compress writes a folder there")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not (self.out_dir / self.report_name).is_file():
            raise UsageError(f"{self.out_dir} holds files that no compress run wrote; choose a new or empty folder (--out)")
        inside = [s for s in self.sources if _within(Path(s), self.out_dir)]
        if inside:
            raise UsageError(f"{inside[0]} lies in the output folder {self.out_dir}, which a finished run replaces whole; choose another --out")


def relocated(value, old: Path, new: Path):
    """value with every path under `old` (and every mention of it in text) moved under `new`:
    dataclasses, lists, tuples and dicts are rebuilt, anything else returned as it is."""
    if isinstance(value, Path):
        return new / value.resolve().relative_to(old.resolve()) if _within(value, old) else value
    if isinstance(value, str):
        return value.replace(str(old), str(new))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: relocated(getattr(value, f.name), old, new) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {key: relocated(item, old, new) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocated(item, old, new) for item in value)
    return value


def relocate_runs(staging: Path, out_dir: Path) -> None:
    """The runs a stage trained in `staging` record where they will live once it is swapped in."""
    from bmc.artifact import RUN_META, atomic_write_json

    for meta_path in sorted(staging.glob(f"*/{RUN_META}")):
        meta = json.loads(meta_path.read_text())
        if meta.get("config", {}).get("out"):
            meta["config"]["out"] = relocated(meta["config"]["out"], staging, out_dir)
            atomic_write_json(meta_path, meta)


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # this process starts afresh: what it left behind is a leftover
