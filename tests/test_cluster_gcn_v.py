"""GCN-V: targets, GraphConv, gradients, training, linking, clustering, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cluster_reference import dense_weights, pairwise_f, planted
from robustface.cluster import gcn_v
from robustface.cluster.base import cluster
from robustface.cluster.gcn_v import (
    GCNV,
    GraphConv,
    confidence_link,
    confidence_targets,
    gcn_adjacency,
    gcn_adjacency_blocks,
    load_gcn_v,
    nearest_higher,
    predict_gcn_v,
    reverse_edges,
    save_gcn,
    to_torch_sparse,
    train_gcn_v,
)
from robustface.cluster.graph import components, knn_edges
from robustface.cluster.knn import KnnGraph, knn_brute_force
from robustface.errors import DataFormatError, ParameterTypeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_knn(seed: int, n: int = 40, k: int = 6, missing: bool = True) -> KnnGraph:
    """A kNN graph of random unit features; with ``missing``, some entries removed (-1)."""
    rng = np.random.default_rng(seed)
    graph = knn_brute_force(rng.standard_normal((n, 8)).astype(np.float32), k)
    if missing:
        drop = rng.random(graph.nbrs.shape) < 0.15
        drop[:, 0] = False
        graph = KnnGraph(np.where(drop, -1, graph.nbrs), np.where(drop, -np.inf, graph.sims))
    return graph


def dense_adjacency(graph: KnnGraph) -> np.ndarray:
    """The row-normalised ``max(S, S^T) + I``, by loops."""
    a = dense_weights(graph)
    return a / a.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trained() -> dict[str, object]:
    xtr, ytr, centres = planted(0)
    xte, yte, _ = planted(1, centres)
    ktr, kte = knn_brute_force(xtr, 10), knn_brute_force(xte, 10)
    model = train_gcn_v(xtr, ytr, ktr, iters=400, hidden=32, batch_size=None, show_progress=False)
    return {"model": model, "xtr": xtr, "ytr": ytr, "ktr": ktr, "xte": xte, "yte": yte, "kte": kte}


def test_confidence_targets_match_formula_per_node() -> None:
    graph = random_knn(0)
    labels = np.random.default_rng(1).integers(0, 4, graph.num_samples)
    want = np.zeros(graph.num_samples)
    for i in range(graph.num_samples):
        for j, sim in zip(graph.nbrs[i], graph.sims[i], strict=True):
            if j < 0:
                continue  # missing entry
            want[i] += sim if labels[j] == labels[i] else -sim  # self included: +1
    want /= np.abs(want).max()
    got = confidence_targets(labels, graph)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got).max() == pytest.approx(1.0)


def test_confidence_targets_reject_bad_labels() -> None:
    graph = random_knn(0, missing=False)
    with pytest.raises(ValueError, match="labels must be an"):
        confidence_targets(np.zeros(graph.num_samples - 1, dtype=int), graph)
    with pytest.raises(ValueError, match=">= 0"):
        confidence_targets(np.full(graph.num_samples, -1), graph)


def test_adjacency_matches_dense_formula() -> None:
    graph = random_knn(2)
    want = dense_adjacency(graph)
    np.testing.assert_allclose(gcn_adjacency(graph).toarray(), want, atol=1e-6)
    np.testing.assert_allclose(to_torch_sparse(gcn_adjacency(graph)).to_dense(), want, atol=1e-6)


def awkward_knn(seed: int) -> KnnGraph:
    """``random_knn`` plus negative similarities and rows whose own entry is not first."""
    graph = random_knn(seed, n=50, k=7)
    rng = np.random.default_rng(seed)
    sims = np.where(rng.random(graph.sims.shape) < 0.1, -np.abs(graph.sims), graph.sims)
    nbrs = graph.nbrs.copy()
    swap = rng.random(len(nbrs)) < 0.2
    nbrs[swap, 0], nbrs[swap, 3] = graph.nbrs[swap, 3], graph.nbrs[swap, 0]
    sims[swap, 0], sims[swap, 3] = sims[swap, 3], sims[swap, 0].copy()
    return KnnGraph(nbrs, sims.astype(np.float32))


def dense_similarities(graph: KnnGraph) -> np.ndarray:
    """``S``: kNN sims >= 0 without self loops, missing entries skipped, by loops."""
    s = np.zeros((graph.num_samples, graph.num_samples))
    for i in range(graph.num_samples):
        for j, sim in zip(graph.nbrs[i], graph.sims[i], strict=True):
            if j >= 0 and j != i and sim >= 0:
                s[i, j] = sim
    return s


@pytest.mark.parametrize("batch", [1, 7, 50, 64])
def test_adjacency_blocks_equal_the_dense_formula(batch: int) -> None:
    graph = awkward_knn(batch)
    blocks = list(gcn_adjacency_blocks(graph, batch))
    assert [(a, b) for a, b, _ in blocks] == [(a, min(a + batch, 50)) for a in range(0, 50, batch)]
    got = np.vstack([rows.toarray() for _, _, rows in blocks])
    np.testing.assert_allclose(got, dense_adjacency(graph), atol=1e-6)
    assert all(rows.dtype == np.float32 for _, _, rows in blocks)
    # not normalised: max(S, S^T) alone, no self loops
    s = dense_similarities(graph)
    raw = list(gcn_adjacency_blocks(graph, batch, normalized=False))
    assert [(a, b) for a, b, _ in raw] == [(a, b) for a, b, _ in blocks]
    got = np.vstack([rows.toarray() for _, _, rows in raw])
    np.testing.assert_allclose(got, np.maximum(s, s.T), atol=1e-6)
    assert all(rows.dtype == np.float32 for _, _, rows in raw)


@pytest.mark.parametrize("batch", [1, 3, 1000])
def test_reverse_edges_is_the_transpose(batch: int) -> None:
    graph = awkward_knn(11)
    reverse = reverse_edges(graph, batch)
    np.testing.assert_allclose(reverse.toarray(), dense_similarities(graph).T, atol=0)
    assert reverse.indices.dtype == np.int32
    assert reverse.has_sorted_indices  # sources ascending within every row


def test_to_torch_sparse_is_a_csr_tensor_that_sums_duplicates() -> None:
    # a non-canonical scipy matrix: unsorted columns and a repeated entry (summed, as scipy does)
    indptr, indices = np.array([0, 3, 4]), np.array([2, 0, 2, 1])
    data = np.array([1.0, 2.0, 0.5, 4.0])
    adj = sp.csr_matrix((data, indices, indptr), shape=(2, 3))
    got = to_torch_sparse(adj)
    assert got.layout == torch.sparse_csr
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.to_dense().numpy(), [[2.0, 0.0, 1.5], [0.0, 4.0, 0.0]])
    x = torch.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose((got @ x).numpy(), adj.toarray() @ x.numpy())


def test_knn_edges_of_a_row_range_are_those_rows_edges() -> None:
    graph = awkward_knn(5)
    src, dst, sim = knn_edges(graph, min_sim=0.0)
    for start, stop in ((0, 50), (7, 19), (45, None)):
        part = knn_edges(graph, min_sim=0.0, start=start, stop=stop)
        keep = (src >= start) & (src < (50 if stop is None else stop))
        for got, want in zip(part, (src[keep], dst[keep], sim[keep]), strict=True):
            np.testing.assert_array_equal(got, want)


def test_adjacency_blocks_sum_repeated_neighbours_like_the_whole_matrix() -> None:
    graph = random_knn(4, n=30, k=6)
    nbrs = graph.nbrs.copy()
    nbrs[::4, 2] = nbrs[::4, 1]  # a neighbour listed twice
    graph = KnnGraph(nbrs, graph.sims)
    got = np.vstack([rows.toarray() for _, _, rows in gcn_adjacency_blocks(graph, 4)])
    np.testing.assert_allclose(got, gcn_adjacency(graph).toarray(), atol=1e-6)


def test_graphconv_matches_numpy_sparse_and_batched() -> None:
    torch.manual_seed(0)
    conv = GraphConv(5, 7)
    with torch.no_grad():
        conv.bias.normal_()
    graph = random_knn(3, n=12, k=4)
    a = dense_adjacency(graph)
    x = np.random.default_rng(4).standard_normal((12, 5))
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    want = np.maximum(np.concatenate([x, a @ x], axis=1) @ w + b, 0)
    xt = torch.from_numpy(x).float()
    got = conv(xt, to_torch_sparse(gcn_adjacency(graph)))
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-5)
    batched = conv(torch.stack([xt, xt]), torch.from_numpy(np.stack([a, a])).float())
    np.testing.assert_allclose(batched.detach().numpy(), np.stack([want, want]), atol=1e-5)


def test_training_step_gradient_gradcheck() -> None:
    torch.manual_seed(0)
    graph = random_knn(5, n=10, k=4)
    model = GCNV(4, hidden=4).double()
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((10, 4)))
    adj = torch.from_numpy(dense_adjacency(graph)).to_sparse()
    target = torch.from_numpy(confidence_targets(np.arange(10) % 3, graph)).double()
    names = [n for n, _ in model.named_parameters()]

    def loss(*params: torch.Tensor) -> torch.Tensor:
        conf, _ = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x, adj))
        return torch.nn.functional.mse_loss(conf, target)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


def test_training_reduces_loss_from_the_full_graph_mse() -> None:
    xtr, ytr, _ = planted(0)
    graph = knn_brute_force(xtr, 10)
    model = train_gcn_v(
        xtr, ytr, graph, iters=60, hidden=16, seed=3, batch_size=None, optimizer="sgd",
        show_progress=False,
    )  # fmt: skip
    assert len(model.loss_history) == 60
    # the first logged loss is the MSE of the seed's initial model over the whole graph
    torch.manual_seed(3)
    init = GCNV(32, hidden=16)
    with torch.no_grad():
        conf, _ = init(torch.from_numpy(xtr), to_torch_sparse(gcn_adjacency(graph)))
    mse = float(np.mean((conf.numpy() - confidence_targets(ytr, graph)) ** 2))
    assert model.loss_history[0] == pytest.approx(mse, rel=1e-4)
    assert np.mean(model.loss_history[-10:]) < 0.5 * model.loss_history[0]


@pytest.mark.parametrize("batch", [97, 40, 1000])
def test_predict_in_batches_equals_full_forward(trained: dict, batch: int) -> None:
    model, x, graph = trained["model"], trained["xte"], trained["kte"]
    conf, hidden = predict_gcn_v(model, x, graph, batch_size=batch, show_progress=False)
    with torch.no_grad():
        want_conf, want_hidden = model(torch.from_numpy(x), to_torch_sparse(gcn_adjacency(graph)))
    np.testing.assert_allclose(conf, want_conf.numpy(), atol=1e-5)
    np.testing.assert_allclose(hidden, want_hidden.numpy(), atol=1e-5)
    assert hidden.shape == (len(x), 32)
    conf_only, none = predict_gcn_v(
        model, x, graph, batch_size=batch, return_hidden=False, show_progress=False
    )
    assert none is None
    np.testing.assert_array_equal(conf_only, conf)
    with pytest.raises(ValueError, match="16-d"):
        predict_gcn_v(model, x[:, :16], graph, show_progress=False)
    with pytest.raises(ValueError, match="knn has"):
        predict_gcn_v(model, x[:-1], graph, show_progress=False)


def test_predict_handles_rows_without_edges() -> None:
    # awkward rows: missing entries, negative sims, repeated neighbours, rows whose kNN list
    # holds only themselves and that no one lists (their A row is the self loop alone)
    graph = awkward_knn(3)
    nbrs, sims = graph.nbrs.copy(), graph.sims.copy()
    nbrs[::4, 2] = nbrs[::4, 1]
    lonely = [5, 17]
    nbrs[np.isin(nbrs, lonely)] = -1
    nbrs[lonely], sims[lonely] = -1, -np.inf
    nbrs[lonely, 0], sims[lonely, 0] = lonely, 1.0
    graph = KnnGraph(nbrs, sims)
    torch.manual_seed(2)
    model = GCNV(8, hidden=16).eval()
    with torch.no_grad():
        model.conv1.bias.normal_()
    x = np.random.default_rng(3).standard_normal((50, 8)).astype(np.float32)
    conf, hidden = predict_gcn_v(model, x, graph, batch_size=9, show_progress=False)
    # the formula written out: relu([X, A X] W + b), A = rownorm(max(S, S^T) + I) by loops,
    # a neighbour listed twice counting twice in S (as in gcn_adjacency)
    xs = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.zeros((50, 50))
    for i in range(50):
        for j, sim in zip(nbrs[i], sims[i], strict=True):
            if j >= 0 and j != i and sim >= 0:
                s[i, j] += sim
    a = np.maximum(s, s.T) + np.eye(50)
    a /= a.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(a[lonely][:, lonely], np.eye(2))
    w, b = model.conv1.weight.detach().double().numpy(), model.conv1.bias.detach().double().numpy()
    want = np.maximum(np.concatenate([xs, a @ xs], axis=1) @ w + b, 0)
    np.testing.assert_allclose(hidden, want, atol=1e-5)
    with torch.no_grad():
        want_conf = model.head(torch.from_numpy(want).float()).numpy()
    np.testing.assert_allclose(conf, want_conf, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False])
def test_predict_rows_is_the_layers_formula(onednn: bool, monkeypatch) -> None:
    # the inference path (one [X, AX] W product; oneDNN's where torch has it) against the
    # formula written out in float64
    if onednn and gcn_v.ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN linear op")
    if not onednn:
        monkeypatch.setattr(gcn_v, "ONEDNN_LINEAR", None)
    torch.manual_seed(5)
    model = GCNV(12, hidden=16).eval()
    with torch.no_grad():
        model.conv1.bias.normal_()
        model.classifier[1].weight.uniform_(-1, 1)  # PReLU slopes of both signs
    xa = torch.randn(30, 24)
    conf, hidden = model.predict_rows(xa)
    p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    want_hidden = np.maximum(xa.double().numpy() @ p["conv1.weight"] + p["conv1.bias"], 0)
    mid = want_hidden @ p["classifier.0.weight"].T + p["classifier.0.bias"]
    mid = np.where(mid > 0, mid, mid * p["classifier.1.weight"])
    want_conf = (mid @ p["classifier.2.weight"].T + p["classifier.2.bias"])[:, 0]
    np.testing.assert_allclose(hidden.numpy(), want_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conf.numpy(), want_conf, rtol=1e-5, atol=1e-5)
    assert hidden.shape == (30, 16) and conf.shape == (30,)


def test_predict_rows_of_a_float64_model_takes_torch_s_product() -> None:
    # oneDNN's op is float32 only: a float64 model gets torch's product, not oneDNN's error
    torch.manual_seed(6)
    model = GCNV(6, hidden=8).double().eval()
    xa = torch.randn(5, 12, dtype=torch.float64)
    conf, hidden = model.predict_rows(xa)
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    want = np.maximum(xa.numpy() @ p["conv1.weight"] + p["conv1.bias"], 0)
    np.testing.assert_allclose(hidden.numpy(), want, rtol=1e-12, atol=1e-12)
    assert conf.dtype == torch.float64 and conf.shape == (5,)


def test_predict_on_no_rows_gives_empty_outputs() -> None:
    model = GCNV(12, hidden=16)
    empty = KnnGraph(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32))
    conf, hidden = predict_gcn_v(model, np.zeros((0, 12), np.float32), empty, show_progress=False)
    assert conf.shape == (0,) and hidden is not None and hidden.shape == (0, 16)


def brute_force_link(graph: KnnGraph, conf: np.ndarray, tau: float) -> np.ndarray:
    """Union-find over: each i -> first kNN entry j (in stored order) with conf_j > conf_i,
    kept only if its similarity > tau."""
    parent = list(range(graph.num_samples))

    def find(u: int) -> int:
        while parent[u] != u:
            u = parent[u]
        return u

    for i in range(graph.num_samples):
        for j, sim in zip(graph.nbrs[i], graph.sims[i], strict=True):
            if j >= 0 and j != i and conf[j] > conf[i]:
                if sim > tau:
                    parent[find(i)] = find(int(j))
                break
    return np.array([find(i) for i in range(graph.num_samples)])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a[:, None] == a[None]) == (b[:, None] == b[None])).all())


def test_confidence_link_matches_brute_force() -> None:
    graph = random_knn(7, n=60, k=8)
    conf = np.random.default_rng(8).integers(0, 12, 60).astype(np.float32)  # with ties
    peak, sim = nearest_higher(graph, conf)
    at_link = float(sim[np.flatnonzero(peak >= 0)[0]])  # a link exactly at tau is cut
    for tau in (-1.0, 0.0, 0.3, 0.6, at_link):
        got = confidence_link(graph, conf, tau)
        assert same_partition(got, brute_force_link(graph, conf, tau))
        assert set(got) == set(range(got.max() + 1))
    top = conf == conf.max()
    assert (peak[top] == -1).all() and np.isneginf(sim[top]).all()
    with pytest.raises(ValueError, match="tau"):
        confidence_link(graph, conf, float("nan"))
    with pytest.raises(ValueError, match="confidence"):
        confidence_link(graph, conf[:-1], 0.5)


def test_end_to_end_beats_connected_components(trained: dict) -> None:
    model, x, y, graph = trained["model"], trained["xte"], trained["yte"], trained["kte"]
    conf, _ = predict_gcn_v(model, x, graph, show_progress=False)
    # the confidence learned on the other split follows this split's targets
    assert np.corrcoef(conf, confidence_targets(y, graph))[0, 1] > 0.2
    labels = cluster(
        "gcn_v", x, graph, model=model, tau=0.5, use_gcn_features=False, show_progress=False
    )
    f_gcn = pairwise_f(y, labels)
    thresholds = np.arange(0.3, 0.96, 0.05)
    f_cc = [pairwise_f(y, components(len(x), *knn_edges(graph, min_sim=t)[:2])) for t in thresholds]
    noise = np.random.default_rng(0).random(len(x)).astype(np.float32)
    f_random = pairwise_f(y, confidence_link(graph, noise, 0.5))
    assert f_gcn > 0.6
    assert f_gcn > max(f_cc)  # connected components at their best threshold
    assert f_gcn > f_random  # the learned confidence matters, not just one link per sample
    on_gcn = cluster("gcn_v", x, graph, model=model, tau=0.5, show_progress=False)
    assert pairwise_f(y, on_gcn) > 0.5


def test_save_load_round_trip(trained: dict, tmp_path: Path) -> None:
    model, x, graph = trained["model"], trained["xte"], trained["kte"]
    path = tmp_path / "gcn_v.pth"
    save_gcn(model, path, {"k": 10})
    loaded = load_gcn_v(path)
    for a, b in zip(
        predict_gcn_v(model, x, graph, show_progress=False),
        predict_gcn_v(loaded, x, graph, show_progress=False),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    saved = torch.load(path, weights_only=True)
    assert saved["meta"] == {
        "k": 10,
        "kind": "gcn_v",
        "feature_dim": 32,
        "hidden": 32,
        "dropout": 0.0,
    }
    by_path = cluster("gcn_v", x, graph, model=path, use_gcn_features=False, show_progress=False)
    want = confidence_link(graph, predict_gcn_v(model, x, graph, show_progress=False)[0], 0.65)
    np.testing.assert_array_equal(by_path, want)
    with pytest.raises(ValueError, match="contradicts"):
        save_gcn(model, tmp_path / "x.pth", {"hidden": 64})
    with pytest.raises(TypeError, match="JSON"):
        save_gcn(model, tmp_path / "x.pth", {"trained_on": object()})
    assert not (tmp_path / "x.pth").exists()


def test_load_published_state_dict(tmp_path: Path) -> None:
    """A learn-to-cluster checkpoint: mmcv's {'meta', 'state_dict'} with DataParallel prefixes."""
    rng = np.random.default_rng(0)
    shapes = {
        "conv1.weight": (2 * 6, 10),
        "conv1.bias": (10,),
        "classifier.0.weight": (10, 10),
        "classifier.0.bias": (10,),
        "classifier.1.weight": (10,),
        "classifier.2.weight": (1, 10),
        "classifier.2.bias": (1,),
    }
    state = {
        k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()
    }
    wrapped = {"meta": {"epoch": 80000}, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "bare.pth")
    x = rng.standard_normal((20, 6)).astype(np.float32)
    graph = knn_brute_force(x, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = dense_adjacency(graph)
    w = {k: v.numpy() for k, v in state.items()}
    h = np.maximum(np.concatenate([xn, a @ xn], 1) @ w["conv1.weight"] + w["conv1.bias"], 0)
    z = h @ w["classifier.0.weight"].T + w["classifier.0.bias"]
    z = np.where(z > 0, z, w["classifier.1.weight"] * z)  # PReLU, one slope per channel
    want = (z @ w["classifier.2.weight"].T + w["classifier.2.bias"])[:, 0]
    for name in ("wrapped.pth", "bare.pth"):
        model = load_gcn_v(tmp_path / name)
        assert (model.feature_dim, model.hidden) == (6, 10)
        conf, hidden = predict_gcn_v(model, x, graph, show_progress=False)
        np.testing.assert_allclose(conf, want, atol=1e-4)
        np.testing.assert_allclose(hidden, h, atol=1e-4)
    gcn_e_state = {**state, "conv2.weight": torch.zeros(20, 10)}
    torch.save(gcn_e_state, tmp_path / "gcn_e.pth")
    with pytest.raises(DataFormatError, match="gcn_e model, not a gcn_v"):
        load_gcn_v(tmp_path / "gcn_e.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DataFormatError, match=r"conv1\.weight"):
        load_gcn_v(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataFormatError, match=r"junk\.pth"):
        load_gcn_v(tmp_path / "junk.pth")


def _hand_steps(
    xtr: np.ndarray, ytr: np.ndarray, graph, batch: int, lrs: list[float], update
) -> tuple[GCNV, list[float]]:
    """GCN-V (seed 5) trained by hand: the full-graph forward, the loss on each step's rows
    (sorted batches of a fresh seed-5 permutation per pass, the last of a pass shorter),
    ``update(name, param, grad, lr, step)`` with ``lrs[step]``."""
    rng = np.random.default_rng(5)
    passes = [rng.permutation(len(xtr)) for _ in range(len(lrs) * batch // len(xtr) + 1)]
    row_sets = [np.sort(o[s : s + batch]) for o in passes for s in range(0, len(o), batch)]
    torch.manual_seed(5)
    ref = GCNV(32, hidden=16)
    x, adj = torch.from_numpy(xtr), to_torch_sparse(gcn_adjacency(graph))
    target = torch.from_numpy(confidence_targets(ytr, graph))
    losses = []
    for step, (rows, lr) in enumerate(zip(row_sets, lrs, strict=False)):
        conf, _ = ref(x, adj)  # aggregation over every row, not just the batch
        loss = ((conf[rows] - target[rows]) ** 2).mean()
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for (name, p), g in zip(ref.named_parameters(), grads, strict=True):
                update(name, p, g, lr, step)
    return ref, losses


def test_mini_batch_sgd_steps_use_the_whole_graph_for_the_batch_rows() -> None:
    """Mini-batch SGD steps equal SGD done by hand on the full-graph forward of those rows,
    with the published lr x0.1 at each fraction of ``lr_steps``."""
    xtr, ytr, _ = planted(0)
    graph = knn_brute_force(xtr, 10)
    batch, lr, momentum, wd = 37, 0.05, 0.9, 1e-5
    model = train_gcn_v(
        xtr, ytr, graph, iters=4, hidden=16, seed=5, batch_size=batch, optimizer="sgd", lr=lr,
        momentum=momentum, weight_decay=wd, lr_steps=(0.5, 0.75), show_progress=False,
    )  # fmt: skip
    bufs: dict[str, torch.Tensor] = {}

    def sgd(name: str, p: torch.Tensor, g: torch.Tensor, step_lr: float, step: int) -> None:
        g = g + wd * p
        bufs[name] = g if name not in bufs else momentum * bufs[name] + g
        p -= step_lr * bufs[name]

    ref, losses = _hand_steps(xtr, ytr, graph, batch, [lr, lr, lr / 10, lr / 100], sgd)
    assert model.loss_history == pytest.approx(losses, rel=1e-5)
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], want, atol=1e-5, rtol=1e-4, msg=name)


def test_adamw_steps_follow_the_written_out_update_and_warmup_cosine_schedule() -> None:
    """The default optimiser: AdamW (decoupled weight decay, bias-corrected moments) at
    lr x (t + 1) / w for the first w = max(1, int(0.05 T)) steps, then x (1 + cos(pi (t - w) /
    (T - w))) / 2, checked against the formulas done by hand over all T steps."""
    xtr, ytr, _ = planted(0)
    graph = knn_brute_force(xtr, 10)
    batch, lr, wd, iters = 29, 3e-3, 1e-2, 40
    model = train_gcn_v(
        xtr, ytr, graph, iters=iters, hidden=16, seed=5, batch_size=batch, lr=lr,
        weight_decay=wd, show_progress=False,
    )  # fmt: skip
    warm = 2  # int(0.05 * 40)
    lrs = [
        lr * (t + 1) / warm if t < warm else lr * (1 + math.cos(math.pi * (t - warm) / 38)) / 2
        for t in range(iters)
    ]
    b1, b2, eps = 0.9, 0.999, 1e-8
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def adamw(name: str, p: torch.Tensor, g: torch.Tensor, step_lr: float, step: int) -> None:
        m, v = moments.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        moments[name] = (m, v)
        p *= 1 - step_lr * wd
        m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
        p -= step_lr * m_hat / (v_hat.sqrt() + eps)

    ref, losses = _hand_steps(xtr, ytr, graph, batch, lrs, adamw)
    assert model.loss_history == pytest.approx(losses, rel=1e-4)
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], want, atol=1e-5, rtol=1e-4, msg=name)


def test_optimizer_arguments_are_checked() -> None:
    xtr, ytr, _ = planted(0)
    graph = knn_brute_force(xtr, 5)
    kw = {"iters": 1, "show_progress": False}
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        train_gcn_v(xtr, ytr, graph, optimizer="adam", **kw)
    with pytest.raises(ValueError, match="lr_steps is for optimizer='sgd'"):
        train_gcn_v(xtr, ytr, graph, lr_steps=(0.5,), **kw)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_gcn_v(xtr, ytr, graph, lr=0.0, **kw)
    with pytest.raises(ValueError, match="lr_steps must be fractions"):
        train_gcn_v(xtr, ytr, graph, optimizer="sgd", lr_steps=(2,), **kw)
    with pytest.raises(ValueError, match="lr must be finite, got nan"):
        train_gcn_v(xtr, ytr, graph, lr=float("nan"), **kw)
    with pytest.raises(ParameterTypeError, match=r"iters must be an integer, got float 1\.5"):
        train_gcn_v(xtr, ytr, graph, **{**kw, "iters": 1.5})


def test_mini_batch_training_clusters_like_full_graph_training(trained: dict) -> None:
    model = train_gcn_v(
        trained["xtr"], trained["ytr"], trained["ktr"], iters=400, hidden=32, batch_size=128,
        show_progress=False,
    )  # fmt: skip
    conf, _ = predict_gcn_v(model, trained["xte"], trained["kte"], show_progress=False)
    f_batch = pairwise_f(trained["yte"], confidence_link(trained["kte"], conf, 0.65))
    conf, _ = predict_gcn_v(trained["model"], trained["xte"], trained["kte"], show_progress=False)
    f_full = pairwise_f(trained["yte"], confidence_link(trained["kte"], conf, 0.65))
    assert f_batch >= f_full - 0.05
    full_loss = np.mean(trained["model"].loss_history[-20:])
    assert np.mean(model.loss_history[-20:]) < 1.25 * full_loss < 0.3 * model.loss_history[0]


def test_mini_batch_size_is_checked() -> None:
    xtr, ytr, _ = planted(0)
    with pytest.raises(ValueError, match="batch_size"):
        train_gcn_v(xtr, ytr, knn_brute_force(xtr, 5), iters=1, batch_size=0, show_progress=False)


def test_a_knn_file_with_shuffled_rows_clusters_as_the_sorted_one(tmp_path: Path) -> None:
    """Linking takes each row's first higher-confidence neighbour as the nearest: a file whose
    rows are not stored nearest first must be sorted on loading (learn-to-cluster sorts too),
    for GCN-V's linking and every other consumer of the graph."""
    from robustface.data.ltc import write_knn

    x, gt, _ = planted(3)
    exact = knn_brute_force(x, 12)
    perm = np.argsort(np.random.default_rng(0).random(exact.nbrs.shape), axis=1)
    write_knn(tmp_path / "sorted.npz", exact.nbrs, exact.dists)
    write_knn(
        tmp_path / "mixed.npz",
        np.take_along_axis(exact.nbrs, perm, 1),
        np.take_along_axis(exact.dists, perm, 1),
    )
    want, got = KnnGraph.load(tmp_path / "sorted.npz"), KnnGraph.load(tmp_path / "mixed.npz")
    conf = confidence_targets(gt, want)
    np.testing.assert_array_equal(confidence_targets(gt, got), conf)
    for tau in (0.3, 0.6):
        expected = confidence_link(want, conf, tau)
        assert expected.max() + 1 < len(gt)  # the case links something
        np.testing.assert_array_equal(confidence_link(got, conf, tau), expected)
    params = {"cc": {}, "dbscan": {}, "aro": {}, "chinese_whispers": {},
              "hac": {"distance_threshold": 0.6}, "infomap": {"k": None}}  # fmt: skip
    for name, kwargs in params.items():
        got_labels, want_labels = (cluster(name, x, g, **kwargs) for g in (got, want))
        np.testing.assert_array_equal(got_labels, want_labels, err_msg=name)


def test_running_at_another_k_than_trained_warns_naming_both(tmp_path: Path, recwarn) -> None:
    """The checkpoint records the training k; another k at inference is warned about, once
    with both values; the same k, or a checkpoint without k (older, published), is silent."""
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    labels = np.repeat(np.arange(6), 5)
    model = train_gcn_v(x, labels, knn_brute_force(x, 4), iters=1, hidden=4, show_progress=False)
    path, old = tmp_path / "gcn_v.pth", tmp_path / "old.pth"
    save_gcn(model, path)
    assert torch.load(path, weights_only=True)["meta"]["k"] == 4
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["k"]
    torch.save(payload, old)
    with pytest.warns(UserWarning, match=r"trained on a k=4 kNN graph but runs on k=6") as got:
        cluster("gcn_v", x, knn_brute_force(x, 6), model=path, show_progress=False)
    assert len(got) == 1
    recwarn.clear()
    cluster("gcn_v", x, knn_brute_force(x, 4), model=path, show_progress=False)
    cluster("gcn_v", x, knn_brute_force(x, 6), model=old, show_progress=False)
    assert not [w for w in recwarn if "kNN graph" in str(w.message)]
