"""Clustering metrics: pairwise and BCubed precision / recall / F-score, NMI, cluster statistics.

All metrics are computed from the sparse contingency table of ground-truth identities against
predicted clusters (REFERENCE.md section 8, as learn-to-cluster's ``evaluation/metrics.py``),
vectorised with ``np.bincount`` and one sort, so millions of labels take about a second.

Label conventions:

* in ``pred``, ``-1`` means "not assigned": each such sample counts as a cluster of its own
  (a singleton), never as one cluster of all unassigned samples;
* in ``gt``, ``-1`` means "identity unknown": such samples are left out of every metric (their
  ``pred`` labels too) and reported as ``num_ignored``;
* labels are 1-D integer arrays of one length; values below ``-1`` are an error. Ids need not be
  contiguous; only equality matters.

Degenerate cases:

* no sample with a known identity (empty input, or ``gt`` all ``-1``): ``ValueError``;
* pairwise precision is 1 when no two evaluated samples share a predicted cluster (no predicted
  pair, hence no wrong one; BCubed precision of such a clustering is 1 too), and pairwise recall is
  1 when no two share an identity. learn-to-cluster divides 0 by 0 there and gets NaN;
* an F-score is 0 when precision and recall are both 0;
* NMI follows scikit-learn: 1.0 when both labelings are one single cluster, 0.0 when the mutual
  information is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["bcubed", "cluster_stats", "evaluate_clustering", "nmi", "pairwise"]


def _check_one(name: str, labels: np.ndarray) -> np.ndarray:
    """``labels`` as a 1-D int64 array with no value below -1."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero(arr < -1)
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} label(s) below -1 (first: {name}[{bad[0]}] = {arr[bad[0]]}); "
            "-1 is the only negative label allowed"
        )
    return arr


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = _check_one("gt", gt), _check_one("pred", pred)
    if gt.size != pred.size:
        raise ValueError(
            f"gt and pred must have one length, got {gt.size} gt and {pred.size} pred labels"
        )
    return gt, pred


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-negative ids mapped to ``0..C-1`` (order of value), and ``C``."""
    if labels.size == 0:
        return labels.copy(), 0
    top = int(labels.max())
    if top < 4 * labels.size + 1024:  # small ids: O(N + max) with bincount, no sort
        present = np.bincount(labels, minlength=top + 1) > 0
        remap = np.cumsum(present) - 1
        return remap[labels], int(remap[-1]) + 1
    values = np.sort(labels)
    values = values[np.r_[True, values[1:] != values[:-1]]]
    return np.searchsorted(values, labels), int(values.size)


def _singletons_for_unassigned(pred: np.ndarray) -> tuple[np.ndarray, int]:
    """Compact predicted ids, each ``-1`` given a new id of its own; and the number of ids."""
    assigned = pred >= 0
    ids = np.empty(pred.size, dtype=np.int64)
    ids[assigned], num = _compact(pred[assigned])
    unassigned = pred.size - int(assigned.sum())
    ids[~assigned] = num + np.arange(unassigned)
    return ids, num + unassigned


@dataclass(frozen=True)
class _Contingency:
    """Non-zero cells of the identity x cluster table over the evaluated samples."""

    counts: np.ndarray  # n_ij of each non-zero cell
    rows: np.ndarray  # identity index of each cell
    cols: np.ndarray  # cluster index of each cell
    gt_sizes: np.ndarray  # |G_i|
    pred_sizes: np.ndarray  # |C_j| (evaluated samples only)
    num_ignored: int

    @property
    def num_samples(self) -> int:
        return int(self.gt_sizes.sum())


def _contingency(gt: np.ndarray, pred: np.ndarray) -> _Contingency:
    """The table of checked labels (see :func:`_check_pair`)."""
    known = gt >= 0
    num_ignored = gt.size - int(known.sum())
    if num_ignored == gt.size:
        raise ValueError(
            f"gt has no sample with a known identity ({gt.size} labels, all -1); "
            "nothing to evaluate"
        )
    rows, num_gt = _compact(gt[known])
    cols, num_pred = _singletons_for_unassigned(pred[known])
    keys = np.sort(rows * num_pred + cols)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, keys.size])
    cell_rows, cell_cols = np.divmod(keys[starts], num_pred)
    return _Contingency(
        counts=counts,
        rows=cell_rows,
        cols=cell_cols,
        gt_sizes=np.bincount(rows, minlength=num_gt),
        pred_sizes=np.bincount(cols, minlength=num_pred),
        num_ignored=num_ignored,
    )


def _fscore(precision: float, recall: float) -> float:
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0


def _pairwise(table: _Contingency) -> tuple[float, float, float]:
    n = table.num_samples
    # ordered pairs (i, j), i != j: sum of squared sizes minus the n pairs (i, i)
    true_pairs = int(np.dot(table.counts, table.counts)) - n
    pred_pairs = int(np.dot(table.pred_sizes, table.pred_sizes)) - n
    gt_pairs = int(np.dot(table.gt_sizes, table.gt_sizes)) - n
    precision = true_pairs / pred_pairs if pred_pairs else 1.0
    recall = true_pairs / gt_pairs if gt_pairs else 1.0
    return precision, recall, _fscore(precision, recall)


def _bcubed(table: _Contingency) -> tuple[float, float, float]:
    squares = table.counts.astype(np.float64) ** 2
    n = table.num_samples
    precision = float((squares / table.pred_sizes[table.cols]).sum() / n)
    recall = float((squares / table.gt_sizes[table.rows]).sum() / n)
    return precision, recall, _fscore(precision, recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    p = sizes[sizes > 0] / n
    return float(-(p * np.log(p)).sum())


def _nmi(table: _Contingency) -> float:
    if table.gt_sizes.size == table.pred_sizes.size == 1:
        return 1.0
    n = table.num_samples
    c = table.counts.astype(np.float64)
    log_ratio = (
        np.log(c)
        + np.log(n)
        - np.log(table.gt_sizes[table.rows].astype(np.float64))
        - np.log(table.pred_sizes[table.cols].astype(np.float64))
    )
    mi = max(float((c / n * log_ratio).sum()), 0.0)
    if mi == 0.0:
        return 0.0
    mean_entropy = (_entropy(table.gt_sizes, n) + _entropy(table.pred_sizes, n)) / 2.0
    return mi / mean_entropy


def pairwise(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-score over pairs of evaluated samples.

    Precision: the fraction of pairs in one predicted cluster that share an identity; recall: the
    fraction of same-identity pairs put in one cluster (see the module docstring for ``-1`` and
    degenerate cases).
    """
    return _pairwise(_contingency(*_check_pair(gt, pred)))


def bcubed(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """BCubed precision, recall and F-score: per-sample precision ``|G(x) cap C(x)| / |C(x)|`` and
    recall ``|G(x) cap C(x)| / |G(x)|``, averaged over the evaluated samples."""
    return _bcubed(_contingency(*_check_pair(gt, pred)))


def nmi(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mutual information ``MI / ((H(gt) + H(pred)) / 2)`` (scikit-learn's default,
    arithmetic-mean normalisation), natural logarithms."""
    return _nmi(_contingency(*_check_pair(gt, pred)))


def cluster_stats(pred: np.ndarray) -> dict[str, int | float]:
    """Sizes of a predicted clustering, each ``-1`` counted as a singleton cluster.

    Keys: ``num_samples``, ``num_clusters``, ``num_singletons`` (clusters of one sample,
    unassigned samples included), ``num_unassigned``, ``largest_cluster`` and
    ``mean_cluster_size`` (``num_samples / num_clusters``; 0 for no samples).
    """
    labels = _check_one("pred", pred)
    ids, num = _singletons_for_unassigned(labels)
    sizes = np.bincount(ids, minlength=num)
    return {
        "num_samples": int(ids.size),
        "num_clusters": int(num),
        "num_singletons": int((sizes == 1).sum()),
        "num_unassigned": int((labels < 0).sum()),
        "largest_cluster": int(sizes.max()) if num else 0,
        "mean_cluster_size": ids.size / num if num else 0.0,
    }


def evaluate_clustering(gt: np.ndarray, pred: np.ndarray) -> dict[str, int | float]:
    """Every metric at once (one contingency table).

    Keys: ``pairwise_{precision,recall,fscore}``, ``bcubed_{precision,recall,fscore}``, ``nmi``;
    ``num_samples`` (all labels given), ``num_ignored`` (``gt == -1``), ``num_evaluated``,
    ``num_gt_clusters``; and :func:`cluster_stats` of ``pred`` over the evaluated samples
    (``num_clusters``, ``num_singletons``, ``num_unassigned``, ``largest_cluster``,
    ``mean_cluster_size``).
    """
    gt, pred = _check_pair(gt, pred)
    table = _contingency(gt, pred)
    results: dict[str, int | float] = {}
    for prefix, values in (("pairwise", _pairwise(table)), ("bcubed", _bcubed(table))):
        names = (f"{prefix}_{m}" for m in ("precision", "recall", "fscore"))
        results.update(zip(names, values, strict=True))
    results["nmi"] = _nmi(table)
    stats = cluster_stats(pred[gt >= 0])
    results.update(
        num_samples=int(gt.size),
        num_ignored=table.num_ignored,
        num_evaluated=table.num_samples,
        num_gt_clusters=int(table.gt_sizes.size),
    )
    results.update({k: v for k, v in stats.items() if k != "num_samples"})
    return results
