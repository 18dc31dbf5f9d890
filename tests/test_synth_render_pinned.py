"""SynthFace's data is pinned: speed-ups of the renderer must not change a single byte.

``PINNED`` holds SHA-256 prefixes of fixed samples of every kind (face profiles, exposure paths,
occluders, the three sketch styles at two sizes, non-faces) and of identity models built from
scratch. They were recorded from the renderer before the generation-rate work (commit a103c02,
``src/robustface/data/synth/render.py`` checked out, ``_digests()`` below printed). The other
tests check each optimised step against the straightforward operation it replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import pytest

from robustface.data.synth import render
from robustface.data.synth.identity import Identity, make_identities
from robustface.data.synth.render import OCCLUSIONS, PROFILES, sample_nuisance

PINNED = {
    "train-0": "6b9e63ef6ea2c689",
    "train-1": "eda7e0cb1110bfb5",
    "train-2": "881ad69357242140",
    "frontal-0": "428319345a61f239",
    "frontal-1": "3ff094f721888034",
    "frontal-2": "1ccba1651e07e4e9",
    "profile-0": "355705c5e61fc3cd",
    "profile-1": "2f940f7eb97afabf",
    "profile-2": "cba264a08a7d6b39",
    "low_quality-0": "bc22ffa9d3de3356",
    "low_quality-1": "c550cc7f2f245a49",
    "low_quality-2": "51feceee1495ce08",
    "clean-0": "d3d430535e14f65f",
    "clean-1": "3b5e1e4fba100276",
    "clean-2": "faade35a3bcf4f93",
    "gamma": "d6fa9af7e8c4e087",
    "brighter": "d27a264a82096e11",
    "darker": "9f97ecb6e2bed45f",
    "occlusion-glasses": "a496bebb7106f6ec",
    "occlusion-sunglasses": "65c12edcfbee1dce",
    "occlusion-mask": "a30c942b39a41cbe",
    "occlusion-bar": "adf797e1a86af44e",
    "occlusion-hand": "b79683d0a3d1f627",
    "sketch-cartoon-112": "1309f878f5dd0af1",
    "sketch-lines-112": "771a495d9b7bf097",
    "sketch-pencil-112": "6c59833f895dc3ad",
    "sketch-cartoon-80": "a7704a96ccf4cd94",
    "sketch-lines-80": "370e33a4b62cea66",
    "sketch-pencil-80": "50155c47980e7bc1",
    "nonface-0": "a4a6c0c75513c0fd",
    "nonface-1": "a1bd3f16aca08be2",
    "nonface-2": "ce9667f129c3e92c",
    "nonface-3": "e4591ed0ba4228b7",
    "nonface-4": "14c8814461ce70fe",
    "model-0": "44b09196e2fc70e6",
    "model-1": "e9b32686e9e2cbf5",
    "model-2": "7a4494de0657bda8",
    "model-3": "0424856dbc737979",
    "model-4": "80c4e382f3a28430",
    "model-5": "aa411db35b7b0323",
    "model-6": "2e554a6c214f2513",
    "model-7": "2ff6df380e8184d9",
    "model-8": "124312c3953fdf08",
    "model-9": "0bc831813d48ffe6",
    "model-10": "b8a681b00f4c4205",
    "model-11": "a39fd0115f60da08",
    "model-12": "3403f37ddbca7761",
    "model-13": "f09c09783260a95b",
    "model-14": "c04ebad90bf4f4ba",
    "model-15": "d55032639db690c4",
    "model-16": "830d0c6e4d749c67",
    "model-17": "192b5a72c0cdb2b9",
    "model-18": "b7a554ec039ccaeb",
    "model-19": "dcfa4d9cb2eb5184",
    "model-20": "3d0e4157d69dbde9",
    "model-21": "18c0bf9bca1496d1",
    "model-22": "883ae038ddaa2500",
    "model-23": "8d18585ddf4d3b36",
    "model-24": "ac36dce98a8832e9",
    "model-25": "1d5810dfde490221",
    "model-26": "d66c1f92f80540d0",
    "model-27": "86e6f853ba1c5618",
    "model-28": "e6b09e50c65184b2",
    "model-29": "a4b0488058bbe9af",
}

# geometric outputs of a model build (colours and styles show in the rendered samples)
_MODEL_ARRAYS = (
    "static", "normals", "dyn0", "dyn_smile", "dyn_open", "dyn_raise", "eye_base", "eye_ty",
    "pu", "pl", "disc_v", "disc_pu", "disc_pl", "crease_v", "lens", "lens_u", "lens_v", "mask",
    "mask_d", "pivot", "align_pivot",
)  # fmt: skip


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _samples() -> list[tuple[str, str, Identity | None, object, int]]:
    """(name, renderer, identity, nuisance or non-face seed, size) of every pinned sample."""
    ids = make_identities(11, 0, 6)
    rng = np.random.default_rng(2024)
    out: list[tuple[str, str, Identity | None, object, int]] = []
    for k, profile in enumerate(PROFILES):
        for j in range(3):
            n = sample_nuisance(rng, profile)
            out.append((f"{profile}-{j}", "face", ids[(k + j) % 6], n, 112))
    base = sample_nuisance(rng, "train")
    exposures = {  # _light's gamma curve, brightness up (cv2.add), down (cv2.subtract)
        "gamma": dict(gamma=1.3, brightness=0.04),
        "brighter": dict(gamma=1.0, brightness=0.06),
        "darker": dict(gamma=1.0, brightness=-0.06, contrast=1.2),
    }
    for name, change in exposures.items():
        out.append((name, "face", ids[1], dataclasses.replace(base, **change), 112))
    for j, occlusion in enumerate(OCCLUSIONS[1:]):
        n = dataclasses.replace(sample_nuisance(rng, "low_quality"), occlusion=occlusion)
        out.append((f"occlusion-{occlusion}", "face", ids[j % 6], n, 112))
    for j, size in enumerate((112, 112, 112, 80, 80, 80)):
        n = dataclasses.replace(sample_nuisance(rng, "train"), seed=1000 + 3 * j + j % 3)
        style = render.SKETCH_STYLES[n.seed % 3]
        out.append((f"sketch-{style}-{size}", "sketch", ids[j % 6], n, size))
    for seed in range(5):
        out.append((f"nonface-{seed}", "nonface", None, seed, 112))
    return out


def _digests() -> dict[str, str]:
    """Digest of each sample's pixels, landmarks and quality, and of the models of 30 identities
    (built here from their genes, so never taken from the model cache)."""
    out = {}
    for name, kind, identity, nuisance, size in _samples():
        if kind == "nonface":
            image = render.render_nonface(np.random.default_rng(nuisance), size)
            out[name] = _digest(image.tobytes())
            continue
        fn = render.render_sketch if kind == "sketch" else render.render_face
        r = fn(identity, nuisance, size)
        out[name] = _digest(r.image.tobytes(), r.landmarks.tobytes(), repr(r.quality).encode())
    for identity in make_identities(12, 0, 30):
        m = render._build_model(identity.params)
        arrays = [np.asarray(getattr(m, a), np.float64).tobytes() for a in _MODEL_ARRAYS]
        out[f"model-{identity.id}"] = _digest(*arrays, repr(m.s_id).encode())
    return out


def test_rendered_samples_and_models_are_pinned() -> None:
    digests = _digests()
    assert digests.keys() == PINNED.keys()
    changed = [name for name in PINNED if digests[name] != PINNED[name]]
    assert not changed, f"these samples differ from the pinned data: {changed}"


@pytest.mark.parametrize("size", [16, 80, 112, 224])
def test_pencil_blur_is_cv2_gaussian_blur(size: int) -> None:
    rng = np.random.default_rng(size)
    noise = rng.integers(0, 256, (size, size), dtype=np.uint8)
    smooth = cv2.resize(rng.integers(0, 256, (5, 5), dtype=np.uint8), (size, size))
    for gray in (noise, smooth, 255 - smooth):
        expected = cv2.GaussianBlur(gray, (0, 0), 2.0 * size / 112.0)
        np.testing.assert_array_equal(render._pencil_blur(gray), expected)
    if size == 112:  # the default size takes the exact float32 path, with this integer kernel
        kernel = render._pencil_kernel(size)
        assert kernel.tolist() == [1, 2, 7, 16, 31, 45, 52, 45, 31, 16, 7, 2, 1]


def test_sketch_tables_reproduce_the_arithmetic_they_replace() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    img[0, : 256 // 3 + 1] = np.arange(256 // 3 + 1)[:, None] * 3  # every level of each channel
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    pencil = (cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB) * np.array([1.0, 0.97, 0.9])).astype(np.uint8)
    np.testing.assert_array_equal(
        cv2.LUT(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), render._PENCIL_LUT), pencil
    )
    np.testing.assert_array_equal(cv2.LUT(img, render._POSTER_LUT), (img // 48) * 48 + 24)
    saturated = img.copy()
    saturated[..., 1] = np.minimum(img[..., 1].astype(np.int32) * 2, 255).astype(np.uint8)
    np.testing.assert_array_equal(cv2.LUT(img, render._SATURATE_LUT), saturated)
    edges = cv2.dilate(cv2.Canny(gray, 40, 120), np.ones((2, 2), np.uint8))
    inked = img.copy()
    inked[edges > 0] = 20
    np.testing.assert_array_equal(cv2.copyTo(render._ink(96), edges, img.copy()), inked)


def test_brightness_table_is_the_scalar_operation() -> None:
    img = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    for v in (0.2, 0.5, 1.5, 12.7, 40.49, 40.5, 300.0):
        for op in (cv2.add, cv2.subtract):
            table = op(render._LEVELS_U8, (v, v, v, 0.0))
            np.testing.assert_array_equal(cv2.LUT(img, table), op(img, (v, v, v, 0.0)))
