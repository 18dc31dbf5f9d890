"""Feature fusion: one feature for a set of face images (see :mod:`.base`)."""

from __future__ import annotations

from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.fuse.baselines import MeanAggregator, NormWeightedAggregator
from robustface.fuse.caface import CAFace, CAFaceAggregator, load_caface_checkpoint
from robustface.fuse.styles import embed_with_styles, style_channels

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CAFace",
    "CAFaceAggregator",
    "FusionMemory",
    "MeanAggregator",
    "NormWeightedAggregator",
    "embed_with_styles",
    "load_caface_checkpoint",
    "style_channels",
]
