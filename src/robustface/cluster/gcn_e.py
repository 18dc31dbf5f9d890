"""GCN-E (Yang et al., CVPR 2020): which higher-confidence neighbour a sample should link to.

Follows learn-to-cluster's ``vegcn/`` (``gcn_e_dataset.py``, ``models/gcn_e.py``,
``test_gcn_e.py``, ``cfg_*_gcne_ms1m.py``). Inputs: GCN-V's predicted confidence and, by default,
its hidden features (L2-normalised) with a kNN graph of ``k=160`` built on them. For a sample
``i`` the candidate set is its kNN neighbours of strictly higher confidence, in kNN order. A sample
with no candidate links nowhere; one with a single candidate, or among the ``ignore_ratio``
lowest-confidence samples (0.7 in training, 0.8 at test), links to its first candidate as in
GCN-V. Every other sample gets a subgraph on its candidates: node features ``f_j - f_i``, the
adjacency ``max(S, S^T) + I`` restricted to the candidates and row-normalised; four
``GraphConv`` layers (hidden, hidden, hidden/2, hidden/2) and ``Linear -> PReLU -> Linear(2)``
classify each candidate as same-identity or not (cross-entropy; the published model applies
``log_softmax`` + ``NLLLoss``). The sample links to the candidate of highest predicted
connectivity; links with similarity ``> tau`` (0.8) are kept and clusters are the components.

Published state dict keys, equal to ours: ``conv{1..4}.weight``/``.bias``, ``classifier.0``
(Linear), ``classifier.1`` (PReLU), ``classifier.2`` (Linear to 2 classes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robustface.cluster.base import CLUSTERERS, SIM_GRID, Clusterer, as_function
from robustface.cluster.gcn_v import (
    GCNV,
    PREDICT_BATCH,
    ROW_BATCH,
    TAU_GCN_FEATURES,
    GraphConv,
    _as_gcn_v,
    _check_confidence,
    _check_knn,
    _check_labels,
    _eval_mode,
    _load_state,
    _lr_milestones,
    _rng_devices,
    _train_loop,
    link_peaks,
    nearest_higher,
    predict_gcn_v,
    read_gcn_checkpoint,
    unit_rows,
)
from robustface.cluster.graph import knn_adjacency
from robustface.cluster.knn import KnnGraph, Method, build_knn, check_features, normalize_rows
from robustface.cluster.train_settings import GCN_E_TRAINING, TrainSettings, resolve_settings
from robustface.utils.guards import check_int, check_real

__all__ = [
    "GCNE",
    "GCNEClustering",
    "candidate_sets",
    "edge_rows",
    "gcn_e_cluster",
    "gcn_e_inputs",
    "load_gcn_e",
    "predict_gcn_e",
    "subgraph_batch",
    "train_gcn_e",
]

logger = logging.getLogger(__name__)

K_EDGE = 160  # published kNN size of GCN-E's graph (cfg_test_gcne_ms1m.py)


class GCNE(nn.Module):
    """GCN-E: four ``GraphConv`` layers then ``Linear -> PReLU -> Linear(hidden/2, 2)``.

    ``forward(x, adj)`` takes batched subgraphs ``x (B, n, feature_dim)``, ``adj (B, n, n)`` and
    returns logits ``(B, n, 2)``; class 1 means "same identity as the centre sample".
    """

    kind = "gcn_e"
    num_classes = 2

    def __init__(self, feature_dim: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = check_int("hidden", hidden, 2)
        half = hidden // 2
        self.feature_dim, self.hidden = feature_dim, hidden
        self.conv1 = GraphConv(feature_dim, hidden, dropout)
        self.conv2 = GraphConv(hidden, hidden, dropout)
        self.conv3 = GraphConv(hidden, half, dropout)
        self.conv4 = GraphConv(half, half, dropout)
        self.classifier = nn.Sequential(
            nn.Linear(half, half), nn.PReLU(half), nn.Linear(half, self.num_classes)
        )
        self.loss_history: list[float] = []

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (and ``kind``, ``num_classes``), as saved in checkpoints."""
        return {
            "kind": self.kind,
            "feature_dim": self.feature_dim,
            "hidden": self.hidden,
            "dropout": self.conv1.dropout,
            "num_classes": self.num_classes,
        }

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = conv(x, adj)
        # PReLU takes channels from dim 1: classify the flattened nodes, as published
        return self.classifier(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def candidate_sets(
    knn: KnnGraph, confidence: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each sample in ``rows``: its kNN neighbours of strictly higher confidence, in kNN order.

    Returns ``cand (R, k)`` int64 (left-aligned, padded with -1), their similarities ``(R, k)``
    float32 (padding ``-inf``) and the counts ``(R,)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    nbrs = knn.nbrs[rows]
    higher = (nbrs >= 0) & (confidence[np.where(nbrs >= 0, nbrs, 0)] > confidence[rows, None])
    order = np.argsort(~higher, axis=1, kind="stable")
    kept = np.take_along_axis(higher, order, 1)
    cand = np.where(kept, np.take_along_axis(nbrs, order, 1), -1)
    sims = np.where(kept, np.take_along_axis(knn.sims[rows], order, 1), -np.inf)
    return cand, sims.astype(np.float32), higher.sum(axis=1)


def edge_rows(knn: KnnGraph, confidence: np.ndarray, ignore_ratio: float) -> np.ndarray:
    """Samples GCN-E decides for: at least two candidates and not among the ``ignore_ratio``
    fraction of lowest confidence (learn-to-cluster's ``ignore_set``, ``ignore_small_confs``)."""
    conf = _check_confidence(confidence, knn.num_samples)
    ignore_ratio = check_real("ignore_ratio", ignore_ratio, 0, 1)
    num = knn.num_samples
    ignored = np.zeros(num, dtype=bool)
    ignored[np.argsort(conf, kind="stable")[: int(num * ignore_ratio)]] = True
    return np.flatnonzero(~ignored & (_candidate_counts(knn, conf) >= 2))


def _candidate_counts(knn: KnnGraph, conf: np.ndarray) -> np.ndarray:
    """Number of kNN neighbours of strictly higher confidence, per sample."""
    count = np.empty(knn.num_samples, dtype=np.int64)
    for start in range(0, knn.num_samples, ROW_BATCH):
        nbrs = knn.nbrs[start : start + ROW_BATCH]
        own = conf[start : start + len(nbrs), None]
        count[start : start + len(nbrs)] = (
            (nbrs >= 0) & (conf[np.where(nbrs >= 0, nbrs, 0)] > own)
        ).sum(axis=1)
    return count


def subgraph_batch(
    centres: np.ndarray, cand: np.ndarray, features: np.ndarray, weights: sp.csr_matrix
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded GCN-E subgraphs of ``centres`` on their candidates ``cand (B, m)`` (-1 padded).

    Returns ``x (B, m, d)`` = ``f_j - f_centre`` (0 on padding), ``adj (B, m, m)`` = ``weights``
    restricted to the candidates and row-normalised (0 on padding) and the mask ``(B, m)``.
    ``weights`` is ``max(S, S^T) + I``; restricting learn-to-cluster's row-normalised matrix and
    normalising again gives the same rows, the first normalisation cancelling.
    """
    mask = cand >= 0
    safe = np.where(mask, cand, 0)
    x = features[safe] - features[centres][:, None, :]
    x[~mask] = 0.0
    b_idx, p_idx = np.nonzero(mask)
    node = cand[b_idx, p_idx]
    starts = weights.indptr[node]
    lens = weights.indptr[node + 1] - starts
    owner = np.repeat(np.arange(len(node)), lens)
    pos = starts[owner] + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    cols, vals = weights.indices[pos].astype(np.int64), weights.data[pos]
    n = weights.shape[0]
    keys = b_idx * n + node  # (subgraph, sample) -> slot, by a sorted lookup
    order = np.argsort(keys)
    sorted_keys = keys[order]
    query = b_idx[owner] * n + cols
    loc = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    hit = sorted_keys[loc] == query
    adj = np.zeros(cand.shape + cand.shape[1:], dtype=np.float32)
    adj[b_idx[owner][hit], p_idx[owner][hit], p_idx[order][loc][hit]] = vals[hit]
    rowsum = adj.sum(axis=2, keepdims=True)
    np.divide(adj, rowsum, out=adj, where=rowsum > 0)
    return x.astype(np.float32, copy=False), adj, mask


def _edge_weights(knn: KnnGraph) -> sp.csr_matrix:
    """``max(S, S^T) + I`` with ``S`` the kNN sims ``>= 0`` (GCN-V's graph before normalising)."""
    return knn_adjacency(knn, min_sim=0.0, symmetric=True, self_loops=True)


def _edge_inputs(
    features: np.ndarray, confidence: np.ndarray, knn: KnnGraph
) -> tuple[np.ndarray, np.ndarray]:
    feats = unit_rows(check_features(features))
    _check_knn(knn, len(feats))
    return feats, _check_confidence(confidence, len(feats))


def train_gcn_e(
    features: np.ndarray,
    confidence: np.ndarray,
    labels: np.ndarray,
    knn: KnnGraph,
    settings: TrainSettings | None = None,
    *,
    hidden: int = 512,
    dropout: float = 0.0,
    ignore_ratio: float = 0.7,
    **overrides: Any,
) -> GCNE:
    """Train GCN-E on the subgraphs of :func:`edge_rows`; targets: candidate has the same label.

    ``features``/``confidence``/``knn``: GCN-V's hidden features, predicted confidence and the
    kNN on those features (see :func:`gcn_e_inputs`). Published (``cfg_train_gcne_ms1m.py``):
    40 epochs, SGD lr 0.1, momentum 0.9, weight decay 1e-5, lr x0.1 at 50/80/90 % of the epochs,
    one subgraph per forward with gradients of 32 averaged per step (here: batches of 32 padded
    subgraphs, loss = mean over subgraphs of the mean over candidates: the same value), training
    ``ignore_ratio`` 0.7 (:data:`~robustface.cluster.train_settings.GCN_E_TRAINING`, changed by
    ``settings`` and ``overrides`` of its fields). Per-step losses are in ``model.loss_history``.
    """
    run = resolve_settings("GCN-E", GCN_E_TRAINING, settings, overrides)
    epochs, batch_size, log_every = run.epochs, run.batch_size, run.log_every
    device, seed = run.device, run.seed
    feats, conf = _edge_inputs(features, confidence, knn)
    labels = _check_labels(labels, len(feats))
    epochs, batch_size = check_int("epochs", epochs, 1), check_int("batch_size", batch_size, 1)
    log_every = check_int("log_every", log_every, 1)
    rows = edge_rows(knn, conf, ignore_ratio)
    if len(rows) == 0:
        raise ValueError(
            "no training subgraphs: no sample outside the ignored lowest-confidence fraction "
            f"(ignore_ratio={ignore_ratio}) has two or more higher-confidence neighbours"
        )
    weights = _edge_weights(knn)
    device = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        model = GCNE(feats.shape[1], hidden, dropout).to(device)

        def step_loss(items: np.ndarray, _rng: np.random.Generator) -> torch.Tensor:
            centres = rows[items]
            cand, _, count = candidate_sets(knn, conf, centres)
            cand = cand[:, : count.max()]
            x, adj, mask = subgraph_batch(centres, cand, feats, weights)
            same = labels[np.where(mask, cand, 0)] == labels[centres, None]
            logits = model(torch.from_numpy(x).to(device), torch.from_numpy(adj).to(device))
            mask_t = torch.from_numpy(mask).to(device)
            target = torch.from_numpy(same.astype(np.int64)).to(device)
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            loss = ((ce * mask_t).sum(1) / mask_t.sum(1)).mean()
            model.loss_history.append(loss.item())
            if len(model.loss_history) % log_every == 0 or len(model.loss_history) == 1:
                logger.info("GCN-E step %d loss %.5f", len(model.loss_history), loss.item())
            return loss

        _train_loop(
            model,
            len(rows),
            step_loss,
            run,
            lr_steps=_lr_milestones(epochs, run.lr_steps or ()),
            desc="GCN-E",
        )
    return model.eval()


@torch.no_grad()
def predict_gcn_e(
    model: GCNE,
    features: np.ndarray,
    confidence: np.ndarray,
    knn: KnnGraph,
    device: str | torch.device = "cpu",
    *,
    ignore_ratio: float = 0.8,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's chosen higher-confidence neighbour ``(N,)`` (-1: none) and its similarity.

    Samples of :func:`edge_rows` take the candidate of highest predicted connectivity (the
    nearest one among ties; published: a random one); the others their nearest candidate.
    Subgraphs are batched ``batch_size`` at a time, sorted by size to limit padding; the model is
    moved to ``device`` and used in eval mode.
    """
    feats, conf = _edge_inputs(features, confidence, knn)
    if feats.shape[1] != model.feature_dim:
        raise ValueError(
            f"features are {feats.shape[1]}-d but the model takes {model.feature_dim}-d"
        )
    batch_size = check_int("batch_size", batch_size, 1)
    peak, sim = nearest_higher(knn, conf)
    rows = edge_rows(knn, conf, ignore_ratio)
    rows = rows[np.argsort(_candidate_counts(knn, conf)[rows], kind="stable")]
    weights = _edge_weights(knn)
    device = torch.device(device)
    model.to(device)
    with _eval_mode(model):
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc="GCN-E predict", unit="batch", disable=not show_progress):
            centres = rows[start : start + batch_size]
            cand, cand_sims, count = candidate_sets(knn, conf, centres)
            cand, cand_sims = cand[:, : count.max()], cand_sims[:, : count.max()]
            x, adj, mask = subgraph_batch(centres, cand, feats, weights)
            logits = model(torch.from_numpy(x).to(device), torch.from_numpy(adj).to(device))
            score = F.log_softmax(logits, dim=-1)[..., 1]
            score = score.masked_fill(~torch.from_numpy(mask).to(device), -torch.inf)
            choice = score.argmax(dim=1).cpu().numpy()
            at = np.arange(len(centres))
            peak[centres], sim[centres] = cand[at, choice], cand_sims[at, choice]
    return peak, sim


def load_gcn_e(path: str | Path, device: str | torch.device = "cpu") -> GCNE:
    """A GCN-E model (eval mode) from :func:`save_gcn` output or a learn-to-cluster ``.pth``."""
    state, meta = read_gcn_checkpoint(path, "gcn_e")
    model = GCNE(meta["feature_dim"], meta["hidden"], meta["dropout"])
    if meta["num_classes"] != model.num_classes:
        raise ValueError(
            f"{path}: a {meta['num_classes']}-output GCN-E (regressor) is not supported; "
            "only the published 2-class model"
        )
    _load_state(Path(path), model, state)
    return model.to(device).eval()


def _as_gcn_e(model: GCNE | str | Path, device: str | torch.device) -> GCNE:
    if isinstance(model, GCNE):
        return model
    if isinstance(model, (str, Path)):
        return load_gcn_e(model, device)
    raise TypeError(f"gcn_e_model must be a GCNE or a checkpoint path, got {type(model).__name__}")


def gcn_e_inputs(
    gcn_v_model: GCNV,
    features: np.ndarray,
    knn: KnnGraph,
    *,
    use_gcn_features: bool = True,
    k: int = K_EDGE,
    knn_method: Method = "flat",
    device: str | torch.device = "cpu",
    batch_size: int = PREDICT_BATCH,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, KnnGraph]:
    """GCN-E's inputs from GCN-V: edge features, predicted confidence and their kNN graph.

    Edge features are GCN-V's L2-normalised hidden features (``use_gcn_features``, published) or
    the input features; the kNN graph (``k=160`` published) is built on them, except that on the
    input features with ``k <= knn.k`` the input ``knn`` is that graph already (truncated to
    ``k``) and is not searched again.
    """
    conf, hidden = predict_gcn_v(
        gcn_v_model, features, knn, device, batch_size=batch_size,
        return_hidden=use_gcn_features, show_progress=show_progress,
    )  # fmt: skip
    if hidden is None:
        edge_feats = normalize_rows(features, copy=False)  # no copy of unit input rows
        if k <= knn.k:
            return edge_feats, conf, knn if k == knn.k else knn.truncate(k)
    else:
        edge_feats = unit_rows(hidden)
    edge_knn = build_knn(
        edge_feats, k=k, method=knn_method, normalize=False, show_progress=show_progress
    )
    return edge_feats, conf, edge_knn


@CLUSTERERS.register("gcn_e")
class GCNEClustering(Clusterer):
    """GCN-V + GCN-E clustering (learn-to-cluster ``test_gcn_e.py`` with ``cfg_test_gcne_ms1m``).

    GCN-V on the input kNN (built with ``k`` if ``knn`` is None) gives confidence and hidden
    features; GCN-E picks each sample's link on the ``k_edge`` kNN of the edge features; links
    with similarity ``> tau`` form the clusters. The chosen links and their similarities are the
    threshold-independent work kept for :meth:`relink`.
    """

    tuned_param = "tau"
    grid = SIM_GRID
    models: ClassVar[Mapping[str, str]] = {"gcn_v_model": "gcn_v", "gcn_e_model": "gcn_e"}

    def __init__(
        self,
        *,
        gcn_v_model: GCNV | str | Path,
        gcn_e_model: GCNE | str | Path,
        tau: float = TAU_GCN_FEATURES,
        use_gcn_features: bool = True,
        k: int = 80,
        k_edge: int = K_EDGE,
        ignore_ratio: float = 0.8,
        knn_method: Method = "flat",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> None:
        self.gcn_v_model = gcn_v_model
        self.gcn_e_model = gcn_e_model
        self.tau = tau
        self.use_gcn_features = use_gcn_features
        self.k = k
        self.k_edge = k_edge
        self.ignore_ratio = ignore_ratio
        self.knn_method = knn_method
        self.device = device
        self.batch_size = batch_size
        self.show_progress = show_progress

    def _prepare(self, features: np.ndarray, knn: KnnGraph | None) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's chosen link and its similarity (before ``tau``)."""
        feats = check_features(features)
        device, progress = self.device, self.show_progress
        if knn is None:
            knn = build_knn(feats, k=self.k, method=self.knn_method, show_progress=progress)
        edge_feats, conf, edge_knn = gcn_e_inputs(
            _as_gcn_v(self.gcn_v_model, device),
            feats,
            knn,
            use_gcn_features=self.use_gcn_features,
            k=self.k_edge,
            knn_method=self.knn_method,
            device=device,
            show_progress=progress,
        )
        return predict_gcn_e(
            _as_gcn_e(self.gcn_e_model, device),
            edge_feats,
            conf,
            edge_knn,
            device,
            ignore_ratio=self.ignore_ratio,
            batch_size=self.batch_size,
            show_progress=progress,
        )

    def _finish(self, state: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return link_peaks(state[0], state[1], self.tau)


gcn_e_cluster = as_function(GCNEClustering, "gcn_e_cluster")
