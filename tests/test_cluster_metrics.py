"""Clustering metrics against brute-force pair counting, per-sample BCubed and scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score

from robustface.cluster.metrics import (
    bcubed,
    cluster_stats,
    evaluate_clustering,
    nmi,
    pairwise,
)


def singletons_for_unassigned(pred: np.ndarray) -> np.ndarray:
    """Each -1 replaced by a fresh id (the metrics' convention), written out plainly."""
    out = np.array(pred, dtype=np.int64)
    fresh = int(out.max(initial=0)) + 1
    for i in range(len(out)):
        if out[i] == -1:
            out[i], fresh = fresh, fresh + 1
    return out


def brute_pairwise(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Precision and recall by enumerating every unordered pair of samples (O(N^2))."""
    same_pred = same_gt = both = 0
    for i, j in itertools.combinations(range(len(gt)), 2):
        sp, sg = pred[i] == pred[j], gt[i] == gt[j]
        same_pred += sp
        same_gt += sg
        both += sp and sg
    return both / same_pred, both / same_gt


def brute_bcubed(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Per-sample BCubed precision and recall, averaged."""
    precision = recall = 0.0
    for i in range(len(gt)):
        in_cluster, in_class = pred == pred[i], gt == gt[i]
        correct = np.sum(in_cluster & in_class)
        precision += correct / in_cluster.sum()
        recall += correct / in_class.sum()
    return precision / len(gt), recall / len(gt)


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def random_labels(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < 0.7, gt * 3 + 11, rng.integers(0, 9, n))  # ids not 0..C-1
    return gt, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force_and_sklearn(seed):
    gt, pred = random_labels(seed)
    p, r = brute_pairwise(gt, pred)
    np.testing.assert_allclose(pairwise(gt, pred), (p, r, f1(p, r)), rtol=1e-12)
    p, r = brute_bcubed(gt, pred)
    np.testing.assert_allclose(bcubed(gt, pred), (p, r, f1(p, r)), rtol=1e-12)
    expected = normalized_mutual_info_score(gt, pred, average_method="arithmetic")
    assert nmi(gt, pred) == pytest.approx(expected, rel=1e-10)


def test_unassigned_pred_are_singletons():
    gt, pred = random_labels(3)
    pred[::4] = -1
    explicit = singletons_for_unassigned(pred)
    p, r = brute_pairwise(gt, explicit)
    np.testing.assert_allclose(pairwise(gt, pred), (p, r, f1(p, r)), rtol=1e-12)
    p, r = brute_bcubed(gt, explicit)
    np.testing.assert_allclose(bcubed(gt, pred), (p, r, f1(p, r)), rtol=1e-12)
    assert nmi(gt, pred) == pytest.approx(normalized_mutual_info_score(gt, explicit), rel=1e-10)
    # all -1 as one cluster would be a different (worse) clustering: the convention matters
    assert pairwise(gt, pred) != pairwise(gt, np.where(pred == -1, 999, pred))


def test_unknown_gt_is_ignored():
    gt, pred = random_labels(4)
    gt[1::5] = -1
    known = gt >= 0
    results = evaluate_clustering(gt, pred)
    reference = evaluate_clustering(gt[known], pred[known])
    for key in ("pairwise_fscore", "bcubed_precision", "bcubed_recall", "nmi", "num_clusters"):
        assert results[key] == reference[key]
    assert results["num_ignored"] == int((~known).sum()) == 12
    assert results["num_samples"] == 60 and results["num_evaluated"] == 48
    p, r = brute_pairwise(gt[known], pred[known])
    assert results["pairwise_precision"] == pytest.approx(p, rel=1e-12)
    assert results["pairwise_recall"] == pytest.approx(r, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 5)), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
def test_label_permutation_invariance(pairs, rnd):
    gt = np.array([g for g, _ in pairs])
    pred = np.array([p for _, p in pairs])
    gt_map = np.array(rnd.sample(range(100, 200), 5))
    pred_map = np.array(rnd.sample(range(10**12, 10**12 + 50), 6))  # huge ids: the sort path
    gt2 = gt_map[gt]
    pred2 = np.where(pred >= 0, pred_map[np.maximum(pred, 0)], -1)
    order = np.array(rnd.sample(range(len(gt)), len(gt)))  # sample order must not matter either
    first, second = evaluate_clustering(gt, pred), evaluate_clustering(gt2[order], pred2[order])
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert second[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # swapping the roles of gt and pred swaps precision and recall
    if (pred >= 0).all():
        p, r, f = pairwise(gt, pred)
        assert pairwise(pred, gt) == pytest.approx((r, p, f))
        p, r, f = bcubed(gt, pred)
        assert bcubed(pred, gt) == pytest.approx((r, p, f))


def test_perfect_and_degenerate_cases():
    gt = np.array([0, 0, 1, 1, 1, 2])
    assert pairwise(gt, gt + 5) == (1.0, 1.0, 1.0)
    assert bcubed(gt, gt + 5) == (1.0, 1.0, 1.0)
    assert nmi(gt, gt + 5) == pytest.approx(1.0)
    # every sample alone: no predicted pair, so precision 1 by definition and recall 0
    alone = np.full(6, -1)
    assert pairwise(gt, alone) == (1.0, 0.0, 0.0)
    # BCubed: precision 1 per sample, recall 1/|G(x)|: (2 * 1/2 + 3 * 1/3 + 1) / 6 = 1/2
    assert bcubed(gt, alone) == pytest.approx((1.0, 0.5, 2 / 3))
    # distinct identities and distinct clusters: no pairs anywhere
    assert pairwise(np.arange(4), np.arange(4)) == (1.0, 1.0, 1.0)
    # one identity, one cluster: sklearn's NMI is 1, pairwise and BCubed are perfect
    ones = np.zeros(5, dtype=np.int64)
    assert nmi(ones, ones + 3) == 1.0 == normalized_mutual_info_score(ones, ones + 3)
    assert pairwise(ones, ones) == (1.0, 1.0, 1.0)
    # one cluster against many identities: MI 0
    assert nmi(gt, np.zeros(6, dtype=np.int64)) == 0.0
    assert pairwise(gt, np.zeros(6, dtype=np.int64))[0] == pytest.approx(4 / 15)
    # a single sample
    assert evaluate_clustering(np.array([3]), np.array([-1]))["pairwise_fscore"] == 1.0


def test_evaluate_clustering_keys_and_stats():
    gt = np.array([0, 0, 0, 1, 1, 2, -1, -1])
    pred = np.array([4, 4, -1, 7, 7, 7, 4, -1])
    results = evaluate_clustering(gt, pred)
    p, r = brute_pairwise(gt[:6], singletons_for_unassigned(pred[:6]))
    assert results["pairwise_precision"] == pytest.approx(p)
    assert results["pairwise_recall"] == pytest.approx(r)
    expected = {
        "num_samples": 8,
        "num_ignored": 2,
        "num_evaluated": 6,
        "num_gt_clusters": 3,
        "num_clusters": 3,  # {4: 2 samples}, {7: 3}, one unassigned
        "num_singletons": 1,
        "num_unassigned": 1,
        "largest_cluster": 3,
        "mean_cluster_size": 2.0,
    }
    assert {k: results[k] for k in expected} == expected
    assert set(results) == set(expected) | {
        f"{m}_{q}" for m in ("pairwise", "bcubed") for q in ("precision", "recall", "fscore")
    } | {"nmi"}


def test_cluster_stats():
    stats = cluster_stats(np.array([5, 5, 5, 9, -1, -1, 2, 2]))
    assert stats == {
        "num_samples": 8,
        "num_clusters": 5,
        "num_singletons": 3,
        "num_unassigned": 2,
        "largest_cluster": 3,
        "mean_cluster_size": 8 / 5,
    }
    empty = cluster_stats(np.zeros(0, dtype=np.int64))
    assert empty["num_clusters"] == 0 and empty["mean_cluster_size"] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match=r"one length, got 3 gt and 2 pred"):
        pairwise(np.array([0, 1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"pred must hold integer labels, got dtype float64"):
        bcubed(np.array([0, 1]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"gt must be a 1-D array"):
        nmi(np.zeros((2, 2), dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"below -1 \(first: gt\[2\] = -3\)"):
        evaluate_clustering(np.array([0, 1, -3, -2]), np.array([0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"pred\[0\] = -2"):
        cluster_stats(np.array([-2]))
    with pytest.raises(ValueError, match=r"no sample with a known identity \(3 labels, all -1\)"):
        pairwise(np.full(3, -1), np.arange(3))
    with pytest.raises(ValueError, match=r"no sample with a known identity \(0 labels"):
        evaluate_clustering(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match=r"pred must hold integer labels, got dtype bool"):
        pairwise(np.array([0, 1]), np.array([True, False]))
