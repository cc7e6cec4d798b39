"""Shared fixtures: a scratch working directory per test and a small real slice of the shared CIFAR-10."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Real CIFAR-10 JPEGs (train/<class>/*.jpg, test/<class>/*.jpg) are not in the repository: the project
# machines keep them next to it; BMC_TEST_CIFAR names the archive anywhere else.
SHARED_CIFAR = Path(os.environ.get("BMC_TEST_CIFAR") or PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory, so runs/ and runs/latest of one test never leak into another."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BMC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg: 30 train and 10 test images per class."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(
            f"no CIFAR-10 JPEG archive at {SHARED_CIFAR} (set BMC_TEST_CIFAR to cifar10-jpeg.tar.gz): this test "
            "runs bmc on real JPEGs (imagefolder decoding and cache, training, export and bench on a slice)"
        )
    root = tmp_path_factory.mktemp("cifar_slice")
    wanted = {"train": 30, "test": 10}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(SHARED_CIFAR) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            split, label = parts[-3], parts[-2]
            if split not in wanted or counts.get((split, label), 0) >= wanted[split]:
                continue
            counts[(split, label)] = counts.get((split, label), 0) + 1
            target = root / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if len(counts) == 20 and all(c >= wanted[s] for (s, _), c in counts.items()):
                break
    return root


def run_bmc(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bmc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI failed as a user should see it: one 'error: ' line on stderr, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
