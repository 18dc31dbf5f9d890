"""Classifiers: class-centre weights, their sharding, and the cosine matrix heads consume."""

from __future__ import annotations

from typing import Any

from robustface.fc.base import CLASSIFIERS, TRAINER_SUPPLIED, Classifier, FCOutput
from robustface.fc.full import FullFC, SubCenterFC
from robustface.fc.loss import distributed_cross_entropy
from robustface.fc.partial_fc import PartialFC, gather_rows, reshard_rows, shard_bounds

__all__ = [
    "CLASSIFIERS",
    "TRAINER_SUPPLIED",
    "Classifier",
    "FCOutput",
    "FullFC",
    "PartialFC",
    "SubCenterFC",
    "build_classifier",
    "distributed_cross_entropy",
    "gather_rows",
    "list_classifiers",
    "reshard_rows",
    "shard_bounds",
]


def build_classifier(name: str, embedding_size: int, num_classes: int, **kw: Any) -> Classifier:
    """The classifier registered as ``name`` (``full``, ``subcenter``, ``partial_fc``).

    Unknown names raise ``KeyError`` listing close matches; unknown keyword arguments raise
    ``TypeError`` listing the classifier's parameters.
    """
    return CLASSIFIERS.build(name, embedding_size, num_classes, **kw)


def list_classifiers(pattern: str = "*") -> list[str]:
    """Registered classifier names matching the shell-style ``pattern``, sorted."""
    return CLASSIFIERS.names(pattern)
