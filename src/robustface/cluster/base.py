"""The clusterer registry: every method maps features and/or a kNN graph to cluster labels.

A clusterer is a function ``fn(features, knn, **params) -> labels``: ``features`` is an
``(N, d)`` float32 array of L2-normalised rows, ``knn`` a :class:`~robustface.cluster.knn.KnnGraph`
over the same rows (``None`` for methods that do not use one, e.g. k-means), and ``labels`` an
``(N,)`` int64 array of cluster ids ``0..C-1`` (``-1`` only where a method leaves a sample
unassigned; metrics count each such sample as its own singleton).

:data:`TUNINGS` names, for the methods that have one, the threshold that
:func:`~robustface.cluster.benchmark.tune_method` picks on a labelled set and its default grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustface.utils.registry import Registry

__all__ = ["CLUSTERERS", "SIM_GRID", "TUNINGS", "Clusterer", "Tuning"]

Clusterer = Callable[..., np.ndarray]
CLUSTERERS: Registry[Clusterer] = Registry("clusterer")

# Default grid of the cosine-similarity thresholds (cc, Chinese whispers, Infomap, GCN-V/E tau).
SIM_GRID: tuple[float, ...] = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))


@dataclass(frozen=True)
class Tuning:
    """A method's tunable threshold ``param`` and its default ``grid``.

    ``prepare(features, knn, **params)`` (``params`` without ``param``) does the work that does
    not depend on the threshold once, and ``finish(state, value)`` gives the labels at one value
    (e.g. GCN-V's confidence once, then one peak linking per tau). Without them the method is
    called once per grid value.
    """

    param: str
    grid: tuple[float, ...]
    prepare: Callable[..., Any] | None = None
    finish: Callable[[Any, float], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError(f"tuning of {self.param!r}: the grid is empty")
        if (self.prepare is None) != (self.finish is None):
            raise ValueError(f"tuning of {self.param!r}: give both prepare and finish, or neither")


TUNINGS: Registry[Tuning] = Registry("tuning")
