"""File formats of the learn-to-cluster benchmark (features, labels and kNN graphs).

Features: raw float32 ``.bin``, ``N x dim`` row-major. Labels: ``.meta`` text, one integer per line.
kNN: ``.npz`` with key ``data`` of shape ``[N, 2, k]`` holding neighbour ids (``[:, 0]``) and
distances ``1 - cos`` (``[:, 1]``), the sample itself included; ids are stored as floats, as the
original code does.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from robustface.data.recordio import _is_int
from robustface.errors import DataFormatError
from robustface.utils.io import atomic_path, write_bytes_atomic, write_text_atomic

__all__ = ["read_features", "read_knn", "read_meta", "write_features", "write_knn", "write_meta"]


def read_features(
    path: str | Path, dim: int = 256, normalize: bool = True, mmap: bool = False
) -> np.ndarray:
    """Read an ``N x dim`` float32 feature file; with ``normalize``, L2-normalise every row.

    With ``mmap``, return a read-only ``np.memmap`` whose rows are read from disk on demand (for
    features larger than memory). A map cannot be normalised in place, so ``mmap`` needs
    ``normalize=False``: write L2-normalised features once (:func:`write_features`) and map those.
    """
    path = Path(path)
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
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


def read_knn(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a kNN ``.npz``: neighbour ids ``(N, k)`` int64 and distances ``(N, k)`` float32."""
    path = Path(path)
    try:
        npz = np.load(path)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataFormatError(path, f"not a readable .npz file: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataFormatError(path, "expected an .npz archive with key 'data', got a .npy array")
    with npz:
        if "data" not in npz.files:
            raise DataFormatError(path, f"no key 'data' (keys: {npz.files})")
        try:
            data = npz["data"]
        except ValueError as exc:  # object arrays need pickle, which is not allowed
            raise DataFormatError(path, f"cannot read 'data': {exc}") from exc
    if data.ndim != 3 or data.shape[1] != 2:
        raise DataFormatError(path, f"'data' must have shape [N, 2, k], got {list(data.shape)}")
    ids = data[:, 0, :]
    nbrs = ids.astype(np.int64)
    if np.issubdtype(ids.dtype, np.floating) and not np.array_equal(nbrs, ids):
        raise DataFormatError(path, "neighbour ids in data[:, 0] are not integers")
    return nbrs, data[:, 1, :].astype(np.float32)


def write_knn(path: str | Path, nbrs: np.ndarray, dists: np.ndarray) -> None:
    """Write a kNN graph as learn-to-cluster's ``.npz`` (key ``data``, ``[N, 2, k]``), atomically.

    Ids and distances share one float64 array (ids are exact up to 2**53).
    """
    nbrs, dists = np.asarray(nbrs), np.asarray(dists)
    if nbrs.ndim != 2 or nbrs.shape != dists.shape:
        raise ValueError(
            f"nbrs and dists must be (N, k) arrays of one shape, got {nbrs.shape} and {dists.shape}"
        )
    data = np.stack([nbrs.astype(np.float64), dists.astype(np.float64)], axis=1)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, data=data)
