"""Clustering data sets: learn-to-cluster layout, .npy files, SynthFace features."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from robustface.cluster.dataset import (
    ClusterSet,
    extract_synthface_features,
    knn_file_method,
    knn_path,
    load_cluster_set,
    load_features,
    load_labels,
    save_cluster_set,
)
from robustface.config import SynthConfig
from robustface.data.recordio import RecordIODataset
from robustface.data.synth.builder import build_synthface
from robustface.data.transforms import resize_to
from robustface.errors import DataFormatError
from robustface.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_KW = {"input_size": 32, "width": 0.125, "embedding_size": 16}


def _write_ltc(root, name, feats, labels):
    """A learn-to-cluster set written by hand: raw float32 bytes and a text .meta."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    values = np.asarray(feats, dtype=np.float64).ravel().tolist()
    (root / "features" / f"{name}.bin").write_bytes(struct.pack(f"<{len(values)}f", *values))
    (root / "labels" / f"{name}.meta").write_text("".join(f"{v}\n" for v in labels))


def test_hand_written_learn_to_cluster_set_loads(tmp_path):
    feats = np.random.default_rng(0).normal(size=(6, 4))
    _write_ltc(tmp_path, "part1_test", feats, [3, 3, 0, 7, 0, 3])
    cs = load_cluster_set(tmp_path, "part1_test", dim=4)
    assert cs.name == "part1_test" and cs.features.dtype == np.float32
    expected = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(cs.features, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(cs.labels, [3, 3, 0, 7, 0, 3])
    assert cs.labels.dtype == np.int64 and cs.num_classes == 3 and cs.dim == 4
    raw = load_cluster_set(tmp_path, "part1_test", dim=4, normalize=False)
    np.testing.assert_array_equal(raw.features, feats.astype(np.float32))


def test_save_load_round_trip_and_knn_path(tmp_path):
    feats = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cs = ClusterSet("part0_train", feats, np.array([0, 1, 1, 2, 0]))
    feats_file, labels_file = save_cluster_set(tmp_path, cs)
    assert feats_file == tmp_path / "features" / "part0_train.bin"
    assert labels_file.read_text() == "0\n1\n1\n2\n0\n"
    assert feats_file.stat().st_size == 5 * 8 * 4
    back = load_cluster_set(tmp_path, "part0_train", dim=8, normalize=False)
    np.testing.assert_array_equal(back.features, feats)
    np.testing.assert_array_equal(back.labels, cs.labels)
    assert knn_path(tmp_path, "part1_test", 80) == tmp_path / "knns/part1_test/faiss_k_80.npz"
    names = [knn_file_method(index) for index in ("flat", "ivf", "hnsw")]
    assert names == ["faiss", "faiss_ivf", "faiss_hnsw"]
    unlabelled = ClusterSet("u", feats)
    assert save_cluster_set(tmp_path, unlabelled)[1] is None
    assert load_cluster_set(tmp_path, "u", dim=8).labels is None


def test_npy_features_and_labels(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "labels").mkdir()
    feats = np.random.default_rng(2).normal(size=(4, 3))  # float64: converted
    np.save(tmp_path / "features" / "mine.npy", feats)
    np.save(tmp_path / "labels" / "mine.npy", np.array([1, 0, 1, 1], dtype=np.int32))
    cs = load_cluster_set(tmp_path, "mine", dim=3, require_labels=True)
    np.testing.assert_allclose(
        cs.features, feats / np.linalg.norm(feats, axis=1, keepdims=True), rtol=1e-6
    )
    assert cs.labels.dtype == np.int64 and cs.labels.tolist() == [1, 0, 1, 1]
    assert load_features(tmp_path / "features" / "mine.npy", dim=None).shape == (4, 3)
    with pytest.raises(DataFormatError, match=r"mine\.npy: rows have 3 values, expected dim=5"):
        load_features(tmp_path / "features" / "mine.npy", dim=5)


def test_memory_mapped_features(tmp_path):
    unit = np.eye(4, 6, dtype=np.float32)
    unit.tofile(tmp_path / "unit.bin")
    mapped = load_features(tmp_path / "unit.bin", dim=6, mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, unit)
    (2 * unit).tofile(tmp_path / "scaled.bin")
    with pytest.raises(DataFormatError, match=r"scaled\.bin: row 0 has norm 2\.0000; .*mmap=False"):
        load_features(tmp_path / "scaled.bin", dim=6, mmap=True)
    raw = load_features(tmp_path / "scaled.bin", dim=6, mmap=True, normalize=False)
    np.testing.assert_array_equal(raw, 2 * unit)


def test_label_count_mismatch_names_both_files(tmp_path):
    _write_ltc(tmp_path, "s", np.ones((3, 2)), [0, 1])
    message = r"s\.meta: 2 labels, but .*s\.bin \(24 bytes\) is not 2 rows of dim=2 float32"
    with pytest.raises(DataFormatError, match=message):
        load_cluster_set(tmp_path, "s", dim=2)


def test_a_bin_of_another_width_is_caught_by_its_labels(tmp_path):
    """64 rows of 32 values fill as many bytes as 8 rows of the default 256: the labels tell,
    and the error gives the width that fits them."""
    feats = np.random.default_rng(0).normal(size=(64, 32))
    _write_ltc(tmp_path, "s", feats, np.arange(64) // 8)
    message = (
        r"64 labels, .* not 64 rows of dim=256 .*rows have 32 values \(pass dim=32, CLI --dim\)"
    )
    with pytest.raises(DataFormatError, match=message):
        load_cluster_set(tmp_path, "s")
    assert load_cluster_set(tmp_path, "s", dim=32).features.shape == (64, 32)


def test_file_size_not_a_multiple_of_dim(tmp_path):
    _write_ltc(tmp_path, "s", np.ones((3, 2)), [0, 1, 2])
    with pytest.raises(DataFormatError, match=r"size 24 bytes is not a multiple of .*16 \(dim=4\)"):
        load_features(tmp_path / "features" / "s.bin", dim=4)
    with pytest.raises(DataFormatError, match=r"rows have 2 values \(pass dim=2"):
        load_cluster_set(tmp_path, "s", dim=4)  # the labels tell the width


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_rows_name_the_first(tmp_path, bad):
    feats = np.ones((5, 3))
    feats[3, 1] = bad
    feats[4, 0] = bad
    _write_ltc(tmp_path, "s", feats, range(5))
    with pytest.raises(DataFormatError, match=r"s\.bin: row 3 has NaN or inf values"):
        load_cluster_set(tmp_path, "s", dim=3)


def test_zero_rows_are_an_error(tmp_path):
    feats = np.ones((3, 3))
    feats[1] = 0
    _write_ltc(tmp_path, "s", feats, range(3))
    with pytest.raises(DataFormatError, match=r"row 1 is all zeros"):
        load_cluster_set(tmp_path, "s", dim=3)


def test_missing_files_name_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"features not found: expected .*features/x\.bin"):
        load_cluster_set(tmp_path, "x")
    _write_ltc(tmp_path, "y", np.ones((2, 2)), [0, 1])
    (tmp_path / "labels" / "y.meta").unlink()
    assert load_cluster_set(tmp_path, "y", dim=2).labels is None
    with pytest.raises(FileNotFoundError, match=r"labels not found: expected .*labels/y\.meta or"):
        load_cluster_set(tmp_path, "y", dim=2, require_labels=True)
    with pytest.raises(FileNotFoundError, match=r"feature file not found: .*nope\.bin"):
        load_features(tmp_path / "nope.bin")
    (tmp_path / "f.txt").write_text("0\n")
    with pytest.raises(ValueError, match=r"must end in \.bin or \.npy"):
        load_features(tmp_path / "f.txt")
    with pytest.raises(ValueError, match=r"must end in \.meta or \.npy"):
        load_labels(tmp_path / "f.txt")
    # a missing file is named as missing, whatever its extension
    for name in ("nope", "nope.txt"):
        with pytest.raises(FileNotFoundError, match=rf"feature file not found: .*{name}$"):
            load_features(tmp_path / name)
        with pytest.raises(FileNotFoundError, match=rf"label file not found: .*{name}$"):
            load_labels(tmp_path / name)
    with pytest.raises(DataFormatError, match="expected a 1-D integer array"):
        np.save(tmp_path / "l.npy", np.zeros(3))
        load_labels(tmp_path / "l.npy")


def test_cluster_set_checks_its_arrays():
    with pytest.raises(ValueError, match="'a' has 2 labels for 3 feature rows"):
        ClusterSet("a", np.zeros((3, 2), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="float32"):
        ClusterSet("a", np.zeros((3, 2)))


@pytest.fixture(scope="module")
def tiny_synthface(tmp_path_factory):
    """2 training identities x 2 images and an open set of 5 identities x 4 images (48 px)."""
    cfg = SynthConfig(
        identities=2,
        images_per_identity=2,
        open_set_identities=5,
        open_set_images_per_identity=4,
        test_identities=20,
        lfw_pairs=0,
        cfp_fp_pairs=0,
        lowq_pairs=0,
        ijb_identities=0,
        image_size=48,
    )
    out = tmp_path_factory.mktemp("synth_cluster") / "synthface"
    build_synthface(out, cfg, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("r18", **MODEL_KW).eval()
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _reference_embeddings(model, rec_path):
    """normalize(e + e_flip) computed directly from the decoded, resized images."""
    ds = RecordIODataset(rec_path)
    images = np.stack([resize_to(ds[i][0], 32) for i in range(len(ds))])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        e = model(x) + model(x.flip(3))
    return torch.nn.functional.normalize(e, dim=1).numpy()


@pytest.mark.parametrize("split", ["open_set", "train"])
def test_extract_synthface_features(tiny_synthface, tiny_model, split):
    model, path = tiny_model
    cs = extract_synthface_features(
        path,
        tiny_synthface,
        split=split,
        backbone="r18",
        batch_size=3,
        show_progress=False,
        **MODEL_KW,
    )
    sub = tiny_synthface / "open_set" if split == "open_set" else tiny_synthface
    manifest = json.loads((sub / "manifest.json").read_text())
    n = 20 if split == "open_set" else 4
    assert cs.name == f"synthface_{split}" and cs.features.shape == (n, 16)
    np.testing.assert_allclose(np.linalg.norm(cs.features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(cs.labels, manifest["samples"]["label"])
    rec = sub / ("open_set.rec" if split == "open_set" else "train.rec")
    np.testing.assert_allclose(cs.features, _reference_embeddings(model, rec), atol=1e-5)


def test_extract_synthface_errors(tmp_path, tiny_model):
    _, path = tiny_model
    with pytest.raises(
        FileNotFoundError, match=r"open_set set not found: expected .*open_set\.rec"
    ):
        extract_synthface_features(path, tmp_path, backbone="r18", **MODEL_KW)
    with pytest.raises(ValueError, match="split must be one of train, open_set"):
        extract_synthface_features(path, tmp_path, split="test", backbone="r18", **MODEL_KW)
