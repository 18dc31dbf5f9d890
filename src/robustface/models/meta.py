"""What every backbone shares: weight metadata, the backbone registry and the ``FaceBackbone`` base.

Weight metadata (:class:`BackboneMeta`: input size, mean/std, colour order) is kept apart from
architecture arguments, as in timm: checkpoints of similar architectures differ there (arcface_torch
weights take RGB, AdaFace/CAFace weights BGR).

:class:`FaceBackbone` gives every backbone the same surface:

* ``forward_features(x)`` -> the trunk's last feature map;
* ``forward_head(fmap)`` -> the raw (not normalised) embedding;
* ``forward(x)`` = ``forward_head(forward_features(x))``;
* ``forward_intermediates(x, names)`` -> ``(embedding, {name: feature map})`` and
  ``intermediates(x, names)`` -> ``{name: feature map}`` (stops after the deepest requested unit),
  with names from ``feature_names()``: each block's own name (``layer3.5``, ``body.45``) plus
  stage aliases (``layer3``, ``stage3``).

Mixed precision follows arcface_torch's ``fp16`` flag: with ``fp16=True`` the convolutional trunk
runs under ``torch.autocast`` on the input's device, with ``amp_dtype`` or, when that is ``None``,
float16 on CUDA and bfloat16 elsewhere (CPU autocast is meant for bfloat16). The embedding layers
(``fc`` / ``features``, AdaFace's Linear + BatchNorm1d, MobileFaceNet's ``conv_sep`` + GDC) always
run in float32 with autocast disabled, also under an outer ``autocast``, so embeddings are float32.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from robustface.utils.guards import check_int, check_real
from robustface.utils.registry import Registry

BACKBONES: Registry[Callable[..., FaceBackbone]] = Registry("backbone")

ColorOrder = Literal["RGB", "BGR"]


@dataclass(frozen=True)
class BackboneMeta:
    """How a backbone's weights expect their input (not how the architecture is built).

    ``mean``/``std`` apply to pixels scaled to [0, 1] and are given in the model's channel order;
    ``(0.5, 0.5, 0.5)`` for both is the usual face-recognition ``(x/255 - 0.5)/0.5``.
    """

    input_size: int
    color_order: ColorOrder = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    source: str = ""

    def prepare(self, images_rgb: Tensor) -> Tensor:
        """Turn RGB images in [0, 255] (``N x 3 x H x W``, any dtype) into the model's input.

        Reorders channels to ``color_order`` and normalises with ``mean``/``std``; returns float32.
        """
        if images_rgb.ndim != 4 or images_rgb.shape[1] != 3:
            raise ValueError(
                f"images_rgb must be N x 3 x H x W, got shape {tuple(images_rgb.shape)}"
            )
        x = images_rgb.float() / 255.0
        if self.color_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def scaled_channels(channels: int, width: float) -> int:
    """``channels`` (a multiple of 64) times ``width``, kept a multiple of ``round(64*width)``.

    Every channel count of the face backbones is a multiple of 64; scaling the 64-channel unit
    instead of each count keeps ratios (and depthwise group divisibility) exact.
    """
    return (channels // 64) * max(1, round(64 * width))


def final_map_size(input_size: int, downsamplings: int = 4) -> int:
    """Side of the last feature map after ``downsamplings`` stride-2 convs (3x3 pad 1 or 1x1).

    Each halves the side rounding up: 112 -> 7, 56 -> 4, 64 -> 4.
    """
    size = input_size
    for _ in range(downsamplings):
        size = math.ceil(size / 2)
    return size


def check_common_args(
    *, embedding_size: int, input_size: int, width: float, dropout: float = 0.0
) -> None:
    """Raise naming the first backbone argument of the wrong type (``ParameterTypeError``) or out
    of range (``ValueError``)."""
    check_int("embedding_size", embedding_size, 1)
    check_int("input_size (square side)", input_size, 1)
    check_real("width", width, 0, open_low=True)
    check_real("dropout", dropout, 0, 1, open_high=True)


def check_stages(name: str, counts: Sequence[int]) -> tuple[int, ...]:
    """``counts`` (blocks per stage of the four stages) as a tuple of ints; raises naming
    ``name`` unless they are 4 positive integers."""
    if len(counts) != 4:
        raise ValueError(f"{name} must be 4 positive ints, got {tuple(counts)!r}")
    return tuple(check_int(f"{name}[{i}]", n, 1) for i, n in enumerate(counts))


class FaceBackbone(nn.Module, ABC):
    """Base of the face backbones: forward split, mixed-precision policy, intermediate maps.

    Subclasses build their modules, set ``meta`` and ``feature_aliases``, and implement
    ``trunk_units`` (the trunk as ordered named steps) and ``forward_head``.
    """

    meta: BackboneMeta

    def __init__(
        self,
        *,
        embedding_size: int,
        input_size: int,
        fp16: bool,
        amp_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.fp16 = fp16
        self.amp_dtype = amp_dtype
        self.feature_aliases: dict[str, str] = {}

    @abstractmethod
    def trunk_units(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """The trunk as ``(name, step)`` pairs in execution order (stem first, last block last)."""

    @abstractmethod
    def forward_head(self, fmap: Tensor) -> Tensor:
        """Embedding (raw, float32) from the trunk's last feature map."""

    def autocast(self, x: Tensor) -> contextlib.AbstractContextManager[None]:
        """The trunk's autocast context for input ``x`` (a no-op unless ``fp16``)."""
        if not self.fp16:
            return contextlib.nullcontext()
        device_type = x.device.type
        dtype = self.amp_dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        return torch.autocast(device_type, dtype=dtype)

    @staticmethod
    def float32(x: Tensor) -> contextlib.AbstractContextManager[None]:
        """Context that disables autocast on ``x``'s device (for the embedding layers)."""
        if torch.amp.is_autocast_available(x.device.type):
            return torch.autocast(x.device.type, enabled=False)
        return contextlib.nullcontext()

    def feature_names(self) -> list[str]:
        """Names accepted by ``intermediates``: unit names in order, then the aliases."""
        return [name for name, _ in self.trunk_units()] + list(self.feature_aliases)

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk's last feature map (``N x C x s x s``; reduced precision under ``fp16``)."""
        with self.autocast(x):
            for _, step in self.trunk_units():
                x = step(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Raw embedding ``N x embedding_size`` (not L2-normalised, as arcface_torch)."""
        return self.forward_head(self.forward_features(x))

    def intermediates(self, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Feature maps after the named units/stages; the trunk stops after the deepest one."""
        _, maps = self._run_trunk(x, names, stop_early=True)
        return maps

    def forward_intermediates(
        self, x: Tensor, names: Sequence[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(embedding, {name: feature map})`` from one full forward pass."""
        fmap, maps = self._run_trunk(x, names, stop_early=False)
        return self.forward_head(fmap), maps

    def _run_trunk(
        self, x: Tensor, names: Sequence[str], *, stop_early: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        units = self.trunk_units()
        order = {name: i for i, (name, _) in enumerate(units)}
        wanted: dict[str, list[str]] = {}
        for name in names:
            unit = self.feature_aliases.get(name, name)
            if unit not in order:
                raise KeyError(
                    f"unknown feature name {name!r}; valid: {', '.join(self.feature_names())}"
                )
            wanted.setdefault(unit, []).append(name)
        last = max((order[u] for u in wanted), default=-1)
        found: dict[str, Tensor] = {}
        with self.autocast(x):
            for i, (unit, step) in enumerate(units):
                if stop_early and i > last:
                    break
                x = step(x)
                for name in wanted.get(unit, ()):
                    found[name] = x
        return x, {name: found[name] for name in names}

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, input_size={self.input_size}, "
            f"fp16={self.fp16}, color_order={self.meta.color_order}"
        )
