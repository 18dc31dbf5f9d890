"""Margin heads: policies that turn a classifier's cosines into logits (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any

from robustface.heads.adaface import AdaFaceHead  # noqa: F401  (registers "adaface")
from robustface.heads.base import (
    HEAD_CONTEXT,
    HEADS,
    LOCAL,
    HeadNeeds,
    HeadOutput,
    MarginHead,
    ShardContext,
    check_head_inputs,
    head_needs,
)
from robustface.heads.boundaryface import BoundaryFaceHead  # noqa: F401  (registers it)
from robustface.heads.centerbias import CenterBiasFaceHead  # noqa: F401  (registers it)
from robustface.heads.curricular import CurricularFaceHead  # noqa: F401  (registers it)
from robustface.heads.margin import (
    CombinedMarginHead,
    SoftmaxHead,
    arcface,
    combined_margin_target,
    cosface,
    sphereface,
)
from robustface.heads.mv_softmax import MVSoftmaxHead  # noqa: F401  (registers mv_*)
from robustface.heads.robustface import RobustFaceHead  # noqa: F401  (registers "robustface")

__all__ = [
    "HEADS",
    "HEAD_CONTEXT",
    "LOCAL",
    "CombinedMarginHead",
    "HeadNeeds",
    "HeadOutput",
    "MarginHead",
    "ShardContext",
    "SoftmaxHead",
    "arcface",
    "build_head",
    "check_head_inputs",
    "combined_margin_target",
    "cosface",
    "head_needs",
    "list_heads",
    "sphereface",
]


def build_head(name: str, **params: Any) -> MarginHead:
    """The head registered as ``name``, built with keyword ``params`` (e.g. ``scale=32``).

    Unknown names raise ``KeyError`` listing close matches; unknown parameters raise
    ``TypeError`` listing the head's parameters.
    """
    return HEADS.build(name, **params)


def list_heads(pattern: str = "*") -> list[str]:
    """Registered head names matching the shell-style ``pattern``, sorted."""
    return HEADS.names(pattern)
