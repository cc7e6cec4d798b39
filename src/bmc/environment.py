"""What machine a number was measured on: CPU model and the flags that decide int8/bf16 speed.

No torch import at module level: bench and serve record their environment too.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# The instruction-set extensions that change which kernels onnxruntime and oneDNN pick.
RELEVANT_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_info() -> dict:
    """CPU model name, logical cores and which RELEVANT_CPU_FLAGS are present."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": [flag for flag in RELEVANT_CPU_FLAGS if flag in flags],
    }


def library_versions(names: tuple[str, ...] = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy")) -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict:
    """Everything a benchmark records about where it ran."""
    return {
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ},
    }
