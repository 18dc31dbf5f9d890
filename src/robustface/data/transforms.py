"""Image -> tensor transforms for face recognition training and evaluation.

Inputs are ``HxWx3`` uint8 RGB arrays (what the datasets return); outputs are ``3xHxW`` float32
tensors normalised as ``(x / 255 - 0.5) / 0.5``, i.e. to ``[-1, 1]`` as in arcface_torch. With
``TrainTransform(normalize=False)`` the output is the ``3xHxW`` uint8 tensor instead (a quarter of
the bytes through a DataLoader's shared memory) and :func:`normalize_images` makes the same float
numbers from a batch of them, on the training device. The trainer's loader goes one step further:
its workers send the augmented ``HxWx3`` images as they are, with the flip still to do, and
``normalize_images(images, flips, channels_last=True)`` does the flip, the de-interleave into
``3xHxW`` planes and the normalisation on the device (:meth:`TrainTransform.augment_unflipped`).

Randomness: each :class:`TrainTransform` draws from its own ``numpy.random.Generator``, created
on first use in every process. Inside a DataLoader worker it is seeded from
``torch.initial_seed()`` (PyTorch sets it to ``base_seed + worker_id``, with ``base_seed`` drawn
from the DataLoader's ``generator`` or the global torch RNG), mixed with ``seed`` when given, so
``torch.manual_seed(s)`` or ``DataLoader(generator=torch.Generator().manual_seed(s))`` makes the
augmentations reproducible and different across workers. In the main process it is seeded from
``seed``, or from ``torch.initial_seed()`` when ``seed`` is None.
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
import torch
import torch.utils.data

from robustface.utils.guards import check_int, check_real

__all__ = [
    "EvalTransform",
    "TrainTransform",
    "image_planes",
    "normalize_images",
    "to_tensor_normalized",
]

_SCALE = np.float32(2.0 / 255.0)
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_DOWN_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC)


def _check_rgb(image: np.ndarray, batch: bool) -> None:
    ndim = 4 if batch else 3
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != ndim:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected a {'NxHxWx3' if batch else 'HxWx3'} uint8 array, got {got}")
    if image.shape[-1] != 3:
        raise ValueError(f"expected 3 RGB channels last, got shape {image.shape}")


def to_tensor_normalized(images: np.ndarray) -> torch.Tensor:
    """Convert ``HxWx3`` (or ``NxHxWx3``) uint8 RGB to ``3xHxW`` (``Nx3xHxW``) float32 in [-1, 1].

    Computes ``(x / 255 - 0.5) / 0.5`` as ``x * (2 / 255) - 1`` in float32.
    """
    batch = isinstance(images, np.ndarray) and images.ndim == 4
    _check_rgb(images, batch=batch)
    if batch:
        return _normalize_planes(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return _to_tensor(images)


def image_planes(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``3xHxW`` uint8 planes of one ``HxWx3`` uint8 image, written into ``out`` if given (a
    C-contiguous ``3xHxW`` uint8 array, e.g. one image of a batch being filled in place)."""
    height, width = image.shape[:2]
    planes = np.empty((3, height, width), dtype=np.uint8) if out is None else out
    if planes.shape != (3, height, width) or not planes.flags.c_contiguous:
        raise ValueError(f"a {height}x{width} image does not fit planes of shape {planes.shape}")
    # cv2.split de-interleaves with SIMD straight into the three planes, several times faster
    # than a strided numpy transpose; the planes have the right shape, so none is reallocated.
    cv2.split(np.ascontiguousarray(image), [planes[0], planes[1], planes[2]])
    return planes


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """:func:`to_tensor_normalized` for one image already checked to be ``HxWx3`` uint8."""
    return _normalize_planes(image_planes(image))


def _normalize_planes(planes: np.ndarray) -> torch.Tensor:
    out = planes.astype(np.float32)
    out *= _SCALE
    out -= 1.0
    return torch.from_numpy(out)


def normalize_images(
    images: torch.Tensor, flip: torch.Tensor | None = None, *, channels_last: bool = False
) -> torch.Tensor:
    """uint8 images (``...x3xHxW``, any device) as float32 in [-1, 1] on the same device.

    The same float32 operations as :func:`to_tensor_normalized` (``x * float32(2 / 255)``, then
    ``- 1``, two separately rounded steps), so the numbers are identical to it on any device.

    ``channels_last=True`` takes an ``NxHxWx3`` batch (what the training loader's workers send,
    the images as decoded) and returns the contiguous ``Nx3xHxW`` one. ``flip`` (4-d batches
    only), a boolean tensor of ``N`` on the same device, mirrors image ``i`` left-right where
    ``flip[i]`` is set (the flip the workers drew but left to the device). Both are exact: the
    result equals normalising the ``3xHxW`` images flipped one by one. On the CPU a channels-last
    batch is flipped and de-interleaved image by image with OpenCV (3 µs an image against 40 µs
    for torch's).
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images in a torch tensor, got {got}")
    if channels_last and (images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"expected an NxHxWx3 batch, got shape {tuple(images.shape)}")
    if flip is not None and images.ndim != 4:
        raise ValueError(
            f"flip needs a batch of images (Nx3xHxW or NxHxWx3), got shape {tuple(images.shape)}"
        )
    if flip is not None and (
        not isinstance(flip, torch.Tensor)
        or flip.dtype != torch.bool
        or flip.shape != images.shape[:1]
    ):
        got = (
            f"{flip.dtype} {tuple(flip.shape)}"
            if isinstance(flip, torch.Tensor)
            else type(flip).__name__
        )
        raise ValueError(f"flip must be a bool tensor of {images.shape[0]}, got {got}")
    if channels_last and images.device.type == "cpu":
        images = torch.from_numpy(_flipped_planes(images.numpy(), flip))
    elif channels_last or flip is not None:
        images = _flipped_planes_torch(images, flip, channels_last)
    return images.to(torch.float32).mul_(float(_SCALE)).sub_(1.0)


def _flipped_planes_torch(
    images: torch.Tensor, flip: torch.Tensor | None, channels_last: bool
) -> torch.Tensor:
    """:func:`_flipped_planes` in torch ops on any device (and ``Nx3xHxW`` input), contiguous:
    element-wise kernels and no host sync (a boolean index would wait for the device)."""
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return images.contiguous()


def _flipped_planes(images: np.ndarray, flip: torch.Tensor | None) -> np.ndarray:
    """``Nx3xHxW`` uint8 planes of ``NxHxWx3`` images, those where ``flip`` is set mirrored
    (OpenCV, image by image: the CPU path of :func:`normalize_images`)."""
    count, height, width = images.shape[:3]
    planes = np.empty((count, 3, height, width), dtype=np.uint8)
    flipped = np.empty((height, width, 3), dtype=np.uint8)
    for i, do_flip in enumerate([False] * count if flip is None else flip.tolist()):
        image = cv2.flip(images[i], 1, dst=flipped) if do_flip else images[i]
        image_planes(image, planes[i])
    return planes


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size`` if needed (area when shrinking, bilinear when enlarging)."""
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    shrink = size < height or size < width
    return cv2.resize(
        image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def _check_input_size(input_size: int | None) -> int | None:
    if input_size is None:
        return None
    return check_int("input_size", input_size, 1)


class TrainTransform:
    """Training augmentation: random horizontal flip plus optional degradations, then normalise.

    Each probability is in [0, 1]; 0 turns the augmentation off (only the flip is on by default):

    - ``resize_down_up``: downscale by a factor in U(0.2, 1) with a random interpolation and scale
      back up with the same one (low-resolution faces, as in AdaFace).
    - ``blur``: Gaussian blur with sigma in U(0.1, 2).
    - ``color_jitter``: brightness, contrast and saturation factors each in U(0.5, 1.5).
    - ``grayscale``: replace the colours by their luma.

    ``input_size`` resizes every image to ``input_size x input_size`` when it differs (for small
    models). With ``normalize=False`` the result is the augmented ``3xHxW`` uint8 tensor, for
    :func:`normalize_images` on the training device. See the module docstring for how the
    random generator is seeded.
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        resize_down_up: float = 0.0,
        blur: float = 0.0,
        color_jitter: float = 0.0,
        grayscale: float = 0.0,
        input_size: int | None = None,
        seed: int | None = None,
        normalize: bool = True,
    ) -> None:
        self.flip_p = check_real("flip_p", flip_p, 0, 1)
        self.resize_down_up = check_real("resize_down_up", resize_down_up, 0, 1)
        self.blur = check_real("blur", blur, 0, 1)
        self.color_jitter = check_real("color_jitter", color_jitter, 0, 1)
        self.grayscale = check_real("grayscale", grayscale, 0, 1)
        if seed is not None:
            seed = check_int("seed", seed, 0)
        self.input_size = _check_input_size(input_size)
        self.seed = seed
        self.normalize = bool(normalize)
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None

    def __repr__(self) -> str:
        return (
            f"TrainTransform(flip_p={self.flip_p}, resize_down_up={self.resize_down_up}, "
            f"blur={self.blur}, color_jitter={self.color_jitter}, grayscale={self.grayscale}, "
            f"input_size={self.input_size}, seed={self.seed}, normalize={self.normalize})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"] = None
        state["_rng_pid"] = None
        return state

    @property
    def rng(self) -> np.random.Generator:
        """This process's generator (created, and seeded, on first use in each process)."""
        pid = os.getpid()
        if self._rng is None or self._rng_pid != pid:
            if torch.utils.data.get_worker_info() is not None:
                entropy = [torch.initial_seed()] + ([] if self.seed is None else [self.seed])
            else:
                entropy = [torch.initial_seed() if self.seed is None else self.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_pid = pid
        return self._rng

    @property
    def random_steps(self) -> tuple[str, ...]:
        """The steps of :meth:`augment` that draw random numbers (probability above 0), in
        order: ``()`` draws nothing, ``("flip",)`` (the default) one uniform an image."""
        steps = ("resize_down_up", "blur", "color_jitter", "grayscale", "flip")
        return tuple(s for s in steps if getattr(self, "flip_p" if s == "flip" else s))

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Augment one ``HxWx3`` uint8 RGB image and return a normalised ``3xHxW`` tensor (the
        uint8 one with ``normalize=False``).

        ``rng`` overrides the transform's own generator for this call (the trainer passes one
        seeded per sample and epoch, so augmentation does not depend on loader workers).
        """
        image = self.augment(image, rng)
        return _to_tensor(image) if self.normalize else torch.from_numpy(image_planes(image))

    def augment(
        self,
        image: np.ndarray,
        rng: np.random.Generator | None = None,
        flip_draw: float | None = None,
    ) -> np.ndarray:
        """:meth:`__call__` up to the tensor: the augmented ``HxWx3`` uint8 image (degradations,
        resize, flip), drawing the same numbers from ``rng``.

        ``flip_draw``, given, is the flip's uniform draw instead of ``rng.random()``: for a
        transform whose only random step is the flip, the first draw of the generator it stands
        for (:func:`robustface.utils.seeding.keyed_first_uniforms`).
        """
        image, flip = self.augment_unflipped(image, rng, flip_draw)
        return cv2.flip(image, 1) if flip else image

    def augment_unflipped(
        self,
        image: np.ndarray,
        rng: np.random.Generator | None = None,
        flip_draw: float | None = None,
    ) -> tuple[np.ndarray, bool]:
        """:meth:`augment` without its last step: the ``HxWx3`` uint8 image before the flip, and
        whether to flip it (drawn as :meth:`augment` draws it), for a flip done elsewhere (the
        training device: :func:`normalize_images`)."""
        image = self.degrade(image, rng)
        if self.input_size is not None:
            image = resize_to(image, self.input_size)
        if not self.flip_p:
            return image, False
        if flip_draw is None:  # the transform's own generator only when it is needed
            flip_draw = (self.rng if rng is None else rng).random()
        return image, flip_draw < self.flip_p

    def degrade(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The degradations alone (down-up, blur, jitter, grayscale; no resize, no flip) of one
        ``HxWx3`` uint8 RGB image, as a uint8 image of the same size: the first part of
        :meth:`__call__`, drawing the same numbers from ``rng``."""
        _check_rgb(image, batch=False)
        if not (self.resize_down_up or self.blur or self.color_jitter or self.grayscale):
            return image
        rng = self.rng if rng is None else rng
        # A number is drawn only for the augmentations that are on (the default draws one).
        if self.resize_down_up and rng.random() < self.resize_down_up:
            height, width = image.shape[:2]
            ratio = rng.uniform(0.2, 1.0)
            small = (max(1, round(width * ratio)), max(1, round(height * ratio)))
            interp = int(rng.choice(_DOWN_INTERPOLATIONS))
            image = cv2.resize(image, small, interpolation=interp)
            image = cv2.resize(image, (width, height), interpolation=interp)
        if self.blur and rng.random() < self.blur:
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.1, 2.0))
        if self.color_jitter and rng.random() < self.color_jitter:
            image = _color_jitter(image, rng.uniform(0.5, 1.5, size=3))
        if self.grayscale and rng.random() < self.grayscale:
            image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return image


def _color_jitter(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Scale brightness, then contrast (around the mean luma), then saturation (around luma)."""
    brightness, contrast, saturation = factors.astype(np.float32)
    x = image.astype(np.float32) * brightness
    luma = x @ _GRAY_WEIGHTS
    mean = luma.mean()
    x = (x - mean) * contrast + mean
    luma = (luma[..., None] - mean) * contrast + mean  # luma is linear: weights sum to 1
    x = (x - luma) * saturation + luma
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class EvalTransform:
    """Deterministic transform for evaluation: optional resize to ``input_size``, normalise."""

    def __init__(self, input_size: int | None = None) -> None:
        self.input_size = _check_input_size(input_size)

    def __repr__(self) -> str:
        return f"EvalTransform(input_size={self.input_size})"

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Return the normalised ``3xHxW`` tensor of one ``HxWx3`` uint8 RGB image."""
        _check_rgb(image, batch=False)
        if self.input_size is not None:
            image = resize_to(image, self.input_size)
        return _to_tensor(image)
