"""The clusterer registry: every method maps features and/or a kNN graph to cluster labels.

A clusterer is a function ``fn(features, knn, **params) -> labels``: ``features`` is an
``(N, d)`` float32 array of L2-normalised rows, ``knn`` a :class:`~robustface.cluster.knn.KnnGraph`
over the same rows (``None`` for methods that do not use one, e.g. k-means), and ``labels`` an
``(N,)`` int64 array of cluster ids ``0..C-1`` (``-1`` only where a method leaves a sample
unassigned; metrics count each such sample as its own singleton).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from robustface.utils.registry import Registry

__all__ = ["CLUSTERERS", "Clusterer"]

Clusterer = Callable[..., np.ndarray]
CLUSTERERS: Registry[Clusterer] = Registry("clusterer")
