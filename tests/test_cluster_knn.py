"""kNN graphs: faiss against brute force, sharding, approximate recall, caching, bad input."""

from __future__ import annotations

import json
import tracemalloc

import faiss
import numpy as np
import pytest

from robustface.cluster import knn as knn_module
from robustface.cluster.knn import (
    KnnGraph,
    build_knn,
    features_fingerprint,
    ivf_nlist,
    knn_brute_force,
    knn_recall,
    load_or_build_knn,
    normalize_rows,
)
from robustface.data.ltc import read_features, write_features
from robustface.errors import DataFormatError, ParameterTypeError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss on one thread: these graphs are tiny and the test machine's cores are shared."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(n: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    """Rows drawn around ``clusters`` random centres (unnormalised, float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    rows = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return rows.astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_matches_brute_force():
    x = clustered(500, 16, 10)
    graph = build_knn(x, k=12, batch_size=64, show_progress=False)
    exact = knn_brute_force(x, 12)
    assert graph.nbrs.dtype == np.int64 and graph.sims.dtype == np.float32
    assert graph.nbrs.shape == (500, 12)
    np.testing.assert_allclose(graph.sims, exact.sims, atol=1e-5)
    # ids up to ties: every listed neighbour has the similarity of its rank, computed here
    u = unit(x)
    listed = np.einsum("nd,nkd->nk", u, u[graph.nbrs])
    np.testing.assert_allclose(listed, exact.sims, atol=1e-5)
    assert (graph.nbrs == exact.nbrs).mean() > 0.99
    np.testing.assert_array_equal(graph.nbrs[:, 0], np.arange(500))  # self first


@pytest.mark.parametrize("shard_size", [7, 37, 100, 299, 300])
def test_sharded_flat_equals_unsharded(shard_size):
    x = clustered(300, 8, 6, seed=1)
    x[[150, 40]] = x[3]  # three identical rows in different shards: ties broken by lower id
    whole = build_knn(x, k=9, batch_size=50, show_progress=False)
    sharded = build_knn(x, k=9, batch_size=50, shard_size=shard_size, show_progress=False)
    np.testing.assert_array_equal(sharded.nbrs, whole.nbrs)
    np.testing.assert_array_equal(sharded.sims, whole.sims)
    for row in (3, 40, 150):
        np.testing.assert_array_equal(whole.nbrs[row, :3], [3, 40, 150])
    exact = knn_brute_force(x, 9)
    np.testing.assert_allclose(sharded.sims, exact.sims, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options", "weak"),
    [
        ("ivf", {"nprobe": 16}, {"nprobe": 1}),  # 16 and 1 of 1600 // 39 = 41 lists
        ("hnsw", {}, {"hnsw_m": 4, "ef_search": 10}),
    ],
)
@pytest.mark.parametrize("shard_size", [None, 800])
def test_approximate_recall(method, options, weak, shard_size):
    x = clustered(1600, 32, 30, seed=2, noise=1.5)  # clusters overlap: neighbours are not trivial
    exact = knn_brute_force(x, 10)
    graph = build_knn(x, 10, method, shard_size=shard_size, show_progress=False, **options)
    assert knn_recall(graph, exact) >= 0.95
    assert graph.nbrs.max() < 1600 and (graph.nbrs[:, 0] == np.arange(1600)).mean() > 0.95
    if shard_size is None:  # a starved index does miss neighbours, and recall shows it
        starved = build_knn(x, 10, method, show_progress=False, **weak)
        assert knn_recall(starved, exact) < 0.9


def test_ivf_nlist_cap(capfd):
    assert ivf_nlist(10**7) == 4096
    assert ivf_nlist(100_000) == int(8 * np.sqrt(100_000)) == 2529
    assert ivf_nlist(1000) == 1000 // 39 == 25  # 8 sqrt(1000) = 252 lists would get 4 points each
    assert ivf_nlist(5000, nlist=1000) == 128
    assert ivf_nlist(20) == 1
    with pytest.raises(ValueError, match="nlist must be >= 1, got 0"):
        ivf_nlist(100, nlist=0)
    build_knn(clustered(1000, 8, 5), 5, "ivf", show_progress=False)
    assert "WARNING" not in capfd.readouterr().err  # faiss warns below 39 points per list


def test_min_sim_threshold():
    x = clustered(200, 8, 4, seed=3)
    graph = build_knn(x, 15, min_sim=0.8, show_progress=False)
    exact = knn_brute_force(x, 15)
    clear = np.abs(exact.sims - 0.8) > 1e-5  # leave out values at the threshold itself
    drop = exact.sims < 0.8
    assert (drop & clear).any() and (~drop & clear).any()
    np.testing.assert_array_equal(graph.nbrs[~drop & clear], exact.nbrs[~drop & clear])
    assert (graph.nbrs[drop & clear] == -1).all()
    assert np.isneginf(graph.sims[graph.nbrs == -1]).all()
    assert (graph.sims[graph.nbrs >= 0] >= 0.8).all()


def test_k_larger_than_n():
    x = clustered(5, 4, 2, seed=4)
    for shard_size in (None, 2):
        graph = build_knn(x, 80, shard_size=shard_size, show_progress=False)
        assert graph.k == 5
        np.testing.assert_array_equal(np.sort(graph.nbrs, axis=1), np.tile(np.arange(5), (5, 1)))
        np.testing.assert_array_equal(graph.nbrs, knn_brute_force(x, 80).nbrs)


def test_save_load_round_trip(tmp_path):
    graph = build_knn(clustered(50, 8, 3, seed=5), 6, min_sim=0.5, show_progress=False)
    assert (graph.nbrs == -1).any()
    graph.save(tmp_path / "knn.npz")
    with np.load(tmp_path / "knn.npz") as npz:
        data = npz["data"]
    assert data.shape == (50, 2, 6)
    np.testing.assert_array_equal(data[:, 0], graph.nbrs.astype(np.float64))
    np.testing.assert_allclose(data[:, 1][graph.nbrs >= 0], 1 - graph.sims[graph.nbrs >= 0])
    back = KnnGraph.load(tmp_path / "knn.npz")
    np.testing.assert_array_equal(back.nbrs, graph.nbrs)
    np.testing.assert_allclose(back.sims, graph.sims, atol=1e-6)
    assert np.isneginf(back.sims[back.nbrs == -1]).all()


def write_ltc_npz(path, nbrs, sims):
    """learn-to-cluster's layout written by hand: float ids and 1 - cos, self first."""
    data = np.stack([nbrs.astype(np.float32), (1 - sims).astype(np.float32)], axis=1)
    np.savez_compressed(path, data=data)


def test_hand_written_ltc_npz(tmp_path):
    x = clustered(30, 8, 3, seed=6)
    exact = knn_brute_force(x, 8)
    write_ltc_npz(tmp_path / "ltc.npz", exact.nbrs, exact.sims)
    graph = KnnGraph.load(tmp_path / "ltc.npz")
    np.testing.assert_array_equal(graph.nbrs, exact.nbrs)
    np.testing.assert_allclose(graph.sims, exact.sims, atol=1e-6)
    # without a sidecar: accepted when N matches and k suffices (then truncated)
    cached = load_or_build_knn(tmp_path / "ltc.npz", x, k=5)
    np.testing.assert_array_equal(cached.nbrs, exact.nbrs[:, :5])
    assert not (tmp_path / "ltc.npz.json").exists()
    with pytest.raises(ValueError, match=r"ltc\.npz: kNN file has k=8 .* fewer than k=9"):
        load_or_build_knn(tmp_path / "ltc.npz", x, k=9)
    with pytest.raises(ValueError, match=r"has 30 rows but features has 31"):
        load_or_build_knn(tmp_path / "ltc.npz", np.vstack([x, x[:1]]), k=5)
    bad = exact.nbrs.copy()
    bad[7, 3] = 30
    write_ltc_npz(tmp_path / "bad.npz", bad, exact.sims)
    with pytest.raises(DataFormatError, match=r"row 7 has neighbour ids outside \[0, 30\)"):
        load_or_build_knn(tmp_path / "bad.npz", x, k=5)


def test_rows_stored_in_any_order_load_nearest_first(tmp_path):
    """learn-to-cluster sorts each row on reading; a file whose rows are shuffled must give the
    same graph (and so the same clusters for every consumer), and truncating to k must keep
    the k nearest, not the first k stored."""
    x = clustered(40, 8, 3, seed=8)
    exact = knn_brute_force(x, 10)
    perm = np.argsort(np.random.default_rng(0).random(exact.nbrs.shape), axis=1)
    mixed = KnnGraph(
        np.take_along_axis(exact.nbrs, perm, 1), np.take_along_axis(exact.sims, perm, 1)
    )
    assert not np.array_equal(mixed.nbrs[:, 0], exact.nbrs[:, 0])
    write_ltc_npz(tmp_path / "ltc.npz", exact.nbrs, exact.sims)
    write_ltc_npz(tmp_path / "mixed.npz", mixed.nbrs, mixed.sims)
    want = KnnGraph.load(tmp_path / "ltc.npz")
    got = KnnGraph.load(tmp_path / "mixed.npz")
    np.testing.assert_array_equal(got.nbrs, want.nbrs)
    np.testing.assert_array_equal(got.sims, want.sims)
    cut = load_or_build_knn(tmp_path / "mixed.npz", x, k=4)
    np.testing.assert_array_equal(cut.nbrs, exact.nbrs[:, :4])
    np.testing.assert_array_equal(cut.sims, want.sims[:, :4])


def test_cache_build_load_and_refuse(tmp_path, monkeypatch):
    x = clustered(120, 8, 4, seed=7)
    path = tmp_path / "cache" / "knn.npz"
    built = load_or_build_knn(path, x, k=7, method="ivf", nlist=2, show_progress=False)
    record = json.loads((tmp_path / "cache" / "knn.npz.json").read_text())
    assert record == {
        "num_samples": 120,
        "dim": 8,
        "k": 7,
        "method": "ivf",
        "params": {
            "normalize": True,
            "min_sim": None,
            "shard_size": None,
            "nlist": 2,
            "nprobe": None,
        },
        "fingerprint": features_fingerprint(x),
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["knn.npz", "knn.npz.json"]
    files = {p: p.read_bytes() for p in path.parent.iterdir()}

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(knn_module, "build_knn", no_build)
    cached = load_or_build_knn(path, x, k=7, method="ivf", nlist=2, batch_size=10)
    np.testing.assert_array_equal(cached.nbrs, built.nbrs)
    np.testing.assert_allclose(cached.sims, built.sims, atol=1e-6)
    np.testing.assert_array_equal(  # a float64 copy of the same features is the same data
        load_or_build_knn(path, x.astype(np.float64), k=7, method="ivf", nlist=2).nbrs, built.nbrs
    )

    changed = x.copy()
    changed[0, 0] += 1.0
    refusals = [
        (dict(features=x, k=8, method="ivf", nlist=2), r"k 7 \(cache\) != 8 \(requested\)"),
        (dict(features=x, k=7, method="flat"), r"method 'ivf' \(cache\) != 'flat'"),
        (dict(features=changed, k=7, method="ivf", nlist=2), r"fingerprint 'sha256:"),
        (dict(features=x[:, :4], k=7, method="ivf", nlist=2), r"dim 8 \(cache\) != 4"),
        (dict(features=x[:100], k=7, method="ivf", nlist=2), r"num_samples 120 \(cache\) != 100"),
        (dict(features=x, k=7, method="ivf", nlist=3), r"'nlist': 2.*'nlist': 3"),
        (dict(features=x, k=7, method="ivf", nlist=2, min_sim=0.5), r"'min_sim': None"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=r"knn\.npz: stale kNN cache.*" + message):
            load_or_build_knn(path, **kwargs)
    assert {p: p.read_bytes() for p in path.parent.iterdir()} == files  # never overwritten
    with pytest.raises(TypeError, match=r"unknown build_knn argument\(s\): \['nprobes'\]"):
        load_or_build_knn(path, x, k=7, method="ivf", nprobes=3)
    (tmp_path / "cache" / "knn.npz.json").write_text("{not json")
    with pytest.raises(DataFormatError, match=r"knn\.npz\.json: not a readable JSON"):
        load_or_build_knn(path, x, k=7, method="ivf", nlist=2)


def test_cache_orphan_sidecar_is_rebuilt(tmp_path):
    x = clustered(40, 8, 3, seed=8)
    (tmp_path / "knn.npz.json").write_text("{}")  # left by a build interrupted before the .npz
    graph = load_or_build_knn(tmp_path / "knn.npz", x, k=4, show_progress=False)
    np.testing.assert_array_equal(graph.nbrs, knn_brute_force(x, 4).nbrs)
    assert json.loads((tmp_path / "knn.npz.json").read_text())["k"] == 4


def test_memmap_features(tmp_path):
    x = clustered(3000, 256, 20, seed=9)
    write_features(tmp_path / "raw.bin", x)
    write_features(tmp_path / "unit.bin", unit(x))
    with pytest.raises(ValueError, match="mmap=True needs normalize=False"):
        read_features(tmp_path / "unit.bin", mmap=True)
    mapped = read_features(tmp_path / "unit.bin", mmap=True, normalize=False)
    assert isinstance(mapped, np.memmap) and mapped.shape == (3000, 256)
    reference = build_knn(x, 3, show_progress=False)
    from_map = build_knn(mapped, 3, normalize=False, shard_size=1000, show_progress=False)
    np.testing.assert_array_equal(from_map.nbrs, reference.nbrs)
    np.testing.assert_allclose(from_map.sims, reference.sims, atol=1e-6)
    # normalising a map of raw features works batch by batch: the matrix (3 MB) is never copied
    raw = read_features(tmp_path / "raw.bin", mmap=True, normalize=False)
    tracemalloc.start()
    graph = build_knn(raw, 3, batch_size=300, show_progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 3
    np.testing.assert_array_equal(graph.nbrs, reference.nbrs)


def test_bad_features_name_the_row():
    x = clustered(100, 8, 3, seed=10)
    nan = x.copy()
    nan[[37, 80], 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf values.*\(first: row 37\)"):
        build_knn(nan, 5, batch_size=10, show_progress=False)
    with pytest.raises(ValueError, match=r"NaN or inf values.*\(first: row 37\)"):
        build_knn(nan, 5, "ivf", shard_size=30, show_progress=False)
    zero = x.copy()
    zero[64] = 0
    with pytest.raises(ValueError, match=r"all-zero row.*\(first: row 64\)"):
        build_knn(zero, 5, batch_size=16, show_progress=False)
    assert build_knn(zero, 5, normalize=False, show_progress=False).num_samples == 100
    with pytest.raises(ValueError, match=r"2-D \(N, dim\) array, got shape \(8,\)"):
        build_knn(x[0], 5)
    with pytest.raises(ValueError, match=r"floating point, got int64"):
        build_knn(np.ones((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"features is empty \(0 rows\)"):
        build_knn(np.zeros((0, 8), np.float32), 2)
    for kwargs, message in [
        (dict(k=0), "k must be >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(shard_size=0), "shard_size must be >= 1 or None, got 0"),
        (dict(method="lsh"), "method must be one of flat, ivf, hnsw, got 'lsh'"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_knn(x, **{"k": 5, **kwargs})
    with pytest.raises(ParameterTypeError, match=r"k must be an integer, got float 5\.0"):
        build_knn(x, 5.0)


def test_knn_recall():
    exact = KnnGraph(np.array([[0, 1, 2], [1, 0, -1], [2, -1, -1]]), np.zeros((3, 3), np.float32))
    approx = KnnGraph(np.array([[0, 2, 5], [1, 3, 4], [-1, -1, -1]]), np.zeros((3, 3), np.float32))
    assert knn_recall(approx, exact) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert knn_recall(exact, exact) == 1.0
    missing = KnnGraph(np.array([[0, 1], [-1, -1]]), np.zeros((2, 2), np.float32))
    assert knn_recall(KnnGraph(np.array([[1, 7], [0, 1]]), missing.sims), missing) == 0.5
    with pytest.raises(ValueError, match="same samples, got 2 and 3 rows"):
        knn_recall(missing, exact)
    with pytest.raises(ValueError, match="exact has no neighbours"):
        knn_recall(missing, KnnGraph(np.full((2, 2), -1), missing.sims))


def test_fingerprint():
    x = clustered(5000, 4, 2, seed=11)
    base = features_fingerprint(x)
    assert base.startswith("sha256:") and features_fingerprint(x.copy()) == base
    sampled = x.copy()
    sampled[-1, 0] += 1  # the last row is always sampled
    assert features_fingerprint(sampled) != base
    assert features_fingerprint(x[:4999]) != base


def test_normalize_rows_copies_unless_asked_not_to() -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((20, 8)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    want = raw.astype(np.float64) / np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(normalize_rows(raw), want, atol=1e-6)
    assert normalize_rows(unit) is not unit  # a copy by default
    assert normalize_rows(unit, copy=False) is unit  # already unit rows: no second copy
    for not_unit in (raw, unit.astype(np.float64), np.asfortranarray(unit)):
        got = normalize_rows(not_unit, copy=False)
        assert got is not not_unit and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, atol=1e-6)
    bad = unit.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        normalize_rows(bad, copy=False)


def test_truncate_checks_k():
    graph = KnnGraph(np.array([[0, 1, 2], [1, 0, 2]]), np.ones((2, 3), np.float32))
    assert graph.truncate(np.int64(2)).k == 2
    with pytest.raises(ValueError, match=r"^k must be >= 1 and <= 3, got 4$"):
        graph.truncate(4)
    with pytest.raises(ParameterTypeError, match=r"^k must be an integer, got float 2\.0$"):
        graph.truncate(2.0)
