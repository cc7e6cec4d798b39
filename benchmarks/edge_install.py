"""The edge install against the full one: size on disk, no torch, and bench and serve of an exported model.

Builds two fresh virtual environments from this checkout (pip's cache keeps that quick):
  edge   `pip install .`          what a box that only runs models installs
  full   `pip install '.[full]'`  training, export and compression too
then, in the edge one alone, checks that torch cannot be imported and that `bmc bench` and
`bmc serve` (one KServe v2 inference over HTTP) work on a model exported by the full install.
Goal: the edge environment is at most 15% of the full one's size.

    python benchmarks/edge_install.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, print_table, write_results  # noqa: E402

GOAL_FRACTION = 0.15


def make_venv(folder: Path, requirement: str) -> tuple[Path, float]:
    """A fresh venv at folder with `requirement` installed; (its python, seconds the install took)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    started = time.monotonic()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True, cwd=PROJECT_ROOT)
    return python, time.monotonic() - started


def size_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def bmc(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "bmc", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_once(python: Path, model: Path, cwd: Path) -> dict:
    """Start `bmc serve` in the edge venv, wait for ready, run one inference, stop it with SIGTERM."""
    port = free_port()
    server = subprocess.Popen([str(python), "-m", "bmc", "serve", str(model), "--port", str(port)], cwd=cwd, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while time.monotonic() - started < 120:
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("bmc serve in the edge venv never became ready")
        ready_s = time.monotonic() - started
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}).encode()
        request = urllib.request.Request(f"{base}/v2/models/{model.stem}/infer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            outputs = json.loads(response.read())["outputs"]
        return {"ready_s": round(ready_s, 2), "status": 200, "output_shape": outputs[0]["shape"]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them (default: a temporary folder, removed)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bmc-edge-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        edge_python, edge_install_s = make_venv(root / "edge", ".")
        full_python, full_install_s = make_venv(root / "full", ".[full]")
        work = root / "work"
        work.mkdir(exist_ok=True)
        for step in (("train", "--quiet"), ("export",)):
            made = bmc(full_python, *step, cwd=work)
            if made.returncode != 0:
                raise SystemExit(f"full install: bmc {step[0]} failed: {made.stderr.strip()}")
        model = work / "runs" / "latest" / "model.onnx"
        no_torch = subprocess.run([str(edge_python), "-c", "import torch"], capture_output=True, text=True)
        benched = bmc(edge_python, "bench", str(model), "--iters", "20", "--json", cwd=work)
        if benched.returncode != 0:
            raise SystemExit(f"edge install: bmc bench failed: {benched.stderr.strip()}")
        median_ms = json.loads(benched.stdout)["models"][0]["timings"][0]["latency_ms_median"]
        served = serve_once(edge_python, model, work)
        trained = bmc(edge_python, "train", cwd=work)
        edge_bytes, full_bytes = size_bytes(root / "edge"), size_bytes(root / "full")
        results = {
            "edge_bytes": edge_bytes,
            "full_bytes": full_bytes,
            "edge_fraction": round(edge_bytes / full_bytes, 4),
            "goal_fraction": GOAL_FRACTION,
            "edge_install_s": round(edge_install_s, 1),
            "full_install_s": round(full_install_s, 1),
            "edge_imports_torch": no_torch.returncode == 0,
            "edge_bench_latency_ms_median_batch1": median_ms,
            "edge_serve": served,
            "edge_train_message": trained.stderr.strip(),
        }
        print_table(
            "edge install (pip install .) against the full one (pip install '.[full]'), fresh venvs",
            ["install", "size", "share", "torch importable", "bench", "serve"],
            [
                ["edge", f"{edge_bytes / 1e6:,.0f} MB", f"{edge_bytes / full_bytes:.1%}", results["edge_imports_torch"], f"{median_ms:.3f} ms at batch 1", f"ready in {served['ready_s']} s, infer 200"],
                ["full", f"{full_bytes / 1e6:,.0f} MB", "100%", True, "", ""],
            ],
        )
        print(f"\nbmc train on the edge install: {results['edge_train_message']}")
        write_results("edge_install", results)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
