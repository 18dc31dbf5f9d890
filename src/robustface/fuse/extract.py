"""Features for training CAFace: K augmented views of every training image, streamed to disk.

CAFace trains on precomputed features (``mk-minchul/caface``, ``preprocess/precompute_features.py``
and ``image_augmenter.py``): for every image, K = 16 views (one strong augmentation, then K-1 weak
augmentations *of that strong view*, each view randomly flipped) are embedded by the frozen
backbone, and the raw feature ``f*|f|`` and the style ``(C, 2)`` of each view are stored in fp16.

:func:`extract_fusion_features` writes a directory::

    meta.json       what was extracted (model fingerprint, source file sizes and times, K, blocks,
                    seed, input size), the sizes (images, classes, d, C) and the rows done
    features.npy    (N, K, d) float16: raw features of the views (unit feature times norm)
    styles.npy      (N, K, C, 2) float16: [mean, std] per channel of the style blocks
    clean.npy       (N, d) float16: raw feature of the unaugmented image (for the class centres)
    labels.npy      (N,) int64: class labels

The work happens in ``OUT.partial``, renamed to ``OUT`` when every row is written. The ``.npy``
files are memory-mapped (``numpy.lib.format.open_memmap``) and filled batch by batch; after each
batch they are flushed and ``meta.json`` records the rows done, so a rerun continues where an
interrupted one stopped and writes the same bytes as a run that never stopped (the views of image
``i`` come from ``numpy.random.default_rng([seed, i])``; keep the batch size). A directory of other
features (another model, data set, K, blocks, seed or input size) is refused with a message naming
what differs, never reused. :meth:`FusionFeatures.open` memory-maps a finished directory.

Augmentations (the ops of :mod:`robustface.data.transforms`, at the image's own resolution; then
resized to the model's input size and flipped with probability 1/2):

- **strong**: colour jitter, then either a Gaussian blur or a down-up resize (even odds);
- **weak** (applied to the strong view): one of colour jitter, Gaussian blur, down-up resize.

Deliberate deviations from the official code: no geometric augmentations (upstream's strong view
also crops, zooms/translates or rotates, and a weak view may be one of these), and blur is
Gaussian or down-up only (upstream also draws average and motion blur); the unaugmented image's
feature is stored so that the class centres come from the same files (upstream computes them in a
separate pass, ``preprocess/make_center.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from robustface.data.recordio import RecordIODataset
from robustface.data.transforms import EvalTransform, TrainTransform
from robustface.errors import DataFormatError
from robustface.fuse.styles import _check_blocks, _unwrap, embed_with_styles
from robustface.models.loading import load_backbone
from robustface.utils.guards import check_int
from robustface.utils.io import write_text_atomic

__all__ = ["FusionFeatures", "augment_views", "extract_fusion_features"]

FORMAT = "robustface-fusion-features"
VERSION = 1
AUGMENTATION = "caface-strong-weak-v1"  # the recipe of augment_views; bump when it changes
META_FILE = "meta.json"
FEATURES_FILE = "features.npy"
STYLES_FILE = "styles.npy"
CLEAN_FILE = "clean.npy"
LABELS_FILE = "labels.npy"

_JITTER = TrainTransform(flip_p=0.0, color_jitter=1.0)
_BLUR = TrainTransform(flip_p=0.0, blur=1.0)
_DOWN_UP = TrainTransform(flip_p=0.0, resize_down_up=1.0)
_WEAK = (_JITTER, _BLUR, _DOWN_UP)


def augment_views(
    image: np.ndarray, views: int, rng: np.random.Generator, input_size: int | None = None
) -> torch.Tensor:
    """``(views, 3, s, s)`` normalised views of one ``HxWx3`` uint8 RGB image: a strong
    augmentation, then ``views - 1`` weak augmentations of it (see the module docstring), each
    resized to ``input_size`` and flipped with probability 1/2, all drawn from ``rng``."""
    views = check_int("views", views, minimum=1)
    strong = _JITTER.degrade(image, rng)
    strong = (_BLUR if rng.random() < 0.5 else _DOWN_UP).degrade(strong, rng)
    finish = TrainTransform(flip_p=0.5, input_size=input_size)
    out = [finish(strong, rng)]
    for _ in range(views - 1):
        weak = _WEAK[int(rng.integers(len(_WEAK)))].degrade(strong, rng)
        out.append(finish(weak, rng))
    return torch.stack(out)


def _source_fingerprint(dataset: RecordIODataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, path in (("rec", dataset.rec_path), ("idx", dataset.idx_path)):
        stat = Path(path).stat()
        out[name] = {"path": str(Path(path).resolve()), "size": stat.st_size}
        out[name]["mtime_ns"] = stat.st_mtime_ns
    return out


def _read_meta(directory: Path) -> dict[str, Any]:
    file = directory / META_FILE
    if not file.is_file():
        raise DataFormatError(directory, f"not a fusion-feature directory: no {META_FILE}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(file, f"not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataFormatError(file, f"not a fusion-feature meta file (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DataFormatError(file, f"version {meta.get('version')!r}, this code reads {VERSION}")
    required = ("key", "num_images", "dim", "style_channels", "rows_done")
    missing = [k for k in required if k not in meta]
    if missing:
        raise DataFormatError(file, f"missing keys {missing}")
    return meta


def _refuse_stale(directory: Path, stored: Mapping[str, Any], key: Mapping[str, Any]) -> None:
    differ = sorted(k for k in key.keys() | stored.keys() if key.get(k) != stored.get(k))
    if differ:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {key.get(k)!r}" for k in differ)
        raise ValueError(
            f"{directory} holds features made with other settings ({detail}); "
            "delete it or choose another --out"
        )


def _write_meta(directory: Path, meta: Mapping[str, Any]) -> None:
    write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2) + "\n")


def extract_fusion_features(
    model: str | Path,
    source: str | Path,
    out_dir: str | Path,
    *,
    views: int = 16,
    batch_size: int = 32,
    blocks: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    model_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Extract ``views`` augmented views of every image of ``source`` with ``model``; return the
    finished directory ``out_dir`` (the layout: module docstring).

    ``model`` is a run directory or a checkpoint file read by
    :func:`~robustface.models.loading.load_backbone` (with ``model_options``: ``backbone``,
    ``input_size``, ``color_order``, ...); an ONNX model has no intermediate maps and is refused.
    ``source`` is a ``.rec`` training set (a ``.rec`` file, a directory with ``train.rec``, a
    SynthFace directory). ``batch_size`` images (``batch_size * (views + 1)`` forward passes) go
    through the model at a time. ``blocks`` names the style blocks (``None``: the backbone's
    default, :mod:`robustface.fuse.styles`). A finished ``out_dir`` of the same extraction is
    returned as it is; an unfinished one (``out_dir.partial``) is continued.
    """
    from robustface.evaluate.report import model_fingerprint  # evaluate may import fuse

    views = check_int("views", views, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    options = {k: v for k, v in dict(model_options or {}).items() if v is not None}
    if Path(model).suffix.lower() == ".onnx":
        raise ValueError(
            f"model: {model} is an ONNX model, which exposes only its output; fusion features "
            "need the style maps: pass the run directory or .pth it was exported from"
        )
    net, input_size = load_backbone(model, device=device, **options)
    backbone, _ = _unwrap(net)
    names = _check_blocks(backbone, blocks)
    dataset = RecordIODataset(source)
    key = {
        "model": model_fingerprint(model)["sha256"],
        "model_options": {
            k: str(v) for k, v in sorted(options.items()) if k != "unsafe_legacy_load"
        },
        "source": _source_fingerprint(dataset),
        "views": views,
        "blocks": names,
        "seed": seed,
        "input_size": input_size,
        "augmentation": AUGMENTATION,
    }
    if out.exists() and (out / META_FILE).is_file():
        meta = _read_meta(out)
        _refuse_stale(out, meta["key"], key)
        if not meta.get("complete"):
            raise DataFormatError(out / META_FILE, "an unfinished extraction; delete the directory")
        return out
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a fusion-feature directory; not using it")
    n = len(dataset)
    labels = dataset.labels
    if partial.is_dir() and (partial / META_FILE).is_file():
        meta = _read_meta(partial)
        _refuse_stale(partial, meta["key"], key)
        mode = "r+"
    else:
        partial.mkdir(parents=True, exist_ok=True)
        probe = torch.zeros(1, 3, input_size, input_size, device=next(net.parameters()).device)
        feats, styles = embed_with_styles(net, probe, names)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "key": key,
            "model_path": str(Path(model).resolve()),
            "num_images": n,
            "num_classes": int(dataset.num_classes),
            "dim": int(feats.shape[1]),
            "style_channels": int(styles.shape[1]),
            "batch_size": batch_size,
            "rows_done": 0,
            "complete": False,
        }
        np.save(partial / LABELS_FILE, labels.astype(np.int64))
        mode = "w+"
    d, c, done = meta["dim"], meta["style_channels"], int(meta["rows_done"])
    arrays = {
        FEATURES_FILE: (n, views, d),
        STYLES_FILE: (n, views, c, 2),
        CLEAN_FILE: (n, d),
    }
    maps = {
        name: open_memmap(partial / name, mode=mode, dtype=np.float16, shape=shape)
        for name, shape in arrays.items()
    }
    if mode == "w+":  # the arrays exist before any row is recorded as done
        for array in maps.values():
            array.flush()
        _write_meta(partial, meta)
    clean_transform = EvalTransform(input_size)
    bar = tqdm(total=n, initial=done, desc="fusion features", unit="img", disable=not progress)
    with bar:
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            batch = []
            for i in range(start, stop):
                image, _ = dataset[i]
                rng = np.random.default_rng([seed, i])
                batch.append(clean_transform(image)[None])
                batch.append(augment_views(image, views, rng, input_size))
            images = torch.cat(batch)
            raw, style = embed_with_styles(net, images, names, batch_size=len(images))
            raw = raw.reshape(stop - start, views + 1, d).numpy()
            style = style.reshape(stop - start, views + 1, c, 2).numpy()
            values = {
                CLEAN_FILE: raw[:, 0].astype(np.float16),
                FEATURES_FILE: raw[:, 1:].astype(np.float16),
                STYLES_FILE: style[:, 1:].astype(np.float16),
            }
            for name, value in values.items():
                finite = np.isfinite(value).reshape(len(value), -1).all(1)
                if not finite.all():
                    row = start + int(np.flatnonzero(~finite)[0])
                    raise ValueError(
                        f"model: image {row} of {dataset.rec_path} gives values that are not "
                        f"finite in float16 ({name}: beyond +-65504 or NaN)"
                    )
                maps[name][start:stop] = value
            for array in maps.values():
                array.flush()
            meta["rows_done"] = stop
            _write_meta(partial, meta)
            bar.update(stop - start)
    del maps
    meta["complete"] = True
    _write_meta(partial, meta)
    if out.exists():
        out.rmdir()  # an empty directory (checked above); a rename does not replace one portably
    os.replace(partial, out)
    return out


@dataclass(frozen=True)
class FusionFeatures:
    """A finished fusion-feature directory, memory-mapped (read-only): ``features`` (N, K, d),
    ``styles`` (N, K, C, 2) and ``clean`` (N, d) float16, ``labels`` (N,) int64, ``meta``."""

    path: Path
    meta: dict[str, Any]
    features: np.ndarray
    styles: np.ndarray
    clean: np.ndarray
    labels: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> FusionFeatures:
        """Memory-map the directory ``path``; an unfinished, malformed or inconsistent one raises
        :class:`~robustface.errors.DataFormatError` naming the file."""
        path = Path(path)
        if not path.is_dir():
            partial = path.with_name(path.name + ".partial")
            if partial.is_dir():
                raise DataFormatError(
                    path, f"extraction not finished ({partial.name} exists): rerun it to continue"
                )
            raise FileNotFoundError(f"{path}: no such fusion-feature directory")
        meta = _read_meta(path)
        if not meta.get("complete"):
            raise DataFormatError(path / META_FILE, "extraction not finished (complete is false)")
        n, k = int(meta["num_images"]), int(meta["key"]["views"])
        d, c = int(meta["dim"]), int(meta["style_channels"])
        expected = {
            FEATURES_FILE: ((n, k, d), np.float16),
            STYLES_FILE: ((n, k, c, 2), np.float16),
            CLEAN_FILE: ((n, d), np.float16),
            LABELS_FILE: ((n,), np.int64),
        }
        arrays = {}
        for name, (shape, dtype) in expected.items():
            file = path / name
            if not file.is_file():
                raise DataFormatError(path, f"missing {name}")
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise DataFormatError(file, f"not a .npy array: {exc}") from None
            if array.shape != shape or array.dtype != dtype:
                raise DataFormatError(
                    file,
                    f"expected {np.dtype(dtype).name} {shape} (from {META_FILE}), "
                    f"got {array.dtype} {array.shape}",
                )
            arrays[name] = array
        return cls(
            path,
            meta,
            arrays[FEATURES_FILE],
            arrays[STYLES_FILE],
            arrays[CLEAN_FILE],
            arrays[LABELS_FILE],
        )

    @property
    def num_images(self) -> int:
        """N, the number of source images."""
        return int(self.features.shape[0])

    @property
    def views(self) -> int:
        """K, the augmented views per image."""
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        """d, the feature dimension."""
        return int(self.features.shape[2])

    @property
    def style_channels(self) -> int:
        """C, the style channels."""
        return int(self.styles.shape[2])

    @property
    def num_classes(self) -> int:
        """The class count of the source (labels are below it)."""
        return int(self.meta.get("num_classes", int(self.labels.max()) + 1))
