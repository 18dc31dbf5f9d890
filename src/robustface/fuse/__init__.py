"""Feature fusion: one feature for a set of face images (see :mod:`.base`)."""

from __future__ import annotations

from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.fuse.baselines import MeanAggregator, NormWeightedAggregator
from robustface.fuse.caface import CAFace, CAFaceAggregator, load_caface_checkpoint

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CAFace",
    "CAFaceAggregator",
    "FusionMemory",
    "MeanAggregator",
    "NormWeightedAggregator",
    "load_caface_checkpoint",
]
