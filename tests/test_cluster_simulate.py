"""The face-embedding cluster simulator and the simulated learn-to-cluster benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robustface.cluster.dataset import load_cluster_set
from robustface.cluster.simulate import (
    SimulationParams,
    simulate_features,
    write_benchmark,
    write_simulated,
)

SMALL = {"dim": 32, "nuisance_dim": 4, "mean_size": 12.0, "max_size": 60}
"""Small and fast, but every mechanism (modes, low quality, outliers, siblings) switched on."""
CLEAN = {
    "mode_rate": 0.0,
    "lowq_rate": 0.0,
    "outlier_rate": 0.0,
    "group_cos": 0.0,
    "sample_sigma": 0.0,
}
"""One mode per identity around its centre, no low-quality samples or outliers."""


def _centroids(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    sums = np.zeros((labels.max() + 1, feats.shape[1]))
    np.add.at(sums, labels, feats.astype(np.float64))
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def test_deterministic_per_seed_and_unit_rows():
    a = simulate_features(20, seed=3, **SMALL)
    b = simulate_features(20, seed=3, **SMALL)
    c = simulate_features(20, seed=4, **SMALL)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.features.shape != c.features.shape or not np.array_equal(a.features, c.features)
    assert a.features.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(a.features, axis=1), 1.0, atol=1e-5)
    # labels 0..C-1, identity by identity, each identity contiguous
    assert np.array_equal(np.unique(a.labels), np.arange(20))
    assert np.all(np.diff(a.labels) >= 0)


def test_train_and_test_splits_are_different_identities():
    train = simulate_features(10, split="train", **SMALL)
    test = simulate_features(10, split="test", **SMALL)
    cross = _centroids(train.features, train.labels) @ _centroids(test.features, test.labels).T
    assert cross.max() < 0.9  # no test identity is a train identity


def test_chunked_writing_equals_in_memory(tmp_path):
    count = write_simulated(
        tmp_path, "sim", 23, seed=5, chunk_identities=4, show_progress=False, **SMALL
    )
    memory = simulate_features(23, seed=5, **SMALL)
    raw = np.fromfile(tmp_path / "features" / "sim.bin", dtype="<f4").reshape(-1, 32)
    meta = np.array((tmp_path / "labels" / "sim.meta").read_text().split(), dtype=np.int64)
    assert count == memory.num_samples == len(raw)
    np.testing.assert_array_equal(raw, memory.features)
    np.testing.assert_array_equal(meta, memory.labels)


def test_nested_sets_share_their_first_identities():
    small = simulate_features(7, **SMALL)
    large = simulate_features(15, **SMALL)
    np.testing.assert_array_equal(large.features[: small.num_samples], small.features)


def test_sizes_long_tailed_with_the_requested_mean():
    cs = simulate_features(4000, dim=4, nuisance_dim=2, mode_rate=0.0)
    sizes = np.bincount(cs.labels)
    assert abs(sizes.mean() - 68) / 68 < 0.05
    assert sizes.max() / np.median(sizes) > 8  # a heavy tail: a few very large identities
    assert np.mean(sizes < sizes.mean()) > 0.6  # most identities are smaller than the mean
    assert sizes.min() >= 2 and sizes.max() <= 1000


def test_size_log_mean_solves_the_clipped_mean():
    params = SimulationParams(mean_size=40.0, size_sigma=1.2, min_size=5, max_size=300)
    mu = params.size_log_mean()
    draws = np.random.default_rng(0).lognormal(mu, 1.2, size=2_000_000)
    assert np.clip(draws, 5, 300).mean() == pytest.approx(40.0, rel=2e-3)


def test_sibling_centres_have_the_stated_cosine():
    cs = simulate_features(
        150,
        seed=1,
        sibling_rate=0.3,
        sibling_cos=(0.5, 0.7),
        within_cos=(0.7, 0.8),
        mean_size=60.0,
        min_size=40,
        max_size=100,
        **CLEAN,
    )
    cos = _centroids(cs.features, cs.labels) @ _centroids(cs.features, cs.labels).T
    pairs = cos[np.triu_indices(150, 1)]
    # unrelated centres in 256-d: |cos| ~ 0.06; a sibling and its root: cos in [0.5, 0.7];
    # two siblings of one root: at most 0.7 * 0.7 = 0.49
    related = pairs[pairs > 0.495]
    assert 25 <= related.size <= 65  # about 0.3 * 149 siblings
    assert related.min() > 0.49 and related.max() < 0.72
    assert np.quantile(related, 0.2) < 0.56 and np.quantile(related, 0.8) > 0.64  # spread out
    assert np.quantile(pairs[pairs < 0.2], 0.99) < 0.2


def test_outlier_fraction():
    cs = simulate_features(
        200,
        seed=2,
        dim=64,
        nuisance_dim=4,
        outlier_rate=0.1,
        within_cos=(0.6, 0.8),
        **{k: v for k, v in CLEAN.items() if k != "outlier_rate"},
    )
    cos_to_centre = np.einsum(
        "ij,ij->i", cs.features, _centroids(cs.features, cs.labels)[cs.labels]
    )
    far = cos_to_centre < 0.5  # clean samples sit at cos 0.6-1, outliers near 0
    assert abs(far.mean() - 0.1) < 0.015
    assert not np.any((cos_to_centre > 0.45) & (cos_to_centre < 0.55))  # two separate groups


def test_low_quality_samples_of_different_people_embed_alike():
    kwargs = {k: v for k, v in CLEAN.items() if k != "lowq_rate"}
    kwargs.update(seed=3, dim=64, nuisance_dim=4, lowq_rate=0.3, lowq_modes=1, sibling_rate=0.0)
    cs = simulate_features(100, lowq_pull=2.0, **kwargs)
    i, j = np.random.default_rng(0).integers(cs.num_samples, size=(2, 100_000))
    other = cs.labels[i] != cs.labels[j]
    cos = np.einsum("ij,ij->i", cs.features[i[other]], cs.features[j[other]])
    # two low-quality samples (probability 0.3 ** 2) share the pull: cos ~ 4 / (4 + 1 + noise)
    assert abs(np.mean(cos > 0.4) - 0.09) < 0.015
    pulled_apart = simulate_features(100, lowq_pull=0.0, **kwargs)
    cos0 = np.einsum("ij,ij->i", pulled_apart.features[i], pulled_apart.features[j])
    assert np.mean(cos0[pulled_apart.labels[i] != pulled_apart.labels[j]] > 0.4) < 0.002


def test_default_statistics_stay_calibrated():
    cs = simulate_features(150, seed=0)
    rng = np.random.default_rng(0)
    i, j = rng.integers(cs.num_samples, size=(2, 200_000))
    cos = np.einsum("ij,ij->i", cs.features[i], cs.features[j])
    same = (cs.labels[i] == cs.labels[j]) & (i != j)
    assert 0.35 < cos[same].mean() < 0.6
    between = cos[cs.labels[i] != cs.labels[j]]
    assert abs(between.mean()) < 0.03 and 0.05 < between.std() < 0.1


def test_write_benchmark_layout_nesting_and_overwrite(tmp_path):
    root = tmp_path / "data"
    kwargs = {"train_identities": 5, "test_identities": 4, "seed": 9, "show_progress": False}
    meta = write_benchmark(root, scales=(3, 1), **kwargs, **SMALL)
    assert sorted(p.name for p in root.iterdir()) == ["README", "features", "labels", "meta.json"]
    assert json.loads((root / "meta.json").read_text()) == meta
    assert meta["params"]["dim"] == 32 and meta["seed"] == 9
    assert {k: v["identities"] for k, v in meta["sets"].items()} == {
        "part0_train": 5,
        "part1_test": 4,
        "part3_test": 12,
    }
    part1 = load_cluster_set(root, "part1_test", dim=32, normalize=False, require_labels=True)
    part3 = load_cluster_set(root, "part3_test", dim=32, normalize=False, require_labels=True)
    train = load_cluster_set(root, "part0_train", dim=32, normalize=False, require_labels=True)
    assert meta["sets"]["part3_test"]["samples"] == part3.num_samples
    np.testing.assert_array_equal(part3.features[: part1.num_samples], part1.features)
    expected = simulate_features(12, seed=9, **SMALL)
    np.testing.assert_array_equal(part3.features, expected.features)
    np.testing.assert_array_equal(part3.labels, expected.labels)
    np.testing.assert_array_equal(
        train.features, simulate_features(5, seed=9, split="train", **SMALL).features
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        write_benchmark(root, **kwargs, **SMALL)
    write_benchmark(root, overwrite=True, **kwargs, **SMALL)
    assert not (tmp_path / "data.partial").exists()
    assert not (root / "features" / "part3_test.bin").exists()  # replaced as a whole


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="nuisance_var must be <= 1 / within_cos"):
        SimulationParams(nuisance_var=0.5)
    with pytest.raises(ValueError, match=r"within_cos must be \(lo, hi\)"):
        SimulationParams(within_cos=(0.8, 0.5))
    with pytest.raises(ValueError, match="mean_size must be in"):
        SimulationParams(mean_size=1.0)
    with pytest.raises(TypeError, match="bogus"):
        simulate_features(3, bogus=1)
    with pytest.raises(ValueError, match="num_identities must be >= 1"):
        simulate_features(0)
    with pytest.raises(ValueError, match="split must be one of train, test"):
        simulate_features(3, split="val", **SMALL)
    with pytest.raises(ValueError, match="chunk_identities must be >= 1"):
        write_simulated(tmp_path, "x", 3, chunk_identities=0, show_progress=False, **SMALL)
    with pytest.raises(ValueError, match=r"scales must be distinct values from \[1, 3, 5, 7, 9\]"):
        write_benchmark(tmp_path / "b", scales=(2,), **SMALL)
    assert not (tmp_path / "b").exists()
