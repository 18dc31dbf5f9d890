"""Verification pair sets in the insightface ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images
and pair ``p`` is ``(bins[2p], bins[2p + 1])`` with ``issame_list[p]`` telling whether both show
the same person. Files made under Python 2 need ``encoding="bytes"`` to unpickle.

Unpickling runs code chosen by the file's author: only load ``.bin`` files from trusted sources.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from robustface.data.image import decode_image
from robustface.errors import DataFormatError
from robustface.utils.io import atomic_path

__all__ = ["load_bin", "load_bin_images", "write_bin"]


def _unpickle(path: Path) -> object:
    data = path.read_bytes()
    try:
        try:
            return pickle.loads(data)
        except UnicodeDecodeError:  # a Python 2 pickle of str objects holding image bytes
            return pickle.loads(data, encoding="bytes")
    except Exception as exc:  # unpickling can fail in many ways on a corrupt file
        raise DataFormatError(path, f"cannot unpickle: {type(exc).__name__}: {exc}") from exc


def load_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Load a verification ``.bin``: the encoded images and the ``issame`` flags (bool array)."""
    path = Path(path)
    obj = _unpickle(path)
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise DataFormatError(path, f"expected a pickled (bins, issame_list), got {type(obj)}")
    raw_bins, raw_issame = obj
    bins = []
    for i, b in enumerate(raw_bins):
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        elif isinstance(b, bytearray | memoryview):
            b = bytes(b)
        if not isinstance(b, bytes):
            raise DataFormatError(path, f"image {i} is a {type(b).__name__}, not bytes", i)
        bins.append(b)
    flags = np.asarray(raw_issame).ravel()
    if flags.dtype != bool and not (
        np.issubdtype(flags.dtype, np.integer) and np.isin(flags, (0, 1)).all()
    ):
        raise DataFormatError(path, f"issame_list must hold booleans, got dtype {flags.dtype}")
    issame = flags.astype(bool)
    if len(bins) != 2 * issame.size:
        raise DataFormatError(
            path, f"{len(bins)} images for {issame.size} pairs; expected 2 images per pair"
        )
    return bins, issame


def load_bin_images(
    path: str | Path, image_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of a ``.bin``: ``(N x H x W x 3 uint8 RGB, issame bool array)``.

    With ``image_size=(H, W)``, images of another size are resized with bicubic interpolation,
    as insightface's loader does (``mx.image.resize_short`` defaults to ``interp=2``, bicubic).
    Without it, all images must share one size.
    """
    path = Path(path)
    bins, issame = load_bin(path)
    images = None
    for i, data in enumerate(bins):
        image = decode_image(data, path, f"image {i} of pair {i // 2}")
        if image_size is not None and image.shape[:2] != tuple(image_size):
            image = cv2.resize(image, (image_size[1], image_size[0]), interpolation=cv2.INTER_CUBIC)
        if images is None:
            images = np.empty((len(bins), *image.shape), dtype=np.uint8)
        elif image.shape != images.shape[1:]:
            raise DataFormatError(
                path,
                f"image is {image.shape[0]}x{image.shape[1]}, the first one "
                f"{images.shape[1]}x{images.shape[2]}; pass image_size to resize",
                f"image {i} of pair {i // 2}",
            )
        images[i] = image
    if images is None:
        size = (0, 0) if image_size is None else tuple(image_size)
        images = np.empty((0, *size, 3), dtype=np.uint8)
    return images, issame


def write_bin(path: str | Path, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a verification ``.bin`` atomically, in insightface's layout (pickle protocol 4)."""
    bins = [bytes(b) for b in bins]
    flags = [bool(s) for s in issame]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"need 2 images per pair: got {len(bins)} images for {len(flags)} pairs")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, flags), f, protocol=4)
