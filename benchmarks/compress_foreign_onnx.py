"""bmc compress on an ONNX file bmc did not train, calibrated on a folder of unlabeled images.

torchvision's resnet18 (random weights: speed only) exported at --input-size, a few hundred real
CIFAR-10 JPEGs unpacked flat into a folder (32 px: resized up, fine for calibration), then exactly
what `bmc compress MODEL.onnx --calib-data images --calib-data-dir DIR --mean imagenet` does.
Prints what compress chose and its ratios against the fp32 original, measured in the same run;
writes the report with the environment.

    python benchmarks/compress_foreign_onnx.py                          # resnet18, 224 px, 300 images
    python benchmarks/compress_foreign_onnx.py --model mobilenet_v2 --images 500
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_CIFAR, print_compress, write_results  # noqa: E402

from bmc.compress import CompressConfig, QuantizeConfig, compress  # noqa: E402
from bmc.compress.quantize.config import InputPreprocessing  # noqa: E402


def unpack_images(target: Path, count: int) -> Path:
    """count training JPEGs of the shared CIFAR-10, flat in target (no class folders: no labels)."""
    target.mkdir(parents=True, exist_ok=True)
    if len(list(target.glob("*.jpg"))) >= count:
        return target
    written = 0
    with tarfile.open(SHARED_CIFAR) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "train":
                (target / f"{parts[-2]}-{parts[-1]}").write_bytes(archive.extractfile(member).read())
                written += 1
                if written == count:
                    break
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "bmc-foreign-onnx")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    from bmc.export import ExportConfig, export

    args.scratch.mkdir(parents=True, exist_ok=True)
    source = args.scratch / f"{args.model}-{args.input_size}.onnx"
    if not source.is_file():
        export(ExportConfig(model=f"torchvision:{args.model}", input_size=args.input_size, num_classes=1000, out=source, verify_samples=4))
    images = unpack_images(args.scratch / "images", args.images)
    command = f"bmc compress {source} --calib-data images --calib-data-dir {images} --mean imagenet -o {args.scratch / 'compressed'}"
    print(command)
    started = time.perf_counter()
    report = compress(CompressConfig(source=source, out=args.scratch / "compressed", quantization=QuantizeConfig(
        calib_data="images", calib_data_dir=images, preprocessing=InputPreprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))))
    seconds = time.perf_counter() - started
    print_compress(report)
    print(f"\ncompress took {seconds:.0f} s")
    write_results(f"compress_foreign_onnx_{args.model}_{args.input_size}", {
        "command": command, "images": args.images, "compress_seconds": round(seconds, 1), "report": report.to_dict(),
    }, args.out)


if __name__ == "__main__":
    main()
