"""GCN-V (Yang et al., CVPR 2020): vertex confidence from a one-layer GCN over the kNN graph.

Follows learn-to-cluster's ``vegcn/``. The graph is ``A = max(S, S^T) + I``, row-normalised, where
``S`` holds the kNN cosine similarities ``>= 0`` without self loops (``fast_knns2spmat`` with
``th_sim=0``, ``build_symmetric_adj``, ``row_normalize``). The model is one ``GraphConv``
(``relu([X, AX] W + b)``, hidden 512) then ``Linear -> PReLU -> Linear(1)``; it regresses the
confidence target of :func:`confidence_targets` with a full-graph MSE loss. Clusters: every sample
links to its most similar kNN neighbour of higher predicted confidence when their similarity
exceeds ``tau`` (``confidence_to_peaks`` with ``max_conn=1``, ``peaks_to_labels``); the published
test script links on a kNN graph rebuilt from the GCN's hidden features (``tau=0.8``) and reports
linking on the input kNN (``tau_0=0.65``) as well.

Checkpoints: :func:`save_gcn` writes ``{"format", "kind", "meta", "state_dict"}``; the loaders
also read learn-to-cluster ``.pth`` files (a bare state dict or mmcv's ``{"state_dict": ...}``,
``module.`` prefixes dropped). Parameter names equal the published ones: ``conv1.weight``
(``2 * feature_dim x hidden``), ``conv1.bias``, ``classifier.0.weight``/``.bias`` (Linear),
``classifier.1.weight`` (PReLU, one slope per channel), ``classifier.2.weight``/``.bias``.
A GCN-V checkpoint's ``k`` (of its training kNN graph; :attr:`GCNV.trained_k`) is compared with
the graph it runs on: another k is warned about, not refused (learn-to-cluster tests with the k of
its config; a deliberate change is legitimate). Files without ``k`` are not checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robustface.cluster.base import CLUSTERERS, SIM_GRID, Clusterer, as_function
from robustface.cluster.graph import components, knn_adjacency
from robustface.cluster.knn import KnnGraph, Method, build_knn, check_features, normalize_rows
from robustface.cluster.train_settings import (
    GCN_V_TRAINING,
    Optimizer,
    TrainSettings,
    resolve_settings,
)
from robustface.errors import DataFormatError
from robustface.models.loading import load_weights
from robustface.utils.guards import check_choice, check_int, check_real
from robustface.utils.io import atomic_path
from robustface.utils.sparse import torch_csr

__all__ = [
    "DEFAULT_LR",
    "GCNV",
    "GCNVClustering",
    "GraphConv",
    "Optimizer",
    "confidence_link",
    "confidence_targets",
    "gcn_adjacency",
    "gcn_adjacency_blocks",
    "gcn_adjacency_rows",
    "gcn_v_cluster",
    "gcn_v_lr",
    "link_peaks",
    "load_gcn_v",
    "nearest_higher",
    "predict_gcn_v",
    "read_gcn_checkpoint",
    "reverse_edges",
    "save_gcn",
    "to_torch_sparse",
    "train_gcn_v",
    "unit_rows",
]

logger = logging.getLogger(__name__)

GCN_FORMAT = "robustface.gcn"
TAU_GCN_FEATURES = 0.8  # published ``tau``: linking on the kNN of GCN-V's hidden features
TAU_INPUT_KNN = 0.65  # published ``tau_0``: linking on the input kNN
ROW_BATCH = 65536  # rows per chunk of the vectorised per-sample passes
PREDICT_BATCH = 8192
"""Rows per block of :func:`predict_gcn_v` (graph rows and dense layers alike): every temporary of
a block (kNN rows, graph rows, the layers' outputs: 16 MiB each at hidden 512) stays under
glibc's 32 MiB ceiling for heap allocations, so it is reused from block to block instead of being
mapped and page-faulted anew (those faults took up to a third of the time); oneDNN's products
run as fast on 8,192 rows as on 65,536. The bound holds for 256-d inputs (the ``[X, AX]`` buffer,
allocated once, is 32 MiB at 512-d); two blocks of graph rows are alive at a time (the next is
built ahead). Tuned on the CPU only: CUDA block sizes are not measured."""
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adamw": 1e-3}
"""GCN-V's learning rate per optimiser when none is given (SGD's is the published one)."""


def gcn_v_lr(settings: TrainSettings) -> float:
    """The learning rate GCN-V trains with: ``settings.lr``, else its optimiser's default."""
    return DEFAULT_LR[settings.optimizer] if settings.lr is None else settings.lr


WARMUP_FRACTION = 0.05  # AdamW: linear warm-up over this share of the iterations, then cosine


class GraphConv(nn.Module):
    """``relu([X, AX] W + b)`` (then dropout), learn-to-cluster's ``GraphConv``/``MeanAggregator``.

    ``A`` is a row-normalised adjacency: a torch sparse ``(N, N)`` matrix, or dense ``(N, N)`` /
    batched ``(B, n, n)`` with ``X`` of shape ``(B, n, in_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        in_dim, out_dim = check_int("in_dim", in_dim, 1), check_int("out_dim", out_dim, 1)
        dropout = check_real("dropout", dropout, 0, 1, open_high=True)
        self.in_dim, self.out_dim, self.dropout = in_dim, out_dim, dropout
        self.weight = nn.Parameter(torch.empty(2 * in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.weight)

    def combine(self, x: torch.Tensor, agg: torch.Tensor) -> torch.Tensor:
        """The layer given ``X`` and the aggregated ``AX`` (``[X, AX] W`` without the concat)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected {self.in_dim}-d node features, got shape {tuple(x.shape)}")
        # in place: the same sums in the same order as ``x W1 + agg W2 + b``, two fewer
        # temporaries of the output's size (autograd keeps what the products need, not ``out``)
        out = x @ self.weight[: self.in_dim]
        out += agg @ self.weight[self.in_dim :]
        out += self.bias
        return F.dropout(F.relu_(out), self.dropout, training=self.training)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        sparse = adj.layout in (torch.sparse_coo, torch.sparse_csr)
        agg = torch.sparse.mm(adj, x) if sparse else torch.matmul(adj, x)
        return self.combine(x, agg)


class GCNV(nn.Module):
    """GCN-V: ``GraphConv(feature_dim, hidden)`` then ``Linear -> PReLU -> Linear(hidden, 1)``.

    ``forward(x, adj)`` returns the confidence ``(N,)`` and the hidden features ``(N, hidden)``
    (after the ReLU: learn-to-cluster's ``gcn_feat``).
    """

    kind = "gcn_v"

    def __init__(self, feature_dim: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.conv1 = GraphConv(feature_dim, hidden, dropout)
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden), nn.PReLU(hidden), nn.Linear(hidden, 1)
        )
        self.loss_history: list[float] = []
        # k of the kNN graph it was trained on (None: unknown), saved as the checkpoint's "k"
        self.trained_k: int | None = None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (and ``kind``), as saved in checkpoints."""
        return {
            "kind": self.kind,
            "feature_dim": self.feature_dim,
            "hidden": self.hidden,
            "dropout": self.conv1.dropout,
        }

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Confidence ``(N,)`` from hidden features."""
        return self.classifier(hidden).squeeze(-1)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.conv1(x, adj)
        return self.head(hidden), hidden

    @torch.no_grad()
    def predict_rows(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode :meth:`forward` for rows given their ``[X, AX]`` (``(rows, 2 * feature_dim)``,
        contiguous): the confidence ``(rows,)`` and hidden features ``(rows, hidden)``. One
        product with the whole ``conv1.weight`` (no ``X W1 + AX W2``), by oneDNN on the CPU
        (:func:`_linear`), the ReLU fused into it."""
        conv, (first, prelu, last) = self.conv1, self.classifier
        hidden = _linear(xa, conv.weight.t().contiguous(), conv.bias, relu=True)
        mid = F.prelu(_linear(hidden, first.weight, first.bias), prelu.weight)
        return F.linear(mid, last.weight, last.bias).squeeze(-1), hidden


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear op (``mkldnn::_linear_pointwise``, what torch.compile uses on the
    CPU), or None where this torch build has none or where it does not give ``F.linear``'s result
    on a small product (a private op: a torch release may change it)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = (
            torch.linspace(-1, 1, 24).view(4, 6),
            torch.linspace(1, -1, 18).view(3, 6),
            torch.ones(3),
        )
        if not torch.allclose(op(x, w, b, "relu", [], ""), F.linear(x, w, b).relu(), atol=1e-6):
            return None
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op


ONEDNN_LINEAR = _onednn_linear()


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """``x weight^T + bias`` (``nn.Linear``), then a ReLU with ``relu``. On the CPU by oneDNN
    where torch has it: 1.6-1.9x the speed of torch's own float32 product (MKL's sgemm) on the
    AMD EPYC we measured, equal to it within float32 rounding."""
    if (
        ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
    ):
        return ONEDNN_LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    out = F.linear(x, weight, bias)
    return out.relu_() if relu else out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32; all-zero rows (possible after ReLU) stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def gcn_adjacency(knn: KnnGraph, min_sim: float = 0.0) -> sp.csr_matrix:
    """GCN-V's graph: ``max(S, S^T) + I`` row-normalised, ``S`` the kNN sims ``>= min_sim``."""
    return knn_adjacency(knn, min_sim=min_sim, symmetric=True, self_loops=True, row_normalize=True)


def _kept(knn: KnnGraph, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of the kNN lists and the mask of their entries in ``S`` (sim >= 0,
    not missing, not the sample itself)."""
    nbrs, sims = knn.nbrs[start:stop], knn.sims[start:stop]
    keep = (nbrs >= 0) & (sims >= 0) & (nbrs != np.arange(start, start + len(nbrs))[:, None])
    return nbrs, sims, keep


def _knn_rows(knn: KnnGraph, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``S`` (the kNN similarities ``>= 0``, no self loops, no missing
    entries) as a ``(stop - start, N)`` float32 CSR built straight from the kNN lists, no COO
    pass, in kNN order: a neighbour listed twice is two entries (scipy's products and binary
    operations sum them: it counts twice, as in
    :func:`robustface.cluster.graph.knn_adjacency`)."""
    nbrs, sims, keep = _kept(knn, start, stop)
    indptr = np.zeros(len(nbrs) + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return sp.csr_matrix(
        (sims[keep].astype(np.float32, copy=False), nbrs[keep], indptr),
        shape=(len(nbrs), knn.num_samples),
    )


def reverse_edges(knn: KnnGraph, batch_size: int = ROW_BATCH) -> sp.csr_matrix:
    """``S^T`` as CSR (row ``j`` lists the samples whose kNN list holds ``j``), ``S`` being
    :func:`gcn_adjacency`'s similarities before symmetrisation (the kNN edges with sim >= 0).

    Built ``batch_size`` rows of ``S`` at a time: scipy transposes each batch (a counting sort in
    C, sources ascending within a row) and the batches are placed one after another in every
    row, so memory is the output (8 bytes an edge with int32 indices) plus one batch, not the COO
    temporaries of a global transpose.
    """
    n = knn.num_samples
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        nbrs, _, keep = _kept(knn, start, start + batch_size)
        counts += np.bincount(nbrs[keep], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    index_dtype = np.int32 if n < 2**31 and indptr[-1] < 2**31 else np.int64
    indices = np.empty(indptr[-1], dtype=index_dtype)
    data = np.empty(indptr[-1], dtype=np.float32)
    fill = indptr[:-1].copy()
    for start in range(0, n, batch_size):
        # this batch's part of S^T: (n, rows), row j holding the batch's sources that list j
        part = _knn_rows(knn, start, start + batch_size).T.tocsr()
        per_row = np.diff(part.indptr)
        pos = np.arange(part.nnz) + np.repeat(fill - part.indptr[:-1], per_row)
        indices[pos] = part.indices + start
        data[pos] = part.data
        fill += per_row
    return sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, n))


def _symmetric_rows(knn: KnnGraph, reverse: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``max(S, S^T)`` (no self loops, not normalised) as a float32 CSR,
    from those rows' kNN lists and ``reverse`` (:func:`reverse_edges`) only. Neither side is put
    in column order first: scipy's ``maximum`` sums each side's duplicates itself (its general
    kernel, one pass), and leaves the columns of a row unsorted."""
    fwd = _knn_rows(knn, start, min(stop, knn.num_samples))
    return fwd.maximum(reverse[start:stop]).astype(np.float32, copy=False)


def gcn_adjacency_rows(
    knn: KnnGraph, reverse: sp.csr_matrix, start: int, stop: int
) -> sp.csr_matrix:
    """Rows ``start:stop`` of :func:`gcn_adjacency` (a ``(stop - start, N)`` float32 CSR),
    from those rows' kNN lists and ``reverse`` (:func:`reverse_edges`) only."""
    n = knn.num_samples
    stop = min(stop, n)
    rows = stop - start
    eye = sp.csr_matrix(
        (np.ones(rows, dtype=np.float32), (np.arange(rows), np.arange(start, stop))),
        shape=(rows, n),
    )
    adj = (_symmetric_rows(knn, reverse, start, stop) + eye).tocsr().astype(np.float32, copy=False)
    sums = np.asarray(adj.sum(axis=1), dtype=np.float32).ravel()
    adj.data *= np.repeat(1.0 / sums, np.diff(adj.indptr))
    return adj


def gcn_adjacency_blocks(
    knn: KnnGraph, batch_size: int = ROW_BATCH, normalized: bool = True
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """``(start, stop, A[start:stop])`` for consecutive row blocks of GCN-V's graph ``A``
    (:func:`gcn_adjacency`), never holding ``A`` whole: :func:`reverse_edges` once, then one
    block of rows at a time (about 4x less peak memory than building ``A``). Without
    ``normalized``, the rows of ``max(S, S^T)`` alone: no self loops, not row-normalised
    (:func:`predict_gcn_v` adds both to the product with the features). The reverse edges are
    built in chunks of :data:`ROW_BATCH` rows whatever ``batch_size``: each chunk's transpose
    takes a pass over all ``N`` rows, so small chunks would cost ``O(N^2 / batch_size)``."""
    reverse = reverse_edges(knn)
    num = knn.num_samples
    rows = gcn_adjacency_rows if normalized else _symmetric_rows
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        yield start, stop, rows(knn, reverse, start, stop)


def _aggregation_bags(
    knn: KnnGraph, batch_size: int
) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...]]]:
    """``(start, stop, (indices, offsets, weights, scale))`` per block of rows: the rows of
    ``max(S, S^T)`` as ``F.embedding_bag`` inputs (one bag a row) and ``1 / (row sum + 1)``,
    so that ``A[rows] X = (bags(X) + X[rows]) * scale`` (the ``+ I`` and the row normalisation
    of :func:`gcn_adjacency`)."""
    for start, stop, rows in gcn_adjacency_blocks(knn, batch_size, normalized=False):
        scale = 1.0 / (np.asarray(rows.sum(axis=1), dtype=np.float32).ravel() + 1.0)
        offsets = rows.indptr.astype(rows.indices.dtype, copy=False)
        arrays = (rows.indices, offsets, rows.data, scale[:, None])
        yield start, stop, tuple(torch.from_numpy(a) for a in arrays)


_END = object()


def _one_ahead(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, each next one made in a background thread while the caller uses the current one
    (numpy's and scipy's loops release the GIL, so the graph of the next block is built while
    torch multiplies this one)."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, items, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, items, _END)
            yield item


def to_torch_sparse(adj: sp.spmatrix, device: str | torch.device = "cpu") -> torch.Tensor:
    """A scipy sparse matrix as a float32 torch sparse CSR tensor on ``device`` (its products
    with dense matrices use every core; the CSR's arrays are shared where already int64 and
    float32, and duplicates are summed as scipy would)."""
    csr = sp.csr_matrix(adj)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return torch_csr(csr.astype(np.float32, copy=False)).to(device)


def _check_knn(knn: KnnGraph, num: int, name: str = "knn") -> None:
    if not isinstance(knn, KnnGraph):
        raise TypeError(f"{name} must be a KnnGraph, got {type(knn).__name__}")
    if knn.num_samples != num:
        raise ValueError(f"{name} has {knn.num_samples} rows but there are {num} samples")


def _check_labels(labels: np.ndarray, num: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an ({num},) integer array, got shape {labels.shape} and "
            f"dtype {labels.dtype}"
        )
    if num and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 (ground truth), got {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def _check_confidence(confidence: np.ndarray, num: int) -> np.ndarray:
    conf = np.asarray(confidence)
    if conf.shape != (num,) or not np.issubdtype(conf.dtype, np.floating):
        raise ValueError(
            f"confidence must be an ({num},) float array, got shape {conf.shape} and "
            f"dtype {conf.dtype}"
        )
    if not np.isfinite(conf).all():
        raise ValueError("confidence has NaN or inf values")
    return conf


def confidence_targets(labels: np.ndarray, knn: KnnGraph) -> np.ndarray:
    """GCN-V's training target (learn-to-cluster ``s_nbr``), float32 ``(N,)`` in ``[-1, 1]``.

    ``conf_i = sum_{j in knn(i), y_j = y_i} s_ij - sum_{j in knn(i), y_j != y_i} s_ij`` over all
    k entries of the kNN list, the sample itself included (it adds ``s_ii = 1``) and no similarity
    threshold; missing entries (id -1) are skipped. Then divided by ``max_i |conf_i|``.
    """
    labels = _check_labels(labels, knn.num_samples)
    conf = np.empty(knn.num_samples, dtype=np.float64)
    for start in range(0, knn.num_samples, ROW_BATCH):
        nbrs = knn.nbrs[start : start + ROW_BATCH]
        sims = knn.sims[start : start + ROW_BATCH].astype(np.float64)
        valid = nbrs >= 0
        same = labels[np.where(valid, nbrs, 0)] == labels[start : start + len(nbrs), None]
        signed = np.where(same, sims, -sims)
        conf[start : start + len(nbrs)] = np.where(valid, signed, 0.0).sum(axis=1)
    scale = np.abs(conf).max() if len(conf) else 0.0
    return (conf / scale if scale > 0 else conf).astype(np.float32)


def nearest_higher(knn: KnnGraph, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's most similar kNN neighbour of strictly higher confidence, and their sim.

    The kNN rows are taken in their stored order (most similar first). Samples without such a
    neighbour (the peaks) get id ``-1`` and similarity ``-inf``.
    """
    conf = _check_confidence(confidence, knn.num_samples)
    peak = np.full(knn.num_samples, -1, dtype=np.int64)
    sim = np.full(knn.num_samples, -np.inf, dtype=np.float32)
    for start in range(0, knn.num_samples, ROW_BATCH):
        nbrs = knn.nbrs[start : start + ROW_BATCH]
        rows = np.arange(len(nbrs))
        higher = (nbrs >= 0) & (conf[np.where(nbrs >= 0, nbrs, 0)] > conf[start + rows, None])
        first = higher.argmax(axis=1)
        found = higher[rows, first]
        peak[start : start + len(nbrs)] = np.where(found, nbrs[rows, first], -1)
        sim[start : start + len(nbrs)] = np.where(found, knn.sims[start + rows, first], -np.inf)
    return peak, sim


def link_peaks(peak: np.ndarray, sim: np.ndarray, tau: float) -> np.ndarray:
    """Clusters from one link per sample (``peak``, -1 for none), kept where ``sim > tau``.

    learn-to-cluster's ``peaks_to_labels``: an edge survives when its distance ``1 - sim`` is
    below ``1 - tau``; the clusters are the connected components (labels 0..C-1).
    """
    peak, sim = np.asarray(peak, dtype=np.int64), np.asarray(sim)
    if peak.ndim != 1 or sim.shape != peak.shape:
        raise ValueError(f"peak and sim must be 1-D of one length, got {peak.shape}, {sim.shape}")
    if not np.isfinite(tau):
        raise ValueError(f"tau must be a finite similarity, got {tau}")
    if len(peak) and peak.max() >= len(peak):
        raise ValueError(f"peak ids must be < {len(peak)}, got {int(peak.max())}")
    keep = (peak >= 0) & (sim > tau)
    return components(len(peak), np.flatnonzero(keep), peak[keep])


def confidence_link(knn: KnnGraph, confidence: np.ndarray, tau: float) -> np.ndarray:
    """Cluster labels: every sample links to its nearest higher-confidence kNN neighbour if their
    similarity is above ``tau`` (``max_conn=1``); clusters are the connected components."""
    return link_peaks(*nearest_higher(knn, confidence), tau)


def _lr_milestones(total: int, lr_steps: Sequence[float]) -> list[int]:
    if any(not 0.0 < r < 1.0 for r in lr_steps):
        raise ValueError(f"lr_steps must be fractions in (0, 1), got {list(lr_steps)}")
    return [int(r * total) for r in lr_steps]


def _lr_factor(
    optimizer: str, iters: int, lr_steps: Sequence[float] | None, lr_gamma: float = 0.1
) -> Callable[[int], float]:
    """GCN-V's learning-rate multiplier at each step (0-based): x``lr_gamma`` at each of
    ``lr_steps`` (fractions of ``iters``; published 0.5/0.8/0.9) for SGD; for AdamW a linear
    warm-up over :data:`WARMUP_FRACTION` of the steps, then a cosine from 1 to 0. Checks the
    arguments."""
    check_choice("optimizer", optimizer, DEFAULT_LR)
    if optimizer == "sgd":
        milestones = _lr_milestones(iters, (0.5, 0.8, 0.9) if lr_steps is None else lr_steps)
        return lambda step: lr_gamma ** sum(step >= m for m in milestones)
    if lr_steps is not None:
        raise ValueError("lr_steps is for optimizer='sgd'; AdamW warms up then anneals (cosine)")
    warmup = max(1, int(WARMUP_FRACTION * iters))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, iters - warmup)))

    return factor


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG training may use (forked so the caller's RNG state is kept)."""
    return [device.index or 0] if device.type == "cuda" else []


def _batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _train_loop(
    model: nn.Module,
    num_items: int,
    step_loss: Callable[[np.ndarray, np.random.Generator], torch.Tensor],
    settings: TrainSettings,
    *,
    lr_steps: Sequence[int],
    desc: str,
) -> list[float]:
    """SGD (``settings``: lr, momentum, weight decay, lr x ``lr_gamma`` at the epochs
    ``lr_steps``) for ``settings.epochs`` over shuffled batches of item indices,
    ``step_loss(items, rng)`` giving each batch's loss; GCN-E, GCN-D and GCN-S train with it.
    Returns the mean loss of every epoch; the model ends in eval mode."""
    epochs, batch_size, seed = settings.epochs, settings.batch_size, settings.seed
    lr, momentum, weight_decay = settings.lr, settings.momentum, settings.weight_decay
    lr_gamma, show_progress = settings.lr_gamma, settings.show_progress
    epochs, batch_size = check_int("epochs", epochs, 1), check_int("batch_size", batch_size, 1)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(lr_steps), gamma=lr_gamma)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    model.train()
    steps = -(-num_items // batch_size)
    bar = tqdm(total=epochs * steps, desc=desc, unit="step", disable=not show_progress)
    for epoch in range(epochs):
        total, count = 0.0, 0
        for items in _batches(rng.permutation(num_items), batch_size):
            loss = step_loss(items, rng)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(items)
            count += len(items)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4f}", refresh=False)
        scheduler.step()
        history.append(total / count)
    bar.close()
    model.eval()
    return history


def _row_batches(num: int, batch_size: int | None, seed: int) -> Iterator[np.ndarray | None]:
    """Endless row batches: None (all rows) without ``batch_size``, else sorted batches of a
    fresh permutation per pass (the last batch of a pass may be smaller)."""
    if batch_size is None or batch_size >= num:
        while True:
            yield None
    rng = np.random.default_rng(seed)
    while True:
        yield from map(np.sort, _batches(rng.permutation(num), batch_size))


def train_gcn_v(
    features: np.ndarray,
    labels: np.ndarray,
    knn: KnnGraph,
    settings: TrainSettings | None = None,
    *,
    hidden: int = 512,
    dropout: float = 0.0,
    **overrides: Any,
) -> GCNV:
    """Train GCN-V, MSE to the confidence targets; one optimiser step per iteration.

    ``settings`` (default :data:`~robustface.cluster.train_settings.GCN_V_TRAINING`) and
    ``overrides`` of its fields (``iters=400``, ``optimizer="sgd"``, ...) set the optimiser and
    the run (:class:`~robustface.cluster.train_settings.TrainSettings`).

    ``AX`` is computed once: the only graph operation acts on the fixed input features, so this
    equals aggregating in every iteration. That also makes GCN-V an MLP on the rows ``[X, AX]``,
    so ``batch_size`` rows per step (mini-batch training on the same loss, rows drawn without
    replacement, a new permutation each pass) train it exactly as the full graph would, at a
    fraction of the cost per step; None takes every row in every step, as published.

    Defaults (``optimizer="adamw"``, lr 1e-3 warmed up linearly over the first 5 % of the
    iterations then cosine-annealed to 0; 12,000 steps of 1,024 rows, ~7 min at 577K samples on 2
    CPU cores) are robustface's: at 584K they fit the confidence far better than the published SGD
    on the same rows (test correlation 0.924 against 0.873; 69.97 against 65.52 pairwise F, see
    docs/clustering.md).
    Published (``cfg_train_gcnv_ms1m.py``): ``optimizer="sgd"`` (lr 0.1 by default, momentum 0.9),
    weight decay 1e-5, ``iters=80000``, ``batch_size=None``, lr x0.1 at ``lr_steps`` (fractions
    of ``iters``, default 0.5/0.8/0.9; SGD only), dropout 0, hidden 512. ``momentum`` is SGD's;
    AdamW uses betas (0.9, 0.999). The per-iteration losses (of the step's rows) are in
    ``model.loss_history``; every ``log_every`` iterations the loss is logged and shown.
    """
    run = resolve_settings("GCN-V", GCN_V_TRAINING, settings, overrides)
    iters, optimizer, lr, lr_steps = run.iters, run.optimizer, run.lr, run.lr_steps
    momentum, weight_decay, batch_size = run.momentum, run.weight_decay, run.batch_size
    device, seed, show_progress, log_every = run.device, run.seed, run.show_progress, run.log_every
    feats = normalize_rows(features)
    num = len(feats)
    _check_knn(knn, num)
    iters, log_every = check_int("iters", iters, 1), check_int("log_every", log_every, 1)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    lr_factor = _lr_factor(optimizer, iters, lr_steps, run.lr_gamma)
    lr = check_real("lr", gcn_v_lr(run), 0, open_low=True)
    targets = confidence_targets(labels, knn)
    agg = np.empty_like(feats)
    for start, stop, rows in gcn_adjacency_blocks(knn):
        agg[start:stop] = rows @ feats
    device = torch.device(device)
    x = torch.from_numpy(feats).to(device)
    agg_t = torch.from_numpy(np.ascontiguousarray(agg, dtype=np.float32)).to(device)
    target = torch.from_numpy(targets).to(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        model = GCNV(feats.shape[1], hidden, dropout).to(device)
        params = model.parameters()
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        model.train()
        rows = _row_batches(num, batch_size, seed)
        bar = tqdm(range(iters), desc="GCN-V", unit="iter", disable=not show_progress)
        for it in bar:
            idx = next(rows)
            if idx is None:
                loss = F.mse_loss(model.head(model.conv1.combine(x, agg_t)), target)
            else:
                idx_t = torch.from_numpy(idx).to(device)
                pred = model.head(model.conv1.combine(x[idx_t], agg_t[idx_t]))
                loss = F.mse_loss(pred, target[idx_t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.loss_history.append(loss.item())
            if (it + 1) % log_every == 0 or it == 0:
                bar.set_postfix(loss=f"{model.loss_history[-1]:.4f}")
                logger.info("GCN-V iter %d/%d loss %.5f", it + 1, iters, model.loss_history[-1])
    model.trained_k = knn.k
    return model.eval()


@torch.no_grad()
def predict_gcn_v(
    model: GCNV,
    features: np.ndarray,
    knn: KnnGraph,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = PREDICT_BATCH,
    return_hidden: bool = True,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted confidence ``(N,)`` and hidden features ``(N, hidden)``, both float32.

    Rows are processed ``batch_size`` at a time: the block's rows of ``max(S, S^T)`` built on the
    fly (:func:`gcn_adjacency_blocks`, the next block in a background thread while torch works
    on this one), ``A[rows] X`` from them by ``F.embedding_bag`` (a weighted sum of feature rows
    per row, 2-3x faster than torch's sparse CSR product here) with the self loop and the row
    normalisation applied to its output, written beside ``X[rows]`` into one ``[X, AX]`` buffer,
    then :meth:`GCNV.predict_rows`. Memory is the features, the kNN graph, its reverse edges
    (8 bytes an edge), the output, one block of dense buffers and two of graph rows (the next is
    built ahead). Without ``return_hidden`` the hidden features
    (2 KB a sample at hidden 512: 10.6 GB at 5.2M) are not kept and None is returned in their
    place. The model is moved to ``device`` and used in eval mode. A ``knn`` of another k than
    the model's ``trained_k`` is warned about (learn-to-cluster trains and tests with one k).
    """
    feats = normalize_rows(features, copy=False)
    num, dim = feats.shape
    _check_knn(knn, num)
    if model.trained_k is not None and model.trained_k != knn.k:
        warnings.warn(
            f"GCN-V was trained on a k={model.trained_k} kNN graph but runs on k={knn.k}: "
            f"use k={model.trained_k} unless the change is intended",
            stacklevel=3,  # the caller, past torch.no_grad's wrapper
        )
    if dim != model.feature_dim:
        raise ValueError(f"features are {dim}-d but the model takes {model.feature_dim}-d")
    batch_size = check_int("batch_size", batch_size, 1)
    device = torch.device(device)
    x = torch.from_numpy(feats).to(device)
    conf = np.empty(num, dtype=np.float32)
    # the hidden features through torch's allocator: numpy asks the kernel for huge pages for
    # large arrays, and finding them (compaction) took over a second for these 200 MB at 100K
    # in a fresh process; torch's 4 KB pages fault in as the blocks are written
    hidden = None
    if return_hidden:
        hidden = torch.empty((num, model.hidden), dtype=torch.float32).numpy()
    model.to(device)
    if num == 0:
        return conf, hidden
    xa = torch.empty((min(batch_size, num), 2 * dim), device=device)  # [X, AX], reused
    bags = _one_ahead(_aggregation_bags(knn, batch_size))
    with _eval_mode(model), contextlib.closing(bags):
        bar = tqdm(total=num, desc="GCN-V predict", unit="row", disable=not show_progress)
        for start, stop, arrays in bags:
            indices, offsets, weights, scale = (a.to(device) for a in arrays)
            block = xa[: stop - start]
            block[:, :dim] = x[start:stop]
            agg = F.embedding_bag(
                indices, x, offsets, mode="sum", per_sample_weights=weights,
                include_last_offset=True,
            )  # fmt: skip
            torch.mul(agg.add_(x[start:stop]), scale, out=block[:, dim:])
            block_conf, block_hidden = model.predict_rows(block)
            conf[start:stop] = block_conf.cpu().numpy()
            if hidden is not None:
                hidden[start:stop] = block_hidden.cpu().numpy()
            bar.update(stop - start)
        bar.close()
    return conf, hidden


def save_gcn(model: nn.Module, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (GCN-V, GCN-E, GCN-D or GCN-S) and a JSON-able ``meta`` to ``path``
    atomically: the one checkpoint format of the learned clusterers.

    The saved meta is ``model.config`` (``feature_dim``, ``hidden``, ...) and ``model.kind`` plus
    ``meta`` (provenance, e.g. ``{"trained_on": "part0_train", "k": 80}``), with a GCN-V's
    ``trained_k`` as ``k``; ``meta`` may not contradict the model's own values.
    """
    config, kind = getattr(model, "config", None), getattr(model, "kind", None)
    if not isinstance(config, dict) or not isinstance(kind, str):
        raise TypeError(f"model must be a GCNV, GCNE or DSGCN, got {type(model).__name__}")
    config = {**config, "kind": kind}
    if getattr(model, "trained_k", None) is not None:
        config["k"] = model.trained_k
    extra = dict(meta or {})
    clash = {k: v for k, v in extra.items() if k in config and config[k] != v}
    if clash:
        raise ValueError(f"meta contradicts the model: {clash} vs {config}")
    full = {**extra, **config}
    try:
        json.dumps(full)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be JSON-serialisable: {exc}") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": GCN_FORMAT, "kind": kind, "meta": full, "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _published_meta(path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Kind and sizes of a learn-to-cluster state dict, read from its tensor shapes."""
    for key in ("conv1.weight", "classifier.2.weight"):
        if key not in state:
            raise DataFormatError(
                path, f"not a GCN-V/GCN-E state dict: no {key!r} (keys: {sorted(state)[:8]})"
            )
    two_in, hidden = state["conv1.weight"].shape
    kind = "gcn_e" if "conv2.weight" in state else "gcn_v"
    meta = {"kind": kind, "feature_dim": int(two_in) // 2, "hidden": int(hidden), "dropout": 0.0}
    if kind == "gcn_e":
        meta["num_classes"] = int(state["classifier.2.weight"].shape[0])
    return meta


def read_gcn_checkpoint(
    path: str | Path, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and meta of a ``kind`` (``gcn_v``/``gcn_e``/``gcn_d``/``gcn_s``) checkpoint:
    ours (:func:`save_gcn`) or, for GCN-V/E, learn-to-cluster's (``state_dict`` wrapper and
    ``module.`` prefixes handled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GCN checkpoint")
    obj = load_weights(path)
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a dict checkpoint, got {type(obj).__name__}")
    if obj.get("format") == GCN_FORMAT:
        state, meta = obj["state_dict"], dict(obj["meta"])
    elif kind not in ("gcn_v", "gcn_e"):
        raise DataFormatError(path, f"not a robustface {kind} checkpoint (no {GCN_FORMAT!r} tag)")
    else:
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        state = {
            (k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()
        }
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DataFormatError(path, "the state dict holds values that are not tensors")
        meta = _published_meta(path, state)
    if meta["kind"] != kind:
        raise DataFormatError(path, f"holds a {meta['kind']} model, not a {kind} model")
    return state, meta


def _load_state(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataFormatError(path, f"state dict does not fit the model: {exc}") from None


def load_gcn_v(path: str | Path, device: str | torch.device = "cpu") -> GCNV:
    """A GCN-V model (eval mode) from :func:`save_gcn` output or a learn-to-cluster ``.pth``."""
    state, meta = read_gcn_checkpoint(path, "gcn_v")
    model = GCNV(meta["feature_dim"], meta["hidden"], meta["dropout"])
    _load_state(Path(path), model, state)
    model.trained_k = meta.get("k")  # absent from learn-to-cluster files and older ones
    return model.to(device).eval()


def _as_gcn_v(model: GCNV | str | Path, device: str | torch.device) -> GCNV:
    if isinstance(model, GCNV):
        return model
    if isinstance(model, (str, Path)):
        return load_gcn_v(model, device)
    raise TypeError(f"model must be a GCNV or a checkpoint path, got {type(model).__name__}")


@CLUSTERERS.register("gcn_v")
class GCNVClustering(Clusterer):
    """GCN-V clustering (learn-to-cluster ``test_gcn_v.py``).

    Confidence from ``model`` on the input kNN graph (built with ``k`` if ``knn`` is None); with
    ``use_gcn_features`` the kNN is rebuilt (same k) on the L2-normalised hidden features and
    linked with ``tau`` (default 0.8), otherwise the input kNN is linked (default 0.65). The
    confidence and the linking graph are the threshold-independent work kept for
    :meth:`relink`.
    """

    tuned_param = "tau"
    grid = SIM_GRID
    models: ClassVar[Mapping[str, str]] = {"model": "gcn_v"}

    def __init__(
        self,
        *,
        model: GCNV | str | Path,
        tau: float | None = None,
        use_gcn_features: bool = True,
        k: int = 80,
        knn_method: Method = "flat",
        device: str | torch.device = "cpu",
        batch_size: int = PREDICT_BATCH,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.tau = tau
        self.use_gcn_features = use_gcn_features
        self.k = k
        self.knn_method = knn_method
        self.device = device
        self.batch_size = batch_size
        self.show_progress = show_progress

    def _prepare(self, features: np.ndarray, knn: KnnGraph | None) -> tuple[KnnGraph, np.ndarray]:
        """GCN-V's confidence and the kNN graph it is linked on."""
        feats = check_features(features)
        progress = self.show_progress
        if knn is None:
            knn = build_knn(feats, k=self.k, method=self.knn_method, show_progress=progress)
        gcn = _as_gcn_v(self.model, self.device)
        conf, hidden = predict_gcn_v(
            gcn, feats, knn, self.device, batch_size=self.batch_size,
            return_hidden=self.use_gcn_features, show_progress=progress,
        )  # fmt: skip
        if hidden is None:
            return knn, conf
        link_knn = build_knn(
            unit_rows(hidden), k=knn.k, method=self.knn_method, normalize=False,
            show_progress=progress,
        )  # fmt: skip
        return link_knn, conf

    def _finish(self, state: tuple[KnnGraph, np.ndarray]) -> np.ndarray:
        tau = self.tau
        if tau is None:
            tau = TAU_GCN_FEATURES if self.use_gcn_features else TAU_INPUT_KNN
        return confidence_link(state[0], state[1], tau)


gcn_v_cluster = as_function(GCNVClustering, "gcn_v_cluster")
