"""`POST /v2/models/{name}/classify`: an image file in, the top-k labels out, using the model's own metadata.

The image is decoded with Pillow, converted to the model's channels, resized to the size the training
data was stored at, and then preprocessed exactly as `bmc bench` preprocesses stored samples
(bmc.bench.accuracy.preprocess: the metadata's normalization, then a resize when the model takes another size).
"""

from __future__ import annotations

import io

import numpy as np

from bmc.runtime.preprocess import Preprocessing, fold_normalization, preprocess
from bmc.serve_edge.codec import RequestError
from bmc.serve_edge.models import ServedModel

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_PIXELS = 40_000_000  # a decompression bomb is refused before its pixels are decoded
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
        channels, rows, cols = stored_chw
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (cols, rows):
            image = image.resize((cols, rows), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"the body is not a readable PNG or JPEG image ({type(exc).__name__})") from None
    pixels = pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels[None, ...]


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
