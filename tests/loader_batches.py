"""The trainer's loader batches as the per-sample path gives them, for tests."""

from __future__ import annotations

import numpy as np
import torch


def flipped_planes(images: torch.Tensor, flips: torch.Tensor) -> np.ndarray:
    """A sent batch (``NxHxWx3`` uint8, flips still to do) as ``Nx3xHxW`` planes, flipped image by
    image in numpy: what stacking the per-sample tensors ``TrainSet[i][0]`` gives."""
    rows = [im[:, ::-1] if f else im for im, f in zip(images.numpy(), flips.tolist(), strict=True)]
    return np.ascontiguousarray(np.stack(rows).transpose(0, 3, 1, 2))
