"""Verification .bin pair files (insightface layout), including Python 2 pickles."""

from __future__ import annotations

import os
import pickle
import re
import struct

import cv2
import numpy as np
import pytest

from robustface.data.image import encode_image
from robustface.data.verification import load_bin, load_bin_images, write_bin
from robustface.errors import DataFormatError


def images(n: int, size: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` at protocol 2: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


# Python 2 numpy's pickle of numpy.bool_(s): scalar(dtype('b1', 0, 1) + state, '\x00' or '\x01')
PY2_NUMPY_BOOL = (
    b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02b1K\x00K\x01\x87R"  # dtype('b1', 0, 1)
    b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # BUILD (3, '|', ..., 0)
    b"U\x01%b\x86R"  # scalar(dtype, raw byte)
)


def py2_pickle(bins: list[bytes], issame: list[bool], numpy_flags: bool = False) -> bytes:
    """What Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes: ``str`` objects
    (and, with ``numpy_flags``, ``numpy.bool_`` flags as an old numpy pickles them)."""
    out = b"\x80\x02]q\x00("  # PROTO 2, EMPTY_LIST, BINPUT, MARK
    out += b"".join(py2_str(b) for b in bins)
    out += b"e]q\x01("  # APPENDS, EMPTY_LIST, BINPUT, MARK
    if numpy_flags:
        out += b"".join(PY2_NUMPY_BOOL % bytes([s]) for s in issame)
    else:
        out += b"".join(b"\x88" if s else b"\x89" for s in issame)
    return out + b"e\x86q\x02."  # APPENDS, TUPLE2, BINPUT, STOP


class RunsCommand:
    """Unpickles to ``os.system(command)``: a crafted file that runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_write_and_load_round_trip(tmp_path):
    bins = [encode_image(im, "png") for im in images(4)]
    write_bin(tmp_path / "lfw.bin", bins, np.array([True, False]))
    raw = (tmp_path / "lfw.bin").read_bytes()
    assert raw[:2] == b"\x80\x04"  # protocol 4
    stored_bins, stored_issame = pickle.loads(raw)
    assert stored_bins == bins
    assert stored_issame == [True, False] and all(type(s) is bool for s in stored_issame)

    loaded, issame = load_bin(tmp_path / "lfw.bin")
    assert loaded == bins
    assert issame.dtype == bool and issame.tolist() == [True, False]


def test_python2_pickle_needs_bytes_encoding(tmp_path):
    bins = [encode_image(im, "png") for im in images(2)]  # non-ASCII bytes: ASCII decoding fails
    data = py2_pickle(bins, [True])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)
    (tmp_path / "old.bin").write_bytes(data)
    loaded, issame = load_bin(tmp_path / "old.bin")
    assert loaded == bins and issame.tolist() == [True]


def test_protocol2_pickle_and_numpy_bins(tmp_path):
    bins = [encode_image(im, "png") for im in images(2)]
    (tmp_path / "p2.bin").write_bytes(pickle.dumps((bins, [False]), protocol=2))
    assert load_bin(tmp_path / "p2.bin")[0] == bins
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in bins]
    (tmp_path / "np.bin").write_bytes(pickle.dumps((arrays, [0]), protocol=2))
    loaded, issame = load_bin(tmp_path / "np.bin")
    assert loaded == bins and issame.tolist() == [False]


def test_count_mismatch(tmp_path):
    bins = [encode_image(im, "png") for im in images(3)]
    (tmp_path / "bad.bin").write_bytes(pickle.dumps((bins, [True, False])))
    with pytest.raises(DataFormatError, match=r"bad\.bin: 3 images for 2 pairs"):
        load_bin(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "w.bin", bins, [True])
    assert not (tmp_path / "w.bin").exists()


def test_not_a_pickle(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(DataFormatError, match=r"junk\.bin: cannot unpickle"):
        load_bin(tmp_path / "junk.bin")


def test_load_images_decodes_and_resizes(tmp_path):
    originals = images(4, size=12)
    write_bin(tmp_path / "v.bin", [encode_image(im, "png") for im in originals], [True, False])
    decoded, issame = load_bin_images(tmp_path / "v.bin")
    assert decoded.shape == (4, 12, 12, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.stack(originals))
    assert issame.tolist() == [True, False]

    resized, _ = load_bin_images(tmp_path / "v.bin", image_size=(8, 8))
    expected = [cv2.resize(im, (8, 8), interpolation=cv2.INTER_CUBIC) for im in originals]
    np.testing.assert_array_equal(resized, np.stack(expected))
    same, _ = load_bin_images(tmp_path / "v.bin", image_size=(12, 12))
    np.testing.assert_array_equal(same, decoded)


def test_undecodable_image_names_pair(tmp_path):
    bins = [encode_image(im, "png") for im in images(4)]
    bins[3] = b"garbage"
    write_bin(tmp_path / "v.bin", bins, [True, True])
    pattern = re.escape(f"{tmp_path / 'v.bin'} [record image 3 of pair 1]") + ".*cannot decode"
    with pytest.raises(DataFormatError, match=pattern):
        load_bin_images(tmp_path / "v.bin")


def test_mixed_sizes_need_image_size(tmp_path):
    bins = [encode_image(im, "png") for im in images(1, 12) + images(1, 10)]
    write_bin(tmp_path / "m.bin", bins, [False])
    with pytest.raises(DataFormatError, match=r"pair 0.*pass image_size"):
        load_bin_images(tmp_path / "m.bin")
    assert load_bin_images(tmp_path / "m.bin", image_size=(12, 12))[0].shape == (2, 12, 12, 3)


def test_python2_numpy_bool_flags(tmp_path):
    bins = [encode_image(im, "png") for im in images(4)]
    data = py2_pickle(bins, [True, False], numpy_flags=True)
    reference = pickle.loads(data, encoding="bytes")[1]  # our own bytes: safe to check with numpy
    assert [type(s) for s in reference] == [np.bool_, np.bool_] and reference == [True, False]
    (tmp_path / "old.bin").write_bytes(data)
    loaded, issame = load_bin(tmp_path / "old.bin")
    assert loaded == bins and issame.tolist() == [True, False]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_flags_and_arrays_at_every_protocol(tmp_path, protocol):
    bins = [encode_image(im, "png") for im in images(4)]
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in bins]
    for name, flags in (
        ("scalars", [np.bool_(True), np.bool_(False)]),
        ("bool_array", np.array([True, False])),
        ("int_array", np.array([1, 0], dtype=">i8")),
    ):
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps((arrays, flags), protocol=protocol))
        loaded, issame = load_bin(path)
        assert loaded == bins and issame.tolist() == [True, False], name


def test_crafted_bin_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([RunsCommand(f"touch {marker}")], [True]), protocol=2))
    with pytest.raises(DataFormatError, match=r"evil\.bin: refused to unpickle posix\.system"):
        load_bin(evil)
    assert not marker.exists()
    # also when the call is hidden inside an allowed structure or behind a py2 module name
    evil.write_bytes(b"c__builtin__\neval\n(S'1'\ntR.")
    with pytest.raises(DataFormatError, match=r"refused to unpickle __builtin__\.eval"):
        load_bin(evil)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # an object array would hold arbitrary objects
        (pickle.dumps(np.array([None], dtype=object), protocol=2), "dtype 'O8' is not allowed"),
        # NEWOBJ must not reach a constructor without its checks
        (b"\x80\x02cnumpy\ndtype\n)\x81.", "NEWOBJ class argument must be a type"),
        # BUILD must not modify an allowed global
        (b"\x80\x02cnumpy\ndtype\nN}q\x00\x86b.", "a global cannot be modified"),
        # _codecs.encode only turns latin-1 text into bytes
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", "latin-1"),
        # an array needs its data (BUILD)
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R]\x86.",
            "numpy array without its data",
        ),
        # array data must fit its shape
        (
            pickle.dumps(np.zeros(3, np.uint8), protocol=2).replace(b"K\x03\x85", b"K\x04\x85"),
            "fit",
        ),
    ],
)
def test_restricted_unpickler_refuses_more_than_plain_data(tmp_path, data, message):
    (tmp_path / "x.bin").write_bytes(data)
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_bin(tmp_path / "x.bin")
