"""``robustface inspect``: the full check finds every bad record, image and pair."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from robustface.cli import main
from robustface.data.ijb import write_ijb_meta
from robustface.data.image import encode_image
from robustface.data.inspect import inspect_dataset
from robustface.data.recordio import write_flat_rec, write_insightface_rec
from robustface.data.verification import write_bin

HEADER = 8 + 24  # framing (magic, lrecord) + IRHeader (flag, label, id, id2) of a scalar label


def _images(n: int, size: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_image(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _offsets(rec: Path) -> dict[int, int]:
    lines = rec.with_suffix(".idx").read_text().split("\n")
    return {int(k): int(o) for k, o in (line.split("\t") for line in lines if line)}


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def rec_60(tmp_path: Path) -> Path:
    """60 images, 6 classes (keys 1..60); record 50: bad framing, 20: bad image, 30: bad label."""
    out = tmp_path / "rec"
    images = _images(60)
    rec = write_insightface_rec(out, ((images[i], i // 10) for i in range(60)), image_size=(16, 16))
    offsets = _offsets(rec)
    _patch(rec, offsets[50], b"\0\0\0\0")  # magic
    _patch(rec, offsets[20] + HEADER, b"\0" * 16)  # the image's first bytes: no longer a JPEG
    _patch(rec, offsets[30] + 12, struct.pack("<f", 99.0))  # the scalar label
    return out


def test_full_check_lists_every_corrupt_record(rec_60, capsys):
    assert main(["inspect", str(rec_60), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "full check: all 60 image records" in out and "label in [0, 6)" in out
    assert "3 problem(s) found:" in out
    problems = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(problems) == 3
    rec = rec_60 / "train.rec"
    assert problems[0].startswith(f"- {rec} [record 20]: cannot decode image")
    assert problems[1].startswith(f"- {rec} [record 30]: label 99 is not a class id in [0, 6)")
    assert problems[2].startswith(f"- {rec} [record 50]: bad magic 0x00000000")


def test_problem_list_is_capped_but_all_are_counted(rec_60, capsys):
    assert main(["inspect", str(rec_60), "--quiet", "--max-problems", "2"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s) found (the first 2 listed):" in out
    assert "[record 50]" not in out and "[record 30]" in out


def test_quick_check_reads_only_the_first_record_and_says_so(rec_60, capsys):
    assert main(["inspect", str(rec_60), "--quiet", "--quick"]) == 0
    assert "quick check: record 1 only (run without --quick to check all 60)" in (
        capsys.readouterr().out
    )


def test_flat_layout_reports_each_bad_record_once(tmp_path):
    images = _images(12)
    rec = write_flat_rec(tmp_path / "flat.rec", ((images[i], i % 3) for i in range(12)))
    offsets = _offsets(rec)
    _patch(rec, offsets[5] + 12, struct.pack("<f", -1.0))
    _patch(rec, offsets[9], b"\0\0\0\0")
    report = inspect_dataset(rec, progress=False)
    assert report.num_problems == 2, report.problems
    assert report.problems[0].startswith(f"{rec} [record 5]: label -1 is not a class id >= 0")
    assert report.problems[1].startswith(f"{rec} [record 9]: ")
    assert "full check: all 12 image records" in report.text
    # classes counted over the 10 records that read: labels 0, 1, 2 with 3, 4, 3 images
    assert "| images per class (min / median / max) | 3 / 3 / 4" in report.text


def _ijb_dir(root: Path) -> Path:
    """4 images in 2 templates; pair 2 names template 7, which has no image."""
    (root / "loose_crop").mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(4)]
    for name, data in zip(names, _images(4, size=24), strict=True):
        (root / "loose_crop" / name).write_bytes(data)
    write_ijb_meta(
        root,
        "IJBC",
        images=np.array(names),
        templates=np.array([1, 1, 2, 2]),
        medias=np.array([10, 11, 12, 13]),
        landmarks=np.zeros((4, 5, 2), np.float32),
        faceness=np.ones(4, np.float32),
        pairs=np.array([[1, 2], [1, 1], [2, 7]]),
        pair_labels=np.array([0, 1, 0]),
    )
    return root


def test_ijb_missing_image_and_unknown_template(tmp_path, capsys):
    root = _ijb_dir(tmp_path / "IJBC")
    (root / "loose_crop" / "2.jpg").unlink()
    (root / "loose_crop" / "3.jpg").write_bytes(b"not an image")
    assert main(["inspect", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    tid = root / "meta" / "ijbc_face_tid_mid.txt"
    assert "full check: all 4 listed images (exist, decode) and all 3 pairs" in out
    problems = [line for line in out.splitlines() if line.startswith("- ")]
    assert problems == [
        f"- {root / 'meta' / 'ijbc_template_pair_label.txt'}: line 3 (2 7 0): template 7 has no "
        "image in ijbc_face_tid_mid.txt",
        f"- {root / 'loose_crop' / '2.jpg'}: not found (listed on line 3 of {tid})",
        f"- {root / 'loose_crop' / '3.jpg'}: cannot decode image (12 bytes)",
    ]


def test_bin_every_image_is_decoded(tmp_path):
    images = _images(6)
    images[3] = b"broken"
    path = tmp_path / "lfw.bin"
    write_bin(path, images, [True, False, True])
    report = inspect_dataset(path, progress=False)
    assert report.num_problems == 1
    assert report.problems == [f"{path} [record image 3 of pair 1]: cannot decode image (6 bytes)"]
    assert "full check: all 6 images (decode) of the 3 pairs" in report.text
    assert inspect_dataset(path, quick=True, progress=False).ok


def test_directory_checks_sub_directories_and_keeps_going_after_an_unreadable_set(tmp_path):
    _ijb_dir(tmp_path / "IJBS")
    write_insightface_rec(tmp_path, ((b, 0) for b in _images(3)), image_size=(16, 16))
    (tmp_path / "lfw.bin").write_bytes(b"garbage")
    report = inspect_dataset(tmp_path, progress=False)
    assert "IJB set IJBC at" in report.text and "RecordIO training set" in report.text
    assert report.num_problems == 2  # the unknown template 7 and the unreadable lfw.bin
    assert any(p.startswith(f"{tmp_path / 'lfw.bin'}: ") for p in report.problems)


def test_image_folder_every_image_is_decoded(tmp_path, capsys):
    """An image folder (data.source: folder) is summarised per identity and every image is
    decoded: a corrupt one is named, the good ones are counted."""
    root = tmp_path / "faces"
    for person, n in (("alice", 2), ("bob", 3)):
        (root / person).mkdir(parents=True)
        for i, data in enumerate(_images(n)):
            (root / person / f"{i}.jpg").write_bytes(data)
    (root / "bob" / "1.jpg").write_bytes(b"not a jpeg")
    (root / "bob" / "notes.txt").write_text("-")  # not read by training: said in the summary
    assert main(["inspect", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"| skipped (not images, sub-folders)     | 1, e.g. {root / 'bob' / 'notes.txt'} " in out
    assert f"image folder {root}" in out
    assert "| classes (sub-folders)                 | 2 " in out
    assert "| images per class (min / median / max) | 2 / 2.5 / 3 " in out
    assert "16x16 (4)" in out
    assert f"- {root / 'bob' / '1.jpg'}: cannot decode image (10 bytes)" in out
    assert inspect_dataset(root, quick=True, progress=False).ok  # the first image only
