"""Load on loopback: bmc serve (batching on and off, JSON and binary tensors) against the peer servers, one run.

    python benchmarks/serve_load.py --seconds 3            # digits MLP and resnet20, concurrency 1, 16, 64
    python benchmarks/serve_load.py --providers cuda --models resnet20 --servers bmc,bmc-nobatch --client-processes 4

Each point is a bounded asyncio load (aiohttp, `--seconds` per point, closed loop of `concurrency`
clients) that stops by itself. Peers start with ../shared/peers/start.sh from the venvs made by
`../shared/peers/setup.sh .peers`; a peer whose venv is missing is skipped and says so. Every server
runs onnxruntime with one intra-op thread. Also reported: the model's own throughput in onnxruntime at
its best batch size on the same cores (the physical limit serving can approach).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, print_table, write_results  # noqa: E402

PEERS_SCRIPTS = PROJECT_ROOT.parent / "shared" / "peers"
PEERS_VENVS = PROJECT_ROOT / ".peers"
PEER_KINDS = ("mlserver", "mlserver-batch", "kserve", "minimal")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_models(root: Path) -> dict[str, Path]:
    from bmc.export import ExportConfig, export

    paths = {"digits-mlp": root / "digits.onnx", "resnet20": root / "resnet20.onnx"}
    export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=paths["digits-mlp"]))
    export(ExportConfig(model="resnet20", input_size=32, num_classes=10, out=paths["resnet20"]))
    return paths


def start_server(kind: str, name: str, model: Path, port: int, providers: str = "cpu") -> subprocess.Popen:
    if kind.startswith("bmc"):
        max_batch = "1" if kind == "bmc-nobatch" else "32"
        command = [sys.executable, "-m", "bmc", "serve", str(model), "--name", name, "--port", str(port),
                   "--threads", "1", "--max-batch", max_batch, "--providers", providers]
    else:
        command = ["bash", str(PEERS_SCRIPTS / "start.sh"), str(PEERS_VENVS), kind, name, str(model), str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 120) -> bool:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/v2/health/ready") as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return False


def request_body(shape: tuple[int, ...], binary: bool) -> tuple[bytes, dict]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if not binary:
        body = {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _client_process(port: int, name: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    return asyncio.run(_closed_loop(port, name, body, headers, concurrency, seconds))


async def load_point(port: int, name: str, body: bytes, headers: dict, concurrency: int, seconds: float, processes: int = 1) -> dict:
    """A closed loop of `concurrency` clients for `seconds`; requests/s, p50, p99 (ms) and errors.

    With processes > 1 the clients are spread over that many processes, so that one Python client
    process's own cost per request does not cap what a fast server can show.
    """
    if processes <= 1 or concurrency < processes:
        latencies_ms, errors, elapsed = await _closed_loop(port, name, body, headers, concurrency, seconds)
    else:
        from concurrent.futures import ProcessPoolExecutor

        shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(processes) as pool:
            parts = await asyncio.gather(*(
                loop.run_in_executor(pool, _client_process, port, name, body, headers, share, seconds) for share in shares
            ))
        latencies_ms = [v for part in parts for v in part[0]]
        errors = sum(part[1] for part in parts)
        elapsed = max(part[2] for part in parts)
    values = np.asarray(latencies_ms) if latencies_ms else np.zeros(1)
    return {
        "requests_per_s": round(len(latencies_ms) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(values, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(values, 99)), 2),
        "errors": errors,
    }


async def _closed_loop(port: int, name: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
    latencies_ms: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(session) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return latencies_ms, errors, elapsed


def onnxruntime_limit(model: Path, shape: tuple[int, ...], seconds: float = 1.0, device: str = "cpu") -> dict:
    """Images/s of the bare session (1 thread) at batch 1, 8, 32: the physical limit for serving."""
    from bmc.runtime.sessions import create_session

    session = create_session(model, device, threads=1).session
    results = {}
    for batch in (1, 8, 32):
        x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
        session.run(None, {"input": x})
        runs, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            session.run(None, {"input": x})
            runs += 1
        results[batch] = round(runs * batch / (time.perf_counter() - began), 1)
    return results


async def main_async(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bmc-serve-load-"))
    models = make_models(root)
    shapes = {"digits-mlp": (1, 1, 8, 8), "resnet20": (1, 3, 32, 32)}
    peers_ok = (PEERS_VENVS / "mlserver" / "bin" / "python").exists() and (PEERS_VENVS / "kserve" / "bin" / "python").exists()
    servers = [s for s in args.servers.split(",") if s]
    rows, points, limits = [], [], {}
    for model_name in [m for m in args.models.split(",") if m]:
        limits[model_name] = onnxruntime_limit(models[model_name], shapes[model_name], device=args.providers)
        for kind in servers:
            if kind in ("mlserver", "mlserver-batch", "kserve") and not peers_ok:
                print(f"skipping {kind}: no venvs in {PEERS_VENVS} (run ../shared/peers/setup.sh .peers)")
                continue
            encodings = ("json", "binary") if kind.startswith("bmc") else ("json",)
            port = _free_port()
            process = start_server(kind, "model", models[model_name], port, args.providers)
            try:
                if not await wait_ready(port, process):
                    print(f"skipping {kind} for {model_name}: not ready")
                    continue
                for encoding in encodings:
                    body, headers = request_body(shapes[model_name], encoding == "binary")
                    await load_point(port, "model", body, headers, 4, 0.5)  # warm-up, not recorded
                    for concurrency in args.concurrency:
                        point = await load_point(port, "model", body, headers, concurrency, args.seconds, args.client_processes)
                        point.update(model=model_name, server=kind, encoding=encoding, concurrency=concurrency)
                        points.append(point)
                        rows.append([model_name, kind, encoding, concurrency, point["requests_per_s"],
                                     point["latency_ms_p50"], point["latency_ms_p99"], point["errors"]])
                        print(f"  {model_name} {kind} {encoding} c={concurrency}: {point['requests_per_s']} req/s, "
                              f"p99 {point['latency_ms_p99']} ms, {point['errors']} errors", flush=True)
            finally:
                stop_server(process)
    print_table("serving on loopback (requests/s, latency ms)", ["model", "server", "body", "conc.", "req/s", "p50", "p99", "errors"], rows)
    print_table(f"onnxruntime alone, {args.providers}, 1 thread (images/s by batch size)", ["model", "batch 1", "batch 8", "batch 32"],
                [[m, v[1], v[8], v[32]] for m, v in limits.items()])
    return {"seconds_per_point": args.seconds, "providers": args.providers, "client_processes": args.client_processes,
            "points": points, "onnxruntime_images_per_s": limits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="Seconds of load per point (bounded).")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--models", default="digits-mlp,resnet20")
    parser.add_argument("--servers", default="bmc,bmc-nobatch," + ",".join(PEER_KINDS))
    parser.add_argument("--providers", default="cpu", choices=("cpu", "cuda"), help="bmc serve's onnxruntime providers")
    parser.add_argument("--client-processes", type=int, default=1, help="spread the clients over this many processes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.seconds <= 60 or not all(1 <= c <= 256 for c in args.concurrency):
        parser.error("--seconds must be in (0, 60] and each concurrency in [1, 256]")
    results = asyncio.run(main_async(args))
    write_results("serve_load", results, args.out)


if __name__ == "__main__":
    main()
