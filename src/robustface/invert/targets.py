"""What an inversion aims at, and the models it inverts.

* **class** (close-set): classes of a run's trained classifier. The classifier weights and the
  backbone they were trained with both come from the run's last checkpoint (read weights-only;
  a Partial FC classifier is joined from its rank shards), so they match.
* **embedding** (open-set): rows of an ``N x d`` (or ``d``) ``.npy`` file, ``d`` the model's
  embedding size.
* **image** (open-set): an image file or a folder of images (``.png``, ``.jpg``, ``.jpeg``,
  ``.bmp``, sorted by name), resized to the model's input size and embedded by the inverted model.
* **pairs** (open-set): the first image of pairs of a verification ``.bin``, chosen balanced over
  its 10 folds and same / different pairs (:func:`select_pairs`).

An ONNX model cannot be inverted (onnxruntime gives no gradient with respect to the input); it
may still score the inversions as the independent model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustface.data.image import decode_image
from robustface.data.transforms import resize_to, to_tensor_normalized
from robustface.data.verification import load_bin_images
from robustface.errors import DataFormatError
from robustface.fc import Classifier, build_classifier
from robustface.heads import build_head
from robustface.invert.config import LossConfig, TargetConfig
from robustface.invert.inversion import ClassTargetLoss, EmbeddingTargetLoss
from robustface.models.loading import load_backbone
from robustface.train.checkpoint import classifier_weight, load_main
from robustface.train.components import classifier_kwargs
from robustface.utils.run import RunDir

__all__ = [
    "IMAGE_SUFFIXES",
    "RunClassifier",
    "Targets",
    "build_targets",
    "count_notice",
    "embedding_size",
    "load_invertible",
    "load_run_classifier",
    "select_pairs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_invertible(
    source: str | Path, device: str | torch.device = "cpu", **model_kwargs: Any
) -> tuple[nn.Module, int]:
    """``(model in eval mode, input size)`` of a run directory or ``.pth`` (``model_kwargs``:
    ``load_backbone``'s architecture arguments); an ONNX model is refused with a ``ValueError``
    naming the file."""
    if Path(source).suffix.lower() == ".onnx":
        raise ValueError(
            f"{source}: an ONNX model cannot be inverted (onnxruntime gives no gradient with "
            "respect to the input); give its .pth or run directory (it may score the "
            "inversions: eval.model)"
        )
    return load_backbone(source, device=device, **model_kwargs)


@dataclass
class RunClassifier:
    """A run's last checkpoint: its backbone and its trained classifier (both eval mode)."""

    backbone: nn.Module
    classifier: Classifier
    input_size: int
    num_classes: int


def load_run_classifier(
    source: str | Path, device: str | torch.device = "cpu", **model_kwargs: Any
) -> RunClassifier:
    """The backbone and the classifier of the last checkpoint of run directory ``source``
    (``model_kwargs``: ``load_backbone``'s architecture arguments, which must agree with the
    run's config)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such run directory")
    if path.suffix.lower() == ".onnx" or not path.is_dir():
        raise ValueError(
            f"{source}: class targets need a run directory (its last checkpoint holds the trained "
            "classifier), not a weights file"
        )
    run = RunDir(path)
    cfg = run.config()
    checkpoint = run.last_checkpoint().path
    main = load_main(checkpoint)
    weight = classifier_weight(checkpoint, main).float()
    num_classes = int(main["num_classes"])
    classifier = build_classifier(
        cfg.fc.name, int(weight.shape[1]), num_classes, **classifier_kwargs(cfg)[0]
    )
    classifier.load_state_dict({"weight": weight})
    backbone, input_size = load_backbone(path, device=device, **model_kwargs)
    backbone.load_state_dict(main["backbone"])  # the weights the classifier was trained with
    return RunClassifier(backbone.eval(), classifier.to(device).eval(), input_size, num_classes)


def embedding_size(model: nn.Module, input_size: int, device: str | torch.device = "cpu") -> int:
    """The size of ``model``'s embeddings (one forward pass of two blank images)."""
    with torch.no_grad():
        return int(model(torch.zeros(2, 3, input_size, input_size, device=device)).shape[1])


def select_pairs(issame: np.ndarray, count: int, folds: int = 10) -> np.ndarray:
    """Indices (in file order) of ``count`` pairs (0: all), balanced over the ``folds`` contiguous
    folds of the evaluation and over same / different pairs: ``max(1, count // (2 * folds))`` of
    each kind from the start of each fold."""
    if count <= 0 or count >= issame.size:
        return np.arange(issame.size)
    per_kind = max(1, count // (2 * folds))
    chosen = []
    for fold in np.array_split(np.arange(issame.size), folds):
        for flag in (True, False):
            chosen.append(fold[issame[fold] == flag][:per_kind])
    return np.sort(np.concatenate(chosen))


@dataclass
class Targets:
    """The targets of a run: ``keys`` for the target loss (class ids, or rows of
    ``embeddings``), a name per target, the inverted model's target ``embeddings`` (open-set),
    the target ``images`` at the model's input size (``image`` / ``pairs``: ``N x s x s x 3``
    uint8) and for ``pairs`` the chosen pair indices, their ``issame`` flags and the other side."""

    kind: str
    keys: Tensor
    names: list[str]
    embeddings: Tensor | None = None
    images: np.ndarray | None = None
    pair_index: np.ndarray | None = None
    issame: np.ndarray | None = None
    other_images: np.ndarray | None = None


def _read_images(path: Path, input_size: int) -> tuple[np.ndarray, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such image or folder (target.path)")
    images = [resize_to(decode_image(f.read_bytes(), f), input_size) for f in files]
    return np.stack(images), [f.name for f in files]


def _embed(model: nn.Module, images: np.ndarray, device: str | torch.device) -> Tensor:
    with torch.no_grad():
        return model(to_tensor_normalized(images).to(device)).float()


def _read_embeddings(path: Path) -> np.ndarray:
    """The raw target embeddings at ``path``: a ``.npy`` (``N x d`` or ``d``, used as they are),
    or a ``robustface embed`` output directory, whose unit embeddings are scaled back by their
    norms (the ``l2`` loss compares raw embeddings)."""
    from robustface.deploy.embed import MANIFEST, read_embeddings

    if path.is_dir() and (path / MANIFEST).is_file():
        unit, norms, _ = read_embeddings(path)
        return np.asarray(unit, np.float32) * np.asarray(norms, np.float32)[:, None]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npy or embed output directory (target.path)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataFormatError(path, f"not a readable .npy array ({exc})") from None


def count_notice(cfg: TargetConfig, used: int) -> str | None:
    """A one-line notice when ``cfg.count`` asked for another number of targets than the
    ``used`` ones (pairs are rounded to balanced folds; a source may hold fewer), else None."""
    if cfg.count <= 0 or used == cfg.count:
        return None
    why = (
        "pairs are balanced over the 10 folds and same / different: a multiple of 20, at "
        "least 20, at most the .bin's"
        if cfg.kind == "pairs"
        else f"only {used} {cfg.kind} targets are available"
    )
    return f"target.count={cfg.count}: {used} targets used ({why})"


def _limit(n: int, count: int) -> int:
    return n if count <= 0 else min(n, count)


def build_targets(
    cfg: TargetConfig,
    loss: LossConfig,
    model: nn.Module,
    input_size: int,
    *,
    classifier: Classifier | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Targets, nn.Module]:
    """The targets of ``cfg`` and the per-sample target loss towards them.

    ``classifier``: the trained classifier (``class`` targets). Bad input raises ``ValueError`` /
    :class:`~robustface.errors.DataFormatError` naming the parameter or the file.
    """
    if cfg.kind == "class":
        if classifier is None:
            raise ValueError("target.kind=class needs the run's classifier")
        num_classes = classifier.num_classes
        classes = list(cfg.classes) or list(range(_limit(num_classes, cfg.count)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f"target.classes: class {bad[0]} is out of range for a classifier of "
                f"{num_classes} classes (0..{num_classes - 1})"
            )
        head = build_head(loss.head, **loss.head_params)
        keys = torch.tensor(classes, dtype=torch.long)
        return Targets("class", keys, [f"class {c}" for c in classes]), ClassTargetLoss(
            classifier, head
        )
    path = Path(cfg.path or "")
    size = embedding_size(model, input_size, device)
    images = pair_index = issame = other = None
    if cfg.kind == "embedding":
        array = _read_embeddings(path)
        shape = array.shape
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != size or not np.issubdtype(array.dtype, np.number):
            raise DataFormatError(
                path,
                f"expected N x {size} embeddings (the model embeds to {size}), got "
                f"{array.dtype} {shape}",
            )
        if not np.isfinite(array).all():
            raise DataFormatError(path, "embeddings hold NaN or infinite values")
        array = array[: _limit(len(array), cfg.count)]
        embeddings = torch.from_numpy(array.astype(np.float32)).to(device)
        names = [f"embedding {i}" for i in range(len(array))]
    elif cfg.kind == "image":
        images, names = _read_images(path, input_size)
        images = images[: _limit(len(images), cfg.count)]
        names = names[: len(images)]
        embeddings = _embed(model, images, device)
    else:  # pairs
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such .bin (target.path)")
        pair_images, flags = load_bin_images(path, image_size=(input_size, input_size))
        pair_index = select_pairs(flags, cfg.count)
        issame = flags[pair_index]
        images = pair_images[2 * pair_index]
        other = pair_images[2 * pair_index + 1]
        names = [f"pair {i}" for i in pair_index]
        embeddings = _embed(model, images, device)
    keys = torch.arange(len(names))
    targets = Targets(cfg.kind, keys, names, embeddings, images, pair_index, issame, other)
    return targets, EmbeddingTargetLoss(embeddings, loss.open_set)
