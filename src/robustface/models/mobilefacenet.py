"""MobileFaceNet (insightface arcface_torch ``backbones/mobilefacenet.py``): ``mbf``, ``mbf_large``.

Same module names and state_dict keys as arcface_torch (``layers.i...``, ``conv_sep``,
``features.layers`` = GDC: depthwise 7x7 LinearBlock, Flatten, Linear(512 -> 512, no bias),
BatchNorm1d), so their checkpoints load strictly. ``mbf`` = blocks (1, 4, 6, 2), scale 2:
2.06M parameters with a 512-d embedding. Input: RGB, ``(x/255 - 0.5)/0.5``; output: raw embedding.

``input_size`` sets the GDC kernel to the final map side (7 at 112 px, 4 at 56 px); ``width``
scales every channel count (the 64-channel unit, see :func:`~.meta.scaled_channels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustface.models.meta import (
    BACKBONES,
    BackboneMeta,
    FaceBackbone,
    check_common_args,
    check_stages,
    final_map_size,
    scaled_channels,
)
from robustface.utils.guards import check_int


class ConvBlock(nn.Module):
    """Conv (no bias) -> BN -> PReLU, as ``layers`` (keys ``layers.0/1/2``)."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BN, no activation."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 to ``hidden``, depthwise 3x3(stride), linear 1x1 to ``out_c``."""

    def __init__(
        self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool = False
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual :class:`DepthWise` blocks at constant width and resolution."""

    def __init__(self, channels: int, num_block: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden, 1, residual=True) for _ in range(num_block))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: depthwise ``kernel`` conv + BN, flatten, Linear, BatchNorm1d."""

    def __init__(self, channels: int, embedding_size: int, kernel: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel, groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MobileFaceNet(FaceBackbone):
    """arcface_torch MobileFaceNet.

    Args:
        blocks: residual blocks in the four groups (``mbf``: (1, 4, 6, 2)); a first entry of 1
            means a single grouped ConvBlock instead of a Residual group, as arcface_torch.
        scale: channel factor of the trunk (``64*scale`` / ``128*scale``; ``mbf``: 2).
        embedding_size, input_size, width, fp16, amp_dtype: as :class:`~.iresnet.IResNet`;
            under ``fp16`` only ``layers`` run in autocast, ``conv_sep`` and GDC in fp32.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        *,
        embedding_size: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        fp16: bool = False,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        check_common_args(embedding_size=embedding_size, input_size=input_size, width=width)
        blocks = check_stages("blocks", blocks)
        scale = check_int("scale", scale, 1)
        super().__init__(
            embedding_size=embedding_size, input_size=input_size, fp16=fp16, amp_dtype=amp_dtype
        )
        self.blocks = tuple(blocks)
        self.scale = scale
        self.width = width

        def ch(c: int) -> int:
            return scaled_channels(c, width)

        c1, c2 = ch(64 * scale), ch(128 * scale)
        first: nn.Module
        if blocks[0] == 1:
            first = ConvBlock(c1, c1, 3, 1, 1, groups=ch(64))
        else:
            first = Residual(c1, blocks[0], ch(128))
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, 3, 2, 1),
                first,
                DepthWise(c1, c1, ch(128), 2),
                Residual(c1, blocks[1], ch(128)),
                DepthWise(c1, c2, ch(256), 2),
                Residual(c2, blocks[2], ch(256)),
                DepthWise(c2, c2, ch(512), 2),
                Residual(c2, blocks[3], ch(256)),
            ]
        )
        self.conv_sep = ConvBlock(c2, ch(512))
        self.features = GDC(ch(512), embedding_size, final_map_size(input_size))
        self._init_weights()
        self.meta = BackboneMeta(input_size=input_size, color_order="RGB", source="arcface_torch")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def trunk_units(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """``layers.0`` (stem) ... ``layers.7`` (last residual group)."""
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def forward_head(self, fmap: Tensor) -> Tensor:
        """``conv_sep`` -> GDC, in fp32 with autocast disabled."""
        with self.float32(fmap):
            return self.features(self.conv_sep(fmap.float()))


@BACKBONES.register("mbf")
def mbf(**kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet, blocks (1, 4, 6, 2), scale 2: 2.06M parameters (512-d), 112 px."""
    return MobileFaceNet((1, 4, 6, 2), 2, **kwargs)


@BACKBONES.register("mbf_large")
def mbf_large(**kwargs: Any) -> MobileFaceNet:
    """Large MobileFaceNet, blocks (2, 8, 12, 4), scale 4 (arcface_torch ``mbf_large``)."""
    return MobileFaceNet((2, 8, 12, 4), 4, **kwargs)
