"""Scoring inversions as the ArcFace paper does: by a model other than the one inverted.

The inverted model was optimised to see its targets in the inversions, so its own scores say
little; the paper scores them with another, stronger model. Here every inversion is scored by
the inverted model (``inverted``, white-box) and by an independent one (``independent``: another
seed or another head):

* **cosine**: between the inversion's embedding and its target's as the scoring model sees them:
  the class centre of the same class in the scoring model's own classifier (``class`` targets,
  which therefore need a run directory trained on the same classes), or the target image's
  embedding (``image``, ``pairs``). For ``embedding`` targets only the inverted model can score
  (no image to embed), the independent score is ``None``.
* **top-1** (``class``): the share of inversions whose nearest class centre is their target's,
  against chance ``1 / num_classes``.
* **BN distance** (the inverted model only): the BN-statistics term, every layer weighted 1, of
  the first ``batch_size`` inversions as one batch (``bn_distance``) and, for image and pair
  targets, of the target images (``bn_distance_targets``): how far from natural to the model the
  inversions' statistics are, against real faces. A stand-in for the paper's FID.
* **verification** (``pairs``): the 10-fold accuracy of insightface's protocol on the chosen
  pairs with real images (``real``) and with the first image of each pair replaced by its
  inversion (``inverted``).

Embeddings are those of verification: image plus its horizontal flip, summed, on the uint8
images as saved (:func:`robustface.evaluate.verification.embed_pairs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustface.data.transforms import to_tensor_normalized
from robustface.evaluate.verification import embed_pairs, evaluate
from robustface.fc import Classifier
from robustface.invert.priors import batchnorm_layers, bn_distance
from robustface.invert.targets import Targets, load_run_classifier
from robustface.models.loading import load_backbone

__all__ = ["check_independent", "score_inversions", "score_model"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _batch(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    return to_tensor_normalized(np.ascontiguousarray(images)).to(device)


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def check_independent(independent: str | Path | None, inverted: str | Path) -> None:
    """``ValueError`` when the ``independent`` scoring model is the ``inverted`` model itself."""
    if independent is not None and Path(independent).resolve() == Path(inverted).resolve():
        raise ValueError(
            f"eval.model {independent} is the inverted model: score with an independent one "
            "(another seed or another head)"
        )


def _check_distinct(
    probe: np.ndarray,
    inverted: tuple[nn.Module, int],
    independent: tuple[nn.Module, int],
    source: str | Path,
    device: str | torch.device,
) -> None:
    """``ValueError`` when the ``independent`` model embeds ``probe`` as the ``inverted`` one does:
    the same weights under another path or format (a copy, an ONNX export)."""
    a, b = (
        embed_pairs(probe, m, device=device, input_size=s)[0] for m, s in (inverted, independent)
    )
    if a.shape == b.shape and np.allclose(_unit(a), _unit(b), atol=1e-4):
        raise ValueError(
            f"eval.model {source} gives the inverted model's embeddings (a copy or an export of "
            "it?): score with an independent one (another seed or another head)"
        )


def score_model(
    images: np.ndarray,
    targets: Targets,
    model: nn.Module,
    input_size: int,
    *,
    classifier: Classifier | None = None,
    own_targets: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> dict[str, Any]:
    """One model's scores of the inversions ``images`` (``N x H x W x 3`` uint8, target order):
    ``cosine`` (per target and mean/std), ``top1`` for ``class`` targets (with ``classifier``,
    required then), ``verification`` for ``pairs``; ``cosine`` is ``None`` where it cannot score.
    ``own_targets``: ``targets.embeddings`` are this model's (the inverted one's), so it can score
    ``embedding`` targets."""

    def embed(batch: np.ndarray) -> np.ndarray:
        fused, _ = embed_pairs(
            batch, model, batch_size=batch_size, device=device, input_size=input_size
        )
        return fused

    inv = embed(images)
    out: dict[str, Any] = {}
    if targets.kind == "class":
        if classifier is None:
            raise ValueError("class targets are scored with the model's classifier; none given")
        labels = targets.keys.to(device)
        with torch.no_grad():
            cosine = classifier(torch.from_numpy(inv).to(device), labels).cosine.cpu().numpy()
        rows = np.arange(len(inv))
        per_target = cosine[rows, targets.keys.numpy()]
        out["top1"] = float(np.mean(cosine.argmax(axis=1) == targets.keys.numpy()))
        out["chance_top1"] = 1.0 / cosine.shape[1]
    elif targets.images is not None:
        ref = embed(targets.images)
        per_target = np.sum(_unit(inv) * _unit(ref), axis=1)
    elif own_targets and targets.embeddings is not None:
        ref = targets.embeddings.cpu().numpy()
        per_target = np.sum(_unit(inv) * _unit(ref), axis=1)
    else:
        return {"cosine": None, "note": "embedding targets: no image for this model to embed"}
    out["cosine"] = {**_summary(per_target), "per_target": per_target.tolist()}
    if own_targets and batchnorm_layers(model):  # on one batch: the statistics are per batch
        out["bn_distance"] = bn_distance(model, _batch(images[:batch_size], device))
        if targets.images is not None:
            first = targets.images[:batch_size]
            out["bn_distance_targets"] = bn_distance(model, _batch(first, device))
    if targets.other_images is not None and targets.issame is not None:  # pairs
        other = embed(targets.other_images)
        accuracy = {}
        for name, first in (("real", ref), ("inverted", inv)):
            rows = np.empty((2 * len(first), first.shape[1]), dtype=np.float32)
            rows[0::2], rows[1::2] = first, other
            result = evaluate(rows, targets.issame, nrof_folds=min(10, len(first)))
            accuracy[name] = {k: result[k] for k in ("accuracy_mean", "accuracy_std")}
        out["verification"] = {**accuracy, "pairs": len(inv)}
    return out


def score_inversions(
    images: np.ndarray,
    targets: Targets,
    inverted: tuple[nn.Module, int, Classifier | None],
    independent: str | Path | None,
    *,
    inverted_source: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    independent_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores by the inverted model (``(model, input size, classifier)``) and by the model at
    ``independent`` (a run directory, ``.pth`` or ``.onnx``; a run directory with the same classes
    for ``class`` targets; ``independent_kwargs``: its ``load_backbone`` arguments, e.g.
    ``input_size``). ``ValueError`` when ``independent`` is the inverted model itself (the same
    path, or the same embeddings of the first inversions: a copy or an export)."""
    kwargs = {k: v for k, v in (independent_kwargs or {}).items() if v is not None}
    model, size, classifier = inverted
    own = score_model(
        images, targets, model, size, classifier=classifier, own_targets=True, device=device,
        batch_size=batch_size,
    )  # fmt: skip
    result: dict[str, Any] = {
        "inverted": {"model": str(inverted_source), **own},
        "independent": None,
    }
    if independent is None:
        return result
    check_independent(independent, inverted_source)
    indep_classifier = None
    if targets.kind == "class":
        run = load_run_classifier(independent, device, **kwargs)
        if run.num_classes != (classifier.num_classes if classifier is not None else -1):
            raise ValueError(
                f"eval.model {independent}: its classifier has {run.num_classes} classes, the "
                "inverted model's "
                f"{classifier.num_classes if classifier is not None else '?'}; class targets "
                "need a model trained on the same classes"
            )
        indep_model, indep_size, indep_classifier = run.backbone, run.input_size, run.classifier
    else:
        indep_model, indep_size = load_backbone(independent, device=device, **kwargs)
    _check_distinct(images[:8], (model, size), (indep_model, indep_size), independent, device)
    result["independent"] = {
        "model": str(independent),
        **score_model(
            images, targets, indep_model, indep_size, classifier=indep_classifier, device=device,
            batch_size=batch_size,
        ),
    }  # fmt: skip
    return result
