"""Per-sample scores against brute force, thresholds without the truth, flags on planted cases,
precision/recall against hand counts."""

import collections
import dataclasses
import json
import re
import time

import numpy as np
import pytest

import robustface.clean.score as score_module
from robustface.clean.dirty import Truth, load_truth, make_dirty_synthface
from robustface.clean.evaluate import evaluate_cumulative, evaluate_flags, evaluation_table
from robustface.clean.score import (
    FLAGS,
    IMAGE_STATS,
    Scores,
    StageTimer,
    Thresholds,
    choose_thresholds,
    compute_scores,
    far_tail,
    flag_samples,
    gmm_crossing,
    image_stats,
    knn_settings,
    merge_candidates,
    read_flags_csv,
    score_to_dir,
    split_candidates,
)
from robustface.cli import main
from robustface.errors import DataFormatError
from synth_configs import TINY_DIRTY, train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3])
def test_scores_match_brute_force(k, monkeypatch):
    # chunks of 16 rows: the dominant sub-centre and the nearest other class cross chunk bounds
    monkeypatch.setattr(score_module, "_CHUNK", 16)
    rng = np.random.default_rng(k)
    n, c, d, knn = 60, 5, 8, 4
    emb = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    weight = rng.normal(size=(c * k, d)).astype(np.float32)
    norms = rng.uniform(1, 9, n)
    s = compute_scores(emb, labels, weight, k, norms=norms, knn=knn)
    e, w = _unit(emb.astype(np.float64)), _unit(weight.astype(np.float64))
    cos = e @ w.T  # (n, c*k)
    # dominant sub-centre: the one most of the class's samples are nearest to (ties: lowest)
    nearest = [int(np.argmax(cos[i, labels[i] * k : labels[i] * k + k])) for i in range(n)]
    for i in range(n):
        votes = [sum(1 for j in range(n) if labels[j] == labels[i] and nearest[j] == m)
                 for m in range(k)]  # fmt: skip
        dom = int(np.argmax(votes))
        own = cos[i, labels[i] * k + dom]
        others = [(max(cos[i, cc * k : cc * k + k]), cc) for cc in range(c) if cc != labels[i]]
        best, best_class = max(others, key=lambda t: (t[0], -t[1]))
        assert s.angle_own[i] == pytest.approx(np.degrees(np.arccos(own)), abs=1e-3)
        assert s.angle_other[i] == pytest.approx(np.degrees(np.arccos(best)), abs=1e-3)
        assert s.other_class[i] == best_class
        assert s.crfiqa[i] == pytest.approx(own / (best + 1.0), rel=1e-4)
        sims = e @ e[i]
        sims[i] = -np.inf
        nbrs = np.argsort(-sims, kind="stable")[:knn]
        assert s.knn_purity[i] == pytest.approx(np.mean(labels[nbrs] == labels[i]))
        counts = collections.Counter(labels[nbrs].tolist())
        top = max(counts.values())
        assert s.knn_label[i] == min(lab for lab, v in counts.items() if v == top)
        assert s.knn_share[i] == pytest.approx(top / knn)
    np.testing.assert_allclose(s.norm, norms, rtol=1e-6)
    np.testing.assert_allclose(s.margin, s.angle_other - s.angle_own)


def _clustered(n, c, d, seed=0):
    """Unit embeddings near ``c`` random centres, a tenth of the labels replaced at random."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(c, d)))
    truth = rng.integers(0, c, n)
    emb = (centres[truth] + 0.4 * rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
    labels = np.where(rng.random(n) < 0.1, rng.integers(0, c, n), truth)
    return emb, labels, centres.astype(np.float32)


def test_ivf_probing_every_list_matches_flat():
    emb, labels, centres = _clustered(1500, 12, 16)
    flat = compute_scores(emb, labels, centres, knn=8, knn_method="flat")
    ivf = compute_scores(emb, labels, centres, knn=8, knn_method="ivf",
                         knn_params={"nlist": 8, "nprobe": 8})  # fmt: skip
    auto = compute_scores(emb, labels, centres, knn=8)  # 1,500 < 200K: exact
    for other in (ivf, auto):
        np.testing.assert_array_equal(other.knn_purity, flat.knn_purity)
        np.testing.assert_array_equal(other.knn_label, flat.knn_label)
        np.testing.assert_array_equal(other.knn_share, flat.knn_share)
    assert 0.5 < flat.knn_purity.mean() < 0.95  # the planted noise shows
    # one probed list of 8 misses neighbours: the purity then differs somewhere
    one = compute_scores(emb, labels, centres, knn=8, knn_method="ivf",
                         knn_params={"nlist": 8, "nprobe": 1})  # fmt: skip
    assert not np.array_equal(one.knn_purity, flat.knn_purity)


def test_knn_settings_choice_and_errors():
    assert knn_settings(199_999) == ("flat", {})
    assert knn_settings(200_000, "auto", {"nprobe": 16, "hnsw_m": 8}) == ("ivf", {"nprobe": 16})
    assert knn_settings(10, "hnsw", {"ef_search": 64}) == ("hnsw", {"ef_search": 64})
    emb, labels, centres = _clustered(100, 4, 8)
    with pytest.raises(ValueError, match="knn_method must be one of"):
        compute_scores(emb, labels, centres, knn_method="kmeans")
    with pytest.raises(ValueError, match=r"knn_params\.nprobe"):
        compute_scores(emb, labels, centres, knn_method="ivf", knn_params={"nprobe": 0})
    with pytest.raises(ValueError, match=r"knn_params\.nprobe does not apply to knn_method 'flat'"):
        compute_scores(emb, labels, centres, knn_method="flat", knn_params={"nprobe": 4})
    with pytest.raises(ValueError, match="unknown parameter 'probes'"):
        compute_scores(emb, labels, centres, knn_params={"probes": 4})


def test_missing_neighbours_elect_no_label(monkeypatch):
    import robustface.cluster.knn as knn_module

    labels = np.array([0, 0, 1, 1])
    nbrs = np.array([[0, 1, -1], [1, -1, -1], [2, 0, 3], [3, -1, -1]])
    sims = np.where(nbrs >= 0, 1.0, -np.inf).astype(np.float32)
    monkeypatch.setattr(knn_module, "build_knn", lambda *a, **kw: knn_module.KnnGraph(nbrs, sims))
    emb = np.eye(4, dtype=np.float32)
    s = compute_scores(emb, labels, np.eye(4, dtype=np.float32)[:2], knn=2)
    assert s.knn_purity.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert s.knn_label.tolist() == [0, -1, 0, -1]  # ties go to the lower label
    assert s.knn_share.tolist() == [0.5, 0.0, 0.5, 0.0]


def test_gmm_crossing_finds_the_gap_and_refuses_one_mode():
    rng = np.random.default_rng(0)
    bulk, tail = rng.normal(30, 4, 900), rng.normal(80, 6, 100)
    t = gmm_crossing(np.concatenate([bulk, tail]))
    assert 40 < t < 65
    assert gmm_crossing(rng.normal(30, 4, 1000)) is None
    assert gmm_crossing(np.ones(50)) is None and gmm_crossing(np.arange(5.0)) is None


def test_gmm_crossing_finds_no_tail_in_a_skewed_bulk():
    # a skewed bulk with no tail: a 2-component mixture still fits better (by BIC) with a minority
    # upper component, but the components overlap (Ashman's D < 2): no threshold
    rng = np.random.default_rng(0)
    skewed = rng.lognormal(3.4, 0.3, 3000)
    assert gmm_crossing(skewed) is None
    # the same bulk with a separate tail of 15% keeps its threshold, above the bulk
    t = gmm_crossing(np.concatenate([skewed, rng.normal(110, 8, 500)]))
    assert t is not None and np.quantile(skewed, 0.97) < t < 100
    # scored samples with these angles: no tail, so the round cuts nothing of the bulk (the
    # robust bound median + 3 MAD is above 98% of it; the mixture alone cut at 41 deg, 15%)
    scores, _ = _planted()
    n = skewed.size
    many = dataclasses.replace(
        scores,
        **{f.name: np.resize(getattr(scores, f.name), n) for f in dataclasses.fields(scores)},
    )
    many.angle_own = skewed.astype(np.float32)
    many.angle_other = np.full(n, 120.0, np.float32)
    chosen = choose_thresholds(many)
    assert chosen.source["angle_own"] == "median+3MAD"
    assert np.mean(skewed > chosen.angle_own) < 0.02


def test_image_statistics_of_planted_images():
    size = 64
    skin = np.full((size, size, 3), (200, 150, 120), np.uint8)  # Y 161.5, Cr 155.4, Cb 104.6
    lines = np.full((size, size, 3), 255, np.uint8)
    lines[::8] = 0  # 8 of 64 rows black: two grey tones
    wall = np.full((size, size, 3), 128, np.uint8)
    texture = np.kron(np.random.default_rng(0).integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1)))
    stats = {name: image_stats(im.astype(np.uint8))
             for name, im in (("skin", skin), ("lines", lines), ("wall", wall),
                              ("texture", texture))}  # fmt: skip
    assert list(IMAGE_STATS) == ["stroke", "tones", "colour", "skin"]
    # tones: entropy of the grey histogram; the lines have shares 1/8 and 7/8
    h = -(1 / 8 * np.log2(1 / 8) + 7 / 8 * np.log2(7 / 8))
    assert stats["lines"][1] == pytest.approx(h, abs=1e-5)
    assert stats["wall"][1] == 0.0 and stats["skin"][1] == 0.0
    # colour: log(1 + M), M = hypot(std rg, std yb) + 0.3 hypot(mean rg, mean yb)
    m = 0.3 * np.hypot(200 - 150, 0.5 * (200 + 150) - 120)
    assert stats["skin"][2] == pytest.approx(np.log1p(m), rel=1e-5)
    assert stats["wall"][2] == 0.0 and stats["texture"][2] > stats["skin"][2]
    # skin: the whole centre of the skin image, none of the others
    assert stats["skin"][3] == 1.0 and stats["lines"][3] == stats["wall"][3] == 0.0
    # stroke: log10(1 + variance of the Laplacian); a flat image has none
    assert stats["wall"][0] == 0.0 and stats["lines"][0] > 3.0


def _planted() -> tuple[Scores, Thresholds]:
    """One sample per rule, in FLAGS order, and thresholds that make each fire."""
    rows = {
        # (angle_own, angle_other, knn_label, knn_share, norm, stroke, tones, colour, skin)
        "clean": (20, 70, 0, 0.9, 10, 2.0, 6.5, 3.5, 0.8),
        "hard": (40, 70, 0, 0.9, 10, 2.0, 6.5, 3.5, 0.8),
        "mislabeled": (80, 25, 3, 0.8, 10, 2.0, 6.5, 3.5, 0.8),
        "open_set": (80, 70, 5, 0.3, 10, 2.0, 6.5, 3.5, 0.8),
        "low_quality": (25, 70, 0, 0.9, 2, 2.0, 6.5, 3.5, 0.8),
        "nonface": (100, 95, 4, 0.3, 10, 2.0, 6.5, 3.5, 0.8),
        "sketch": (30, 60, 0, 0.9, 10, 4.5, 6.5, 3.5, 0.8),
    }
    values = np.array(list(rows.values()), dtype=np.float64)
    n = len(rows)
    scores = Scores(
        label=np.zeros(n, np.int64),
        angle_own=values[:, 0].astype(np.float32),
        angle_other=values[:, 1].astype(np.float32),
        other_class=np.full(n, 3),
        knn_purity=np.zeros(n, np.float32),
        knn_label=values[:, 2].astype(np.int64),
        knn_share=values[:, 3].astype(np.float32),
        norm=values[:, 4].astype(np.float32),
        crfiqa=np.zeros(n, np.float32),
        stroke=values[:, 5].astype(np.float32),
        tones=values[:, 6].astype(np.float32),
        colour=values[:, 7].astype(np.float32),
        skin=values[:, 8].astype(np.float32),
    )
    t = Thresholds(angle_own=60, angle_hard=35, angle_member=30, angle_any=90, norm_low=5,
                   norm_floor=4, stroke=4.0, stroke_soft=3.0, knn_share=0.5, angle_any_soft=50,
                   stroke_tones=2.5, tones_low=5.0, skin_low=0.3, colour_low=2.0,
                   colour_high=4.5)  # fmt: skip
    return scores, t


def test_each_flag_on_a_planted_case():
    scores, t = _planted()
    flags = flag_samples(scores, t)
    assert flags.names().tolist() == list(FLAGS)
    assert flags.suggested.tolist() == [-1, -1, 3, -1, -1, -1, -1]
    assert flags.removed.tolist() == [False, False, True, True, True, True, True]
    # an off-centre sample with a low norm is low quality, not open-set
    scores.norm[3] = 3
    assert flag_samples(scores, t).names()[3] == "low_quality"
    # the kNN majority alone names a mislabel when it is also the nearest other class
    scores.angle_other[2] = 70
    flags = flag_samples(scores, t)
    assert flags.names()[2] == "mislabeled" and flags.suggested[2] == 3
    scores.other_class[2] = 4
    assert flag_samples(scores, t).names()[2] == "open_set"


def _no_skin_set(scores, rng, n=2000):
    """``scores`` repeated to ``n`` rows: 15% without skin, all faces 30 +- 5 deg from their
    centre, no drawings, an ordinary colourfulness."""
    many = dataclasses.replace(
        scores,
        **{f.name: np.resize(getattr(scores, f.name), n) for f in dataclasses.fields(scores)},
    )
    many.skin = rng.uniform(0.5, 1.0, n).astype(np.float32)
    many.skin[:300] = rng.uniform(0.0, 0.05, 300)
    many.colour = rng.normal(3.5, 0.3, n).astype(np.float32)
    many.stroke = np.full(n, 2.0, np.float32)
    many.angle_own = rng.normal(30, 5, n).astype(np.float32)
    many.angle_other = np.full(n, 120.0, np.float32)
    return many


def test_image_statistic_rules_on_planted_cases():
    scores, t = _planted()
    # a near-centre face with strong strokes and few tones is a drawing; either alone is not
    scores.stroke[0], scores.tones[0] = 3.0, 4.0
    scores.stroke[1], scores.tones[1] = 3.0, 6.0
    scores.stroke[4], scores.tones[4] = 2.0, 4.0
    names = flag_samples(scores, t).names()
    assert (names[0], names[1], names[4]) == ("sketch", "hard", "low_quality")
    # no skin where the face should be: a non-face when also far from every centre (> 50 deg)
    # or of an outlying colourfulness (outside [2, 4.5]); no skin alone is not enough
    scores, t = _planted()
    scores.skin[:] = 0.1
    scores.colour[1] = 5.0  # hard row: very colourful
    scores.colour[4] = 1.0  # low-quality row: hardly any colour (a blank wall)
    names = flag_samples(scores, t).names()
    # the open-set row (every centre >= 70 deg) is now a non-face, the mislabel (25 deg) is not
    assert names.tolist() == ["clean", "nonface", "mislabeled", "nonface", "nonface",
                              "nonface", "sketch"]  # fmt: skip
    scores.angle_own[0], scores.angle_other[0] = 52, 55  # every centre > 50 deg away
    assert flag_samples(scores, t).names()[0] == "nonface"
    # the no-skin rules are on only when the no-skin samples have a separate far tail
    rng = np.random.default_rng(0)
    many = _no_skin_set(scores, rng)
    chosen = choose_thresholds(many)
    assert chosen.skin_low is not None and 0.05 < chosen.skin_low < 0.5
    assert chosen.angle_any_soft is None and chosen.colour_high is None
    nonface = flag_samples(many, chosen).names() == "nonface"  # only by the hard angle rule
    assert np.array_equal(nonface, many.angle_any > chosen.angle_any) and nonface.sum() < 10
    many.angle_own[:100] = rng.normal(80, 5, 100)  # a third of them far from every centre
    chosen = choose_thresholds(many)
    assert chosen.angle_any_soft is not None and chosen.colour_high is not None
    nonface = flag_samples(many, chosen).names() == "nonface"
    assert nonface[:100].all()
    soft = (many.skin < chosen.skin_low) & (many.angle_any > chosen.angle_any_soft)
    colour = (many.skin < chosen.skin_low) & (
        (many.colour < chosen.colour_low) | (many.colour > chosen.colour_high)
    )
    assert np.array_equal(nonface, soft | colour | (many.angle_any > chosen.angle_any))
    # statistics that were not measured (NaN) get no threshold and never fire
    scores, _ = _planted()
    bare = dataclasses.replace(scores, tones=None, colour=None, skin=None)
    assert np.isnan(bare.skin).all() and len(bare.skin) == len(scores)
    chosen = choose_thresholds(bare)
    assert chosen.skin_low is None and chosen.tones_low is None and chosen.colour_high is None
    scores.skin[:] = np.nan
    assert flag_samples(scores, t).names().tolist() == list(FLAGS)


def test_thresholds_out_of_range_are_clear_errors():
    scores, _ = _planted()
    with pytest.raises(ValueError, match=r"thresholds\.angle_own"):
        choose_thresholds(scores, {"angle_own": 200})
    with pytest.raises(ValueError, match=r"angle_hard .* must be <= .*angle_own"):
        choose_thresholds(scores, {"angle_own": 30, "angle_hard": 50, "angle_member": 20})
    with pytest.raises(ValueError, match="unknown threshold 'angel_own'") as info:
        choose_thresholds(scores, {"angel_own": 30})
    assert str(info.value).endswith("colour_low, colour_high, tones_low, knn_share")
    with pytest.raises(ValueError, match=r"thresholds\.knn_share"):
        choose_thresholds(scores, {"knn_share": 1.5})
    with pytest.raises(
        ValueError, match=r"colour_low \(5\) must be <= thresholds\.colour_high \(1\)"
    ):
        choose_thresholds(scores, {"colour_low": 5, "colour_high": 1})


def test_merge_and_split_candidates_on_planted_classes():
    rng = np.random.default_rng(0)
    d, per, c_all = 16, 10, 30
    centres = _unit(rng.normal(size=(c_all, d)))
    centres[5] = centres[2]  # class 5 is class 2's person
    emb, labels = [], []
    for c in range(c_all):
        emb.append(centres[c] + 0.05 * rng.normal(size=(per, d)))
        labels += [c] * per
    # class 0 holds two people: half its samples sit around a far direction
    far = _unit(rng.normal(size=(1, d)))[0]
    emb[0][: per // 2] = far + 0.05 * rng.normal(size=(per // 2, d))
    emb, labels = _unit(np.concatenate(emb)).astype(np.float32), np.asarray(labels)
    merges, min_cos = merge_candidates(emb, labels, c_all)
    assert [(a, b) for a, b, _ in merges] == [(2, 5)] and 0.5 <= min_cos < 1
    splits = split_candidates(emb, labels, c_all)
    assert [c for c, _, _ in splits] == [0]
    assert splits[0][2] == pytest.approx(0.5)


def test_precision_recall_against_hand_counts():
    #         clean clean closed closed open lowq sketch nonface dup  clean(hard)
    kind = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 0], np.int8)
    flag_names = ["clean", "mislabeled", "mislabeled", "open_set", "open_set",
                  "clean", "sketch", "sketch", "hard", "hard"]  # fmt: skip
    flag = np.array([FLAGS.index(f) for f in flag_names], np.int8)
    suggested = np.array([-1, 4, 7, -1, -1, -1, -1, -1, -1, -1])
    truth = Truth(
        kind=kind,
        label=np.zeros(10, np.int64),
        true_label=np.array([0, 0, 7, 2, -1, 0, 0, -1, 1, 0]),
        identity=np.zeros(10, np.int64),
        quality=np.ones(10, np.float32),
        hard=np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool),
        duplicate_of=np.array([-1, -1, -1, -1, -1, -1, -1, -1, 1]),
    )
    r = evaluate_flags(flag, suggested, truth, merges=[(1, 8, 0.9), (2, 3, 0.8)])
    # closed: flagged mislabeled 2 (one clean, one closed) -> P 1/2; 2 closed, 1 found -> R 1/2
    assert (r["closed"]["precision"], r["closed"]["recall"]) == (0.5, 0.5)
    assert r["closed"]["removed"] == 1.0  # the other is removed as open_set
    # open: open_set flagged 2 (closed, open) -> P 1/2, R 1/1
    assert (r["open"]["precision"], r["open"]["recall"]) == (0.5, 1.0)
    assert (r["low_quality"]["recall"], r["low_quality"]["removed"]) == (0.0, 0.0)
    assert (r["sketch"]["precision"], r["sketch"]["recall"]) == (0.5, 1.0)
    assert (r["nonface"]["recall"], r["nonface"]["removed"]) == (0.0, 1.0)
    # removal: removed 6 (rows 1,2,3,4,6,7), noisy 6 (rows 2..7), both 5
    assert r["removal"]["precision"] == pytest.approx(5 / 6)
    assert r["removal"]["recall"] == pytest.approx(5 / 6)
    assert r["clean"]["kept"] == pytest.approx(2 / 3) and r["clean"]["hard_kept"] == 1.0
    assert r["suggested_class"] == {"detected": 1, "correct": 1.0}
    assert r["merge"] == {"pairs": 1, "proposed": 2, "precision": 0.5, "recall": 1.0}


def test_cumulative_evaluation_is_the_union_over_rounds():
    # original set: 6 samples; round 1 flags rows 0 (mislabeled) and 4 (nonface);
    # round 2 (on rows 1, 2, 3, 5) flags row 2 (open_set) and row 5 (mislabeled)
    kind = np.array([1, 1, 2, 0, 5, 0], np.int8)  # closed closed open clean nonface clean
    truth = Truth(
        kind=kind,
        label=np.zeros(6, np.int64),
        true_label=np.zeros(6, np.int64),
        identity=np.zeros(6, np.int64),
        quality=np.ones(6, np.float32),
        hard=np.array([0, 0, 0, 0, 0, 1], bool),
        duplicate_of=np.array([-1]),
    )
    flagged = np.zeros((6, len(FLAGS)), bool)
    flagged[:, FLAGS.index("clean")] = True
    for row, name in ((0, "mislabeled"), (4, "nonface"), (2, "open_set"), (5, "mislabeled")):
        flagged[row, FLAGS.index(name)] = True
    removed = np.array([1, 0, 1, 0, 1, 1], bool)
    r = evaluate_cumulative(flagged, removed, truth)
    # mislabeled: rows 0 (closed) and 5 (clean) -> P 1/2; closed rows 0, 1 -> R 1/2
    assert (r["closed"]["precision"], r["closed"]["recall"]) == (0.5, 0.5)
    assert r["closed"]["removed"] == 0.5
    assert (r["open"]["precision"], r["open"]["recall"]) == (1.0, 1.0)
    assert (r["nonface"]["precision"], r["nonface"]["recall"]) == (1.0, 1.0)
    assert np.isnan(r["sketch"]["precision"]) and np.isnan(r["sketch"]["recall"])
    # removal: removed 0, 2, 4, 5; noisy 0, 1, 2, 4 -> 3 of 4 both ways
    assert (r["removal"]["precision"], r["removal"]["recall"]) == (0.75, 0.75)
    assert r["clean"] == {"samples": 2, "kept": 0.5, "hard": 1, "hard_kept": 0.0}
    # one round alone is evaluate_flags
    flag = np.array([FLAGS.index(f) for f in ("mislabeled", "clean", "open_set", "hard",
                                               "nonface", "clean")])  # fmt: skip
    one = evaluate_flags(flag, np.full(6, -1), truth)
    alone = evaluate_cumulative(flag[:, None] == np.arange(len(FLAGS)), flag >= 2, truth)
    for name, values in alone.items():
        assert one[name] == pytest.approx(values, nan_ok=True), name


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    info = make_dirty_synthface(root / "dirty", TINY_DIRTY, workers=1, progress=False)
    return train_tiny(root / "run", info.train), info.train


@pytest.mark.slow
def test_flags_do_not_depend_on_the_truth(dirty_run, tmp_path, capsys):
    run, data = dirty_run
    first = score_to_dir(run, tmp_path / "a", knn=5, progress=False)
    assert "evaluation" in first and (tmp_path / "a" / "evaluation.md").is_file()
    assert list(first["stages"]) == [
        "embedding (decode, forward, image statistics)", "centre angles", "kNN", "thresholds",
        "flags", "merge candidates", "split candidates"]  # fmt: skip
    # shuffle the truth list in place: the flags must not change, only their evaluation
    truth = load_truth(data)
    original = (data / "truth.npz").read_bytes()
    perm = np.random.default_rng(0).permutation(len(truth))
    try:
        truth.take(perm).save(data)
        second = score_to_dir(run, tmp_path / "b", knn=5, progress=False)
    finally:
        (data / "truth.npz").write_bytes(original)
    a = (tmp_path / "a" / "flags.csv").read_text()
    assert a == (tmp_path / "b" / "flags.csv").read_text()
    assert first["thresholds"] == second["thresholds"]
    flag, suggested = read_flags_csv(tmp_path / "a" / "flags.csv", len(truth))
    assert flag.tolist() == np.load(tmp_path / "a" / "scores.npz")["flag"].tolist()
    again = evaluate_flags(flag, suggested, truth, [tuple(m) for m in first["merges"]])
    saved = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(again, sort_keys=True)  # NaN-safe
    # the CLI: score, evaluate, bad thresholds and mismatched flags files
    assert main(["clean", "score", str(run), "--out", str(tmp_path / "c"), "--quiet",
                 "--knn", "5", "--workers", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| mislabeled" in out and "| outputs " in out  # the flags and the stage table
    assert (tmp_path / "c" / "flags.csv").read_text() == a  # loader workers: the same flags
    assert main(["clean", "evaluate", str(tmp_path / "c"), "--truth", str(data)]) == 0
    assert "| closed" in capsys.readouterr().out
    args = ["clean", "score", str(run), "--out", str(tmp_path / "d"), "--quiet"]
    assert main([*args, "--threshold", "angle_own=200"]) == 2
    assert "thresholds.angle_own" in capsys.readouterr().err
    assert main([*args, "--knn-method", "flat", "--knn-param", "nprobe=4"]) == 2
    assert "knn_params.nprobe does not apply" in capsys.readouterr().err
    assert main([*args, "--knn-param", "nprobe=many"]) == 2
    assert "--knn-param nprobe: not an integer" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(a.splitlines()[:5]) + "\n")
    with pytest.raises(DataFormatError, match="has 4 rows but the set has 160"):
        read_flags_csv(short, len(truth))
    assert main(["clean", "evaluate", str(short), "--truth", str(data)]) == 2


def test_stage_timer_tells_waiting_from_work():
    """A sleeping stage takes wall time and no CPU time, a busy one both."""
    timer = StageTimer()
    with timer("sleep"):
        time.sleep(0.3)
    with timer("work"):
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    sleep, work = timer.stages["sleep"], timer.stages["work"]
    assert sleep["seconds"] >= 0.29 and sleep["cpu_seconds"] < 0.1
    assert work["seconds"] >= 0.29 and work["cpu_seconds"] > 0
    assert "| sleep " in timer.table()


def test_nothing_flagged_prints_n_a_not_nan():
    kind = np.array([0, 0, 1, 2], np.int8)
    truth = Truth(
        kind=kind,
        label=np.zeros(4, np.int64),
        true_label=np.array([0, 0, 1, -1]),
        identity=np.zeros(4, np.int64),
        quality=np.ones(4, np.float32),
        hard=np.zeros(4, bool),
        duplicate_of=np.full(4, -1),
    )
    flag = np.full(4, FLAGS.index("clean"), np.int8)
    table = evaluation_table(evaluate_flags(flag, np.full(4, -1), truth, merges=[]))
    assert "nan" not in table
    row = next(line for line in table.splitlines() if line.startswith("| closed "))
    assert [c.strip() for c in row.strip("|").split("|")][3:5] == ["n/a", "0.000"]


def test_no_skin_gate_does_not_hang_on_a_mixture_fit():
    # 45 of the 300 no-skin samples (15%) lie 13 deg farther out than the faces: a clear tail of
    # shares (18% of them beyond the faces' median + 2 MAD, against 3.5%), but the mixture on the
    # no-skin angles gains under 10 in BIC, as a seed-1 model's did: the old gate was off
    rng = np.random.default_rng(0)
    many = _no_skin_set(_planted()[0], rng)
    many.angle_own[:300] = np.concatenate([rng.normal(32, 5, 255), rng.normal(45, 5, 45)])
    assert gmm_crossing(many.angle_own[:300]) is None
    no_skin = many.skin < choose_thresholds(many).skin_low
    assert no_skin[:300].all() and not no_skin[300:].any()
    # the test written out: shares beyond the skin samples' median + 2 * 1.4826 MAD
    skin_angles = many.angle_any[300:]
    med = np.median(skin_angles)
    bound = med + 2 * 1.4826 * np.median(np.abs(skin_angles - med))
    p1, p0 = (many.angle_any[:300] > bound).mean(), (skin_angles > bound).mean()
    assert p1 - p0 > 0.1
    assert far_tail(many.angle_any, no_skin)
    chosen = choose_thresholds(many)
    assert chosen.angle_any_soft is not None and chosen.colour_high is not None
    # the no-skin faces a little farther out than the others, without a tail (a cleaned set:
    # median 0.3 MAD higher, as round 2 of the loop): the rules stay off
    many.angle_own[:300] = rng.normal(31.5, 5.5, 300)
    assert not far_tail(many.angle_any, no_skin)
    assert choose_thresholds(many).angle_any_soft is None
    # the share test alone: a tail of 5% of the group is below the default excess of 6%
    values = np.concatenate([rng.normal(30, 5, 300), rng.normal(30, 5, 2000)])
    values[:15] = 60
    group = np.arange(values.size) < 300
    assert not far_tail(values, group) and far_tail(values, group, excess=0.04)
    assert not far_tail(values[:30], group[:30])  # no other samples to compare with


def test_scoring_makes_no_full_size_copy_of_the_embeddings():
    """compute_scores, class_means, merge_candidates and split_candidates work a chunk at a time:
    the peak of numpy's allocations stays well under the embeddings' own size (a unit-norm copy
    or a kept-rows copy would be as large as them)."""
    import tracemalloc

    n, c, d = 32_768, 64, 256
    emb, labels, centres = _clustered(n, c, d)
    kept = np.random.default_rng(1).random(n) < 0.9
    calls = {
        "compute_scores": lambda: compute_scores(
            emb, labels, centres, knn=4, knn_method="ivf",
            knn_params={"nlist": 16, "nprobe": 1, "batch_size": 4096}),
        "merge_candidates": lambda: merge_candidates(emb, labels, c, rows=kept),
        "split_candidates": lambda: split_candidates(emb, labels, c, rows=kept),
    }  # fmt: skip
    # imports faiss and scipy outside the traced window
    compute_scores(emb[:500], labels[:500], centres, knn=4, knn_method="ivf")
    for name, call in calls.items():
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 0.5 * emb.nbytes, f"{name}: peak {peak / 2**20:.1f} MiB"


def test_chunked_merge_and_split_equal_the_whole_array_computation():
    """Rows given as a mask give the same candidates as the kept rows copied out, and the
    chunked nearest class means equal a dense C x C computation."""
    emb, labels, _ = _clustered(3000, 2500, 8, seed=3)  # 2,500 classes: several merge chunks
    kept = np.random.default_rng(2).random(len(labels)) < 0.8
    assert merge_candidates(emb, labels, 2500, rows=kept) == merge_candidates(
        emb[kept], labels[kept], 2500
    )
    merges, min_cos = merge_candidates(emb, labels, 2500, rows=kept, min_cos=0.98)
    sums = np.zeros((2500, 8))
    np.add.at(sums, labels[kept], emb[kept].astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = sums / np.where(norms == 0, 1, norms)
    sims = means @ means.T
    np.fill_diagonal(sims, -np.inf)
    best = sims.max(axis=1)
    want = sorted({(min(a, int(b)), max(a, int(b))) for a, b in enumerate(sims.argmax(axis=1))
                   if best[a] > min_cos})  # fmt: skip
    assert [(a, b) for a, b, _ in merges] == want and len(want) >= 3
    assert split_candidates(emb, labels, 2500, rows=kept) == split_candidates(
        emb[kept], labels[kept], 2500
    )
    # rows as plain lists are still read; a mask of the wrong length is an error, not a prefix
    assert (
        merge_candidates(emb[:50].tolist(), labels[:50], 2500)[1]
        == merge_candidates(emb[:50], labels[:50], 2500)[1]
    )
    with pytest.raises(ValueError, match="rows: a mask must be"):
        score_module.class_means(emb, labels, 2500, rows=kept[:10])


def test_threshold_help_names_every_threshold():
    # the CLI's help lists the names as text (the scoring module is imported lazily)
    from robustface.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    score = next(a for a in sub.choices["clean"]._actions if a.dest == "clean_command")
    help_text = next(a.help for a in score.choices["score"]._actions if a.dest == "threshold")
    listed = set(re.findall(r"[a-z_]+", help_text.split("(")[1].split(")")[0]))
    assert listed == set(score_module.THRESHOLD_NAMES)
