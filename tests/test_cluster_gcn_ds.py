"""GCN-D/S: proposal tensors, the network against numpy, de-overlap, training, clustering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster_reference import pairwise_f
from robustface.cluster.base import CLUSTERERS, cluster
from robustface.cluster.gcn_ds import (
    DSGCN,
    DSGraphConv,
    deoverlap,
    gcn_d_cluster,
    gcn_ds_cluster,
    predict_gcn_d,
    predict_gcn_s,
    proposal_batch,
    train_gcn_d,
    train_gcn_s,
)
from robustface.cluster.gcn_v import read_gcn_checkpoint
from robustface.cluster.knn import KnnGraph, build_knn, normalize_rows
from robustface.cluster.proposals import Proposals, ProposalSetting, generate_proposals
from robustface.cluster.proposals import proposal_targets as targets
from robustface.errors import DataFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_proposals(parts: list[list[int]], k: int | list[int]) -> Proposals:
    sizes = [len(p) for p in parts]
    ks = [k] * len(parts) if isinstance(k, int) else k
    return Proposals(np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(parts), np.array(ks))


def random_graph(n: int = 30, dim: int = 6, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = normalize_rows(rng.normal(size=(n, dim)).astype(np.float32))
    return feats, build_knn(feats, k, show_progress=False)


def test_proposal_batch_matches_loops() -> None:
    feats, graph = random_graph()
    props = make_proposals(
        [[0, 3, 5, 9, 12, 20], [1, 2], [4, 6, 7, 8, 10, 11, 13, 14, 15]], [6, 3, 4]
    )
    x, adj, mask = proposal_batch(feats, graph, props, np.array([2, 0, 1]))
    assert x.shape == (3, 9, 6) and adj.shape == (3, 9, 9)
    for b, p in enumerate([2, 0, 1]):
        members = props.members_of(p).tolist()
        k = int(props.k[p])
        n = len(members)
        expected = np.eye(n)
        for i, u in enumerate(members):
            for v, s in zip(graph.nbrs[u, :k].tolist(), graph.sims[u, :k].tolist(), strict=True):
                if v != u and v in members:
                    j = members.index(v)
                    expected[i, j] = expected[j, i] = s
        np.testing.assert_allclose(adj[b, :n, :n].numpy(), expected, atol=1e-6)
        assert (adj[b, n:].numpy() == 0).all() and (adj[b, :, n:].numpy() == 0).all()
        np.testing.assert_array_equal(x[b, :n].numpy(), feats[members])
        assert (x[b, n:].numpy() == 0).all()
        assert mask[b].tolist() == [True] * n + [False] * (9 - n)
    x, _, _ = proposal_batch(feats, graph, props, np.array([0, 1]), seeds=np.array([2, 1]))
    assert x.shape[-1] == 7
    assert x[0, :, 6].tolist() == [0, 0, 1, 0, 0, 0] and x[1, :, 6].tolist()[:2] == [0, 1]


def test_graph_conv_layer_matches_numpy() -> None:
    torch.manual_seed(0)
    feats, graph = random_graph()
    props = make_proposals([[0, 3, 5, 9, 12, 20], [1, 2, 4]], 6)
    x, adj, mask = proposal_batch(feats, graph, props, np.array([0, 1]))
    layer = DSGraphConv(6, 5)
    out = torch.relu(layer(x, adj)).detach().numpy()
    w = layer.weight.detach().numpy().astype(np.float64)
    for b in range(2):
        n = int(mask[b].sum())
        a = adj[b, :n, :n].numpy().astype(np.float64)
        h = np.maximum((a / a.sum(axis=1, keepdims=True)) @ x[b, :n].numpy() @ w, 0)
        np.testing.assert_allclose(out[b, :n], h, rtol=1e-5, atol=1e-6)
        assert (out[b, n:] == 0).all()


def test_detector_forward_matches_numpy_and_ignores_padding() -> None:
    torch.manual_seed(1)
    feats, graph = random_graph()
    props = make_proposals([[0, 3, 5, 9, 12, 20, 22, 25], [1, 2, 4]], 6)
    model = DSGCN(6, (8, 4), "det").eval()
    x, adj, mask = proposal_batch(feats, graph, props, np.array([0, 1]))
    with torch.no_grad():
        out = model(x, adj, mask).numpy()
        alone = model(*proposal_batch(feats, graph, props, np.array([1]))).numpy()
    params = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    for b in range(2):
        n = int(mask[b].sum())
        a = adj[b, :n, :n].numpy().astype(np.float64)
        a /= a.sum(axis=1, keepdims=True)
        h = x[b, :n].numpy().astype(np.float64)
        for i in range(2):
            h = np.maximum(a @ h @ params[f"layers.{i}.weight"], 0)
        expected = h.max(axis=0) @ params["head.weight"].T + params["head.bias"]
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone[0], out[1], rtol=1e-5, atol=1e-6)


def test_segmenter_outputs_node_log_probabilities() -> None:
    feats, graph = random_graph()
    props = make_proposals([[0, 3, 5, 9], [1, 2, 4]], 6)
    model = DSGCN(6, (8,), "seg").eval()
    x, adj, mask = proposal_batch(feats, graph, props, np.array([0, 1]), seeds=np.array([0, 0]))
    with torch.no_grad():
        logp = model(x, adj, mask)
    assert logp.shape == (2, 4, 2)
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="stage"):
        DSGCN(6, (8,), "cls")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_dims"):
        DSGCN(6, ())
    with pytest.raises(ValueError, match="dropout"):
        DSGCN(6, (8,), dropout=1.0)


def test_dropout_drops_whole_nodes() -> None:
    torch.manual_seed(2)
    feats, graph = random_graph(n=60, k=8)
    props = make_proposals([list(range(0, 60, 2))], 8)
    model = DSGCN(6, (16,), "seg", dropout=0.5).train()
    x, adj, mask = proposal_batch(feats, graph, props, np.array([0]), seeds=np.array([0]))
    logp = model(x, adj, mask)[0].detach()
    # a dropped node reaches the head as zeros: its output is log_softmax(bias) exactly
    dropped = torch.isclose(logp, torch.log_softmax(model.head.bias.detach(), 0)).all(dim=1)
    assert 5 <= int(dropped.sum()) <= 25
    model.eval()
    with torch.no_grad():
        kept = model(x, adj, mask)[0]
    assert not torch.isclose(kept, torch.log_softmax(model.head.bias, 0)).all(dim=1).any()


def test_deoverlap_hand_example() -> None:
    props = make_proposals([[0, 1, 2], [2, 3], [3, 4, 5], [6]], 5)
    scores = np.array([0.5, 0.9, 0.7, 0.1])
    # order P1 {2,3}, P2 {3,4,5} -> {4,5}, P0 {0,1,2} -> {0,1}, P3 {6}; 7 is in none: singleton
    labels = deoverlap(props, scores, 8)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    # min_score 0.6 drops P0 and P3: 0, 1, 6 and 7 become singletons
    labels = deoverlap(props, scores, 8, min_score=0.6)
    assert labels.tolist() == [0, 1, 2, 2, 3, 3, 4, 5]
    # P1 loses 3 (an outlier): 3 goes to P2; P2 loses 5, kept as its own low-priority cluster
    keep = np.ones(len(props.members), dtype=bool)
    keep[[4, 7]] = False  # member 3 of P1, member 5 of P2
    labels = deoverlap(props, scores, 8, keep_members=keep)
    assert labels.tolist() == [0, 0, 1, 2, 2, 3, 4, 5]
    # without keep_outliers 5 is in no cluster: a singleton all the same
    labels = deoverlap(props, scores, 8, keep_members=keep, keep_outliers=False)
    assert labels.tolist() == [0, 0, 1, 2, 2, 3, 4, 5]
    # ties: the earlier proposal wins
    tie = make_proposals([[0, 1], [1, 2]], 5)
    assert deoverlap(tie, np.array([0.5, 0.5]), 3).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="one value per proposal"):
        deoverlap(props, scores[:3], 8)
    with pytest.raises(ValueError, match="one flag per proposal member"):
        deoverlap(props, scores, 8, keep_members=keep[:3])
    with pytest.raises(ValueError, match="only 6 samples"):
        deoverlap(props, scores, 6)


def planted(num_ids: int, seed: int, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Tight identities of 6-14 samples in pairs: at low thresholds a pair merges."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_ids, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    other = rng.normal(size=(num_ids // 2, dim))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    centers[1::2] = centers[0::2] * np.cos(1.1) + other * np.sin(1.1)  # partners at 63 degrees
    labels = np.repeat(np.arange(num_ids), rng.integers(6, 15, num_ids))
    feats = centers[labels] + 0.5 * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return normalize_rows(feats.astype(np.float32)), labels


SETTINGS = [ProposalSetting(k=10, th=th, min_size=2, max_size=40) for th in (0.4, 0.5, 0.6, 0.7)]


@pytest.fixture(scope="module")
def trained() -> dict:
    """GCN-D and GCN-S trained on 100 planted identities (small nets, more steps than the
    published schedule, which assumes ~10^6 proposals)."""
    feats, labels = planted(100, seed=10)
    graph = build_knn(feats, 10, show_progress=False)
    props = generate_proposals(graph, SETTINGS, feats, show_progress=False)
    det, det_loss = train_gcn_d(
        feats,
        graph,
        props,
        labels,
        hidden_dims=(32, 16),
        lr=0.1,
        epochs=20,
        lr_steps=(),
        show_progress=False,
    )
    seg, seg_loss = train_gcn_s(
        feats,
        graph,
        props,
        labels,
        hidden_dims=(32, 16),
        dropout=0.0,
        lr=0.2,
        epochs=30,
        batch_size=8,
        lr_steps=(20,),
        show_progress=False,
    )
    return {"det": det, "seg": seg, "det_loss": det_loss, "seg_loss": seg_loss}


def test_training_reduces_the_loss(trained: dict) -> None:
    assert trained["det_loss"][-1] < 0.25 * trained["det_loss"][0]
    assert trained["seg_loss"][-1] < 0.5 * trained["seg_loss"][0]
    assert not trained["det"].training and not trained["seg"].training


def test_clustering_planted_identities(trained: dict) -> None:
    feats, labels = planted(40, seed=11)  # identities never seen in training
    graph = build_knn(feats, 10, show_progress=False)
    pred_d = gcn_d_cluster(
        feats, graph, model=trained["det"], settings=SETTINGS, show_progress=False
    )
    pred_ds = gcn_ds_cluster(
        feats,
        graph,
        model=trained["det"],
        seg_model=trained["seg"],
        settings=SETTINGS,
        show_progress=False,
    )
    props = generate_proposals(graph, SETTINGS, feats, show_progress=False).unique()
    rng = np.random.default_rng(0)
    random_f = [
        pairwise_f(labels, deoverlap(props, rng.random(len(props)), len(feats))) for _ in range(10)
    ]
    f_d, f_ds = pairwise_f(labels, pred_d), pairwise_f(labels, pred_ds)
    assert f_d >= 0.9 and f_ds >= 0.9
    assert f_d >= np.mean(random_f) and f_ds >= np.mean(random_f)
    assert pred_d.min() == 0 and len(pred_d) == len(feats)

    # GCN-S: on the impure test proposals the kept members are purer than the proposal
    _, iop = targets(props, labels)
    impure = props.select((iop >= 0.2) & (iop <= 0.8))
    prob_in = predict_gcn_s(trained["seg"], feats, graph, impure, show_progress=False)
    kept_purity, pid = [], impure.proposal_ids()
    for p in range(len(impure)):
        kept = impure.members[(pid == p) & (prob_in >= 0.5)]
        if len(kept):
            kept_purity.append(np.bincount(labels[kept]).max() / len(kept))
    _, iop_impure = targets(impure, labels)
    assert len(kept_purity) >= 0.8 * len(impure)
    assert np.mean(kept_purity) >= np.mean(iop_impure) + 0.25


def test_predictions_are_deterministic_and_in_range(trained: dict) -> None:
    feats, _ = planted(10, seed=12)
    graph = build_knn(feats, 10, show_progress=False)
    props = generate_proposals(graph, SETTINGS, feats, show_progress=False)
    a = predict_gcn_d(trained["det"], feats, graph, props, batch_size=3, show_progress=False)
    b = predict_gcn_d(trained["det"], feats, graph, props, batch_size=64, show_progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    trained["det"].train()  # prediction runs in eval mode and restores the caller's mode
    np.testing.assert_allclose(
        predict_gcn_d(trained["det"], feats, graph, props, show_progress=False), a, rtol=1e-6
    )
    assert trained["det"].training
    trained["det"].eval()
    p1 = predict_gcn_s(
        trained["seg"], feats, graph, props, seed_node="max_degree", show_progress=False
    )
    p2 = predict_gcn_s(
        trained["seg"], feats, graph, props, seed_node="random", random_state=3, show_progress=False
    )
    assert p1.shape == p2.shape == props.members.shape
    assert ((p1 >= 0) & (p1 <= 1)).all()
    with pytest.raises(ValueError, match="seed_node"):
        predict_gcn_s(trained["seg"], feats, graph, props, seed_node="first", show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage 'det'"):
        predict_gcn_d(trained["seg"], feats, graph, props, show_progress=False)
    with pytest.raises(ValueError, match="expects 32-dim"):
        predict_gcn_d(trained["det"], feats[:, :16], graph, props, show_progress=False)


def test_save_load_round_trip(trained: dict, tmp_path: Path) -> None:
    feats, _ = planted(6, seed=13)
    graph = build_knn(feats, 10, show_progress=False)
    props = generate_proposals(graph, SETTINGS, feats, show_progress=False)
    path = tmp_path / "gcn_d.pt"
    trained["det"].save(path, {"trained_on": "planted", "k": 10})
    loaded = DSGCN.load(path, "det")
    assert loaded.config == trained["det"].config and not loaded.training
    _, meta = read_gcn_checkpoint(path, "gcn_d")  # the one format of every learned clusterer
    assert meta == {**trained["det"].config, "kind": "gcn_d", "trained_on": "planted", "k": 10}
    np.testing.assert_array_equal(
        predict_gcn_d(loaded, feats, graph, props, show_progress=False),
        predict_gcn_d(trained["det"], feats, graph, props, show_progress=False),
    )
    via_path = cluster(
        "gcn_d", feats, graph, model=str(path), settings=SETTINGS, show_progress=False
    )
    direct = gcn_d_cluster(
        feats, graph, model=trained["det"], settings=SETTINGS, show_progress=False
    )
    np.testing.assert_array_equal(via_path, direct)
    with pytest.raises(DataFormatError, match=r"gcn_d\.pt: holds a gcn_d model, not a gcn_s"):
        DSGCN.load(path, "seg")
    with pytest.raises(ValueError, match="contradicts"):
        trained["det"].save(tmp_path / "x.pt", {"feature_dim": 7})
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DataFormatError, match=r"junk\.pt"):
        DSGCN.load(tmp_path / "junk.pt", "det")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataFormatError, match=r"other\.pt: not a robustface gcn_d checkpoint"):
        DSGCN.load(tmp_path / "other.pt", "det")


def test_bad_input(trained: dict) -> None:
    feats, labels = planted(6, seed=14)
    graph = build_knn(feats, 10, show_progress=False)
    props = generate_proposals(graph, SETTINGS, feats, show_progress=False)
    assert "gcn_d" in CLUSTERERS and "gcn_ds" in CLUSTERERS
    with pytest.raises(ValueError, match="needs a kNN graph"):
        gcn_d_cluster(feats, None, model=trained["det"], show_progress=False)
    with pytest.raises(ValueError, match="labels must have one entry"):
        train_gcn_d(feats, graph, props, labels[:-1], epochs=1, show_progress=False)
    with pytest.raises(ValueError, match="knn has"):
        train_gcn_d(feats[:-1], graph, props, labels[:-1], epochs=1, show_progress=False)
    small = KnnGraph(graph.nbrs[:, :5], graph.sims[:, :5])
    with pytest.raises(ValueError, match="k=10 neighbours but knn holds only k=5"):
        predict_gcn_d(trained["det"], feats, small, props, show_progress=False)
    with pytest.raises(ValueError, match="iop_range"):
        train_gcn_s(feats, graph, props, labels, iop_range=(0.9, 0.2), show_progress=False)
    pure = props.select(targets(props, labels)[1] == 1.0)
    with pytest.raises(ValueError, match="no proposal has a ground-truth IoP"):
        train_gcn_s(feats, graph, pure, labels, show_progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_gcn_d(feats, graph, props, labels, epochs=0, show_progress=False)
