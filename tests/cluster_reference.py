"""Independent references shared by the clustering tests: a brute-force pairwise F-score, the
GCN graph weights by loops and a planted-cluster data set."""

from __future__ import annotations

import numpy as np

from robustface.cluster.knn import KnnGraph


def pairwise_f(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pairwise F-score by brute force over all pairs; ``-1`` in ``pred`` (unassigned) is a
    singleton; 0 when no pair is right."""
    pred = np.where(pred < 0, pred.max() + 1 + np.arange(len(pred)), pred)
    off = ~np.eye(len(gt), dtype=bool)
    same_gt = (gt[:, None] == gt[None, :]) & off
    same_pred = (pred[:, None] == pred[None, :]) & off
    tp = np.count_nonzero(same_gt & same_pred)
    precision, recall = tp / max(same_pred.sum(), 1), tp / max(same_gt.sum(), 1)
    return 0.0 if tp == 0 else float(2 * precision * recall / (precision + recall))


def planted(
    seed: int, centres: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30 Gaussian identities in 32-d, in 15 overlapping twin pairs, per-sample noise scale
    log-normal (a few far-off samples bridge clusters); the same ``centres`` give another split
    of the same identities."""
    rng = np.random.default_rng(seed)
    dim = 32
    if centres is None:
        base = rng.standard_normal((15, dim))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        twin = base + 0.6 * rng.standard_normal(base.shape) / np.sqrt(dim)
        centres = np.concatenate([base, twin / np.linalg.norm(twin, axis=1, keepdims=True)])
    labels = np.repeat(np.arange(len(centres)), rng.integers(20, 60, len(centres)))
    scale = 0.8 * np.exp(0.5 * rng.standard_normal((len(labels), 1)))
    x = centres[labels] + scale * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels, centres


def dense_weights(graph: KnnGraph) -> np.ndarray:
    """``max(S, S^T) + I``, S = kNN sims >= 0 without self loops (missing entries skipped), by
    loops: the GCN-V/E graph before row normalisation."""
    n = graph.num_samples
    s = np.zeros((n, n))
    for i in range(n):
        for j, sim in zip(graph.nbrs[i], graph.sims[i], strict=True):
            if j >= 0 and j != i and sim >= 0:
                s[i, j] = sim
    return np.maximum(s, s.T) + np.eye(n)
