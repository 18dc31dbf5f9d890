"""Per-image style inputs for CAFace from any robustface backbone, in the same pass as the features.

A style is, for each channel of each chosen intermediate map, the ``(mean, std)`` over its
``H*W`` positions (std unbiased, ``N - 1``), the blocks' channels concatenated in the order given:
``(N, C, 2)`` with ``C`` the sum of the blocks' channel counts. This is the official code's
``Backbone.forward(..., return_style=[3, 5])`` (``mk-minchul/caface``,
``caface/nets/tface_model.py``: ``style_index`` 3 and 5 map to ``body[15]`` and ``body[45]``,
``cat([mean, std], dim=-1)``).
The default blocks (``blocks=None``) are the ends of stages 2 and 3: ``("stage2", "stage3")`` on
IR / IR-SE, which for IR-101 are ``body.15`` (128 channels at 28x28) and ``body.45`` (256
channels at 14x14): ``C = 384``, the published layout; ``("layer2", "layer3")`` on IResNet
(``C`` differs: 384 at width 1, 96 for ``r18_tiny``). MobileFaceNet has no stage aliases: name
its units. Block names are a backbone's unit names or aliases
(:meth:`~robustface.models.meta.FaceBackbone.feature_names`).

Colour order: a model from :func:`robustface.models.loading.load_backbone` whose weights expect
BGR (AdaFace / CAFace IR weights) is wrapped to take RGB; :func:`embed_with_styles` takes the same
input as the model (``model(images)``) and flips it for the wrapped backbone, exactly as the
wrapper does. Maps computed under a backbone's ``fp16`` autocast are upcast to float32 before the
statistics (upstream computes them in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robustface.models.loading import BGRInput
from robustface.models.meta import FaceBackbone
from robustface.utils.guards import check_int

__all__ = [
    "DEFAULT_STYLE_BLOCKS",
    "embed_with_styles",
    "style_block_names",
    "style_channels",
    "styles_from_maps",
]

# the ends of stages 2 and 3 under each family's aliases: IR (IR-101: body.15 and body.45, CAFace's
# style_index 3 and 5), then IResNet
DEFAULT_STYLE_BLOCKS = (("stage2", "stage3"), ("layer2", "layer3"))


def _unwrap(model: nn.Module) -> tuple[FaceBackbone, bool]:
    """The backbone inside ``model`` and whether its input channels are flipped (BGR weights)."""
    flip = isinstance(model, BGRInput)
    backbone = model.backbone if flip else model
    if not isinstance(backbone, FaceBackbone):
        raise ValueError(
            f"model: styles need a robustface backbone with intermediate maps, got "
            f"{type(backbone).__name__} (ONNX models expose only their output)"
        )
    return backbone, flip


def _check_blocks(backbone: FaceBackbone, blocks: Sequence[str] | None) -> list[str]:
    valid = backbone.feature_names()
    if blocks is None:
        for default in DEFAULT_STYLE_BLOCKS:
            if all(name in valid for name in default):
                return list(default)
        raise ValueError(
            f"blocks: {type(backbone).__name__} has no default style blocks; name them "
            f"(valid: {', '.join(valid)})"
        )
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    if not names:
        raise ValueError("blocks: give at least one block name")
    for name in names:
        if name not in valid:
            raise ValueError(f"blocks: unknown block name {name!r}; valid: {', '.join(valid)}")
    return names


def style_block_names(model: nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """The block names ``blocks`` stands for on ``model`` (``None``: the family's default, e.g.
    ``["stage2", "stage3"]``); unknown names raise ``ValueError`` listing the valid ones."""
    return _check_blocks(_unwrap(model)[0], blocks)


def styles_from_maps(maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, C, 2)`` float32 ``[mean, std]`` over ``H*W`` per channel (std unbiased) of the maps
    (each ``N x C_i x H_i x W_i``), concatenated over the maps in order (``C = sum C_i``)."""
    named = list(maps.items()) if isinstance(maps, Mapping) else list(enumerate(maps))
    parts = []
    for name, fmap in named:
        flat = fmap.float().flatten(2)
        if flat.shape[2] < 2:
            raise ValueError(f"blocks: map {name!r} is 1x1; a std needs at least 2 positions")
        parts.append(torch.stack([flat.mean(2), flat.std(2)], dim=2))
    return torch.cat(parts, dim=1)


def style_channels(model: nn.Module, blocks: Sequence[str] | None = None) -> int:
    """``C``, the style channel count of ``blocks`` on ``model`` (one image's partial forward on
    the model's device; free on the meta device)."""
    backbone, _ = _unwrap(model)
    names = _check_blocks(backbone, blocks)
    param = next(backbone.parameters())
    x = torch.zeros(1, 3, backbone.input_size, backbone.input_size, device=param.device)
    with torch.no_grad():
        maps = backbone.intermediates(x, names)
    return sum(int(maps[name].shape[1]) for name in names)


def embed_with_styles(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    blocks: Sequence[str] | None = None,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features ``(N, d)`` (equal to ``model(images)``) and styles ``(N, C, 2)`` of
    ``images``, both float32 on the CPU, from one forward pass per batch.

    ``model`` is a backbone (or :func:`~robustface.models.loading.load_backbone`'s RGB wrapper of
    a BGR one); ``images`` are its input, ``N x 3 x H x W`` float. ``blocks`` are unit names or
    aliases, ``None`` for the family's default (unknown ones raise ``ValueError`` listing the valid
    names). The model runs in eval
    mode without gradients (its mode is restored afterwards), on ``device`` (moved there; default:
    where its parameters are).
    """
    backbone, flip = _unwrap(model)
    names = _check_blocks(backbone, blocks)
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be N x 3 x H x W float, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if device is not None:
        backbone.to(device)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, styles = [], []
    starts = range(0, images.shape[0], batch_size)
    try:
        with torch.inference_mode():
            bar = tqdm(starts, desc="features+styles", unit="batch", disable=not show_progress)
            for start in bar:
                x = images[start : start + batch_size].to(device)
                feats, maps = backbone.forward_intermediates(x.flip(1) if flip else x, names)
                features.append(feats.float().cpu())
                styles.append(styles_from_maps(maps).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(styles)
