"""1:1 verification protocol: recomputed the slow way, degenerate cases, flip/XNorm, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustface.data.image import encode_image
from robustface.data.transforms import EvalTransform
from robustface.data.verification import write_bin
from robustface.evaluate import embed_pairs, evaluate, format_results, verify_bin

GRID = np.arange(0, 4, 0.01)


def brute_force(emb, same, nrof_folds, far_target=1e-3, grid=GRID, val_grid=GRID):
    """insightface's protocol with explicit loops over folds, thresholds and grid points."""
    emb = np.asarray(emb, dtype=np.float64)
    rows = []
    for row in emb:
        norm = np.sqrt(np.sum(row * row))
        rows.append(row / norm if norm > 0 else row)
    dist = np.array([np.sum((rows[2 * i] - rows[2 * i + 1]) ** 2) for i in range(len(same))])
    same = np.asarray(same, dtype=bool)
    n = len(same)
    # KFold(shuffle=False): contiguous folds, the first n % k of them one pair longer.
    sizes = [n // nrof_folds + (1 if f < n % nrof_folds else 0) for f in range(nrof_folds)]
    out = {"acc": [], "best": [], "val": [], "far": [], "val_thr": [], "train_impostors": []}
    start = 0
    for size in sizes:
        test = np.zeros(n, dtype=bool)
        test[start : start + size] = True
        start += size
        train = ~test
        best, best_correct = 0, -1
        for t_idx, t in enumerate(grid):
            correct = np.sum((dist[train] < t) == same[train])
            if correct > best_correct:
                best, best_correct = t_idx, correct
        out["best"].append(grid[best])
        out["acc"].append(np.mean((dist[test] < grid[best]) == same[test]))

        n_neg_train = np.sum(~same[train])
        out["train_impostors"].append(int(n_neg_train))
        fars = [
            np.sum((dist[train] < t) & ~same[train]) / n_neg_train if n_neg_train else 0.0
            for t in val_grid
        ]
        thr = 0.0
        if max(fars) >= far_target:
            i = 0
            for j in range(len(val_grid) - 1):
                if fars[j] <= far_target:
                    i = j
            x0, x1, y0, y1 = fars[i], fars[i + 1], val_grid[i], val_grid[i + 1]
            thr = y1 if x1 == x0 else y0 + (far_target - x0) * (y1 - y0) / (x1 - x0)
        out["val_thr"].append(thr)
        accept = dist[test] < thr
        n_pos, n_neg = np.sum(same[test]), np.sum(~same[test])
        out["val"].append(np.sum(accept & same[test]) / n_pos if n_pos else 0.0)
        out["far"].append(np.sum(accept & ~same[test]) / n_neg if n_neg else 0.0)
    return out


def random_pairs(rng, n_pairs, dim, noise):
    same = rng.random(n_pairs) < 0.5
    anchor = rng.normal(size=(n_pairs, dim))
    other = np.where(same[:, None], anchor, rng.normal(size=(n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim), dtype=np.float32)
    emb[0::2] = anchor + noise * rng.normal(size=(n_pairs, dim))
    emb[1::2] = other + noise * rng.normal(size=(n_pairs, dim))
    return emb, same


def pairs_at_distances(dist):
    """2-D unit-vector pairs whose squared L2 distances are ``dist``."""
    theta = np.arccos(1 - np.asarray(dist, dtype=np.float64) / 2)
    emb = np.zeros((2 * len(dist), 2))
    emb[0::2, 0] = 1.0
    emb[1::2] = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return emb


def assert_matches(res, ref, far_target):
    assert res["fold_accuracies"] == [float(a) for a in ref["acc"]]
    assert res["fold_thresholds"] == [float(t) for t in ref["best"]]
    assert res["fold_val_thresholds"] == pytest.approx(ref["val_thr"], rel=1e-12, abs=1e-12)
    assert res["fold_val"] == [float(v) for v in ref["val"]]
    assert res["fold_far"] == [float(f) for f in ref["far"]]
    assert res["accuracy_mean"] == pytest.approx(np.mean(ref["acc"]))
    assert res["accuracy_std"] == pytest.approx(np.std(ref["acc"]))
    assert res["threshold"] == pytest.approx(np.mean(ref["best"]))
    assert res["val_insightface"] == pytest.approx(np.mean(ref["val"]))
    assert res["val_std_insightface"] == pytest.approx(np.std(ref["val"]))
    # measurable: each training split holds at least 1 / far_target impostor pairs
    impostors = min(ref["train_impostors"])
    assert res["val_impostor_pairs"] == impostors
    if far_target * impostors >= 1 - 1e-9:
        assert res["val"] == res["val_insightface"] and res["val_std"] == res["val_std_insightface"]
    else:
        assert res["val"] is None and res["val_std"] is None
    assert res["far"] == pytest.approx(np.mean(ref["far"]))


@pytest.mark.parametrize(
    ("seed", "n_pairs", "dim", "noise", "folds", "far_target"),
    [(0, 200, 16, 0.8, 10, 1e-2), (1, 203, 8, 0.5, 7, 5e-2), (2, 120, 4, 2.0, 3, 0.1)],
)
def test_random_pairs_match_brute_force(seed, n_pairs, dim, noise, folds, far_target):
    emb, same = random_pairs(np.random.default_rng(seed), n_pairs, dim, noise)
    res = evaluate(emb, same, nrof_folds=folds, far_target=far_target, val_thresholds=GRID)
    assert_matches(res, brute_force(emb, same, folds, far_target), far_target)
    assert 0.5 < res["accuracy_mean"] < 1.0
    assert res["num_pairs"] == n_pairs and len(res["fold_accuracies"]) == folds


def test_default_val_grid_and_exact_far_hit_match_brute_force():
    # 90 negatives in each training split, so FAR = 1/90 is met exactly over a range of grid
    # points: the segment must start at the last of them, as old scipy's slinear did.
    emb, _ = random_pairs(np.random.default_rng(3), 200, 8, 1.0)
    same = np.arange(200) % 2 == 0
    res = evaluate(emb, same, far_target=1 / 90)
    ref = brute_force(emb, same, 10, 1 / 90, val_grid=np.arange(0, 4, 0.001))
    assert_matches(res, ref, 1 / 90)
    assert res["val"] is not None  # exactly one impostor pair of 90 may pass: measurable


def test_structured_ties_and_single_class_folds_match_brute_force():
    rng = np.random.default_rng(4)
    emb = rng.integers(-2, 3, size=(2 * 150, 3)).astype(np.float64)  # many equal distances
    emb[10:20] = 0.0  # pairs 5-9: zero rows stay zero under normalisation (distance 0)
    same = np.arange(150) < 60  # the first folds hold only positives, the last only negatives
    res = evaluate(emb, same, nrof_folds=10, far_target=0.05, val_thresholds=GRID)
    assert_matches(res, brute_force(emb, same, 10, 0.05), 0.05)


def test_perfectly_separable_gives_accuracy_one():
    same = np.arange(100) % 2 == 0
    # Off the VAL grid: the interpolated threshold (2.500001 here) lands past the last grid point
    # with FAR 0, so negatives right at 2.5 would be accepted, as in insightface.
    emb = pairs_at_distances(np.where(same, 0.3003, 2.5005))
    res = evaluate(emb, same)
    assert res["accuracy_mean"] == 1.0 and res["accuracy_std"] == 0.0
    assert 0.3003 < res["threshold"] <= 2.51
    # 45 impostor pairs per training split cannot measure FAR 1e-3: insightface's VAL is kept
    assert res["val"] is None and res["val_insightface"] == 1.0 and res["far"] == 0.0


def test_identical_embeddings_give_chance_on_balanced_set():
    emb = np.ones((2 * 200, 8))
    same = np.arange(200) % 2 == 0
    res = evaluate(emb, same)
    assert res["fold_accuracies"] == [0.5] * 10
    # Distance 0 is never below threshold 0 (strict <), so the first (lowest) best is 0.0.
    assert res["fold_thresholds"] == [0.0] * 10


def test_scaling_rows_changes_nothing():
    rng = np.random.default_rng(5)
    emb, same = random_pairs(rng, 400, 16, 0.7)
    scale = 2.0 ** rng.integers(-8, 9, size=(800, 1))  # powers of two scale exactly
    assert evaluate(emb * scale, same) == evaluate(emb, same)
    # Without normalisation squared distances would grow ~ scale**2; the threshold would move.
    assert evaluate(emb * 3.0, same)["threshold"] == pytest.approx(evaluate(emb, same)["threshold"])


def test_folds_are_contiguous_in_file_order():
    # First half: positives at 0.505, negatives at 1.505. Second half: 2.505 and 3.505. With two
    # contiguous folds each threshold learnt on one half fails on the other.
    same = np.tile([True, False], 20)
    dist = np.where(same, 0.505, 1.505)
    dist[20:] += 2.0
    emb = pairs_at_distances(dist)
    res = evaluate(emb, same, nrof_folds=2)
    assert res["fold_thresholds"] == [GRID[251], GRID[51]]
    assert res["fold_accuracies"] == [0.5, 0.5]
    # Interleaving the halves (as a shuffled split would) makes both folds alike: 75%.
    order = np.stack([np.arange(20), np.arange(20, 40)], axis=1).ravel()
    mixed = emb.reshape(40, 2, 2)[order].reshape(80, 2)
    assert evaluate(mixed, same[order], nrof_folds=2)["accuracy_mean"] == 0.75


def test_unreachable_far_gives_threshold_zero():
    # All negatives are antipodal (distance 4): no grid threshold ever accepts one.
    same = np.arange(40) % 2 == 0
    res = evaluate(pairs_at_distances(np.where(same, 0.2, 4.0)), same)
    assert res["fold_val_thresholds"] == [0.0] * 10
    assert res["val_insightface"] == 0.0 and res["far"] == 0.0
    assert res["accuracy_mean"] == 1.0


def test_far_target_on_last_two_grid_points_takes_last_point():
    # Training FAR on grid [0, 1, 2] is [0, 0.5, 0.5]: old scipy's spline gave 0.0 here.
    same = np.tile([True, False, False], 10)
    dist = np.tile([0.1, 0.5, 4.0], 10)
    res = evaluate(pairs_at_distances(dist), same, far_target=0.5, val_thresholds=[0.0, 1.0, 2.0])
    assert res["fold_val_thresholds"] == [2.0] * 10
    assert res["val"] == 1.0 and res["far"] == 0.5


def test_fine_val_grid_interpolates_between_grid_points():
    # Each fold: 10 positives at 0.05, negatives at 0.1003, 0.2003, ..., 1.0003. On the 0.001
    # grid the training FAR is 0.1 up to 0.200 and 0.2 from 0.201: FAR 0.15 lies halfway.
    neg = np.linspace(0.1, 1.0, 10) + 0.0003
    dist = np.tile(np.r_[[0.05] * 10, neg], 10)
    same = np.tile(np.r_[[True] * 10, [False] * 10], 10)
    res = evaluate(pairs_at_distances(dist), same, far_target=0.15)
    assert res["fold_val_thresholds"] == pytest.approx([0.2005] * 10)
    assert res["val"] == 1.0 and res["far"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": np.zeros((5, 4))}, "expected 2 \\* len\\(issame\\) = 6"),
        ({"issame": np.zeros((3, 1), dtype=bool)}, "1-D bool"),
        ({"issame": np.array([0, 1, 2])}, "only 0/1"),
        ({"nrof_folds": 1}, "nrof_folds must be in \\[2, number of pairs = 3\\], got 1"),
        ({"nrof_folds": 4}, "got 4"),
        ({"nrof_folds": 2.0}, "nrof_folds must be an int"),
        ({"far_target": 1.5}, "far_target must be in \\[0, 1\\], got 1.5"),
        ({"thresholds": [0.5, 0.2]}, "strictly increasing"),
        ({"val_thresholds": [0.1]}, "at least 2"),
        ({"val_thresholds": [2.5, 3.0]}, "start val_thresholds lower"),
    ],
)
def test_evaluate_rejects_bad_input(kwargs, message):
    args = {"embeddings": np.eye(6, 4), "issame": np.array([True, False, True]), "nrof_folds": 2}
    args |= kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate(**args)


def test_evaluate_names_count_and_row_of_non_finite_values():
    emb = np.ones((8, 3))
    emb[5, 1] = np.nan
    emb[6] = np.inf
    with pytest.raises(ValueError, match="4 NaN/inf values in 2 rows \\(first at row 5, pair 2\\)"):
        evaluate(emb, np.ones(4, dtype=bool), nrof_folds=2)


def first_two_pixels(x: torch.Tensor) -> torch.Tensor:
    """Not flip-invariant: the first two red values of the first row."""
    assert torch.is_inference_mode_enabled()
    return x[:, 0, 0, :2]


def test_embed_pairs_sums_image_and_flip_and_reports_single_norms():
    row = np.array([0, 255, 51, 102], dtype=np.uint8)  # -> -1, 1, -0.6, -0.2
    images = np.zeros((3, 1, 4, 3), dtype=np.uint8)
    images[:, 0, :, 0] = row
    images[2, 0, :, 0] = row[::-1]
    fused, xnorm = embed_pairs(images, first_two_pixels, batch_size=2)
    # Image: [-1, 1]; flip: [-0.2, -0.6]. The reversed image gives them the other way round.
    expected = np.array([[-1.2, 0.4], [-1.2, 0.4], [-1.2, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(fused, expected, rtol=1e-6)
    assert fused.dtype == np.float32
    # XNorm averages the single embeddings' norms, not the fused ones (|[-1.2, 0.4]| = 1.265).
    assert xnorm == pytest.approx((np.sqrt(2) + np.sqrt(0.4)) / 2)
    # e + e_flip does not change when the images are mirrored (a negative-stride view here).
    np.testing.assert_array_equal(embed_pairs(images[:, :, ::-1], first_two_pixels)[0], fused)
    no_flip, xnorm_single = embed_pairs(torch.from_numpy(images), first_two_pixels, flip=False)
    np.testing.assert_allclose(no_flip[:2], [[-1, 1], [-1, 1]])
    np.testing.assert_allclose(no_flip[2], [-0.2, -0.6], rtol=1e-6)
    assert xnorm_single == pytest.approx((2 * np.sqrt(2) + np.sqrt(0.4)) / 3)


def test_embed_pairs_resizes_to_input_size():
    shapes = []

    def mean_colour(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    images = np.full((5, 12, 10, 3), (255, 0, 102), dtype=np.uint8)
    fused, _ = embed_pairs(images, mean_colour, batch_size=4, input_size=6)
    assert shapes == [(4, 3, 6, 6), (4, 3, 6, 6), (1, 3, 6, 6), (1, 3, 6, 6)]
    np.testing.assert_allclose(fused, np.tile([2.0, -2.0, -0.4], (5, 1)), rtol=1e-5)


@pytest.mark.parametrize("input_size", [5, 13])
def test_embed_pairs_resizes_like_eval_transform(input_size):
    images = np.random.default_rng(7).integers(0, 256, size=(3, 9, 9, 3), dtype=np.uint8)
    fused, _ = embed_pairs(images, lambda x: x.flatten(1), flip=False, input_size=input_size)
    transform = EvalTransform(input_size)
    expected = np.stack([transform(im).flatten().numpy() for im in images])
    np.testing.assert_allclose(fused, expected, atol=1e-6)


def test_embed_pairs_rejects_bad_images_and_outputs():
    with pytest.raises(ValueError, match=r"uint8 RGB, got float32 \(2, 4, 4, 3\)"):
        embed_pairs(np.zeros((2, 4, 4, 3), dtype=np.float32), first_two_pixels)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        embed_pairs(np.zeros((3, 4, 4), dtype=np.uint8), first_two_pixels)
    with pytest.raises(ValueError, match="must return a \\(batch, d\\) tensor, got \\(2,\\)"):
        embed_pairs(np.zeros((2, 4, 4, 3), dtype=np.uint8), lambda x: x[:, 0, 0, 0])


def test_verify_bin_embeds_file_with_flip(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    images[1::4] = images[0::4]  # even pairs are the same image
    issame = np.arange(20) % 2 == 0
    path = tmp_path / "tiny_lfw.bin"
    write_bin(path, [encode_image(im, "png") for im in images], issame)
    weight = torch.from_numpy(rng.normal(size=(3 * 8 * 8, 5)).astype(np.float32))

    def linear(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight

    res = verify_bin(path, linear, batch_size=16, nrof_folds=4)
    fused, xnorm = embed_pairs(images, linear, batch_size=16)
    assert res == {**evaluate(fused, issame, nrof_folds=4), "xnorm": xnorm, "name": "tiny_lfw"}
    assert res["accuracy_mean"] == 1.0


def _val(val: float, std: float = 0.01, measurable: bool = True) -> dict:
    return {
        "val": val if measurable else None,
        "val_std": std if measurable else None,
        "val_insightface": val,
        "val_std_insightface": std,
        "val_impostor_pairs": 2700 if measurable else 450,
        "min_measurable_far": 1 / 2700 if measurable else 1 / 450,
    }


def test_format_results_table():
    base = {"far_target": 1e-3, "threshold": 1.234, "accuracy_std": 0.005}
    results = {
        "lfw": base | {"accuracy_mean": 0.995, "xnorm": 22.5} | _val(0.98),
        "cfp_fp": base | {"accuracy_mean": 0.9} | _val(0.5),
    }
    lines = format_results(results).splitlines()
    assert len(lines) == 5
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "set",
        "accuracy (%)",
        "threshold",
        "XNorm",
        "VAL@FAR=0.001 (%)",
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0] == ["lfw", "99.50 ± 0.50", "1.234", "22.50", "98.00 ± 1.00"]
    assert cells[1] == ["cfp_fp", "90.00 ± 0.50", "1.234", "-", "50.00 ± 1.00"]
    assert cells[2] == ["average", "94.75", "-", "22.50", "74.00"]
    with pytest.raises(ValueError, match="one far_target"):
        format_results({"a": results["lfw"], "b": results["cfp_fp"] | {"far_target": 1e-4}})
    with pytest.raises(ValueError, match="empty"):
        format_results({})


def test_format_results_marks_val_it_cannot_measure():
    base = {"far_target": 1e-3, "threshold": 1.0, "accuracy_mean": 0.9, "accuracy_std": 0.01}
    results = {"lfw": base | _val(0.8), "small": base | _val(0.25, 0.05, measurable=False)}
    table, note = format_results(results).split("\n\n")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [row[4] for row in cells] == ["80.00 ± 1.00", "n/m", "n/m"]  # the average too
    assert note.startswith("n/m: not measurable (")
    assert "small 450 (FAR >= 0.00222)" in note and "lfw" not in note
    table, note = format_results(results, "insightface").split("\n\n")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [row[4] for row in cells] == ["80.00 ± 1.00", "25.00 ± 5.00*", "52.50*"]
    assert note.startswith("*: not measurable (") and "insightface's reading" in note
    with pytest.raises(ValueError, match="far reading must be one of"):
        format_results(results, "closest")


def test_val_below_one_training_impostor_is_not_measurable():
    # 200 pairs, every other one impostor, 10 folds: 90 impostor pairs per training split, so
    # FAR >= 1/90 is measurable and 1/100 is not; insightface's number stays available
    emb, _ = random_pairs(np.random.default_rng(8), 200, 8, 1.0)
    same = np.arange(200) % 2 == 0
    ref = brute_force(emb, same, 10, 0.01)
    low = evaluate(emb, same, far_target=0.01, val_thresholds=GRID)
    assert low["val_impostor_pairs"] == 90 and low["min_measurable_far"] == 1 / 90
    assert low["val"] is None and low["val_std"] is None
    assert low["val_insightface"] == pytest.approx(np.mean(ref["val"]))
    assert low["fold_val"] == [float(v) for v in ref["val"]]
    high = evaluate(emb, same, far_target=0.02, val_thresholds=GRID)
    assert high["val"] == pytest.approx(np.mean(brute_force(emb, same, 10, 0.02)["val"]))
