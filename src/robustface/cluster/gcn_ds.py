"""GCN-D and GCN-S (Yang et al., CVPR 2019, "Learning to Cluster Faces on an Affinity Graph").

Each cluster proposal (:mod:`robustface.cluster.proposals`) is a small graph: its members'
features and an adjacency ``A = I + S`` where ``S`` holds the cosine similarities of the kNN
edges between members (both directions), as learn-to-cluster's ``ClusterProcessor.build_adj``.
The network (learn-to-cluster ``dsgcn.py``) stacks graph convolutions
``X' = ReLU(D^-1 A X W)`` (no bias) with node dropout between them; GCN-D max-pools the nodes and
regresses the proposal's IoU and IoP with its majority identity, GCN-S classifies every node as
in/out of the cluster of a seed node (an indicator column appended to the features).

Clustering (:func:`deoverlap`): proposals in decreasing predicted IoU, each sample to the first
proposal that holds it; with GCN-S, the proposals whose predicted IoP lies in ``seg_iop_range``
lose their predicted outliers first, which form one low-priority cluster per proposal.

Training defaults are learn-to-cluster's ``cfg_train_ms1m_8_prpsls.py`` and
``cfg_train_seg_ms1m_8_prpsls.py``: SGD lr 0.01, momentum 0.9, weight decay 1e-4, 30 epochs,
lr x0.1 at epochs 15, 24 and 28, 32 proposals per step, hidden dims (512, 64), dropout 0.5.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robustface.cluster.base import CLUSTERERS, Clusterer, as_function
from robustface.cluster.gcn_v import (
    _batches,
    _eval_mode,
    _load_state,
    _rng_devices,
    _train_loop,
    read_gcn_checkpoint,
    save_gcn,
)
from robustface.cluster.graph import relabel
from robustface.cluster.knn import KnnGraph, Method, check_features
from robustface.cluster.proposals import (
    Proposals,
    ProposalSetting,
    generate_proposals,
    proposal_targets,
)
from robustface.cluster.train_settings import GCN_DS_TRAINING, TrainSettings, resolve_settings
from robustface.errors import DataFormatError
from robustface.utils.guards import check_choice, check_int, check_real

__all__ = [
    "DSGCN",
    "DSGraphConv",
    "GCNDClustering",
    "GCNDSClustering",
    "deoverlap",
    "gcn_d_cluster",
    "gcn_ds_cluster",
    "predict_gcn_d",
    "predict_gcn_s",
    "proposal_batch",
    "train_gcn_d",
    "train_gcn_s",
]

Stage = Literal["det", "seg"]
SeedNode = Literal["random", "max_degree"]
STAGE_KIND: dict[str, str] = {"det": "gcn_d", "seg": "gcn_s"}
Device = str | torch.device


class DSGraphConv(nn.Module):
    """``D^-1 A X W`` on a batch: ``x`` ``(B, n, in)``, ``adj`` ``(B, n, n)``, ``D`` = row sums.

    Rows of ``adj`` summing to 0 (padding) give 0. Weights start uniform in
    ``±1/sqrt(out_features)`` and there is no bias, as ``GraphConv`` in learn-to-cluster's
    ``dsgcn`` (GCN-V/E's :class:`~robustface.cluster.gcn_v.GraphConv` is ``[X, AX] W``).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(out_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        deg = adj.sum(dim=-1, keepdim=True)
        out = torch.bmm(adj, x @ self.weight)
        return out / torch.where(deg > 0, deg, torch.ones_like(deg))


class DSGCN(nn.Module):
    """The detection/segmentation GCN: graph convolutions + ReLU + node dropout, then a head.

    ``stage="det"`` (GCN-D): max over the proposal's nodes, ``Linear -> (IoU, IoP)``.
    ``stage="seg"`` (GCN-S): input has one extra seed-indicator column; per node
    ``Linear -> log-probabilities (out, in)``. Dropout zeroes whole nodes (learn-to-cluster applies
    ``Dropout2d`` to ``(B, n, dim)`` tensors).
    """

    def __init__(
        self,
        feature_dim: int = 256,
        hidden_dims: Sequence[int] = (512, 64),
        stage: Stage = "det",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("stage", stage, STAGE_KIND)
        feature_dim = check_int("feature_dim", feature_dim, 1)
        hidden = [int(h) for h in hidden_dims]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden_dims must be positive sizes, at least one, got {hidden_dims}")
        dropout = check_real("dropout", dropout, 0, 1, open_high=True)
        self.config: dict[str, Any] = {
            "feature_dim": int(feature_dim),
            "hidden_dims": hidden,
            "stage": stage,
            "dropout": float(dropout),
        }
        self.stage = stage
        self.kind = STAGE_KIND[stage]
        self.dropout = dropout
        dims = [feature_dim + (stage == "seg"), *hidden]
        self.layers = nn.ModuleList(DSGraphConv(i, o) for i, o in itertools.pairwise(dims))
        self.head = nn.Linear(hidden[-1], 2)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` (IoU, IoP) for ``det``; ``(B, n, 2)`` log-probabilities for ``seg``."""
        for layer in self.layers:
            x = F.relu(layer(x, adj))
            if self.training and self.dropout > 0:
                x = x * F.dropout(torch.ones_like(x[..., :1]), self.dropout, training=True)
        if self.stage == "det":
            pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
            return self.head(pooled)
        return F.log_softmax(self.head(x), dim=-1)

    def save(self, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
        """Write the model and a JSON-able ``meta`` (provenance) with :func:`save_gcn`."""
        save_gcn(self, path, meta)

    @classmethod
    def load(cls, path: str | Path, stage: Stage, device: Device = "cpu") -> DSGCN:
        """Read a model written by :meth:`save`; a file of the other stage is refused."""
        check_choice("stage", stage, STAGE_KIND)
        state, meta = read_gcn_checkpoint(path, STAGE_KIND[stage])
        names = ("feature_dim", "hidden_dims", "stage", "dropout")
        if any(name not in meta for name in names):
            raise DataFormatError(path, f"model meta lacks {[n for n in names if n not in meta]}")
        model = cls(**{name: meta[name] for name in names})
        _load_state(Path(path), model, state)
        return model.to(device).eval()


def _check_inputs(
    features: np.ndarray, knn: KnnGraph, proposals: Proposals, labels: np.ndarray | None = None
) -> np.ndarray:
    feats = check_features(features)
    if knn.num_samples != len(feats):
        raise ValueError(f"knn has {knn.num_samples} samples but features has {len(feats)} rows")
    proposals.check(len(feats))
    if len(proposals) and proposals.k.max() > knn.k:
        raise ValueError(
            f"proposals use k={int(proposals.k.max())} neighbours but knn holds only k={knn.k}"
        )
    if labels is not None and np.shape(labels) != (len(feats),):
        raise ValueError(
            f"labels must have one entry per feature row ({len(feats)}), got {np.shape(labels)}"
        )
    return feats


def _member_positions(proposals: Proposals, index: np.ndarray) -> np.ndarray:
    """Positions in ``proposals.members`` of the members of proposals ``index``, concatenated."""
    sizes = proposals.sizes[index]
    heads = np.cumsum(sizes) - sizes
    return np.repeat(proposals.offsets[index] - heads, sizes) + np.arange(int(sizes.sum()))


def proposal_batch(
    features: np.ndarray,
    knn: KnnGraph,
    proposals: Proposals,
    index: np.ndarray,
    *,
    seeds: np.ndarray | None = None,
    device: Device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded tensors of proposals ``index``: features, adjacency and node mask.

    ``x`` ``(B, n, dim)`` holds the members' features (rows in member order, zeros as padding);
    ``adj`` ``(B, n, n)`` is ``I + S`` with ``S[i, j] = S[j, i]`` the similarity of a kNN edge
    between members ``i`` and ``j`` among each member's first ``proposals.k`` neighbours;
    ``mask`` ``(B, n)`` marks real nodes. With ``seeds`` (local member positions, one per
    proposal) a seed-indicator column is appended to ``x`` (GCN-S input).
    """
    index = np.asarray(index, dtype=np.int64)
    if index.ndim != 1 or len(index) == 0:
        raise ValueError(f"index must be a non-empty 1-D array of proposals, got {index.shape}")
    sizes = proposals.sizes[index]
    batch, n, total = len(index), int(sizes.max()), int(sizes.sum())
    row = np.repeat(np.arange(batch), sizes)
    positions = _member_positions(proposals, index)
    local = positions - np.repeat(proposals.offsets[index], sizes)
    members = proposals.members[positions]

    nbrs, sims = knn.nbrs[members], knn.sims[members]
    rank = np.arange(knn.k)
    valid = (rank[None, :] < np.repeat(proposals.k[index], sizes)[:, None]) & (nbrs >= 0)
    valid &= nbrs != members[:, None]
    keys = row * knn.num_samples + members  # ascending: members are sorted per proposal
    query = row[:, None] * knn.num_samples + np.where(valid, nbrs, 0)
    pos = np.minimum(np.searchsorted(keys, query), total - 1)
    valid &= keys[pos] == query
    src, col = np.nonzero(valid)

    dim = features.shape[1]
    x = np.zeros((batch, n, dim + (seeds is not None)), dtype=np.float32)
    x[row, local, :dim] = features[members]
    b, i, j = row[src], local[src], local[pos[src, col]]
    adj = np.zeros((batch, n, n), dtype=np.float32)
    listed = np.zeros((batch, n, n), dtype=bool)
    adj[b, i, j] = sims[src, col]
    listed[b, i, j] = True
    reverse = ~listed[b, j, i]  # an edge listed by one end only is mirrored to the other
    adj[b[reverse], j[reverse], i[reverse]] = sims[src, col][reverse]
    adj[row, local, local] = 1.0
    mask = np.zeros((batch, n), dtype=bool)
    mask[row, local] = True
    if seeds is not None:
        x[np.arange(batch), np.asarray(seeds, dtype=np.int64), dim] = 1.0
    return (
        torch.from_numpy(x).to(device),
        torch.from_numpy(adj).to(device),
        torch.from_numpy(mask).to(device),
    )


def train_gcn_d(
    features: np.ndarray,
    knn: KnnGraph,
    proposals: Proposals,
    labels: np.ndarray,
    settings: TrainSettings | None = None,
    *,
    hidden_dims: Sequence[int] = (512, 64),
    dropout: float = 0.5,
    **overrides: Any,
) -> tuple[DSGCN, list[float]]:
    """Train GCN-D to regress every proposal's (IoU, IoP) by mean squared error.

    Returns the model (in eval mode) and the mean loss of every epoch. The caller's random
    state is left untouched (``seed`` drives initialisation, shuffling and dropout). Optimiser
    and run: :data:`~robustface.cluster.train_settings.GCN_DS_TRAINING`, changed by ``settings``
    and ``overrides`` of its fields.
    """
    run = resolve_settings("GCN-D", GCN_DS_TRAINING, settings, overrides)
    dev = torch.device(run.device)
    feats = _check_inputs(features, knn, proposals, labels)
    if len(proposals) == 0:
        raise ValueError("proposals is empty: nothing to train GCN-D on")
    iou, iop = proposal_targets(proposals, np.asarray(labels))
    targets = torch.from_numpy(np.stack([iou, iop], axis=1))
    with torch.random.fork_rng(devices=_rng_devices(dev)):
        torch.manual_seed(run.seed)
        model = DSGCN(feats.shape[1], hidden_dims, "det", dropout).to(dev)

        def step_loss(items: np.ndarray, _: np.random.Generator) -> torch.Tensor:
            x, adj, mask = proposal_batch(feats, knn, proposals, items, device=dev)
            return F.mse_loss(model(x, adj, mask), targets[items].to(dev))

        history = _train_loop(
            model, len(proposals), step_loss, run, lr_steps=run.lr_steps or (), desc="GCN-D"
        )
    return model, history


def train_gcn_s(
    features: np.ndarray,
    knn: KnnGraph,
    proposals: Proposals,
    labels: np.ndarray,
    settings: TrainSettings | None = None,
    *,
    iop_range: tuple[float, float] = (0.2, 0.8),
    hidden_dims: Sequence[int] = (512, 64),
    dropout: float = 0.5,
    **overrides: Any,
) -> tuple[DSGCN, list[float]]:
    """Train GCN-S: a random seed member per proposal and step, every member labelled in/out
    of the seed's identity; the loss is each proposal's mean node NLL, averaged over the batch.

    Only proposals with ground-truth IoP in ``iop_range`` (those with outliers to find) are used,
    as learn-to-cluster's ``th_iop_min/max`` = 0.2/0.8. Returns the model and epoch losses.
    Settings as :func:`train_gcn_d`.
    """
    run = resolve_settings("GCN-S", GCN_DS_TRAINING, settings, overrides)
    dev = torch.device(run.device)
    feats = _check_inputs(features, knn, proposals, labels)
    low, high = iop_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"iop_range must satisfy 0 <= low < high <= 1, got {iop_range}")
    _, iop = proposal_targets(proposals, np.asarray(labels))
    labels = np.asarray(labels, dtype=np.int64)
    train = proposals.select((iop >= low) & (iop <= high))
    if len(train) == 0:
        raise ValueError(f"no proposal has a ground-truth IoP in iop_range={iop_range}")
    sizes = train.sizes
    with torch.random.fork_rng(devices=_rng_devices(dev)):
        torch.manual_seed(run.seed)
        model = DSGCN(feats.shape[1], hidden_dims, "seg", dropout).to(dev)

        def step_loss(items: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
            seeds = (rng.random(len(items)) * sizes[items]).astype(np.int64)
            x, adj, mask = proposal_batch(feats, knn, train, items, seeds=seeds, device=dev)
            seed_label = labels[train.members[train.offsets[items] + seeds]]
            target = np.zeros(mask.shape, dtype=np.int64)
            rows = np.repeat(np.arange(len(items)), sizes[items])
            inside = labels[train.members[_member_positions(train, items)]] == seed_label[rows]
            target[mask.cpu().numpy()] = inside
            logp = model(x, adj, mask)
            nll = -logp.gather(-1, torch.from_numpy(target).to(dev).unsqueeze(-1)).squeeze(-1)
            per_proposal = (nll * mask).sum(dim=1) / mask.sum(dim=1)
            return per_proposal.mean()

        history = _train_loop(
            model, len(train), step_loss, run, lr_steps=run.lr_steps or (), desc="GCN-S"
        )
    return model, history


def _check_model(model: DSGCN, stage: Stage, feature_dim: int) -> None:
    if not isinstance(model, DSGCN) or model.stage != stage:
        kind = getattr(model, "stage", type(model).__name__)
        raise ValueError(f"model must be a DSGCN of stage {stage!r}, got {kind!r}")
    if model.config["feature_dim"] != feature_dim:
        raise ValueError(
            f"model expects {model.config['feature_dim']}-dim features, got {feature_dim}"
        )


@torch.no_grad()
def predict_gcn_d(
    model: DSGCN,
    features: np.ndarray,
    knn: KnnGraph,
    proposals: Proposals,
    *,
    batch_size: int = 256,
    show_progress: bool = True,
) -> np.ndarray:
    """Predicted ``(P, 2)`` float32 (IoU, IoP) of every proposal, on the model's device
    (batches of proposals of similar sizes)."""
    feats = _check_inputs(features, knn, proposals)
    _check_model(model, "det", feats.shape[1])
    batch_size = check_int("batch_size", batch_size, 1)
    dev = next(model.parameters()).device
    out = np.zeros((len(proposals), 2), dtype=np.float32)
    order = np.argsort(proposals.sizes, kind="stable")
    batches = list(_batches(order, batch_size))
    with _eval_mode(model):
        for items in tqdm(batches, desc="GCN-D", unit="batch", disable=not show_progress):
            x, adj, mask = proposal_batch(feats, knn, proposals, items, device=dev)
            out[items] = model(x, adj, mask).float().cpu().numpy()
    return out


@torch.no_grad()
def predict_gcn_s(
    model: DSGCN,
    features: np.ndarray,
    knn: KnnGraph,
    proposals: Proposals,
    *,
    seed_node: SeedNode = "random",
    random_state: int = 0,
    batch_size: int = 256,
    show_progress: bool = True,
) -> np.ndarray:
    """Probability that each member belongs with its proposal's seed: ``(M,)`` float32,
    aligned with ``proposals.members`` (computed on the model's device).

    ``seed_node``: ``random`` (a uniformly drawn member, learn-to-cluster's test config; drawn
    from ``random_state``) or ``max_degree`` (the member with the largest weighted degree).
    """
    feats = _check_inputs(features, knn, proposals)
    _check_model(model, "seg", feats.shape[1])
    check_choice("seed_node", seed_node, ("random", "max_degree"))
    batch_size = check_int("batch_size", batch_size, 1)
    dev = next(model.parameters()).device
    rng = np.random.default_rng(random_state)
    random_seeds = (rng.random(len(proposals)) * proposals.sizes).astype(np.int64)
    out = np.zeros(len(proposals.members), dtype=np.float32)
    order = np.argsort(proposals.sizes, kind="stable")
    batches = list(_batches(order, batch_size))
    with _eval_mode(model):
        for items in tqdm(batches, desc="GCN-S", unit="batch", disable=not show_progress):
            if seed_node == "random":
                seeds = random_seeds[items]
            else:
                _, adj, _ = proposal_batch(feats, knn, proposals, items)
                seeds = adj.sum(dim=2).argmax(dim=1).numpy()
            x, adj, mask = proposal_batch(feats, knn, proposals, items, seeds=seeds, device=dev)
            prob_in = model(x, adj, mask)[..., 1].exp()
            out[_member_positions(proposals, items)] = prob_in[mask].float().cpu().numpy()
    return out


def deoverlap(
    proposals: Proposals,
    scores: np.ndarray,
    num_samples: int,
    *,
    min_score: float | None = None,
    keep_members: np.ndarray | None = None,
    keep_outliers: bool = True,
) -> np.ndarray:
    """Cluster labels ``(num_samples,)`` from overlapping scored proposals.

    Proposals with ``score >= min_score`` are taken in decreasing score (ties: earlier first);
    each sample goes to the first one holding it (learn-to-cluster ``nms`` with ``th_iou=1``).
    ``keep_members`` ``(M,)`` (aligned with ``proposals.members``) removes the ``False`` members
    from their proposal; with ``keep_outliers`` each proposal's removed members form one more
    cluster, ranked after every proposal. Samples left in no cluster become singletons, as
    learn-to-cluster's ``write_meta`` does. Labels are ``0..C-1`` by first appearance.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(proposals),):
        raise ValueError(
            f"scores must hold one value per proposal ({len(proposals)}), got {scores.shape}"
        )
    if np.isnan(scores).any():
        raise ValueError("scores contains NaN")
    proposals.check(num_samples)
    keep = np.ones(len(proposals.members), dtype=bool)
    if keep_members is not None:
        keep = np.asarray(keep_members, dtype=bool)
        if keep.shape != proposals.members.shape:
            raise ValueError(
                f"keep_members must have one flag per proposal member "
                f"({len(proposals.members)}), got shape {keep.shape}"
            )
    order = np.argsort(-scores, kind="stable")
    if min_score is not None:
        order = order[scores[order] >= min_score]
    rank = np.full(len(proposals), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    member_rank = rank[proposals.proposal_ids()]
    # kept members rank by their proposal; outliers rank after every proposal, in the same order
    cluster = np.where(keep, member_rank, member_rank + len(order))
    use = member_rank >= 0
    if not keep_outliers:
        use &= keep
    nodes, cluster = proposals.members[use], cluster[use]
    best = np.full(num_samples, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, nodes, cluster)
    alone = best == np.iinfo(np.int64).max
    labels = np.where(alone, -1, best)
    labels[alone] = 2 * len(order) + np.arange(int(alone.sum()))
    return relabel(labels)


def _as_model(model: DSGCN | str | Path, stage: Stage, device: Device | None) -> DSGCN:
    """A saved model loaded on ``device`` (default CPU), or the given model where it is (a copy
    on ``device`` when one is named and differs)."""
    if isinstance(model, str | Path):
        return DSGCN.load(model, stage, device or "cpu")
    if device is not None:
        want, have = torch.device(device), next(model.parameters()).device
        if want.type != have.type or want.index not in (None, have.index):
            return copy.deepcopy(model).to(want)
    return model


def _proposals_for(
    features: np.ndarray,
    knn: KnnGraph | None,
    settings: str | Sequence[ProposalSetting | Mapping[str, Any]],
    knn_method: Method,
    show_progress: bool,
) -> tuple[np.ndarray, KnnGraph, Proposals]:
    if knn is None:
        raise ValueError("GCN-D/S clustering needs a kNN graph (knn=None given); see build_knn")
    feats = check_features(features)
    if knn.num_samples != len(feats):
        raise ValueError(f"knn has {knn.num_samples} samples but features has {len(feats)} rows")
    proposals = generate_proposals(
        knn, settings, feats, knn_method=knn_method, show_progress=show_progress
    ).unique()
    return feats, knn, proposals


@CLUSTERERS.register("gcn_d")
class GCNDClustering(Clusterer):
    """GCN-D clustering: proposals (``settings``), predicted IoU, :func:`deoverlap`.

    ``model`` is a trained GCN-D or the path of a saved one; ``min_score`` drops proposals
    predicted below it (learn-to-cluster ``th_pos = -1``: none dropped). ``device``: where a
    saved model is loaded (default CPU); a model object runs where it is unless ``device``
    names another device (then a copy runs there). ``knn_method`` builds the kNN among
    super-vertex means of iterative settings.
    """

    models: ClassVar[Mapping[str, str]] = {"model": "gcn_d"}

    def __init__(
        self,
        *,
        model: DSGCN | str | Path,
        settings: str | Sequence[ProposalSetting | Mapping[str, Any]] = "test_2",
        knn_method: Method = "flat",
        min_score: float | None = None,
        batch_size: int = 256,
        device: Device | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.settings = settings
        self.knn_method = knn_method
        self.min_score = min_score
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress

    def _finish(self, state: Any) -> np.ndarray:
        feats, _, proposals, scores = _detect(self, state)
        return deoverlap(proposals, scores[:, 0], len(feats), min_score=self.min_score)


def _detect(
    clusterer: GCNDClustering | GCNDSClustering, state: Any
) -> tuple[np.ndarray, KnnGraph, Proposals, np.ndarray]:
    """The proposals of ``clusterer.settings`` on ``state`` (features, kNN) and GCN-D's scores
    of them: ``(features, kNN, proposals, scores)`` (the features and kNN of the last setting)."""
    features, knn = state
    detector = _as_model(clusterer.model, "det", clusterer.device)
    feats, knn, proposals = _proposals_for(
        features, knn, clusterer.settings, clusterer.knn_method, clusterer.show_progress
    )
    scores = predict_gcn_d(
        detector,
        feats,
        knn,
        proposals,
        batch_size=clusterer.batch_size,
        show_progress=clusterer.show_progress,
    )
    return feats, knn, proposals, scores


gcn_d_cluster = as_function(GCNDClustering, "gcn_d_cluster")


@CLUSTERERS.register("gcn_ds")
class GCNDSClustering(Clusterer):
    """GCN-D + GCN-S clustering: as ``gcn_d``, but proposals with predicted IoP in
    ``seg_iop_range`` are segmented first and lose members with in-probability below
    ``inlier_threshold`` (learn-to-cluster ``cfg_test_seg_ms1m``: 0.1-0.9, 0.5, outliers kept as
    low-priority clusters).
    """

    models: ClassVar[Mapping[str, str]] = {"model": "gcn_d", "seg_model": "gcn_s"}

    def __init__(
        self,
        *,
        model: DSGCN | str | Path,
        seg_model: DSGCN | str | Path,
        settings: str | Sequence[ProposalSetting | Mapping[str, Any]] = "test_2",
        knn_method: Method = "flat",
        min_score: float | None = None,
        seg_iop_range: tuple[float, float] = (0.1, 0.9),
        inlier_threshold: float = 0.5,
        keep_outliers: bool = True,
        seed_node: SeedNode = "random",
        random_state: int = 0,
        batch_size: int = 256,
        device: Device | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.seg_model = seg_model
        self.settings = settings
        self.knn_method = knn_method
        self.min_score = min_score
        self.seg_iop_range = seg_iop_range
        self.inlier_threshold = inlier_threshold
        self.keep_outliers = keep_outliers
        self.seed_node = seed_node
        self.random_state = random_state
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress

    def _finish(self, state: Any) -> np.ndarray:
        low, high = self.seg_iop_range
        if not low <= high:
            raise ValueError(f"seg_iop_range must satisfy low <= high, got {self.seg_iop_range}")
        segmenter = _as_model(self.seg_model, "seg", self.device)
        feats, knn, proposals, scores = _detect(self, state)
        chosen = np.flatnonzero((scores[:, 1] >= low) & (scores[:, 1] <= high))
        keep = np.ones(len(proposals.members), dtype=bool)
        if len(chosen):
            prob_in = predict_gcn_s(
                segmenter,
                feats,
                knn,
                proposals.select(chosen),
                seed_node=self.seed_node,
                random_state=self.random_state,
                batch_size=self.batch_size,
                show_progress=self.show_progress,
            )
            keep[_member_positions(proposals, chosen)] = prob_in >= self.inlier_threshold
        return deoverlap(
            proposals,
            scores[:, 0],
            len(feats),
            min_score=self.min_score,
            keep_members=keep,
            keep_outliers=self.keep_outliers,
        )


gcn_ds_cluster = as_function(GCNDSClustering, "gcn_ds_cluster")
