"""Sub-center ArcFace cleaning, the "drop" step (Deng et al., ECCV 2020).

A classifier trained with K sub-centers per class (:class:`~robustface.fc.full.SubCenterFC`) lets
clean samples gather around one *dominant* sub-center per class while noisy samples drift to the
others. Per class, the dominant sub-center is the one most of the class's samples are nearest to;
a sample is kept iff its angle to the dominant sub-center of its labelled class is below a
threshold (75 degrees in the paper, range 70-80). The kept samples are then written as a new
training set to retrain on from scratch.

Only the K sub-centers of a sample's own class are ever compared with it, so memory is
``O(batch * K * d)`` whatever the number of classes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from robustface.config import Config
from robustface.data.loader import user_error_batches
from robustface.data.noise import KIND_NAMES, NOISE_LIST, noise_list_for, save_noise_list
from robustface.data.recordio import RecordIODataset
from robustface.data.subset import link_verification_sets, write_rec_subset
from robustface.data.transforms import EvalTransform
from robustface.models.loading import load_backbone
from robustface.train import checkpoint as ckpt
from robustface.train.components import classifier_settings
from robustface.utils.guards import check_int, check_real
from robustface.utils.io import atomic_directory, check_output_dir, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

__all__ = [
    "DropReport",
    "DropResult",
    "Embedded",
    "dominant_subcenter",
    "drop_decisions",
    "embed_dataset",
    "embed_images",
    "subcenter_assignments",
    "subcenter_drop",
]

_ROWS_PER_CHUNK = 65536


def _numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if labels.shape != (n,) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be ({n},) integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got {bad}")
    return labels.astype(np.int64, copy=False)


def subcenter_assignments(
    embeddings: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    weight: np.ndarray | Tensor,
    k: int,
    *,
    chunk: int = _ROWS_PER_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of each sample to the K sub-centers of its own class, and the nearest of them.

    ``embeddings`` (N x d), ``labels`` (N,) in ``[0, C)``, ``weight`` (C*K x d) class-major as in
    :class:`~robustface.fc.full.SubCenterFC`. Embeddings and weight rows are L2-normalised here.
    Returns ``(nearest (N,) int64 in [0, K), cosine (N x K))``; ties go to the lowest index. The
    cosines are float64 if either input is, else float32.
    """
    emb, w = _numpy(embeddings), _numpy(weight)
    k = check_int("k (sub-centers per class)", k, 1)
    if w.ndim != 2 or w.shape[0] % k:
        raise ValueError(f"weight must be (C*K x d) with K={k}, got shape {w.shape}")
    if emb.ndim != 2 or emb.shape[1] != w.shape[1]:
        raise ValueError(f"embeddings must be (N x {w.shape[1]}), got shape {emb.shape}")
    labels = _check_labels(_numpy(labels), emb.shape[0], w.shape[0] // k)
    dtype = np.result_type(emb.dtype, w.dtype, np.float32)
    centers = _unit_rows(w.astype(dtype, copy=False)).reshape(-1, k, w.shape[1])
    cosine = np.empty((emb.shape[0], k), dtype=dtype)
    for start in range(0, emb.shape[0], chunk):
        x = _unit_rows(emb[start : start + chunk].astype(dtype, copy=False))
        own = centers[labels[start : start + chunk]]  # (B x K x d)
        cosine[start : start + chunk] = np.einsum("bkd,bd->bk", own, x)
    np.clip(cosine, -1.0, 1.0, out=cosine)
    return cosine.argmax(axis=1).astype(np.int64), cosine


def dominant_subcenter(
    nearest: np.ndarray, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
    """Per class, the sub-center most of its samples are nearest to (C,) int64.

    Ties go to the lowest index; a class without samples gets 0.
    """
    nearest, labels = np.asarray(nearest, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if nearest.shape != labels.shape or nearest.ndim != 1:
        raise ValueError(f"nearest {nearest.shape} and labels {labels.shape} must be equal (N,)")
    if nearest.size and (nearest.min() < 0 or nearest.max() >= k):
        raise ValueError(f"nearest must hold sub-center indices in [0, {k})")
    _check_labels(labels, labels.size, num_classes)
    counts = np.bincount(labels * k + nearest, minlength=num_classes * k)
    return counts.reshape(num_classes, k).argmax(axis=1)


@dataclasses.dataclass
class DropResult:
    """Per-sample drop decisions: ``keep`` (N,) bool, ``angle_deg`` (N,) angle to the dominant
    sub-center of the labelled class, ``dominant`` (C,) and ``nearest`` (N,) sub-center indices."""

    keep: np.ndarray
    angle_deg: np.ndarray
    dominant: np.ndarray
    nearest: np.ndarray


def drop_decisions(
    embeddings: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    weight: np.ndarray | Tensor,
    k: int,
    threshold_deg: float = 75.0,
) -> DropResult:
    """Keep a sample iff its angle to its class's dominant sub-center is < ``threshold_deg``."""
    threshold_deg = check_real("threshold_deg", threshold_deg, 0, 180, open_low=True)
    nearest, cosine = subcenter_assignments(embeddings, labels, weight, k)
    labels = np.asarray(_numpy(labels), dtype=np.int64)
    dominant = dominant_subcenter(nearest, labels, _numpy(weight).shape[0] // k, k)
    cos_dominant = np.take_along_axis(cosine, dominant[labels][:, None], axis=1)[:, 0]
    angle = np.degrees(np.arccos(cos_dominant))
    return DropResult(angle < threshold_deg, angle, dominant, nearest)


class _Evaluated(Dataset):
    """``(EvalTransform(image), image_stats(image))`` of a dataset of raw RGB images."""

    def __init__(
        self,
        base: Dataset,
        input_size: int,
        image_stats: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.base = base
        self.transform = EvalTransform(input_size)
        self.image_stats = image_stats

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.base[index][0]
        stats = self.image_stats(image) if self.image_stats is not None else np.zeros(0)
        return self.transform(image), torch.as_tensor(np.asarray(stats, dtype=np.float32))


@dataclasses.dataclass
class Embedded:
    """What :func:`embed_images` computed, per image: unit ``embeddings`` (N x d) float32, the
    raw embedding ``norms`` (N,) before normalising, and ``stats`` (N x s) from ``image_stats``."""

    embeddings: np.ndarray
    norms: np.ndarray
    stats: np.ndarray


def embed_images(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    input_size: int,
    image_stats: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Embedded:
    """Embed every image of ``dataset`` in index order, streamed in batches.

    ``dataset[i]`` is ``(HxWx3 uint8 RGB image, label)``, as a :class:`RecordIODataset` without
    transform. Images are resized and normalised by :class:`EvalTransform` (no flip); the
    backbone runs in eval mode (its previous mode is restored). ``image_stats`` (optional) maps
    each raw image to a small float vector computed in the loader workers.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    num_workers = check_int("workers", num_workers, 0)
    count, batches = user_error_batches(
        _Evaluated(dataset, input_size, image_stats),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    was_training = backbone.training
    backbone.eval()
    # channels-last input: the CPU convolutions run about 1.5-1.8x faster (r18_tiny, 56 px)
    layout = torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format
    # filled in place (the size is known): no list of batches concatenated at twice the size
    n, done = len(dataset), 0
    out = Embedded(np.zeros((n, 0), np.float32), np.zeros(n, np.float32), np.zeros((n, 0)))
    try:
        with torch.inference_mode():
            bar = tqdm(batches, total=count, desc="embedding", unit="batch", disable=not progress)
            for images, extra in bar:
                images = images.to(device, non_blocking=True, memory_format=layout)
                emb = backbone(images).float()
                if done == 0:
                    out.embeddings = np.empty((n, emb.shape[1]), np.float32)
                    out.stats = np.empty((n, extra.shape[1]), np.float32)
                rows = slice(done, done + len(emb))
                out.norms[rows] = emb.norm(dim=1).cpu().numpy()
                out.embeddings[rows] = F.normalize(emb, dim=1).cpu().numpy()
                out.stats[rows] = extra.numpy()
                done += len(emb)
    finally:
        backbone.train(was_training)
    if done != n:
        raise RuntimeError(f"the loader gave {done} images for a dataset of {n}")
    return out


def embed_dataset(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    input_size: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """L2-normalised float32 embeddings (N x d) of every image of ``dataset``, in index order
    (:func:`embed_images` without norms and statistics)."""
    return embed_images(
        backbone,
        dataset,
        input_size=input_size,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
    ).embeddings


@dataclasses.dataclass
class DropReport:
    """What :func:`subcenter_drop` wrote to ``path``.

    ``counts[kind]`` is ``{"total", "kept", "dropped"}`` per noise kind (``"all"`` always;
    ``"clean"``, ``"closed"``, ``"open"`` with a noise list). ``scores`` is empty without a noise
    list, else ``{"precision", "recall", "f1"}`` of "dropped" against "noisy" for ``"noisy"`` (all
    noise kinds) and each noise kind (that kind against the clean samples).
    """

    path: Path
    total: int
    kept: int
    dropped: int
    rescued: int
    threshold_deg: float
    counts: dict[str, dict[str, int]]
    scores: dict[str, dict[str, float]]

    def table(self) -> str:
        """The counts and scores as a Markdown table."""
        rows = []
        for name, c in self.counts.items():
            s = self.scores.get("noisy" if name == "all" else name, {})
            score = [f"{s[m]:.3f}" if m in s else "" for m in ("precision", "recall", "f1")]
            rows.append([name, c["total"], c["kept"], c["dropped"], *score])
        headers = ["samples", "total", "kept", "dropped", "precision", "recall", "F1"]
        return markdown_table(headers, rows)


def _prf(dropped: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(dropped & noisy))
    precision = tp / max(int(dropped.sum()), 1)
    recall = tp / max(int(noisy.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _noise_scores(
    keep: np.ndarray, kind: np.ndarray
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Per-kind counts and precision/recall/F1 of the drops against the ground-truth kinds."""
    dropped = ~keep
    counts, scores = {}, {"noisy": _prf(dropped, kind != 0)}
    for value, name in enumerate(KIND_NAMES):
        mask = kind == value
        kept = int(np.sum(keep & mask))
        counts[name] = {"total": int(mask.sum()), "kept": kept, "dropped": int(mask.sum()) - kept}
        if value:
            scope = mask | (kind == 0)
            scores[name] = _prf(dropped[scope], mask[scope])
    return counts, scores


def _plot_angles(path: Path, angle: np.ndarray, threshold: float, kind: np.ndarray | None) -> None:
    plt = pyplot()

    bins = np.linspace(0.0, 180.0, 91)
    fig, ax = plt.subplots(figsize=(7, 4))
    if kind is None:
        ax.hist(angle, bins=bins, color="tab:blue", label="all samples")
    else:
        groups = [
            (angle[kind == v], name) for v, name in enumerate(KIND_NAMES) if np.any(kind == v)
        ]
        ax.hist([g for g, _ in groups], bins=bins, stacked=True, label=[n for _, n in groups])
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g} deg")
    ax.set(
        xlabel="angle to the dominant sub-center of the labelled class (degrees)",
        ylabel="samples",
        title="Sub-center drop",
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


@dataclasses.dataclass
class RunClassifier:
    """A run's config, the main state of its last checkpoint and its class centres: ``weight``
    (C*K x d, class-major), ``k`` sub-centres per class, ``num_classes``."""

    cfg: Config
    main: dict[str, Any]
    weight: Tensor
    k: int
    num_classes: int

    def backbone(self, device: str | torch.device = "cpu") -> nn.Module:
        """The run's backbone on ``device`` with ``main["backbone"]``: the weights trained
        together with these centres."""
        from robustface.models import build_backbone

        model = build_backbone(self.cfg.model.backbone, **self.cfg.model.kwargs()).to(device)
        model.load_state_dict(self.main["backbone"])
        return model


def load_run_classifier(run_dir: str | Path, *, need: str | None = None) -> RunClassifier:
    """The classifier of a run's last checkpoint (``fc.name`` full, subcenter or partial_fc, whose
    shards are put back together in class order; ``need``: only that one). The backbone state is
    ``main["backbone"]``, trained together with these centres."""
    run = RunDir(run_dir)
    cfg = run.config()
    allowed = (need,) if need else ("full", "subcenter", "partial_fc")
    if cfg.fc.name not in allowed:
        raise ValueError(
            f"{run_dir}: the run used fc.name={cfg.fc.name!r}; the sub-center drop needs a run "
            f"trained with fc.name: {need} (sub-center FC, not sharded by partial_fc)"
        )
    path = run.last_checkpoint().path
    main = ckpt.load_main(path)
    k = int(classifier_settings(cfg)["k"]) if cfg.fc.name == "subcenter" else 1
    if cfg.fc.name == "partial_fc":
        shards = ckpt.load_rank_states(path, int(main.get("world_size", 1)))
        shards.sort(key=lambda state: int(state["fc"]["start"]))
        weight = torch.cat([state["fc"]["module"]["weight"].float() for state in shards])
    else:
        weight = main["fc"]["module"]["weight"].float()
    num_classes = int(main["num_classes"])
    if weight.shape[0] != num_classes * k:
        raise ValueError(
            f"{run_dir}: checkpoint weight has {weight.shape[0]} rows, expected "
            f"{num_classes} classes x k={k}"
        )
    return RunClassifier(cfg, main, weight, k, num_classes)


def run_training_set(
    run_dir: str | Path, data: str | Path | None = None, *, need: str | None = None
) -> tuple[RunClassifier, RecordIODataset]:
    """The run's classifier (:func:`load_run_classifier`) and the ``.rec`` set to clean: ``data``,
    or the run's training data; ``ValueError`` when the set's classes are not the run's."""
    run = load_run_classifier(run_dir, need=need)
    data_path = Path(data) if data is not None else default_data(run.cfg, Path(run_dir))
    dataset = RecordIODataset(data_path)
    if dataset.num_classes != run.num_classes:
        raise ValueError(
            f"{data_path}: {dataset.num_classes} classes, but the run {run_dir} was trained "
            f"on {run.num_classes}"
        )
    return run, dataset


def default_data(cfg: Config, run_dir: Path) -> Path:
    """The ``.rec`` a run was trained on (a ``rec`` or ``synthface`` source)."""
    data = cfg.data
    if data.source == "rec":
        return Path(data.path)  # type: ignore[arg-type]
    if data.source == "synthface":
        return Path(data.path) if data.path else run_dir / "synthface"
    raise ValueError(
        f"{run_dir}: trained on a {data.source!r} dataset; pass the same data as a .rec "
        "(data=..., CLI --data; see 'robustface convert')"
    )


def subcenter_drop(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    threshold_deg: float = 75.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> DropReport:
    """Clean a training set with a sub-center run and write the kept samples to ``out_dir``.

    The backbone and the sub-center weights both come from the run's last checkpoint. ``data``
    (default: the run's training data) must be the ``.rec`` the run was trained on. ``out_dir``
    receives ``train.rec/.idx/property`` (the kept samples, records grouped by class, bytes
    unchanged), ``kept.npy``, ``drop.npz``, ``drop.json``, ``drop_angles.png``, the source's
    ``*.bin`` and ``verification.json``, and with a source ``noise.npz`` its kept rows in the new
    record order. A class that would lose every sample keeps its closest one ("rescued").
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    threshold_deg = check_real("threshold_deg", threshold_deg, 0, 180, open_low=True)
    run, dataset = run_training_set(run_dir, data, need="subcenter")
    cfg, main, weight, k, num_classes = run.cfg, run.main, run.weight, run.k, run.num_classes
    data_path = Path(data) if data is not None else default_data(cfg, run_dir)
    source_dir = dataset.rec_path.parent
    labels = dataset.labels
    total_per_class = np.bincount(labels, minlength=num_classes)
    if not total_per_class.all():
        raise ValueError(
            f"{data_path}: class {int(np.argmin(total_per_class))} has no samples; "
            "every class of the cleaned set needs at least one"
        )
    noise = noise_list_for(dataset.rec_path)  # the ground truth, when the data has one
    check_output_dir(out, overwrite=overwrite, marker="drop.json", inputs=[source_dir])
    with atomic_directory(out) as partial:
        backbone, input_size = load_backbone(run_dir, device=device)
        backbone.load_state_dict(main["backbone"])  # the weights the classifier was trained with
        embeddings = embed_dataset(
            backbone,
            dataset,
            input_size=input_size,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )
        result = drop_decisions(embeddings, labels, weight.numpy(), k, threshold_deg)
        keep = result.keep.copy()
        # a class losing every sample keeps the one closest to its dominant sub-center
        by_class = np.lexsort((result.angle_deg, labels))
        first = by_class[np.r_[True, labels[by_class][1:] != labels[by_class][:-1]]]
        class_kept = np.bincount(labels[keep], minlength=num_classes)
        rescued = first[class_kept[labels[first]] == 0]
        keep[rescued] = True
        rescued_mask = np.zeros(len(labels), dtype=bool)
        rescued_mask[rescued] = True
        kept_idx = np.flatnonzero(keep)
        picks = np.stack([np.zeros_like(kept_idx), kept_idx], axis=1)
        order = write_rec_subset(
            partial,
            [dataset.rec_path],
            picks,
            labels[kept_idx],
            num_classes=num_classes,
            progress=progress,
        )
        new_index = np.full(len(labels), -1, dtype=np.int64)
        new_index[kept_idx[order]] = np.arange(len(order))
        np.save(partial / "kept.npy", kept_idx)
        np.savez(
            partial / "drop.npz",
            angle_deg=result.angle_deg,
            keep=keep,
            rescued=rescued_mask,
            nearest=result.nearest,
            dominant=result.dominant,
            labels=labels,
            new_index=new_index,
        )
        counts = {
            "all": {
                "total": len(labels),
                "kept": len(kept_idx),
                "dropped": len(labels) - len(kept_idx),
            }
        }
        scores: dict[str, dict[str, float]] = {}
        if noise is not None:
            save_noise_list(noise.take(kept_idx[order]), partial / NOISE_LIST)
            more, scores = _noise_scores(keep, noise.kind)
            counts.update(more)
        _plot_angles(
            partial / "drop_angles.png",
            result.angle_deg,
            threshold_deg,
            None if noise is None else noise.kind,
        )
        link_verification_sets(source_dir, partial)
        kept_per_class = np.bincount(labels[kept_idx], minlength=num_classes)
        summary = {
            "run_dir": str(run_dir),
            "checkpoint_step": int(main["progress"]["global_step"]),
            "data": str(dataset.rec_path),
            "threshold_deg": threshold_deg,
            "k": k,
            "num_classes": num_classes,
            "counts": counts,
            "rescued": len(rescued),
            "scores": scores,
            "per_class": {
                "kept_min": int(kept_per_class.min()),
                "kept_median": float(np.median(kept_per_class)),
                "kept_mean": float(kept_per_class.mean()),
                "kept_max": int(kept_per_class.max()),
                "kept_fraction_min": float((kept_per_class / total_per_class).min()),
                "classes_fully_kept": int(np.sum(kept_per_class == total_per_class)),
                "dominant_histogram": np.bincount(result.dominant, minlength=k).tolist(),
            },
        }
        write_text_atomic(partial / "drop.json", json.dumps(summary, indent=2) + "\n")
    return DropReport(
        path=out,
        total=len(labels),
        kept=len(kept_idx),
        dropped=len(labels) - len(kept_idx),
        rescued=len(rescued),
        threshold_deg=threshold_deg,
        counts=counts,
        scores=scores,
    )
