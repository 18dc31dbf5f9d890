"""IResNet (insightface arcface_torch ``backbones/iresnet.py``): r18, r34, r50, r100, r200.

Module names, state_dict keys and shapes match arcface_torch, so a released ``backbone.pth`` /
``model.pt`` (a bare state_dict) loads with ``strict=True`` and no renaming. At 112 px, width 1 and
embedding 512 the parameter counts are r18 24.03M, r34 34.14M, r50 43.59M, r100 65.16M,
r200 118.83M. Input: aligned RGB, ``(x/255 - 0.5)/0.5``; output: the raw 512-d embedding.

Additions (all default to arcface_torch's behaviour): ``input_size`` sizes ``fc`` from the final
feature map (112 -> 7x7, 56 -> 4x4), ``width`` scales the 64/128/256/512 channels, ``amp_dtype``
picks the autocast dtype (see :mod:`robustface.models.meta`). arcface_torch's
``zero_init_residual`` (which zeroes ``bn2`` rather than the last BN of the branch) is left out.
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


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN, conv3x3, BN, PReLU, conv3x3(stride), BN, plus shortcut.

    The shortcut (``downsample``: conv1x1(stride) + BN) exists when stride or width changes.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(FaceBackbone):
    """arcface_torch IResNet with four stages of :class:`IBasicBlock` (``depths`` blocks each).

    Args:
        depths: blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        embedding_size: output dimension (``fc`` out_features / ``features``).
        input_size: side of the square input; ``fc`` takes ``C * s * s`` with ``s`` the final
            map side (``ceil(input_size / 16)``).
        width: channel multiplier for 64/128/256/512 (``embedding_size`` is independent).
        dropout: dropout before ``fc`` (arcface_torch default 0).
        fp16: run the trunk (and ``bn2``/dropout) under autocast; ``fc``/``features`` stay fp32.
        amp_dtype: autocast dtype; ``None`` = float16 on CUDA, bfloat16 on CPU.
    """

    def __init__(
        self,
        depths: Sequence[int],
        *,
        embedding_size: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        check_common_args(
            embedding_size=embedding_size, input_size=input_size, width=width, dropout=dropout
        )
        depths = check_stages("depths", depths)
        super().__init__(
            embedding_size=embedding_size, input_size=input_size, fp16=fp16, amp_dtype=amp_dtype
        )
        self.depths = depths
        self.width = width
        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = _conv3x3(3, planes[0])
        self.bn1 = nn.BatchNorm2d(planes[0], eps=1e-5)
        self.prelu = nn.PReLU(planes[0])
        inplanes = planes[0]
        stages = []
        for n, p in zip(self.depths, planes, strict=True):
            blocks = [IBasicBlock(inplanes, p, stride=2)] + [
                IBasicBlock(p, p) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            inplanes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(planes[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        side = final_map_size(input_size)
        self.fc = nn.Linear(planes[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()
        self.meta = BackboneMeta(input_size=input_size, color_order="RGB", source="arcface_torch")
        self.feature_aliases = {f"layer{i}": f"layer{i}.{n - 1}" for i, n in enumerate(depths, 1)}

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def _stem(self, x: Tensor) -> Tensor:
        return self.prelu(self.bn1(self.conv1(x)))

    def trunk_units(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """``stem`` then every block as ``layerI.J``; aliases ``layerI`` name each stage's end."""
        units: list[tuple[str, Callable[[Tensor], Tensor]]] = [("stem", self._stem)]
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1):
            units.extend((f"layer{i}.{j}", block) for j, block in enumerate(stage))
        return units

    def forward_head(self, fmap: Tensor) -> Tensor:
        """``bn2`` -> flatten -> dropout (autocast if ``fp16``) -> ``fc`` -> ``features`` (fp32)."""
        with self.autocast(fmap):
            x = self.dropout(torch.flatten(self.bn2(fmap), 1))
        with self.float32(x):
            return self.features(self.fc(x.float()))


@BACKBONES.register("r18")
def r18(**kwargs: Any) -> IResNet:
    """IResNet-18, depths (2, 2, 2, 2): 24.03M parameters, 2.6 GMACs at 112 px."""
    return IResNet((2, 2, 2, 2), **kwargs)


@BACKBONES.register("r34")
def r34(**kwargs: Any) -> IResNet:
    """IResNet-34, depths (3, 4, 6, 3): 34.14M parameters."""
    return IResNet((3, 4, 6, 3), **kwargs)


@BACKBONES.register("r50")
def r50(**kwargs: Any) -> IResNet:
    """IResNet-50, depths (3, 4, 14, 3): 43.59M parameters, 6.3 GMACs at 112 px."""
    return IResNet((3, 4, 14, 3), **kwargs)


@BACKBONES.register("r100")
def r100(**kwargs: Any) -> IResNet:
    """IResNet-100, depths (3, 13, 30, 3): 65.16M parameters, 12.1 GMACs at 112 px."""
    return IResNet((3, 13, 30, 3), **kwargs)


@BACKBONES.register("r200")
def r200(**kwargs: Any) -> IResNet:
    """IResNet-200, depths (6, 26, 60, 6): 118.83M parameters, 23.5 GMACs at 112 px."""
    return IResNet((6, 26, 60, 6), **kwargs)


@BACKBONES.register("r18_tiny")
def r18_tiny(**kwargs: Any) -> IResNet:
    """CPU preset: IResNet-18 at width 0.25 (16/32/64/128 channels) on 56 px input.

    With the default 512-d embedding: 1.75M parameters (1.05M of them in ``fc``, 2048 -> 512),
    44 MMACs (88 MFLOPs) per image forward. Any keyword overrides the preset.
    """
    return IResNet((2, 2, 2, 2), **{"width": 0.25, "input_size": 56, **kwargs})
