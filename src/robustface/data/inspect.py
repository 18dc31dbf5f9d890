"""``robustface inspect PATH``: summarise a dataset the way it will be read.

Understands a RecordIO training set (directory or ``.rec``), a verification ``.bin`` and an
insightface-style IJB directory (``meta/*_face_tid_mid.txt``). Reading the first image of each set
checks that it decodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.recordio import RecordIODataset
from robustface.data.verification import load_bin
from robustface.utils.table import markdown_table


def _describe_rec(path: Path) -> str:
    ds = RecordIODataset(path)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    image, _ = ds[0]
    rows = [
        ["samples", len(ds)],
        ["classes", ds.num_classes],
        [
            "images per class (min / median / max)",
            f"{counts.min()} / {np.median(counts):g} / {counts.max()}",
        ],
        ["empty classes", int((counts == 0).sum())],
        ["image size (first record)", f"{image.shape[1]}x{image.shape[0]}"],
    ]
    return f"RecordIO training set {path}\n" + markdown_table(["", "value"], rows)


def _describe_bin(path: Path) -> str:
    bins, issame = load_bin(path)
    image = decode_image(bins[0], path, 0)
    rows = [
        ["pairs", len(issame)],
        ["same-identity pairs", int(np.sum(issame))],
        ["image size (first image)", f"{image.shape[1]}x{image.shape[0]}"],
    ]
    return f"verification set {path}\n" + markdown_table(["", "value"], rows)


def _describe_ijb(path: Path, name: str) -> str:
    meta = read_ijb_meta(path, name)
    rows = [
        ["images", len(meta.images)],
        ["templates", len(np.unique(meta.templates))],
        ["media", len(np.unique(meta.medias))],
        ["template pairs", len(meta.pair_labels)],
        ["genuine pairs", int(meta.pair_labels.sum())],
    ]
    return f"IJB set {name} at {path}\n" + markdown_table(["", "value"], rows)


def describe(path: str | Path) -> str:
    """A human-readable summary of the dataset at ``path`` (raises if it cannot be read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".bin":
        return _describe_bin(path)
    if path.suffix == ".rec":
        return _describe_rec(path)
    parts = []
    if path.is_dir():
        tid_files = sorted((path / "meta").glob("*_face_tid_mid.txt"))
        for tid in tid_files:
            parts.append(_describe_ijb(path, tid.name.split("_face_tid_mid.txt")[0].upper()))
        if any(path.glob("*.rec")):
            parts.append(_describe_rec(path))
        parts.extend(_describe_bin(b) for b in sorted(path.glob("*.bin")))
    if not parts:
        raise FileNotFoundError(
            f"{path}: found no .rec, .bin or IJB meta (meta/*_face_tid_mid.txt) to describe"
        )
    return "\n\n".join(parts)
