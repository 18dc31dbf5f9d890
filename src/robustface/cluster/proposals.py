"""Cluster proposals for GCN-D/S (Yang et al., CVPR 2019): super vertices and their merges.

A *super vertex* is a connected component of the kNN graph restricted to edges of cosine
similarity ``>= th``; a component larger than ``max_size`` is split by raising the threshold to
``th + (1 - th) * step`` (starting from the smallest kept edge) until every piece fits, as
learn-to-cluster's ``graph_clustering_dynamic_th`` does. Several settings ``(k, th, max_size)``
are unioned, and *iterative* proposals merge super vertices: the mean feature of every super
vertex, a small kNN among those means and super vertices of that graph (learn-to-cluster's
``generate_iter_proposals``).

Proposals are stored compactly (:class:`Proposals`): ``members[offsets[i]:offsets[i + 1]]`` are
the sorted sample ids of proposal ``i``, and ``k[i]`` the kNN size whose edges form its adjacency.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from robustface.cluster.graph import knn_edges
from robustface.cluster.knn import KnnGraph, Method, build_knn, check_features
from robustface.utils.guards import check_int, check_real

__all__ = [
    "PRESETS",
    "IterSetting",
    "ProposalSetting",
    "Proposals",
    "generate_proposals",
    "iterative_proposals",
    "proposal_targets",
    "resolve_settings",
    "super_vertices",
]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every ``(s, n)`` pair, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    heads = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - heads, lengths) + np.arange(total)


@dataclass(frozen=True)
class Proposals:
    """Proposals as CSR-like arrays: ``offsets`` ``(P + 1,)``, ``members`` ``(M,)``, ``k`` ``(P,)``.

    Members of one proposal are distinct sample ids in ascending order; ``k[i]`` is the number of
    nearest neighbours (self included) whose edges make proposal ``i``'s adjacency.
    """

    offsets: np.ndarray
    members: np.ndarray
    k: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        members = np.asarray(self.members, dtype=np.int64)
        k = np.asarray(self.k, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if (np.diff(offsets) < 1).any():
            raise ValueError("offsets must be strictly increasing (every proposal has a member)")
        if members.ndim != 1 or len(members) != offsets[-1]:
            raise ValueError(
                f"members must be 1-D with offsets[-1] = {offsets[-1]} entries, "
                f"got shape {members.shape}"
            )
        if len(members) and members.min() < 0:
            raise ValueError("members must be sample ids >= 0")
        step_up = np.diff(members) > 0
        step_up[offsets[1:-1] - 1] = True  # a new proposal may start anywhere
        if not step_up.all():
            raise ValueError("members must be strictly increasing within each proposal")
        if k.shape != (len(offsets) - 1,) or (k < 1).any():
            raise ValueError(f"k must hold one positive int per proposal, got shape {k.shape}")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "k", k)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Number of members of every proposal."""
        return np.diff(self.offsets)

    def proposal_ids(self) -> np.ndarray:
        """``(M,)`` index of the proposal each entry of ``members`` belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.sizes)

    def members_of(self, index: int) -> np.ndarray:
        """The sample ids of proposal ``index``."""
        return self.members[self.offsets[index] : self.offsets[index + 1]]

    def select(self, index: np.ndarray) -> Proposals:
        """The proposals at positions ``index`` (an int array or a boolean mask), in that order."""
        index = np.arange(len(self))[np.asarray(index)]
        sizes = self.sizes[index]
        members = self.members[_ranges(self.offsets[index], sizes)]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return Proposals(offsets, members, self.k[index])

    def filter_size(self, min_size: int = 1, max_size: int | None = None) -> Proposals:
        """The proposals with ``min_size <= size <= max_size``."""
        keep = self.sizes >= min_size
        if max_size is not None:
            keep &= self.sizes <= max_size
        return self.select(keep)

    def unique(self) -> Proposals:
        """Drop repeated proposals (same members), keeping the first of each; order is kept.

        Identical proposals get identical scores, so de-overlapping is unchanged by this.
        """
        seen: set[bytes] = set()
        keep = np.zeros(len(self), dtype=bool)
        for i, (start, stop) in enumerate(itertools.pairwise(self.offsets)):
            key = self.members[start:stop].tobytes()
            if key not in seen:
                seen.add(key)
                keep[i] = True
        return self.select(keep)

    def check(self, num_samples: int) -> None:
        """Raise ``ValueError`` if a member id is not a sample of an ``num_samples``-row set."""
        if len(self.members) and self.members.max() >= num_samples:
            raise ValueError(
                f"proposals reference sample {int(self.members.max())} but there are only "
                f"{num_samples} samples"
            )

    @classmethod
    def from_labels(
        cls, labels: np.ndarray, k: int, min_size: int = 1, max_size: int | None = None
    ) -> Proposals:
        """One proposal per label value ``>= 0`` (in label order), sizes filtered to the range."""
        labels = np.asarray(labels, dtype=np.int64)
        ids = np.flatnonzero(labels >= 0)
        order = ids[np.argsort(labels[ids], kind="stable")]
        sizes = np.bincount(labels[ids]) if len(ids) else np.zeros(0, dtype=np.int64)
        present = sizes[sizes > 0]
        keep = present >= min_size
        if max_size is not None:
            keep &= present <= max_size
        offsets = np.concatenate([[0], np.cumsum(present)])
        members = order[_ranges(offsets[:-1][keep], present[keep])]
        return cls(
            np.concatenate([[0], np.cumsum(present[keep])]),
            members,
            np.full(int(keep.sum()), k, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Proposals]) -> Proposals:
        """All proposals of ``parts``, one after the other."""
        if not parts:
            return cls(np.zeros(1, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        sizes = np.concatenate([p.sizes for p in parts])
        return cls(
            np.concatenate([[0], np.cumsum(sizes)]),
            np.concatenate([p.members for p in parts]),
            np.concatenate([p.k for p in parts]),
        )


def _unique_pairs(graph: KnnGraph, th: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges ``(a < b, sim)`` with ``sim >= th``, each pair once (its first listing)."""
    src, dst, sim = knn_edges(graph, min_sim=th)
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    _, first = np.unique(a * graph.num_samples + b, return_index=True)
    return a[first], b[first], sim[first].astype(np.float64)


def super_vertices(
    graph: KnnGraph,
    th: float,
    max_size: int,
    *,
    step: float = 0.05,
    max_iter: int = 100,
) -> np.ndarray:
    """Super-vertex label (0..C-1) of every sample; ``-1`` for samples without an edge ``>= th``.

    Components of the graph's edges with similarity ``>= th`` that have at most ``max_size``
    members are kept; larger ones are cut again at ``t + (1 - t) * step``, starting from ``t`` =
    the smallest kept similarity, until they fit (learn-to-cluster ``graph_clustering_dynamic_th``).
    A sample cut loose by a raised threshold becomes a singleton super vertex. After ``max_iter``
    raises, the components left are kept as they are.
    """
    th = check_real("th (cosine similarity)", th, -1, 1)
    max_size = check_int("max_size", max_size, 1)
    step = check_real("step", step, 0, 1, open_low=True, open_high=True)
    max_iter = check_int("max_iter", max_iter, 0)
    n = graph.num_samples
    labels = np.full(n, -1, dtype=np.int64)
    a, b, sim = _unique_pairs(graph, th)
    if len(a) == 0:
        return labels
    active = np.unique(np.concatenate([a, b]))
    thr = float(sim.min())
    next_label = 0
    for it in range(max_iter + 1):
        local_a, local_b = np.searchsorted(active, a), np.searchsorted(active, b)
        adj = sp.csr_matrix(
            (np.ones(len(a), dtype=np.int8), (local_a, local_b)), shape=(len(active),) * 2
        )
        _, comp = connected_components(adj, directed=True, connection="weak")
        sizes = np.bincount(comp)
        fits = sizes <= max_size if it < max_iter else np.ones(len(sizes), dtype=bool)
        new_id = np.cumsum(fits) - 1 + next_label
        done = fits[comp]
        labels[active[done]] = new_id[comp[done]]
        next_label += int(fits.sum())
        if done.all():
            break
        active = active[~done]
        thr = thr + (1.0 - thr) * step
        remaining = np.zeros(n, dtype=bool)
        remaining[active] = True
        keep = remaining[a] & remaining[b] & (sim >= thr)
        a, b, sim = a[keep], b[keep], sim[keep]
    return labels


@dataclass(frozen=True)
class IterSetting:
    """A second-level (iterative) proposal setting: super vertices of super vertices.

    ``k`` neighbours among super-vertex mean features (inner products of the unnormalised means,
    as learn-to-cluster's faiss ``IndexFlatIP`` gives), threshold ``th``, at most ``sv_max_size``
    super vertices per merge and at least ``sv_min_size``; the merged proposals are kept when
    ``min_size <= samples <= max_size``. Defaults: learn-to-cluster ``cfg_test_ms1m_20_prpsls``.
    """

    k: int
    sv_max_size: int
    th: float = 0.4
    step: float = 0.05
    sv_min_size: int = 2
    min_size: int = 3
    max_size: int = 500

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"IterSetting.k must be >= 2 (self plus a neighbour), got {self.k}")
        if self.sv_min_size < 2:
            raise ValueError(
                f"IterSetting.sv_min_size must be >= 2 (a single super vertex repeats a base "
                f"proposal), got {self.sv_min_size}"
            )
        if self.sv_max_size < self.sv_min_size:
            raise ValueError(
                f"IterSetting.sv_max_size ({self.sv_max_size}) must be >= sv_min_size "
                f"({self.sv_min_size})"
            )
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(
                f"IterSetting needs 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )


@dataclass(frozen=True)
class ProposalSetting:
    """One super-vertex setting: ``k`` neighbours, threshold ``th``, raise ``step``, sizes.

    ``keep`` adds its own super vertices with ``>= min_size`` members (learn-to-cluster's
    ``iter0``); ``iterative`` lists second-level settings built on its super vertices.
    Defaults: learn-to-cluster ``cfg_*_ms1m_*`` (step 0.05, min size 3, max size 300).
    """

    k: int = 80
    th: float = 0.7
    step: float = 0.05
    min_size: int = 3
    max_size: int = 300
    keep: bool = True
    iterative: tuple[IterSetting, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"ProposalSetting.k must be >= 2, got {self.k}")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(
                f"ProposalSetting needs 1 <= min_size <= max_size, got {self.min_size}, "
                f"{self.max_size}"
            )
        iterative = tuple(
            it if isinstance(it, IterSetting) else IterSetting(**it) for it in self.iterative
        )
        object.__setattr__(self, "iterative", iterative)
        if not self.keep and not iterative:
            raise ValueError("a ProposalSetting with keep=False needs iterative settings")


_ITER_20 = tuple(
    IterSetting(k=k, sv_max_size=m) for k, m in [(2, 8), (2, 12), (2, 16), (3, 5), (3, 10), (4, 4)]
)

PRESETS: dict[str, tuple[ProposalSetting, ...]] = {
    # cfg_train_ms1m_8_prpsls.py: the 8 training settings
    "train_8": tuple(
        ProposalSetting(k=k, th=th)
        for k, th in [
            (30, 0.6),
            (30, 0.7),
            (60, 0.6),
            (60, 0.7),
            (80, 0.6),
            (80, 0.65),
            (80, 0.7),
            (80, 0.75),
        ]
    ),
    # cfg_train_ms1m_8_prpsls.py test_data: k=80, th 0.7 and 0.75
    "test_2": (ProposalSetting(k=80, th=0.7), ProposalSetting(k=80, th=0.75)),
    # cfg_test_ms1m_20_prpsls.py: 2 basic + 3 x 6 iterative settings
    "test_20": (
        ProposalSetting(k=80, th=0.6, iterative=_ITER_20),
        ProposalSetting(k=80, th=0.7, iterative=_ITER_20),
        ProposalSetting(k=80, th=0.75, keep=False, iterative=_ITER_20),
    ),
}


def resolve_settings(
    settings: str | Sequence[ProposalSetting | Mapping[str, Any]],
) -> tuple[ProposalSetting, ...]:
    """Settings from a preset name (see :data:`PRESETS`), settings or dicts of their fields."""
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(
                f"unknown proposal preset {settings!r}; choose one of {', '.join(PRESETS)}"
            )
        return PRESETS[settings]
    out = tuple(s if isinstance(s, ProposalSetting) else ProposalSetting(**s) for s in settings)
    if not out:
        raise ValueError("settings is empty; give at least one ProposalSetting")
    return out


def iterative_proposals(
    features: np.ndarray,
    base_labels: np.ndarray,
    base_k: int,
    settings: IterSetting | Sequence[IterSetting],
    *,
    knn_method: Method = "flat",
    show_progress: bool = False,
) -> Proposals:
    """Merged proposals from super vertices ``base_labels`` (``-1``: a sample alone).

    Every base super vertex (and every sample without one) is represented by the mean of its
    features; for each setting, super vertices of the kNN graph of those means with at least
    ``sv_min_size`` members become proposals of all their samples (settings in order, one kNN
    search with the largest ``k``, truncated per setting). ``base_k`` is recorded as the
    proposals' adjacency kNN size (learn-to-cluster reads the base kNN for their edges).
    """
    feats = check_features(features)
    base_labels = np.asarray(base_labels, dtype=np.int64)
    if base_labels.shape != (len(feats),):
        raise ValueError(
            f"base_labels must have one label per feature row ({len(feats)}), "
            f"got shape {base_labels.shape}"
        )
    settings = (settings,) if isinstance(settings, IterSetting) else tuple(settings)
    if not settings:
        return Proposals.concat([])
    alone = base_labels < 0
    sv = base_labels.copy()
    num_base = int(base_labels.max()) + 1 if (~alone).any() else 0
    sv[alone] = num_base + np.arange(int(alone.sum()))
    _, sv = np.unique(sv, return_inverse=True)
    num_sv = int(sv.max()) + 1
    counts = np.bincount(sv, minlength=num_sv).astype(np.float32)
    average = sp.csr_matrix(
        (1.0 / counts[sv], (sv, np.arange(len(feats)))), shape=(num_sv, len(feats))
    )
    means = np.asarray(average @ feats, dtype=np.float32)
    sv_graph = build_knn(
        means,
        k=max(s.k for s in settings),
        method=knn_method,
        normalize=False,
        show_progress=show_progress,
    )
    parts = []
    for setting in settings:
        graph = sv_graph.truncate(min(setting.k, sv_graph.k))
        merged = super_vertices(graph, setting.th, setting.sv_max_size, step=setting.step)
        group_size = np.bincount(merged[merged >= 0], minlength=1)
        valid = merged >= 0
        valid[valid] = group_size[merged[valid]] >= setting.sv_min_size
        merged = np.where(valid, merged, -1)
        parts.append(Proposals.from_labels(merged[sv], base_k, setting.min_size, setting.max_size))
    return Proposals.concat(parts)


def generate_proposals(
    knn: KnnGraph,
    settings: str | Sequence[ProposalSetting | Mapping[str, Any]] = "test_2",
    features: np.ndarray | None = None,
    *,
    knn_method: Method = "flat",
    show_progress: bool = True,
) -> Proposals:
    """The union of the proposals of every setting (learn-to-cluster ``generate_proposals``).

    ``knn`` must hold at least the largest ``k`` of the settings (it is truncated per setting);
    ``features`` are needed for iterative settings (their super-vertex means), whose kNN is built
    with ``knn_method``. Proposals repeated across settings are kept, as published.
    """
    resolved = resolve_settings(settings)
    needed = max(s.k for s in resolved)
    if needed > knn.k:
        which = repr(settings) if isinstance(settings, str) else "given"
        raise ValueError(
            f"the proposal settings {which} need k={needed} neighbours, but the kNN graph holds "
            f"only k={knn.k}: build it with k >= {needed} (CLI: --k {needed})"
        )
    if any(s.iterative for s in resolved):
        if features is None:
            raise ValueError("iterative proposal settings need features (super-vertex means)")
        if len(features) != knn.num_samples:
            raise ValueError(
                f"features has {len(features)} rows but knn has {knn.num_samples} samples"
            )
    parts: list[Proposals] = []
    for setting in tqdm(resolved, desc="proposals", unit="setting", disable=not show_progress):
        labels = super_vertices(
            knn.truncate(setting.k), setting.th, setting.max_size, step=setting.step
        )
        if setting.keep:
            parts.append(Proposals.from_labels(labels, setting.k, setting.min_size))
        if setting.iterative:
            assert features is not None  # checked above
            parts.append(
                iterative_proposals(
                    features, labels, setting.k, setting.iterative, knn_method=knn_method
                )
            )
    return Proposals.concat(parts)


def proposal_targets(proposals: Proposals, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IoP ``(P,)`` of every proposal with its majority ground-truth cluster.

    For proposal ``P`` with majority label ``g`` (most members; ties go to the smallest label) and
    ground-truth cluster ``G = {i : labels[i] = g}``: ``IoU = |P & G| / |P | G|`` and
    ``IoP = |P & G| / |P|`` (learn-to-cluster ``compute_iou`` / ``compute_iop``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be ground-truth ids >= 0 (no unlabelled -1 samples)")
    proposals.check(len(labels))
    labels = labels.astype(np.int64)
    if len(proposals) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    num_labels = int(labels.max()) + 1
    keys, counts = np.unique(
        proposals.proposal_ids() * num_labels + labels[proposals.members], return_counts=True
    )
    pid, lab = keys // num_labels, keys % num_labels
    order = np.lexsort((lab, -counts, pid))
    first = order[np.concatenate([[True], pid[order][1:] != pid[order][:-1]])]
    inter = counts[first].astype(np.float64)
    gt_size = np.bincount(labels, minlength=num_labels)[lab[first]]
    size = proposals.sizes.astype(np.float64)
    iou = inter / (size + gt_size - inter)
    iop = inter / size
    return iou.astype(np.float32), iop.astype(np.float32)
