"""Write a new insightface RecordIO from records picked out of existing ones, bytes unchanged.

Used to build noisy training sets (:mod:`robustface.data.noise`) and cleaned ones: each picked
record keeps its encoded image byte for byte and gets a new class label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from robustface.data.recordio import RecordIODataset, unpack_record, write_insightface_rec
from robustface.utils.guards import check_int
from robustface.utils.io import link_or_copy

__all__ = ["dataset_keys", "write_rec_subset"]


def dataset_keys(dataset: RecordIODataset) -> np.ndarray:
    """Record key of each dataset index of ``dataset`` (int64): ``ds[i]`` is record ``keys[i]``."""
    if dataset.layout == "insightface":
        return np.arange(1, len(dataset) + 1, dtype=np.int64)
    return np.asarray(dataset.reader.keys, dtype=np.int64)


def _image_size(dataset: RecordIODataset) -> tuple[int, int]:
    """``(H, W)`` from the ``property`` file, else from the first image."""
    if dataset.image_size is not None:
        return dataset.image_size
    height, width = dataset[0][0].shape[:2]
    return int(height), int(width)


def _int_array(value: np.ndarray, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a {ndim}-D integer array, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64, copy=False)


def write_rec_subset(
    out_dir: str | Path,
    sources: Sequence[str | Path],
    picks: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    prefix: str = "train",
    progress: bool = False,
) -> np.ndarray:
    """Copy the picked records of ``sources`` into an insightface RecordIO in ``out_dir``.

    ``sources`` are ``.rec`` files or directories :class:`RecordIODataset` accepts. Row ``r`` of
    ``picks`` (``(N, 2)`` ints) is ``[source number, dataset index in that source]``; its record
    is written with class ``labels[r]`` (in ``[0, num_classes)``), image bytes unchanged. Records
    are grouped by label (a stable sort) and every class needs at least one. Writes
    ``{prefix}.rec``, ``{prefix}.idx`` and ``property`` (the sources' common image size) and
    returns ``order`` (int64): written record ``i`` (dataset index ``i``) is row ``order[i]``.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir {out_dir} is not an existing directory")
    if len(sources) == 0:
        raise ValueError("sources is empty: give at least one .rec file or directory")
    picks = _int_array(picks, "picks", 2)
    labels = _int_array(labels, "labels", 1)
    if picks.shape[1:] != (2,):
        raise ValueError(f"picks must have shape (N, 2), got {picks.shape}")
    if len(picks) != len(labels):
        raise ValueError(f"picks has {len(picks)} rows but labels has {len(labels)}")
    if len(picks) == 0:
        raise ValueError("picks is empty: nothing to write")
    num_classes = check_int("num_classes", num_classes, 1)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"labels[{bad[0]}] = {labels[bad[0]]} is outside [0, num_classes={num_classes}) "
            f"({bad.size} such rows)"
        )
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"labels must cover 0..{num_classes - 1}; {empty.size} classes have no samples, "
            f"first {empty[:10].tolist()}"
        )
    source_no, index = picks[:, 0], picks[:, 1]
    bad = np.flatnonzero((source_no < 0) | (source_no >= len(sources)))
    if bad.size:
        raise ValueError(
            f"picks[{bad[0]}] names source {source_no[bad[0]]}, but there are {len(sources)} "
            f"sources ({bad.size} such rows)"
        )
    datasets = [RecordIODataset(s) for s in sources]
    try:
        sizes = np.array([len(d) for d in datasets], dtype=np.int64)
        bad = np.flatnonzero((index < 0) | (index >= sizes[source_no]))
        if bad.size:
            r = bad[0]
            raise ValueError(
                f"picks[{r}] = {picks[r].tolist()}: index outside source "
                f"{datasets[source_no[r]].rec_path} of {sizes[source_no[r]]} images "
                f"({bad.size} such rows)"
            )
        image_size = _image_size(datasets[0])
        for d in datasets[1:]:
            if _image_size(d) != image_size:
                raise ValueError(
                    f"sources differ in image size: {datasets[0].rec_path} has {image_size}, "
                    f"{d.rec_path} has {_image_size(d)}"
                )
        order = np.argsort(labels, kind="stable")
        all_keys = np.concatenate([dataset_keys(d) for d in datasets])
        base = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        keys = all_keys[base[source_no[order]] + index[order]]

        def items() -> Iterator[tuple[bytes, int]]:
            rows = zip(
                source_no[order].tolist(), keys.tolist(), labels[order].tolist(), strict=True
            )
            for s, key, label in tqdm(
                rows, total=len(order), desc="write_rec_subset", unit="img", disable=not progress
            ):
                reader = datasets[s].reader
                yield unpack_record(reader.read(key), reader.rec_path, key)[1], label

        write_insightface_rec(
            out_dir, items(), image_size=image_size, prefix=prefix, num_classes=num_classes
        )
    finally:
        for d in datasets:
            d.reader.close()
    return order


def link_verification_sets(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Link (or copy) the ``*.bin`` pair sets and ``verification.json`` of ``src_dir`` into
    ``dst_dir``, so that a training set derived from another keeps its verification targets."""
    src_dir = Path(src_dir)
    for src in [*sorted(src_dir.glob("*.bin")), src_dir / "verification.json"]:
        if src.is_file():
            link_or_copy(src, Path(dst_dir) / src.name)
