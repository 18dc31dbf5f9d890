"""Face-recognition backbones, built by name from the ``BACKBONES`` registry.

Registered: IResNet ``r18 r34 r50 r100 r200`` and the CPU preset ``r18_tiny`` (arcface_torch
layout), IR / IR-SE ``ir_18 ir_50 ir_101 ir_se_18 ir_se_50 ir_se_101`` (AdaFace/CAFace layout,
BGR weights) and MobileFaceNet ``mbf mbf_large``. Every factory takes ``embedding_size``,
``input_size``, ``width``, ``fp16`` and ``amp_dtype``; IResNet and IR also ``dropout``.
"""

from __future__ import annotations

from typing import Any

from robustface.models.ir import (
    IR,
    AdaFaceOutput,
    BasicBlockIR,
    SEModule,
    load_adaface_checkpoint,
    split_norm,
)
from robustface.models.iresnet import IBasicBlock, IResNet
from robustface.models.meta import BACKBONES, BackboneMeta, FaceBackbone
from robustface.models.mobilefacenet import MobileFaceNet


def build_backbone(name: str, **kwargs: Any) -> FaceBackbone:
    """Build the backbone registered as ``name``; ``kwargs`` go to its factory.

    Unknown names raise ``KeyError`` listing close matches; unknown keyword arguments raise
    ``TypeError`` naming them.
    """
    return BACKBONES.build(name, **kwargs)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching the shell-style ``pattern``, sorted."""
    return BACKBONES.names(pattern)


__all__ = [
    "BACKBONES",
    "IR",
    "AdaFaceOutput",
    "BackboneMeta",
    "BasicBlockIR",
    "FaceBackbone",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "SEModule",
    "build_backbone",
    "list_backbones",
    "load_adaface_checkpoint",
    "split_norm",
]
