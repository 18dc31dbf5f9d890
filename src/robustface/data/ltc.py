"""File formats of the learn-to-cluster benchmark (features, labels and kNN graphs).

Features: raw float32 ``.bin``, ``N x dim`` row-major. Labels: ``.meta`` text, one integer per line.
kNN: ``.npz`` with key ``data`` of shape ``[N, 2, k]`` holding neighbour ids (``[:, 0]``) and
distances ``1 - cos`` (``[:, 1]``), the sample itself included; ids are stored as floats, as the
original code does. kNN files are read and written in row chunks (bounded memory at millions
of rows). Rows are sorted nearest first on reading, as learn-to-cluster's ``knns2ordered_nbrs``
does (stably here; rows already in order are left as they are).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from robustface.data.recordio import _is_int
from robustface.errors import DataFormatError
from robustface.utils.guards import check_int
from robustface.utils.io import atomic_path, write_bytes_atomic, write_text_atomic

__all__ = [
    "read_features",
    "read_knn",
    "read_meta",
    "sort_knn_rows",
    "write_features",
    "write_knn",
    "write_meta",
]


def read_features(
    path: str | Path, dim: int = 256, normalize: bool = True, mmap: bool = False
) -> np.ndarray:
    """Read an ``N x dim`` float32 feature file; with ``normalize``, L2-normalise every row.

    With ``mmap``, return a read-only ``np.memmap`` whose rows are read from disk on demand (for
    features larger than memory). A map cannot be normalised in place, so ``mmap`` needs
    ``normalize=False``: write L2-normalised features once (:func:`write_features`) and map those.
    """
    path = Path(path)
    dim = check_int("dim", dim, 1)
    if mmap and normalize:
        raise ValueError(
            "mmap=True needs normalize=False (a memory map is read-only); write normalised "
            "features once with write_features and map that file"
        )
    size = path.stat().st_size
    if size % (4 * dim):
        raise DataFormatError(
            path, f"size {size} bytes is not a multiple of dim * 4 = {4 * dim} (dim={dim})"
        )
    if mmap:
        if size == 0:  # numpy cannot map an empty file
            return np.zeros((0, dim), dtype=np.float32)
        return np.memmap(path, dtype="<f4", mode="r", shape=(size // (4 * dim), dim))
    feats = np.fromfile(path, dtype="<f4").reshape(-1, dim).astype(np.float32, copy=False)
    if normalize:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        np.divide(feats, np.maximum(norms, np.finfo(np.float32).tiny), out=feats)
    return feats


def write_features(path: str | Path, feats: np.ndarray) -> None:
    """Write an ``N x dim`` feature matrix as raw little-endian float32, atomically."""
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"feats must be a 2-D (N, dim) array, got shape {feats.shape}")
    write_bytes_atomic(path, np.ascontiguousarray(feats, dtype="<f4").tobytes())


def read_meta(path: str | Path) -> np.ndarray:
    """Read a ``.meta`` label file (one integer per line) as int64."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    values = text.split()
    try:
        return np.array(values, dtype=np.int64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not _is_int(v))
        raise DataFormatError(path, f"label {bad} is {values[bad]!r}, not an integer") from None


def write_meta(path: str | Path, labels: np.ndarray) -> None:
    """Write labels as a ``.meta`` file (one integer per line), atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    write_text_atomic(path, "".join(f"{v}\n" for v in labels.tolist()))


KNN_CHUNK_ROWS = 65536  # rows of the [N, 2, k] array read or written at a time
FLOAT32_EXACT_IDS = 2**24  # float32 holds every integer up to this exactly


def read_knn(path: str | Path, chunk_rows: int = KNN_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Read a kNN ``.npz``: neighbour ids ``(N, k)`` int64 and distances ``(N, k)`` float32,
    each row nearest first (:func:`sort_knn_rows`: files whose rows are in another order are
    sorted, as learn-to-cluster does on reading).

    The ``data`` array is read ``chunk_rows`` rows at a time, straight into the two outputs, so
    memory is the outputs plus one chunk (never the whole ``[N, 2, k]`` array).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such kNN file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFormatError(path, f"not a readable .npz file: {exc}") from exc
    with zf:
        names = [n[: -len(".npy")] if n.endswith(".npy") else n for n in zf.namelist()]
        if "data" not in names:
            raise DataFormatError(path, f"no key 'data' (keys: {names})")
        member = zf.namelist()[names.index("data")]
        try:
            with zf.open(member) as f:
                return _read_knn_stream(path, f, chunk_rows)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataFormatError(path, f"cannot read 'data': {exc}") from exc


def _read_knn_stream(path: Path, f: BinaryIO, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(f)
    except ValueError as exc:
        raise DataFormatError(path, f"cannot read 'data': {exc}") from exc
    if len(shape) != 3 or shape[1] != 2:
        raise DataFormatError(path, f"'data' must have shape [N, 2, k], got {list(shape)}")
    if dtype.hasobject or not (np.issubdtype(dtype, np.number)):
        raise DataFormatError(path, f"cannot read 'data': {dtype} is not a numeric dtype")
    num, _, k = shape
    step = max(1, chunk_rows)
    nbrs = np.empty((num, k), dtype=np.int64)
    dists = np.empty((num, k), dtype=np.float32)
    if fortran:  # column-major: rows are not contiguous; read whole (not what numpy writes)
        data = np.frombuffer(_read_exact(path, f, num * 2 * k * dtype.itemsize), dtype)
        _split_knn(path, data.reshape(shape, order="F"), nbrs, dists, 0)
        for start in range(0, num, step):
            sort_knn_rows(nbrs[start : start + step], dists[start : start + step])
        return nbrs, dists
    row_bytes = 2 * k * dtype.itemsize
    for start in range(0, num, step):
        stop = min(num, start + step)
        raw = _read_exact(path, f, (stop - start) * row_bytes)
        block = np.frombuffer(raw, dtype).reshape(stop - start, 2, k)
        _split_knn(path, block, nbrs, dists, start)
        sort_knn_rows(nbrs[start:stop], dists[start:stop])
    return nbrs, dists


def sort_knn_rows(nbrs: np.ndarray, dists: np.ndarray) -> int:
    """Sort each row of ``nbrs`` / ``dists`` (``(n, k)``) in place by distance, ascending and
    stably (ties keep their stored order), missing entries (id ``-1``) last; returns how many
    rows were out of order. Only those rows are sorted, after a cheap check of every row."""
    key = np.where(nbrs < 0, np.inf, dists)
    unsorted = np.flatnonzero((key[:, 1:] < key[:, :-1]).any(axis=1))
    if unsorted.size:
        order = np.argsort(key[unsorted], axis=1, kind="stable")
        nbrs[unsorted] = np.take_along_axis(nbrs[unsorted], order, 1)
        dists[unsorted] = np.take_along_axis(dists[unsorted], order, 1)
    return int(unsorted.size)


def _read_exact(path: Path, f: BinaryIO, size: int) -> bytes:
    raw = f.read(size)
    if len(raw) != size:
        raise DataFormatError(path, f"'data' is truncated: {len(raw)} of {size} bytes left")
    return raw


def _split_knn(
    path: Path, block: np.ndarray, nbrs: np.ndarray, dists: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = block[:, 0, :]
    stop = start + len(block)
    nbrs[start:stop] = ids
    if np.issubdtype(ids.dtype, np.floating) and not np.array_equal(nbrs[start:stop], ids):
        raise DataFormatError(path, "neighbour ids in data[:, 0] are not integers")
    dists[start:stop] = block[:, 1, :]
    if np.isnan(dists[start:stop]).any():
        row = start + int(np.flatnonzero(np.isnan(dists[start:stop]).any(axis=1))[0])
        raise DataFormatError(path, f"row {row} has NaN distances in data[:, 1]")
    return nbrs, dists


def write_knn(
    path: str | Path, nbrs: np.ndarray, dists: np.ndarray, chunk_rows: int = KNN_CHUNK_ROWS
) -> None:
    """Write a kNN graph as learn-to-cluster's ``.npz`` (key ``data``, ``[N, 2, k]``), atomically.

    Ids and distances share one float array, as learn-to-cluster writes it: float32 when every id
    is below 2**24 (exact, half the size), else float64 (exact up to 2**53). The array is
    compressed and streamed ``chunk_rows`` rows at a time, so memory stays at one chunk; numpy's
    ``np.load`` (and learn-to-cluster) read the result as usual.
    """
    nbrs, dists = np.asarray(nbrs), np.asarray(dists)
    if nbrs.ndim != 2 or nbrs.shape != dists.shape:
        raise ValueError(
            f"nbrs and dists must be (N, k) arrays of one shape, got {nbrs.shape} and {dists.shape}"
        )
    chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    small = nbrs.size == 0 or int(np.abs(nbrs).max()) < FLOAT32_EXACT_IDS
    dtype = np.dtype(np.float32 if small else np.float64)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (nbrs.shape[0], 2, nbrs.shape[1])}  # fmt: skip
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("data.npy", "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, len(nbrs), chunk_rows):
            stop = min(len(nbrs), start + chunk_rows)
            block = np.empty((stop - start, 2, nbrs.shape[1]), dtype=dtype)
            block[:, 0, :] = nbrs[start:stop]
            block[:, 1, :] = dists[start:stop]
            f.write(block.tobytes())
