"""SynthFace identities and renderer: determinism, identity ranges, siblings, geometry, quality."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from robustface.data.image import encode_image
from robustface.data.synth.identity import PARAM_NAMES, Identity, make_identities
from robustface.data.synth.render import (
    ARCFACE_TEMPLATE,
    OCCLUSIONS,
    PROFILES,
    SKETCH_STYLES,
    Nuisance,
    make_grid,
    quality_score,
    render_face,
    render_nonface,
    render_sketch,
    sample_nuisance,
)


def _nuisances(profile: str, count: int, seed: int = 0) -> list[Nuisance]:
    rng = np.random.default_rng(seed)
    return [sample_nuisance(rng, profile) for _ in range(count)]


# --- identities ----------------------------------------------------------------------------------


def test_identity_ranges_are_stable_and_disjoint() -> None:
    long, short = make_identities(7, 0, 40), make_identities(7, 0, 15)
    assert long[:15] == short
    assert [i.id for i in make_identities(7, 40, 5)] == [40, 41, 42, 43, 44]
    singles = [make_identities(7, i, 1)[0] for i in range(40)]
    for mine, alone in zip(long, singles, strict=True):
        assert alone.sibling_of is None  # never a sibling across a range start
        if mine.sibling_of is None:
            assert mine == alone
        else:
            assert mine.sibling_of == mine.id - 1
            assert not np.array_equal(mine.params, alone.params)
    assert make_identities(8, 0, 15) != short  # the benchmark seed matters


def test_sibling_rate_and_first_identity() -> None:
    ids = make_identities(3, 100, 400, sibling_rate=0.3)
    rate = np.mean([i.sibling_of is not None for i in ids])
    assert 0.22 < rate < 0.38
    assert ids[0].sibling_of is None
    assert all(i.sibling_of is None for i in make_identities(3, 100, 50, sibling_rate=0.0))


def test_siblings_are_close_but_distinct() -> None:
    ids = make_identities(5, 0, 300, sibling_rate=0.3)
    by_id = {i.id: i for i in ids}
    sib = [np.abs(i.params - by_id[i.sibling_of].params).mean() for i in ids if i.sibling_of]
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(ids), size=(200, 2))
    rand = [np.abs(ids[a].params - ids[b].params).mean() for a, b in pairs if a != b]
    assert len(sib) > 30
    assert np.mean(sib) < 0.5 * np.mean(rand)
    assert min(sib) > 0.0


def test_identity_validates_and_freezes_params() -> None:
    with pytest.raises(ValueError, match="params must have shape"):
        Identity(0, np.zeros(3))
    ident = make_identities(0, 0, 1)[0]
    assert ident.params.shape == (len(PARAM_NAMES),) and ident.params.dtype == np.float32
    assert ident.params.min() >= 0.0 and ident.params.max() <= 1.0
    with pytest.raises(ValueError):
        ident.params[0] = 0.5
    assert ident.param("skin_tone") == pytest.approx(
        float(ident.params[PARAM_NAMES.index("skin_tone")])
    )
    with pytest.raises(KeyError, match="skin_tone"):
        ident.param("skin_colour")


# --- nuisance and quality ------------------------------------------------------------------------


def test_sample_nuisance_is_deterministic_and_checks_profile() -> None:
    for profile in PROFILES:
        assert _nuisances(profile, 5, seed=3) == _nuisances(profile, 5, seed=3)
    assert _nuisances("train", 5, seed=3) != _nuisances("train", 5, seed=4)
    with pytest.raises(ValueError, match="low_quality"):
        sample_nuisance(np.random.default_rng(0), "lowquality")


def test_profiles_have_their_pose_ranges() -> None:
    frontal = np.degrees([abs(n.yaw) for n in _nuisances("frontal", 300)])
    profile = np.degrees([abs(n.yaw) for n in _nuisances("profile", 300)])
    assert frontal.max() <= 20.0
    assert profile.min() >= 60.0 and profile.max() <= 85.0
    signs = np.sign([n.yaw for n in _nuisances("profile", 300)])
    assert 0.3 < np.mean(signs > 0) < 0.7
    clean = _nuisances("clean", 3)[0]
    assert (clean.yaw, clean.blur_sigma, clean.noise_sigma, clean.occlusion) == (0, 0, 0, "none")
    train = _nuisances("train", 1000)
    assert {n.occlusion for n in train} == set(OCCLUSIONS)


def test_difficulty_scales_nuisance() -> None:
    def mean_abs(field: str, difficulty: float) -> float:
        rng = np.random.default_rng(1)
        values = [getattr(sample_nuisance(rng, "train", difficulty), field) for _ in range(300)]
        return float(np.mean(np.abs(values)))

    for field in ("yaw", "blur_sigma", "noise_sigma"):
        assert mean_abs(field, 0.0) == 0.0
        assert mean_abs(field, 0.5) < mean_abs(field, 1.0) < mean_abs(field, 1.5)
    with pytest.raises(ValueError, match="difficulty"):
        sample_nuisance(np.random.default_rng(0), "train", difficulty=-1.0)


def test_quality_score_orders_nuisance() -> None:
    assert quality_score(Nuisance()) == pytest.approx(1.0)
    means = {p: np.mean([quality_score(n) for n in _nuisances(p, 200)]) for p in PROFILES}
    assert means["clean"] > means["frontal"] > means["train"] > means["low_quality"]
    assert means["frontal"] > means["profile"]
    blurs = [quality_score(Nuisance(blur_sigma=s)) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(blurs))
    for n in _nuisances("low_quality", 50):
        assert 0.0 <= quality_score(n) <= 1.0


# --- rendering -----------------------------------------------------------------------------------


def test_render_is_byte_identical_for_same_inputs() -> None:
    a, b = make_identities(1, 0, 2)
    for n in _nuisances("train", 6):
        first = encode_image(render_face(a, n).image, quality=n.jpeg_quality)
        again = encode_image(render_face(a, n).image, quality=n.jpeg_quality)
        other = encode_image(render_face(b, n).image, quality=n.jpeg_quality)
        assert first == again
        assert first != other
    n = _nuisances("train", 1)[0]
    assert not np.array_equal(
        render_face(a, n).image, render_face(a, dataclasses.replace(n, seed=n.seed + 1)).image
    )


def test_render_output_contract() -> None:
    ident = make_identities(2, 0, 1)[0]
    for size in (64, 112, 160):
        out = render_face(ident, Nuisance(), size=size)
        assert out.image.shape == (size, size, 3) and out.image.dtype == np.uint8
        assert out.landmarks.shape == (5, 2) and out.landmarks.dtype == np.float32
        assert np.abs(out.landmarks * 112.0 / size - ARCFACE_TEMPLATE).max() < 8.0
        assert out.quality == pytest.approx(1.0)
    with pytest.raises(ValueError, match="size"):
        render_face(ident, Nuisance(), size=8)


def test_frontal_landmarks_match_arcface_template() -> None:
    errors = [
        np.linalg.norm(render_face(i, Nuisance()).landmarks - ARCFACE_TEMPLATE, axis=1).mean()
        for i in make_identities(4, 0, 30)
    ]
    assert np.mean(errors) < 2.5
    assert max(errors) < 3.5


def test_landmarks_follow_yaw() -> None:
    for ident in make_identities(6, 0, 5):
        marks = {
            y: render_face(ident, Nuisance(yaw=y)).landmarks for y in (-0.9, -0.45, 0.0, 0.45, 0.9)
        }
        nose = {y: m[2, 0] for y, m in marks.items()}
        eyes = {y: m[1, 0] - m[0, 0] for y, m in marks.items()}
        assert (
            nose[0.45] > nose[0.0] + 5.0 and nose[-0.45] < nose[0.0] - 5.0
        )  # yaw > 0: to the right
        assert eyes[0.0] > eyes[0.45] > eyes[0.9] and eyes[0.0] > eyes[-0.45] > eyes[-0.9]
        up = render_face(ident, Nuisance(pitch=0.4)).landmarks
        assert up[2, 1] < marks[0.0][2, 1] - 3.0  # pitch > 0 tilts the face up


def test_pose_and_expression_change_pixels_where_expected() -> None:
    ident = make_identities(9, 0, 1)[0]
    base = render_face(ident, Nuisance()).image.astype(np.int16)
    turned = render_face(ident, Nuisance(yaw=1.2)).image.astype(np.int16)
    smiling = render_face(ident, Nuisance(smile=1.0, mouth_open=1.0)).image.astype(np.int16)
    assert np.abs(turned - base).mean() > 10.0
    diff = np.abs(smiling - base).sum(axis=2)
    mouth_rows, eye_rows = diff[82:105].sum(), diff[40:60].sum()
    assert mouth_rows > 20 * max(eye_rows, 1)


def test_degradations_remove_detail() -> None:
    ident = make_identities(9, 0, 1)[0]

    def detail(**kw: float) -> float:
        img = render_face(ident, Nuisance(**kw)).image.astype(np.float32).mean(axis=2)
        return float(np.abs(np.diff(img, axis=1)).mean())

    sharp = detail()
    assert detail(blur_sigma=2.0) < 0.7 * sharp
    assert detail(lowres_factor=4.0) < 0.8 * sharp
    assert detail(noise_sigma=15.0) > 1.5 * sharp


def test_mean_colour_does_not_reveal_identity() -> None:
    ids = make_identities(11, 0, 50)
    feats, labels = [], []
    for ident in ids:
        for n in _nuisances("train", 8, seed=ident.id):
            feats.append(render_face(ident, n).image.reshape(-1, 3).mean(axis=0))
            labels.append(ident.id)
    x, y = np.array(feats), np.array(labels)
    correct = 0
    for i in range(len(x)):  # leave-one-out nearest class mean
        keep = np.arange(len(x)) != i
        means = np.stack([x[keep & (y == c)].mean(axis=0) for c in range(50)])
        correct += int(np.argmin(((means - x[i]) ** 2).sum(axis=1)) == y[i])
    assert correct / len(x) < 0.2
    # ... while identities themselves stay far apart in parameter space
    params = np.stack([i.params for i in ids])
    dist = np.abs(params[:, None] - params[None]).mean(axis=2)
    assert dist[~np.eye(50, dtype=bool)].min() > 0.02


def test_sketch_and_nonface_are_valid_images() -> None:
    ident = make_identities(1, 0, 1)[0]
    face = render_face(ident, Nuisance(seed=0)).image
    for seed in range(len(SKETCH_STYLES)):
        out = render_sketch(ident, Nuisance(seed=seed))
        assert out.image.shape == (112, 112, 3) and out.image.dtype == np.uint8
        assert out.image.std() > 10.0
        assert np.abs(out.image.astype(int) - face).mean() > 10.0
        assert out.landmarks.shape == (5, 2)
    rng = np.random.default_rng(0)
    images = [render_nonface(rng) for _ in range(20)]
    for img in images:
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert len({img.tobytes() for img in images}) == 20
    assert np.array_equal(
        render_nonface(np.random.default_rng(5)), render_nonface(np.random.default_rng(5))
    )


def test_make_grid_tiles_images() -> None:
    tiles = [np.full((4, 6, 3), v, np.uint8) for v in (10, 20, 30)] + [
        np.full((4, 6), 40, np.uint8)
    ]
    grid = make_grid(tiles, ncols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    assert (
        grid[1, 1, 0] == 10 and grid[1, 8, 0] == 20 and grid[1, 15, 0] == 30 and grid[6, 1, 0] == 40
    )
    assert grid[0, 0, 0] == 255 and grid[6, 8, 0] == 255
    with pytest.raises(ValueError, match="same height"):
        make_grid([np.zeros((4, 6, 3), np.uint8), np.zeros((5, 6, 3), np.uint8)])
