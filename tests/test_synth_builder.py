"""The SynthFace benchmark directory: formats, determinism, structure, atomicity."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from robustface.config import SynthConfig
from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.recordio import IndexedRecordReader, RecordIODataset, unpack_record
from robustface.data.synth import builder
from robustface.data.synth.builder import IdentityRanges, build_synthface
from robustface.data.verification import load_bin

TINY = SynthConfig(
    identities=6,
    images_per_identity=4,
    open_set_identities=3,
    open_set_images_per_identity=2,
    test_identities=20,
    lfw_pairs=40,
    cfp_fp_pairs=20,
    lowq_pairs=20,
    ijb_identities=3,
    ijb_templates_per_identity=2,
    ijb_max_media_per_template=2,
    ijb_max_images_per_media=2,
    ijb_impostor_ratio=2,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    build_synthface(out, TINY, workers=1, progress=False)
    return out


@pytest.mark.slow
def test_byte_identical_for_any_worker_count(tiny, tmp_path):
    other = build_synthface(tmp_path / "w2", TINY, workers=2, progress=False).path
    a, b = _files(tiny), _files(other)
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert differing == []


def test_seed_changes_the_data(tiny, tmp_path):
    cfg = SynthConfig(**{**TINY.__dict__, "seed": 1})
    other = build_synthface(tmp_path / "s1", cfg, workers=1, progress=False).path
    assert (other / "train.rec").read_bytes() != (tiny / "train.rec").read_bytes()


def test_train_rec_layout_and_manifest(tiny):
    ds = RecordIODataset(tiny)
    assert len(ds) == 24 and ds.num_classes == 6
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(6), 4))
    image, label = ds[5]
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8 and label == 1
    assert (tiny / "property").read_text().strip() == "6,112,112"
    manifest = json.loads((tiny / "manifest.json").read_text())
    samples = manifest["samples"]
    assert manifest["num_samples"] == 24
    assert samples["label"] == ds.labels.tolist()
    assert samples["identity"] == np.repeat(np.arange(6), 4).tolist()  # train range starts at 0
    assert set(samples["kind"]) == {"face"}
    assert all(0.0 <= q <= 1.0 for q in samples["quality"])
    assert all(np.asarray(lm).shape == (5, 2) for lm in samples["landmarks"])
    assert {"yaw", "jpeg_quality"} <= set(samples["nuisance"][0])
    # The header record is insightface's: label (N+1, end) with identity records after the images.
    reader = IndexedRecordReader(tiny / "train.rec")
    header, _ = unpack_record(reader.read(0))
    assert header.flag > 0 and tuple(np.asarray(header.label)[:2]) == (25.0, 31.0)


def test_open_set_is_disjoint_from_train(tiny):
    ds = RecordIODataset(tiny / "open_set")
    assert len(ds) == 6 and ds.num_classes == 3
    manifest = json.loads((tiny / "open_set" / "manifest.json").read_text())
    ranges = IdentityRanges.from_config(TINY)
    assert set(manifest["samples"]["identity"]) == set(ranges.open_set)
    assert not set(manifest["samples"]["identity"]) & set(ranges.train)


def test_verification_sets_follow_the_lfw_fold_layout(tiny):
    meta = json.loads((tiny / "verification.json").read_text())
    ranges = IdentityRanges.from_config(TINY)
    for name, pairs in (("lfw", 40), ("cfp_fp", 20), ("lowq", 20)):
        bins, issame = load_bin(tiny / f"{name}.bin")
        assert len(bins) == 2 * pairs and len(issame) == pairs
        per_fold = pairs // 10
        expected = ([True] * (per_fold // 2) + [False] * (per_fold // 2)) * 10
        assert issame.tolist() == expected
        ids = np.asarray(meta[name]["identity"])
        assert set(ids.ravel()) <= set(ranges.test)
        np.testing.assert_array_equal(ids[:, 0] == ids[:, 1], issame)
        folds = [set(ids[f * per_fold : (f + 1) * per_fold].ravel()) for f in range(10)]
        for a, b in combinations(folds, 2):
            assert not a & b, f"{name}: folds share identities"
        assert decode_image(bins[0]).shape == (112, 112, 3)


def test_cross_pose_set_pairs_frontal_with_profile(tiny):
    meta = json.loads((tiny / "verification.json").read_text())
    assert meta["cfp_fp"]["profiles"] == ["frontal", "profile"]
    q = np.asarray(meta["lfw"]["quality"]).mean()
    assert np.asarray(meta["lowq"]["quality"])[:, 1].mean() < q


def test_ijb_set_reads_back(tiny):
    meta = read_ijb_meta(tiny / "IJBS", "IJBS")
    n = len(meta.images)
    assert n == len(list((tiny / "IJBS" / "loose_crop").glob("*.jpg")))
    assert len(np.unique(meta.templates)) == 6
    # genuine pairs: every pair of templates of one identity (3 identities x C(2,2) = 3)
    assert int(meta.pair_labels.sum()) == 3
    assert len(meta.pair_labels) <= 3 * (1 + TINY.ijb_impostor_ratio)
    # templates of a genuine pair belong to the same identity: consecutive template ids here
    genuine = meta.pairs[meta.pair_labels == 1]
    np.testing.assert_array_equal((genuine[:, 0] - 1) // 2, (genuine[:, 1] - 1) // 2)
    impostor = meta.pairs[meta.pair_labels == 0]
    assert np.all((impostor[:, 0] - 1) // 2 != (impostor[:, 1] - 1) // 2)
    # a random subset of the impostor pairs, not the lowest template ids (identity 0's)
    assert impostor[:, 0].max() > 2
    for name, pts in zip(meta.images, meta.landmarks, strict=True):
        image = decode_image((tiny / "IJBS" / "loose_crop" / name).read_bytes())
        h, w = image.shape[:2]
        assert h > 112 and np.all(pts >= 0) and np.all(pts[:, 0] < w) and np.all(pts[:, 1] < h)
        assert pts[0, 0] < pts[1, 0] + 20  # left eye left of right eye (rotation <= 15 deg)


def test_loose_crop_landmarks_follow_the_warp():
    """The landmarks of a loose crop are the aligned landmarks under the same similarity warp."""
    image = np.zeros((112, 112, 3), np.uint8)
    landmarks = np.array([[38.0, 52.0], [74.0, 52.0], [56.0, 72.0], [42.0, 92.0], [70.0, 92.0]])
    for x, y in landmarks.astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    sample = builder.RenderedSample(
        builder.encode_image(image, fmt="png"), landmarks.astype(np.float32), 1.0, {}
    )
    crop_bytes, pts = builder._loose_crop(sample, np.random.default_rng(3), 112)
    crop = decode_image(crop_bytes).max(axis=2).astype(float)
    for x, y in pts:
        xi, yi = round(x), round(y)
        assert crop[yi - 2 : yi + 3, xi - 2 : xi + 3].max() > 100, (x, y)


def test_image_folder_copy_and_extra_kinds(tmp_path):
    cfg = SynthConfig(
        **{**TINY.__dict__, "image_folder": True, "sketch_fraction": 0.3, "nonface_fraction": 0.3}
    )
    cfg.images_per_identity = 10
    out = build_synthface(tmp_path / "kinds", cfg, workers=1, progress=False).path
    files = sorted((out / "images").rglob("*.jpg"))
    assert len(files) == 60 and len(list((out / "images").iterdir())) == 6
    reader = IndexedRecordReader(out / "train.rec")
    _, first = unpack_record(reader.read(1))
    assert files[0].read_bytes() == first
    kinds = json.loads((out / "manifest.json").read_text())["samples"]["kind"]
    counts = {k: kinds.count(k) for k in builder.KINDS}
    assert 8 <= counts["sketch"] <= 30 and 8 <= counts["nonface"] <= 30, counts


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "x"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists"):
        build_synthface(out, TINY, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="not a SynthFace directory"):
        build_synthface(out, TINY, workers=1, progress=False, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    # a file where the directory goes: named, kept (was pathlib's NotADirectoryError traceback)
    message = r"precious\.txt is a file, not a SynthFace directory"
    with pytest.raises(FileExistsError, match=message):
        build_synthface(out / "precious.txt", TINY, workers=1, progress=False, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(builder, "write_bin", boom)
    target = tmp_path / "y"
    with pytest.raises(OSError, match="disk full"):
        build_synthface(target, TINY, workers=1, progress=False)
    assert not target.exists()
    assert not target.with_name("y.partial").exists()


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="lfw_pairs: must be a multiple of 20"):
        build_synthface("unused", SynthConfig(lfw_pairs=30), progress=False)
