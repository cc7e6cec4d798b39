"""Every torchvision classifier through bmc's whole path: one training step, export, compress (prune + int8), bench.

    python benchmarks/zoo.py [--models NAME ...] [--families] [--timeout 1800] [--out PATH] [--fresh]

compress promises that any torchvision classification model prunes and quantizes without
crashing; this walks torchvision.models.list_models(module=torchvision.models), as timm's tests
walk its registry, and checks the promise model by model. Each model (random weights) is trained
for one step on 16 synthetic samples at the smallest input it takes of 32, 64, 128 and 224 px
(a ViT is built for that size), then goes through the CLI, each command a subprocess with a timeout:

    bmc export RUN
    bmc compress RUN --prune 0.5 --finetune-epochs 0 --quantize int8
    bmc bench RUN/model.onnx RUN/compressed/*.onnx --batch-sizes 1 --iters 3 --warmup 1

It prints a pass/fail table with each failure's one-line error, and merges each model's result
(status, error, seconds and peak memory per step) into benchmarks/results/zoo.json as it goes, so
the walk can run in parts (--models) and be resumed. --families runs the smallest model of each
family only (what the test suite's slow tier runs). Models in SKIP do not fit this machine; each
says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

SIZES_PX = (32, 64, 128, 224)
SAMPLES = 16  # one training step: batch size = the whole synthetic training set
# Longest first: "efficientnet_v2" before "efficientnet", "swin_v2" before "swin". A model matching
# none is a family of its own, so a torchvision release with a new family shows up by itself.
FAMILY_PREFIXES = (
    "efficientnet_v2", "efficientnet", "mobilenet_v3", "mobilenet_v2", "regnet_x", "regnet_y", "shufflenet_v2",
    "swin_v2", "swin", "wide_resnet", "resnext", "resnet", "convnext", "densenet", "mnasnet", "squeezenet", "vgg",
    "vit", "maxvit", "inception", "googlenet", "alexnet",
)
# Models that cannot go through compress on this machine (2 cores, 23 GiB shared by several
# engineers). Measured: compress peaked at 2.8 GiB for alexnet's 57 M parameters, about 51 bytes a
# parameter (the run, the teacher, the pruned copy, ONNX exports and onnxruntime sessions held at
# once); at that rate:
SKIP: dict[str, str] = {
    "regnet_y_128gf": "memory: 638 M parameters, ~30 GiB at compress's 51 bytes a parameter, over the machine's 23 GiB",
    "vit_h_14": "memory: 631 M parameters, ~30 GiB at compress's 51 bytes a parameter, over the machine's 23 GiB",
    "vit_l_16": "memory: 303 M parameters, ~14 GiB at compress's 51 bytes a parameter, more than the shared 23 GiB machine has free",
    "vit_l_32": "memory: 306 M parameters, ~15 GiB at compress's 51 bytes a parameter, more than the shared 23 GiB machine has free",
}

TRAIN = """
import json, sys
from pathlib import Path

from bmc.data import DataConfig
from bmc.errors import ModelError
from bmc.train import TrainConfig, train

name, out, size, samples = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model_args = {"image_size": size} if name.startswith("vit_") else {}  # a ViT is built for one size
data = DataConfig(name="synthetic", synthetic_shape=(3, size, size), synthetic_train_samples=samples, synthetic_test_samples=samples)
try:
    run = train(TrainConfig(data=data, model="torchvision:" + name, model_args=model_args, epochs=1, batch_size=samples, out=out))
except ModelError as exc:  # the architecture cannot take this size
    print("error:", exc, file=sys.stderr)
    sys.exit(3)
print(json.dumps({"input_shape": run.meta["model"]["input_shape"], "parameters": run.meta["model"]["parameters"]}))
"""
CANNOT_TAKE_THE_SIZE = 3


def family(name: str) -> str:
    """The torchvision family a classifier belongs to (resnet18 -> resnet, efficientnet_v2_s -> efficientnet_v2)."""
    return next((prefix for prefix in FAMILY_PREFIXES if name.startswith(prefix)), name)


def classifiers() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def published_parameters(name: str) -> int:
    """The parameter count torchvision publishes for the model's ImageNet weights (nothing is downloaded)."""
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


def smallest_per_family(names: list[str]) -> list[str]:
    """One model per family: the one with the fewest parameters."""
    best: dict[str, str] = {}
    for name in names:
        key = family(name)
        if key not in best or published_parameters(name) < published_parameters(best[key]):
            best[key] = name
    return sorted(best.values())


def run_step(args: list[str], cwd: Path, timeout_s: float) -> dict:
    """Run one command; its exit code, seconds, peak memory and, when it failed, its one-line error."""
    started = time.perf_counter()
    timed_out = False
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(args, cwd=cwd, stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # wait4: this child's own peak memory
                if pid:
                    break
                if time.perf_counter() > started + timeout_s:
                    timed_out = True
                    process.kill()
                    _, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): leave no step running
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": process.returncode}
    if timed_out:
        return {**result, "ok": False, "error": f"timeout after {timeout_s:g} s"}
    if process.returncode == 0:
        return {**result, "ok": True, "stdout": (cwd / "stdout.txt").read_text()}
    lines = [line for line in (cwd / "stderr.txt").read_text().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return {**result, "ok": False, "error": (errors or lines or [f"exit {process.returncode}"])[-1][:300], "stderr_tail": lines[-15:]}


def walk_one(name: str, scratch: Path, timeout_s: float) -> dict:
    """Train and export at the smallest size that both take, then compress and bench; stops at the first failing step."""
    try:
        return _walk(name, scratch / name, timeout_s)
    finally:
        shutil.rmtree(scratch / name, ignore_errors=True)  # a large model's runs take gigabytes


def _walk(name: str, scratch: Path, timeout_s: float) -> dict:
    bmc = [sys.executable, "-m", "bmc"]
    outcome: dict = {"family": family(name), "steps": {}, "smaller_sizes": {}}
    for size in SIZES_PX:
        folder = scratch / f"{size}px"
        folder.mkdir(parents=True)
        run = folder / "run"
        trained = run_step([sys.executable, "-c", TRAIN, name, str(run), str(size), str(SAMPLES)], folder, timeout_s)
        stdout = trained.pop("stdout", "")
        outcome["steps"]["train"] = trained
        if trained["exit"] == CANNOT_TAKE_THE_SIZE:
            outcome["smaller_sizes"][size] = trained["error"]
            continue
        if not trained["ok"]:
            return {**outcome, "status": "fail", "input_px": size, "failed_step": "train", "error": trained["error"]}
        outcome.update(input_px=size, **json.loads(stdout.strip().splitlines()[-1]))
        exported = run_step([*bmc, "export", str(run)], folder, timeout_s)
        exported.pop("stdout", "")
        outcome["steps"]["export"] = exported
        if exported["ok"]:
            break
        # Some exports only fail at small sizes (adaptive pooling to a size that does not divide
        # the input); a larger size still tests compress, and the note keeps what failed.
        outcome["smaller_sizes"][size] = exported["error"]
    else:
        step = "export" if "export" in outcome["steps"] else "train"
        return {**outcome, "status": "fail", "failed_step": step, "error": outcome["smaller_sizes"][SIZES_PX[-1]]}

    compressed = run_step([*bmc, "compress", str(run), "--prune", "0.5", "--finetune-epochs", "0", "--quantize", "int8", "--json"], folder, timeout_s)
    stdout = compressed.pop("stdout", "")
    outcome["steps"]["compress"] = compressed
    if not compressed["ok"]:
        return {**outcome, "status": "fail", "failed_step": "compress", "error": compressed["error"]}
    outcome["compress"] = {
        stage["stage"]: {k: stage[k] for k in ("macs_removed", "params_removed", "strategy", "blocks_dropped", "chosen", "chosen_recipe", "note") if k in stage}
        for stage in json.loads(stdout).get("stages", [])
    }
    files = [run / "model.onnx", *sorted((run / "compressed").glob("*.onnx"))]
    benched = run_step([*bmc, "bench", *map(str, files), "--batch-sizes", "1", "--iters", "3", "--warmup", "1", "--json"], folder, timeout_s)
    stdout = benched.pop("stdout", "")
    outcome["steps"]["bench"] = benched
    if not benched["ok"]:
        return {**outcome, "status": "fail", "failed_step": "bench", "error": benched["error"]}
    outcome["bench"] = {
        Path(m["path"]).name: {"size_bytes": m["size_bytes"], "latency_ms_median_batch1": m["timings"][0]["latency_ms_median"]}
        for m in json.loads(stdout)["models"] if m["timings"]
    }
    return {**outcome, "status": "pass"}


def print_results(results: dict) -> None:
    rows = []
    for name, result in results.items():
        steps = result.get("steps", {})
        seconds = sum(step.get("seconds", 0) for step in steps.values())
        peak = max((step.get("peak_rss_mib", 0) for step in steps.values()), default=0)
        where = result.get("failed_step", "")
        rows.append([name, result.get("family", ""), result["status"], result.get("input_px", ""), f"{seconds:.0f}", peak,
                     where, result.get("error", result.get("reason", ""))[:140]])
    print_table("torchvision classifiers through train -> export -> compress (prune 0.5, int8) -> bench",
                ["model", "family", "status", "px", "seconds", "peak MiB", "failed at", "error / reason"], rows)
    counts = {status: sum(r["status"] == status for r in results.values()) for status in ("pass", "fail", "skip")}
    print(f"\n{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skipped of {len(results)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="these models only (default: every classifier)")
    parser.add_argument("--families", action="store_true", help="the smallest model of each family only")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per step before it counts as a failure")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    parser.add_argument("--fresh", action="store_true", help="start a new JSON instead of merging into --out")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through run_step's clean-up

    everything = classifiers()
    names = args.models or (smallest_per_family(everything) if args.families else everything)
    unknown = sorted(set(names) - set(everything))
    if unknown:
        raise SystemExit(f"not torchvision classifiers: {', '.join(unknown)}")
    previous = {} if args.fresh or not args.out.is_file() else json.loads(args.out.read_text()).get("models", {})
    results = {name: previous[name] for name in everything if name in previous}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bmc-zoo-") as scratch:
        for name in names:
            if name in SKIP:
                results[name] = {"family": family(name), "status": "skip", "reason": SKIP[name]}
                continue
            print(f"{name} ...", flush=True)
            results[name] = walk_one(name, Path(scratch), args.timeout)
            print(f"  {results[name]['status']} {results[name].get('error', '')}", flush=True)
            ordered = {n: results[n] for n in everything if n in results}
            payload = {
                "command": " ".join(["python", "benchmarks/zoo.py", *sys.argv[1:]]),
                "path": "train 1 step on 16 synthetic samples -> bmc export -> bmc compress --prune 0.5 --finetune-epochs 0 --quantize int8 -> bmc bench",
                "timeout_s": args.timeout,
                "models": ordered,
            }
            write_results("zoo", payload, args.out)
    ordered = {n: results[n] for n in everything if n in results}
    print_results(ordered)
    print(f"({time.perf_counter() - started:.0f} s this run)")


if __name__ == "__main__":
    main()
