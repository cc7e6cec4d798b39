"""What encryption at rest costs `bmc serve` at start-up: the documents' large model (seed-cnn224,
411 M parameters, 1.6 GB) exported plaintext and encrypted (AES-256-GCM, the same weights), then
served in turn, from process start to `ready`, and its peak memory.

    python benchmarks/serve_startup.py [--rounds 3] [--threads 1] [--out FILE]
    python benchmarks/serve_startup.py --model seed-mlp --input-size 8 --rounds 2   # a quick check

Both files are read from the page cache after the first round (the exports just wrote them); the
rounds alternate which variant starts first. Start-up covers the Python imports, reading and
hashing every file, decryption (encrypted only), bmc's ONNX checks, the onnxruntime session and one
warm-up run; the same stages are then timed one by one in this process, to say where the time goes.
With --keep DIR, files exported there by an earlier run are reused.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.export import ExportConfig, export  # noqa: E402
from bmc.sealed import load_key, new_key  # noqa: E402


def _ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / (1 << 20)  # kB
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_to_ready(model: Path, extra: list[str], threads: int, timeout_s: float = 900) -> tuple[float, float]:
    """(seconds from process start to ready, the server's peak RSS in GiB at ready)."""
    port = _free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "bmc", "serve", str(model), *extra, "--threads", str(threads), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        while not _ready(port):
            if process.poll() is not None:
                raise SystemExit(f"bmc serve exited {process.returncode}: {process.stderr.read()}")
            if time.perf_counter() - started > timeout_s:
                raise SystemExit(f"bmc serve was not ready in {timeout_s:.0f} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        return seconds, _peak_rss_gib(process.pid)
    finally:
        process.terminate()
        process.wait(60)


def stage_seconds(model: Path, key: Path | None, threads: int) -> dict[str, float]:
    """The start-up stages of one model, timed in this process (what bmc serve does before ready)."""
    import hashlib

    import numpy as np

    from bmc.runtime.model_file import ModelBytes, open_model_bytes
    from bmc.runtime.sessions import create_session
    from bmc.sealed import unseal

    seconds = {}
    started = time.perf_counter()
    with open(model, "rb") as handle:
        raw = handle.read()
    seconds["read"] = time.perf_counter() - started
    started = time.perf_counter()
    hashlib.sha256(raw).hexdigest()
    seconds["sha256"] = time.perf_counter() - started
    started = time.perf_counter()
    held = unseal(model, raw, load_key(key)) if key is not None else ModelBytes(model, raw, {})
    seconds["decrypt"] = time.perf_counter() - started
    del raw
    started = time.perf_counter()
    checked = open_model_bytes(held)
    seconds["onnx checks"] = time.perf_counter() - started
    del checked
    started = time.perf_counter()
    session = create_session(held, threads=threads, conv_algo_search="HEURISTIC").session
    seconds["session"] = time.perf_counter() - started
    del held
    started = time.perf_counter()
    feed = {i.name: np.zeros([1 if not isinstance(d, int) else d for d in i.shape], np.float32) for i in session.get_inputs()}
    session.run(None, feed)
    seconds["warm-up run"] = time.perf_counter() - started
    return {name: round(value, 3) for name, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed-cnn224")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the server")
    parser.add_argument("--keep", type=Path, default=None, help="export into this folder and keep the files")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        key = root / "model.key"
        if not key.exists():
            new_key(key)
        exports = {}
        for variant, encrypt in (("plaintext", None), ("encrypted", key)):
            target = root / variant / "model.onnx"
            if args.keep is not None and target.with_name("model.onnx.sha256").is_file():
                exports[variant] = {"seconds": None, "size_bytes": target.stat().st_size, "path": target}
                continue
            started = time.perf_counter()
            result = export(ExportConfig(
                model=args.model, input_size=args.input_size, num_classes=10, out=target, verify_samples=8, encrypt_key_file=encrypt,
            ))
            exports[variant] = {"seconds": time.perf_counter() - started, "size_bytes": result.size_bytes, "path": result.path}
            print(f"exported {variant}: {result.size_bytes / 1e9:.2f} GB in {exports[variant]['seconds']:.1f} s", flush=True)

        load_at_start = os.getloadavg()[0]
        extra = {"plaintext": [], "encrypted": ["--decrypt-key-file", str(key)]}
        measured: dict[str, list[tuple[float, float]]] = {"plaintext": [], "encrypted": []}
        for round_index in range(args.rounds):
            order = ("plaintext", "encrypted") if round_index % 2 == 0 else ("encrypted", "plaintext")
            for variant in order:
                seconds, rss = start_to_ready(exports[variant]["path"], extra[variant], args.threads)
                measured[variant].append((seconds, rss))
                print(f"round {round_index + 1} {variant}: ready in {seconds:.2f} s, peak RSS {rss:.2f} GiB", flush=True)
        load_at_end = os.getloadavg()[0]
        stages = {variant: stage_seconds(exports[variant]["path"], key if variant == "encrypted" else None, args.threads) for variant in exports}

    summary = {}
    for variant, runs in measured.items():
        times = [s for s, _ in runs]
        summary[variant] = {
            "file_bytes": exports[variant]["size_bytes"],
            "export_seconds": round(exports[variant]["seconds"], 1) if exports[variant]["seconds"] is not None else None,
            "stage_seconds": stages[variant],
            "start_to_ready_s": [round(s, 3) for s in times],
            "start_to_ready_s_median": round(statistics.median(times), 3),
            "peak_rss_gib_max": round(max(r for _, r in runs), 2),
        }
    plain, sealed = summary["plaintext"]["start_to_ready_s_median"], summary["encrypted"]["start_to_ready_s_median"]
    rows = [
        [variant, f"{s['file_bytes'] / 1e9:.2f} GB", f"{s['export_seconds']}", f"{s['start_to_ready_s_median']:.2f}",
         f"{min(s['start_to_ready_s']):.2f} - {max(s['start_to_ready_s']):.2f}", f"{s['peak_rss_gib_max']:.2f}"]
        for variant, s in summary.items()
    ]
    print_table(
        f"bmc serve start to ready, {args.model} ({args.rounds} rounds, {args.threads} onnxruntime thread(s))",
        ["variant", "file", "export s", "ready s (median)", "range", "peak RSS GiB"],
        rows,
    )
    print(f"\nencrypted / plaintext: {sealed / plain:.2f}x ({sealed - plain:+.2f} s); "
          f"load average {load_at_start:.1f} -> {load_at_end:.1f} on {os.cpu_count()} cores")
    names = list(stages["plaintext"])
    print_table(
        "the same stages timed one by one in this process (s)",
        ["variant", *names],
        [[variant, *(f"{stages[variant][name]:.2f}" for name in names)] for variant in stages],
    )
    write_results(
        "serve_startup",
        {
            "model": args.model,
            "input_size": args.input_size,
            "rounds": args.rounds,
            "threads": args.threads,
            # The machine is shared: its 1-minute load average says how noisy the timings are.
            "load_average_1m": [round(load_at_start, 2), round(load_at_end, 2)],
            "variants": summary,
            "encrypted_over_plaintext": round(sealed / plain, 3),
            "encrypted_extra_s": round(sealed - plain, 3),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
