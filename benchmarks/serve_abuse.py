"""Normal clients while hostile ones abuse bmc serve: p99 and the server's peak RSS, each abuse against a quiet run.

    python benchmarks/serve_abuse.py --seconds 8                  # every abuse, 8 s each
    python benchmarks/serve_abuse.py --abuses slow_connections,big_rows --seconds 5

One server (digits MLP, --threads 1, --max-batch 32, --max-delay-ms 500 as in issue 19's stalled-upload
finding) under a descriptor limit of --nofile (256: the issue's slow-connection finding). For each
phase, 16 normal clients (aiohttp, closed loop, JSON infer of one digit) run for --seconds while the
abuse runs in a separate process; the quiet phase runs no abuse. Reported per phase: the normal
clients' throughput, p50 and p99 (and p99 over the quiet p99), their errors, what the abusers got
back, and the server's peak RSS (sampled every 20 ms) above its RSS at the start of the quiet phase.
Goal (issue 19): p99 within 2x of quiet and RSS within +200 MB. Bounded: every phase stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from serve_load import _free_port, request_body, stop_server, wait_ready  # noqa: E402

ABUSES = ("big_header", "many_headers", "slow_connections", "stalled_uploads", "big_rows", "gzip_bomb", "png_strip", "png_large")
NORMAL_CONCURRENCY = 16
HOST = b"Host: 127.0.0.1\r\n"


# Abuses, each run in its own process until `stop` is set; each returns what the server answered.


async def _status(reader: asyncio.StreamReader, timeout_s: float = 60) -> str:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except asyncio.TimeoutError:
        return "no answer"
    except (ConnectionError, OSError):
        return "reset"  # the server answered and closed while the request was still being sent
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1 ") else "closed"


async def _send_and_read_status(port: int, parts, counts: Counter) -> None:
    """Write `parts` (stopping when the server closes), then count the status it answered."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionError, OSError):
        counts["refused"] += 1
        await asyncio.sleep(0.05)
        return
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # answered and closed before the request ended
    counts[await _status(reader, 120)] += 1
    writer.close()


async def _big_header(port: int, stop: threading.Event, counts: Counter) -> None:
    """A 128 MiB header, again and again."""
    chunk = b"a" * 65536
    while not stop.is_set():
        parts = [b"GET /v2/health/live HTTP/1.1\r\n" + HOST + b"X-Big: ", *([chunk] * 2048), b"\r\n\r\n"]
        await _send_and_read_status(port, parts, counts)


async def _many_headers(port: int, stop: threading.Event, counts: Counter) -> None:
    """10,000 header fields, again and again."""
    request = b"GET /v2/health/live HTTP/1.1\r\n" + HOST + b"".join(b"x-%d: v\r\n" % i for i in range(10_000)) + b"\r\n"
    while not stop.is_set():
        await _send_and_read_status(port, [request], counts)


async def _slow_connection(port: int, stop: threading.Event, counts: Counter, kind: str) -> None:
    """One slot of the slow attack: silent, a header trickled a byte a second, or a body trickled; reopened when closed."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if kind == "slow_header":
                writer.write(b"POST /v2/models/model/infer HTTP/1.1\r\n" + HOST + b"X-Slow: ")
            elif kind == "slow_body":
                writer.write(b"POST /v2/models/model/infer HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n{")
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except asyncio.TimeoutError:
                    if kind != "silent":
                        writer.write(b"a")
                    continue
                counts[data.split(b" ")[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"] += 1
                break
            writer.close()
        except (ConnectionError, OSError):
            counts["refused"] += 1
            await asyncio.sleep(0.05)


async def _stalled_upload(port: int, stop: threading.Event, counts: Counter) -> None:
    """Headers and half a body, then nothing: the issue's `--max-delay-ms 500` finding."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v2/models/model/infer HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body) + body[:40])
            await writer.drain()
            while not stop.is_set() and not reader.at_eof():
                try:
                    counts[await asyncio.wait_for(_status(reader), 1.0)] += 1
                    break
                except asyncio.TimeoutError:
                    continue
            writer.close()
        except (ConnectionError, OSError):
            counts["refused"] += 1
            await asyncio.sleep(0.05)


async def _post_loop(port: int, stop: threading.Event, counts: Counter, path: str, body: bytes, headers: bytes = b"") -> None:
    head = b"POST %s HTTP/1.1\r\n" % path.encode() + HOST + headers + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    while not stop.is_set():
        await _send_and_read_status(port, [head, body], counts)


def _png(width: int, height: int) -> bytes:
    """A grayscale PNG of zeros: a few KB on the wire, width x height bytes once decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    raw = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _abuse_process(kind: str, port: int, stop, results) -> None:
    # An attacker's own CPU is not the server's: on one machine, the abusers take only what is left.
    os.nice(19)
    counts: Counter = Counter()
    local_stop = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), local_stop.set()), daemon=True).start()

    async def main() -> None:
        if kind == "big_header":
            tasks = [_big_header(port, local_stop, counts) for _ in range(2)]
        elif kind == "many_headers":
            tasks = [_many_headers(port, local_stop, counts) for _ in range(2)]
        elif kind == "slow_connections":  # the 200 slowloris, 200 silent, 100 slow-body
            tasks = [_slow_connection(port, local_stop, counts, k) for k, n in (("slow_header", 200), ("silent", 200), ("slow_body", 100))
                     for _ in range(n)]
        elif kind == "stalled_uploads":
            tasks = [_stalled_upload(port, local_stop, counts) for _ in range(8)]
        elif kind == "big_rows":  # the 64 MiB binary request: 262,000 digits
            rows = np.zeros((262_000, 1, 8, 8), np.float32)
            header = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
            extra = b"Inference-Header-Content-Length: %d\r\nContent-Type: application/octet-stream\r\n" % len(header)
            tasks = [_post_loop(port, local_stop, counts, "/v2/models/model/infer", header + rows.tobytes(), extra) for _ in range(2)]
        elif kind == "gzip_bomb":  # 130 KB of deflate that would inflate to 128 MiB: refused at the 64 MiB limit, 4 at once
            squeezed = zlib.compressobj(9)
            zeros = bytes(1 << 20)
            bomb = b"".join(squeezed.compress(zeros) for _ in range(128)) + squeezed.flush()
            tasks = [_post_loop(port, local_stop, counts, "/v2/models/model/infer", bomb, b"Content-Encoding: deflate\r\n") for _ in range(4)]
        elif kind == "png_strip":  # the 39 KB 1 x 40,000,000 PNG, 4 at once
            strip = _png(40_000_000, 1)
            tasks = [_post_loop(port, local_stop, counts, "/v2/models/model/classify", strip) for _ in range(4)]
        elif kind == "png_large":  # the six 39.7 Mpx PNGs at once
            large = _png(6300, 6300)
            tasks = [_post_loop(port, local_stop, counts, "/v2/models/model/classify", large) for _ in range(6)]
        else:
            raise ValueError(kind)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    results.put(dict(counts))


# Measuring


async def normal_clients(port: int, concurrency: int, seconds: float) -> tuple[list[float], Counter, float]:
    """A closed loop of `concurrency` aiohttp clients (serve_load's), counting each error by what it was."""
    import aiohttp

    body, headers = request_body((1, 1, 8, 8), binary=False)
    url = f"http://127.0.0.1:{port}/v2/models/model/infer"
    latencies_ms: list[float] = []
    errors: Counter = Counter()
    stop_at = time.monotonic() + seconds

    async def client(session) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors[f"HTTP {response.status}"] += 1
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                continue
            latencies_ms.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return latencies_ms, errors, elapsed


class RssSampler:
    """The server's VmRSS every 20 ms, from a thread; peak since the last reset."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def reset(self) -> None:
        self.peak_mb = self.now_mb()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak_mb = max(self.peak_mb, self.now_mb())
            except (OSError, AttributeError):
                return

    def close(self) -> None:
        self._stop.set()


async def run_phase(kind: str | None, port: int, sampler: RssSampler, seconds: float) -> dict:
    sampler.reset()
    start_mb = sampler.now_mb()
    stop, results, process = None, None, None
    if kind is not None:
        context = multiprocessing.get_context("spawn")
        stop, results = context.Event(), context.Queue()
        process = context.Process(target=_abuse_process, args=(kind, port, stop, results), daemon=True)
        process.start()
        await asyncio.sleep(1.0)  # the abuse is under way before the normal clients are measured
    latencies_ms, errors, elapsed = await normal_clients(port, NORMAL_CONCURRENCY, seconds)
    abuse_answers: dict = {}
    if process is not None:
        stop.set()
        try:
            abuse_answers = results.get(timeout=30)
        except Exception:  # noqa: BLE001 - an abuse that cannot report is reported as such
            abuse_answers = {"unreported": 1}
        process.join(10)
        if process.is_alive():
            process.kill()
    values = np.asarray(latencies_ms) if latencies_ms else np.zeros(1)
    return {
        "abuse": kind or "quiet",
        "requests_per_s": round(len(latencies_ms) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(values, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(values, 99)), 2),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "abuse_answers": abuse_answers,
        "rss_start_mb": round(start_mb, 1),
        "rss_peak_mb": round(sampler.peak_mb, 1),
    }


async def main_async(args) -> dict:
    from bmc.export import ExportConfig, export

    root = Path(tempfile.mkdtemp(prefix="bmc-serve-abuse-"))
    model = root / "model.onnx"
    export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=model))
    port = _free_port()
    nofile = args.nofile
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    command = [sys.executable, "-m", "bmc", "serve", str(model), "--port", str(port), "--threads", "1", "--max-batch", "32",
               "--max-delay-ms", str(args.max_delay_ms)]
    log = open(root / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=limit)
    phases = []
    try:
        if not await wait_ready(port, server):
            raise SystemExit(f"bmc serve did not become ready; see {root / 'serve.log'}")
        await normal_clients(port, 4, 1.0)  # warm-up
        sampler = RssSampler(server.pid)
        quiet = await run_phase(None, port, sampler, args.seconds)
        baseline_mb = quiet["rss_start_mb"]
        phases.append(quiet)
        print(f"  quiet: p99 {quiet['latency_ms_p99']} ms, {quiet['requests_per_s']} req/s", flush=True)
        for kind in args.abuses:
            await asyncio.sleep(2.0)  # connections of the last abuse closed, its memory freed or not
            phase = await run_phase(kind, port, sampler, args.seconds)
            phases.append(phase)
            print(f"  {kind}: p99 {phase['latency_ms_p99']} ms, {phase['requests_per_s']} req/s, errors {phase['error_kinds']}, "
                  f"peak RSS +{phase['rss_peak_mb'] - baseline_mb:.0f} MB, abusers got {phase['abuse_answers']}", flush=True)
            if server.poll() is not None:
                print(f"  the server exited ({server.returncode}) during {kind}")
                break
        sampler.close()
    finally:
        stop_server(server)
        log.close()
    rows = []
    for phase in phases:
        phase["p99_over_quiet"] = round(phase["latency_ms_p99"] / quiet["latency_ms_p99"], 2)
        phase["rss_peak_over_quiet_mb"] = round(phase["rss_peak_mb"] - baseline_mb, 1)
        phase["meets_goal"] = phase["p99_over_quiet"] <= 2.0 and phase["rss_peak_over_quiet_mb"] <= 200 and phase["errors"] == 0
        answers = ", ".join(f"{k}:{v}" for k, v in sorted(phase["abuse_answers"].items()))
        rows.append([phase["abuse"], phase["requests_per_s"], phase["latency_ms_p50"], phase["latency_ms_p99"], phase["p99_over_quiet"],
                     phase["errors"], f"+{phase['rss_peak_over_quiet_mb']:.0f}", "yes" if phase["meets_goal"] else "NO", answers or "-"])
    print_table(f"normal clients (c={NORMAL_CONCURRENCY}, digits JSON) while each abuse runs, {args.seconds:g} s each",
                ["abuse", "req/s", "p50 ms", "p99 ms", "p99/quiet", "errors", "peak RSS MB", "goal", "abusers got"], rows)
    return {"seconds_per_phase": args.seconds, "nofile": nofile, "max_delay_ms": args.max_delay_ms,
            "normal_concurrency": NORMAL_CONCURRENCY, "server_command": command[2:], "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="Seconds of normal load per phase (bounded).")
    parser.add_argument("--abuses", type=lambda s: [a for a in s.split(",") if a], default=list(ABUSES),
                        help=f"comma-separated, from {', '.join(ABUSES)}")
    parser.add_argument("--nofile", type=int, default=256, help="The server's descriptor limit (ulimit -n); 0 leaves it.")
    parser.add_argument("--max-delay-ms", type=float, default=500.0, help="The server's --max-delay-ms.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = [a for a in args.abuses if a not in ABUSES]
    if unknown or not 0 < args.seconds <= 60:
        parser.error(f"unknown abuse {unknown}; --seconds must be in (0, 60]")
    results = asyncio.run(main_async(args))
    write_results("serve_abuse", results, args.out)


if __name__ == "__main__":
    main()
