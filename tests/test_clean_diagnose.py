"""benchmarks/clean_diagnose.py: the confusion counts and centre statistics on a hand-made case."""

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from robustface.clean.dirty import Truth


def test_diagnose_counts_by_hand():
    """Eight samples, 4 classes, class 3 a duplicate of class 1; every count written out."""
    bench = load_benchmark("clean_diagnose")
    # kinds: 0 clean, 1 closed, 2 open, 6 duplicate; flags: 0 clean, 1 hard, 2 mislabeled, 3 open
    kind = np.array([0, 0, 1, 1, 2, 6, 6, 0])
    truth = Truth(
        kind=kind,
        label=np.array([0, 0, 0, 1, 2, 3, 3, 1]),
        true_label=np.array([0, 0, 2, 0, -1, 1, 1, 1]),
        identity=np.arange(8),
        quality=np.ones(8, dtype=np.float32),
        hard=np.array([False, True, False, False, False, False, False, False]),
        duplicate_of=np.array([-1, -1, -1, 1]),
    )
    scores = {
        "flag": np.array([0, 1, 2, 3, 2, 2, 0, 2]),
        "label": truth.label,
        "other_class": np.array([1, 2, 2, 2, 3, 1, 0, 3]),
        "angle_own": np.array([10, 30, 80, 70, 60, 50, 20, 50], dtype=np.float32),
        "angle_other": np.array([20, 25, 15, 40, 35, 30, 40, 40], dtype=np.float32),
        "knn_label": np.array([0, 0, 2, 1, 3, 1, 3, 3]),
    }
    d = bench.diagnose(scores, truth)
    rows = dict(zip(bench.ROWS, d["confusion"], strict=True))
    assert rows["clean (easy)"] == [1, 0, 1, 0, 0, 0, 0]  # sample 0 clean, sample 7 mislabeled
    assert rows["clean (hard)"] == [0, 1, 0, 0, 0, 0, 0]
    assert rows["closed"] == [0, 0, 1, 1, 0, 0, 0]
    assert rows["open"] == [0, 0, 1, 0, 0, 0, 0]
    assert rows["duplicate"] == [1, 0, 1, 0, 0, 0, 0]
    assert rows["sketch"] == rows["nonface"] == rows["low_quality"] == [0] * 7
    mis = dict(zip(bench.ROWS, d["mislabeled"], strict=True))
    # sample 7 (class 1, twin 3) and sample 5 (class 3, twin 1) point at their twins
    assert mis["clean (easy)"] == [1, 1, 1]
    assert mis["duplicate"] == [1, 1, 1]
    assert mis["closed"] == mis["open"] == [1, 0, 0]
    assert d["clean_own_nearest"] == pytest.approx(1 / 3)  # only sample 0 of 0, 1, 7
    assert d["easy_own_nearest"] == pytest.approx(1 / 2)
    assert d["hard_own_nearest"] == 0.0
    assert d["closed_true_other"] == pytest.approx(1 / 2)  # sample 2, not sample 3
    assert d["closed_true_knn"] == pytest.approx(1 / 2)
    assert d["duplicate_twin_other"] == pytest.approx(1 / 2)  # sample 5, not sample 6
    assert d["closed_angle_true"] == pytest.approx(15.0)
    assert d["clean_angle_own"] == pytest.approx(30.0)  # median of 10, 30, 50


def test_reflag_is_the_rules_on_the_stored_columns():
    """``--reflag`` gives the flags that choose_thresholds + flag_samples give on the columns."""
    from robustface.clean.score import Scores, choose_thresholds, flag_samples

    bench = load_benchmark("clean_diagnose")
    rng = np.random.default_rng(0)
    n = 400
    table = Scores(
        label=rng.integers(0, 10, n),
        angle_own=rng.normal(30, 8, n).astype(np.float32),
        angle_other=rng.normal(60, 8, n).astype(np.float32),
        other_class=rng.integers(0, 10, n),
        knn_purity=rng.uniform(0, 1, n).astype(np.float32),
        knn_label=rng.integers(0, 10, n),
        knn_share=rng.uniform(0, 1, n).astype(np.float32),
        norm=rng.normal(20, 3, n).astype(np.float32),
        crfiqa=rng.uniform(0, 1, n).astype(np.float32),
        stroke=rng.normal(2, 0.3, n).astype(np.float32),
        tones=rng.normal(6, 0.5, n).astype(np.float32),
        colour=rng.normal(3, 0.3, n).astype(np.float32),
        skin=rng.uniform(0, 1, n).astype(np.float32),
    )
    expected = flag_samples(table, choose_thresholds(table)).flag
    stored = {**table.arrays(), "flag": np.zeros(n, dtype=np.int8)}  # stale flags are ignored
    assert np.array_equal(bench.reflag(stored), expected)
    assert len(set(expected.tolist())) > 2
