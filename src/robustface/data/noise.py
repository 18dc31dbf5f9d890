"""Synthetic label noise: closed-set flips and open-set outliers, as in BoundaryFace and RobustFace.

Two protocols (REFERENCE §6):

- **BoundaryFace** (offline, :func:`plan_label_noise`, :func:`inject_noise`): per class ``c`` with
  ``n_c`` samples, shuffled, the first ``floor(n_c * open)`` are replaced by images from an
  open-set source (outside identities) that keep the label ``c``, and the next
  ``floor(n_c * closed)`` are relabelled to a uniformly random other class. The noisy set is
  written as a new ``.rec`` with a noise list (``noise.npz``) beside it.
- **RobustFace** (online, :func:`batch_noise`): per batch of ``B``, the first ``floor(B * open)``
  positions get outside images keeping their labels, the next ``floor(B * closed)`` get a random
  other label.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import robustface
from robustface.data.recordio import RecordIODataset
from robustface.data.subset import link_verification_sets, write_rec_subset
from robustface.errors import DataFormatError
from robustface.utils.io import (
    atomic_directory,
    atomic_path,
    check_output_dir,
    write_text_atomic,
)
from robustface.utils.table import markdown_table

__all__ = [
    "CLEAN",
    "CLOSED",
    "KIND_NAMES",
    "NOISE_SETTINGS",
    "OPEN",
    "NoiseInfo",
    "NoisePlan",
    "batch_noise",
    "inject_noise",
    "load_noise_list",
    "noise_list_for",
    "noise_summary_table",
    "parse_noise_setting",
    "plan_label_noise",
    "read_npz_arrays",
]

CLEAN, CLOSED, OPEN = 0, 1, 2
KIND_NAMES = ("clean", "closed", "open")
SOURCE_TRAIN, SOURCE_OPEN = 0, 1
NOISE_LIST = "noise.npz"
NOISE_JSON = "noise.json"

NOISE_SETTINGS: dict[str, tuple[float, float]] = {
    "clean": (0.0, 0.0),
    "C20": (0.2, 0.0),
    "C20O20": (0.2, 0.2),
    "C10O30": (0.1, 0.3),
    "C30O10": (0.3, 0.1),
    "MS1MCON-0.20": (0.15, 0.05),  # RobustFace's seed table: r = 0.20 = 0.15 closed + 0.05 open
}
_CUSTOM = re.compile(r"(?:c(\d+))?(?:o(\d+))?", re.IGNORECASE)
# floor(n * rate) up to float rounding: 100 * 0.29 is 28.999999999999996 in binary floating point.
_EPS = 1e-9


def parse_noise_setting(name: str) -> tuple[float, float]:
    """``(closed rate, open rate)`` of a setting name, case-insensitive.

    Names: those of :data:`NOISE_SETTINGS`, or ``C<pct>``, ``O<pct>``, ``C<pct>O<pct>`` (percent).
    Raises ``ValueError`` for an unknown name or rates summing above 1.
    """
    named = {k.lower(): v for k, v in NOISE_SETTINGS.items()}
    text = name.strip()
    if text.lower() in named:
        return named[text.lower()]
    match = _CUSTOM.fullmatch(text)
    if not text or match is None:
        raise ValueError(
            f"unknown noise setting {name!r}: use one of {', '.join(NOISE_SETTINGS)}, "
            "or C<percent>, O<percent>, C<percent>O<percent> (e.g. C25O5)"
        )
    closed, open_ = (int(g) / 100 if g else 0.0 for g in match.groups())
    _check_rates(closed, open_, f"noise setting {name!r}")
    return closed, open_


def _check_rates(closed: float, open_: float, what: str) -> None:
    if not (0.0 <= closed <= 1.0 and 0.0 <= open_ <= 1.0 and closed + open_ <= 1.0 + _EPS):
        raise ValueError(
            f"{what}: closed rate {closed:g} and open rate {open_:g} must be in [0, 1] "
            "and sum to at most 1"
        )


def _setting_name(closed: float, open_: float) -> str:
    """The canonical ``C<pct>O<pct>`` name of a pair of rates (``clean`` for none)."""
    parts = [f"{p}{100 * r:g}" for p, r in (("C", closed), ("O", open_)) if r > 0]
    return "".join(parts) or "clean"


@dataclasses.dataclass
class NoisePlan:
    """Per-sample noise list: row ``i`` describes training sample (or dataset index) ``i``.

    ``kind``: ``CLEAN``/``CLOSED``/``OPEN``; ``label``: the training label; ``original_label``: the
    true identity label (``-1`` for open rows); ``source``: 0 = training set, 1 = open-set source;
    ``source_index``: the image's dataset index in that source; ``quality``: optional per-sample
    ground-truth quality (SynthFace manifests; NaN where unknown).
    """

    kind: np.ndarray
    label: np.ndarray
    original_label: np.ndarray
    source: np.ndarray
    source_index: np.ndarray
    quality: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.kind = np.asarray(self.kind, dtype=np.int8)
        self.label = np.asarray(self.label, dtype=np.int64)
        self.original_label = np.asarray(self.original_label, dtype=np.int64)
        self.source = np.asarray(self.source, dtype=np.int8)
        self.source_index = np.asarray(self.source_index, dtype=np.int64)
        if self.quality is not None:
            self.quality = np.asarray(self.quality, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.kind.size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns by name (``quality`` only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    def take(self, index: np.ndarray) -> NoisePlan:
        """The rows ``index``, in that order (e.g. the written record order)."""
        return NoisePlan(**{k: v[index] for k, v in self.arrays().items()})

    def counts(self) -> dict[str, int]:
        """Number of rows of each kind, by name."""
        return dict(zip(KIND_NAMES, np.bincount(self.kind, minlength=3).tolist(), strict=True))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency between the columns."""
        for name, value in self.arrays().items():
            if value.ndim != 1 or len(value) != len(self.kind):
                raise ValueError(
                    f"column {name} has shape {value.shape}, expected ({len(self.kind)},)"
                )
        is_open = self.kind == OPEN
        checks = [
            (np.isin(self.kind, (CLEAN, CLOSED, OPEN)), "kind is not 0 (clean), 1 or 2"),
            (self.label >= 0, "label is negative"),
            (self.source_index >= 0, "source_index is negative"),
            (self.source == np.where(is_open, SOURCE_OPEN, SOURCE_TRAIN), "source mismatches kind"),
            ((self.original_label == -1) == is_open, "original_label is -1 iff kind is open"),
            (
                (self.label == self.original_label) == (self.kind == CLEAN),
                "label equals original_label iff kind is clean",
            ),
        ]
        for ok, rule in checks:
            bad = np.flatnonzero(~ok)
            if bad.size:
                raise ValueError(f"row {bad[0]} breaks the rule '{rule}' ({bad.size} such rows)")


@dataclasses.dataclass
class NoiseInfo:
    """What :func:`inject_noise` wrote: the directory, the plan's counts and how long it took."""

    path: Path
    setting: str
    plan: NoisePlan
    num_classes: int
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        """Number of samples of each kind, by name."""
        return self.plan.counts()


def _floor(n: np.ndarray | int, rate: float) -> np.ndarray:
    return np.floor(np.asarray(n) * rate + _EPS).astype(np.int64)


def plan_label_noise(
    labels: np.ndarray,
    closed: float,
    open: float,
    *,
    open_pool: int,
    seed: int,
    eligible: np.ndarray | None = None,
) -> NoisePlan:
    """The BoundaryFace noise plan for training ``labels`` (row ``i`` = training sample ``i``).

    Per class ``c`` (``n_c`` samples, randomly ordered): the first ``floor(n_c * open)`` become
    OPEN (label ``c``, image drawn from the ``open_pool`` outside images, without replacement
    across the plan when the pool is large enough), the next ``floor(n_c * closed)`` become CLOSED
    (label drawn uniformly from the other classes of ``0..max(labels)``). Deterministic in ``seed``.

    ``eligible`` (N,) bool, optional: only these samples may become noisy (the dirty SynthFace
    keeps its sketches and non-faces out of the label noise, so each sample has one kind); the
    counts stay ``floor(n_c * rate)``, capped by the class's eligible samples (open first). With
    every sample eligible the plan is the same as without.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty")
    labels = labels.astype(np.int64, copy=False)
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min()}")
    _check_rates(closed, open, "plan_label_noise")
    num_classes = int(labels.max()) + 1
    if closed > 0 and num_classes < 2:
        raise ValueError("closed-set noise needs at least 2 classes, labels has 1")
    if open > 0 and open_pool < 1:
        raise ValueError(f"open rate {open:g} needs open_pool >= 1 outside images, got {open_pool}")
    rng = np.random.default_rng(seed)
    n = labels.size
    if eligible is None:
        eligible = np.ones(n, dtype=bool)
    eligible = np.asarray(eligible, dtype=bool)
    if eligible.shape != labels.shape:
        raise ValueError(f"eligible must be ({n},) bool, got shape {eligible.shape}")
    # by class, eligible samples first, random within each
    order = np.lexsort((rng.random(n), ~eligible, labels))
    sorted_labels = labels[order]
    rank = np.arange(n) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    class_size = np.bincount(labels)[sorted_labels]
    class_eligible = np.bincount(labels, weights=eligible).astype(np.int64)[sorted_labels]
    n_open = np.minimum(_floor(class_size, open), class_eligible)
    n_noisy = np.minimum(n_open + _floor(class_size, closed), class_eligible)
    kind = np.empty(n, dtype=np.int8)
    kind[order] = np.where(rank < n_open, OPEN, np.where(rank < n_noisy, CLOSED, CLEAN))

    new_label = labels.copy()
    closed_rows = np.flatnonzero(kind == CLOSED)
    offset = rng.integers(1, num_classes, size=closed_rows.size)
    new_label[closed_rows] = (labels[closed_rows] + offset) % num_classes
    open_rows = np.flatnonzero(kind == OPEN)
    if open_rows.size <= open_pool:
        drawn = rng.choice(open_pool, size=open_rows.size, replace=False)
    else:
        drawn = rng.integers(0, open_pool, size=open_rows.size)
    source_index = np.arange(n, dtype=np.int64)
    source_index[open_rows] = drawn
    return NoisePlan(
        kind=kind,
        label=new_label,
        original_label=np.where(kind == OPEN, -1, labels),
        source=(kind == OPEN).astype(np.int8),
        source_index=source_index,
    )


def batch_noise(
    labels: np.ndarray,
    closed: float,
    open: float,
    *,
    num_classes: int,
    open_pool: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RobustFace's per-batch noise for a batch of ``B`` labels: ``(kind, new_labels, open_index)``.

    Positions ``[0, floor(B * open))`` are OPEN (label kept, ``open_index`` a random pool image),
    the next ``floor(B * closed)`` are CLOSED (a random other label), the rest CLEAN
    (``open_index`` -1). Batch positions are assumed to be in random order already.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    _check_rates(closed, open, "batch_noise")
    b = labels.size
    n_open, n_closed = int(_floor(b, open)), int(_floor(b, closed))
    if n_closed and num_classes < 2:
        raise ValueError(f"closed-set noise needs num_classes >= 2, got {num_classes}")
    if n_open and open_pool < 1:
        raise ValueError(f"open rate {open:g} needs open_pool >= 1 outside images, got {open_pool}")
    if b and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, num_classes={num_classes})")
    kind = np.zeros(b, dtype=np.int8)
    kind[:n_open] = OPEN
    kind[n_open : n_open + n_closed] = CLOSED
    new_labels = labels.astype(np.int64)
    flip = slice(n_open, n_open + n_closed)
    offset = rng.integers(1, num_classes, size=n_closed)
    new_labels[flip] = (new_labels[flip] + offset) % num_classes
    open_index = np.full(b, -1, dtype=np.int64)
    open_index[:n_open] = rng.integers(0, open_pool, size=n_open)
    return kind, new_labels, open_index


def manifest_quality(directory: Path, expected: int) -> np.ndarray | None:
    """Per-sample quality from a SynthFace ``manifest.json`` in ``directory`` (None if absent)."""
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not valid JSON: {exc}") from exc
    samples = manifest.get("samples") if isinstance(manifest, dict) else None
    if not isinstance(samples, dict) or "quality" not in samples:
        return None  # a manifest without SynthFace's per-sample quality
    quality = samples["quality"]
    if len(quality) != expected:
        raise DataFormatError(
            path, f"lists {len(quality)} sample qualities but the .rec beside it has {expected}"
        )
    return np.asarray(quality, dtype=np.float32)


def _resolve_setting(setting: str | tuple[float, float]) -> tuple[str, float, float]:
    if isinstance(setting, str):
        closed, open_ = parse_noise_setting(setting)
        return setting, closed, open_
    closed, open_ = (float(r) for r in setting)
    _check_rates(closed, open_, "setting")
    return _setting_name(closed, open_), closed, open_


def inject_noise(
    train: str | Path,
    out: str | Path,
    setting: str | tuple[float, float],
    *,
    open_source: str | Path | None = None,
    seed: int = 0,
    eligible: np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> NoiseInfo:
    """Write a copy of the training set ``train`` with BoundaryFace label noise into ``out``.

    ``setting`` is a name (see :func:`parse_noise_setting`) or ``(closed, open)`` rates. Open-set
    images come from ``open_source`` (default: ``open_set/`` beside the training ``.rec``, as in
    SynthFace). ``out`` gets ``train.rec/.idx``, ``property``, ``noise.npz`` (the plan, row ``i`` =
    dataset index ``i``), ``noise.json`` and links to the source's ``*.bin`` and
    ``verification.json``. It is built in ``out.partial`` and renamed when complete; an existing
    ``out`` is replaced only with ``overwrite`` and only if it is a noise output. ``eligible``:
    the training samples that may become noisy (see :func:`plan_label_noise`).
    """
    t0 = time.perf_counter()
    name, closed, open_ = _resolve_setting(setting)
    train_ds = RecordIODataset(train)
    train_dir = train_ds.rec_path.parent
    if open_ == 0:
        if open_source is not None:
            raise ValueError(
                f"open_source {open_source} given but setting {name} has no open-set noise"
            )
    elif open_source is None:
        if not (train_dir / "open_set").is_dir():
            raise FileNotFoundError(
                f"setting {name} has open rate {open_:g} but there is no open-set source: pass "
                f"open_source (CLI: --open-source DIR) or put open_set/ beside {train_ds.rec_path}"
            )
        open_source = train_dir / "open_set"
    open_ds = RecordIODataset(open_source) if open_source is not None else None
    out = Path(out)
    inputs = [train_dir, *([open_ds.rec_path.parent] if open_ds else [])]
    check_output_dir(out, overwrite=overwrite, marker=NOISE_JSON, inputs=inputs)

    labels = train_ds.labels
    plan = plan_label_noise(
        labels,
        closed,
        open_,
        open_pool=len(open_ds) if open_ds else 0,
        seed=seed,
        eligible=eligible,
    )
    counts = plan.counts()
    for kind, rate in (("closed", closed), ("open", open_)):
        realised = counts[kind] / max(len(plan), 1)
        if rate - realised > 0.01:
            warnings.warn(
                f"{name}: {100 * realised:.1f}% {kind}-set noise instead of {100 * rate:.1f}%: "
                f"the protocol takes floor(n_c * rate) samples of each class, and the classes of "
                f"{train_ds.rec_path} are small (use >= {math.ceil(1 / rate)} images per class)",
                stacklevel=2,
            )
    quality = np.full(len(plan), np.nan, dtype=np.float32)
    train_quality = manifest_quality(train_dir, len(train_ds))
    train_rows = plan.source == SOURCE_TRAIN
    if train_quality is not None:
        quality[train_rows] = train_quality[plan.source_index[train_rows]]
    if open_ds is not None:
        open_quality = manifest_quality(open_ds.rec_path.parent, len(open_ds))
        if open_quality is not None:
            quality[~train_rows] = open_quality[plan.source_index[~train_rows]]
    plan.quality = quality
    sources = [train_ds.rec_path] + ([open_ds.rec_path] if open_ds else [])
    summary: dict[str, Any] = {
        "setting": name,
        "closed_rate": closed,
        "open_rate": open_,
        "seed": seed,
        "counts": counts,
        "num_samples": len(plan),
        "num_classes": train_ds.num_classes,
        "train": str(train_ds.rec_path.resolve()),
        "open_source": str(open_ds.rec_path.resolve()) if open_ds else None,
        "robustface": robustface.__version__,
    }

    with atomic_directory(out) as partial:
        picks = np.stack([plan.source, plan.source_index], axis=1)
        order = write_rec_subset(
            partial,
            sources,
            picks,
            plan.label,
            num_classes=train_ds.num_classes,
            progress=progress,
        )
        written = plan.take(order)
        save_noise_list(written, partial / NOISE_LIST)
        link_verification_sets(train_dir, partial)
        write_text_atomic(partial / NOISE_JSON, json.dumps(summary, indent=2) + "\n")
    return NoiseInfo(out, name, written, train_ds.num_classes, time.perf_counter() - t0)


def save_noise_list(plan: NoisePlan, path: str | Path) -> None:
    """Write ``plan`` as a ``noise.npz`` (atomically), one row per dataset index."""
    plan.validate()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **plan.arrays())


def read_npz_arrays(path: str | Path, name: str, what: str) -> tuple[Path, dict[str, np.ndarray]]:
    """The file and the arrays of a per-sample list: ``path`` is an ``.npz`` or a directory
    holding ``name``; read without pickles. A missing file is a ``FileNotFoundError`` naming
    ``what``, an unreadable one a :class:`DataFormatError` (noise lists, cleaning truth lists)."""
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file}")
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a plain .npy array
            raise ValueError("not an .npz archive")
        with data:
            return file, {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        reason = "not an .npz archive" if "pickle" in str(exc) else exc
        raise DataFormatError(file, f"not a {what} (.npz): {reason}") from exc


def load_noise_list(path: str | Path) -> NoisePlan:
    """Read a noise list: ``noise.npz`` or a directory holding one."""
    file, arrays = read_npz_arrays(path, NOISE_LIST, "noise list")
    fields = {f.name: f for f in dataclasses.fields(NoisePlan)}
    missing = [k for k, f in fields.items() if k not in arrays and f.default is not None]
    if missing:
        raise DataFormatError(file, f"missing arrays {missing} (has {sorted(arrays)})")
    for key, value in arrays.items():
        want = np.floating if key == "quality" else np.integer
        if key in fields and not np.issubdtype(value.dtype, want):
            raise DataFormatError(file, f"array {key} has dtype {value.dtype}, expected {want}")
    plan = NoisePlan(**{k: v for k, v in arrays.items() if k in fields})
    try:
        plan.validate()
    except ValueError as exc:
        raise DataFormatError(file, f"inconsistent noise list: {exc}") from exc
    return plan


def noise_list_for(rec_path: str | Path) -> NoisePlan | None:
    """The noise list beside a ``.rec`` (or in a dataset directory), or None when there is none.

    Raises :class:`DataFormatError` if its length differs from the dataset's.
    """
    dataset = RecordIODataset(rec_path)
    file = dataset.rec_path.parent / NOISE_LIST
    if not file.is_file():
        return None
    plan = load_noise_list(file)
    if len(plan) != len(dataset):
        raise DataFormatError(
            file, f"has {len(plan)} rows but {dataset.rec_path} has {len(dataset)} images"
        )
    return plan


def noise_summary_table(plan: NoisePlan) -> str:
    """A Markdown table: per kind, the samples, their share and the training labels they carry;
    then, when the open-set pool was smaller than the open samples, a line saying how many
    distinct open-set images they reuse."""
    total = max(len(plan), 1)
    rows = []
    for code, name in enumerate(KIND_NAMES):
        labels = plan.label[plan.kind == code]
        rows.append([name, labels.size, 100.0 * labels.size / total, np.unique(labels).size])
    rows.append(["total", len(plan), 100.0 * len(plan) / total, np.unique(plan.label).size])
    table = markdown_table(["kind", "samples", "%", "labels"], rows)
    drawn = plan.source_index[plan.kind == OPEN]
    distinct = np.unique(drawn).size
    if distinct < drawn.size:
        table += (
            f"\nopen: {drawn.size} samples from {distinct} distinct open-set images (a pool "
            "smaller than the open samples: images reused, drawn with replacement)"
        )
    return table
