"""IR / IR-SE backbones in the face.evoLVe layout used by AdaFace and CAFace (``net.py``).

Layout (state_dict prefixes): ``input_layer`` (conv3x3, BN, PReLU); ``body.i`` blocks with
``shortcut_layer`` (MaxPool2d(1, stride) when channels match, else conv1x1 + BN) and ``res_layer``
(BN, conv3x3, BN, PReLU, conv3x3(stride), BN, and in IR-SE ``se_block``); ``output_layer`` =
BN2d, Dropout(0.4), Flatten, Linear(512*7*7 -> 512), BatchNorm1d(512, affine=False).
AdaFace's Lightning checkpoints prefix these keys with ``model.``: see
:func:`load_adaface_checkpoint`.

Conventions of AdaFace/CAFace weights (recorded in ``model.meta``): input is **BGR**, scaled as
``(x/255 - 0.5)/0.5``; their ``forward`` returns ``(x/|x|, |x|)``. Here ``forward`` returns the raw
embedding like every robustface backbone; wrap the model in :class:`AdaFaceOutput` (or call
:func:`split_norm`) for AdaFace's pair. CAFace's "blocks 15 and 45" of IR-101 are the feature
names ``body.15`` (128 channels, 28x28 at 112 px) and ``body.45`` (256 channels, 14x14).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


class SEModule(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 conv down by ``reduction``, ReLU, 1x1 up, gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BasicBlockIR(nn.Module):
    """face.evoLVe basic IR block (optionally with SE appended to ``res_layer``)."""

    def __init__(self, in_channel: int, depth: int, stride: int, se: bool = False) -> None:
        super().__init__()
        self.shortcut_layer: nn.Module
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )
        if se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IR(FaceBackbone):
    """IR / IR-SE backbone (AdaFace ``Backbone(input_size, num_layers, mode)``).

    Args:
        units: blocks per stage, e.g. ``(3, 4, 14, 3)`` for IR-50, ``(3, 13, 30, 3)`` for IR-101.
        se: add squeeze-and-excitation to every block (IR-SE).
        embedding_size, input_size, width, fp16, amp_dtype: as :class:`~.iresnet.IResNet`.
        dropout: dropout in ``output_layer`` (AdaFace: 0.4).
    """

    def __init__(
        self,
        units: Sequence[int],
        *,
        se: bool = False,
        embedding_size: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.4,
        fp16: bool = False,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        check_common_args(
            embedding_size=embedding_size, input_size=input_size, width=width, dropout=dropout
        )
        units = check_stages("units", units)
        super().__init__(
            embedding_size=embedding_size, input_size=input_size, fp16=fp16, amp_dtype=amp_dtype
        )
        self.units = units
        self.se = se
        self.width = width
        depths = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, depths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(depths[0]),
            nn.PReLU(depths[0]),
        )
        side = final_map_size(input_size)
        # Registered before ``body`` as in AdaFace, so state_dict order matches theirs too.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(depths[3]),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(depths[3] * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )
        blocks = []
        in_channel = depths[0]
        for n, depth in zip(self.units, depths, strict=True):
            blocks.append(BasicBlockIR(in_channel, depth, 2, se))
            blocks.extend(BasicBlockIR(depth, depth, 1, se) for _ in range(n - 1))
            in_channel = depth
        self.body = nn.Sequential(*blocks)
        self._init_weights()
        self.meta = BackboneMeta(input_size=input_size, color_order="BGR", source="AdaFace")
        ends = [sum(self.units[: i + 1]) - 1 for i in range(4)]
        self.feature_aliases = {f"stage{i}": f"body.{e}" for i, e in enumerate(ends, 1)}

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
        """``input_layer`` then ``body.0`` ... ``body.N-1``; aliases ``stage1``..``stage4``."""
        units: list[tuple[str, Callable[[Tensor], Tensor]]] = [("input_layer", self.input_layer)]
        units.extend((f"body.{i}", block) for i, block in enumerate(self.body))
        return units

    def forward_head(self, fmap: Tensor) -> Tensor:
        """BN2d -> dropout -> flatten (autocast if ``fp16``), then Linear -> BN1d in fp32."""
        bn, drop, flatten, linear, bn1d = self.output_layer
        with self.autocast(fmap):
            x = flatten(drop(bn(fmap)))
        with self.float32(x):
            return bn1d(linear(x.float()))


def split_norm(embedding: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """AdaFace's output pair ``(x / |x|, |x|)``; ``|x|`` has shape ``N x 1``.

    The norm is clamped at ``eps`` before dividing (as CAFace does; AdaFace itself does not clamp,
    which only matters for an all-zero embedding).
    """
    norm = embedding.norm(p=2, dim=1, keepdim=True).clamp_min(eps)
    return embedding / norm, norm


class AdaFaceOutput(nn.Module):
    """Wraps a backbone so that ``forward`` returns AdaFace's ``(normalised, norm)`` pair.

    Load weights into ``backbone`` before wrapping (the wrapper adds a ``backbone.`` key prefix).
    Inputs follow the wrapped model's ``meta`` (BGR for AdaFace/CAFace weights).
    """

    def __init__(self, backbone: nn.Module, eps: float = 1e-5) -> None:
        super().__init__()
        self.backbone = backbone
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_norm(self.backbone(x), self.eps)


def adaface_backbone_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(backbone state dict, dropped keys)`` of an AdaFace checkpoint or a bare state dict.

    ``checkpoint`` is either the Lightning checkpoint dict (with a ``"state_dict"`` entry) or the
    state_dict itself. When keys carry AdaFace's ``model.`` prefix, only those keys are kept
    (prefix stripped); the others (the margin head's ``head.kernel``) are returned, sorted. A
    state_dict without the prefix is kept as it is.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint['state_dict'] must be a mapping, got {type(state).__name__}")
    prefix = "model."
    if any(str(k).startswith(prefix) for k in state):
        kept = {k[len(prefix) :]: v for k, v in state.items() if str(k).startswith(prefix)}
        return kept, sorted(k for k in state if not str(k).startswith(prefix))
    return dict(state), []


def load_adaface_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any]) -> list[str]:
    """Load an AdaFace checkpoint into ``model`` (an :class:`IR`) with ``strict=True``.

    See :func:`adaface_backbone_state` for what is loaded; returns the keys left out, sorted.
    """
    kept, dropped = adaface_backbone_state(checkpoint)
    model.load_state_dict(kept, strict=True)
    return dropped


@BACKBONES.register("ir_18")
def ir_18(**kwargs: Any) -> IR:
    """IR-18 (units 2, 2, 2, 2), AdaFace layout."""
    return IR((2, 2, 2, 2), se=False, **kwargs)


@BACKBONES.register("ir_50")
def ir_50(**kwargs: Any) -> IR:
    """IR-50 (units 3, 4, 14, 3), AdaFace layout: 43.58M parameters at 112 px."""
    return IR((3, 4, 14, 3), se=False, **kwargs)


@BACKBONES.register("ir_101")
def ir_101(**kwargs: Any) -> IR:
    """IR-101 (units 3, 13, 30, 3), AdaFace/CAFace layout: 65.15M parameters at 112 px."""
    return IR((3, 13, 30, 3), se=False, **kwargs)


@BACKBONES.register("ir_se_18")
def ir_se_18(**kwargs: Any) -> IR:
    """IR-SE-18 (units 2, 2, 2, 2) with squeeze-and-excitation (reduction 16)."""
    return IR((2, 2, 2, 2), se=True, **kwargs)


@BACKBONES.register("ir_se_50")
def ir_se_50(**kwargs: Any) -> IR:
    """IR-SE-50 (units 3, 4, 14, 3) with squeeze-and-excitation (reduction 16)."""
    return IR((3, 4, 14, 3), se=True, **kwargs)


@BACKBONES.register("ir_se_101")
def ir_se_101(**kwargs: Any) -> IR:
    """IR-SE-101 (units 3, 13, 30, 3) with squeeze-and-excitation (reduction 16)."""
    return IR((3, 13, 30, 3), se=True, **kwargs)
