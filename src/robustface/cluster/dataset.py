"""Clustering data sets: the learn-to-cluster directory layout, ``.npy`` files, SynthFace features.

learn-to-cluster (``yl-1993/learn-to-cluster``, ``DATASET.md``) keeps one data root::

    root/features/<name>.bin              raw float32, N x dim (dim 256 for its MS1M features)
    root/labels/<name>.meta               one integer label per line
    root/knns/<name>/<method>_k_<k>.npz   kNN graph, e.g. knns/part1_test/faiss_k_80.npz

with ``part0_train`` (576,494 samples, 8,573 identities) and ``part1_test`` (584,013 / 8,573),
and the larger test sets ``part3_test`` ... ``part9_test``. Features are L2-normalised on load.
Our own ``features/<name>.npy`` (an ``(N, dim)`` float array) and ``labels/<name>.npy`` (an
``(N,)`` integer array) are read wherever the ``.bin`` / ``.meta`` are missing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from robustface.data.loader import user_error_batches
from robustface.data.ltc import read_meta, write_features, write_meta
from robustface.data.recordio import RecordIODataset
from robustface.data.transforms import resize_to
from robustface.errors import DataFormatError
from robustface.evaluate.verification import embed_views
from robustface.models.loading import load_backbone
from robustface.utils.guards import check_choice, check_int

__all__ = [
    "ClusterSet",
    "extract_synthface_features",
    "feature_path",
    "knn_file_method",
    "knn_path",
    "label_path",
    "load_cluster_set",
    "load_features",
    "load_labels",
    "save_cluster_set",
]

FEATURE_SUFFIXES = (".bin", ".npy")
LABEL_SUFFIXES = (".meta", ".npy")
SYNTHFACE_SPLITS = ("train", "open_set")
_CHUNK_ROWS = 65536
_UNIT_TOLERANCE = 1e-3


@dataclass
class ClusterSet:
    """A named set of features ``(N, d)`` float32 with identity labels ``(N,)`` int64 (or None)."""

    name: str
    features: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.dtype != np.float32:
            raise ValueError(
                f"features of {self.name!r} must be a float32 (N, dim) array, got "
                f"{self.features.dtype} {self.features.shape}"
            )
        if self.labels is not None:
            if self.labels.ndim != 1 or self.labels.dtype != np.int64:
                raise ValueError(
                    f"labels of {self.name!r} must be an int64 (N,) array, got "
                    f"{self.labels.dtype} {self.labels.shape}"
                )
            if len(self.labels) != len(self.features):
                raise ValueError(
                    f"{self.name!r} has {len(self.labels)} labels for {len(self.features)} "
                    "feature rows"
                )

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of distinct labels (0 without labels)."""
        return 0 if self.labels is None else int(np.unique(self.labels).size)


def feature_path(root: str | Path, name: str, suffix: str = ".bin") -> Path:
    """``root/features/<name><suffix>``."""
    return Path(root) / "features" / f"{name}{suffix}"


def label_path(root: str | Path, name: str, suffix: str = ".meta") -> Path:
    """``root/labels/<name><suffix>``."""
    return Path(root) / "labels" / f"{name}{suffix}"


def knn_file_method(index: str) -> str:
    """The ``method`` part of a kNN file name for a faiss index kind (``flat``, ``ivf``,
    ``hnsw``): learn-to-cluster names exact graphs ``faiss``; approximate ones get their index
    name (``faiss_ivf``)."""
    return "faiss" if index == "flat" else f"faiss_{index}"


def knn_path(root: str | Path, name: str, k: int, method: str = "faiss") -> Path:
    """``root/knns/<name>/<method>_k_<k>.npz``, learn-to-cluster's kNN file name."""
    k = check_int("k", k, 1)
    return Path(root) / "knns" / name / f"{method}_k_{k}.npz"


def _check_rows(feats: np.ndarray, path: Path, normalize: bool) -> np.ndarray:
    """Reject NaN/inf rows (naming the first); with ``normalize`` also all-zero rows, and
    normalise in place (or, for a read-only memory map, check that rows are unit).

    Runs over chunks of rows, so a memory-mapped file is never copied whole.
    """
    for start in range(0, len(feats), _CHUNK_ROWS):
        chunk = feats[start : start + _CHUNK_ROWS]
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise DataFormatError(path, f"row {row} has NaN or inf values")
        if not normalize:
            continue
        norms = np.linalg.norm(chunk, axis=1)
        if not norms.all():
            row = start + int(np.argmin(norms))
            raise DataFormatError(path, f"row {row} is all zeros and cannot be L2-normalised")
        if feats.flags.writeable:
            chunk /= norms[:, None]
        elif np.abs(norms - 1).max() > _UNIT_TOLERANCE:
            row = start + int(np.argmax(np.abs(norms - 1)))
            raise DataFormatError(
                path,
                f"row {row} has norm {norms[row - start]:.4f}; a memory-mapped file must hold "
                "L2-normalised rows (load with mmap=False to normalise a copy)",
            )
    return feats


def load_features(
    path: str | Path, dim: int | None = 256, *, normalize: bool = True, mmap: bool = False
) -> np.ndarray:
    """Features ``(N, dim)`` float32 from a raw ``.bin`` (learn-to-cluster) or a ``.npy`` file.

    ``dim`` is required for ``.bin`` and checked against a ``.npy`` (None: take its width).
    With ``normalize`` rows are L2-normalised; with ``mmap`` the file is memory-mapped read-only,
    so it must already hold unit rows when ``normalize`` is set (checked). NaN/inf or all-zero
    rows are errors that name the first such row.
    """
    path = Path(path)
    if not path.is_file():  # first: a missing file is the news, not its name
        raise FileNotFoundError(f"feature file not found: {path}")
    if path.suffix not in FEATURE_SUFFIXES:
        raise ValueError(f"{path}: feature files must end in {' or '.join(FEATURE_SUFFIXES)}")
    if dim is not None:
        dim = check_int("dim", dim, 1)
    if path.suffix == ".bin":
        if dim is None:
            raise ValueError(f"{path}: a raw .bin file needs dim (its row width)")
        size = path.stat().st_size
        if size % (4 * dim):
            raise DataFormatError(
                path, f"size {size} bytes is not a multiple of dim * 4 = {4 * dim} (dim={dim})"
            )
        if mmap:
            feats = np.memmap(path, dtype="<f4", mode="r", shape=(size // (4 * dim), dim))
        else:
            feats = np.fromfile(path, dtype="<f4").reshape(-1, dim)
    else:
        try:
            feats = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as exc:
            raise DataFormatError(path, f"not a readable .npy array: {exc}") from exc
        if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
            raise DataFormatError(
                path, f"expected a float (N, dim) array, got {feats.dtype} {feats.shape}"
            )
        if dim is not None and feats.shape[1] != dim:
            raise DataFormatError(path, f"rows have {feats.shape[1]} values, expected dim={dim}")
        if feats.dtype != np.float32:
            if mmap:
                raise DataFormatError(path, f"cannot memory-map {feats.dtype} as float32")
            feats = feats.astype(np.float32)
    if not mmap and not feats.flags.writeable:
        feats = np.array(feats)
    return _check_rows(feats, path, normalize)


def load_labels(path: str | Path) -> np.ndarray:
    """Labels ``(N,)`` int64 from a ``.meta`` (one integer per line) or a 1-D integer ``.npy``."""
    path = Path(path)
    if not path.is_file():  # first: a missing file is the news, not its name
        raise FileNotFoundError(f"label file not found: {path}")
    if path.suffix not in LABEL_SUFFIXES:
        raise ValueError(f"{path}: label files must end in {' or '.join(LABEL_SUFFIXES)}")
    if path.suffix == ".meta":
        return read_meta(path)
    try:
        labels = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataFormatError(path, f"not a readable .npy array: {exc}") from exc
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(
            path, f"expected a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def _first_file(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _not_found(what: str, candidates: list[Path]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected {' or '.join(str(p) for p in candidates)}"
    )


def load_cluster_set(
    root: str | Path,
    name: str,
    dim: int | None = 256,
    normalize: bool = True,
    mmap: bool = False,
    *,
    require_labels: bool = False,
) -> ClusterSet:
    """Load ``name`` from a learn-to-cluster data root (``features/<name>.bin|.npy`` and
    ``labels/<name>.meta|.npy``).

    ``dim`` is the row width of a ``.bin`` and is checked against a ``.npy``; None takes a
    ``.npy``'s own width and learn-to-cluster's 256 for a ``.bin``.

    Missing labels give ``labels=None`` (learn-to-cluster clusters unlabelled test sets too)
    unless ``require_labels``. A label count that differs from the feature rows is an error.
    """
    feats_candidates = [feature_path(root, name, s) for s in FEATURE_SUFFIXES]
    labels_candidates = [label_path(root, name, s) for s in LABEL_SUFFIXES]
    feats_file = _first_file(feats_candidates)
    labels_file = _first_file(labels_candidates)
    if feats_file is None:
        raise _not_found("features", feats_candidates)
    if labels_file is None and require_labels:
        raise _not_found("labels", labels_candidates)
    labels = None if labels_file is None else load_labels(labels_file)
    if feats_file.suffix == ".bin":  # a raw .bin does not say its width: check it by the labels
        dim = 256 if dim is None else dim
        size = feats_file.stat().st_size
        if labels is not None and len(labels) and size != 4 * dim * len(labels):
            width = size / (4 * len(labels))
            hint = f"; with one row a label, its rows have {width:g} values (pass dim={width:g}"
            hint += ", CLI --dim)"
            raise DataFormatError(
                labels_file,
                f"{len(labels)} labels, but {feats_file} ({size} bytes) is not {len(labels)} "
                f"rows of dim={dim} float32 values" + (hint if width.is_integer() else ""),
            )
    feats = load_features(feats_file, dim, normalize=normalize, mmap=mmap)
    if labels is not None and len(labels) != len(feats):
        raise DataFormatError(
            labels_file, f"{len(labels)} labels, but {feats_file} has {len(feats)} feature rows"
        )
    return ClusterSet(name, feats, labels)


def save_cluster_set(root: str | Path, cs: ClusterSet) -> tuple[Path, Path | None]:
    """Write ``cs`` as ``root/features/<name>.bin`` (+ ``root/labels/<name>.meta`` when it has
    labels), each file atomically; returns the two paths (None for absent labels)."""
    feats_file = feature_path(root, cs.name)
    write_features(feats_file, cs.features)
    if cs.labels is None:
        return feats_file, None
    labels_file = label_path(root, cs.name)
    write_meta(labels_file, cs.labels)
    return feats_file, labels_file


def _synthface_rec(synth_dir: Path, split: str) -> Path:
    check_choice("split", split, SYNTHFACE_SPLITS)
    rec = synth_dir / "train.rec" if split == "train" else synth_dir / "open_set" / "open_set.rec"
    if not rec.is_file():
        why = " (built with open_set_identities=0?)" if split == "open_set" else ""
        raise FileNotFoundError(f"SynthFace {split} set not found: expected {rec}{why}")
    return rec


def _check_manifest(rec: Path, labels: np.ndarray) -> None:
    """Compare the record labels with the split's ``manifest.json`` (when there is one)."""
    manifest_file = rec.parent / "manifest.json"
    if not manifest_file.is_file():
        return
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    expected = np.asarray(manifest["samples"]["label"], dtype=np.int64)
    if not np.array_equal(expected, labels):
        raise DataFormatError(
            rec, f"record labels differ from {manifest_file} ({len(labels)} vs {len(expected)})"
        )


def extract_synthface_features(
    model_path: str | Path,
    synth_dir: str | Path,
    *,
    split: str = "open_set",
    backbone: str | None = None,
    embedding_size: int | None = None,
    input_size: int | None = None,
    width: float | None = None,
    color_order: str | None = None,
    unsafe_legacy_load: bool = False,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
) -> ClusterSet:
    """Embed a SynthFace split with a model: a :class:`ClusterSet` of unit features and labels.

    ``model_path`` is anything :func:`robustface.models.loading.load_backbone` reads (a run
    directory, a state_dict (its architecture inferred, or checked against ``backbone`` and the
    size arguments; ``color_order`` and ``unsafe_legacy_load`` as there), or an ``.onnx``).
    ``split``: ``open_set`` (``open_set/open_set.rec``, identities never trained on, the natural
    clustering set) or ``train`` (``train.rec``). Labels are the split's class labels, one per
    identity (``manifest.json``'s ``label`` column, checked). Each feature is
    ``normalize(e + e_flip)`` with ``flip`` (insightface's evaluation convention), else
    ``normalize(e)``.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    rec = _synthface_rec(Path(synth_dir), split)
    model, size = load_backbone(
        model_path,
        backbone=backbone,
        embedding_size=embedding_size,
        input_size=input_size,
        width=width,
        color_order=color_order,
        unsafe_legacy_load=unsafe_legacy_load,
        device=device,
    )
    dataset = RecordIODataset(rec, transform=functools.partial(resize_to, size=size))
    labels = dataset.labels
    _check_manifest(rec, labels)
    count, batches = user_error_batches(dataset, batch_size=batch_size, num_workers=num_workers)
    chunks = []
    bar = tqdm(
        batches, total=count, desc=f"embedding {split}", unit="batch", disable=not show_progress
    )
    for images, _ in bar:
        views = embed_views(images, model, flip=flip, device=device)
        chunks.append(views.sum(axis=1, dtype=np.float32))
    feats = np.concatenate(chunks)
    return ClusterSet(f"synthface_{split}", _check_rows(feats, rec, normalize=True), labels)
