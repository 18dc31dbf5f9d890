"""IJB-B / IJB-C metadata in the layout of insightface's IJB evaluation helper.

``root/meta/{name}_face_tid_mid.txt`` has lines ``image template_id media_id``;
``root/meta/{name}_template_pair_label.txt`` has ``t1 t2 label``;
``root/meta/{name}_name_5pts_score.txt`` has ``image x1 y1 ... x5 y5 faceness``
(``name`` lower-cased, e.g. ``ijbc``). Images live in ``root/loose_crop/``. Both per-image files
list the images in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustface.errors import DataFormatError
from robustface.utils.io import atomic_path

__all__ = ["IJBMeta", "ijb_meta_paths", "read_ijb_meta", "write_ijb_meta"]

_ROWS_PER_CHUNK = 1 << 18


@dataclass
class IJBMeta:
    """Everything the IJB 1:1 protocol needs, with one row per image or per template pair."""

    name: str
    root: Path
    images: np.ndarray  # (N,) str, file names under root/loose_crop
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float32, x then y
    faceness: np.ndarray  # (N,) float32
    pairs: np.ndarray  # (P, 2) int64 template ids
    pair_labels: np.ndarray  # (P,) int64, 1 = same identity

    @property
    def image_dir(self) -> Path:
        """Folder holding the loosely cropped images."""
        return self.root / "loose_crop"

    def image_paths(self) -> list[Path]:
        """Full path of every image, in row order."""
        return [self.image_dir / name for name in self.images.tolist()]


def ijb_meta_paths(root: Path, name: str) -> tuple[Path, Path, Path]:
    """The meta files of set ``name`` under ``root``: template/media, pairs, 5 points."""
    meta = root / "meta"
    stem = name.lower()
    return (
        meta / f"{stem}_face_tid_mid.txt",
        meta / f"{stem}_template_pair_label.txt",
        meta / f"{stem}_name_5pts_score.txt",
    )


def _load_columns(
    path: Path, columns: int, dtype: type, usecols: range | None = None
) -> np.ndarray:
    """Parse a whitespace-separated text table with numpy's C parser; errors name the row."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    width = columns if usecols is None else len(usecols)
    if first is None:
        return np.empty((0, width), dtype=dtype)
    if len(first.split()) != columns:
        raise DataFormatError(
            path, f"expected {columns} fields per line, the first line is {first.strip()!r}"
        )
    try:
        table = np.loadtxt(path, dtype=dtype, comments=None, usecols=usecols, encoding="utf-8")
    except ValueError as exc:
        raise DataFormatError(path, f"expected {columns} fields per line: {exc}") from None
    return table.reshape(-1, width)


def read_ijb_meta(root: str | Path, name: str = "IJBC") -> IJBMeta:
    """Read the IJB meta files under ``root/meta`` for dataset ``name`` (``IJBB`` or ``IJBC``)."""
    root = Path(root)
    tid_path, pair_path, pts_path = ijb_meta_paths(root, name)
    for p in (tid_path, pair_path, pts_path):
        if not p.is_file():
            raise FileNotFoundError(f"IJB meta file not found: {p}")
    images = _load_columns(tid_path, 3, str, usecols=range(1))[:, 0]
    ids = _load_columns(tid_path, 3, np.int64, usecols=range(1, 3))
    pts_images = _load_columns(pts_path, 12, str, usecols=range(1))[:, 0]
    points = _load_columns(pts_path, 12, np.float32, usecols=range(1, 12))
    if images.shape != pts_images.shape:
        raise DataFormatError(
            pts_path, f"{pts_images.size} images, but {tid_path.name} lists {images.size}"
        )
    mismatch = np.flatnonzero(images != pts_images)
    if mismatch.size:
        i = int(mismatch[0])
        raise DataFormatError(
            pts_path,
            f"line {i + 1}: image {str(pts_images[i])!r} but {tid_path.name} line {i + 1} has "
            f"{str(images[i])!r}; both files must list the images in the same order",
        )
    pair_table = _load_columns(pair_path, 3, np.int64)
    return IJBMeta(
        name=name,
        root=root,
        images=images,
        templates=ids[:, 0].copy(),
        medias=ids[:, 1].copy(),
        landmarks=points[:, :10].reshape(-1, 5, 2).copy(),
        faceness=points[:, 10].copy(),
        pairs=pair_table[:, :2].copy(),
        pair_labels=pair_table[:, 2].copy(),
    )


def _write_rows(path: Path, row_format: str, columns: list[np.ndarray]) -> None:
    """Write rows formatted with ``row_format`` atomically, formatting big chunks in one call."""
    n = len(columns[0])
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, n, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, n)
            block = np.empty((stop - start, len(columns)), dtype=object)
            for j, col in enumerate(columns):
                block[:, j] = col[start:stop].tolist()
            f.write((row_format * (stop - start)) % tuple(block.ravel().tolist()))


def write_ijb_meta(
    root: str | Path,
    name: str,
    images: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    landmarks: np.ndarray,
    faceness: np.ndarray,
    pairs: np.ndarray,
    pair_labels: np.ndarray,
) -> None:
    """Write the three IJB meta files under ``root/meta`` (each atomically)."""
    root = Path(root)
    images = np.asarray(images, dtype=str)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    faceness = np.asarray(faceness, dtype=np.float32)
    pairs = np.asarray(pairs, dtype=np.int64)
    pair_labels = np.asarray(pair_labels, dtype=np.int64)
    n = images.shape[0]
    expected = {
        "images": (images, (n,)),
        "templates": (templates, (n,)),
        "medias": (medias, (n,)),
        "landmarks": (landmarks, (n, 5, 2)),
        "faceness": (faceness, (n,)),
        "pairs": (pairs, (pairs.shape[0], 2)),
        "pair_labels": (pair_labels, (pairs.shape[0],)),
    }
    for arg, (value, shape) in expected.items():
        if value.shape != shape:
            raise ValueError(f"{arg} must have shape {shape}, got {value.shape}")
    if any(len(s.split()) != 1 for s in images.tolist()):
        raise ValueError("image names must be non-empty and contain no whitespace")
    tid_path, pair_path, pts_path = ijb_meta_paths(root, name)
    _write_rows(tid_path, "%s %d %d\n", [images, templates, medias])
    coords = landmarks.reshape(n, 10)
    _write_rows(
        pts_path,
        "%s" + " %.4f" * 10 + " %.6f\n",
        [images, *(coords[:, j] for j in range(10)), faceness],
    )
    _write_rows(pair_path, "%d %d %d\n", [pairs[:, 0], pairs[:, 1], pair_labels])
