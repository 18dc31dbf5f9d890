"""Align faces to the ArcFace crop: a similarity transform from 5 landmarks to a fixed template.

The landmarks are, in order, left eye, right eye, nose tip, left and right mouth corners (the
person's right eye is on the image left), as ``(x, y)`` pixels. The transform is the least-squares
similarity (rotation, uniform scale, translation; never a reflection) of Umeyama (1991). In 2-D it
has a closed form: with centred points ``p`` (source) and ``q`` (destination) read as complex
numbers, the rotation-and-scale is ``sum(conj(p) * q) / sum(|p|^2)``, which is what
``skimage.transform.SimilarityTransform.estimate`` (insightface's choice) computes by SVD.
"""

from __future__ import annotations

import cv2
import numpy as np

from robustface.data.image import ARCFACE_TEMPLATE
from robustface.utils.guards import check_choice, check_int

__all__ = [
    "ARCFACE_TEMPLATE",
    "TEMPLATE_RULES",
    "align_face",
    "align_faces",
    "arcface_template",
    "similarity_transform",
    "similarity_transforms",
]


TEMPLATE_SIZE = 112
TEMPLATE_RULES = ("scale", "insightface")


def _points(name: str, value: np.ndarray, batched: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    shape = "(N, K, 2)" if batched else "(K, 2)"
    if arr.ndim != (3 if batched else 2) or arr.shape[-1] != 2 or arr.shape[-2] < 2:
        raise ValueError(f"{name} must have shape {shape} with K >= 2, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return arr


def similarity_transforms(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transforms mapping each ``src[i]`` (K x 2) onto ``dst``.

    ``src`` is ``(N, K, 2)``; ``dst`` is ``(K, 2)`` or ``(N, K, 2)``. Returns ``(N, 2, 3)``
    float64 matrices ``[[a, -b, tx], [b, a, ty]]`` for ``cv2.warpAffine``. Raises ``ValueError``
    when a ``src`` set has all its points at one place.
    """
    src = _points("src", src, batched=True)
    dst = np.asarray(dst, dtype=np.float64)
    if dst.ndim == 2:
        dst = np.broadcast_to(dst, src.shape)
    dst = _points("dst", dst, batched=True)
    if dst.shape != src.shape:
        raise ValueError(f"dst must have shape {src.shape[1:]} or {src.shape}, got {dst.shape}")
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=1, keepdims=True)
    p = src - src_mean
    q = dst - dst_mean
    var = np.einsum("nkc,nkc->n", p, p)
    bad = np.flatnonzero(var <= 1e-12)
    if bad.size:
        raise ValueError(
            f"src set {int(bad[0])} has all its points at one place: no transform is defined"
        )
    a = np.einsum("nkc,nkc->n", p, q) / var
    b = np.einsum("nk,nk->n", p[..., 0], q[..., 1]) - np.einsum("nk,nk->n", p[..., 1], q[..., 0])
    b = b / var
    out = np.empty((src.shape[0], 2, 3))
    out[:, 0, 0], out[:, 0, 1] = a, -b
    out[:, 1, 0], out[:, 1, 1] = b, a
    out[:, :, 2] = dst_mean[:, 0] - np.einsum("nij,nj->ni", out[:, :, :2], src_mean[:, 0])
    return out


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The ``2 x 3`` least-squares similarity transform taking ``src`` (K x 2) onto ``dst``."""
    src = _points("src", src, batched=False)
    dst = _points("dst", dst, batched=False)
    if dst.shape != src.shape:
        raise ValueError(f"dst must have the shape of src {src.shape}, got {dst.shape}")
    return similarity_transforms(src[None], dst)[0]


def arcface_template(size: int = TEMPLATE_SIZE, rule: str = "scale") -> np.ndarray:
    """The ArcFace template for a ``size x size`` crop.

    ``rule="scale"`` (robustface's): the 112 px template scaled by ``size / 112``, which matches
    models trained on 112 px crops resized to ``size``. ``rule="insightface"``: insightface's
    ``estimate_norm``: for a multiple of 112 the same; otherwise scaled by ``size / 128`` and
    shifted right by ``8 * size / 128`` (its 128 px crop). Both agree at 112, 224, ...
    """
    size = check_int("size", size, 1)
    check_choice("rule", rule, TEMPLATE_RULES)
    template = ARCFACE_TEMPLATE.astype(np.float64)
    if rule == "scale" or size % TEMPLATE_SIZE == 0:
        return template * (size / TEMPLATE_SIZE)
    ratio = size / 128.0
    return template * ratio + np.array([8.0 * ratio, 0.0])


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")


def _warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE, rule: str = "scale"
) -> np.ndarray:
    """Warp ``image`` (H x W x 3 uint8) so that its 5 ``landmarks`` land on the ArcFace template.

    Returns a ``size x size x 3`` uint8 crop (bilinear, black outside the image), as insightface's
    ``norm_crop``. ``rule`` places the template at sizes other than 112 (:func:`arcface_template`).
    """
    _check_image(image)
    landmarks = _points("landmarks", landmarks, batched=False)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    return _warp(image, similarity_transform(landmarks, arcface_template(size, rule)), size)


def align_faces(
    images: list[np.ndarray], landmarks: np.ndarray, size: int = TEMPLATE_SIZE, rule: str = "scale"
) -> np.ndarray:
    """Align images (any sizes) with their ``(N, 5, 2)`` landmarks: ``N x size x size x 3`` uint8.

    The N transforms are solved in one vectorised call; each image is then warped once.
    """
    landmarks = _points("landmarks", landmarks, batched=True)
    if landmarks.shape[1:] != (5, 2) or landmarks.shape[0] != len(images):
        raise ValueError(
            f"landmarks must have shape ({len(images)}, 5, 2) for {len(images)} images, "
            f"got {landmarks.shape}"
        )
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    if not images:
        return out
    matrices = similarity_transforms(landmarks, arcface_template(size, rule))
    for i, (image, matrix) in enumerate(zip(images, matrices, strict=True)):
        _check_image(image)
        out[i] = _warp(image, matrix, size)
    return out
