"""Small-loss selection: keep the training samples a model trained on the noisy set fits best.

The baseline of the noisy-label literature (Co-teaching, Han et al., NeurIPS 2018; DivideMix, Li
et al., ICLR 2020): a network learns clean samples before it memorises noisy ones, so after
training on the dirty set the noisy samples have the larger losses. Here, one pass:

1. Embed every training image with the backbone of the run's **last checkpoint** (eval mode, no
   flip) and take the class centres of the same checkpoint (full, sub-center or single-process
   partial FC; with sub-centres a class's cosine is its nearest sub-centre's, as in training).
2. Each sample's loss is the **plain ArcFace** cross-entropy, ``-log softmax(s * [cos(theta_y +
   m), cos(theta_j)])_y`` (:func:`sample_losses`), whatever head the run was trained with. A
   stateful robust head (its easy fraction, its per-class statistics) gives no well-defined
   per-sample loss after training; ArcFace's is a fixed function of the angles, so runs of
   different heads are selected by the same rule. The scale defaults to the run's
   ``head.params.scale`` (64 when unset), the margin to ArcFace's 0.5 rad.
3. Keep the low-loss samples (:func:`split_losses`): by default DivideMix's rule, which needs no
   noise rate: the losses are min-max normalised, a two-component 1-D Gaussian mixture is fitted
   (``max_iter=10, tol=1e-2, reg_covar=5e-4``, as its official ``eval_train``), and a sample is
   kept when its posterior of the lower-mean component is above ``p_threshold`` (0.5). With
   ``keep_fraction`` the lowest-loss fraction is kept instead (Co-teaching's ``1 - forget_rate``,
   which assumes the noise rate is known).
4. Write the kept samples with the cleaning loop's writer (:func:`robustface.clean.loop`): the
   ``.rec`` (labels re-indexed when a class is emptied), ``origin.npy``, ``label_map.csv``, the
   truth subset when the set has a ``truth.npz``, links to the ``.bin`` sets and ``cleaned.json``;
   then ``losses.npz`` (per input sample: ``loss``, ``p_clean``, ``keep``).

Deviations from the published methods: both train two networks and select for each other
during training, over many epochs; this is the one-shot selection with one trained model,
followed by retraining from scratch on what is kept (the protocol of the other cleaners here).
DivideMix fits the mixture on losses averaged over epochs for high noise rates and leaves the
mixture's random initialisation unseeded; here one pass, and ``seed`` fixes the mixture.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robustface.utils.guards import check_int, check_real

__all__ = ["LossSplit", "sample_losses", "small_loss_select", "split_losses", "summary_table"]

ARCFACE_SCALE = 64.0
ARCFACE_MARGIN = 0.5
_ROWS = 4096


def sample_losses(
    embeddings: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    k: int = 1,
    *,
    scale: float = ARCFACE_SCALE,
    margin: float = ARCFACE_MARGIN,
) -> np.ndarray:
    """Per-sample ArcFace cross-entropy (N,) float64 of ``embeddings`` (N x d) under ``labels``.

    ``weight`` (C*K x d) holds the class centres, class-major with ``k`` sub-centres per class (a
    class's cosine is the largest of its ``k``); embeddings and centres are L2-normalised here.
    The target logit is ``scale * cos(theta_y + margin)`` with ArcFace's fallback beyond
    ``pi - margin`` (:func:`robustface.heads.margin.combined_margin_target`).
    """
    from robustface.heads.margin import combined_margin_target

    k = check_int("k (sub-centres per class)", k, 1)
    scale = check_real("scale", scale, 0, open_low=True)
    margin = check_real("margin", margin, 0, np.pi, open_high=True)
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float64)
    if w.ndim != 2 or w.shape[0] % k:
        raise ValueError(f"weight must be (C*K x d) with K={k}, got shape {tuple(w.shape)}")
    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    if emb.ndim != 2 or emb.shape[1] != w.shape[1]:
        raise ValueError(f"embeddings must be (N x {w.shape[1]}), got shape {tuple(emb.shape)}")
    num_classes = w.shape[0] // k
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if y.shape != (emb.shape[0],) or (y.numel() and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be ({emb.shape[0]},) class indices in [0, {num_classes})")
    centres = F.normalize(w, dim=1)
    out = np.empty(emb.shape[0], dtype=np.float64)
    for start in range(0, emb.shape[0], _ROWS):
        x = F.normalize(emb[start : start + _ROWS], dim=1)
        cos = (x @ centres.T).view(x.shape[0], num_classes, k).amax(dim=2).clamp(-1.0, 1.0)
        rows, target = torch.arange(x.shape[0]), y[start : start + _ROWS]
        logits = cos.clone()
        logits[rows, target] = combined_margin_target(cos[rows, target], m2=margin)
        loss = F.cross_entropy(scale * logits, target, reduction="none")
        out[start : start + x.shape[0]] = loss.numpy()
    return out


@dataclasses.dataclass
class LossSplit:
    """Which samples to keep: ``keep`` (N,) bool; ``p_clean`` (N,) the mixture's posterior of the
    low-loss component (NaN with a fixed fraction); ``method`` (``gmm`` or ``fraction``);
    ``info``: the mixture's means / weights (on the normalised losses) or the fraction, and the
    largest kept loss."""

    keep: np.ndarray
    p_clean: np.ndarray
    method: str
    info: dict[str, Any]


def split_losses(
    losses: np.ndarray,
    *,
    keep_fraction: float | None = None,
    p_threshold: float = 0.5,
    seed: int = 0,
) -> LossSplit:
    """Keep the low-loss samples: the lowest ``keep_fraction`` of them (ties: lower index first),
    or by default DivideMix's two-component mixture on the min-max normalised losses (kept:
    posterior of the lower-mean component > ``p_threshold``; see the module docstring)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size == 0 or not np.all(np.isfinite(losses)):
        raise ValueError(f"losses must be a non-empty 1-D finite array, got shape {losses.shape}")
    n = losses.size
    if keep_fraction is not None:
        keep_fraction = check_real("keep_fraction", keep_fraction, 0, 1, open_low=True)
        count = max(1, round(keep_fraction * n))
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(losses, kind="stable")[:count]] = True
        info: dict[str, Any] = {"keep_fraction": keep_fraction}
        p_clean = np.full(n, np.nan)
        method = "fraction"
    else:
        from sklearn.mixture import GaussianMixture

        p_threshold = check_real("p_threshold", p_threshold, 0, 1, open_high=True)
        span = losses.max() - losses.min()
        if n < 2 or span <= 0:
            raise ValueError(
                "losses: a mixture needs at least 2 distinct values; pass keep_fraction instead"
            )
        x = ((losses - losses.min()) / span)[:, None]
        gmm = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed).fit(x)
        low = int(np.argmin(gmm.means_[:, 0]))
        p_clean = gmm.predict_proba(x)[:, low]
        keep = p_clean > p_threshold
        info = {"p_threshold": p_threshold, "means": gmm.means_[:, 0][[low, 1 - low]].tolist(),
                "weights": gmm.weights_[[low, 1 - low]].tolist()}  # fmt: skip
        method = "gmm"
        if not keep.any():
            raise ValueError("the mixture keeps no sample; pass keep_fraction instead")
        if info["weights"][0] < 0.5:
            warnings.warn(
                f"the low-loss component holds only {info['weights'][0]:.0%} of the samples: "
                "the mixture may be splitting clean samples; check the losses or pass "
                "keep_fraction",
                stacklevel=2,
            )
    info["max_kept_loss"] = float(losses[keep].max())
    info["kept"] = int(keep.sum())
    return LossSplit(keep, p_clean, method, info)


def small_loss_select(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    keep_fraction: float | None = None,
    p_threshold: float = 0.5,
    scale: float | None = None,
    margin: float = ARCFACE_MARGIN,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Select the low-loss samples of ``data`` (default: the run's training ``.rec``) with the
    run's last checkpoint and write them to ``out_dir`` (see the module docstring); returns the
    summary written to ``cleaned.json``. With a ``truth.npz`` beside the data, the summary also
    counts, per truth kind, the samples kept (read after the selection)."""
    from robustface.clean.dirty import TRUTH_KINDS, truth_for
    from robustface.clean.loop import CLEANED_JSON, write_cleaned
    from robustface.clean.subcenter import embed_dataset, run_training_set
    from robustface.utils.io import atomic_path, check_output_dir

    # bad options fail before the long work
    if keep_fraction is not None:
        check_real("keep_fraction", keep_fraction, 0, 1, open_low=True)
    else:  # the mixture's cut; unused with a fixed fraction
        check_real("p_threshold", p_threshold, 0, 1, open_high=True)
    check_real("margin", margin, 0, np.pi, open_high=True)
    if scale is not None:
        check_real("scale", scale, 0, open_low=True)
    run, dataset = run_training_set(run_dir, data)
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite, marker=CLEANED_JSON,
                     inputs=[dataset.rec_path.parent])  # fmt: skip
    if scale is None:
        scale = float(run.cfg.head.params.get("scale", ARCFACE_SCALE))
    backbone = run.backbone(device)
    embeddings = embed_dataset(backbone, dataset, input_size=int(backbone.meta.input_size),
                               batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    labels = dataset.labels
    losses = sample_losses(embeddings, labels, run.weight.numpy(), run.k, scale=scale,
                           margin=margin)  # fmt: skip
    split = split_losses(losses, keep_fraction=keep_fraction, p_threshold=p_threshold, seed=seed)
    summary: dict[str, Any] = {
        "method": "small-loss",
        "run_dir": str(run_dir),
        "data": str(dataset.rec_path),
        "loss": {"name": "arcface", "scale": scale, "margin": margin},
        "split": {"method": split.method, **split.info},
    }
    # the truth is read only now, after the selection
    truth = truth_for(dataset.rec_path.parent, len(dataset))
    if truth is not None:
        summary["truth"] = {
            name: {"total": int(np.sum(truth.kind == i)),
                   "kept": int(np.sum(split.keep & (truth.kind == i)))}
            for i, name in enumerate(TRUTH_KINDS)
        }  # fmt: skip
    summary = write_cleaned(dataset.rec_path.parent, out, split.keep, labels.copy(),
                             np.arange(len(dataset)), summary)  # fmt: skip
    with atomic_path(out / "losses.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, loss=losses, p_clean=split.p_clean, keep=split.keep)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The kept counts per truth kind (when known) as a Markdown table."""
    from robustface.utils.table import markdown_table

    rows = [[name, c["total"], c["kept"], f"{100 * c['kept'] / max(c['total'], 1):.1f}"]
            for name, c in summary.get("truth", {}).items()]  # fmt: skip
    return markdown_table(["truth kind", "samples", "kept", "kept %"], rows) if rows else ""
