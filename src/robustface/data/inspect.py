"""``robustface inspect PATH``: summarise a dataset the way it will be read, and check all of it.

Understands a RecordIO training set (directory or ``.rec``), a verification ``.bin``, an
insightface-style IJB directory (``meta/*_face_tid_mid.txt``) and an image folder (one
sub-folder of images per identity, ``data.source: folder``). A directory is searched for the
first three, and so are its immediate sub-directories (a SynthFace directory's ``open_set/`` and
``IJBS/``); one that holds none of them but sub-folders of images is an image folder.

The full check (the default) reads everything training and evaluation will read, in one streaming
pass with a progress bar:

- ``.rec``: every image record's framing and header, its label (an integer in
  ``[0, num_classes)``, the bound from ``property`` or the identity records, and equal to its
  identity record's class in the insightface layout) and the decoding of its image;
- ``.bin``: the image count against the pair count, and the decoding of every image;
- IJB: every image listed in ``meta/*_face_tid_mid.txt`` exists under ``loose_crop/`` and decodes,
  every template of a pair has images, and every pair label is 0 or 1;
- image folder: every identity folder has images and every image decodes.

Every problem found is counted and the first ``max_problems`` are listed with their file and record
(or line). ``quick=True`` decodes only the first image of each set, as a fast sanity check.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from robustface.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from robustface.data.ijb import ijb_meta_paths, read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.recordio import RecordIODataset
from robustface.data.verification import load_bin
from robustface.errors import DataFormatError
from robustface.utils.table import markdown_table

__all__ = ["InspectReport", "inspect_dataset"]


@dataclasses.dataclass
class InspectReport:
    """What ``inspect_dataset`` found: the summary text and the problems."""

    text: str
    problems: list[str]  # the first ``max_problems``, each naming its file and record or line
    num_problems: int  # all of them

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return self.num_problems == 0


class _Problems:
    """Counts every problem and keeps the first ``cap`` messages; one per file and record."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.shown: list[str] = []
        self.count = 0
        self._records: set[tuple[str, object]] = set()

    def add(self, problem: object) -> None:
        if isinstance(problem, DataFormatError) and problem.key is not None:
            # the labels pass and the record pass may both meet a broken record
            if (problem.path, problem.key) in self._records:
                return
            self._records.add((problem.path, problem.key))
        self.count += 1
        if len(self.shown) < self.cap:
            self.shown.append(str(problem))

    def room(self) -> int:
        """How many more messages would be kept."""
        return self.cap - len(self.shown)


def _sizes(counts: Counter[tuple[int, int]], show: int = 3) -> str:
    """``112x112 (58), 96x96 (2)``: the ``show`` most common sizes and how many others."""
    text = ", ".join(f"{w}x{h} ({n})" for (h, w), n in counts.most_common(show)) or "-"
    others = len(counts) - show
    return f"{text} and {others} other sizes" if others > 0 else text


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def _check_rec(path: Path, problems: _Problems, quick: bool, progress: bool) -> str:
    ds = RecordIODataset(path)
    head = f"RecordIO training set {ds.rec_path} ({ds.layout} layout)"
    labels: np.ndarray | None = None
    # from the identity records, or from every image header: in a full check of a set without
    # identity records the loop below reads every header anyway (labels from ``read``)
    if quick or ds.has_identity_records:
        try:
            labels = ds.labels
        except DataFormatError as exc:  # still check every image record
            problems.add(exc)
    sizes: Counter[tuple[int, int]] = Counter()
    n = 1 if quick else len(ds)
    read = np.full(n, -1, dtype=np.int64)  # the label of each record that reads
    with _bar(n, ds.rec_path.name, progress) as bar:
        for i in range(n):
            try:
                image, label = ds[i]
            except DataFormatError as exc:
                problems.add(exc)
            else:
                read[i] = label
                sizes[image.shape[:2]] += 1
                if labels is not None and label != labels[i]:
                    problems.add(
                        DataFormatError(
                            ds.rec_path,
                            f"label {label} differs from its identity record's class {labels[i]}",
                            ds.record_key(i),
                        )
                    )
            bar.update()
    rows: list[list[object]] = [["samples", len(ds)]]
    if labels is None and not quick:
        labels = read[read >= 0]  # of the good records
    if labels is not None and labels.size:
        num_classes = ds.label_bound or int(labels.max()) + 1
        counts = np.bincount(labels, minlength=num_classes)
        rows += [
            ["classes", num_classes],
            [
                "images per class (min / median / max)",
                f"{counts.min()} / {np.median(counts):g} / {counts.max()}",
            ],
            ["empty classes", int((counts == 0).sum())],
        ]
    which = "first record" if quick else "all records"
    rows.append([f"image size ({which})", _sizes(sizes)])
    if ds.image_size is not None:
        rows.append(["image size (property)", f"{ds.image_size[1]}x{ds.image_size[0]}"])
    bound = ds.label_bound
    label_rule = "an integer >= 0" if bound is None else f"in [0, {bound})"
    checked = (
        f"quick check: record {ds.record_key(0)} only (run without --quick to check all {len(ds)})"
        if quick
        else f"full check: all {len(ds)} image records (framing, header, label {label_rule}, "
        "image decode)"
    )
    return f"{head}\n{markdown_table(['', 'value'], rows)}\n{checked}"


def _check_bin(path: Path, problems: _Problems, quick: bool, progress: bool) -> str:
    bins, issame = load_bin(path)  # checks 2 images per pair
    sizes: Counter[tuple[int, int]] = Counter()
    n = min(1, len(bins)) if quick else len(bins)
    with _bar(n, path.name, progress) as bar:
        for i in range(n):
            try:
                image = decode_image(bins[i], path, f"image {i} of pair {i // 2}")
            except DataFormatError as exc:
                problems.add(exc)
            else:
                sizes[image.shape[:2]] += 1
            bar.update()
    which = "first image" if quick else "all images"
    rows = [
        ["pairs", len(issame)],
        ["same-identity pairs", int(np.sum(issame))],
        [f"image size ({which})", _sizes(sizes)],
    ]
    checked = (
        f"quick check: image 0 only (run without --quick to check all {len(bins)})"
        if quick
        else f"full check: all {len(bins)} images (decode) of the {len(issame)} pairs"
    )
    return f"verification set {path}\n{markdown_table(['', 'value'], rows)}\n{checked}"


def _check_ijb(path: Path, name: str, problems: _Problems, quick: bool, progress: bool) -> str:
    meta = read_ijb_meta(path, name)
    tid_file, pair_file, _ = ijb_meta_paths(path, name)
    templates = np.unique(meta.templates)
    # a pair whose template has no image, or whose label is not 0/1, breaks the 1:1 protocol
    known = np.isin(meta.pairs, templates)
    bad_rows = np.flatnonzero(~known.all(axis=1) | ~np.isin(meta.pair_labels, (0, 1)))
    listed = bad_rows[: problems.room()]
    for row in listed.tolist():
        pair, label = meta.pairs[row].tolist(), int(meta.pair_labels[row])
        missing = [t for t, ok in zip(pair, known[row].tolist(), strict=True) if not ok]
        why = (
            f"template {missing[0]} has no image in {tid_file.name}"
            if missing
            else f"label {label} is not 0 or 1"
        )
        problems.add(f"{pair_file}: line {row + 1} ({pair[0]} {pair[1]} {label}): {why}")
    problems.count += bad_rows.size - listed.size
    sizes: Counter[tuple[int, int]] = Counter()
    n = min(1, len(meta.images)) if quick else len(meta.images)
    with _bar(n, f"{name} images", progress) as bar:
        for i, file in enumerate(meta.image_paths()[:n]):
            if not file.is_file():
                problems.add(f"{file}: not found (listed on line {i + 1} of {tid_file})")
            else:
                try:
                    sizes[decode_image(file.read_bytes(), file).shape[:2]] += 1
                except DataFormatError as exc:
                    problems.add(exc)
            bar.update()
    which = "first image" if quick else "all images"
    rows = [
        ["images", len(meta.images)],
        ["templates", len(templates)],
        ["media", len(np.unique(meta.medias))],
        ["template pairs", len(meta.pair_labels)],
        ["genuine pairs", int(meta.pair_labels.sum())],
        [f"image size ({which})", _sizes(sizes)],
    ]
    checked = (
        f"quick check: the first image only (run without --quick to check all {len(meta.images)})"
        if quick
        else f"full check: all {len(meta.images)} listed images (exist, decode) and all "
        f"{len(meta.pair_labels)} pairs (templates have images, labels 0 or 1)"
    )
    return f"IJB set {name} at {path}\n{markdown_table(['', 'value'], rows)}\n{checked}"


def _check_folder(path: Path, problems: _Problems, quick: bool, progress: bool) -> str:
    with warnings.catch_warnings():  # the skipped files are a row of the summary
        warnings.simplefilter("ignore", UserWarning)
        ds = ImageFolderDataset(path)
    sizes: Counter[tuple[int, int]] = Counter()
    n = 1 if quick else len(ds)
    with _bar(n, path.name, progress) as bar:
        for file in ds.samples[:n]:
            try:
                sizes[decode_image(file.read_bytes(), file).shape[:2]] += 1
            except DataFormatError as exc:
                problems.add(exc)
            bar.update()
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    which = "first image" if quick else "all images"
    rows = [
        ["samples", len(ds)],
        ["classes (sub-folders)", ds.num_classes],
        [
            "images per class (min / median / max)",
            f"{counts.min()} / {np.median(counts):g} / {counts.max()}",
        ],
        [f"image size ({which})", _sizes(sizes)],
        [
            "skipped (not images, sub-folders)",
            f"{len(ds.skipped)}, e.g. {ds.skipped[0]}" if ds.skipped else 0,
        ],
    ]
    checked = (
        f"quick check: {ds.samples[0]} only (run without --quick to check all {len(ds)})"
        if quick
        else f"full check: all {len(ds)} images (decode)"
    )
    return f"image folder {path}\n{markdown_table(['', 'value'], rows)}\n{checked}"


def _is_image_folder(path: Path) -> bool:
    """A directory with a sub-folder holding a file with an image extension."""
    exts = set(IMAGE_EXTENSIONS)
    return path.is_dir() and any(
        sub.is_dir() and any(f.suffix.lower() in exts for f in sub.iterdir())
        for sub in path.iterdir()
    )


def _find_sets(path: Path) -> list[tuple[str, Path, str]]:
    """``(kind, path, IJB name)`` of every set at ``path``: itself, or in it and its sub-dirs."""
    if path.suffix == ".bin":
        return [("bin", path, "")]
    if path.suffix == ".rec":
        return [("rec", path, "")]
    found: list[tuple[str, Path, str]] = []
    if path.is_dir():
        for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
            for tid in sorted((folder / "meta").glob("*_face_tid_mid.txt")):
                found.append(("ijb", folder, tid.name.split("_face_tid_mid.txt")[0].upper()))
            if any(folder.glob("*.rec")):
                found.append(("rec", folder, ""))
            if folder == path:
                found.extend(("bin", b, "") for b in sorted(path.glob("*.bin")))
    if not found and _is_image_folder(path):
        found.append(("folder", path, ""))
    return found


def inspect_dataset(
    path: str | Path, *, quick: bool = False, max_problems: int = 20, progress: bool = True
) -> InspectReport:
    """Summarise and check every dataset at ``path`` (see the module docstring).

    A set that cannot be opened at all (a broken index, meta file or pickle) counts as one problem
    and the other sets are still checked. Raises ``FileNotFoundError`` when ``path`` holds no set.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    sets = _find_sets(path)
    if not sets:
        raise FileNotFoundError(
            f"{path}: found no .rec, .bin, IJB meta (meta/*_face_tid_mid.txt) or image folder "
            "(sub-folders of images, one per identity) to describe"
        )
    problems = _Problems(max_problems)
    parts = []
    for kind, where, name in sets:
        before = problems.count
        try:
            if kind == "rec":
                text = _check_rec(where, problems, quick, progress)
            elif kind == "bin":
                text = _check_bin(where, problems, quick, progress)
            elif kind == "folder":
                text = _check_folder(where, problems, quick, progress)
            else:
                text = _check_ijb(where, name, problems, quick, progress)
        except (DataFormatError, FileNotFoundError) as exc:
            problems.add(exc)
            text = f"{kind} set {where}: cannot be read"
        found = problems.count - before
        parts.append(f"{text}\n{found} problem{'' if found == 1 else 's'}")
    return InspectReport("\n\n".join(parts), problems.shown, problems.count)
