#!/usr/bin/env bash
# Every GPU check of the open issues in one bounded run on a lent GPU machine (no network there).
#
# Run from the repository root after onnxruntime-gpu is installed into /tmp/site as
# ../shared/device/README.md says, with the shared CIFAR-10 archive copied to .whl/cifar/:
#
#     bash benchmarks/gpu_checks.sh            # results and a log under $OUT (default /tmp/gpu-checks)
#     bash benchmarks/gpu_checks.sh --open     # only the checks of goals still open (about 6 minutes)
#
# Each step has its own time limit and a failing step does not stop the others: a lent GPU is
# rare and short, so one run has to bring back everything it can.
set -u
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 BMC_CACHE_DIR=/tmp/bmc-cache
py=python3
data=/tmp/cifar10
step() {  # step NAME SECONDS COMMAND...: run it bounded, log it, note how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local began=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - began)) s"
}

step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E 'Model name|^CPU\(s\)'; \
  $py -c 'import torch, onnxruntime as o; o.preload_dlls(); print(torch.__version__, o.__version__, o.get_available_providers())'"
step unpack 60 bash -c "mkdir -p $data && tar xzf .whl/cifar/cifar10-jpeg.tar.gz -C $data && \
  $py -c 'from bmc.data import DataConfig, load_dataset; d = load_dataset(DataConfig(name=\"imagefolder\", data_dir=\"$data\")); print(d.train_x.shape)'"

# Issue 6: serving resnet20 on CUDA, batching on and off, clients spread over 4 processes.
step serve-load 120 $py benchmarks/serve_load.py --providers cuda --models resnet20 --servers bmc,bmc-nobatch \
  --client-processes 4 --seconds 3 --out "$out/serve_load_cuda.json"

# Issue 3: ResNet-18 (CIFAR stem) at batch 512 against the documents' loop, eager and compiled (with and
# without CUDA graphs), MFU against the measured bf16 peak; then one real epoch of train() profiled.
step train-throughput 240 $py benchmarks/train_throughput.py --device cuda --model resnet18 --batch-sizes 512 --epochs 3 \
  --compile-modes default,reduce-overhead --documents-images 5120 --data-dir $data --out "$out/train_throughput_cuda.json"
step train-epoch-profile 100 $py tools/train_epoch_profile.py --device cuda --model resnet18 --batch-size 512 \
  --data-dir $data --out "$out/train_epoch_profile_cuda.json"
step train-step-profile 60 $py tools/train_step_profile.py --device cuda --out "$out/train_step_profile_cuda.json"

if [ "${1:-}" = "--open" ]; then
    step gpu-tests 60 $py -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_bench.py -k "cuda" -x
    echo "done $(date +%T)"
    exit 0
fi

# Issue 5 (and 4's CUDA paths): a resnet20 trained here, fp16 for --target cuda timed on the GPU, then
# fp32 / fp16 / int8 on the CUDA provider, with and without CUDA graphs.
step train-resnet20 60 $py -m bmc train --model resnet20 --dataset imagefolder --data-dir $data --epochs 8 --batch-size 512 \
  --device cuda --out /tmp/r20 --quiet --json
step export-resnet20 45 $py -m bmc export /tmp/r20
step compress-cuda 60 bash -c "$py -m bmc compress /tmp/r20 --target cuda --calib-data-dir $data --json > '$out/compress_cuda.json'; tail -5 '$out/compress_cuda.json'"
step compress-int8 90 bash -c "$py -m bmc compress /tmp/r20 --quantize int8 --calib-data-dir $data --out /tmp/r20/int8 --json > '$out/compress_int8_cpu.json'; tail -3 '$out/compress_int8_cpu.json'"
step export-fp16 45 $py -m bmc export /tmp/r20 --fp16 --out /tmp/r20/model-fp16.onnx
step bench-cuda 90 bash -c "models='/tmp/r20/model.onnx /tmp/r20/model-fp16.onnx'; [ -f /tmp/r20/int8/model-int8.onnx ] && models=\"\$models /tmp/r20/int8/model-int8.onnx\"; \
  $py -m bmc bench \$models --device cuda --batch-sizes 1,32,256 --data imagefolder --data-dir $data --json > '$out/bench_cuda.json'; \
  $py -m bmc bench /tmp/r20/model.onnx /tmp/r20/model-fp16.onnx --device cuda --cuda-graph --batch-sizes 1,32,256 --json > '$out/bench_cuda_graph.json'; \
  $py -m bmc bench \$models --device cuda --batch-sizes 1,32,256"

# The tests that skip without a GPU.
step gpu-tests 100 $py -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_bench.py -k "cuda" -x
echo "done $(date +%T)"
