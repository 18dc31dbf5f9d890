"""Feature fusion: one feature for a set of face images (see :mod:`.base`)."""

from __future__ import annotations

from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.fuse.baselines import MeanAggregator, NormWeightedAggregator

__all__ = ["AGGREGATORS", "Aggregator", "FusionMemory", "MeanAggregator", "NormWeightedAggregator"]
