"""Build an aggregator by name from command-line style options (``eval ijb``, ``eval megaface``).

``build_aggregator("mean")``; ``build_aggregator("caface", fusion_model=PATH, chunk_size=None)``
(the checkpoint read weights-only by :func:`~robustface.fuse.caface.load_caface_checkpoint`).
A fusion model given to an aggregator that takes none, or ``caface`` without one, is a
``ValueError`` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustface.fuse.base import AGGREGATORS, Aggregator
from robustface.fuse.caface import CAFaceAggregator
from robustface.fuse.styles import embed_with_styles, style_block_names

__all__ = [
    "build_aggregator",
    "check_fusion_model",
    "check_fusion_options",
    "check_fusion_shapes",
    "takes_fusion_model",
]

_EMBEDDINGS = "the backbone's embeddings"


def takes_fusion_model(name: str) -> bool:
    """Whether aggregator ``name`` is built from a fusion model (a CAFace checkpoint); False for
    a name that is not an aggregator (e.g. an IJB template pooler)."""
    return name in AGGREGATORS and issubclass(AGGREGATORS.get(name), CAFaceAggregator)


def check_fusion_options(
    name: str, fusion_model: str | Path | None, chunk_size: int | None = None
) -> None:
    """A ``ValueError`` naming the parameter unless ``fusion_model`` (and ``chunk_size``) are
    given exactly when aggregator ``name`` takes them."""
    if takes_fusion_model(name):
        if fusion_model is None:
            raise ValueError(
                f"fusion_model: the {name!r} aggregation needs a CAFace checkpoint "
                "(--fusion-model PATH)"
            )
        return
    for option, value in (("fusion_model", fusion_model), ("fusion_chunk_size", chunk_size)):
        if value is not None:
            raise ValueError(
                f"{option}: only the caface aggregation takes a fusion model and chunk size, "
                f"got aggregation {name!r}"
            )


def build_aggregator(
    name: str,
    *,
    fusion_model: str | Path | None = None,
    chunk_size: int | None = None,
    unsafe_legacy_load: bool = False,
) -> Aggregator:
    """Aggregator ``name``: ``caface`` from its checkpoint ``fusion_model`` fusing in chunks of
    ``chunk_size`` (``None``: each set in one forward pass), the others as registered."""
    check_fusion_options(name, fusion_model, chunk_size)
    cls = AGGREGATORS.get(name)
    if issubclass(cls, CAFaceAggregator):
        assert fusion_model is not None
        return cls(fusion_model, chunk_size=chunk_size, unsafe_legacy_load=unsafe_legacy_load)
    return cls()


def check_fusion_shapes(
    fusion: Aggregator,
    dim: int,
    channels: int | None,
    source: str,
    path: Any,
    style_source: str | None = None,
) -> None:
    """``fusion`` takes ``dim``-d features and ``channels`` style channels, or a one-line
    ``ValueError`` naming the fusion model ``path`` and what gave the numbers: ``source`` the
    features (e.g. "the backbone's embeddings"), ``style_source`` the styles (default
    ``source``)."""
    if fusion.dim is not None and fusion.dim != dim:
        raise ValueError(
            f"fusion_model {path}: the {fusion.name} aggregator fuses {fusion.dim}-d features, "
            f"{source} are {dim}-d"
        )
    if isinstance(fusion, CAFaceAggregator) and fusion.model.style_channels != channels:
        raise ValueError(
            f"fusion_model {path}: the CAFace checkpoint takes {fusion.model.style_channels} "
            f"style channels, {style_source or source} gives {channels}"
        )


def check_fusion_model(
    fusion: Aggregator,
    model: nn.Module,
    input_size: int,
    *,
    style_blocks: Sequence[str] | None = None,
    fusion_model: str | Path | None = None,
) -> None:
    """Check, before a long embedding, that ``fusion`` fits ``model``'s features and (where it
    needs styles) the styles of ``style_blocks``, from one image's forward pass; a one-line
    ``ValueError`` names the fusion model file and the blocks."""
    blocks = style_block_names(model, style_blocks) if fusion.needs_styles else None
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    device = next(params, torch.empty(0)).device  # an ONNX model has no parameters
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    if blocks is not None:
        feats, styles = embed_with_styles(model, x, blocks)
        blocks_source = f"the backbone's style blocks {', '.join(blocks)}"
        check_fusion_shapes(
            fusion, feats.shape[1], styles.shape[1], _EMBEDDINGS, fusion_model, blocks_source
        )
    else:
        with torch.inference_mode():
            dim = model(x).shape[1]
        check_fusion_shapes(fusion, dim, None, _EMBEDDINGS, fusion_model)
