"""Load on loopback: bmc serve (batching on and off, JSON and binary tensors, on each runtime) against
the peer servers, one run.

    python benchmarks/serve_load.py --seconds 3            # digits MLP and resnet20, concurrency 1, 16, 64
    python benchmarks/serve_load.py --providers cuda --models resnet20 --servers bmc,bmc-nobatch --client-processes 4
    # bmc serve on the runtime the model's metadata chose per batch size, against onnxruntime fp32:
    python benchmarks/serve_load.py --models resnet20,resnet20-int8-chosen --servers bmc@onnxruntime,bmc \
        --concurrency 64 --encodings binary --rounds 3 --baseline resnet20:bmc@onnxruntime

Servers: `bmc` serves each model on the runtime its metadata names (onnxruntime when it names none),
`bmc@RUNTIME[-PRECISION]` (bmc@onnxruntime, bmc@openvino, bmc@openvino-bf16) on that one (--runtime),
`bmc-nobatch` without batching. Models: `resnet20-int8` is resnet20 quantized by onnxruntime's
quantize_static (QDQ, U8S8 per channel, as bmc compress's plain recipe), `resnet20-int8-chosen` the same
file with the runtime per batch size (1 and 32) that ran it fastest here on one thread written into its
metadata, as bmc compress records its choice. With --rounds, every (model, server) pair runs once per
round, in turn, and --baseline gives each point's requests/s as a ratio to the baseline's in its round.

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


SHAPES = {"digits-mlp": (1, 1, 8, 8), "resnet20": (1, 3, 32, 32), "resnet20-int8": (1, 3, 32, 32), "resnet20-int8-chosen": (1, 3, 32, 32)}


def make_models(root: Path, names: list[str]) -> tuple[dict[str, Path], dict]:
    """The model files asked for, and for the -chosen ones the per-batch timings their choice came from."""
    from bmc.export import ExportConfig, export

    paths = {"digits-mlp": root / "digits.onnx", "resnet20": root / "resnet20.onnx"}
    if "digits-mlp" in names:
        export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=paths["digits-mlp"]))
    if any(name.startswith("resnet20") for name in names):
        export(ExportConfig(model="resnet20", input_size=32, num_classes=10, out=paths["resnet20"]))
    choices = {}
    if any(name.startswith("resnet20-int8") for name in names):
        paths["resnet20-int8"] = quantize_int8(paths["resnet20"], root / "resnet20-int8.onnx", SHAPES["resnet20"])
    if "resnet20-int8-chosen" in names:
        paths["resnet20-int8-chosen"], choices["resnet20-int8-chosen"] = with_chosen_targets(
            paths["resnet20-int8"], root / "resnet20-int8-chosen.onnx", SHAPES["resnet20"])
    return {name: paths[name] for name in names}, choices


def quantize_int8(fp32: Path, out: Path, shape: tuple[int, ...]) -> Path:
    """QDQ int8 (activations uint8, weights int8 per channel) calibrated on random inputs: for speed only."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bmc.artifact import write_sidecar_sha256

    prepared = out.with_name(out.stem + "-prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))

    class RandomBatches(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((8, *shape[1:])).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(prepared), str(out), RandomBatches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    write_sidecar_sha256(out)
    return out


def with_chosen_targets(model: Path, out: Path, shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 32)) -> tuple[Path, dict]:
    """A copy of the model whose metadata names, per batch size, the runtime (and precision) that ran it
    fastest here on one thread, as bmc compress records its choice; and the timings (median ms per run)."""
    import onnx

    from bmc.artifact import write_sidecar_sha256
    from bmc.runtime.metadata import PREFIX
    from bmc.runtime.registry import plan_targets
    from bmc.runtime.target import Target

    candidates = plan_targets(precisions=None, threads=1)  # every runtime and precision here
    timings: dict[int, dict[str, float]] = {}
    chosen: dict[int, Target] = {}
    for batch in batch_sizes:
        timings[batch] = {target.label: median_run_ms(model, target, (batch, *shape[1:])) for target in candidates}
        chosen[batch] = min(candidates, key=lambda target: timings[batch][target.label])
    proto = onnx.load(str(model))
    entries = {p.key: p.value for p in proto.metadata_props}
    entries[PREFIX + "runtime_targets"] = json.dumps({str(b): t.to_dict() for b, t in chosen.items()}, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    write_sidecar_sha256(out)
    return out, {"chosen": {b: t.label for b, t in chosen.items()}, "median_ms": timings}


def median_run_ms(model: Path, target, shape: tuple[int, ...], seconds: float = 0.5) -> float:
    from bmc.runtime.registry import open_session

    session = open_session(model, target)
    run = session.runner({"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    for _ in range(3):
        run()
    times = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds or len(times) < 5:
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.median(times)), 3)


def start_server(kind: str, name: str, model: Path, port: int, providers: str = "cpu") -> subprocess.Popen:
    if kind.startswith("bmc"):
        max_batch = "1" if kind == "bmc-nobatch" else "32"
        command = [sys.executable, "-m", "bmc", "serve", str(model), "--name", name, "--port", str(port),
                   "--threads", "1", "--max-batch", max_batch, "--providers", providers]
        if "@" in kind:  # bmc@openvino-bf16: --runtime openvino --precision bf16
            runtime, _, precision = kind.split("@", 1)[1].partition("-")
            command += ["--runtime", runtime] + (["--precision", precision] if precision else [])
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
    model_names = [m for m in args.models.split(",") if m]
    models, choices = make_models(root, model_names)
    for name, choice in choices.items():
        print(f"{name}: chosen per batch size {choice['chosen']} (median ms per run, 1 thread: {choice['median_ms']})")
    peers_ok = (PEERS_VENVS / "mlserver" / "bin" / "python").exists() and (PEERS_VENVS / "kserve" / "bin" / "python").exists()
    servers = [s for s in args.servers.split(",") if s]
    rows, points, limits = [], [], {}
    for model_name in model_names:
        limits[model_name] = onnxruntime_limit(models[model_name], SHAPES[model_name], device=args.providers)
    for round_index in range(args.rounds):
        for model_name in model_names:
            for kind in servers:
                if kind in ("mlserver", "mlserver-batch", "kserve") and not peers_ok:
                    print(f"skipping {kind}: no venvs in {PEERS_VENVS} (run ../shared/peers/setup.sh .peers)")
                    continue
                encodings = [e for e in args.encodings if kind.startswith("bmc") or e == "json"]
                port = _free_port()
                process = start_server(kind, "model", models[model_name], port, args.providers)
                try:
                    if not await wait_ready(port, process):
                        print(f"skipping {kind} for {model_name}: not ready")
                        continue
                    for encoding in encodings:
                        body, headers = request_body(SHAPES[model_name], encoding == "binary")
                        await load_point(port, "model", body, headers, 4, 0.5)  # warm-up, not recorded
                        for concurrency in args.concurrency:
                            point = await load_point(port, "model", body, headers, concurrency, args.seconds, args.client_processes)
                            point.update(model=model_name, server=kind, encoding=encoding, concurrency=concurrency, round=round_index + 1)
                            points.append(point)
                            print(f"  round {round_index + 1} {model_name} {kind} {encoding} c={concurrency}: {point['requests_per_s']} req/s, "
                                  f"p99 {point['latency_ms_p99']} ms, {point['errors']} errors", flush=True)
                finally:
                    stop_server(process)
    ratios = baseline_ratios(points, args.baseline)
    for point in points:
        rows.append([point["round"], point["model"], point["server"], point["encoding"], point["concurrency"], point["requests_per_s"],
                     point["latency_ms_p50"], point["latency_ms_p99"], point["errors"], point.get("ratio_to_baseline", "")])
    print_table("serving on loopback (requests/s, latency ms)",
                ["round", "model", "server", "body", "conc.", "req/s", "p50", "p99", "errors", "x baseline"], rows)
    if ratios:
        print_table(f"requests/s against {args.baseline} in the same round: median (min-max) over {args.rounds} rounds",
                    ["model", "server", "body", "conc.", "req/s median", "ratio median", "ratio min", "ratio max", "p99 ms median"],
                    [[*key, r["requests_per_s_median"], r["ratio_median"], r["ratio_min"], r["ratio_max"], r["latency_ms_p99_median"]]
                     for key, r in ratios.items()])
    print_table(f"onnxruntime alone, {args.providers}, 1 thread (images/s by batch size)", ["model", "batch 1", "batch 8", "batch 32"],
                [[m, v[1], v[8], v[32]] for m, v in limits.items()])
    return {"seconds_per_point": args.seconds, "rounds": args.rounds, "providers": args.providers, "client_processes": args.client_processes,
            "baseline": args.baseline, "runtime_choices": choices, "points": points,
            "against_baseline": [dict(zip(("model", "server", "encoding", "concurrency"), key), **value) for key, value in ratios.items()],
            "onnxruntime_images_per_s": limits}


def baseline_ratios(points: list[dict], baseline: str | None) -> dict:
    """Each point's requests/s over the baseline's (same round, body and concurrency), summarized per
    (model, server, body, concurrency) as median, min and max over the rounds."""
    if not baseline:
        return {}
    base_model, _, base_server = baseline.partition(":")
    base = {(p["round"], p["encoding"], p["concurrency"]): p["requests_per_s"] for p in points
            if p["model"] == base_model and p["server"] == base_server}
    grouped: dict[tuple, list[dict]] = {}
    for point in points:
        reference = base.get((point["round"], point["encoding"], point["concurrency"]))
        if reference:
            point["ratio_to_baseline"] = round(point["requests_per_s"] / reference, 2)
            grouped.setdefault((point["model"], point["server"], point["encoding"], point["concurrency"]), []).append(point)
    return {
        key: {
            "requests_per_s_median": round(float(np.median([p["requests_per_s"] for p in group])), 1),
            "ratio_median": round(float(np.median([p["ratio_to_baseline"] for p in group])), 2),
            "ratio_min": min(p["ratio_to_baseline"] for p in group),
            "ratio_max": max(p["ratio_to_baseline"] for p in group),
            "latency_ms_p99_median": round(float(np.median([p["latency_ms_p99"] for p in group])), 2),
            "rounds": len(group),
        }
        for key, group in grouped.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="Seconds of load per point (bounded).")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--models", default="digits-mlp,resnet20", help=f"Comma-separated, of: {', '.join(SHAPES)}.")
    parser.add_argument("--servers", default="bmc,bmc-nobatch," + ",".join(PEER_KINDS),
                        help="bmc (the runtime each model's metadata names), bmc@RUNTIME[-PRECISION], bmc-nobatch, peers.")
    parser.add_argument("--encodings", type=lambda s: [e for e in s.split(",") if e], default=["json", "binary"])
    parser.add_argument("--rounds", type=int, default=1, help="Run every (model, server) pair this many times, in turn.")
    parser.add_argument("--baseline", default=None, help="MODEL:SERVER whose requests/s every point is divided by, round by round.")
    parser.add_argument("--providers", default="cpu", choices=("cpu", "cuda"), help="bmc serve's onnxruntime providers")
    parser.add_argument("--client-processes", type=int, default=1, help="spread the clients over this many processes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.seconds <= 60 or not all(1 <= c <= 256 for c in args.concurrency):
        parser.error("--seconds must be in (0, 60] and each concurrency in [1, 256]")
    if not 1 <= args.rounds <= 20 or not set(args.encodings) <= {"json", "binary"} or not args.encodings:
        parser.error("--rounds must be in [1, 20] and --encodings a comma-separated subset of json,binary")
    unknown = [m for m in args.models.split(",") if m and m not in SHAPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(SHAPES)}")
    results = asyncio.run(main_async(args))
    write_results("serve_load", results, args.out)


if __name__ == "__main__":
    main()
