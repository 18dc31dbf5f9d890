"""Classic clustering baselines: planted-cluster recovery, and each method against an independent
computation (hand-worked rank-order distances, sklearn DBSCAN / agglomerative, union-find)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import DBSCAN

from cluster_reference import pairwise_f
from robustface.cluster.base import cluster
from robustface.cluster.baselines import (
    KMeans,
    aro,
    aro_distances,
    cc,
    chinese_whispers,
    dbscan,
    hac,
    kmeans,
)
from robustface.cluster.graph import knn_adjacency, relabel
from robustface.cluster.knn import KnnGraph, knn_brute_force

NAMES = ("kmeans", "dbscan", "hac", "aro", "cc", "chinese_whispers", "infomap")


def planted(
    seed: int = 0, num_clusters: int = 12, dim: int = 32, outliers: int = 2, spread: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters of 10-40 points around random unit centres (von Mises-like), plus a few
    uniformly random outliers (labels ``num_clusters, num_clusters + 1, ...``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_clusters), rng.integers(10, 41, num_clusters))
    x = centres[labels] + spread / np.sqrt(dim) * rng.standard_normal((len(labels), dim))
    x = np.vstack([x, rng.standard_normal((outliers, dim))])
    labels = np.r_[labels, num_clusters + np.arange(outliers)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def graph_from_lists(lists: list[list[int]], sims: list[list[float]] | None = None) -> KnnGraph:
    nbrs = np.array(lists, dtype=np.int64)
    if sims is None:
        sim = np.where(nbrs >= 0, 1.0 - 0.01 * np.arange(nbrs.shape[1]), -np.inf)
    else:
        sim = np.array(sims, dtype=np.float64)
    return KnnGraph(nbrs, sim.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Planted clusters and the common contract
# ------------------------------------------------------------------------------------------------

PARAMS = {
    "kmeans": {"num_clusters": 14},
    "dbscan": {},
    "hac": {"num_clusters": 14},
    "aro": {},
    "cc": {},
    "chinese_whispers": {},
    "infomap": {"k": None},
}
MIN_F = {"kmeans": 0.9, "aro": 0.95}  # others must be exact


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, KnnGraph]:
    x, gt = planted()
    return x, gt, knn_brute_force(x, 20)


@pytest.mark.parametrize("name", NAMES)
def test_planted_clusters_recovered(name: str, data: tuple) -> None:
    x, gt, graph = data
    labels = cluster(name, x, graph, **PARAMS[name])
    assert labels.dtype == np.int64 and labels.shape == gt.shape
    valid = labels[labels >= 0]
    assert valid.min() == 0 and np.array_equal(np.unique(valid), np.arange(valid.max() + 1))
    assert pairwise_f(gt, labels) >= MIN_F.get(name, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_graph_and_features_must_match(name: str, data: tuple) -> None:
    x, _, graph = data
    with pytest.raises(ValueError, match=r"knn has \d+ samples but features has"):
        cluster(name, x[:-1], graph, **PARAMS[name])


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("kmeans", "hac")])
def test_graph_methods_need_a_graph_only(name: str, data: tuple) -> None:
    x, _, graph = data
    expected = cluster(name, x, graph, **PARAMS[name])
    np.testing.assert_array_equal(cluster(name, None, graph, **PARAMS[name]), expected)
    with pytest.raises(ValueError, match="needs a kNN graph"):
        cluster(name, x, None, **PARAMS[name])


def test_knn_ids_out_of_range() -> None:
    graph = graph_from_lists([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="outside"):
        cc(None, graph)


@pytest.mark.parametrize(
    ("name", "params", "error", "message"),
    [
        ("kmeans", {}, ValueError, "needs num_clusters"),
        ("kmeans", {"num_clusters": 0}, ValueError, "num_clusters must be >= 1"),
        ("kmeans", {"num_clusters": 10_000}, ValueError, "num_clusters must be >= 1 and <="),
        ("kmeans", {"num_clusters": 3.0}, TypeError, "num_clusters must be an integer"),
        ("kmeans", {"num_clusters": 3, "init": "kmeans++"}, ValueError, "init must be one of"),
        ("kmeans", {"num_clusters": 3, "seed": -1}, ValueError, "seed must be >= 0"),
        ("dbscan", {"eps": 2.5}, ValueError, r"eps must be in \[0.0, 2.0\]"),
        ("dbscan", {"min_samples": 0}, ValueError, "min_samples must be >= 1"),
        ("dbscan", {"min_samples": True}, TypeError, "min_samples must be an integer"),
        ("hac", {}, ValueError, "exactly one of distance_threshold and num_clusters"),
        ("hac", {"distance_threshold": 0.5, "num_clusters": 3}, ValueError, "exactly one"),
        ("hac", {"num_clusters": 3, "linkage": "ward"}, ValueError, "linkage must be one of"),
        ("hac", {"distance_threshold": -0.1}, ValueError, "distance_threshold must be in"),
        ("hac", {"num_clusters": 3, "missing_distance": 2.5}, ValueError, "missing_distance"),
        ("hac", {"num_clusters": 14, "max_pairs": 10}, ValueError, r"pairs, above max_pairs=10 "),
        ("aro", {"threshold": -1.0}, ValueError, "threshold must be in"),
        ("cc", {"min_sim": 1.5}, ValueError, r"min_sim must be in \[-1.0, 1.0\]"),
        ("cc", {"min_sim": "0.7"}, TypeError, "min_sim must be a number"),
        ("chinese_whispers", {"min_sim": 0.0}, ValueError, "min_sim must be > 0"),
        ("chinese_whispers", {"iterations": 0}, ValueError, "iterations must be >= 1"),
        ("chinese_whispers", {"num_blocks": 0}, ValueError, "num_blocks must be >= 1"),
        (
            "infomap",
            {"k": 50},
            ValueError,
            r"infomap's k=50 exceeds the kNN graph's k=20: lower it \(CLI: --set infomap\.k=20\)",
        ),
        ("infomap", {"k": None, "seed": 0}, ValueError, "seed must be >= 1"),
        ("infomap", {"k": None, "num_trials": 0}, ValueError, "num_trials must be >= 1"),
    ],
)
def test_bad_parameters(name: str, params: dict, error: type, message: str, data: tuple) -> None:
    x, _, graph = data
    with pytest.raises(error, match=message):
        cluster(name, x, graph, **params)


def test_feature_methods_need_features(data: tuple) -> None:
    _, _, graph = data
    with pytest.raises(ValueError, match="kmeans needs features"):
        cluster("kmeans", None, None, num_clusters=3)
    assert hac(None, graph, num_clusters=14).max() == 13  # works on the graph alone


# ------------------------------------------------------------------------------------------------
# Approximate rank-order
# ------------------------------------------------------------------------------------------------

# Six samples, lists of k=4 (self first; sample 3 has a missing entry).
ARO_LISTS = [
    [0, 1, 2, 3],
    [1, 2, 0, 4],
    [2, 1, 5, 0],
    [3, 4, 5, -1],
    [4, 3, 1, 5],
    [5, 4, 2, 3],
]
INF = np.inf
# Worked by hand: D(i, j) = (d(i, j) + d(j, i)) / min(r_i(j), r_j(i)), e.g.
# D(0, 2): r_0(2) = 2, r_2(0) = 3; L0[:2] = {0, 1} all in L2 -> 0; L2[:3] = {2, 1, 5}, 5 not in L0
#          -> 1; D = 1 / 2.
# D(1, 4): r_1(4) = 3, r_4(1) = 2; {1, 2, 0} minus L4 = {2, 0} -> 2; {4, 3} minus L1 = {3} -> 1;
#          D = 3 / 2.
# D(4, 5): r_4(5) = 3, r_5(4) = 1; {4, 3, 1} minus L5 = {1} -> 1; {5} minus L4 -> 0; D = 1 / 1.
# D(0, 3) = inf: 0 is not in L3.
ARO_EXPECTED = [
    [0, 0, 0.5, INF],
    [0, 0, 0, 1.5],
    [0, 0, 1, 0.5],
    [0, 0, 0.5, INF],
    [0, 0, 1.5, 1],
    [0, 1, 1, 0.5],
]


def test_aro_distances_by_hand() -> None:
    dist = aro_distances(graph_from_lists(ARO_LISTS))
    assert dist.dtype == np.float32
    np.testing.assert_allclose(dist, np.array(ARO_EXPECTED), rtol=0, atol=1e-6)


def test_aro_links_pairs_under_threshold() -> None:
    graph = graph_from_lists(ARO_LISTS)
    np.testing.assert_array_equal(aro(None, graph, threshold=0.5), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(aro(None, graph, threshold=1.0), [0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(aro(None, graph, threshold=0.0), [0, 0, 0, 1, 1, 2])


def aro_reference(nbrs: np.ndarray) -> np.ndarray:
    """The rank-order distance with Python sets, one pair at a time."""
    n, k = nbrs.shape
    out = np.full((n, k), np.inf)
    for i in range(n):
        for p, j in enumerate(nbrs[i]):
            if j < 0 or i not in nbrs[j]:
                continue
            q = list(nbrs[j]).index(i)
            mine, theirs = set(nbrs[i][nbrs[i] >= 0]), set(nbrs[j][nbrs[j] >= 0])
            d_ij = len({x for x in nbrs[i][:p] if x >= 0} - theirs)
            d_ji = len({x for x in nbrs[j][:q] if x >= 0} - mine)
            out[i, p] = (d_ij + d_ji) / max(min(p, q), 1)
    return out


def test_aro_distances_match_set_reference() -> None:
    x, _ = planted(seed=3, num_clusters=6, dim=8, spread=1.0)
    graph = knn_brute_force(x, 12).threshold(0.75)  # some lists end in missing entries
    assert (graph.nbrs < 0).any()
    dist = aro_distances(graph)
    np.testing.assert_allclose(dist, aro_reference(graph.nbrs), rtol=1e-6)
    # symmetric: D(i, j) == D(j, i) wherever both are finite
    i, p = np.nonzero(np.isfinite(dist))
    j = graph.nbrs[i, p]
    back = np.array([list(graph.nbrs[a]).index(b) for a, b in zip(j, i, strict=True)])
    np.testing.assert_allclose(dist[j, back], dist[i, p])


def test_aro_rejects_repeated_neighbours() -> None:
    with pytest.raises(ValueError, match="twice"):
        aro_distances(graph_from_lists([[0, 1, 1], [1, 0, -1]]))


# ------------------------------------------------------------------------------------------------
# kNN-DBSCAN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "min_samples"), [(0.15, 5), (0.2, 8), (0.3, 8), (0.25, 1)])
def test_dbscan_with_all_neighbours_equals_sklearn(eps: float, min_samples: int) -> None:
    x, _ = planted(seed=1, num_clusters=8, dim=16, outliers=6, spread=0.6)
    dense = np.clip(1.0 - x.astype(np.float64) @ x.T.astype(np.float64), 0.0, None)
    # Move eps into the widest gap between distances near it: a distance on the boundary could
    # fall on either side in float32.
    near = np.unique(dense[np.abs(dense - eps) < 0.005])
    widest = np.argmax(np.diff(near))
    eps = float(near[widest : widest + 2].mean())
    assert np.abs(dense - eps).min() > 1e-5
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(dense).labels_
    labels = dbscan(x, knn_brute_force(x, len(x)), eps=eps, min_samples=min_samples)
    np.testing.assert_array_equal(labels, relabel(expected))
    if min_samples > 1:  # the case exercises several clusters, border points and noise
        core = (dense <= eps).sum(1) >= min_samples
        assert labels.max() >= 3 and (labels[~core] >= 0).sum() > 2 and (labels < 0).sum() > 5


def test_dbscan_uses_kNN_edges_in_both_directions() -> None:
    # Lists of two (self and one other): 0 lists 1 but 1 does not list 0, still one cluster
    graph = graph_from_lists([[0, 1], [1, 2], [2, 1]], [[1, 0.9], [1, 0.9], [1, 0.9]])
    np.testing.assert_array_equal(dbscan(None, graph, eps=0.2, min_samples=2), [0, 0, 0])
    np.testing.assert_array_equal(dbscan(None, graph, eps=0.05, min_samples=2), [-1, -1, -1])


# ------------------------------------------------------------------------------------------------
# Agglomerative
# ------------------------------------------------------------------------------------------------


def knn_dissimilarity(graph: KnnGraph, missing: float) -> np.ndarray:
    """The dense dissimilarity hac works on: ``1 - sim`` on kNN pairs, ``missing`` elsewhere."""
    n = graph.num_samples
    dense = np.full((n, n), missing)
    for i in range(n):
        for j, sim in zip(graph.nbrs[i], graph.sims[i], strict=True):
            if j >= 0:
                dense[i, j] = dense[j, i] = 1.0 - float(sim)
    np.fill_diagonal(dense, 0.0)
    return dense


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
@pytest.mark.parametrize("missing", [1.0, 2.0])
def test_hac_equals_scipy_linkage_on_the_knn_dissimilarity(linkage: str, missing: float) -> None:
    """Textbook HAC (scipy) on ``1 - cos`` over the kNN pairs and ``missing`` elsewhere: below
    ``missing`` every merge joins clusters linked by an edge, so the two trees agree there."""
    x, _ = planted(seed=2, num_clusters=6, dim=16, spread=1.0)
    graph = knn_brute_force(x, 8)
    tree = scipy_linkage(squareform(knn_dissimilarity(graph, missing), checks=False), linkage)
    heights = tree[:, 2]
    for threshold in (0.2, 0.4, 0.7, 0.95):
        assert np.abs(heights - threshold).min() > 1e-6  # no merge at the cut
        expected = relabel(fcluster(tree, threshold, "distance"))
        labels = hac(x, graph, distance_threshold=threshold, linkage=linkage,
                     missing_distance=missing)  # fmt: skip
        np.testing.assert_array_equal(labels, expected)
    below = int((heights < min(missing, 0.95)).sum())
    expected = relabel(fcluster(tree, len(x) - below, "maxclust"))
    labels = hac(x, graph, num_clusters=len(x) - below, linkage=linkage, missing_distance=missing)
    np.testing.assert_array_equal(labels, expected)


def test_hac_with_all_neighbours_is_textbook_average_linkage() -> None:
    x, _ = planted(seed=3, num_clusters=5, dim=16, spread=1.0)
    feats = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    dense = np.clip(1.0 - feats @ feats.T, 0.0, None)
    tree = scipy_linkage(squareform(dense, checks=False), "average")
    graph = knn_brute_force(x, len(x))
    for num in (3, 8, 20):
        expected = relabel(fcluster(tree, num, "maxclust"))
        np.testing.assert_array_equal(hac(x, graph, num_clusters=num), expected)


def test_hac_at_the_true_count_does_not_chain_into_one_giant_cluster() -> None:
    """Issue 14: with outliers, sklearn's connectivity-restricted "average" chained like single
    linkage and, cut at the true count, gave one giant cluster plus the outliers as singletons
    (pairwise F 0.27 here). Planted clusters with 5 outliers, k=10, the true count: recovered."""
    x, gt = planted(seed=5, num_clusters=12, dim=32, outliers=5, spread=1.0)
    labels = hac(x, knn_brute_force(x, 10), num_clusters=int(gt.max()) + 1)
    assert np.bincount(labels).max() < 2 * np.bincount(gt).max()
    assert pairwise_f(gt, labels) > 0.9


def test_hac_never_merges_across_components() -> None:
    x, gt = planted(seed=4, num_clusters=5, dim=32, outliers=0)
    graph = knn_brute_force(x, 10).threshold(0.7)  # one component per planted cluster
    np.testing.assert_array_equal(hac(x, graph, distance_threshold=2.0), relabel(gt))
    np.testing.assert_array_equal(hac(x, graph, num_clusters=5), relabel(gt))
    with pytest.raises(ValueError, match="below the 5 connected components"):
        hac(x, graph, num_clusters=4)


# ------------------------------------------------------------------------------------------------
# Connected components, Chinese whispers, Infomap
# ------------------------------------------------------------------------------------------------


def union_find(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        parent[root(a)] = root(b)
    return relabel(np.array([root(a) for a in range(n)]))


@pytest.mark.parametrize("min_sim", [0.2, 0.5, 0.8])
def test_cc_equals_union_find(min_sim: float) -> None:
    x, _ = planted(seed=5, num_clusters=10, dim=16, spread=1.5)
    graph = knn_brute_force(x, 6)
    pairs = [
        (i, int(j))
        for i in range(graph.num_samples)
        for j, s in zip(graph.nbrs[i], graph.sims[i], strict=True)
        if s >= min_sim
    ]
    np.testing.assert_array_equal(cc(x, graph, min_sim=min_sim), union_find(len(x), pairs))


def cliques(sizes: list[int], strong: float, bridges: list[tuple[int, int, float]]) -> KnnGraph:
    """Cliques with edge similarity ``strong`` (ids consecutive), plus ``(i, j, sim)`` bridges
    listed by ``i``."""
    n = sum(sizes)
    lists: list[list[tuple[int, float]]] = [[(i, 1.0)] for i in range(n)]
    start = 0
    for size in sizes:
        members = range(start, start + size)
        for i in members:
            lists[i] += [(j, strong) for j in members if j != i]
        start += size
    for i, j, s in bridges:
        lists[i].append((j, s))
    k = max(map(len, lists))
    nbrs = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    for i, row in enumerate(lists):
        nbrs[i, : len(row)] = [j for j, _ in row]
        sims[i, : len(row)] = [s for _, s in row]
    return KnnGraph(nbrs, sims)


def test_chinese_whispers_splits_cliques_at_a_weak_bridge() -> None:
    graph = cliques([6, 6], 0.9, [(5, 6, 0.65)])  # the bridge is above min_sim
    for seed in range(5):
        np.testing.assert_array_equal(chinese_whispers(None, graph, seed=seed), [0] * 6 + [1] * 6)


def ring(n: int = 60) -> KnnGraph:
    """Each sample linked to the two on either side, weights 0.9 and 0.8: no preferred cut."""
    nbrs = (np.arange(n)[:, None] + np.array([0, 1, -1, 2, -2])) % n
    sims = np.tile(np.array([1.0, 0.9, 0.9, 0.8, 0.8], dtype=np.float32), (n, 1))
    return KnnGraph(nbrs.astype(np.int64), sims)


def test_chinese_whispers_deterministic_per_seed_and_a_fixed_point() -> None:
    graph = ring()
    runs = [chinese_whispers(None, graph, seed=s, num_blocks=7) for s in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # the seed matters on this ambiguous graph
    # Converged (iterations to spare): every sample holds a heaviest class of its neighbours.
    for graph, min_sim in ((ring(), 0.6), (knn_brute_force(planted(6, 10, 12, 2, 1.5)[0], 8), 0.3)):
        labels = chinese_whispers(None, graph, min_sim=min_sim, seed=3, iterations=100)
        adj = knn_adjacency(graph, min_sim=min_sim, symmetric=True).toarray().astype(np.float64)
        weight = adj @ (labels[:, None] == np.arange(labels.max() + 1)[None, :])
        has = adj.sum(1) > 0
        np.testing.assert_allclose(weight[has, labels[has]], weight[has].max(1), rtol=1e-9)


def test_infomap_separates_cliques() -> None:
    graph = cliques([5, 7, 6], 0.9, [(4, 5, 0.6), (11, 12, 0.6), (0, 17, 0.6)])
    for seed in (1, 7):
        labels = cluster("infomap", None, graph, k=None, seed=seed)
        np.testing.assert_array_equal(labels, [0] * 5 + [1] * 7 + [2] * 6)
    # below min_sim the bridges vanish; an edgeless sample is its own module
    graph = cliques([4, 1], 0.9, [(0, 4, 0.5)])
    np.testing.assert_array_equal(cluster("infomap", None, graph, k=None), [0] * 4 + [1])


def test_kmeans_seeded_and_recovers_clusters() -> None:
    x, gt = planted(seed=7, num_clusters=8, outliers=0)
    km = KMeans(num_clusters=8)
    np.testing.assert_array_equal(km.fit(x, None).labels_, relabel(gt))
    first, again = (kmeans(x, None, num_clusters=8, seed=5, init="random") for _ in range(2))
    np.testing.assert_array_equal(first, again)


def test_kmeans_shows_our_progress_not_the_faiss_log(capfd: pytest.CaptureFixture[str]) -> None:
    x, _ = planted(seed=7, num_clusters=8, outliers=0)
    cluster("kmeans", x, None, num_clusters=8, show_progress=True)
    out, err = capfd.readouterr()
    assert "objective=" not in out + err and "Clustering" not in out + err  # faiss's log
    assert "kmeans (8 clusters)" in err and "3/3" in err
    cluster("kmeans", x, None, num_clusters=8, show_progress=False)
    assert capfd.readouterr() == ("", "")
