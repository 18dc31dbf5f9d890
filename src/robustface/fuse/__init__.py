"""Feature fusion: one feature for a set of face images (see :mod:`.base`).

Training CAFace lives in :mod:`robustface.fuse.training` (``train_caface``), not imported here:
it pulls in the trainer's checkpoint code."""

from __future__ import annotations

from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.fuse.baselines import MeanAggregator, NormWeightedAggregator
from robustface.fuse.caface import CAFace, CAFaceAggregator, load_caface_checkpoint
from robustface.fuse.extract import FusionFeatures, extract_fusion_features
from robustface.fuse.styles import embed_with_styles, style_channels

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CAFace",
    "CAFaceAggregator",
    "FusionFeatures",
    "FusionMemory",
    "MeanAggregator",
    "NormWeightedAggregator",
    "embed_with_styles",
    "extract_fusion_features",
    "load_caface_checkpoint",
    "style_channels",
]
