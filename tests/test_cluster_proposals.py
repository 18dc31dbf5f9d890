"""Cluster proposals: super vertices, iterative merges, the union of settings, IoU/IoP targets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from robustface.cluster.knn import KnnGraph, build_knn, normalize_rows
from robustface.cluster.proposals import (
    PRESETS,
    IterSetting,
    Proposals,
    ProposalSetting,
    generate_proposals,
    iterative_proposals,
    proposal_targets,
    resolve_settings,
    super_vertices,
)
from robustface.errors import ParameterTypeError


def graph_from_edges(num_nodes: int, edges: dict[tuple[int, int], float]) -> KnnGraph:
    """A kNN graph listing every edge from both ends, best first, self first (sim 1)."""
    lists: list[list[tuple[float, int]]] = [[(1.0, i)] for i in range(num_nodes)]
    for (a, b), s in edges.items():
        lists[a].append((s, b))
        lists[b].append((s, a))
    k = max(len(x) for x in lists)
    nbrs = np.full((num_nodes, k), -1, dtype=np.int64)
    sims = np.full((num_nodes, k), -np.inf, dtype=np.float32)
    for i, row in enumerate(lists):
        row = [row[0], *sorted(row[1:], reverse=True)]
        nbrs[i, : len(row)] = [j for _, j in row]
        sims[i, : len(row)] = [s for s, _ in row]
    return KnnGraph(nbrs, sims)


def groups(labels: np.ndarray) -> set[frozenset[int]]:
    """The partition a label vector describes (label -1 left out)."""
    out: dict[int, set[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        if lab >= 0:
            out.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in out.values()}


def proposal_sets(proposals: Proposals) -> list[frozenset[int]]:
    return [frozenset(proposals.members_of(i).tolist()) for i in range(len(proposals))]


HAND_EDGES = {
    # A: a 4-chain, cut at 0.875 (its 0.86 link) into two pairs
    (0, 1): 0.90,
    (1, 2): 0.86,
    (2, 3): 0.95,
    # B: exactly max_size, kept at once; its 0.75 is the smallest kept similarity
    (4, 5): 0.75,
    # 6 and 7: only an edge below th, so in no super vertex
    (6, 7): 0.65,
    # C: a strong pair and two loose nodes that become singletons at 0.875
    (8, 9): 0.99,
    (9, 10): 0.80,
    (10, 11): 0.80,
    (11, 8): 0.80,
    # D: needs three raises (0.875, 0.9375, 0.96875)
    (12, 13): 0.97,
    (13, 14): 0.96,
    (14, 15): 0.90,
}


def test_super_vertices_hand_built_graph() -> None:
    # th=0.7, step=0.5, max_size=2. Start at the smallest kept similarity 0.75 (not th), raise
    # t -> t + (1 - t) * 0.5: 0.875 splits A into {0,1},{2,3} and C into {8,9},{10},{11};
    # D stays 4 at 0.875, becomes {12,13,14},{15} at 0.9375 and {12,13},{14} at 0.96875.
    labels = super_vertices(graph_from_edges(16, HAND_EDGES), 0.7, 2, step=0.5)
    expected = [{0, 1}, {2, 3}, {4, 5}, {8, 9}, {10}, {11}, {12, 13}, {14}, {15}]
    assert groups(labels) == {frozenset(g) for g in expected}
    assert labels[6] == labels[7] == -1
    assert sorted(set(labels.tolist()) - {-1}) == list(range(len(expected)))


def test_super_vertices_max_iter_keeps_oversize_components() -> None:
    labels = super_vertices(graph_from_edges(16, HAND_EDGES), 0.7, 2, step=0.5, max_iter=0)
    expected = [{0, 1, 2, 3}, {4, 5}, {8, 9, 10, 11}, {12, 13, 14, 15}]
    assert groups(labels) == {frozenset(g) for g in expected}


def brute_super_vertices(graph: KnnGraph, th: float, max_size: int, step: float) -> set:
    """Recursive reference: split each oversize component at the next threshold."""
    edges: dict[tuple[int, int], float] = {}
    for i in range(graph.num_samples):
        for j, s in zip(graph.nbrs[i].tolist(), graph.sims[i].tolist(), strict=True):
            if j >= 0 and j != i and s >= th:
                edges.setdefault((min(i, j), max(i, j)), s)
    if not edges:
        return set()

    def comps(nodes: set[int], t: float) -> list[set[int]]:
        parent = {v: v for v in nodes}

        def find(v: int) -> int:
            while parent[v] != v:
                v = parent[v]
            return v

        for (a, b), s in edges.items():
            if a in nodes and b in nodes and s >= t:
                parent[find(a)] = find(b)
        out: dict[int, set[int]] = {}
        for v in nodes:
            out.setdefault(find(v), set()).add(v)
        return list(out.values())

    result: set[frozenset[int]] = set()

    def split(nodes: set[int], t: float) -> None:
        for comp in comps(nodes, t):
            if len(comp) <= max_size:
                result.add(frozenset(comp))
            else:
                split(comp, t + (1 - t) * step)

    start = min(edges.values())
    split({v for e in edges for v in e}, start)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_super_vertices_match_recursive_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 8))
    feats = centers[rng.integers(0, 6, 120)] + 0.6 * rng.normal(size=(120, 8))
    graph = build_knn(normalize_rows(feats.astype(np.float32)), 8, show_progress=False)
    labels = super_vertices(graph, 0.5, 7, step=0.2)
    assert groups(labels) == brute_super_vertices(graph, 0.5, 7, 0.2)
    assert all(len(g) <= 7 for g in groups(labels))


def test_super_vertices_bad_input() -> None:
    graph = graph_from_edges(3, {(0, 1): 0.9})
    with pytest.raises(ValueError, match="th"):
        super_vertices(graph, 1.5, 3)
    with pytest.raises(ValueError, match="max_size"):
        super_vertices(graph, 0.5, 0)
    with pytest.raises(ValueError, match=r"step must be in \(0, 1\), got 1\.0"):
        super_vertices(graph, 0.5, 3, step=1.0)
    with pytest.raises(ValueError, match=r"th \(cosine similarity\) must be finite, got nan"):
        super_vertices(graph, float("nan"), 3)
    with pytest.raises(ParameterTypeError, match=r"max_size must be an integer, got float 3\.0"):
        super_vertices(graph, 0.5, 3.0)
    assert (super_vertices(graph, 0.95, 3) == -1).all()  # no edge that high


def test_proposals_container() -> None:
    props = Proposals.from_labels(np.array([2, 0, 2, -1, 0, 5, 2]), k=7)
    assert proposal_sets(props) == [{1, 4}, {0, 2, 6}, {5}]
    assert props.k.tolist() == [7, 7, 7]
    assert props.sizes.tolist() == [2, 3, 1]
    assert props.proposal_ids().tolist() == [0, 0, 1, 1, 1, 2]
    assert proposal_sets(props.select(np.array([2, 0]))) == [{5}, {1, 4}]
    assert proposal_sets(props.filter_size(2, 2)) == [{1, 4}]
    both = Proposals.concat([props, props.select(np.array([1]))])
    assert proposal_sets(both.unique()) == proposal_sets(props)
    assert len(Proposals.from_labels(np.array([0, 0, 1]), k=3, min_size=2)) == 1
    with pytest.raises(ValueError, match="offsets"):
        Proposals(np.array([0, 2, 2]), np.array([0, 1]), np.array([3, 3]))
    with pytest.raises(ValueError, match="members"):
        Proposals(np.array([0, 3]), np.array([0, 1]), np.array([3]))
    with pytest.raises(ValueError, match="increasing within"):
        Proposals(np.array([0, 2]), np.array([1, 0]), np.array([3]))
    with pytest.raises(ValueError, match="k must"):
        Proposals(np.array([0, 2]), np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="only 5 samples"):
        props.check(5)


def test_proposal_targets_match_set_computation() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, 80)
    parts = [np.sort(rng.choice(80, rng.integers(1, 20), replace=False)) for _ in range(40)]
    parts.append(np.flatnonzero(labels == 2))  # a perfect proposal: IoU = IoP = 1
    parts.append(np.sort([np.flatnonzero(labels == 1)[0], np.flatnonzero(labels == 4)[0]]))
    sizes = np.array([len(p) for p in parts])
    props = Proposals(np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(parts), sizes * 0 + 5)
    iou, iop = proposal_targets(props, labels)
    for i, part in enumerate(parts):
        counts = Counter(labels[part].tolist())
        best = max(counts.values())
        majority = min(lab for lab, c in counts.items() if c == best)  # ties: smallest label
        pred, gt = set(part.tolist()), set(np.flatnonzero(labels == majority).tolist())
        assert iou[i] == pytest.approx(len(pred & gt) / len(pred | gt))
        assert iop[i] == pytest.approx(len(pred & gt) / len(pred))
    assert iou[-2] == iop[-2] == 1.0
    # the tie {label 1, label 4} takes label 1: IoU = 1 / (|G_1| + 1)
    assert iou[-1] == pytest.approx(1 / ((labels == 1).sum() + 1))
    with pytest.raises(ValueError, match="-1"):
        proposal_targets(props, np.where(labels == 0, -1, labels))
    with pytest.raises(ValueError, match="only 10 samples"):
        proposal_targets(props, labels[:10])


def planted(num_ids: int, per_id: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_ids, dim))
    labels = np.repeat(np.arange(num_ids), per_id)
    feats = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    return normalize_rows(feats.astype(np.float32)), labels


def test_iterative_proposals_match_manual_pipeline() -> None:
    feats, _ = planted(8, 12, 16, 0.5, seed=4)
    graph = build_knn(feats, 10, show_progress=False)
    base = super_vertices(graph, 0.6, 4)  # small super vertices: identities split up
    setting = IterSetting(k=3, sv_max_size=6, th=0.4, min_size=3, max_size=60)
    got = iterative_proposals(feats, base, 10, setting)

    # manual: one node per super vertex (plus one per sample left alone), mean features,
    # exact inner-product kNN, super vertices of that graph, expanded to samples
    units = [set(np.flatnonzero(base == lab).tolist()) for lab in range(base.max() + 1)]
    units += [{i} for i in np.flatnonzero(base < 0).tolist()]
    means = np.stack([feats[sorted(u)].mean(axis=0) for u in units])
    ip = means @ means.T
    order = np.argsort(-ip, axis=1, kind="stable")[:, : setting.k]
    unit_graph = KnnGraph(order, np.take_along_axis(ip, order, 1).astype(np.float32))
    merged = super_vertices(unit_graph, 0.4, 6)
    expected = []
    for group in groups(merged):
        if len(group) >= 2:
            samples = set().union(*(units[u] for u in group))
            if 3 <= len(samples) <= 60:
                expected.append(frozenset(samples))
    assert sorted(map(sorted, proposal_sets(got))) == sorted(map(sorted, expected))
    assert (got.k == 10).all()
    # every merged proposal is a union of at least two whole base super vertices
    for members in proposal_sets(got):
        touched = {int(base[i]) for i in members}
        assert -1 in touched or sum(len(units[u]) for u in touched) == len(members)
        assert len(touched) >= 2 or -1 in touched


def test_iterative_proposals_reassemble_split_identities() -> None:
    feats, labels = planted(6, 15, 32, 0.3, seed=5)
    graph = build_knn(feats, 15, show_progress=False)
    base = super_vertices(graph, 0.5, 5)  # every identity falls into >= 3 pieces
    assert all(len(g) <= 5 for g in groups(base))
    got = iterative_proposals(feats, base, 15, IterSetting(k=4, sv_max_size=16, th=0.5))
    identities = {frozenset(np.flatnonzero(labels == c).tolist()) for c in range(6)}
    assert set(proposal_sets(got)) == identities


def test_generate_proposals_unions_settings() -> None:
    feats, _ = planted(5, 10, 16, 0.6, seed=6)
    graph = build_knn(feats, 12, show_progress=False)
    it, it3 = IterSetting(k=2, sv_max_size=8), IterSetting(k=3, sv_max_size=5, th=0.6)
    settings = [
        ProposalSetting(k=6, th=0.6, max_size=8),
        ProposalSetting(k=12, th=0.5, max_size=4, iterative=(it, it3)),
        ProposalSetting(k=12, th=0.7, keep=False, iterative=[{"k": 3, "sv_max_size": 5}]),
    ]
    got = generate_proposals(graph, settings, feats, show_progress=False)
    parts = [
        Proposals.from_labels(super_vertices(graph.truncate(6), 0.6, 8), 6, min_size=3),
        Proposals.from_labels(super_vertices(graph, 0.5, 4), 12, min_size=3),
        # one kNN of the means with k=3 serves both settings: same as separate searches
        iterative_proposals(feats, super_vertices(graph, 0.5, 4), 12, it),
        iterative_proposals(feats, super_vertices(graph, 0.5, 4), 12, [it3]),
        iterative_proposals(
            feats, super_vertices(graph, 0.7, 300), 12, IterSetting(k=3, sv_max_size=5)
        ),
    ]
    assert [len(p) for p in parts] == [5, 3, 5, 5, 1]  # every kind of part is exercised
    assert proposal_sets(got) == [s for p in parts for s in proposal_sets(p)]
    assert got.k.tolist() == [k for p in parts for k in p.k.tolist()]
    assert got.sizes.min() >= 3


def test_presets_and_setting_errors() -> None:
    assert len(PRESETS["train_8"]) == 8 and len(PRESETS["test_2"]) == 2
    # test_20: 2 kept basic settings + 3 x 6 iterative ones
    test_20 = resolve_settings("test_20")
    assert sum(s.keep for s in test_20) + sum(len(s.iterative) for s in test_20) == 20
    assert resolve_settings([{"k": 30, "th": 0.6}]) == (ProposalSetting(k=30, th=0.6),)
    with pytest.raises(ValueError, match="unknown proposal preset"):
        resolve_settings("test_3")
    with pytest.raises(ValueError, match="empty"):
        resolve_settings([])
    with pytest.raises(ValueError, match="sv_min_size"):
        IterSetting(k=2, sv_max_size=4, sv_min_size=1)
    with pytest.raises(ValueError, match="keep=False"):
        ProposalSetting(keep=False)
    feats, _ = planted(3, 5, 8, 0.5, seed=7)
    graph = build_knn(feats, 5, show_progress=False)
    with pytest.raises(ValueError) as info:  # which settings, and how to get the neighbours
        generate_proposals(graph, "test_2", show_progress=False)
    assert str(info.value) == (
        "the proposal settings 'test_2' need k=80 neighbours, but the kNN graph holds only k=5: "
        "build it with k >= 80 (CLI: --k 80)"
    )
    with pytest.raises(ValueError, match="need features"):
        generate_proposals(
            graph, [ProposalSetting(k=5, iterative=(IterSetting(2, 4),))], show_progress=False
        )
