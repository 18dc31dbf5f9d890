"""Face alignment: similarity transforms against hand computations, and the warped crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from robustface.deploy import (
    ARCFACE_TEMPLATE,
    align_face,
    align_faces,
    arcface_template,
    similarity_transform,
    similarity_transforms,
)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _umeyama_svd(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991), eq. 40-42, written out with an SVD (as skimage does)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    p, q = src - mu_s, dst - mu_d
    cov = q.T @ p / len(src)
    u, sv, vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rot = u @ d @ vt
    scale = np.trace(np.diag(sv) @ d) / (p**2).sum(1).mean()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def test_template_is_insightface_and_synthface():
    insightface_96x112 = [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                          [33.5493, 92.3655], [62.7299, 92.2041]]  # fmt: skip
    expected = np.array(insightface_96x112) + np.array([8.0, 0.0])
    np.testing.assert_allclose(ARCFACE_TEMPLATE, expected, atol=1e-4)
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_TEMPLATE, rtol=1e-6)


@pytest.mark.parametrize("size", [56, 112, 128, 160, 224])
def test_template_rules(size):
    # insightface's estimate_norm, written out: multiples of 112 scale by size/112; other sizes
    # scale by size/128 and shift x by 8 * size/128
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    else:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    insightface = ARCFACE_TEMPLATE * ratio + np.array([shift, 0.0])
    np.testing.assert_allclose(arcface_template(size, "insightface"), insightface, atol=1e-6)
    np.testing.assert_allclose(arcface_template(size), ARCFACE_TEMPLATE * size / 112, atol=1e-6)
    if size == 128:  # the two rules differ where insightface uses its 128 px crop
        assert np.abs(arcface_template(size) - insightface).max() > 1.0
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE * 1.3 + 20 + rng.normal(0, 1, (5, 2))
    crop = align_face(image, landmarks, size, rule="insightface")
    matrix = similarity_transform(landmarks, insightface)
    expected = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)
    diff = np.abs(crop.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # warpAffine's fixed-point rounding
    with pytest.raises(ValueError, match="rule must be one of"):
        arcface_template(size, "mtcnn")


def test_recovers_a_known_similarity_exactly():
    # A face whose landmarks are the template scaled by 1.7, rotated 25 deg and moved: aligning
    # must undo exactly that, i.e. scale 1/1.7, rotation -25 deg, translation -R^T t / s.
    s, deg, t = 1.7, 25.0, np.array([40.0, -12.5])
    forward = _similarity(s, deg, *t)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    back = _similarity(1 / s, -deg, 0.0, 0.0)
    back[:, 2] = -back[:, :2] @ t
    np.testing.assert_allclose(matrix, back, atol=1e-5)
    np.testing.assert_allclose(_apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-4)


def test_least_squares_matches_independent_formulas():
    rng = np.random.default_rng(3)
    for _ in range(20):
        src = rng.uniform(0, 300, (5, 2))
        dst = _apply(_similarity(rng.uniform(0.2, 3), rng.uniform(-180, 180), 5, 7), src)
        dst += rng.normal(0, 4, dst.shape)  # not an exact similarity: least squares
        got = similarity_transform(src, dst)
        np.testing.assert_allclose(got, _umeyama_svd(src, dst), atol=1e-8)
        # linear least squares over x' = a x - b y + tx, y' = b x + a y + ty
        rows = np.zeros((10, 4))
        rows[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)]
        rows[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]
        a, b, tx, ty = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(got, [[a, -b, tx], [b, a, ty]], atol=1e-8)


def test_never_reflects():
    src = ARCFACE_TEMPLATE.astype(np.float64)
    mirrored = src * [-1.0, 1.0]  # the best reflection would fit exactly; a similarity cannot
    matrix = similarity_transform(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    np.testing.assert_allclose(matrix, _umeyama_svd(src, mirrored), atol=1e-8)


def test_batched_equals_single():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (7, 5, 2))
    batched = similarity_transforms(src, ARCFACE_TEMPLATE)
    assert batched.shape == (7, 2, 3)
    for i in range(7):
        np.testing.assert_allclose(batched[i], similarity_transform(src[i], ARCFACE_TEMPLATE))
    per_row_dst = rng.uniform(0, 100, (7, 5, 2))
    np.testing.assert_allclose(
        similarity_transforms(src, per_row_dst)[3], similarity_transform(src[3], per_row_dst[3])
    )


def test_align_face_undoes_a_loose_crop():
    # A smooth "aligned face" placed into a larger canvas by a known similarity (as SynthFace's
    # loose crops are) comes back from its landmarks, up to bilinear resampling.
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32)
    face = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).clip(0, 255).astype(np.uint8)
    forward = _similarity(1.3, -12.0, 50.0, 30.0)
    canvas = cv2.warpAffine(face, forward, (260, 260), flags=cv2.INTER_LINEAR)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    crop = align_face(canvas, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    inner = (slice(8, 104), slice(8, 104))
    diff = np.abs(crop[inner].astype(int) - face[inner].astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 4
    # the same as warping by the hand-computed inverse
    inverse = cv2.invertAffineTransform(forward)
    np.testing.assert_allclose(
        similarity_transform(landmarks, ARCFACE_TEMPLATE), inverse, atol=1e-5
    )
    by_hand = cv2.warpAffine(canvas, inverse, (112, 112), flags=cv2.INTER_LINEAR)
    assert np.abs(crop.astype(int) - by_hand.astype(int)).max() <= 1
    # other sizes: the template scales with the crop
    big = align_face(canvas, landmarks, size=224)
    small_again = cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(small_again[inner].astype(int) - crop[inner].astype(int)).mean() < 2.0
    batch = align_faces([canvas, canvas[:200]], np.stack([landmarks, landmarks]))
    np.testing.assert_array_equal(batch[0], crop)


def test_bad_inputs():
    good = ARCFACE_TEMPLATE
    with pytest.raises(ValueError, match=r"landmarks must have shape \(5, 2\)"):
        align_face(np.zeros((50, 50, 3), np.uint8), good[:4])
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        align_face(np.zeros((50, 50), np.uint8), good)
    with pytest.raises(ValueError, match="NaN"):
        similarity_transform(np.full((5, 2), np.nan), good)
    with pytest.raises(ValueError, match="all its points at one place"):
        similarity_transform(np.ones((5, 2)), good)
    with pytest.raises(ValueError, match="dst must have the shape"):
        similarity_transform(good, good[:3])
    with pytest.raises(ValueError, match=r"landmarks must have shape \(1, 5, 2\)"):
        align_faces([np.zeros((9, 9, 3), np.uint8)], np.zeros((2, 5, 2)))
