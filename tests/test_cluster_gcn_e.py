"""GCN-E: candidate sets, subgraphs, connectivity choice, training, clustering, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster_reference import dense_weights, pairwise_f, planted
from robustface.cluster.base import cluster
from robustface.cluster.gcn_e import (
    GCNE,
    candidate_sets,
    edge_rows,
    gcn_e_inputs,
    load_gcn_e,
    predict_gcn_e,
    subgraph_batch,
    train_gcn_e,
)
from robustface.cluster.gcn_v import GCNV, link_peaks, predict_gcn_v, save_gcn, train_gcn_v
from robustface.cluster.graph import components, knn_adjacency, knn_edges
from robustface.cluster.knn import KnnGraph, knn_brute_force
from robustface.errors import DataFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_graph(seed: int, n: int = 50, k: int = 8, dim: int = 6) -> tuple[np.ndarray, KnnGraph]:
    """Random unit features, their kNN graph with ~15 % of entries missing (-1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    graph = knn_brute_force(x, k)
    drop = rng.random(graph.nbrs.shape) < 0.15
    drop[:, 0] = False
    return x, KnnGraph(np.where(drop, -1, graph.nbrs), np.where(drop, -np.inf, graph.sims))


def loop_candidates(graph: KnnGraph, conf: np.ndarray, i: int) -> list[int]:
    return [int(j) for j in graph.nbrs[i] if j >= 0 and conf[j] > conf[i]]


def loop_subgraph(x: np.ndarray, w: np.ndarray, i: int, cand: list[int]) -> tuple[np.ndarray, ...]:
    """learn-to-cluster's ``get_subgraph``: ``f_j - f_i`` and the row-normalised sub-adjacency
    of the (already row-normalised) global matrix."""
    a = w / w.sum(axis=1, keepdims=True)
    sub = a[np.ix_(cand, cand)]
    return x[cand] - x[i], sub / sub.sum(axis=1, keepdims=True)


def test_candidates_and_edge_rows_match_loops() -> None:
    _, graph = small_graph(0)
    conf = np.random.default_rng(1).integers(0, 10, graph.num_samples).astype(np.float32)
    rows = np.arange(graph.num_samples)
    cand, sims, count = candidate_sets(graph, conf, rows)
    for i in rows:
        want = loop_candidates(graph, conf, i)
        assert count[i] == len(want)
        assert cand[i, : len(want)].tolist() == want and (cand[i, len(want) :] == -1).all()
        pos = [list(graph.nbrs[i]).index(j) for j in want]
        np.testing.assert_array_equal(sims[i, : len(want)], graph.sims[i, pos])
    for ratio in (0.0, 0.5, 1.0):
        ignored = set(np.argsort(conf, kind="stable")[: int(len(conf) * ratio)].tolist())
        want = [i for i in rows if i not in ignored and len(loop_candidates(graph, conf, i)) >= 2]
        assert edge_rows(graph, conf, ratio).tolist() == want
    with pytest.raises(ValueError, match="ignore_ratio"):
        edge_rows(graph, conf, 1.5)


def test_subgraph_batch_matches_dense_construction() -> None:
    x, graph = small_graph(2)
    conf = np.random.default_rng(3).random(graph.num_samples).astype(np.float32)
    rows = edge_rows(graph, conf, 0.0)[:9]
    cand, _, count = candidate_sets(graph, conf, rows)
    cand = cand[:, : count.max()]
    weights = knn_adjacency(graph, min_sim=0.0, symmetric=True, self_loops=True)
    feats, adj, mask = subgraph_batch(rows, cand, x, weights)
    w = dense_weights(graph)
    for b, i in enumerate(rows):
        want_x, want_adj = loop_subgraph(x, w, i, loop_candidates(graph, conf, i))
        n = len(want_x)
        assert mask[b].sum() == n and mask[b, :n].all()
        np.testing.assert_allclose(feats[b, :n], want_x, atol=1e-6)
        np.testing.assert_allclose(adj[b, :n, :n], want_adj, atol=1e-6)
        assert (feats[b, n:] == 0).all() and (adj[b, n:] == 0).all() and (adj[b, :, n:] == 0).all()


def test_predict_matches_one_subgraph_at_a_time() -> None:
    x, graph = small_graph(4, n=60)
    conf = np.random.default_rng(5).random(graph.num_samples).astype(np.float32)
    torch.manual_seed(0)
    model = GCNE(6, hidden=8).eval()
    peak, sim = predict_gcn_e(
        model, x, conf, graph, ignore_ratio=0.3, batch_size=4, show_progress=False
    )
    ignored = set(np.argsort(conf, kind="stable")[: int(60 * 0.3)].tolist())
    w = dense_weights(graph)
    chosen_by_model = 0
    for i in range(60):
        cand = loop_candidates(graph, conf, i)
        if not cand:
            want = -1
        elif len(cand) == 1 or i in ignored:
            want = cand[0]
        else:
            fx, fa = loop_subgraph(x, w, i, cand)
            with torch.no_grad():
                logits = model(
                    torch.from_numpy(fx[None]).float(), torch.from_numpy(fa[None]).float()
                )
            want = cand[int(torch.log_softmax(logits[0], -1)[:, 1].argmax())]
            chosen_by_model += want != cand[0]
        assert peak[i] == want
        if want >= 0:
            assert sim[i] == graph.sims[i, list(graph.nbrs[i]).index(want)]
        else:
            assert np.isneginf(sim[i])
    assert chosen_by_model > 0  # the model, not the nearest-candidate rule, decided some links
    with pytest.raises(ValueError, match="6-d"):
        predict_gcn_e(GCNE(5, hidden=8), x, conf, graph, show_progress=False)


def test_first_training_loss_is_mean_per_subgraph_cross_entropy() -> None:
    x, graph = small_graph(6, n=60)
    conf = np.random.default_rng(7).random(60).astype(np.float32)
    labels = np.random.default_rng(8).integers(0, 3, 60)
    model = train_gcn_e(
        x,
        conf,
        labels,
        graph,
        epochs=1,
        hidden=8,
        batch_size=5,
        ignore_ratio=0.2,
        seed=11,
        show_progress=False,
    )
    rows = edge_rows(graph, conf, 0.2)
    assert len(model.loss_history) == -(-len(rows) // 5)
    torch.manual_seed(11)
    init = GCNE(6, hidden=8)
    first = np.random.default_rng(11).permutation(rows)[:5]
    w = dense_weights(graph)
    losses = []
    for i in first:
        cand = loop_candidates(graph, conf, i)
        fx, fa = loop_subgraph(x, w, i, cand)
        with torch.no_grad():
            logits = init(torch.from_numpy(fx[None]).float(), torch.from_numpy(fa[None]).float())[0]
        target = torch.from_numpy((labels[cand] == labels[i]).astype(np.int64))
        losses.append(float(torch.nn.functional.cross_entropy(logits, target)))
    assert model.loss_history[0] == pytest.approx(np.mean(losses), rel=1e-5)
    with pytest.raises(ValueError, match="no training subgraphs"):
        train_gcn_e(x, conf, labels, graph, ignore_ratio=1.0, show_progress=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """GCN-V and GCN-E trained on one split; another split of the same identities to cluster."""
    xtr, ytr, centres = planted(0)
    xte, yte, _ = planted(1, centres)
    ktr = knn_brute_force(xtr, 10)
    gcn_v = train_gcn_v(xtr, ytr, ktr, iters=400, hidden=32, show_progress=False)
    feats, conf, edge_knn = gcn_e_inputs(
        gcn_v, xtr, ktr, use_gcn_features=False, k=20, show_progress=False
    )
    gcn_e = train_gcn_e(feats, conf, ytr, edge_knn, epochs=8, hidden=32, show_progress=False)
    return {"gcn_v": gcn_v, "gcn_e": gcn_e, "xte": xte, "yte": yte, "kte": knn_brute_force(xte, 10)}


def test_training_reduces_loss(pipeline: dict) -> None:
    history = np.array(pipeline["gcn_e"].loss_history)
    per_epoch = len(history) // 8
    assert len(history) == 8 * per_epoch
    assert history[-per_epoch:].mean() < 0.75 * history[:3].mean()


def test_end_to_end_beats_connected_components(pipeline: dict) -> None:
    x, y, graph = pipeline["xte"], pipeline["yte"], pipeline["kte"]
    labels = cluster(
        "gcn_e",
        x,
        graph,
        gcn_v_model=pipeline["gcn_v"],
        gcn_e_model=pipeline["gcn_e"],
        tau=0.5,
        use_gcn_features=False,
        k_edge=20,
        show_progress=False,
    )
    f_gcn = pairwise_f(y, labels)
    feats, conf, edge_knn = gcn_e_inputs(
        pipeline["gcn_v"], x, graph, use_gcn_features=False, k=20, show_progress=False
    )
    chosen = predict_gcn_e(pipeline["gcn_e"], feats, conf, edge_knn, show_progress=False)
    want = link_peaks(*chosen, 0.5)
    np.testing.assert_array_equal(labels, want)
    thresholds = np.arange(0.3, 0.96, 0.05)
    for cc_graph in (graph, edge_knn):
        f_cc = [
            pairwise_f(y, components(len(x), *knn_edges(cc_graph, min_sim=t)[:2]))
            for t in thresholds
        ]
        assert f_gcn > max(f_cc)
    assert f_gcn > 0.55


@pytest.mark.filterwarnings("ignore:GCN-V was trained on a k=10")  # the k=20 graph
def test_inputs_on_input_features_reuse_the_input_knn(pipeline: dict) -> None:
    x, gcn_v = pipeline["xte"], pipeline["gcn_v"]
    graph = knn_brute_force(x, 20)
    feats, conf, edge_knn = gcn_e_inputs(
        gcn_v, x, graph, use_gcn_features=False, k=12, show_progress=False
    )
    searched = knn_brute_force(x, 12)  # what a new search would give
    np.testing.assert_array_equal(edge_knn.nbrs, searched.nbrs)
    np.testing.assert_allclose(edge_knn.sims, searched.sims, atol=1e-6)
    np.testing.assert_allclose(feats, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(conf, predict_gcn_v(gcn_v, x, graph, show_progress=False)[0])
    wider = gcn_e_inputs(gcn_v, x, graph, use_gcn_features=False, k=25, show_progress=False)[2]
    assert wider.k == 25  # more neighbours than the input graph has: searched


def test_save_load_round_trip_and_kind_check(pipeline: dict, tmp_path: Path) -> None:
    x, graph = small_graph(9, dim=32)
    conf = np.random.default_rng(10).random(len(x)).astype(np.float32)
    path = tmp_path / "gcn_e.pth"
    save_gcn(pipeline["gcn_e"], path, {"k": 20})
    loaded = load_gcn_e(path)
    assert loaded.config == pipeline["gcn_e"].config
    a = predict_gcn_e(pipeline["gcn_e"], x, conf, graph, ignore_ratio=0.0, show_progress=False)
    b = predict_gcn_e(loaded, x, conf, graph, ignore_ratio=0.0, show_progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    save_gcn(GCNV(32, hidden=8), tmp_path / "gcn_v.pth")
    with pytest.raises(DataFormatError, match="gcn_v model, not a gcn_e"):
        load_gcn_e(tmp_path / "gcn_v.pth")


def test_load_published_state_dict(tmp_path: Path) -> None:
    """learn-to-cluster GCN_E keys (conv1..4, classifier.0/1/2) with mmcv/DataParallel wrapping."""
    torch.manual_seed(0)
    reference = GCNE(6, hidden=8)
    state = {f"module.{k}": v.clone() for k, v in reference.state_dict().items()}
    torch.save({"meta": {"epoch": 40}, "state_dict": state}, tmp_path / "pub.pth")
    model = load_gcn_e(tmp_path / "pub.pth")
    want_config = {"kind": "gcn_e", "feature_dim": 6, "hidden": 8, "dropout": 0.0}
    assert model.config == {**want_config, "num_classes": 2}
    rng = np.random.default_rng(1)
    fx = rng.standard_normal((7, 6))
    fa = rng.random((7, 7))
    fa /= fa.sum(axis=1, keepdims=True)
    h = fx
    weights = {k[len("module.") :]: v.double().numpy() for k, v in state.items()}
    for layer in range(1, 5):
        cat = np.concatenate([h, fa @ h], axis=1)
        h = np.maximum(cat @ weights[f"conv{layer}.weight"] + weights[f"conv{layer}.bias"], 0)
    z = h @ weights["classifier.0.weight"].T + weights["classifier.0.bias"]
    z = np.where(z > 0, z, weights["classifier.1.weight"] * z)
    want = z @ weights["classifier.2.weight"].T + weights["classifier.2.bias"]
    with torch.no_grad():
        got = model(torch.from_numpy(fx[None]).float(), torch.from_numpy(fa[None]).float())[0]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    regressor = {k: v for k, v in state.items() if "classifier.2" not in k}
    regressor["classifier.2.weight"] = torch.zeros(1, 4)
    regressor["classifier.2.bias"] = torch.zeros(1)
    torch.save(regressor, tmp_path / "regressor.pth")
    with pytest.raises(ValueError, match="2-class"):
        load_gcn_e(tmp_path / "regressor.pth")
