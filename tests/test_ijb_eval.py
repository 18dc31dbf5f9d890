"""IJB evaluation: ROC and TAR@FAR, template pooling, pair scoring, 1:N, reports, and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustface.cli import main
from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.synth.builder import build_synthface
from robustface.deploy import align_face
from robustface.evaluate.ijb import (
    AGGREGATORS,
    FPIRS,
    IJBSettings,
    embed_ijb,
    group_templates,
    identification,
    read_ijb_1n_meta,
    score_ijb,
    score_pairs,
    template_features,
    write_ijb_report,
)
from robustface.evaluate.report import model_fingerprint, write_evaluation
from robustface.evaluate.roc import FARS, Roc, roc_curve, tar_at_far
from robustface.evaluate.verification import embed_pairs
from robustface.models import build_backbone
from robustface.models.loading import load_backbone
from synth_configs import IJB_SYNTH

# ---- brute-force references ---------------------------------------------------------------------


def brute_roc(scores, labels):
    """One point per distinct threshold (accept score >= t), plus (0, 0), by enumeration."""
    pos, neg = labels.sum(), (~labels).sum()
    points = [(0.0, 0.0, np.inf)]
    for t in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= t
        points.append(((accept & ~labels).sum() / neg, (accept & labels).sum() / pos, t))
    return np.array(points)


def brute_drop(scores, labels):
    """sklearn's drop_intermediate, by enumeration on counts: drop the middle of equal steps."""
    counts = []
    for t in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= t
        counts.append(((accept & ~labels).sum(), (accept & labels).sum()))
    keep = [0]
    for i in range(1, len(counts) - 1):
        before = (counts[i][0] - counts[i - 1][0], counts[i][1] - counts[i - 1][1])
        after = (counts[i + 1][0] - counts[i][0], counts[i + 1][1] - counts[i][1])
        if before != after:
            keep.append(i)
    keep.append(len(counts) - 1)
    return [0] + [1 + k for k in sorted(set(keep))]


def brute_tar(scores, labels, far, mode):
    roc = brute_roc(scores, labels)
    if mode == "conservative":
        return max(tpr for fpr, tpr, _ in roc if fpr <= far)
    kept = roc[brute_drop(scores, labels)]
    best = min(abs(fpr - far) for fpr, _, _ in kept)
    return max(tpr for fpr, tpr, _ in kept if abs(fpr - far) == best)  # ties: highest TPR


def random_scores(rng, n, levels=None):
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = rng.normal(labels * 1.0, 1.0)
    if levels:
        scores = np.round(scores * levels) / levels  # many ties
    return scores, labels


# ---- ROC and TAR@FAR ----------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 4])
def test_roc_curve_against_enumeration(levels):
    rng = np.random.default_rng(1)
    for _ in range(10):
        scores, labels = random_scores(rng, 60, levels)
        fpr, tpr, thr = roc_curve(scores, labels)
        expected = brute_roc(scores, labels)
        np.testing.assert_allclose(np.c_[fpr, tpr, thr], expected)
        fpr_d, tpr_d, _ = roc_curve(scores, labels, drop_intermediate=True)
        np.testing.assert_allclose(np.c_[fpr_d, tpr_d], expected[brute_drop(scores, labels), :2])


@pytest.mark.parametrize("reading", ["measurable", "insightface"])
@pytest.mark.parametrize("mode", ["closest", "conservative"])
@pytest.mark.parametrize("levels", [None, 3])
def test_tar_at_far_against_enumeration(mode, levels, reading):
    rng = np.random.default_rng(2)
    fars = (0.0, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0)
    for n in (5, 40, 200):
        scores, labels = random_scores(rng, n, levels)
        got = tar_at_far(scores, labels, fars, mode=mode, reading=reading)
        assert list(got) == list(fars)
        impostors = int(np.sum(~labels))
        for far in fars:
            if reading == "measurable" and far < 1 / impostors:  # no impostor may pass
                assert got[far] is None
            else:
                assert got[far] == pytest.approx(brute_tar(scores, labels, far, mode), abs=1e-12)


def test_far_below_one_impostor_is_not_measurable():
    # descending: + + - + - - - - - - - - - +  (4 genuine, 10 impostor pairs: FAR >= 0.1 only)
    scores = np.arange(14.0)[::-1]
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    roc = Roc.from_scores(scores, labels)
    assert roc.num_negatives == 10 and roc.min_measurable_far == 0.1
    fars = (1e-6, 0.03, 0.07, 0.1, 0.2)
    for mode in ("closest", "conservative"):
        got = roc.tar_at_far(fars, mode)
        assert got[1e-6] is None and got[0.03] is None and got[0.07] is None
        # at 0.1 / 0.2 one / two impostors pass: the best TPR with FPR <= FAR, by enumeration
        assert got[0.1] == 0.75 == brute_tar(scores, labels, 0.1, "conservative")
        assert got[0.2] == 0.75 == brute_tar(scores, labels, 0.2, "conservative")
    # insightface's reading by hand: points (FPR, TPR) (0, 0) (0, .5) (.1, .5) (.1, .75) ...;
    # 1e-6 and 0.03 are closest to FPR 0 (TPR .5 there), 0.07 to FPR 0.1 (TPR .75)
    insightface = roc.tar_at_far(fars, "closest", "insightface")
    assert insightface == {1e-6: 0.5, 0.03: 0.5, 0.07: 0.75, 0.1: 0.75, 0.2: 0.75}
    assert tar_at_far(scores, labels, fars, reading="insightface") == insightface
    assert roc.tar_at_far((0.07,), "conservative", "insightface") == {0.07: 0.5}
    with pytest.raises(ValueError, match="far reading must be one of"):
        roc.tar_at_far(fars, reading="interpolated")


def test_tar_readings_by_hand():
    # descending: + - + - - - - - - -  (2 positives, 8 negatives)
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    # points (fpr, tpr): (0,0) (0,.5) (.125,.5) (.125,1) (.25,1) ... (1,1); FAR 0.1 < 1/8 is
    # not measurable, so the readings of it are insightface's
    conservative = tar_at_far(
        scores, labels, (0.1, 0.125), mode="conservative", reading="insightface"
    )
    assert conservative == {0.1: 0.5, 0.125: 1.0}
    # FAR 0.1: the closest FPR is 0.125, where the highest TPR is 1.0 (insightface's reading)
    assert tar_at_far(scores, labels, (0.1,), reading="insightface") == {0.1: 1.0}
    # + - - - - +: sklearn drops the middle of the flat run, so the closest kept point to FAR 0.6
    # is (1, 1), not (0.5, 0.5) as on the full curve
    run_scores, run_labels = np.arange(6.0)[::-1], np.array([1, 0, 0, 0, 0, 1], dtype=bool)
    assert tar_at_far(run_scores, run_labels, (0.6,)) == {0.6: 1.0}
    assert tar_at_far(run_scores, run_labels, (0.6,), mode="conservative") == {0.6: 0.5}
    roc = Roc.from_scores(scores, labels)
    assert roc.num_positives == 2 and roc.num_negatives == 8
    point = int(roc.operating_points((0.1,))[0])
    assert roc.fpr[point] == 0.125 and roc.thresholds[point] == 8.0


def test_tar_closest_matches_sklearn_and_insightface_reading():
    """The literature's reading, written out as insightface's eval_ijbc.py does it on sklearn's
    ROC: flip the curve, take the first (lowest flipped index) point of least |fpr - far|."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(11)
    fars = (1e-3, 1e-2, 0.05, 0.1, 0.3)
    for levels in (None, 5):
        scores, labels = random_scores(rng, 400, levels)
        fpr, tpr, _ = sk_roc_curve(labels, scores)
        fpr, tpr = np.flipud(fpr), np.flipud(tpr)
        expected = {}
        for far in fars:
            _, index = min(zip(np.abs(fpr - far), range(len(fpr)), strict=True))
            expected[far] = tpr[index]
        got = tar_at_far(scores, labels, fars, reading="insightface")
        assert got == pytest.approx(expected, abs=1e-12)


def test_roc_bad_inputs():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.arange(3.0), np.ones(3, bool))
    with pytest.raises(ValueError, match="0/1"):
        roc_curve(np.arange(3.0), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="mode must be one of"):
        tar_at_far(np.arange(2.0), np.array([0, 1]), mode="best")
    with pytest.raises(ValueError, match=r"fars must lie in \[0, 1\]"):
        tar_at_far(np.arange(2.0), np.array([0, 1]), fars=(2.0,))


# ---- pooling and scoring ------------------------------------------------------------------------


def test_template_pooling_by_hand():
    # template 7: media 1 (images 0, 1) and media 2 (image 2); template 3: media 1 (image 3).
    # Media 1 of template 7 and of template 3 are different groups.
    feats = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -2.0]], np.float32)
    weights = np.array([1.0, 0.5, 2.0, 1.0], np.float32)
    groups = group_templates(np.array([7, 7, 7, 3]), np.array([1, 1, 2, 1]))
    assert groups.template_ids.tolist() == [3, 7]
    assert groups.media_counts.tolist() == [1, 2, 1]
    # norm_weighted: raw features; media 1 = mean(1*[3,0], .5*[0,1]) = [1.5, .25]; media 2 =
    # 2*[1,1]; template 7 = [3.5, 2.25] normalised; template 3 = [0, -2] normalised
    got = template_features(feats, weights, groups, "norm_weighted")
    t7 = np.array([3.5, 2.25]) / np.hypot(3.5, 2.25)
    np.testing.assert_allclose(got, [[0.0, -1.0], t7], rtol=1e-6)
    # mean: unit features; media 1 = mean([1,0], .5*[0,1]) = [.5, .25]; media 2 = 2*[1,1]/sqrt 2
    got = template_features(feats, weights, groups, "mean")
    t7 = np.array([0.5 + np.sqrt(2), 0.25 + np.sqrt(2)])
    np.testing.assert_allclose(got, [[0.0, -1.0], t7 / np.linalg.norm(t7)], rtol=1e-6)
    assert sorted(AGGREGATORS) == ["mean", "norm_weighted"]
    with pytest.raises(KeyError, match="did you mean 'mean'"):
        template_features(feats, weights, groups, "meen")


def brute_pool(feats, weights, templates, medias, unit):
    out = {}
    for t in np.unique(templates):
        total = 0.0
        for m in np.unique(medias[templates == t]):
            rows = (templates == t) & (medias == m)
            x = feats[rows].astype(np.float64)
            if unit:
                x = x / np.linalg.norm(x, axis=1, keepdims=True)
            total = total + (x * weights[rows, None]).mean(0)
        out[int(t)] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("aggregation", ["mean", "norm_weighted"])
def test_template_pooling_against_loops(aggregation):
    rng = np.random.default_rng(5)
    n = 300
    templates = rng.integers(100, 140, n)
    medias = rng.integers(0, 6, n)
    feats = rng.normal(size=(n, 8)).astype(np.float32) * rng.uniform(0.5, 5, (n, 1))
    weights = rng.uniform(0.1, 1, n).astype(np.float32)
    groups = group_templates(templates, medias)
    got = template_features(feats, weights, groups, aggregation)
    expected = brute_pool(feats, weights, templates, medias, aggregation == "mean")
    for row, t in enumerate(groups.template_ids.tolist()):
        np.testing.assert_allclose(got[row], expected[t], atol=1e-5)


@pytest.mark.parametrize(("n_templates", "n_pairs"), [(12, 400), (600, 50)])  # matmul / gather
def test_score_pairs_against_loops(n_templates, n_pairs):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(n_templates, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.sort(rng.choice(10_000, n_templates, replace=False))
    pairs = ids[rng.integers(0, n_templates, (n_pairs, 2))]
    got = score_pairs(feats, ids, pairs, block_rows=5)
    lookup = {int(t): feats[i].astype(np.float64) for i, t in enumerate(ids)}
    expected = [lookup[int(a)] @ lookup[int(b)] for a, b in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    got64 = score_pairs(feats, ids, pairs, block_rows=5, dtype="float64")
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, atol=1e-12)
    bad = pairs.copy()
    bad[3, 1] = 10_001
    with pytest.raises(ValueError, match="pairs: row 3 names template 10001"):
        score_pairs(feats, ids, bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        score_pairs(feats, ids, pairs, dtype="float16")


def test_rows_of_in_chunks(monkeypatch):
    import robustface.evaluate.ijb as ijb

    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(1000, 50, replace=False))
    pairs = ids[rng.integers(0, 50, (23, 2))]
    whole = ijb._rows_of(ids, pairs, "pairs")
    monkeypatch.setattr(ijb, "_ROW_CHUNK", 4)  # 6 chunks, the last one short
    chunked = ijb._rows_of(ids, pairs, "pairs")
    assert chunked.dtype == np.int32
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(ids[chunked], pairs)
    bad = pairs.copy()
    bad[9, 0] = bad[17, 1] = 1001  # rows in the third and fifth chunks
    with pytest.raises(ValueError, match=r"pairs: row 9 names template 1001.*\(2 such rows\)"):
        ijb._rows_of(ids, bad, "pairs")


def test_template_pooling_in_template_blocks(monkeypatch):
    # blocks of templates holding about _ROW_CHUNK images, a template larger than a block, and
    # images in no particular order (read by gathering) or grouped by template (read as slices)
    import robustface.evaluate.ijb as ijb

    rng = np.random.default_rng(8)
    n = 200
    templates = np.r_[np.full(40, 5), rng.integers(0, 30, n - 40)]
    medias = rng.integers(0, 4, n)
    feats = rng.normal(size=(n, 6)).astype(np.float32) * rng.uniform(0.5, 5, (n, 1))
    weights = rng.uniform(0.1, 1, n).astype(np.float32)
    grouped = np.argsort(templates, kind="stable")
    monkeypatch.setattr(ijb, "_ROW_CHUNK", 16)
    for order in (rng.permutation(n), grouped):
        groups = group_templates(templates[order], medias[order])
        for aggregation in ("mean", "norm_weighted"):
            got = template_features(feats[order], weights[order], groups, aggregation)
            expected = brute_pool(feats, weights, templates, medias, aggregation == "mean")
            for row, t in enumerate(groups.template_ids.tolist()):
                np.testing.assert_allclose(got[row], expected[t], atol=1e-5)


@pytest.mark.parametrize("spread", [1, 10**9])  # dense id table / binary search
def test_score_pairs_both_orders_and_many_blocks(spread):
    # pairs in both orders, self pairs and repeats, over blocks scored by Gram (dense blocks)
    # and by gathering rows (the sparse tail), in float32 and float64
    rng = np.random.default_rng(9)
    n_templates = 70
    feats = rng.normal(size=(n_templates, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.sort(rng.choice(1000, n_templates, replace=False)) * spread - 5
    dense = rng.integers(0, 20, (600, 2))
    sparse = rng.integers(0, n_templates, (30, 2))
    rows = np.r_[dense, dense[:, ::-1], sparse, [[3, 3], [69, 69], [0, 69], [69, 0]]]
    pairs = ids[rows]
    expected = np.einsum("ij,ij->i", feats[rows[:, 0]].astype(np.float64), feats[rows[:, 1]])
    for dtype, atol in (("float32", 1e-6), ("float64", 1e-12)):
        got = score_pairs(feats, ids, pairs, block_rows=8, dtype=dtype)
        np.testing.assert_allclose(got, expected, atol=atol)
        n = len(dense)
        np.testing.assert_array_equal(got[:n], got[n : 2 * n])  # symmetric, the same cell


@pytest.mark.parametrize("spread", [1, 10**9])
def test_rows_of_dense_table_and_search(spread):
    import robustface.evaluate.ijb as ijb

    rng = np.random.default_rng(4)
    ids = np.sort(rng.choice(1000, 50, replace=False)).astype(np.int64) * spread + 7
    assert (ijb._dense_rows(ids, ids) is None) == (spread > 1)
    wanted = ids[rng.integers(0, 50, (40, 2))]
    rows = ijb._rows_of(ids, wanted, "pairs")
    np.testing.assert_array_equal(ids[rows], wanted)
    # absent ids below, inside and above the range of the known ones
    inside = next(v for v in range(int(ids[0]) + 1, int(ids[-1])) if v not in set(ids.tolist()))
    for bad_id in (ids[0] - 3, inside, ids[-1] + 10**12):
        bad = wanted.copy()
        bad[5, 1] = bad[30, 0] = bad_id
        with pytest.raises(ValueError, match=rf"row 5 names template {bad_id},.*\(2 such rows\)"):
            ijb._rows_of(ids, bad, "pairs")


# ---- 1:N ----------------------------------------------------------------------------------------


def brute_identification(gallery, gallery_ids, probes, probe_ids, ranks, fpirs):
    subjects = sorted(set(gallery_ids.tolist()))
    best = np.array(
        [[max(p @ g for g, s in zip(gallery, gallery_ids, strict=True) if s == subj)
          for subj in subjects]
         for p in probes.astype(np.float64)]
    )  # fmt: skip
    mated_ranks, mated_scores, nonmated_top = [], [], []
    for i, pid in enumerate(probe_ids.tolist()):
        if pid in subjects:
            own = best[i, subjects.index(pid)]
            mated_ranks.append(1 + sum(best[i] > own))
            mated_scores.append(own)
        else:
            nonmated_top.append(best[i].max())
    rank_rates = {k: np.mean([r <= k for r in mated_ranks]) for k in ranks}
    every, measured = {}, {}
    for x in fpirs:
        candidates = sorted([-np.inf, *nonmated_top])
        accepted = [np.mean([s > c for s in nonmated_top]) for c in candidates]
        t = next(c for c, a in zip(candidates, accepted, strict=True) if a <= x + 1e-12)
        hits = [r == 1 and s > t for r, s in zip(mated_ranks, mated_scores, strict=True)]
        every[x] = sum(hits) / len(mated_ranks)
        # x is measured only when a threshold accepting a non-mated probe keeps FPIR <= x
        measured[x] = every[x] if any(0 < a <= x + 1e-12 for a in accepted) else None
    return rank_rates, every, measured


def test_identification_against_brute_force():
    rng = np.random.default_rng(7)
    d, n_sub = 12, 15
    centres = rng.normal(size=(30, d))
    gallery_ids = np.r_[np.arange(n_sub), rng.integers(0, n_sub, 10)]  # some with 2+ templates
    gallery = centres[gallery_ids] + rng.normal(0, 0.8, (gallery_ids.size, d))
    probe_ids = rng.integers(0, 30, 200)  # subjects 15..29 are not in the gallery
    probes = centres[probe_ids] + rng.normal(0, 0.8, (200, d))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    n_non = int(np.sum(probe_ids >= n_sub))
    assert n_non == 97  # FPIR 0.01 and 1/98 lie below 1/97, 1/97 does not
    fpirs = (0.0, 0.01, 1 / 98, 1 / 97, 0.1, 0.3, 1.0)
    got = identification(
        gallery, gallery_ids, probes, probe_ids, ranks=(1, 2, 5), fpirs=fpirs, chunk=37
    )
    ranks, every, measured = brute_identification(
        gallery, gallery_ids, probes, probe_ids, (1, 2, 5), fpirs
    )
    assert got["rank"] == pytest.approx(ranks)
    assert [x for x, t in measured.items() if t is None] == [0.0, 0.01, 1 / 98]
    assert got["tpir_at_fpir"] == pytest.approx(measured)
    assert got["tpir_at_fpir_insightface"] == pytest.approx(every)
    assert got["min_measurable_fpir"] == 1 / 97 and got["nonmated_probes"] == n_non
    assert got["gallery_subjects"] == n_sub and got["gallery_templates"] == 25
    assert got["mated_probes"] + got["nonmated_probes"] == 200
    assert got["cmc"][0] == got["rank"][1] and got["cmc"][-1] == 1.0 and len(got["cmc"]) == n_sub
    points = got["operating_points"]
    assert all(points[x]["fpir"] <= x for x in fpirs)
    assert [x for x in fpirs if not points[x]["measurable"]] == [0.0, 0.01, 1 / 98]
    assert points[0.01]["fpir"] == 0.0 and points[1 / 97]["fpir"] == pytest.approx(1 / 97)
    closed = identification(gallery, gallery_ids, probes[:5], np.zeros(5, np.int64))
    assert closed["nonmated_probes"] == 0 and closed["min_measurable_fpir"] is None
    assert closed["tpir_at_fpir"][0.01] is None and closed["tpir_at_fpir_insightface"][0.01] is None
    with pytest.raises(ValueError, match="no probe's subject is in the gallery"):
        identification(gallery, gallery_ids, probes[:3], np.array([100, 101, 102]))


def test_identification_table_marks_unmeasurable_fpirs():
    import robustface.evaluate.ijb as ijb

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 8))
    gallery_ids = np.arange(10)
    probe_ids = np.r_[rng.integers(0, 10, 100), np.arange(10, 20).repeat(15)]  # 150 non-mated
    gallery, probes = centres[gallery_ids], centres[probe_ids] + rng.normal(0, 0.5, (250, 8))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    ident = {
        "G1": identification(gallery, gallery_ids, probes, probe_ids),
        "G2": identification(gallery, gallery_ids, probes[:130], probe_ids[:130]),
    }
    assert ident["G1"]["nonmated_probes"] == 150  # measures FPIR >= 1/150: 0.01 and 0.1
    assert ident["G2"]["nonmated_probes"] == 30  # measures FPIR >= 1/30: 0.1, not 0.01
    ver = {
        "far_mode": "closest",
        "tar_at_far": {0.1: 0.5},
        "tar_at_far_insightface": {0.1: 0.5},
        "pairs": 100,
        "impostor": 90,
    }
    results = {"verification": ver, "templates": 5, "identification": ident}
    raw = {
        g: [f"{100 * ident[g]['tpir_at_fpir_insightface'][x]:.2f}" for x in FPIRS] for g in ident
    }
    md = ijb._tables("m", "IJBX", results, "measurable")
    assert _row_cells(md, "m", "G1")[-2:] == raw["G1"]
    assert _row_cells(md, "m", "G2")[-2:] == ["n/m", raw["G2"][1]]
    assert "n/m: not measurable (G2: 30 non-mated probes measure FPIR >= 0.0333 only" in md
    assert "G1:" not in md
    md = ijb._tables("m", "IJBX", results, "insightface")
    assert _row_cells(md, "m", "G1")[-2:] == raw["G1"]
    assert _row_cells(md, "m", "G2")[-2:] == [f"{raw['G2'][0]}*", raw["G2"][1]]
    assert "*: not measurable (G2: 30 non-mated probes measure FPIR >= 0.0333 only" in md


def test_read_1n_meta(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    assert read_ijb_1n_meta(tmp_path, "IJBB") is None
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,OTHER\n"
    (meta / "ijbb_1N_gallery_S1.csv").write_text(header + "5,1,a.jpg,x\n5,1,b.jpg,x\n2,3,c.jpg,y\n")
    (meta / "ijbb_1N_gallery_S2.csv").write_text(header + "9,4,d.jpg,z\n")
    with pytest.raises(FileNotFoundError, match=r"ijbb_1N_probe_mixed\.csv"):
        read_ijb_1n_meta(tmp_path, "IJBB")
    (meta / "ijbb_1N_probe_mixed.csv").write_text(header + "11,1,e.jpg,x\n12,4,f.jpg,x\n")
    one_n = read_ijb_1n_meta(tmp_path, "IJBB")
    assert list(one_n.galleries) == ["S1", "S2"]
    assert [a.tolist() for a in one_n.galleries["S1"]] == [[2, 5], [3, 1]]
    assert [a.tolist() for a in one_n.probe] == [[11, 12], [1, 4]]
    (meta / "ijbb_1N_gallery_S2.csv").write_text(header + "9,4,d.jpg\n9,6,e.jpg\n")
    with pytest.raises(ValueError, match=r"S2\.csv: line 3: template 9 has subject 6"):
        read_ijb_1n_meta(tmp_path, "IJBB")
    (meta / "ijbb_1N_gallery_S2.csv").write_text("A,B\n1,2\n")
    with pytest.raises(ValueError, match="header starting TEMPLATE_ID,SUBJECT_ID"):
        read_ijb_1n_meta(tmp_path, "IJBB")


# ---- reports ------------------------------------------------------------------------------------


def test_model_fingerprint(tmp_path):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"weights v1")
    fp = model_fingerprint(weights)
    assert fp == {
        "path": str(weights.resolve()),
        "size": 10,
        "sha256": hashlib.sha256(b"weights v1").hexdigest(),
    }
    (tmp_path / "config.yaml").write_text("model: {backbone: r50}\n")
    run = model_fingerprint(tmp_path)
    assert sorted(run["files"]) == ["backbone.pth", "config.yaml"]
    assert run["files"]["backbone.pth"]["sha256"] == fp["sha256"]
    assert run["size"] == 10 + len("model: {backbone: r50}\n")
    (tmp_path / "best_backbone.pth").write_bytes(b"weights v2")  # load_backbone prefers it
    assert model_fingerprint(tmp_path)["sha256"] != run["sha256"]
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        model_fingerprint(tmp_path / "missing.pth")


def test_write_evaluation(tmp_path):
    model = tmp_path / "m.pth"
    model.write_bytes(b"abc")
    results = {
        "tar_at_far": {np.float64(1e-6): np.float32(0.5), 0.1: 1.0},
        "counts": np.arange(3),
        "rank": {np.int64(1): 0.25},
        "missing": float("nan"),
        "path": tmp_path,
    }
    path = write_evaluation(
        tmp_path / "out", "ijbc", results, "| a |\n|---|\n", model=model, config={"k": (1, 2)}
    )
    assert path == tmp_path / "out" / "ijbc.json"
    report = json.loads(path.read_text())
    assert report["kind"] == "ijbc"
    assert report["results"]["tar_at_far"] == {"1e-06": 0.5, "0.1": 1.0}
    assert report["results"]["counts"] == [0, 1, 2] and report["results"]["rank"] == {"1": 0.25}
    assert report["results"]["missing"] is None and report["results"]["path"] == str(tmp_path)
    assert report["config"] == {"k": [1, 2]}
    assert report["model"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert {"robustface", "torch", "numpy", "git_revision"} <= set(report["meta"])
    assert (tmp_path / "out" / "ijbc.md").read_text() == "| a |\n|---|\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ijbc.json", "ijbc.md"]
    no_model = write_evaluation(tmp_path / "out", "x", {}, "t", model=None, config={})
    assert json.loads(no_model.read_text())["model"] is None
    with pytest.raises(ValueError, match="plain file stem"):
        write_evaluation(tmp_path, "../x", {}, "", model=None, config={})


# ---- end to end from the CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ijb_setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ijb")
    synth = build_synthface(root / "synth", IJB_SYNTH, workers=1, progress=False).path
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(build_backbone("r18_tiny").state_dict(), weights)
    return synth / "IJBS", weights


def recompute(ijb_dir: Path, weights: Path, flip: bool = True) -> tuple[dict, dict, np.ndarray]:
    """The protocol by hand: align, embed image + flip, faceness-weighted media/template pooling
    with raw norms, cosine scores, TAR by enumeration, 1:N by brute force."""
    meta = read_ijb_meta(ijb_dir, "IJBS")
    model, size = load_backbone(weights, backbone="r18_tiny")
    crops = np.stack(
        [
            align_face(decode_image(p.read_bytes()), lm, size)
            for p, lm in zip(meta.image_paths(), meta.landmarks, strict=True)
        ]
    )
    feats, _ = embed_pairs(crops, model, batch_size=7, flip=flip)
    pooled = brute_pool(feats, meta.faceness, meta.templates, meta.medias, unit=False)
    scores = np.array([pooled[a] @ pooled[b] for a, b in meta.pairs])
    labels = meta.pair_labels.astype(bool)
    tar = {f: brute_tar(scores, labels, f, "closest") for f in FARS}
    one_n = read_ijb_1n_meta(ijb_dir, "IJBS")
    probe = np.stack([pooled[t] for t in one_n.probe[0].tolist()])
    ident = {}
    for g, (templates, subjects) in one_n.galleries.items():
        gallery = np.stack([pooled[t] for t in templates.tolist()])
        ident[g] = brute_identification(
            gallery, subjects, probe, one_n.probe[1], (1, 5, 10), (0.01, 0.1)
        )
    return tar, ident, scores


def _row_cells(md: str, *first: str) -> list[str]:
    """The cells of the Markdown table row of ``md`` whose first cells are ``first``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()]
    return next(row for row in rows if tuple(row[: len(first)]) == first)


def test_python_steps_without_a_cache_match_brute_force(ijb_setup, tmp_path):
    """embed -> score -> report from Python, a module in memory and no cache directory."""
    ijb_dir, weights = ijb_setup
    model, size = load_backbone(weights, backbone="r18_tiny")
    meta, one_n = read_ijb_meta(ijb_dir, "IJBS"), read_ijb_1n_meta(ijb_dir, "IJBS")
    settings = IJBSettings(batch_size=5, workers=1)
    embedded = embed_ijb(model, meta, settings, input_size=size, show_progress=False)
    assert embedded.cache_file is None and not embedded.reused
    assert embedded.model_key["module"] == type(model).__qualname__
    scores = score_ijb(embedded, meta, settings, one_n)
    results = write_ijb_report(tmp_path, meta, embedded, scores, settings, label="tiny")
    tar, ident, _ = recompute(ijb_dir, weights)
    got = results["verification"]["tar_at_far_insightface"]
    assert got == {f: pytest.approx(tar[f], abs=1e-12) for f in FARS}
    for g, (rank_rates, _, _) in ident.items():
        assert results["identification"][g]["rank"] == pytest.approx(rank_rates, abs=1e-12)
    report = json.loads((tmp_path / "ijbs.json").read_text())
    assert report["model"] is None and report["config"]["cache"] is None
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        embed_ijb(model, meta, settings, input_size=size)


def test_cli_end_to_end(ijb_setup, tmp_path, capsys):
    ijb_dir, weights = ijb_setup
    out = tmp_path / "out"
    base = ["eval", "ijb", str(weights), "--backbone", "r18_tiny", "--data", str(ijb_dir)]
    base += ["--name", "IJBS", "--quiet", "--batch-size", "5", "--workers", "2"]
    assert main([*base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | 1e-6 | 1e-5 | 1e-4 | 1e-3 | 1e-2 | 1e-1" in printed
    assert "rank-1" in printed and "TPIR@FPIR=0.01" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cache", "ijbs.json", "ijbs.md", "ijbs_cmc.png", "ijbs_roc.png"]
    for png in ("ijbs_cmc.png", "ijbs_roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "ijbs.json").read_text())
    results = report["results"]
    meta = read_ijb_meta(ijb_dir, "IJBS")
    assert results["images"] == meta.images.size and results["templates"] == 12
    assert results["verification"]["pairs"] == meta.pairs.shape[0]
    assert report["config"]["aggregation"] == "norm_weighted"
    assert report["config"]["far_mode"] == "closest" and report["config"]["input_size"] == 56
    assert report["model"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert results["embedding_cache"]["reused"] is False

    tar, ident, scores = recompute(ijb_dir, weights)
    gaps = np.diff(np.unique(np.round(scores, 5)))
    assert gaps.min() > 1e-5  # no near-ties, so the TARs must agree exactly
    ver = results["verification"]
    impostors = int(np.sum(meta.pair_labels == 0))
    assert ver["impostor"] == impostors and ver["min_measurable_far"] == 1 / impostors
    assert ver["tar_at_far_insightface"] == {
        f"{f:g}": pytest.approx(tar[f], abs=1e-12) for f in FARS
    }
    measurable = [f for f in FARS if f * impostors >= 1]
    assert measurable == [0.1]  # so the not-measurable cells below exist
    assert ver["tar_at_far"] == {
        f"{f:g}": pytest.approx(tar[f], abs=1e-12) if f in measurable else None for f in FARS
    }
    md = (out / "ijbs.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {weights.stem} "))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == ["n/m"] * 5 + [f"{100 * tar[0.1]:.2f}"]
    assert f"n/m: not measurable ({impostors:,} impostor pairs measure FAR >= " in md
    for g, (ranks, every, measured) in ident.items():
        r = results["identification"][g]
        assert r["rank"] == {str(k): pytest.approx(v) for k, v in ranks.items()}
        assert r["tpir_at_fpir_insightface"] == {
            f"{x:g}": pytest.approx(v) for x, v in every.items()
        }
        # 4 non-mated probes per gallery measure FPIR >= 0.25 only: both FPIRs are not measurable
        assert r["nonmated_probes"] == 4 and r["min_measurable_fpir"] == 0.25
        assert measured == {0.01: None, 0.1: None}
        assert r["tpir_at_fpir"] == {"0.01": None, "0.1": None}
        assert not any(p["measurable"] for p in r["operating_points"].values())
        assert _row_cells(md, weights.stem, g)[-2:] == ["n/m", "n/m"]
    assert "n/m: not measurable (G1: 4 non-mated probes measure FPIR >= 0.25 only; G2: 4 " in md
    assert [p["measurable"] for p in ver["operating_points"].values()] == [f == 0.1 for f in FARS]

    # insightface's reading in the table, marked; the JSON is the same
    assert main([*base, "--out", str(out), "--far-reading", "insightface"]) == 0
    capsys.readouterr()
    md = (out / "ijbs.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {weights.stem} "))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == [f"{100 * tar[f]:.2f}*" for f in FARS[:5]] + [f"{100 * tar[0.1]:.2f}"]
    assert "*: not measurable" in md and "insightface's reading, not a measurement" in md
    for g, (_, every, _) in ident.items():
        cells = _row_cells(md, weights.stem, g)[-2:]
        assert cells == [f"{100 * every[x]:.2f}*" for x in (0.01, 0.1)]
    assert "*: not measurable (G1: 4 non-mated probes measure FPIR >= 0.25" in md
    again = json.loads((out / "ijbs.json").read_text())
    assert again["results"]["verification"]["tar_at_far"] == ver["tar_at_far"]
    assert again["config"]["far_reading"] == "insightface"

    # a new aggregation and reading reuse the cached embeddings
    assert (
        main([*base, "--out", str(out), "--aggregation", "mean", "--far-mode", "conservative"]) == 0
    )
    capsys.readouterr()
    again = json.loads((out / "ijbs_mean.json").read_text())  # beside the default's report
    assert again["results"]["embedding_cache"]["reused"] is True
    assert again["config"]["aggregation"] == "mean" and again["kind"] == "ijbs_mean"
    assert json.loads((out / "ijbs.json").read_text())["config"]["aggregation"] == "norm_weighted"
    # other embedding settings get their own cache file beside the first, with their own values
    assert main([*base, "--out", str(out), "--no-flip"]) == 0
    capsys.readouterr()
    no_flip = json.loads((out / "ijbs.json").read_text())["results"]
    assert no_flip["embedding_cache"]["reused"] is False
    caches = sorted((out / "cache").glob("*.npy"))
    assert len(caches) == 2 and np.load(caches[0]).shape[1] + np.load(caches[1]).shape[1] == 3
    tar_nf, _, scores_nf = recompute(ijb_dir, weights, flip=False)
    assert np.abs(scores_nf - scores).max() > 1e-4  # the flip matters, so the check has teeth
    assert np.diff(np.unique(np.round(scores_nf, 5))).min() > 1e-5
    assert no_flip["verification"]["tar_at_far_insightface"] == {
        f"{f:g}": pytest.approx(tar_nf[f], abs=1e-12) for f in FARS
    }
    # a key file that no longer matches its cache is refused, not overwritten
    key_file = Path(no_flip["embedding_cache"]["path"]).with_suffix(".json")
    key = json.loads(key_file.read_text())
    key["flip"] = True
    key_file.write_text(json.dumps(key))
    assert main([*base, "--out", str(out), "--no-flip"]) == 2
    assert "records other flip than this run's" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o2"), "--aggregation", "max"]) == 2
    assert "unknown template aggregator 'max'" in capsys.readouterr().err


def test_an_onnx_model_evaluates_like_its_checkpoint(ijb_setup, tmp_path, capsys):
    from robustface.deploy.onnx import export_onnx

    ijb_dir, weights = ijb_setup
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(weights, onnx_path, backbone="r18_tiny")
    common = ["--data", str(ijb_dir), "--name", "IJBS", "--quiet", "--batch-size", "5"]
    assert main(["eval", "ijb", str(onnx_path), *common, "--out", str(tmp_path / "o")]) == 0
    assert main(["eval", "ijb", str(weights), "--backbone", "r18_tiny", *common,
                 "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    capsys.readouterr()
    got = json.loads((tmp_path / "o" / "ijbs.json").read_text())["results"]["verification"]
    want = json.loads((tmp_path / "p" / "ijbs.json").read_text())["results"]["verification"]
    assert got["tar_at_far_insightface"] == pytest.approx(want["tar_at_far_insightface"], abs=1e-12)


def test_a_truncated_cache_file_is_named(ijb_setup, tmp_path, capsys):
    ijb_dir, weights = ijb_setup
    args = ["eval", "ijb", str(weights), "--backbone", "r18_tiny", "--data", str(ijb_dir)]
    args += ["--name", "IJBS", "--quiet", "--batch-size", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    (npy,) = (tmp_path / "cache").glob("*_embeddings.npy")
    npy.write_bytes(npy.read_bytes()[:200])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(npy) in err and "delete it and it will be recomputed" in err
    npy.unlink()
    assert main(args) == 0  # recomputed
