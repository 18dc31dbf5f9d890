"""Sparse graphs from kNN lists, and clusters from edges (connected components)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from robustface.cluster.knn import KnnGraph

__all__ = ["components", "knn_adjacency", "knn_edges", "relabel"]


def knn_edges(
    graph: KnnGraph,
    min_sim: float | None = None,
    self_loops: bool = False,
    start: int = 0,
    stop: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's directed edges ``(src, dst, sim)``, without missing entries; with ``min_sim``,
    only those with ``sim >= min_sim``; self loops only when ``self_loops``. Only the edges of
    rows ``start:stop`` (default: all) are listed, with their global ids."""
    nbrs, sims = graph.nbrs[start:stop], graph.sims[start:stop]
    src = np.repeat(np.arange(start, start + len(nbrs), dtype=np.int64), graph.k)
    dst = nbrs.reshape(-1)
    sim = sims.reshape(-1)
    keep = dst >= 0
    if min_sim is not None:
        keep &= sim >= min_sim
    if not self_loops:
        keep &= dst != src
    return src[keep], dst[keep], sim[keep]


def knn_adjacency(
    graph: KnnGraph,
    *,
    min_sim: float | None = None,
    symmetric: bool = True,
    self_loops: bool = False,
    row_normalize: bool = False,
    weighted: bool = True,
) -> sp.csr_matrix:
    """Sparse ``(N, N)`` float32 adjacency of the kNN graph.

    Weights are the cosine similarities (``weighted``) or 1. ``symmetric`` makes
    ``A = max(A, A^T)``; ``self_loops`` sets the diagonal to 1 (GCN-V's ``A + I``);
    ``row_normalize`` divides each row by its sum (rows summing to 0 stay 0).
    """
    n = graph.num_samples
    src, dst, sim = knn_edges(graph, min_sim=min_sim, self_loops=False)
    data = sim.astype(np.float32) if weighted else np.ones(len(src), dtype=np.float32)
    adj = sp.csr_matrix((data, (src, dst)), shape=(n, n), dtype=np.float32)
    adj.sum_duplicates()
    if symmetric:
        adj = adj.maximum(adj.T).tocsr()
    if self_loops:
        adj = (adj + sp.identity(n, dtype=np.float32, format="csr")).tocsr()
    if row_normalize:
        rows = np.asarray(adj.sum(axis=1)).ravel()
        scale = np.divide(1.0, rows, out=np.zeros_like(rows), where=rows != 0)
        adj = sp.diags(scale.astype(np.float32)) @ adj
    return adj.tocsr().astype(np.float32)


def components(num_nodes: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected-component label (0..C-1, by first appearance) of every node, given edges."""
    if num_nodes == 0:
        return np.zeros(0, dtype=np.int64)
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    adj = sp.csr_matrix(
        (np.ones(len(src), dtype=np.int8), (src, dst)), shape=(num_nodes, num_nodes)
    )
    _, labels = connected_components(adj, directed=True, connection="weak")
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map cluster ids to 0..C-1 in order of first appearance; ``-1`` (unassigned) stays ``-1``."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int64)
    valid = labels >= 0
    if not valid.any():
        return out
    uniq, first, inverse = np.unique(labels[valid], return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    out[valid] = rank[inverse]
    return out
