"""IJB-B/C meta files in insightface's helper layout."""

from __future__ import annotations

import numpy as np
import pytest

from robustface.data.ijb import read_ijb_meta, write_ijb_meta
from robustface.errors import DataFormatError

TID_MID = "1.jpg 1 10\n2.jpg 1 11\n3.jpg 2 12\n"
PAIRS = "1 2 0\n2 2 1\n"
PTS = (
    "1.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n"
    "2.jpg 1.5 2.5 3 4 5 6 7 8 9 10 0.25\n"
    "3.jpg 0 0 0 0 0 0 0 0 0 0 1\n"
)


def write_meta_files(root, tid=TID_MID, pairs=PAIRS, pts=PTS, name="ijbc"):
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f"{name}_face_tid_mid.txt").write_text(tid)
    (meta / f"{name}_template_pair_label.txt").write_text(pairs)
    (meta / f"{name}_name_5pts_score.txt").write_text(pts)


def test_reads_hand_written_files(tmp_path):
    write_meta_files(tmp_path)
    meta = read_ijb_meta(tmp_path)
    assert meta.name == "IJBC" and meta.root == tmp_path
    assert meta.images.tolist() == ["1.jpg", "2.jpg", "3.jpg"]
    assert meta.templates.dtype == np.int64 and meta.templates.tolist() == [1, 1, 2]
    assert meta.medias.tolist() == [10, 11, 12]
    assert meta.landmarks.dtype == np.float32 and meta.landmarks.shape == (3, 5, 2)
    np.testing.assert_array_equal(meta.landmarks[1], [[1.5, 2.5], [3, 4], [5, 6], [7, 8], [9, 10]])
    np.testing.assert_allclose(meta.faceness, [0.9, 0.25, 1.0])
    assert meta.pairs.dtype == np.int64 and meta.pairs.tolist() == [[1, 2], [2, 2]]
    assert meta.pair_labels.tolist() == [0, 1]
    assert meta.image_paths()[2] == tmp_path / "loose_crop" / "3.jpg"


def test_ijbb_name_and_tabs(tmp_path):
    write_meta_files(tmp_path, pairs="1\t2\t0\n\n2\t2\t1\n", name="ijbb")
    meta = read_ijb_meta(tmp_path, name="IJBB")
    assert meta.pairs.tolist() == [[1, 2], [2, 2]]


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n, p = 50, 200
    args = dict(
        images=np.array([f"img_{i}.jpg" for i in range(n)]),
        templates=rng.integers(0, 20, n),
        medias=rng.integers(0, 40, n),
        landmarks=rng.uniform(0, 112, (n, 5, 2)).astype(np.float32),
        faceness=rng.uniform(0, 1, n).astype(np.float32),
        pairs=rng.integers(0, 20, (p, 2)),
        pair_labels=rng.integers(0, 2, p),
    )
    write_ijb_meta(tmp_path, "IJBC", **args)
    meta = read_ijb_meta(tmp_path, "IJBC")
    assert meta.images.tolist() == args["images"].tolist()
    for key in ("templates", "medias", "pairs", "pair_labels"):
        np.testing.assert_array_equal(getattr(meta, key), args[key])
    np.testing.assert_allclose(meta.landmarks, args["landmarks"], atol=1e-4)
    np.testing.assert_allclose(meta.faceness, args["faceness"], atol=1e-6)
    first_line = (tmp_path / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()[0]
    assert first_line == f"img_0.jpg {args['templates'][0]} {args['medias'][0]}"


def test_image_order_mismatch_names_line(tmp_path):
    pts = PTS.replace("2.jpg", "9.jpg")
    write_meta_files(tmp_path, pts=pts)
    with pytest.raises(DataFormatError, match=r"name_5pts_score\.txt: line 2: image '9\.jpg'"):
        read_ijb_meta(tmp_path)


def test_image_count_mismatch(tmp_path):
    write_meta_files(tmp_path, pts=PTS.rsplit("3.jpg", 1)[0])
    with pytest.raises(DataFormatError, match=r"2 images, but .* lists 3"):
        read_ijb_meta(tmp_path)


def test_malformed_pair_line(tmp_path):
    write_meta_files(tmp_path, pairs="1 2 0\n2 x 1\n")
    with pytest.raises(DataFormatError, match=r"template_pair_label\.txt: expected 3 fields.*'x'"):
        read_ijb_meta(tmp_path)
    write_meta_files(tmp_path, pairs="1 2\n")
    with pytest.raises(DataFormatError, match="expected 3 fields per line, the first line is"):
        read_ijb_meta(tmp_path)


def test_missing_file(tmp_path):
    write_meta_files(tmp_path)
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_template_pair_label"):
        read_ijb_meta(tmp_path)


def test_write_validates_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"landmarks must have shape \(1, 5, 2\)"):
        write_ijb_meta(
            tmp_path, "IJBC", ["a.jpg"], [1], [1], np.zeros((1, 10)), [1.0], [[1, 1]], [1]
        )
    with pytest.raises(ValueError, match="no whitespace"):
        write_ijb_meta(
            tmp_path, "IJBC", ["a b.jpg"], [1], [1], np.zeros((1, 5, 2)), [1.0], [[1, 1]], [1]
        )
    assert not (tmp_path / "meta").exists()
