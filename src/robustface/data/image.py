"""Image encoding and decoding (RGB uint8 arrays <-> JPEG/PNG bytes)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from robustface.errors import DataFormatError
from robustface.utils.guards import check_int

JPEG_MAGIC = b"\xff\xd8"  # SOI marker: the first two bytes of every JPEG


def decode_image(
    data: bytes, source: str | Path = "<bytes>", key: int | str | None = None
) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to an ``HxWx3`` uint8 RGB array.

    ``source`` and ``key`` only serve the error message when the bytes cannot be decoded.
    """
    try:
        if data[:2] == JPEG_MAGIC:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except (ValueError, cv2.error) as exc:
        msg = f"cannot decode image ({len(data)} bytes): {exc}"
        raise DataFormatError(source, msg, key) from exc
    if img is None:
        raise DataFormatError(source, f"cannot decode image ({len(data)} bytes)", key)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an ``HxWx3`` uint8 RGB array as JPEG (``fmt='jpg'``) or PNG (``fmt='png'``)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
    if fmt in ("jpg", "jpeg"):
        quality = check_int("quality", quality, 1, 100)
        image = np.ascontiguousarray(image)
        return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")
    if fmt == "png":
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError("PNG encoding failed")
        return buf.tobytes()
    raise ValueError(f"fmt must be 'jpg' or 'png', got {fmt!r}")


ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
"""insightface's 5 landmarks (eyes, nose tip, mouth corners) in a 112x112 aligned crop: its 96x112
template shifted by 8 px. SynthFace renders faces onto it; alignment warps onto it."""
