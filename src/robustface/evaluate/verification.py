"""1:1 verification on pair sets (LFW, CFP-FP, AgeDB-30, ...) with insightface's protocol.

The numbers match ``recognition/arcface_torch/eval/verification.py`` of insightface:

* Each image and its horizontal flip are embedded; the two raw embeddings are summed and the sum is
  L2-normalised (a zero row stays zero, as with ``sklearn.preprocessing.normalize``). The score of a
  pair is the squared L2 distance; a pair is predicted "same" when ``distance < threshold``.
* Pairs are split into ``nrof_folds`` contiguous folds in file order (``KFold`` without shuffle:
  the first ``P % k`` folds get one extra pair). For each fold the threshold with the best accuracy
  on the other folds is taken from ``np.arange(0, 4, 0.01)`` (the lowest one on ties, as
  ``np.argmax``) and accuracy is measured on the held-out fold.
* VAL@FAR: on a finer grid, ``np.arange(0, 4, 0.001)``, the training-fold FAR is computed per
  threshold and the threshold giving ``FAR = far_target`` is found by linear interpolation of
  threshold against FAR, as ``scipy.interpolate.interp1d(far, thresholds, kind="slinear")`` did up
  to scipy 1.8 (newer scipy rejects the repeated FAR values and insightface's code then fails).
  Where FAR values repeat, the last grid point with ``FAR <= far_target`` is the left end of the
  segment. If the target FAR is not reached on the grid, the threshold is 0.0 (nothing accepted).
  VAL and FAR are then measured on the held-out fold.
* VAL@FAR is *measurable* when the threshold search can accept at least one impostor pair at the
  target: ``far_target >= 1 / n`` with ``n`` the impostor pairs of the training folds, the
  fewest over the folds (``val_impostor_pairs``; the rule of
  :func:`robustface.evaluate.roc.far_measurable`). Below that the interpolated threshold lies
  between "no impostor accepted" and "one accepted" and VAL is not a measurement at the target:
  ``val`` and ``val_std`` are None and ``val_insightface``/``val_std_insightface`` hold
  insightface's numbers (a deviation: insightface prints them). A 10-fold set of 1,000 pairs
  (500 impostor, 450 per training split) measures FAR >= 2.2e-3 only, so not 1e-3; LFW's 6,000
  pairs (2,700 per training split) measure it.
* XNorm is the mean L2 norm of the single raw embeddings (each image and each flip on its own,
  before summing), which is what insightface averages over its two embedding lists.

Where insightface would divide by zero (a fold without positive or negative pairs) the rate is 0,
the convention its ``calculate_accuracy`` already uses for TPR/FPR. One old-scipy artefact is not
copied: when the target FAR equals the FAR of the last two grid points, scipy's B-spline gives 0.0
on that zero-length segment; here the threshold is the last grid point instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from robustface.data.transforms import resize_to
from robustface.data.verification import load_bin_images
from robustface.evaluate.roc import (
    check_far_reading,
    far_measurable,
    unmeasurable_cell,
    unmeasurable_note,
)
from robustface.utils.guards import check_int, check_real
from robustface.utils.table import markdown_table

__all__ = ["embed_pairs", "evaluate", "format_results", "verify_bin"]

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
"""insightface's threshold grid for accuracy."""
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
"""insightface's threshold grid for VAL@FAR."""


def _grid(name: str, values: np.ndarray | None, default: np.ndarray, min_size: int) -> np.ndarray:
    if values is None:
        return default
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size < min_size:
        raise ValueError(f"{name} must be 1-D with at least {min_size} values, got {grid.shape}")
    if not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError(f"{name} must be finite and strictly increasing")
    return grid


def _check_inputs(
    embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int, far_target: float
) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings)
    same = np.asarray(issame)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.number):
        raise ValueError(f"embeddings must be a numeric 2-D array, got {emb.dtype} {emb.shape}")
    if same.ndim != 1 or not (same.dtype == bool or np.issubdtype(same.dtype, np.integer)):
        raise ValueError(f"issame must be a 1-D bool array, got {same.dtype} {same.shape}")
    if same.dtype != bool and not np.all((same == 0) | (same == 1)):
        raise ValueError("issame must hold only 0/1 or True/False")
    if emb.shape[0] != 2 * same.size:
        raise ValueError(
            f"embeddings has {emb.shape[0]} rows for {same.size} pairs; expected "
            f"2 * len(issame) = {2 * same.size} (pair i = rows 2i, 2i+1)"
        )
    bad = ~np.isfinite(emb)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise ValueError(
            f"embeddings contain {int(bad.sum())} NaN/inf values in "
            f"{int(bad.any(axis=1).sum())} rows (first at row {row}, pair {row // 2})"
        )
    nrof_folds = check_int("nrof_folds", nrof_folds)
    if not 2 <= nrof_folds <= same.size:
        raise ValueError(
            f"nrof_folds must be in [2, number of pairs = {same.size}], got {nrof_folds}"
        )
    check_real("far_target", far_target, 0, 1)
    return emb, same.astype(bool)


def _pair_distances(embeddings: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Squared L2 distance between the L2-normalised rows 2i and 2i+1 (float64).

    Row-wise float64 arithmetic as in insightface; chunks of rows only bound the memory used.
    """
    dist = np.empty(embeddings.shape[0] // 2)
    for start in range(0, embeddings.shape[0], 2 * chunk):
        emb = embeddings[start : start + 2 * chunk].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
        norms[norms == 0.0] = 1.0
        emb /= norms[:, None]
        dist[start // 2 : start // 2 + chunk] = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    return dist


def _rate(count: np.ndarray | int, total: int) -> np.ndarray:
    """``count / total`` as float64, or zeros when ``total`` is 0."""
    count = np.asarray(count, dtype=np.float64)
    return count / total if total else np.zeros_like(count)


def _slinear_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold whose interpolated FAR is ``far_target`` (``far`` non-decreasing, >= 2 points).

    Same segment choice and arithmetic as scipy<=1.8 ``interp1d(far, thresholds, "slinear")``.
    """
    if far_target < far[0]:
        raise ValueError(
            f"the training FAR at the first VAL threshold ({thresholds[0]}) is {far[0]}, above "
            f"far_target={far_target}; start val_thresholds lower (0 always works)"
        )
    i = min(int(np.searchsorted(far, far_target, side="right")) - 1, far.size - 2)
    x0, x1, y0, y1 = far[i], far[i + 1], thresholds[i], thresholds[i + 1]
    if x1 == x0:
        return float(y1)
    w = 1.0 / (x1 - x0)
    return float(y0 * (w * (x1 - far_target)) + y1 * (w * (far_target - x0)))


def evaluate(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nrof_folds: int = 10,
    far_target: float = 1e-3,
    thresholds: np.ndarray | None = None,
    val_thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Cross-validated verification accuracy and VAL@FAR of fused pair embeddings.

    ``embeddings`` is ``(2P, d)`` (image + flip already summed; normalised here) and pair ``i`` is
    rows ``2i, 2i+1``; ``issame`` has ``P`` flags. ``thresholds`` / ``val_thresholds`` replace the
    accuracy / VAL grids. Returns plain Python numbers and lists: ``accuracy_mean``,
    ``accuracy_std``, ``fold_accuracies``, ``threshold`` (mean best threshold), ``fold_thresholds``,
    ``val``, ``val_std`` (None where ``far_target`` is not measurable, see the module),
    ``val_insightface``, ``val_std_insightface`` (insightface's numbers), ``val_impostor_pairs``,
    ``min_measurable_far`` (None without impostor pairs), ``far``, ``fold_val``, ``fold_far``,
    ``fold_val_thresholds``, ``far_target``, ``num_pairs``, ``num_folds``, and ``thresholds``,
    ``tpr``, ``fpr`` (the held-out ROC on the accuracy grid, averaged over folds).
    """
    emb, same = _check_inputs(embeddings, issame, nrof_folds, far_target)
    grid = _grid("thresholds", thresholds, ACCURACY_THRESHOLDS, 1)
    val_grid = _grid("val_thresholds", val_thresholds, VAL_THRESHOLDS, 2)
    dist = _pair_distances(emb)
    folds = np.array_split(np.arange(same.size), nrof_folds)

    # Accepted pairs (distance < threshold: searchsorted "left" on sorted distances) per fold and
    # grid point: positives and negatives on the accuracy grid, negatives on the VAL grid.
    pos = [np.sort(dist[f][same[f]]) for f in folds]
    neg = [np.sort(dist[f][~same[f]]) for f in folds]
    tp = np.stack([np.searchsorted(d, grid, side="left") for d in pos])
    fp = np.stack([np.searchsorted(d, grid, side="left") for d in neg])
    fa = np.stack([np.searchsorted(d, val_grid, side="left") for d in neg])
    n_pos = np.array([same[f].sum() for f in folds])
    n_neg = np.array([f.size for f in folds]) - n_pos

    tp_all, fp_all, fa_all, n_neg_all = tp.sum(0), fp.sum(0), fa.sum(0), n_neg.sum()
    accuracies, best, tprs, fprs, vals, fars, val_thr = [], [], [], [], [], [], []
    for k, test in enumerate(folds):
        correct_train = (tp_all - tp[k]) + (n_neg_all - n_neg[k]) - (fp_all - fp[k])
        b = int(np.argmax(correct_train))
        best.append(float(grid[b]))
        accuracies.append(float(tp[k, b] + n_neg[k] - fp[k, b]) / test.size)
        tprs.append(_rate(tp[k], n_pos[k]))
        fprs.append(_rate(fp[k], n_neg[k]))

        far_train = _rate(fa_all - fa[k], n_neg_all - n_neg[k])
        t = 0.0
        if np.max(far_train) >= far_target:
            t = _slinear_threshold(far_train, val_grid, far_target)
        val_thr.append(t)
        accept = dist[test] < t
        vals.append(float(_rate(np.sum(accept & same[test]), n_pos[k])))
        fars.append(float(_rate(np.sum(accept & ~same[test]), n_neg[k])))

    impostors = int(n_neg_all - n_neg.max())  # the fewest a training split holds
    measurable = far_measurable(far_target, impostors)
    val, val_std = float(np.mean(vals)), float(np.std(vals))
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "threshold": float(np.mean(best)),
        "fold_thresholds": best,
        "val": val if measurable else None,
        "val_std": val_std if measurable else None,
        "val_insightface": val,
        "val_std_insightface": val_std,
        "val_impostor_pairs": impostors,
        "min_measurable_far": 1.0 / impostors if impostors else None,
        "far": float(np.mean(fars)),
        "fold_val": vals,
        "fold_far": fars,
        "fold_val_thresholds": val_thr,
        "far_target": float(far_target),
        "num_pairs": int(same.size),
        "num_folds": int(nrof_folds),
        "thresholds": grid.tolist(),
        "tpr": np.mean(tprs, axis=0).tolist(),
        "fpr": np.mean(fprs, axis=0).tolist(),
    }


def _embed_batch(
    embed_fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, expected_rows: int
) -> np.ndarray:
    out = embed_fn(batch)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != expected_rows:
        got = f"{tuple(out.shape)} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"embed_fn must return a (batch, d) tensor, got {got} for {expected_rows}")
    return out.detach().float().cpu().numpy()


def embed_views(
    batch: np.ndarray | torch.Tensor,
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    flip: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Raw embeddings ``(b, V, d)`` float32 of a ``b x H x W x 3`` uint8 RGB batch: the image and,
    with ``flip``, its mirror (V = 2). Pixels become ``(x / 255 - 0.5) / 0.5`` in NCHW float32
    on ``device``; ``embed_fn`` runs under ``torch.inference_mode()``."""
    with torch.inference_mode():
        views = pixel_views(batch, flip=flip, device=device)
        return np.stack([_embed_batch(embed_fn, v, v.shape[0]) for v in views], axis=1)


def pixel_views(
    batch: np.ndarray | torch.Tensor, *, flip: bool = True, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """The model inputs of a ``b x H x W x 3`` uint8 RGB batch: ``(x / 255 - 0.5) / 0.5`` NCHW
    float32 on ``device``, and with ``flip`` its horizontal mirror too (what :func:`embed_views`
    embeds)."""
    if isinstance(batch, np.ndarray):  # per batch: a strided view is copied piecewise
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    x = batch.to(device).permute(0, 3, 1, 2).float()
    x = (x / 255 - 0.5) / 0.5
    return [x, torch.flip(x, dims=[3])] if flip else [x]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``N x H x W x 3`` uint8 images to ``size x size`` exactly as training does."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([resize_to(np.ascontiguousarray(im), size) for im in images])


def embed_pairs(
    images: np.ndarray | torch.Tensor,
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    flip: bool = True,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, float]:
    """Embed ``N x H x W x 3`` uint8 RGB images: ``(e + e_flip as float32 (N, d), xnorm)``.

    With ``input_size`` the images are first resized to ``input_size`` squared, as the training
    transforms resize them. Pixels become ``(x / 255 - 0.5) / 0.5`` in NCHW float32 on ``device``
    and ``embed_fn`` runs under ``torch.inference_mode()`` (put the model in eval mode first).
    Without ``flip`` the embeddings are returned unsummed. ``xnorm`` is the mean norm of the
    single raw embeddings (each image and, with ``flip``, each flipped image), as insightface
    reports it.
    """
    uint8 = np.uint8 if isinstance(images, np.ndarray) else torch.uint8
    if images.dtype != uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"images must be N x H x W x 3 uint8 RGB, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    batch_size = check_int("batch_size", batch_size, 1)
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be >= 1 or None, got {input_size}")
    fused, norm_sum, norm_count = [], 0.0, 0
    starts = range(0, images.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress):
            batch = images[start : start + batch_size]
            if input_size is not None:
                host = batch.cpu().numpy() if torch.is_tensor(batch) else batch
                batch = _resize(host, input_size)
            views = embed_views(batch, embed_fn, flip=flip, device=device)
            norm_sum += float(np.linalg.norm(views.astype(np.float64), axis=2).sum())
            norm_count += views.shape[0] * views.shape[1]
            fused.append(views.sum(axis=1, dtype=np.float32))
    return np.concatenate(fused), norm_sum / norm_count


def verify_bin(
    path: str | Path,
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    nrof_folds: int = 10,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``embed_fn`` on a ``.bin`` pair set: :func:`evaluate` plus ``xnorm``, ``name``."""
    path = Path(path)
    images, issame = load_bin_images(path)
    embeddings, xnorm = embed_pairs(
        images,
        embed_fn,
        batch_size=batch_size,
        device=device,
        input_size=input_size,
        show_progress=show_progress,
    )
    results = evaluate(embeddings, issame, nrof_folds=nrof_folds)
    results.update(xnorm=xnorm, name=path.stem)
    return results


def _val_cell(r: Mapping[str, Any], far_reading: str) -> str:
    if r["val"] is not None:
        return f"{100 * r['val']:.2f} ± {100 * r['val_std']:.2f}"
    raw = f"{100 * r['val_insightface']:.2f} ± {100 * r['val_std_insightface']:.2f}"
    return unmeasurable_cell(raw, far_reading)


def format_results(
    results: Mapping[str, Mapping[str, Any]], far_reading: str = "measurable"
) -> str:
    """A Markdown table of per-set results (from :func:`evaluate`/:func:`verify_bin`) plus averages.

    Accuracy and VAL are percentages with their fold std; XNorm shows ``-`` where absent. A VAL
    the set cannot measure (``val`` None) shows ``n/m`` with a footnote, or with
    ``far_reading="insightface"`` insightface's number marked ``*``; the average VAL is then
    ``n/m`` (or insightface's average, marked).
    """
    check_far_reading(far_reading)
    if not results:
        raise ValueError("results is empty: nothing to format")
    targets = {float(r["far_target"]) for r in results.values()}
    if len(targets) != 1:
        raise ValueError(f"all sets must share one far_target, got {sorted(targets)}")
    target = targets.pop()
    headers = ["set", "accuracy (%)", "threshold", "XNorm", f"VAL@FAR={target:g} (%)"]
    rows = []
    for name, r in results.items():
        xnorm = f"{r['xnorm']:.2f}" if "xnorm" in r else "-"
        rows.append(
            [
                name,
                f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
                f"{r['threshold']:.3f}",
                xnorm,
                _val_cell(r, far_reading),
            ]
        )
    xnorms = [r["xnorm"] for r in results.values() if "xnorm" in r]
    unmeasured = {name: r for name, r in results.items() if r["val"] is None}
    mean_val = f"{100 * np.mean([r['val_insightface'] for r in results.values()]):.2f}"
    rows.append(
        [
            "average",
            f"{100 * np.mean([r['accuracy_mean'] for r in results.values()]):.2f}",
            "-",
            f"{np.mean(xnorms):.2f}" if xnorms else "-",
            unmeasurable_cell(mean_val, far_reading) if unmeasured else mean_val,
        ]
    )
    table = markdown_table(headers, rows)
    if not unmeasured:
        return table
    counts = ", ".join(
        f"{name} {r['val_impostor_pairs']:,}"
        + (f" (FAR >= {r['min_measurable_far']:.3g})" if r["val_impostor_pairs"] else "")
        for name, r in unmeasured.items()
    )
    detail = f"the VAL threshold is chosen on each training split's impostor pairs: {counts}"
    return f"{table}\n\n{unmeasurable_note(far_reading, detail)}"
