"""A dirty SynthFace training set with the whole truth: what the cleaning framework is scored on.

:func:`make_dirty_synthface` renders a SynthFace benchmark whose training set mixes, in stated
proportions (:class:`DirtySpec`), low-quality faces, sketches, non-faces and duplicate identities
(one person under two labels; ``synth.*_fraction`` of :mod:`robustface.data.synth.builder`), then
adds closed-set and open-set label noise with ``robustface noise``'s BoundaryFace protocol
(:func:`robustface.data.noise.inject_noise`) restricted to the plain faces, so that every sample
has exactly one kind. Beside the noisy ``train.rec`` it writes the truth (:class:`Truth`,
``truth.npz`` and ``truth.csv``), one row per record:

``kind``: one of :data:`TRUTH_KINDS`; ``label``: the training label; ``true_label``: the class of
the person shown (the original class of a duplicate; -1 for open-set images and non-faces);
``identity``: the SynthFace identity id (-1 for non-faces); ``quality``: the renderer's quality
score; ``hard``: a clean face with quality below :data:`HARD_QUALITY` (a sample a cleaner should
keep). Per class, ``duplicate_of``: the original class of a duplicate class, else -1.

Proportions: sketches, non-faces and low-quality faces are ``round(N * fraction)`` each over the
whole set; duplicate classes ``round(C * duplicate)``; label noise ``floor(n_c * rate)`` per class
(the BoundaryFace protocol) among the class's plain faces.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from robustface.config import SynthConfig
from robustface.data.noise import (
    CLOSED,
    NOISE_LIST,
    OPEN,
    NoisePlan,
    inject_noise,
    load_noise_list,
    noise_list_for,
    read_npz_arrays,
)
from robustface.data.recordio import RecordIODataset
from robustface.data.synth.builder import ensure_synthface
from robustface.errors import DataFormatError
from robustface.utils.guards import check_real
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.table import markdown_table

__all__ = [
    "DIRTY_PRESETS",
    "HARD_QUALITY",
    "TRUTH_KINDS",
    "DirtyInfo",
    "DirtySpec",
    "Truth",
    "load_truth",
    "make_dirty_synthface",
    "truth_for",
    "truth_from_noise",
]

TRUTH_KINDS = ("clean", "closed", "open", "low_quality", "sketch", "nonface", "duplicate")
"""Ground-truth sample kinds, in code order (``Truth.kind`` holds the index)."""
HARD_QUALITY = 0.02
"""A clean face whose rendered quality score is below this is "hard" (kept by a good cleaner)."""
TRUTH_FILE = "truth.npz"
DIRTY_JSON = "dirty.json"


@dataclasses.dataclass(frozen=True)
class DirtySpec:
    """Proportions of each kind of noise: label noise per class (``closed``, ``open``), image
    kinds over all samples (``low_quality``, ``sketch``, ``nonface``), and the fraction of classes
    that repeat another class's person (``duplicate``, at most 0.5)."""

    closed: float = 0.10
    open: float = 0.05
    low_quality: float = 0.05
    sketch: float = 0.03
    nonface: float = 0.03
    duplicate: float = 0.03

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_real(field.name, getattr(self, field.name), 0, 1)
        if self.closed + self.open > 1:
            raise ValueError(f"closed + open must be <= 1, got {self.closed} + {self.open}")
        if self.low_quality + self.sketch + self.nonface > 1:
            raise ValueError("low_quality + sketch + nonface must be <= 1")
        if self.duplicate > 0.5:
            raise ValueError(f"duplicate must be in [0, 0.5], got {self.duplicate}")


DIRTY_PRESETS: dict[str, DirtySpec] = {
    # MS-Celeb-1M-like: about 28% of the samples noisy (label noise dominating), after the
    # "devil is in the noise" estimates of MS-Celeb-1M's raw crawl; see docs/cleaning.md
    "ms1m-like": DirtySpec(),
    # the RobustFace seed's table: 15% closed-set + 5% open-set, nothing else
    "MS1MCON-0.20": DirtySpec(0.15, 0.05, 0.0, 0.0, 0.0, 0.0),
}


@dataclasses.dataclass
class Truth:
    """The per-record ground truth of a dirty set (see the module docstring)."""

    kind: np.ndarray
    label: np.ndarray
    true_label: np.ndarray
    identity: np.ndarray
    quality: np.ndarray
    hard: np.ndarray
    duplicate_of: np.ndarray

    def __len__(self) -> int:
        return int(self.kind.size)

    def counts(self) -> dict[str, int]:
        """Samples of each kind, by name (and ``hard``: the hard clean ones)."""
        counts = np.bincount(self.kind, minlength=len(TRUTH_KINDS)).tolist()
        out = dict(zip(TRUTH_KINDS, counts, strict=True))
        out["hard"] = int(self.hard.sum())
        return out

    def kind_names(self) -> np.ndarray:
        """The kind of each sample as a string array."""
        return np.asarray(TRUTH_KINDS)[self.kind]

    def take(self, index: np.ndarray) -> Truth:
        """The rows ``index`` (per-class ``duplicate_of`` unchanged)."""
        per_sample = {
            f.name: getattr(self, f.name)[index]
            for f in dataclasses.fields(self)
            if f.name != "duplicate_of"
        }
        return Truth(**per_sample, duplicate_of=self.duplicate_of)

    def save(self, directory: Path) -> None:
        """Write ``truth.npz`` and ``truth.csv`` into ``directory`` (atomically each)."""
        with atomic_path(directory / TRUTH_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **dataclasses.asdict(self))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["index", "kind", "label", "true_label", "identity", "quality", "hard"])
        names = self.kind_names()
        for i in range(len(self)):
            writer.writerow(
                [i, names[i], self.label[i], self.true_label[i], self.identity[i],
                 f"{self.quality[i]:.4f}", int(self.hard[i])]
            )  # fmt: skip
        write_text_atomic(directory / "truth.csv", text.getvalue())


def load_truth(path: str | Path) -> Truth:
    """Read ``truth.npz`` (or the one in a directory). A noise list (a ``noise.npz`` from
    ``robustface noise``, or a directory that holds one and no ``truth.npz``) gives
    :func:`truth_from_noise`'s truth."""
    path = Path(path)
    if path.is_dir() and not (path / TRUTH_FILE).is_file() and (path / NOISE_LIST).is_file():
        path = path / NOISE_LIST
    file, arrays = read_npz_arrays(path, TRUTH_FILE, "truth list")
    if "source_index" in arrays and "true_label" not in arrays:  # a noise list's columns
        return truth_from_noise(load_noise_list(file))
    names = [f.name for f in dataclasses.fields(Truth)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataFormatError(file, f"missing arrays {missing} (has {sorted(arrays)})")
    truth = Truth(**{n: arrays[n] for n in names})
    sizes = {n: getattr(truth, n).shape for n in names if n != "duplicate_of"}
    if len({s for s in sizes.values()}) != 1:
        raise DataFormatError(file, f"per-sample arrays differ in shape: {sizes}")
    if truth.kind.size and (truth.kind.min() < 0 or truth.kind.max() >= len(TRUTH_KINDS)):
        raise DataFormatError(file, f"kind must be in [0, {len(TRUTH_KINDS)})")
    return truth


def truth_for(rec_dir: str | Path, num_samples: int) -> Truth | None:
    """The truth list beside a ``.rec`` directory, else the truth of the noise list beside it
    (:func:`truth_from_noise`), else None; a length mismatch is an error."""
    file = Path(rec_dir) / TRUTH_FILE
    if not file.is_file():
        plan = noise_list_for(rec_dir)  # checks its length against the set's
        return (
            None if plan is None else truth_from_noise(plan, RecordIODataset(rec_dir).num_classes)
        )
    truth = load_truth(file)
    if len(truth) != num_samples:
        raise DataFormatError(file, f"has {len(truth)} rows but the set has {num_samples} images")
    return truth


def truth_from_noise(plan: NoisePlan, num_classes: int | None = None) -> Truth:
    """The truth a noise list alone gives (a set noised by ``robustface noise``): kinds clean,
    closed and open, the true labels, ``hard`` from its quality column (none without one). Every
    training image counts as a plain face of unknown identity (-1) and no class as a duplicate.
    ``num_classes`` defaults to the highest label seen + 1."""
    if num_classes is None:
        num_classes = int(max(plan.label.max(initial=-1), plan.original_label.max(initial=-1))) + 1
    return build_truth(plan, None, None, {}, num_classes)


def _manifest_columns(directory: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    return {n: np.asarray(manifest["samples"][n]) for n in names}


def build_truth(
    plan: NoisePlan,
    train: dict[str, np.ndarray] | None,
    open_identity: np.ndarray | None,
    duplicates: dict[int, int],
    num_classes: int,
) -> Truth:
    """The truth of a noisy set from its noise ``plan`` (record order), the source training
    manifest's ``kind``/``identity`` columns (None: every image a plain face, identities unknown),
    the open-set manifest's identities and the source's ``{duplicate class: original class}``."""
    n = len(plan)
    code = {name: i for i, name in enumerate(TRUTH_KINDS)}
    from_train = plan.kind != OPEN
    src = plan.source_index
    image_kind = np.full(n, "face", dtype=object)
    if train is not None:
        image_kind[from_train] = train["kind"][src[from_train]]
    kind = np.full(n, code["clean"], dtype=np.int8)
    kind[plan.kind == CLOSED] = code["closed"]
    kind[plan.kind == OPEN] = code["open"]
    for name in ("low_quality", "sketch", "nonface"):
        kind[image_kind == name] = code[name]
    duplicate_of = np.full(num_classes, -1, dtype=np.int64)
    for dup, orig in duplicates.items():
        duplicate_of[dup] = orig
    plain = kind == code["clean"]
    kind[plain & (duplicate_of[plan.label] >= 0)] = code["duplicate"]
    person = plan.original_label.copy()  # the class the image truly shows (-1: open)
    true_label = np.where(person >= 0, person, -1)
    mapped = true_label >= 0
    true_label[mapped] = np.where(
        duplicate_of[true_label[mapped]] >= 0,
        duplicate_of[true_label[mapped]],
        true_label[mapped],
    )
    true_label[kind == code["nonface"]] = -1
    # a flip onto the other label of the same person is no mislabel
    canon = np.where(duplicate_of >= 0, duplicate_of, np.arange(num_classes))
    same_person = (kind == code["closed"]) & (canon[plan.label] == true_label)
    kind[same_person] = np.where(duplicate_of[plan.label[same_person]] >= 0, code["duplicate"], 0)
    identity = np.full(n, -1, dtype=np.int64)
    if train is not None:
        identity[from_train] = train["identity"][src[from_train]]
    if open_identity is not None:
        identity[~from_train] = open_identity[src[~from_train]]
    identity[kind == code["nonface"]] = -1
    quality = (plan.quality if plan.quality is not None else np.full(n, np.nan, np.float32)).astype(
        np.float32
    )
    hard = (kind == code["clean"]) & (quality < HARD_QUALITY)
    return Truth(kind, plan.label.copy(), true_label, identity, quality, hard, duplicate_of)


@dataclasses.dataclass
class DirtyInfo:
    """What :func:`make_dirty_synthface` wrote: the noisy set ``train`` (its ``train.rec`` and
    truth), the SynthFace source ``source``, and the truth itself."""

    train: Path
    source: Path
    truth: Truth

    def table(self) -> str:
        """Samples per truth kind, as a Markdown table."""
        counts = self.truth.counts()
        total = max(len(self.truth), 1)
        rows = [[k, counts[k], f"{100 * counts[k] / total:.2f}"] for k in TRUTH_KINDS]
        rows.append(["(hard clean)", counts["hard"], f"{100 * counts['hard'] / total:.2f}"])
        rows.append(["total", len(self.truth), "100.00"])
        return markdown_table(["kind", "samples", "%"], rows)


def make_dirty_synthface(
    out: str | Path,
    synth: SynthConfig,
    spec: DirtySpec | str = "ms1m-like",
    *,
    noise_seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DirtyInfo:
    """Render the dirty SynthFace set ``spec`` (a :class:`DirtySpec` or a preset name).

    ``out/synthface`` is the SynthFace benchmark (reused when built from the same config);
    ``out/train`` the noisy training set: ``train.rec/.idx``, ``property``, ``noise.npz``,
    ``truth.npz``, ``truth.csv``, ``dirty.json`` and links to the verification sets. Train on it
    with ``data.source: rec`` and ``data.path: out/train``.
    """
    if isinstance(spec, str):
        if spec not in DIRTY_PRESETS:
            names = ", ".join(DIRTY_PRESETS)
            raise ValueError(f"unknown dirty preset {spec!r}: use one of {names}")
        spec = DIRTY_PRESETS[spec]
    out = Path(out)
    cfg = dataclasses.replace(
        synth,
        sketch_fraction=spec.sketch,
        nonface_fraction=spec.nonface,
        lowq_fraction=spec.low_quality,
        duplicate_fraction=spec.duplicate,
    )
    if spec.open > 0 and not (cfg.open_set_identities and cfg.open_set_images_per_identity):
        raise ValueError("open-set noise needs synth.open_set_identities and images > 0")
    source = out / "synthface"
    summary, _ = ensure_synthface(source, cfg, workers=workers, progress=progress)
    train_cols = _manifest_columns(source, ("kind", "identity"))
    open_identity = (
        _manifest_columns(source / "open_set", ("identity",))["identity"]
        if (source / "open_set" / "manifest.json").is_file()
        else None
    )
    duplicates = {int(d): int(o) for d, o in summary["train"].get("duplicates", {}).items()}
    info = inject_noise(
        source / "train.rec",
        out / "train",
        (spec.closed, spec.open),
        open_source=source / "open_set" if spec.open > 0 else None,
        seed=noise_seed,
        eligible=train_cols["kind"] == "face",
        overwrite=overwrite,
        progress=progress,
    )
    truth = build_truth(info.plan, train_cols, open_identity, duplicates, info.num_classes)
    truth.save(info.path)
    meta: dict[str, Any] = {
        "spec": dataclasses.asdict(spec),
        "noise_seed": noise_seed,
        "counts": truth.counts(),
        "duplicates": {str(d): o for d, o in duplicates.items()},
        "hard_quality": HARD_QUALITY,
        "source": str(source.resolve()),
    }
    write_text_atomic(info.path / DIRTY_JSON, json.dumps(meta, indent=2) + "\n")
    return DirtyInfo(info.path, source, truth)
