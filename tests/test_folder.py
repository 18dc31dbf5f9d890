"""Identity-per-folder datasets and their conversion to the insightface RecordIO layout."""

from __future__ import annotations

import re
import shutil

import cv2
import numpy as np
import pytest

from robustface.data.folder import ImageFolderDataset, folder_to_rec
from robustface.data.image import decode_image, encode_image
from robustface.data.recordio import IndexedRecordReader, RecordIODataset, unpack_record
from robustface.errors import DataFormatError

# make_tree() leaves a notes.txt among the images: the warning is checked once, below
pytestmark = pytest.mark.filterwarnings("ignore:.*without an image extension")


def test_skipped_files_are_reported(tmp_path):
    make_tree(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 files .*notes\.txt"):
        ImageFolderDataset(tmp_path)


def test_images_in_a_folder_inside_an_identity_are_not_dropped_silently(tmp_path):
    """``alice/2019/x.jpg`` is not read (one level per identity): said, as for other files."""
    make_tree(tmp_path)
    nested = tmp_path / "alice" / "2019"
    nested.mkdir()
    (nested / "x.jpg").write_bytes(encode_image(smooth_image(9)))
    with pytest.warns(UserWarning, match=r"skipped 2 files .*or sub-folders") as caught:
        ds = ImageFolderDataset(tmp_path)
    assert nested in ds.skipped and str(nested) not in str(ds.samples)
    assert len(caught) == 1


def smooth_image(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 200, (size, size, 3)).astype(np.float32), (0, 0), 2)
    return np.clip(noise + np.linspace(0, 50, size)[None, :, None], 0, 255).astype(np.uint8)


def make_tree(root, size: int = 16) -> dict[str, np.ndarray]:
    """Three identities with JPEG, PNG and BMP files, plus files that must be ignored."""
    files = {
        "bob/1.png": "png",
        "bob/2.JPG": "jpg",
        "alice/a.jpg": "jpg",
        "carol/x.bmp": "bmp",
        "carol/y.jpeg": "jpg",
    }
    images = {}
    for seed, (rel, fmt) in enumerate(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = smooth_image(seed, size)
        if fmt == "bmp":
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        else:
            path.write_bytes(encode_image(image, fmt))
        images[rel] = image
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "z.jpg").write_bytes(encode_image(smooth_image(99, size)))
    return images


def test_classes_labels_and_items(tmp_path):
    originals = make_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["alice", "bob", "carol"]
    assert ds.num_classes == 3
    assert [p.relative_to(tmp_path).as_posix() for p in ds.samples] == [
        "alice/a.jpg",
        "bob/1.png",
        "bob/2.JPG",
        "carol/x.bmp",
        "carol/y.jpeg",
    ]
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 2, 2])
    assert ds.labels.dtype == np.int64
    for i, path in enumerate(ds.samples):
        image, label = ds[i]
        assert label == ds.labels[i]
        np.testing.assert_array_equal(image, decode_image(path.read_bytes()))
    png_image, _ = ds[1]
    np.testing.assert_array_equal(png_image, originals["bob/1.png"])  # PNG is lossless
    with pytest.raises(IndexError):
        ds[5]


def test_transform_and_extensions(tmp_path):
    make_tree(tmp_path)
    ds = ImageFolderDataset(
        tmp_path, transform=lambda im: im.shape, extensions=("PNG", ".bmp", ".jpg")
    )
    assert [p.name for p in ds.samples] == ["a.jpg", "1.png", "2.JPG", "x.bmp"]
    assert ds[3] == ((16, 16, 3), 2)


def test_empty_root(tmp_path):
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path)) + ".*no identity"):
        ImageFolderDataset(tmp_path)


def test_identity_without_images(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "dave").mkdir()
    (tmp_path / "dave" / "readme.md").write_text("-")
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "dave")) + ".*no images"):
        ImageFolderDataset(tmp_path)


def test_folder_to_rec(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "rec"
    originals = make_tree(root)
    rec = folder_to_rec(root, out, image_size=(16, 16), show_progress=False)
    assert rec == out / "train.rec"
    assert (out / "property").read_text().strip() == "3,16,16"
    assert (out / "classes.txt").read_text().splitlines() == ["alice", "bob", "carol"]

    folder = ImageFolderDataset(root)
    reader = IndexedRecordReader(rec)
    for i, path in enumerate(folder.samples):
        header, payload = unpack_record(reader.read(i + 1))
        assert header.label == folder.labels[i]
        assert payload[:2] == b"\xff\xd8"  # everything stored as JPEG
        if path.suffix.lower() in (".jpg", ".jpeg"):
            assert payload == path.read_bytes()  # JPEG bytes kept as they are
        else:
            original = originals[path.relative_to(root).as_posix()]
            diff = np.abs(decode_image(payload).astype(int) - original.astype(int))
            assert diff.mean() < 3.0  # re-encoded at quality 95

    ds = RecordIODataset(out)
    assert ds.layout == "insightface" and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, folder.labels)


def test_folder_to_rec_replaces_a_training_set_only_with_overwrite(tmp_path):
    """Converting into a directory that holds a train.rec refuses (naming it) unless asked; the
    files already there are left as they were, and other files are kept with overwrite."""
    root, out = tmp_path / "faces", tmp_path / "rec"
    make_tree(root, size=20)
    folder_to_rec(root, out, show_progress=False)
    (out / "lfw.bin").write_bytes(b"pairs")
    before = (out / "train.rec").read_bytes()
    other = tmp_path / "other"
    make_tree(other, size=20)
    shutil.rmtree(other / "carol")
    with pytest.raises(FileExistsError, match=re.escape(f"{out / 'train.rec'} exists")):
        folder_to_rec(other, out, show_progress=False)
    assert (out / "train.rec").read_bytes() == before
    folder_to_rec(other, out, show_progress=False, overwrite=True)
    assert RecordIODataset(out).num_classes == 2 and (out / "lfw.bin").read_bytes() == b"pairs"


def test_folder_to_rec_takes_size_from_images(tmp_path):
    root = tmp_path / "faces"
    make_tree(root, size=20)
    folder_to_rec(root, tmp_path / "rec", show_progress=False)
    assert (tmp_path / "rec" / "property").read_text().strip() == "3,20,20"


def test_folder_to_rec_wrong_size_names_file(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "rec"
    make_tree(root)
    odd = root / "bob" / "3.png"
    odd.write_bytes(encode_image(smooth_image(7, 24), "png"))
    with pytest.raises(DataFormatError, match=re.escape(str(odd)) + ".*24x24.*expected 16x16"):
        folder_to_rec(root, out, image_size=(16, 16), show_progress=False)
    assert not out.exists() or list(out.iterdir()) == []


def test_folder_to_rec_unreadable_image_names_file(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "rec"
    make_tree(root)
    broken = root / "carol" / "z.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataFormatError, match=re.escape(str(broken)) + ".*cannot decode"):
        folder_to_rec(root, out, show_progress=False)
    assert not out.exists() or list(out.iterdir()) == []
