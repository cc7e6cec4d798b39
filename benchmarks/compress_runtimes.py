"""bmc compress on a trained run, every candidate file timed on every runtime target here.

Exactly what `bmc compress RUN --calib-data-dir DIR [--quantize Q] [--prune R ...]` does; prints
each (file, runtime) pair the int8 search measured with its accuracy change, the choice per batch
size against the best on onnxruntime alone, and the closing summary (original on onnxruntime fp32,
the result there and on the runtime it was chosen for, accuracy on the run's test set); writes the
report with the environment (CPU flags, library versions).

    python benchmarks/compress_runtimes.py --run RUN --data-dir DIR              # resnet20 on CIFAR-10
    python benchmarks/compress_runtimes.py --run RUN --quantize int8-dynamic      # seed-transformer on digits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_compress, write_results  # noqa: E402

from bmc.compress import CompressConfig, QuantizeConfig, compress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the run's data set lives (imagefolder)")
    parser.add_argument("--quantize", default="int8", help="as bmc compress --quantize")
    parser.add_argument("--prune", type=float, default=0.0)
    parser.add_argument("--prune-params", type=float, default=0.0)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="compress's output folder (default RUN/compressed)")
    parser.add_argument("--name", default=None, help="the JSON's name (default: compress_runtimes_<model>)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    args = parser.parse_args()

    options = [f"--quantize {args.quantize}"]
    if args.data_dir:
        options.append(f"--calib-data-dir {args.data_dir}")
    if args.prune:
        options.append(f"--prune {args.prune}" + (f" --prune-params {args.prune_params}" if args.prune_params else ""))
    if args.finetune_epochs is not None:
        options.append(f"--finetune-epochs {args.finetune_epochs}")
    command = f"bmc compress {args.run} {' '.join(options)}"
    print(command)
    started = time.perf_counter()
    report = compress(CompressConfig(
        source=args.run, quantize=args.quantize, prune=args.prune, prune_params=args.prune_params,
        finetune_epochs=args.finetune_epochs, out=args.out_dir, quantization=QuantizeConfig(calib_data_dir=args.data_dir),
    ))
    seconds = time.perf_counter() - started
    print_compress(report)
    print(f"\ncompress took {seconds:.0f} s")
    write_results(args.name or f"compress_runtimes_{args.run.name}", {
        "command": command, "compress_seconds": round(seconds, 1), "report": report.to_dict(),
    }, args.out)


if __name__ == "__main__":
    main()
