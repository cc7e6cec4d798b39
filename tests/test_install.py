"""The edge install: `pip install bmc` brings no torch, and the commands that need it say so in one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, assert_one_line_error, run_bmc

TORCH_FAMILY = {"torch", "torchvision", "torch-pruning", "scikit-learn", "safetensors"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement.strip(), maxsplit=1)[0].lower()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (Python 3.11+)")
def test_the_base_install_has_no_torch_and_full_brings_it():
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    full = {_requirement_name(r) for r in project["optional-dependencies"]["full"]}
    assert not base & TORCH_FAMILY, base & TORCH_FAMILY
    assert TORCH_FAMILY <= full
    assert "bmc[full]" in project["optional-dependencies"]["test"]


@pytest.fixture
def without_torch(tmp_path) -> dict:
    """An environment where torch, torchvision and scikit-learn cannot be imported, as on the edge install."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "torchvision", "sklearn", "torch_pruning", "safetensors"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ModuleNotFoundError('{name} is blocked in this test', name='{name}')\n")
    return {"PYTHONPATH": str(blocked)}


def test_train_export_and_compress_without_torch_name_the_full_install(workdir, without_torch):
    for command in (("train",), ("export", "--model", "seed-mlp"), ("compress", "some.onnx")):
        result = run_bmc(*command, cwd=workdir, env=without_torch)
        assert result.returncode == 1
        if command[0] == "compress":
            # An ONNX input that does not exist is refused before torch would be needed.
            assert_one_line_error(result, "some.onnx")
        else:
            assert_one_line_error(result, f"`bmc {command[0]}` needs", "pip install 'bmc[full]'")
    assert not Path(workdir, "runs").exists()


def test_info_without_torch_lists_data_sets_and_the_machine(workdir, without_torch):
    result = run_bmc("info", cwd=workdir, env=without_torch)
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "cpu:" in result.stdout
    assert "models: none here" in result.stdout and "resnet20" not in result.stdout
