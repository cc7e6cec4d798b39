"""`POST /v2/models/{name}/classify`: an image file in, the top-k labels out, using the model's own metadata.

The image is decoded with Pillow, converted to the model's channels, resized to the size the training
data was stored at, and then preprocessed exactly as `bmc bench` preprocesses stored samples
(bmc.bench.accuracy.preprocess: the metadata's normalization, then a resize when the model takes another size).

What one image may cost is bounded from its header, before any pixel is decoded: at most
MAX_IMAGE_PIXELS pixels, a side ratio of at most MAX_ASPECT_RATIO, and MAX_DECODED_BYTES as decoded
(a JPEG decodes at 1/2, 1/4 or 1/8 scale when the model needs no more: Image.draft). The app runs
only a few decodes at once (app.DECODE_THREADS). A PNG whose compressed pixel data ends before its
last row is refused: Pillow would fill the missing rows with zeros and answer.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from bmc.runtime.preprocess import Preprocessing, fold_normalization, preprocess
from bmc.serve_edge.codec import RequestError
from bmc.serve_edge.models import ServedModel

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_PIXELS = 40_000_000  # a decompression bomb is refused before its pixels are decoded
MAX_ASPECT_RATIO = 20  # longer side over shorter side: a 1 x 40,000,000 strip is no photograph
MAX_DECODED_BYTES = 64 * 1024 * 1024  # the image as Pillow holds it: 16 Mpx of RGB, 40 Mpx of grayscale
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")  # Image.reduce takes these (not palette or 1-bit)
MAX_TOP_K = 1000


def classify_input(model: ServedModel) -> tuple[str, tuple[int, int, int], tuple[int, int, int]]:
    """(input name, stored C,H,W, model C,H,W) for a model that takes one NCHW image; RequestError otherwise."""
    if len(model.inputs) != 1 or len(model.inputs[0].dims) != 4 or any(d is None for d in model.inputs[0].dims[1:]):
        raise RequestError(f"model {model.name!r} does not take a single NCHW image with fixed size; use /infer")
    spec = model.inputs[0]
    model_chw = tuple(int(d) for d in spec.dims[1:])
    if spec.datatype != "FP32" or model_chw[0] not in (1, 3):
        raise RequestError(f"model {model.name!r} does not take 1- or 3-channel FP32 images; use /infer")
    stored = tuple(model.metadata.data_input_shape)
    stored_chw = stored if len(stored) == 3 and stored[0] == model_chw[0] and all(d > 0 for d in stored) else model_chw
    return spec.name, stored_chw, model_chw


def decode_image(data: bytes, stored_chw: tuple[int, int, int]) -> np.ndarray:
    """uint8 [1, C, H, W] at the stored size from PNG or JPEG bytes; RequestError for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise RequestError(f"send a PNG or JPEG image; got {image.format or 'an unknown format'}")
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise RequestError(f"the image is {width}x{height}; at most {MAX_IMAGE_PIXELS} pixels are decoded")
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise RequestError(f"the image is {width}x{height}; its aspect ratio is over {MAX_ASPECT_RATIO}:1")
        channels, rows, cols = stored_chw
        mode = "L" if channels == 1 else "RGB"
        if image.format == "JPEG":
            image.draft(mode, (cols, rows))  # decoded at the smallest DCT scale still at least (cols, rows)
        reducible = image.mode in REDUCIBLE_MODES
        # What the decode holds at its peak: the decoded image, plus its conversion when it cannot be reduced first.
        decoded_bytes = image.size[0] * image.size[1] * (_bytes_per_pixel(image.mode) + (0 if reducible else _bytes_per_pixel(mode)))
        if decoded_bytes > MAX_DECODED_BYTES:
            raise RequestError(f"the image is {width}x{height} {image.mode}; decoding it would take over {MAX_DECODED_BYTES >> 20} MiB")
        if image.format == "PNG" and _last_row_unwritten(image) and not png_pixel_data_complete(data):
            raise RequestError("the PNG's pixel data stops before its last row")
        if reducible:
            # Box-reduced by whole factors to within 3x of the stored size, so the conversion copies a small image.
            factors = (image.size[0] // (3 * cols), image.size[1] // (3 * rows))
            if max(factors) > 1:
                image = image.reduce((max(1, factors[0]), max(1, factors[1])))
        image = image.convert(mode)
        if image.size != (cols, rows):
            image = image.resize((cols, rows), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"the body is not a readable PNG or JPEG image ({type(exc).__name__})") from None
    pixels = pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels[None, ...]


def _last_row_unwritten(image) -> bool:
    """Whether a decode that stopped early could explain this image: Pillow's image memory starts as
    zeros, so one that reached the last row of a non-interlaced PNG leaves something else there (the
    full check inflates the pixel data a second time; only all-zero last rows and interlaced images pay for it)."""
    image.load()
    if image.info.get("interlace"):
        return True
    width, height = image.size
    extrema = image.crop((0, height - 1, width, height)).getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(low == 0 and high == 0 for low, high in bands)


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow stores per pixel: 1 byte for 1-band 8-bit modes, 2 for 16-bit, 4 for the rest (RGB is padded)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


# Adam7: each pass's first column, first row, column step and row step.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_pixel_data_complete(data: bytes) -> bool:
    """Whether a PNG's IDAT stream inflates to every row its header promises (inflated in 1 MiB steps, not kept)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return False
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = _PNG_CHANNELS.get(color_type, 0) * bit_depth
    if bits == 0:
        return False

    def row_bytes(pixels: int) -> int:
        return 1 + (pixels * bits + 7) // 8  # the filter byte, then the pixels

    if interlace:
        expected = 0
        for x0, y0, dx, dy in _ADAM7:
            pass_width, pass_height = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            if pass_width > 0 and pass_height > 0:
                expected += pass_height * row_bytes(pass_width)
    else:
        expected = height * row_bytes(width)
    inflater = zlib.decompressobj()
    produced, offset, view = 0, 8, memoryview(data)
    try:
        while offset + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[offset : offset + 8])
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                pending = view[offset + 8 : offset + 8 + length]
                while pending:
                    produced += len(inflater.decompress(pending, 1 << 20))
                    if produced >= expected:
                        return True
                    pending = inflater.unconsumed_tail
                    if inflater.eof:
                        return False
            offset += 12 + length
        produced += len(inflater.flush())
    except zlib.error:
        return False
    return produced >= expected


def preprocessing_for(model: ServedModel, stored_chw: tuple[int, int, int], model_chw: tuple[int, int, int]) -> Preprocessing:
    """The model's normalization folded into a multiply-add (as training folds it), plus a resize if needed."""
    norm = model.metadata.normalization or {"scale": 1.0, "mean": [0.0], "std": [1.0]}
    try:
        multiplier, offset = fold_normalization(norm, model_chw[0], image=True)
    except ValueError as exc:
        raise RequestError(f"model {model.name!r}: {exc}") from None
    resize_to = None if stored_chw[1:] == model_chw[1:] else (model_chw[1], model_chw[2])
    return Preprocessing(multiplier, offset, resize_to)


def image_tensor(model: ServedModel, data: bytes) -> tuple[str, np.ndarray]:
    """(input name, float32 [1, C, H, W]) ready for the model; runs off the event loop (decoding is slow)."""
    input_name, stored_chw, model_chw = classify_input(model)
    pixels = decode_image(data, stored_chw)
    return input_name, preprocess(pixels, preprocessing_for(model, stored_chw, model_chw))


def top_k(model: ServedModel, outputs: dict[str, np.ndarray], k: int) -> list[dict]:
    """The k best classes of the first output as [{"index", "label", "probability"}], best first."""
    logits = np.asarray(outputs[model.outputs[0].name], dtype=np.float64).reshape(-1)
    if logits.size == 0:
        raise RequestError(f"model {model.name!r} gave an empty output")
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    names = model.metadata.class_names
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"index": int(i), "label": names[i] if i < len(names) else str(int(i)), "probability": float(probabilities[i])}
        for i in best
    ]


def parse_top_k(query_string: bytes) -> int:
    """`top_k` from the query string (default 5), 1..MAX_TOP_K."""
    from urllib.parse import parse_qs

    values = parse_qs(query_string.decode("latin-1")).get("top_k")
    if not values:
        return 5
    try:
        k = int(values[-1])
    except ValueError:
        raise RequestError(f"top_k must be an integer; got {values[-1][:20]!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise RequestError(f"top_k must be in [1, {MAX_TOP_K}]; got {k}")
    return k
