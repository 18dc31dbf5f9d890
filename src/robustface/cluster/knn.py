"""k-nearest-neighbour graphs of L2-normalised face features (faiss), learn-to-cluster layout.

A :class:`KnnGraph` holds, for each of N samples, its k nearest neighbours by cosine similarity,
most similar first, the sample itself included (as learn-to-cluster's files do). Missing entries
(an approximate index that found fewer than k, or entries removed by a similarity threshold) have
id ``-1`` and similarity ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

from robustface.data.ltc import read_knn, write_knn

__all__ = ["KnnGraph", "build_knn", "check_features", "knn_brute_force", "normalize_rows"]

Method = Literal["flat", "ivf", "hnsw"]
METHODS: tuple[str, ...] = ("flat", "ivf", "hnsw")


@dataclass
class KnnGraph:
    """Neighbour ids ``(N, k)`` int64 and cosine similarities ``(N, k)`` float32, best first."""

    nbrs: np.ndarray
    sims: np.ndarray

    def __post_init__(self) -> None:
        if self.nbrs.ndim != 2 or self.nbrs.shape != self.sims.shape:
            raise ValueError(
                f"nbrs and sims must be (N, k) arrays of one shape, got {self.nbrs.shape} "
                f"and {self.sims.shape}"
            )

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.nbrs.shape[0])

    @property
    def k(self) -> int:
        """Neighbours kept per sample (self included)."""
        return int(self.nbrs.shape[1])

    @property
    def dists(self) -> np.ndarray:
        """Distances ``1 - cos`` (learn-to-cluster's convention); missing entries are ``inf``."""
        return (1.0 - self.sims).astype(np.float32)

    def threshold(self, min_sim: float) -> KnnGraph:
        """A copy without neighbours of similarity below ``min_sim`` (set to -1 / -inf)."""
        drop = self.sims < min_sim
        nbrs = np.where(drop, -1, self.nbrs)
        sims = np.where(drop, -np.inf, self.sims).astype(np.float32)
        return KnnGraph(nbrs, sims)

    def truncate(self, k: int) -> KnnGraph:
        """The first ``k`` neighbours of each sample."""
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in [1, {self.k}], got {k}")
        return KnnGraph(self.nbrs[:, :k].copy(), self.sims[:, :k].copy())

    def save(self, path: str | Path) -> None:
        """Write learn-to-cluster's ``.npz`` (key ``data``, ``[N, 2, k]``, ``1 - cos``)."""
        write_knn(path, self.nbrs, self.dists)

    @classmethod
    def load(cls, path: str | Path) -> KnnGraph:
        """Read a learn-to-cluster kNN ``.npz`` (distances ``1 - cos``)."""
        nbrs, dists = read_knn(path)
        sims = (1.0 - dists.astype(np.float64)).astype(np.float32)
        sims[nbrs < 0] = -np.inf
        return cls(nbrs, sims)


def check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """``features`` as a C-contiguous float32 ``(N, d)`` array; NaN/inf rows are an error."""
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, dim) array, got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {feats.dtype}")
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} has {bad.size} row(s) with NaN or inf values (first: row {bad[0]})"
        )
    return feats


def normalize_rows(features: np.ndarray, name: str = "features") -> np.ndarray:
    """L2-normalised float32 copy of ``features``; a zero row is an error that names it."""
    feats = check_features(features, name)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) that cannot be normalised "
            f"(first: row {int(np.flatnonzero(zero)[0])})"
        )
    return feats / norms


def knn_brute_force(features: np.ndarray, k: int) -> KnnGraph:
    """Exact kNN by a dense numpy similarity matrix (reference for tests; O(N^2) memory).

    Ties are broken by the lower id; the sample itself is first unless a duplicate ties with it.
    """
    feats = normalize_rows(features).astype(np.float64)
    sims = feats @ feats.T
    k = min(k, len(feats))
    order = np.lexsort((np.broadcast_to(np.arange(len(feats)), sims.shape), -sims), axis=1)[:, :k]
    return KnnGraph(order.astype(np.int64), np.take_along_axis(sims, order, 1).astype(np.float32))


def _index(
    feats: np.ndarray, method: str, nlist: int | None, nprobe: int | None, hnsw_m: int, ef: int
) -> faiss.Index:

    n, dim = feats.shape
    if method == "flat":
        index = faiss.IndexFlatIP(dim)
    elif method == "ivf":
        nlist = nlist or max(1, min(4096, int(8 * np.sqrt(n))))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train = feats
        if n > 256 * nlist:  # faiss's own cap on useful training points
            rng = np.random.default_rng(0)
            train = feats[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(train)
        index.nprobe = nprobe or min(128, nlist)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef
    else:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(METHODS)}")
    index.add(feats)
    return index


def build_knn(
    features: np.ndarray,
    k: int = 80,
    method: Method = "flat",
    *,
    batch_size: int = 65536,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 256,
    min_sim: float | None = None,
    normalize: bool = True,
    show_progress: bool = True,
) -> KnnGraph:
    """The k nearest neighbours (self included) of every row by cosine similarity.

    ``method``: ``flat`` (exact, faiss ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, nlist
    ``min(4096, 8 sqrt N)``, nprobe ``min(128, nlist)`` as in learn-to-cluster) or ``hnsw``.
    Queries run in batches of ``batch_size`` (memory ``batch_size * k`` per batch). With
    ``min_sim``, neighbours below that similarity are dropped (id -1).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    feats = normalize_rows(features) if normalize else check_features(features)
    n = len(feats)
    if n == 0:
        raise ValueError("features is empty (0 rows)")
    if method not in METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(METHODS)}")
    k_eff = min(k, n)
    index = _index(feats, method, nlist, nprobe, hnsw_m, ef_search)
    nbrs = np.empty((n, k_eff), dtype=np.int64)
    sims = np.empty((n, k_eff), dtype=np.float32)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=f"kNN ({method})", unit="batch", disable=not show_progress):
        stop = min(start + batch_size, n)
        d, i = index.search(feats[start:stop], k_eff)
        nbrs[start:stop], sims[start:stop] = i, d
    sims[nbrs < 0] = -np.inf
    graph = KnnGraph(nbrs, sims)
    return graph.threshold(min_sim) if min_sim is not None else graph
