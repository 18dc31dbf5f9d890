"""MXNet indexed RecordIO: byte-level compatibility, both dataset layouts, and bad inputs."""

from __future__ import annotations

import mmap
import os
import pickle
import re
import struct

import cv2
import numpy as np
import pytest
import torch

from robustface.data.image import encode_image
from robustface.data.recordio import (
    IndexedRecordReader,
    IRHeader,
    RecordIODataset,
    RecordIOWriter,
    pack_record,
    unpack_record,
    write_flat_rec,
    write_insightface_rec,
)
from robustface.errors import DataFormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def frame(part: bytes, cflag: int = 0) -> bytes:
    """One RecordIO part, straight from the spec: magic, lrecord, data, zero padding to 4."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)


def ir_header(flag: int, label: float, id_: int = 0, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, id_, id2)


def write_by_hand(tmp_path, name: str, records: dict[int, bytes]):
    """Concatenate framed records into ``name.rec`` and write ``name.idx`` by hand."""
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    blob, lines = b"", []
    for key, framed in records.items():
        lines.append(f"{key}\t{len(blob)}\n")
        blob += framed
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    return rec


def smooth_images(n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 120, size, dtype=np.float32)
    out = []
    for _ in range(n):
        noise = cv2.GaussianBlur(rng.uniform(0, 135, (size, size, 3)).astype(np.float32), (0, 0), 2)
        out.append(np.clip(noise + grad[None, :, None], 0, 255).astype(np.uint8))
    return out


def rec_error(path, key) -> str:
    """Regex for a DataFormatError message naming ``path`` and record ``key``."""
    return re.escape(f"{path} [record {key}]")


# ----- record bodies -----------------------------------------------------------------------------


def test_pack_scalar_label_matches_spec_bytes():
    body = pack_record(7.0, b"IMG", id=5, id2=9)
    assert body == struct.pack("<IfQQ", 0, 7.0, 5, 9) + b"IMG"
    header, payload = unpack_record(body)
    assert header == IRHeader(0, 7.0, 5, 9)
    assert payload == b"IMG"


def test_pack_array_label_matches_spec_bytes():
    body = pack_record([3.0, 0.25, -1.5], b"xy")
    assert body == struct.pack("<IfQQ", 3, 0.0, 0, 0) + struct.pack("<3f", 3.0, 0.25, -1.5) + b"xy"
    header, payload = unpack_record(body)
    assert header.flag == 3
    np.testing.assert_array_equal(header.label, np.array([3.0, 0.25, -1.5], np.float32))
    assert payload == b"xy"


def test_unpack_short_body_raises():
    with pytest.raises(DataFormatError, match=r"shorter than the 24-byte header"):
        unpack_record(b"\0" * 10)
    with pytest.raises(DataFormatError, match=r"announces 4 float32 labels"):
        unpack_record(ir_header(4, 0.0) + b"\0" * 8)


# ----- hand-made files read by our reader --------------------------------------------------------


def test_reader_reads_hand_built_records(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    scalar = ir_header(0, 4.0, 1, 0) + png
    array = ir_header(2, 0.0, 2, 0) + struct.pack("<2f", 6.0, 0.5) + b"abc"
    # A body holding the magic at aligned offsets 28 and 36 is stored as three parts.
    multi = ir_header(0, 1.0) + b"wxyz" + MAGIC_BYTES + b"1234" + MAGIC_BYTES + b"tail!"
    parts = frame(multi[:28], 1) + frame(multi[32:36], 2) + frame(multi[40:], 3)
    rec = write_by_hand(
        tmp_path, "hand", {10: frame(scalar), 11: frame(array), 12: parts, 13: frame(b"")}
    )
    reader = IndexedRecordReader(rec)
    assert list(reader.keys) == [10, 11, 12, 13]
    assert reader.read(10) == scalar
    assert reader.read(11) == array
    assert reader.read(12) == multi
    assert reader.read(13) == b""
    header, payload = unpack_record(reader.read(11))
    assert header.flag == 2 and header.id == 2 and payload == b"abc"
    np.testing.assert_array_equal(header.label, [6.0, 0.5])
    assert reader.read_header(12) == IRHeader(0, 1.0, 0, 0)
    assert reader.read(12, limit=30) == multi[:30]


def test_dataset_reads_hand_built_flat_file(tmp_path):
    images = smooth_images(3)
    records = {
        0: frame(ir_header(0, 2.0) + encode_image(images[0], "png")),
        1: frame(ir_header(2, 0.0) + struct.pack("<2f", 1.0, 9.0) + encode_image(images[1], "png")),
        2: frame(ir_header(0, 0.0) + encode_image(images[2], "png")),
    }
    rec = write_by_hand(tmp_path, "flat", records)
    ds = RecordIODataset(rec)
    assert ds.layout == "flat" and len(ds) == 3
    for i, (image, label) in enumerate([ds[0], ds[1], ds[2]]):
        np.testing.assert_array_equal(image, images[i])
        assert label == [2, 1, 0][i]
    np.testing.assert_array_equal(ds.labels, [2, 1, 0])
    assert ds.labels.dtype == np.int64
    assert ds.num_classes == 3


def test_dataset_reads_hand_built_insightface_file(tmp_path):
    images = smooth_images(3)
    labels = [0, 0, 1]
    records = {0: frame(ir_header(2, 0.0) + struct.pack("<2f", 4.0, 6.0))}
    for key, (image, label) in enumerate(zip(images, labels, strict=True), 1):
        records[key] = frame(ir_header(0, float(label), key) + encode_image(image, "png"))
    records[4] = frame(ir_header(2, 0.0) + struct.pack("<2f", 1.0, 3.0))
    records[5] = frame(ir_header(2, 0.0) + struct.pack("<2f", 3.0, 4.0))
    write_by_hand(tmp_path, "train", records)
    (tmp_path / "property").write_text("2,16,16\n")
    ds = RecordIODataset(tmp_path)
    assert ds.layout == "insightface" and len(ds) == 3
    assert ds.num_classes == 2 and ds.image_size == (16, 16)
    np.testing.assert_array_equal(ds.labels, labels)
    for i in range(3):
        np.testing.assert_array_equal(ds[i][0], images[i])
        assert ds[i][1] == labels[i]


def test_sparse_keys(tmp_path):
    records = {k: frame(pack_record(float(k), b"")) for k in (20, 10, 13, 11)}
    rec = write_by_hand(tmp_path, "sparse", records)
    reader = IndexedRecordReader(rec)
    assert [reader.read_header(k).label for k in (10, 11, 13, 20)] == [10.0, 11.0, 13.0, 20.0]
    assert 12 not in reader and 13 in reader
    np.testing.assert_array_equal(reader.missing(np.arange(9, 15)), [9, 12, 14])
    with pytest.raises(DataFormatError, match=rec_error(rec, 12) + ".*key not found"):
        reader.read(12)


def test_header_without_identity_records(tmp_path):
    images = smooth_images(2)
    records = {0: frame(ir_header(2, 0.0) + struct.pack("<2f", 3.0, 3.0))}
    for key, (image, label) in enumerate(zip(images, [1, 0], strict=True), 1):
        records[key] = frame(ir_header(0, float(label)) + encode_image(image, "png"))
    write_by_hand(tmp_path, "train", records)
    ds = RecordIODataset(tmp_path)
    assert ds.layout == "insightface" and len(ds) == 2
    np.testing.assert_array_equal(ds.labels, [1, 0])  # read from the image headers
    assert ds.num_classes == 2 and ds[0][1] == 1


def test_identity_records_must_tile_the_images(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    records = {0: frame(ir_header(2, 0.0) + struct.pack("<2f", 3.0, 5.0))}
    records[1] = frame(ir_header(0, 0.0) + png)
    records[2] = frame(ir_header(0, 1.0) + png)
    records[3] = frame(ir_header(2, 0.0) + struct.pack("<2f", 1.0, 2.0))
    records[4] = frame(ir_header(2, 0.0) + struct.pack("<2f", 1.0, 3.0))  # overlaps identity 0
    rec = write_by_hand(tmp_path, "train", records)
    with pytest.raises(DataFormatError, match=rec_error(rec, 4) + ".*do not tile"):
        _ = RecordIODataset(tmp_path).labels


# ----- our writer, checked against the spec ------------------------------------------------------


def test_writer_output_is_spec_bytes(tmp_path):
    body_a = pack_record(1.0, b"abcde")
    body_b = ir_header(0, 2.0) + MAGIC_BYTES + b"zz"  # magic at aligned offset 24
    with RecordIOWriter(tmp_path / "w.rec") as writer:
        writer.write(3, body_a)
        writer.write(8, body_b)
    expected_b = frame(body_b[:24], 1) + frame(body_b[28:], 3)
    assert (tmp_path / "w.rec").read_bytes() == frame(body_a) + expected_b
    assert (tmp_path / "w.idx").read_text() == f"3\t0\n8\t{len(frame(body_a))}\n"
    reader = IndexedRecordReader(tmp_path / "w.rec")
    assert reader.read(8) == body_b


def test_writer_keeps_unaligned_magic_in_one_part(tmp_path):
    body = b"ab" + MAGIC_BYTES + b"cd"
    with RecordIOWriter(tmp_path / "u.rec") as writer:
        writer.write(0, body)
    assert (tmp_path / "u.rec").read_bytes() == frame(body)


def test_writer_rejects_oversized_record(tmp_path):
    huge = np.broadcast_to(np.uint8(0), (1 << 29,))  # no memory behind it
    with RecordIOWriter(tmp_path / "big.rec") as writer, pytest.raises(ValueError, match="at most"):
        writer.write(0, huge)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RecordIOWriter(tmp_path / "x.rec") as writer:
        writer.write(0, pack_record(0.0, b"data"))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_insightface_writer_leaves_nothing_when_items_fail(tmp_path):
    def items():
        yield encode_image(smooth_images(1)[0], "png"), 0
        raise OSError("disk read failed")

    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk read failed"):
        write_insightface_rec(out, items())
    assert list(out.iterdir()) == []


# ----- insightface and flat layouts through the writers ------------------------------------------


def test_insightface_round_trip_and_layout(tmp_path):
    images = smooth_images(7)
    labels = [0, 0, 1, 1, 1, 2, 2]
    items = [(encode_image(im, "png"), lab) for im, lab in zip(images, labels, strict=True)]
    rec = write_insightface_rec(tmp_path, iter(items), image_size=(16, 16))
    assert rec == tmp_path / "train.rec"
    assert (tmp_path / "property").read_text().strip() == "3,16,16"

    # Header and identity records, read independently of RecordIODataset.
    reader = IndexedRecordReader(rec)
    assert list(reader.keys) == list(range(11))
    header0 = reader.read_header(0)
    assert header0.flag == 2
    np.testing.assert_array_equal(header0.label, [8.0, 11.0])
    ranges = [reader.read_header(k).label.tolist() for k in (8, 9, 10)]
    assert ranges == [[1.0, 3.0], [3.0, 6.0], [6.0, 8.0]]
    assert reader.read_header(4) == IRHeader(0, 1.0, 4, 0)

    ds = RecordIODataset(tmp_path)
    assert ds.layout == "insightface"
    assert len(ds) == 7 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, labels)
    for i in range(7):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
        np.testing.assert_array_equal(image, images[i])
        assert label == labels[i]


def test_insightface_writer_accepts_runs_in_any_class_order(tmp_path):
    labels = [2, 2, 0, 1, 1]
    items = [
        (encode_image(im, "png"), lab) for im, lab in zip(smooth_images(5), labels, strict=True)
    ]
    write_insightface_rec(tmp_path, items, image_size=(16, 16))
    ds = RecordIODataset(tmp_path / "train.rec")
    np.testing.assert_array_equal(ds.labels, labels)
    assert [ds[i][1] for i in range(5)] == labels


def test_insightface_writer_rejects_split_class_runs(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    with pytest.raises(ValueError, match=r"item 3: label 0 appears again"):
        write_insightface_rec(tmp_path, [(png, 0), (png, 0), (png, 1), (png, 0)])
    assert list(tmp_path.iterdir()) == []


def test_insightface_writer_rejects_missing_and_out_of_range_classes(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    with pytest.raises(ValueError, match=r"missing|no samples"):
        write_insightface_rec(tmp_path, [(png, 0), (png, 2)])
    with pytest.raises(ValueError, match=r"item 1: label 3 must be >= 0 < num_classes=3"):
        write_insightface_rec(tmp_path, [(png, 0), (png, 3)], num_classes=3)
    with pytest.raises(ValueError, match=r"empty"):
        write_insightface_rec(tmp_path, [])
    assert list(tmp_path.iterdir()) == []


def test_flat_round_trip(tmp_path):
    images = smooth_images(4)
    labels = [3, 0, 3, 1]
    rec = write_flat_rec(
        tmp_path / "open.rec",
        ((encode_image(im, "png"), lab) for im, lab in zip(images, labels, strict=True)),
    )
    assert (tmp_path / "open.idx").read_text().splitlines()[0] == "0\t0"
    ds = RecordIODataset(tmp_path)  # the only *.rec in the directory
    assert ds.layout == "flat" and len(ds) == 4
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.num_classes == 4
    for i in range(4):
        np.testing.assert_array_equal(ds[i][0], images[i])
        assert ds[i][1] == labels[i]
    assert rec == tmp_path / "open.rec"


def test_dataset_applies_transform(tmp_path):
    image = smooth_images(1)[0]
    rec = write_flat_rec(tmp_path / "t.rec", [(encode_image(image, "png"), 0)])
    ds = RecordIODataset(rec, transform=lambda im: im.sum(dtype=np.int64))
    assert ds[0] == (image.sum(dtype=np.int64), 0)


def test_dataset_index_errors(tmp_path):
    rec = write_flat_rec(tmp_path / "t.rec", [(encode_image(smooth_images(1)[0], "png"), 0)])
    ds = RecordIODataset(rec)
    with pytest.raises(IndexError):
        ds[1]
    with pytest.raises(IndexError):
        ds[-1]


def test_dataset_directory_needs_one_rec(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    write_flat_rec(tmp_path / "a.rec", [(png, 0)])
    write_flat_rec(tmp_path / "b.rec", [(png, 0)])
    with pytest.raises(DataFormatError, match=r"a\.rec, b\.rec"):
        RecordIODataset(tmp_path)


# ----- bad inputs: each names the file and the record key ----------------------------------------


def _three_records(tmp_path):
    bodies = [pack_record(float(i), bytes([i]) * 10) for i in range(3)]
    with RecordIOWriter(tmp_path / "d.rec") as writer:
        for key, body in enumerate(bodies):
            writer.write(key, body)
    return tmp_path / "d.rec", bodies


def test_wrong_magic(tmp_path):
    rec, _ = _three_records(tmp_path)
    offset = int((tmp_path / "d.idx").read_text().splitlines()[1].split("\t")[1])
    blob = bytearray(rec.read_bytes())
    blob[offset] ^= 0xFF
    rec.write_bytes(bytes(blob))
    reader = IndexedRecordReader(rec)
    with pytest.raises(DataFormatError, match=rec_error(rec, 1) + r".*bad magic"):
        reader.read(1)
    assert unpack_record(reader.read(2))[0].label == 2.0  # other records still readable


def test_truncated_record(tmp_path):
    rec, _ = _three_records(tmp_path)
    rec.write_bytes(rec.read_bytes()[:-12])
    with pytest.raises(DataFormatError, match=rec_error(rec, 2) + r".*truncated"):
        IndexedRecordReader(rec).read(2)


def test_record_running_into_the_next_one_is_truncated(tmp_path):
    rec = write_by_hand(
        tmp_path, "o", {0: struct.pack("<II", MAGIC, 40) + b"\0" * 8, 1: frame(b"next")}
    )
    with pytest.raises(DataFormatError, match=rec_error(rec, 0) + r".*truncated"):
        IndexedRecordReader(rec).read(0)


def test_missing_idx(tmp_path):
    rec, _ = _three_records(tmp_path)
    (tmp_path / "d.idx").unlink()
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "d.idx"))):
        IndexedRecordReader(rec)
    with pytest.raises(DataFormatError, match=r"index file not found"):
        RecordIODataset(rec)


def test_key_not_found(tmp_path):
    rec, _ = _three_records(tmp_path)
    with pytest.raises(DataFormatError, match=rec_error(rec, 7) + r".*key not found"):
        IndexedRecordReader(rec).read(7)


def test_malformed_idx_line(tmp_path):
    rec, _ = _three_records(tmp_path)
    (tmp_path / "d.idx").write_text("0\t0\n1\tforty\n")
    with pytest.raises(DataFormatError, match=r"d\.idx.*line 2"):
        IndexedRecordReader(rec)


def test_label_out_of_range(tmp_path):
    png = encode_image(smooth_images(1)[0], "png")
    rec = write_flat_rec(tmp_path / "train.rec", [(png, 0), (png, 1), (png, 5), (png, -1)])
    (tmp_path / "property").write_text("2,16,16\n")
    ds = RecordIODataset(tmp_path)
    assert ds[1][1] == 1
    with pytest.raises(DataFormatError, match=rec_error(rec, 2) + r".*label 5 .*\[0, 2\)"):
        ds[2]
    with pytest.raises(DataFormatError, match=rec_error(rec, 3) + r".*label -1"):
        ds[3]
    with pytest.raises(DataFormatError, match=rec_error(rec, 2)):
        _ = ds.labels


def test_unreadable_image_bytes(tmp_path):
    rec = write_flat_rec(tmp_path / "bad.rec", [(b"\xff\xd8 definitely not a jpeg", 0)])
    with pytest.raises(DataFormatError, match=rec_error(rec, 0) + r".*cannot decode"):
        RecordIODataset(rec)[0]


# ----- worker safety -----------------------------------------------------------------------------


def test_reader_reopens_after_pid_change(tmp_path, monkeypatch):
    rec, bodies = _three_records(tmp_path)
    reader = IndexedRecordReader(rec)
    assert reader.read(0) == bodies[0]
    first = reader._mapped
    assert isinstance(first, mmap.mmap)  # records are copied out of a map: no read calls
    monkeypatch.setattr(os, "getpid", lambda: -12345)
    assert reader.read(1) == bodies[1]
    assert reader._mapped is not first
    reader.close()
    assert first.closed is False and reader._mapped is None  # another process's map: left alone


def test_dataset_pickles_without_handle(tmp_path):
    rec = write_flat_rec(
        tmp_path / "p.rec", [(encode_image(im, "png"), 0) for im in smooth_images(2)]
    )
    ds = RecordIODataset(rec)
    expected = ds[1][0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._mapped is None
    np.testing.assert_array_equal(clone[1][0], expected)


def test_dataloader_workers_match_direct_indexing(tmp_path):
    images = smooth_images(12)
    labels = [i // 3 for i in range(12)]
    items = [(encode_image(im, "png"), lab) for im, lab in zip(images, labels, strict=True)]
    write_insightface_rec(tmp_path, items, image_size=(16, 16))
    ds = RecordIODataset(tmp_path)
    direct = [ds[i] for i in range(len(ds))]  # opens a handle in this process before forking
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    got_images, got_labels = [], []
    for batch_images, batch_labels in loader:
        got_images.append(batch_images.numpy())
        got_labels.append(batch_labels.numpy())
    np.testing.assert_array_equal(np.concatenate(got_images), np.stack([d[0] for d in direct]))
    np.testing.assert_array_equal(np.concatenate(got_labels), labels)
    np.testing.assert_array_equal(np.stack([d[0] for d in direct]), np.stack(images))
