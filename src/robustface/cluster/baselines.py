"""Classic face-clustering baselines, registered in :data:`~robustface.cluster.base.CLUSTERERS`.

``kmeans`` (faiss, :class:`KMeans`), ``dbscan`` (kNN-DBSCAN, :class:`DBSCAN`), ``hac``
(average-linkage agglomerative on the kNN graph, :class:`HAC`), ``aro`` (approximate rank-order,
:class:`ARO`), ``cc`` (connected components above a similarity, :class:`ConnectedComponents`),
``chinese_whispers`` (:class:`ChineseWhispers`) and ``infomap`` (:class:`Infomap`). Each is a
:class:`~robustface.cluster.base.Clusterer` (``Cls(**params).fit(features, knn).labels_``, an
``(N,)`` int64 array of ids ``0..C-1``, ``-1`` for DBSCAN noise) with a function form under the
registered name (``fn(features, knn, **params) -> labels``; ``infomap_clustering`` for Infomap);
methods that work on the graph alone accept ``features=None``. Defaults follow learn-to-cluster's
baseline scripts (``scripts/baseline/*.sh``) unless a docstring says otherwise.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, Literal

import faiss
import infomap
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import kmeans_plusplus
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from robustface.cluster.base import CLUSTERERS, SIM_GRID, Clusterer, as_function
from robustface.cluster.graph import components, knn_adjacency, knn_edges, relabel
from robustface.cluster.knn import KnnGraph, check_features
from robustface.utils.guards import check_choice, check_int, check_real

__all__ = [
    "ARO",
    "DBSCAN",
    "HAC",
    "ChineseWhispers",
    "ConnectedComponents",
    "Infomap",
    "KMeans",
    "aro",
    "aro_distances",
    "cc",
    "chinese_whispers",
    "dbscan",
    "hac",
    "infomap_clustering",
    "kmeans",
]

KmeansInit = Literal["k-means++", "random"]
KMEANS_INITS: tuple[str, ...] = ("k-means++", "random")
Linkage = Literal["average", "complete", "single"]
LINKAGES: tuple[str, ...] = ("average", "complete", "single")

# Elements (rows x k) in one chunk of ARO's batched list lookups (32 MB per int64 array).
_ARO_CHUNK_ELEMENTS = 1 << 22
# HAC: peak memory per distinct kNN pair (edge summaries in dicts, heap entries; 447 and 448
# measured at k=80 on 21,636 and 96,590 samples, 1.14M and 5.16M pairs), and the default cap on
# pairs (about 3.6 GB, some 150K samples at k=80).
HAC_BYTES_PER_PAIR = 450
HAC_MAX_PAIRS = 8_000_000


# ---------------------------------------------------------------------------------------------
# Input and parameter checks
# ---------------------------------------------------------------------------------------------


def _check_features(method: str, features: np.ndarray | None) -> np.ndarray:
    if features is None:
        raise ValueError(f"{method} needs features, got None")
    feats = check_features(features)
    if len(feats) == 0:
        raise ValueError("features is empty (0 rows)")
    return feats


def _check_graph(method: str, features: np.ndarray | None, knn: KnnGraph | None) -> KnnGraph:
    """``knn`` checked: a :class:`KnnGraph`, ids in ``[-1, N)``, one row per feature row."""
    if knn is None:
        raise ValueError(f"{method} needs a kNN graph (knn), got None")
    if not isinstance(knn, KnnGraph):
        raise TypeError(f"knn must be a KnnGraph, got {type(knn).__name__}")
    n = knn.num_samples
    if n == 0:
        raise ValueError("knn is empty (0 samples)")
    if features is not None and len(features) != n:
        raise ValueError(
            f"knn has {n} samples but features has {len(features)} rows; they must describe "
            "the same samples"
        )
    if knn.nbrs.size and (knn.nbrs.min() < -1 or knn.nbrs.max() >= n):
        raise ValueError(
            f"knn.nbrs holds ids outside [-1, {n}) (min {knn.nbrs.min()}, max {knn.nbrs.max()})"
        )
    return knn


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


@CLUSTERERS.register("kmeans")
class KMeans(Clusterer):
    """K-means (Lloyd's iterations by faiss ``Kmeans``, Euclidean on the L2-normalised features).

    The published baseline (learn-to-cluster ``baseline/sklearn_cluster.py``, sklearn ``KMeans``,
    79.21 pairwise-F on part1_test) is given the true number of identities, so ``num_clusters``
    is required. ``init="k-means++"`` seeds the centroids with sklearn's ``kmeans_plusplus`` on a
    random sample of ``max(3 * num_clusters, 10000)`` rows (sklearn ``MiniBatchKMeans``'s
    ``init_size`` rule, with a floor so small clusters are sampled); ``"random"`` is faiss's
    own choice of random rows. ``iterations`` (25) and the 256-points-per-centroid training
    sample are faiss's defaults; ``show_progress`` shows a bar over the three stages (seeding,
    iterations, assignment; faiss's own per-iteration log stays off). ``knn`` is
    not used (checked if given).

    faiss rather than sklearn's ``MiniBatchKMeans``: both cost ``N * C * d`` per pass over the
    data, but faiss makes each pass one multithreaded GEMM. On 58K x 256 with 857 clusters (1/10
    of part1_test in N and in C, so 1/100 of the work per pass) faiss took 5.7 s for 20
    iterations against 15-17 s for ``MiniBatchKMeans`` (batch 1000 or 4096, early stopping),
    at a similar adjusted Rand index.
    """

    true_count = "num_clusters"

    def __init__(
        self,
        *,
        num_clusters: int | None = None,
        init: KmeansInit = "k-means++",
        iterations: int = 25,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        self.num_clusters = num_clusters
        self.init = init
        self.iterations = iterations
        self.seed = seed
        self.show_progress = show_progress

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        feats = _check_features("kmeans", features)
        if knn is not None:
            _check_graph("kmeans", feats, knn)
        if self.num_clusters is None:
            raise ValueError(
                "kmeans needs num_clusters (the published baseline is given the true number of "
                "identities)"
            )
        num_clusters = check_int("num_clusters", self.num_clusters, 1, len(feats))
        check_choice("init", self.init, KMEANS_INITS)
        iterations = check_int("iterations", self.iterations, 1)
        seed = check_int("seed", self.seed, 0, 2**31 - 1)
        km = faiss.Kmeans(
            feats.shape[1],
            num_clusters,
            niter=iterations,
            seed=seed,
            min_points_per_centroid=1,  # clusters of a few faces are the norm, not a warning
            verbose=False,  # its log would land in the middle of the benchmark's output
        )
        init_centroids = None
        with tqdm(total=3, desc=f"kmeans ({num_clusters} clusters)", unit="stage",
                  disable=not self.show_progress) as bar:  # fmt: skip
            if self.init == "k-means++":
                rng = np.random.default_rng(seed)
                size = min(len(feats), max(3 * num_clusters, 10_000))
                sample = feats[np.sort(rng.choice(len(feats), size, replace=False))]
                # k-means++ is sequential small GEMMs: threads only contend (50 s vs 3.6 s on
                # 10K x 64, 730 centroids, 2 cores).
                with threadpool_limits(1):
                    init_centroids, _ = kmeans_plusplus(sample, num_clusters, random_state=seed)
            bar.update()
            km.train(feats, init_centroids=init_centroids)
            bar.update()
            _, assign = km.index.search(feats, 1)
            bar.update()
        return relabel(assign[:, 0])


kmeans = as_function(KMeans, "kmeans")


# ---------------------------------------------------------------------------------------------
# kNN-DBSCAN
# ---------------------------------------------------------------------------------------------


@CLUSTERERS.register("dbscan")
class DBSCAN(Clusterer):
    """DBSCAN (Ester et al., KDD 1996) on the kNN graph: neighbours within cosine distance ``eps``.

    The eps-neighbourhood of a sample is itself plus every sample linked to it by a kNN edge
    (in either direction) with ``1 - sim <= eps``; a sample with at least ``min_samples``
    neighbours (itself included, as in sklearn) is a core point. Core points linked to each
    other form the clusters, a non-core point joins the cluster (the one created first, in
    sklearn's order) of a core neighbour, and the rest are noise (``-1``). With all N neighbours
    in the graph this is exactly sklearn's ``DBSCAN(metric="precomputed")`` on the dense cosine
    distances. Defaults ``eps=0.25``, ``min_samples=1`` are learn-to-cluster's
    ``scripts/baseline/dbscan.sh`` (k=80; with ``min_samples=1`` every sample is core).
    """

    tuned_param = "eps"
    grid = SIM_GRID

    def __init__(
        self,
        *,
        eps: float = 0.25,
        min_samples: int = 1,
    ) -> None:
        self.eps = eps
        self.min_samples = min_samples

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        graph = _check_graph("dbscan", features, knn)
        eps = check_real("eps", self.eps, 0.0, 2.0)
        min_samples = check_int("min_samples", self.min_samples, 1)
        n = graph.num_samples
        src, dst, _ = knn_edges(graph, min_sim=1.0 - eps)
        pattern = sp.csr_matrix(
            (np.ones(2 * len(src), dtype=np.int8), (np.r_[src, dst], np.r_[dst, src])), shape=(n, n)
        )
        pattern.sum_duplicates()
        core = np.diff(pattern.indptr) + 1 >= min_samples
        rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
        cols = pattern.indices
        both = core[rows] & core[cols]
        # Clusters numbered by their lowest core sample: the order in which sklearn creates them.
        cluster = relabel(np.where(core, components(n, rows[both], cols[both]), -1))
        border = ~core[rows] & core[cols]
        best = np.full(n, n, dtype=np.int64)
        np.minimum.at(best, rows[border], cluster[cols[border]])
        labels = np.where(core, cluster, np.where(best < n, best, -1))
        return relabel(labels)


dbscan = as_function(DBSCAN, "dbscan")


# ---------------------------------------------------------------------------------------------
# Agglomerative clustering on the kNN graph
# ---------------------------------------------------------------------------------------------


def _linkage_value(linkage: str, missing: float) -> Callable[[list[float], int], float]:
    """``value(entry, pairs)``: the distance of two clusters from their edge summary ``entry``
    (``[sum, count, min, max]`` of the kNN-edge distances between them) and ``pairs``, the
    product of their sizes; pairs without an edge count at distance ``missing``."""
    if linkage == "average":
        return lambda e, pairs: (e[0] + (pairs - e[1]) * missing) / pairs
    if linkage == "complete":
        return lambda e, pairs: e[3] if e[1] == pairs else max(e[3], missing)
    return lambda e, pairs: e[2]


def _graph_merges(
    n: int,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    linkage: str,
    missing: float,
    max_pairs: int,
    stop_distance: float,
    max_merges: int,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Merges ``(x, y)`` (one sample of each cluster), in order, of agglomerative clustering of
    ``n`` samples on the dissimilarity that is ``1 - sim`` on the kNN ``edges`` (``knn_edges``:
    sources, targets, similarities) and ``missing`` elsewhere, joining
    only clusters linked by an edge; stops before a merge at ``stop_distance`` or after
    ``max_merges``. Exact and deterministic (ties by the lower sample ids): a heap of candidate
    merges with lazy deletion, each cluster's edge summaries in a dict; memory O(pairs)."""
    src, dst, sim = edges
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keys, first = np.unique(lo * n + hi, return_index=True)
    if len(keys) > max_pairs:
        raise ValueError(
            f"hac: the kNN graph links {len(keys):,} distinct pairs, above max_pairs="
            f"{max_pairs:,} (about {HAC_BYTES_PER_PAIR} bytes each, in Python dicts and a heap). "
            "Use a smaller k (knn.truncate), drop weak edges (knn.threshold), raise max_pairs "
            "if the memory is there, or use a graph method (cc, infomap) at this size"
        )
    value = _linkage_value(linkage, missing)
    near: list[dict[int, list[float]] | None] = [{} for _ in range(n)]
    heap = []
    for a, b, d in zip((keys // n).tolist(), (keys % n).tolist(),
                       (1.0 - sim[first].astype(np.float64)).tolist(), strict=True):  # fmt: skip
        entry = [d, 1, d, d]
        near[a][b] = near[b][a] = entry
        heap.append((d, a, b))
    heapq.heapify(heap)
    size = [1] * n
    live = len(heap)  # pairs of clusters linked by an edge
    merged: list[tuple[int, int]] = []
    with tqdm(total=max_merges, desc=f"hac ({linkage})", unit="merge",
              disable=not show_progress, mininterval=1.0) as bar:  # fmt: skip
        while heap and len(merged) < max_merges:
            d, a, b = heapq.heappop(heap)
            if d >= stop_distance:
                break
            near_a, near_b = near[a], near[b]
            if near_a is None or near_b is None or value(near_a[b], size[a] * size[b]) != d:
                continue  # stale: a cluster was merged since this entry was pushed
            x, y = (a, b) if len(near_a) >= len(near_b) else (b, a)
            near_x, near_y = near[x], near[y]
            del near_x[y], near_y[x]
            live -= 1
            for c, e in near_y.items():
                near_c = near[c]
                del near_c[y]
                f = near_x.get(c)
                if f is None:
                    near_x[c] = near_c[x] = e
                else:
                    f[0] += e[0]
                    f[1] += e[1]
                    f[2] = min(f[2], e[2])
                    f[3] = max(f[3], e[3])
                    live -= 1
            near[y] = None
            size[x] += size[y]
            merged.append((x, y))
            bar.update()
            changed = near_y if linkage == "single" else near_x  # sizes change every average
            for c in changed:
                e = near_x[c]
                heapq.heappush(heap, (value(e, size[x] * size[c]), min(x, c), max(x, c)))
            if len(heap) > 4 * live + 1024:  # drop the stale entries: memory stays O(pairs)
                heap = [
                    (value(e, size[p] * size[c]), p, c)
                    for p, near_p in enumerate(near)
                    if near_p is not None
                    for c, e in near_p.items()
                    if p < c
                ]
                heapq.heapify(heap)
    joined = np.array(merged, dtype=np.int64).reshape(-1, 2)
    return joined[:, 0], joined[:, 1]


@CLUSTERERS.register("hac")
class HAC(Clusterer):
    """Agglomerative clustering on the kNN graph: exact ``linkage`` on the dissimilarity that is
    the cosine distance ``1 - sim`` on kNN edges and ``missing_distance`` on every other pair.

    With the default ``missing_distance=1`` (similarity 0), ``average`` is graph average
    linkage as in Dhulipala et al. (ICML 2021): the similarity of two clusters is their edge
    weight summed over ``|A| |B|`` pairs, absent edges counting 0. Only clusters linked by an
    edge are merged, so merges never cross the graph's connected components. ``single`` is
    single linkage over the edges; ``complete`` counts a cluster pair with any absent edge at
    ``missing_distance`` or more. With all N neighbours in the graph, each is exactly scipy's
    ``linkage`` on the dense cosine distances.

    Give exactly one stopping rule: ``distance_threshold`` (merges at a distance below it are
    kept) or ``num_clusters`` (at least the number of components). Works on the graph alone
    (``features`` is only checked against it). Memory is about ``HAC_BYTES_PER_PAIR`` bytes
    per distinct kNN pair; graphs of more than ``max_pairs`` pairs are refused with an error
    that says so (the default, 8M pairs, about 3.6 GB, is some 150K samples at k=80; 21,636
    samples at k=80 took 17 s and 0.5 GB, 96,590 took 131 s and 2.3 GB).

    Earlier versions used sklearn's connectivity-restricted ``AgglomerativeClustering``. Its
    ``average`` ignores the pairs that are not edges (and keeps a neighbour's distance
    unaveraged when only one of two merged clusters has an edge to it), so a cluster's
    distance drifts to its closest pairs and the tree chains like single linkage: cut at the
    true number of identities it left one giant cluster plus the outliers as singletons (issue
    14: pairwise F 1.53 at 21,636 samples). It also gathered the features of both ends of every
    edge to get the distances (several ``edges x dim`` copies: 9.7 GB there). Filling absent
    pairs with a lower bound of their distance instead (the mean of the two samples' k-th
    neighbour distances) chained the same way (1.52). The HAC baseline of learn-to-cluster
    (70.63 pairwise-F on part1_test) used ``fastcluster`` single linkage with a distance
    threshold on the full data.
    """

    true_count = "num_clusters"
    # its merge loop is Python: 96,590 samples at k=80 took 131 s and 2.3 GB (5.2M kNN pairs)
    max_samples = 100_000
    max_samples_reason = "hac's merge loop is too slow there"

    def __init__(
        self,
        *,
        distance_threshold: float | None = None,
        num_clusters: int | None = None,
        linkage: Linkage = "average",
        missing_distance: float = 1.0,
        max_pairs: int = HAC_MAX_PAIRS,
        show_progress: bool = True,
    ) -> None:
        self.distance_threshold = distance_threshold
        self.num_clusters = num_clusters
        self.linkage = linkage
        self.missing_distance = missing_distance
        self.max_pairs = max_pairs
        self.show_progress = show_progress

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        graph = _check_graph("hac", features, knn)
        if (self.distance_threshold is None) == (self.num_clusters is None):
            raise ValueError(
                "hac needs exactly one of distance_threshold and num_clusters, got "
                f"distance_threshold={self.distance_threshold!r}, "
                f"num_clusters={self.num_clusters!r}"
            )
        check_choice("linkage", self.linkage, LINKAGES)
        missing_distance = check_real("missing_distance", self.missing_distance, 0.0, 2.0)
        max_pairs = check_int("max_pairs", self.max_pairs, 1)
        n = graph.num_samples
        edges = knn_edges(graph)
        if self.distance_threshold is not None:
            distance_threshold = check_real("distance_threshold", self.distance_threshold, 0.0, 2.0)
            stop_distance, max_merges = distance_threshold, n - 1
        else:
            num_clusters = check_int("num_clusters", self.num_clusters, 1, n)
            num_comps = int(components(n, edges[0], edges[1]).max()) + 1
            if num_clusters < num_comps:
                raise ValueError(
                    f"num_clusters={num_clusters} is below the {num_comps} connected components "
                    "of the kNN graph; merges never cross components (use a larger k or fewer "
                    "clusters)"
                )
            stop_distance, max_merges = np.inf, n - num_clusters
        x, y = _graph_merges(
            n,
            edges,
            self.linkage,
            missing_distance,
            max_pairs,
            stop_distance,
            max_merges,
            self.show_progress,
        )
        return components(n, x, y)


hac = as_function(HAC, "hac")


# ---------------------------------------------------------------------------------------------
# Approximate rank-order clustering
# ---------------------------------------------------------------------------------------------


def aro_distances(knn: KnnGraph, *, show_progress: bool = True) -> np.ndarray:
    """Approximate rank-order distance between each sample and each of its kNN entries.

    Otto, Wang, Jain, "Clustering Millions of Faces by Identity", TPAMI 2018, from the kNN lists
    alone. With ``L_i`` the list of ``i`` (best first, ``i`` itself usually at position 0),
    ``r_i(j)`` the position of ``j`` in it and ``d(i, j)`` the number of entries of
    ``L_i[:r_i(j)]`` (those ranked before ``j``) that are not in ``L_j``::

        D(i, j) = (d(i, j) + d(j, i)) / min(r_i(j), r_j(i))

    (denominator at least 1), and ``inf`` when ``j`` is missing or ``i`` is not in ``L_j``.
    Returns an ``(N, k)`` float32 array aligned with ``knn.nbrs``; ``D`` is symmetric and is 0 for
    the sample itself. Lists are looked up by a batched binary search over sorted lists, only
    for mutual pairs (at most ``N k^2 log k / 2`` work).
    """
    graph = _check_graph("aro_distances", None, knn)
    nbrs = graph.nbrs
    n, k = nbrs.shape
    order = np.argsort(nbrs, axis=1, kind="stable")
    sorted_nbrs = np.take_along_axis(nbrs, order, axis=1)
    dup = (sorted_nbrs[:, 1:] == sorted_nbrs[:, :-1]) & (sorted_nbrs[:, 1:] >= 0)
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"knn.nbrs lists a neighbour twice (first in row {row})")
    back_rank = _back_ranks(nbrs)
    mutual = back_rank >= 0
    # d(i, j) for mutual entries only, grouped by j's position p: the first p entries of L_i are
    # looked up in j's sorted list (a batched binary search), so the work is sum(p) per row.
    absent_before = np.zeros((n, k), dtype=np.int32)
    lists = torch.from_numpy(nbrs)
    sorted_t = torch.from_numpy(sorted_nbrs)
    chunk = max(1, _ARO_CHUNK_ELEMENTS // k)
    for p in tqdm(range(1, k), desc="aro", unit="rank", disable=not show_progress):
        rows_p = np.flatnonzero(mutual[:, p])
        for start in range(0, len(rows_p), chunk):
            rows = torch.from_numpy(rows_p[start : start + chunk])
            theirs = sorted_t[lists[rows, p]]  # (m, k): j's sorted list
            mine = lists[rows, :p].contiguous()  # (m, p): the entries ranked before j
            pos = torch.searchsorted(theirs, mine).clamp_(max=k - 1)
            absent = (mine >= 0) & (theirs.gather(1, pos) != mine)
            absent_before[rows.numpy(), p] = absent.sum(1, dtype=torch.int32).numpy()
    j = np.where(mutual, nbrs, 0)
    r_back = np.where(mutual, back_rank, 0)
    r_fwd = np.broadcast_to(np.arange(k), (n, k))
    num = absent_before + absent_before[j, r_back]
    den = np.maximum(np.minimum(r_fwd, r_back), 1)
    return np.where(mutual, num / den, np.inf).astype(np.float32)


def _back_ranks(nbrs: np.ndarray) -> np.ndarray:
    """``(N, k)``: the position of ``i`` in the list of ``j = nbrs[i, p]``, -1 where absent.

    With ``R[i, j] = r_i(j) + 1`` sparse, ``(k + 1) R + (R^T restricted to R's pattern)`` holds
    both positions of each pair in one number."""
    n, k = nbrs.shape
    src = np.repeat(np.arange(n), k)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int64), n)
    keep = nbrs.reshape(-1) >= 0
    fwd = sp.csr_matrix((rank[keep], (src[keep], nbrs.reshape(-1)[keep])), shape=(n, n))
    both = (fwd * (k + 1) + fwd.T.tocsr().multiply(fwd > 0)).tocoo()
    out = np.full((n, k), -1, dtype=np.int64)
    out[both.row, both.data // (k + 1) - 1] = both.data % (k + 1) - 1
    return out


@CLUSTERERS.register("aro")
class ARO(Clusterer):
    """Approximate rank-order clustering (Otto et al., TPAMI 2018): link every pair whose
    rank-order distance (:func:`aro_distances`) is at most ``threshold``, then take connected
    components. ``threshold=1.0`` is learn-to-cluster's ``scripts/baseline/aro.sh``
    (``th_sim=0``, threshold ``1 - th_sim``), with the graph's k (80 there). The distances are
    the threshold-independent work kept by :meth:`prepare` for :meth:`relink`.

    Deviation: learn-to-cluster's ``baseline/aro.py`` divides by ``min(r_i(j), r_j(i) + 1)``,
    which makes ``D(i, j) != D(j, i)``; this uses the paper's symmetric ``min(r_i(j), r_j(i))``.
    """

    tuned_param = "threshold"
    grid = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0)

    def __init__(self, *, threshold: float = 1.0, show_progress: bool = True) -> None:
        self.threshold = threshold
        self.show_progress = show_progress

    def _prepare(self, features: np.ndarray | None, knn: KnnGraph) -> tuple[KnnGraph, np.ndarray]:
        graph = _check_graph("aro", features, knn)
        check_real("threshold", self.threshold, 0.0, float(2 * graph.k))  # before the distances
        return graph, aro_distances(graph, show_progress=self.show_progress)

    def _finish(self, state: tuple[KnnGraph, np.ndarray]) -> np.ndarray:
        graph, dist = state
        threshold = check_real("threshold", self.threshold, 0.0, float(2 * graph.k))
        src = np.repeat(np.arange(graph.num_samples), graph.k)
        link = (dist.reshape(-1) <= threshold) & (graph.nbrs.reshape(-1) >= 0)
        return components(graph.num_samples, src[link], graph.nbrs.reshape(-1)[link])


aro = as_function(ARO, "aro")


# ---------------------------------------------------------------------------------------------
# Connected components, Chinese whispers, Infomap
# ---------------------------------------------------------------------------------------------


@CLUSTERERS.register("cc")
class ConnectedComponents(Clusterer):
    """Connected components of the kNN edges with cosine similarity ``>= min_sim``.

    ``min_sim=0.7`` is the first threshold of learn-to-cluster's super-vertex proposals
    (``scripts/generate_basic_proposals.sh``, ``th_knn=0.7``, k=80).
    """

    tuned_param = "min_sim"
    grid = SIM_GRID

    def __init__(
        self,
        *,
        min_sim: float = 0.7,
    ) -> None:
        self.min_sim = min_sim

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        graph = _check_graph("cc", features, knn)
        min_sim = check_real("min_sim", self.min_sim, -1.0, 1.0)
        src, dst, _ = knn_edges(graph, min_sim=min_sim)
        return components(graph.num_samples, src, dst)


cc = as_function(ConnectedComponents, "cc")


def _best_label(
    votes: sp.csr_matrix, current: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``votes`` (summed weight per class) with any vote, and each one's heaviest class:
    its ``current`` class when that is among the heaviest, else one of them at random."""
    counts = np.diff(votes.indptr)
    voted = np.flatnonzero(counts)
    starts = votes.indptr[voted]
    seg = np.repeat(np.arange(len(voted)), counts[voted])
    top = votes.data == np.maximum.reduceat(votes.data, starts)[seg]
    priority = np.where(top, rng.random(len(votes.data)), -1.0)
    priority[top & (votes.indices == current[voted][seg])] = 2.0
    pick = priority == np.maximum.reduceat(priority, starts)[seg]
    return voted, votes.indices[pick]


@CLUSTERERS.register("chinese_whispers")
class ChineseWhispers(Clusterer):
    """Chinese whispers (Biemann, TextGraphs 2006) on the symmetric kNN graph, weighted by
    cosine similarity, edges with similarity ``>= min_sim`` (0 < min_sim).

    Every sample starts in its own class; in each of ``iterations`` passes the samples, in a
    random order, take the class with the largest summed edge weight among their neighbours.
    The order is split into ``num_blocks`` blocks updated one after another through sparse
    products, each seeing the classes the earlier blocks chose, so the update stays asynchronous
    up to one block (with ``num_blocks >= N``, the sequential algorithm). The result depends only
    on ``seed``. ``min_sim=0.6``, ``iterations=20`` are learn-to-cluster's
    ``scripts/baseline/cw_ms1m.sh`` (k=80).

    Deviation: Biemann breaks every tie at random; here a sample keeps its class when that is
    among the heaviest (other ties at random), so a pass that changes nothing is a fixed point
    and the loop stops there.
    """

    tuned_param = "min_sim"
    grid = SIM_GRID

    def __init__(
        self,
        *,
        min_sim: float = 0.6,
        iterations: int = 20,
        seed: int = 0,
        num_blocks: int = 100,
        show_progress: bool = True,
    ) -> None:
        self.min_sim = min_sim
        self.iterations = iterations
        self.seed = seed
        self.num_blocks = num_blocks
        self.show_progress = show_progress

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        graph = _check_graph("chinese_whispers", features, knn)
        min_sim = check_real("min_sim", self.min_sim, 0.0, 1.0)
        if min_sim == 0.0:
            raise ValueError("min_sim must be > 0 (edge weights are similarities), got 0.0")
        iterations = check_int("iterations", self.iterations, 1)
        seed = check_int("seed", self.seed, 0, 2**31 - 1)
        num_blocks = check_int("num_blocks", self.num_blocks, 1)
        n = graph.num_samples
        adj = knn_adjacency(graph, min_sim=min_sim, symmetric=True, weighted=True).astype(
            np.float64
        )
        labels = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        passes = tqdm(range(iterations), desc="chinese whispers", disable=not self.show_progress)
        for _ in passes:
            changed = 0
            for rows in np.array_split(rng.permutation(n), min(num_blocks, n)):
                sub = adj[rows]
                if sub.nnz == 0:
                    continue
                local = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
                votes = sp.csr_matrix(
                    (sub.data, (local, labels[sub.indices])), shape=(len(rows), n)
                )
                votes.sum_duplicates()
                voted, best = _best_label(votes, labels[rows], rng)
                changed += int(np.count_nonzero(labels[rows[voted]] != best))
                labels[rows[voted]] = best
            if changed == 0:
                break
        return relabel(labels)


chinese_whispers = as_function(ChineseWhispers, "chinese_whispers")


@CLUSTERERS.register("infomap")
class Infomap(Clusterer):
    """Infomap (Rosvall & Bergstrom, PNAS 2008; the ``infomap`` package) on the kNN graph.

    The first ``k`` entries of each list (self included; ``None``: the whole graph) with cosine
    similarity ``>= min_sim`` become undirected links weighted by similarity (a pair listed by
    both ends counts once). A two-level partition is found with ``num_trials`` trials and
    ``seed`` (>= 1; 123 is infomap's default); its top-level modules are the clusters.
    ``k=50``, ``min_sim=0.58`` are the Infomap-on-kNN anchor reported with FaceMap (93.98
    pairwise-F on part1_test).
    """

    tuned_param = "min_sim"
    grid = SIM_GRID

    def __init__(
        self,
        *,
        k: int | None = 50,
        min_sim: float = 0.58,
        seed: int = 123,
        num_trials: int = 1,
    ) -> None:
        self.k = k
        self.min_sim = min_sim
        self.seed = seed
        self.num_trials = num_trials

    def _finish(self, state: Any) -> np.ndarray:
        features, knn = state
        graph = _check_graph("infomap", features, knn)
        if self.k is not None:
            k = check_int("k", self.k, 1)
            if k > graph.k:
                raise ValueError(
                    f"infomap's k={k} exceeds the kNN graph's k={graph.k}: lower it (CLI: --set "
                    f"infomap.k={graph.k}) or build the graph with k >= {k} (CLI: --k {k})"
                )
            graph = graph.truncate(k)
        min_sim = check_real("min_sim", self.min_sim, 0.0, 1.0)
        if min_sim == 0.0:
            raise ValueError("min_sim must be > 0 (link weights are similarities), got 0.0")
        seed = check_int("seed", self.seed, 1, 2**31 - 1)  # infomap's seeds start at 1
        num_trials = check_int("num_trials", self.num_trials, 1)
        adj = knn_adjacency(graph, min_sim=min_sim, symmetric=True, weighted=True)
        network = infomap.Network.from_scipy_sparse_matrix(adj)
        options = infomap.Options(
            two_level=True, flow_model="undirected", seed=seed, num_trials=num_trials
        )
        modules = infomap.run(network, options=options).modules()
        labels = np.full(graph.num_samples, -1, dtype=np.int64)
        ids = np.fromiter(modules.keys(), dtype=np.int64, count=len(modules))
        labels[ids] = np.fromiter(modules.values(), dtype=np.int64, count=len(modules))
        return relabel(labels)


infomap_clustering = as_function(Infomap, "infomap_clustering")
