"""learn-to-cluster feature, label and kNN files."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from robustface.data.ltc import (
    read_features,
    read_knn,
    read_meta,
    sort_knn_rows,
    write_features,
    write_knn,
    write_meta,
)
from robustface.errors import DataFormatError


def test_features_hand_written_and_normalised(tmp_path):
    feats = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    feats.tofile(tmp_path / "f.bin")  # raw float32, written without our writer
    raw = read_features(tmp_path / "f.bin", dim=8, normalize=False)
    np.testing.assert_array_equal(raw, feats)
    unit = read_features(tmp_path / "f.bin", dim=8)
    assert unit.dtype == np.float32 and unit.shape == (5, 8)
    expected = feats / np.sqrt((feats.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(unit, expected, rtol=1e-6)


def test_features_round_trip_and_zero_rows(tmp_path):
    feats = np.zeros((3, 256), np.float64)
    feats[1, 0] = 3.0
    write_features(tmp_path / "g.bin", feats)
    assert (tmp_path / "g.bin").stat().st_size == 3 * 256 * 4
    out = read_features(tmp_path / "g.bin")
    assert out[1, 0] == 1.0 and np.all(out[0] == 0) and np.isfinite(out).all()


def test_features_bad_size(tmp_path):
    np.zeros(10, np.float32).tofile(tmp_path / "odd.bin")
    with pytest.raises(
        DataFormatError, match=r"odd\.bin: size 40 bytes is not a multiple of .* 32"
    ):
        read_features(tmp_path / "odd.bin", dim=8)


def test_write_features_needs_matrix(tmp_path):
    with pytest.raises(ValueError, match=r"2-D"):
        write_features(tmp_path / "x.bin", np.zeros(4))
    assert not (tmp_path / "x.bin").exists()


def test_meta_round_trip_and_hand_written(tmp_path):
    (tmp_path / "a.meta").write_text("3\n0\n-1\n12\n")
    np.testing.assert_array_equal(read_meta(tmp_path / "a.meta"), [3, 0, -1, 12])
    labels = np.array([5, 5, 0, 7])
    write_meta(tmp_path / "b.meta", labels)
    assert (tmp_path / "b.meta").read_text() == "5\n5\n0\n7\n"
    out = read_meta(tmp_path / "b.meta")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, labels)


def test_meta_bad_value(tmp_path):
    (tmp_path / "c.meta").write_text("1\n2\nthree\n")
    with pytest.raises(DataFormatError, match=r"c\.meta: label 2 is 'three'"):
        read_meta(tmp_path / "c.meta")
    with pytest.raises(ValueError, match="integer"):
        write_meta(tmp_path / "d.meta", np.array([0.5]))


def test_knn_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    nbrs = rng.integers(0, 1000, (6, 4))
    dists = np.sort(rng.uniform(0, 2, (6, 4)).astype(np.float32), axis=1)
    write_knn(tmp_path / "knn.npz", nbrs, dists)
    with np.load(tmp_path / "knn.npz") as npz:
        assert npz.files == ["data"] and npz["data"].shape == (6, 2, 4)
    got_nbrs, got_dists = read_knn(tmp_path / "knn.npz")
    assert got_nbrs.dtype == np.int64 and got_dists.dtype == np.float32
    np.testing.assert_array_equal(got_nbrs, nbrs)
    np.testing.assert_array_equal(got_dists, dists)


def test_knn_hand_written_float_ids(tmp_path):
    data = np.array([[[0, 2], [0.0, 0.3]], [[1, 0], [0.0, 0.3]], [[2, 0], [0.0, 0.5]]])
    np.savez_compressed(tmp_path / "h.npz", data=data)
    nbrs, dists = read_knn(tmp_path / "h.npz")
    np.testing.assert_array_equal(nbrs, [[0, 2], [1, 0], [2, 0]])
    np.testing.assert_allclose(dists, [[0, 0.3], [0, 0.3], [0, 0.5]], rtol=1e-6)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"data": np.zeros((3, 4))}, r"shape \[N, 2, k\], got \[3, 4\]"),
        ({"data": np.zeros((3, 3, 4))}, r"got \[3, 3, 4\]"),
        ({"knn": np.zeros((3, 2, 4))}, r"no key 'data'"),
        ({"data": np.full((1, 2, 2), 0.5)}, r"not integers"),
    ],
)
def test_knn_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=r"bad\.npz: .*" + message):
        read_knn(tmp_path / "bad.npz")


def test_knn_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"nope")
    with pytest.raises(DataFormatError, match=r"x\.npz"):
        read_knn(tmp_path / "x.npz")


def test_write_knn_shape_mismatch_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="one shape"):
        write_knn(tmp_path / "k.npz", np.zeros((2, 3), int), np.zeros((2, 4)))
    assert list(tmp_path.iterdir()) == []


def test_knn_streams_in_chunks_and_numpy_reads_it(tmp_path):
    rng = np.random.default_rng(1)
    nbrs = rng.integers(0, 5000, (7, 3))
    dists = np.sort(rng.uniform(0, 2, (7, 3)).astype(np.float32), axis=1)
    write_knn(tmp_path / "k.npz", nbrs, dists, chunk_rows=2)
    with np.load(tmp_path / "k.npz") as npz:  # what learn-to-cluster does
        data = npz["data"]
    assert data.dtype == np.float32  # ids < 2**24 are exact in float32
    np.testing.assert_array_equal(data[:, 0, :], nbrs)
    np.testing.assert_array_equal(data[:, 1, :], dists)
    for chunk in (1, 3, 100):
        got_nbrs, got_dists = read_knn(tmp_path / "k.npz", chunk_rows=chunk)
        np.testing.assert_array_equal(got_nbrs, nbrs)
        np.testing.assert_array_equal(got_dists, dists)


def test_knn_large_ids_are_written_as_float64(tmp_path):
    nbrs = np.array([[0, 2**24 + 1], [2**40 + 3, 1]])
    write_knn(tmp_path / "k.npz", nbrs, np.zeros((2, 2), np.float32))
    with np.load(tmp_path / "k.npz") as npz:
        assert npz["data"].dtype == np.float64
    np.testing.assert_array_equal(read_knn(tmp_path / "k.npz")[0], nbrs)


def test_knn_fortran_order_and_truncated_files(tmp_path):
    data = np.asfortranarray(np.array([[[0, 1], [0.0, 0.25]], [[1, 0], [0.0, 0.5]]]))
    np.savez(tmp_path / "f.npz", data=data)
    nbrs, dists = read_knn(tmp_path / "f.npz")
    np.testing.assert_array_equal(nbrs, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(dists, [[0, 0.25], [0, 0.5]])
    # a .npy member whose header promises more rows than it holds
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (5, 2, 2)}
    )
    buf.write(np.zeros((2, 2, 2)).tobytes())
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("data.npy", buf.getvalue())
    with pytest.raises(DataFormatError, match=r"t\.npz: 'data' is truncated"):
        read_knn(tmp_path / "t.npz")


def shuffled_knn(seed: int, n: int = 23, k: int = 7) -> tuple[np.ndarray, ...]:
    """Rows sorted nearest first (distinct distances, some missing entries -1 / inf at the end)
    and the same rows with their entries shuffled."""
    rng = np.random.default_rng(seed)
    nbrs = rng.integers(0, 1000, (n, k))
    dists = np.sort(rng.uniform(0, 2, (n, k)), axis=1).astype(np.float32)
    nbrs[::4, -2:] = -1
    dists[::4, -2:] = np.inf
    perm = np.argsort(rng.random((n, k)), axis=1)
    return nbrs, dists, np.take_along_axis(nbrs, perm, 1), np.take_along_axis(dists, perm, 1)


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_knn_rows_are_sorted_nearest_first_on_reading(tmp_path, chunk_rows):
    nbrs, dists, mixed_nbrs, mixed_dists = shuffled_knn(1)
    write_knn(tmp_path / "k.npz", mixed_nbrs, mixed_dists)
    got_nbrs, got_dists = read_knn(tmp_path / "k.npz", chunk_rows=chunk_rows)
    np.testing.assert_array_equal(got_nbrs, nbrs)
    np.testing.assert_array_equal(got_dists, dists)
    # column-major files (read whole) are sorted too
    data = np.stack([mixed_nbrs.astype(np.float64), mixed_dists.astype(np.float64)], axis=1)
    np.savez(tmp_path / "f.npz", data=np.asfortranarray(data))
    got_nbrs, got_dists = read_knn(tmp_path / "f.npz", chunk_rows=chunk_rows)
    np.testing.assert_array_equal(got_nbrs, nbrs)
    np.testing.assert_array_equal(got_dists, dists)


def test_sort_knn_rows_is_stable_and_skips_sorted_rows():
    # a missing id (-1) goes last whatever distance was stored for it; ties keep stored order
    nbrs = np.array([[3, -1, 5, 4, 6], [0, 1, 2, 3, 4]])
    dists = np.array([[0.5, 0.0, 0.2, 0.2, 0.2], [0.0, 0.1, 0.1, 0.3, 0.4]], dtype=np.float32)
    assert sort_knn_rows(nbrs, dists) == 1
    np.testing.assert_array_equal(nbrs, [[5, 4, 6, 3, -1], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(dists[0], np.float32([0.2, 0.2, 0.2, 0.5, 0.0]))
    assert sort_knn_rows(nbrs, dists) == 0


def test_knn_nan_distance_is_an_error(tmp_path):
    write_knn(tmp_path / "n.npz", np.array([[0, 1], [1, 0]]), np.float32([[0, 0.2], [0, np.nan]]))
    with pytest.raises(DataFormatError, match=r"n\.npz: row 1 has NaN distances"):
        read_knn(tmp_path / "n.npz")
