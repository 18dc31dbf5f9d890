"""Angle probes: where clean, noisy and low-quality samples sit relative to the class centres.

The RobustFace argument is made with the distribution of the angle between a sample's embedding
and its *labelled* class centre: clean samples converge to small angles, label-noisy ones stay at
large angles, and a robust loss keeps the two apart while the centres stop being pulled by the
noise. This module measures exactly that on a fixed, stratified probe subset of the training set:

- :func:`probe_groups` / :func:`select_probe`: group every sample (clean, closed-set noise,
  open-set noise, low quality) and draw a deterministic stratified probe.
- :func:`probe_cosines`: per probe sample, the cosine to its labelled centre, to the closest other
  centre and to its true centre (closed-set noise), plus its normalised embedding.
- :func:`angle_summary`: per-group angle statistics, and how well each non-clean group separates
  from the clean one (histogram overlap, Mann–Whitney AUC).
- :func:`center_stats`: how far the centres moved since the last probe, how far they sit from the
  clean samples' mean direction and how much the noisy samples pull them.
- :class:`AngleProbe`: the above at several training steps, saved as arrays, plots and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustface.data.noise import CLEAN, CLOSED, OPEN
from robustface.data.transforms import resize_to, to_tensor_normalized
from robustface.utils.guards import check_int, check_real
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir

__all__ = [
    "GROUP_KEYS",
    "GROUP_NAMES",
    "AngleProbe",
    "ProbeRecord",
    "angle_axis_range",
    "angle_summary",
    "center_stats",
    "histogram_overlap",
    "mann_whitney_auc",
    "plot_angle_distributions",
    "plot_center_drift",
    "plot_run_angles",
    "probe_cosines",
    "probe_groups",
    "select_probe",
    "stages_by_step",
]

LOW_QUALITY = 3  # the group after the noise kinds CLEAN, CLOSED, OPEN
GROUP_NAMES = ("clean", "closed-set noise", "open-set noise", "low quality")
"""Display name of each group code."""
GROUP_KEYS = ("clean", "closed", "open", "lowq")
"""Short name of each group code, used in summary keys (``clean_angle_mean``, ``auc_open``)."""
_GROUP_COLORS = ("tab:blue", "tab:red", "tab:orange", "tab:gray")
_NOISY = (CLOSED, OPEN)
_EPS = 1e-12


def probe_groups(
    kind: np.ndarray, quality: np.ndarray | None, *, low_quality_fraction: float = 0.1
) -> np.ndarray:
    """Group code of every sample: 0 clean, 1 closed-set noise, 2 open-set noise, 3 low quality.

    ``kind`` is the noise kind (0 clean, 1 closed-set, 2 open-set). ``quality`` is a per-sample
    score where higher is better (SynthFace: 1 = undegraded); the ``low_quality_fraction *
    n_clean`` (rounded, halves up) clean samples of lowest quality (ties: lower index first)
    become group 3, so group 0 holds the remaining clean samples. With ``quality=None`` there is
    no group 3.
    """
    kind = np.asarray(kind)
    if kind.ndim != 1 or not np.isin(kind, (CLEAN, CLOSED, OPEN)).all():
        raise ValueError("kind must be a 1-D array of noise kinds in {0, 1, 2}")
    low_quality_fraction = check_real("low_quality_fraction", low_quality_fraction, 0, 1)
    groups = kind.astype(np.int64)
    if quality is None:
        return groups
    quality = np.asarray(quality, dtype=np.float64)
    if quality.shape != kind.shape:
        raise ValueError(f"quality has shape {quality.shape}, kind has {kind.shape}")
    clean = np.flatnonzero(kind == CLEAN)
    if not np.isfinite(quality[clean]).all():
        raise ValueError("quality must be finite for every clean sample")
    n_low = int(low_quality_fraction * clean.size + 0.5)
    worst = clean[np.argsort(quality[clean], kind="stable")[:n_low]]
    groups[worst] = LOW_QUALITY
    return groups


def select_probe(groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified probe of ``min(n, len(groups))`` samples.

    Each of the ``k`` non-empty groups gets an equal share (``ceil(n / k)`` at most); a group
    smaller than its share is taken whole and its leftover is shared by the others the same way
    (smaller groups are served first, ties by group code). Within a group the samples are drawn
    without replacement from ``default_rng([seed, group])``, so the draw is deterministic and one
    group's draw does not depend on the others.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
    n = check_int("n", n, 1)
    codes, sizes = np.unique(groups, return_counts=True)
    order = np.lexsort((codes, sizes))  # by size, then code
    budget = min(n, groups.size)
    picked = []
    for rank, i in enumerate(order):
        take = min(int(sizes[i]), -(-budget // (len(order) - rank)))
        budget -= take
        members = np.flatnonzero(groups == codes[i])
        rng = np.random.default_rng([seed, int(codes[i])])
        picked.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


@dataclasses.dataclass
class ProbeRecord:
    """Per-sample cosines of a probe at one training step.

    ``cos_label``: cosine to the labelled class centre; ``max_neg``: largest cosine among the
    other classes, reached at class ``neg_class``; ``cos_true``: cosine to the true class (NaN
    where unknown, i.e. open-set noise); ``embeddings``: the L2-normalised embeddings (float32,
    ``None`` once no longer needed).
    """

    step: int
    cos_label: np.ndarray
    max_neg: np.ndarray
    neg_class: np.ndarray
    cos_true: np.ndarray
    embeddings: np.ndarray | None = None

    @property
    def angle_label(self) -> np.ndarray:
        """Angle (degrees) to the labelled class centre."""
        return _degrees(self.cos_label)

    @property
    def angle_neg(self) -> np.ndarray:
        """Angle (degrees) to the closest other class centre."""
        return _degrees(self.max_neg)


def _to_tensor(value: Any) -> Any:
    """A numpy array as a tensor (sharing memory); anything else unchanged."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _to_numpy(value: Any) -> Any:
    """A tensor as a numpy array (sharing memory); anything else unchanged."""
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _degrees(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)))


@torch.no_grad()
def probe_cosines(
    embed: Callable[[Tensor], Tensor],
    cosine_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: np.ndarray,
    *,
    true_labels: np.ndarray | None = None,
    batch_size: int = 256,
) -> ProbeRecord:
    """Embed ``images`` batch by batch and record each sample's cosines (``step`` is 0).

    ``embed`` maps a normalised image batch to embeddings (put the backbone in eval mode and move
    the batch to its device inside it); ``cosine_fn`` maps L2-normalised embeddings (n x d) to
    class cosines (n x C), already max-pooled over sub-centres. ``true_labels`` < 0 mark samples
    without a true class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    true = labels if true_labels is None else np.asarray(true_labels, dtype=np.int64)
    if labels.shape != (len(images),) or true.shape != labels.shape:
        raise ValueError(f"need one label and one true label per image ({len(images)})")
    if len(images) == 0 or batch_size <= 0:
        raise ValueError(f"need at least one image and a positive batch_size, got {batch_size}")
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, len(images), batch_size):
        emb = F.normalize(embed(images[start : start + batch_size]).float(), dim=1)
        cos = cosine_fn(emb).float()
        num_classes = cos.shape[1]
        stop = start + len(emb)
        lab = torch.as_tensor(labels[start:stop], device=cos.device)[:, None]
        tru = torch.as_tensor(true[start:stop], device=cos.device)[:, None]
        if num_classes < 2 or (lab < 0).any() or (lab >= num_classes).any():
            raise ValueError(f"labels must lie in [0, {num_classes}) with at least 2 classes")
        if (tru >= num_classes).any():
            raise ValueError(f"true labels must be < {num_classes}")
        cos_label = cos.gather(1, lab)[:, 0]
        max_neg, neg_class = cos.scatter(1, lab, -math.inf).max(dim=1)
        cos_true = cos.gather(1, tru.clamp(min=0))[:, 0].masked_fill(tru[:, 0] < 0, math.nan)
        parts.append((cos_label, max_neg, neg_class, cos_true, emb))
    cols = [torch.cat(col).cpu().numpy() for col in zip(*parts, strict=True)]
    return ProbeRecord(
        step=0,
        cos_label=cols[0].astype(np.float32),
        max_neg=cols[1].astype(np.float32),
        neg_class=cols[2].astype(np.int64),
        cos_true=cols[3].astype(np.float32),
        embeddings=cols[4].astype(np.float32),
    )


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (float64) and whether each row had a usable length."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    ok = norm[:, 0] > _EPS
    return x / np.where(ok[:, None], norm, 1.0), ok


def _row_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) between matching unit rows, ``2 atan2(|a - b|, |a + b|)``: exact near 0
    and 180 degrees, where ``arccos`` of the dot product loses precision."""
    diff = np.linalg.norm(a - b, axis=1)
    total = np.linalg.norm(a + b, axis=1)
    return np.degrees(2.0 * np.arctan2(diff, total))


def _class_mean_directions(
    embeddings: np.ndarray, labels: np.ndarray, mask: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit mean direction of the masked embeddings per class, and which classes have one."""
    sums = np.zeros((num_classes, embeddings.shape[1]))
    np.add.at(sums, labels[mask], embeddings[mask].astype(np.float64))
    return _unit_rows(sums)


def center_stats(
    weight: np.ndarray,
    record: ProbeRecord,
    labels: np.ndarray,
    groups: np.ndarray,
    previous_weight: np.ndarray | None = None,
) -> dict[str, float]:
    """Angles (degrees) describing the class centres (rows of ``weight``, C x d) at this probe.

    - ``drift_deg_mean``: mean over classes of the angle between a row now and in
      ``previous_weight`` (only when given).
    - ``center_to_clean_mean_deg``: mean, over classes with at least one clean (group 0) probe
      sample, of the angle between the centre and the mean direction of those samples.
    - ``center_to_noisy_pull_deg``: mean, over classes with both clean and noisy (closed- or
      open-set) probe samples, of ``angle(clean mean, noisy mean) - angle(centre, noisy mean)``:
      how many degrees closer to the noisy samples the centre is than the clean mean is. 0 means
      the centre is no closer to the noise than the clean samples are, the pair's angle means it
      sits on the noisy samples, negative means it leans away from them.

    A key is left out when no class qualifies. For sub-centre classifiers pass one row per class
    (e.g. the dominant sub-centre).
    """
    w, _ = _unit_rows(weight)
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups)
    if record.embeddings is None:
        raise ValueError("the record has no embeddings")
    if labels.shape != groups.shape or labels.shape != (len(record.embeddings),):
        raise ValueError("labels, groups and the record must cover the same samples")
    if labels.size and (labels.min() < 0 or labels.max() >= len(w)):
        raise ValueError(f"labels must lie in [0, {len(w)})")
    stats: dict[str, float] = {}
    if previous_weight is not None:
        if np.shape(previous_weight) != np.shape(weight):
            raise ValueError(f"previous_weight {np.shape(previous_weight)} != {np.shape(weight)}")
        stats["drift_deg_mean"] = float(_row_angles_deg(w, _unit_rows(previous_weight)[0]).mean())
    emb = record.embeddings
    clean, has_clean = _class_mean_directions(emb, labels, groups == CLEAN, len(w))
    if has_clean.any():
        stats["center_to_clean_mean_deg"] = float(
            _row_angles_deg(w[has_clean], clean[has_clean]).mean()
        )
    noisy, has_noisy = _class_mean_directions(emb, labels, np.isin(groups, _NOISY), len(w))
    both = has_clean & has_noisy
    if both.any():
        gap = _row_angles_deg(clean[both], noisy[both])
        stats["center_to_noisy_pull_deg"] = float(
            (gap - _row_angles_deg(w[both], noisy[both])).mean()
        )
    return stats


_BIN_EDGES = np.arange(0.0, 181.0)


def histogram_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two angle histograms (1-degree bins on [0, 180], each summing to 1).

    1 means identical histograms, 0 disjoint ones.
    """
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both angle samples must be non-empty")
    ha = np.histogram(np.clip(a, 0.0, 180.0), _BIN_EDGES)[0] / len(a)
    hb = np.histogram(np.clip(b, 0.0, 180.0), _BIN_EDGES)[0] / len(b)
    return float(np.minimum(ha, hb).sum())


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """``P(pos > neg) + P(pos == neg) / 2`` over all pairs, from the mid-ranks of the pooled set."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("both samples must be non-empty")
    _, inverse, counts = np.unique(
        np.concatenate([pos, neg]), return_inverse=True, return_counts=True
    )
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    rank_sum = mid_ranks[inverse[: pos.size]].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def angle_summary(record: ProbeRecord, groups: np.ndarray) -> dict[str, float]:
    """Flat angle statistics of a probe record.

    Per group ``g`` present (keys from :data:`GROUP_KEYS`): ``g_count``, ``g_angle_mean`` and
    ``g_angle_median`` (degrees to the labelled centre), ``g_neg_closer_frac`` (fraction with
    ``max_neg > cos_label``) and, where true classes are known, ``g_true_angle_mean``. For every
    non-clean group present with clean samples: ``overlap_g`` (:func:`histogram_overlap` of its
    angles and the clean ones) and ``auc_g`` (:func:`mann_whitney_auc`: probability that one of
    its samples lies at a larger angle than a clean one).
    """
    groups = np.asarray(groups)
    if groups.shape != record.cos_label.shape:
        raise ValueError(f"groups {groups.shape} and record {record.cos_label.shape} differ")
    angle = record.angle_label
    true_angle = _degrees(record.cos_true)
    neg_closer = record.max_neg > record.cos_label
    out: dict[str, float] = {}
    clean = angle[groups == CLEAN]
    for code, key in enumerate(GROUP_KEYS):
        mask = groups == code
        if not mask.any():
            continue
        out[f"{key}_count"] = float(mask.sum())
        out[f"{key}_angle_mean"] = float(angle[mask].mean())
        out[f"{key}_angle_median"] = float(np.median(angle[mask]))
        out[f"{key}_neg_closer_frac"] = float(neg_closer[mask].mean())
        known = mask & np.isfinite(true_angle)
        if known.any():
            out[f"{key}_true_angle_mean"] = float(true_angle[known].mean())
        if code != CLEAN and clean.size:
            out[f"overlap_{key}"] = histogram_overlap(angle[mask], clean)
            out[f"auc_{key}"] = mann_whitney_auc(angle[mask], clean)
    return out


def angle_axis_range(values: Sequence[np.ndarray], margin: float = 0.1) -> tuple[float, float]:
    """An angle axis (degrees) fitted to ``values``: their finite range widened by ``margin`` of
    its width (at least 2 degrees) on each side, whole degrees, within [0, 180]."""
    finite = [v[np.isfinite(v)] for v in map(np.asarray, values)]
    finite = [v for v in finite if v.size]
    if not finite:
        return 0.0, 180.0
    lo = min(float(v.min()) for v in finite)
    hi = max(float(v.max()) for v in finite)
    pad = max(margin * (hi - lo), 2.0)
    return max(0.0, math.floor(lo - pad)), min(180.0, math.ceil(hi + pad))


def stages_by_step(steps: Sequence[int], count: int) -> np.ndarray:
    """Indices of at most ``count`` stages spread evenly over the training steps (not over the
    stage indices): for each of ``count`` evenly spaced steps from the first to the last, the stage
    nearest to it (ties: the earlier), each stage at most once; first and last always included."""
    steps_arr = np.asarray(steps, dtype=np.float64)
    if steps_arr.ndim != 1 or steps_arr.size == 0 or count < 1:
        raise ValueError(f"need at least one step and count >= 1, got {len(steps)}, {count}")
    targets = np.linspace(steps_arr[0], steps_arr[-1], min(count, steps_arr.size))
    return np.unique([int(np.argmin(np.abs(steps_arr - t))) for t in targets])


def plot_angle_distributions(
    records: Sequence[ProbeRecord], groups: np.ndarray, path: Path, title: str = ""
) -> None:
    """One column per record: angle to the labelled centre (top) and to the closest other centre
    (bottom), one step-filled density histogram per group, overlaps with clean in the titles."""
    plt = pyplot()

    if not records:
        raise ValueError("no records to plot")
    groups = np.asarray(groups)
    present = [c for c in range(len(GROUP_NAMES)) if (groups == c).any()]
    lo, hi = angle_axis_range([v for r in records for v in (r.angle_label, r.angle_neg)])
    bins = np.linspace(lo, hi, 61)
    fig, axes = plt.subplots(
        2, len(records), figsize=(4.2 * len(records), 6.6), squeeze=False, sharex=True
    )
    for col, record in enumerate(records):
        top, bottom = axes[0, col], axes[1, col]
        for values, ax in ((record.angle_label, top), (record.angle_neg, bottom)):
            for code in present:
                mask = groups == code
                ax.hist(
                    values[mask],
                    bins=bins,
                    density=True,
                    histtype="stepfilled",
                    alpha=0.35,
                    edgecolor=_GROUP_COLORS[code],
                    facecolor=_GROUP_COLORS[code],
                    label=f"{GROUP_NAMES[code]} (n={int(mask.sum())})",
                )
            ax.grid(alpha=0.3)
        summary = angle_summary(record, groups)
        overlaps = ", ".join(
            f"{GROUP_KEYS[c]} {summary[f'overlap_{GROUP_KEYS[c]}']:.2f}"
            for c in present
            if f"overlap_{GROUP_KEYS[c]}" in summary
        )
        heading = f"step {record.step}\noverlap with clean: {overlaps}" if overlaps else ""
        top.set_title(heading or f"step {record.step}", fontsize=9)
        bottom.set_xlabel("angle (degrees)")
    axes[0, 0].set_ylabel("density: angle to labelled centre")
    axes[1, 0].set_ylabel("density: angle to closest other centre")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[0, 0].set_xlim(lo, hi)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


_CENTER_LINES = (
    ("drift_deg_mean", "drift since previous probe"),
    ("center_to_clean_mean_deg", "centre to clean mean"),
    ("center_to_noisy_pull_deg", "pull towards noisy samples"),
)


def plot_center_drift(steps: Sequence[int], stats: Sequence[dict[str, float]], path: Path) -> None:
    """Centre drift, centre-to-clean-mean angle and noisy pull (degrees) against the step."""
    plt = pyplot()

    if len(steps) != len(stats):
        raise ValueError(f"{len(steps)} steps but {len(stats)} stat dicts")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label in _CENTER_LINES:
        values = np.array([s.get(key, np.nan) for s in stats], dtype=np.float64)
        if np.isfinite(values).any():
            ax.plot(steps, values, marker="o", label=label)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set(xlabel="step", ylabel="degrees", title="Class centres")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


class AngleProbe:
    """A fixed probe subset, measured at several training steps and saved at the end.

    ``images`` are ``N x H x W x 3`` uint8 RGB (resized once to ``input_size`` when given and
    different), converted per batch with :func:`to_tensor_normalized`. ``labels`` are the training
    labels, ``groups`` the :func:`probe_groups` codes, ``true_labels`` the true classes (-1 where
    unknown; default: the labels) and ``indices`` the samples' positions in the training set.

    Only the probed classes' centres are kept between stages (for the drift), and of each stage
    only its cosines and summary, not its embeddings.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray,
        *,
        true_labels: np.ndarray | None = None,
        indices: np.ndarray | None = None,
        input_size: int | None = None,
        batch_size: int = 256,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be N x H x W x 3 uint8, got {images.dtype} {images.shape}"
            )
        n = len(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.groups = np.asarray(groups, dtype=np.int64)
        self.true_labels = self.labels if true_labels is None else np.asarray(true_labels, np.int64)
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        for name in ("labels", "groups", "true_labels", "indices"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one entry per image ({n})")
        if input_size is not None and images.shape[1:3] != (input_size, input_size):
            images = np.stack([resize_to(image, input_size) for image in images])
        self.images = images
        self.batch_size = batch_size
        # Centre statistics use the probed classes only, renumbered 0..K-1.
        self._classes, self._local_labels = np.unique(self.labels, return_inverse=True)
        self._previous_weight: np.ndarray | None = None
        self.records: list[ProbeRecord] = []
        self.summaries: list[dict[str, float]] = []

    def __len__(self) -> int:
        return len(self.images)

    def record(
        self,
        step: int,
        embed: Callable[[Tensor], Tensor],
        cosine_fn: Callable[[Tensor], Tensor],
        weight: np.ndarray,
        *,
        k: int = 1,
    ) -> dict[str, float]:
        """Probe at ``step``; keep the result and return its flat summary, keys prefixed ``probe_``.

        ``weight`` holds the class centres: C x d, or with ``k`` sub-centers per class C*K x d
        (class-major). A class's centre for :func:`center_stats` is then its dominant sub-center,
        the one most of its probe samples are nearest to (ties: the lowest), as in sub-center
        cleaning; the other sub-centers are where noisy samples collect.
        """
        parts = [
            probe_cosines(
                embed,
                cosine_fn,
                to_tensor_normalized(self.images[start : start + self.batch_size]),
                self.labels[start : start + self.batch_size],
                true_labels=self.true_labels[start : start + self.batch_size],
                batch_size=self.batch_size,
            )
            for start in range(0, len(self), self.batch_size)
        ]
        record = ProbeRecord(
            step=int(step),
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(ProbeRecord)
                if f.name != "step"
            },
        )
        weight = np.asarray(weight, dtype=np.float32)
        if k > 1:
            subs = weight.reshape(-1, k, weight.shape[1])[self._classes]  # probed classes
            own = subs[self._local_labels]  # n x K x d
            own = own / np.maximum(np.linalg.norm(own, axis=2, keepdims=True), 1e-12)
            nearest = np.einsum("nkd,nd->nk", own, record.embeddings).argmax(1)
            votes = np.bincount(self._local_labels * k + nearest, minlength=len(subs) * k)
            dominant = votes.reshape(-1, k).argmax(1)
            centres = subs[np.arange(len(subs)), dominant]
        else:
            centres = np.array(weight[self._classes], dtype=np.float32)
        summary = angle_summary(record, self.groups)
        summary.update(
            center_stats(centres, record, self._local_labels, self.groups, self._previous_weight)
        )
        self._previous_weight = centres
        self.records.append(dataclasses.replace(record, embeddings=None))
        self.summaries.append(summary)
        return {f"probe_{k}": v for k, v in summary.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues the probe's history.

        Arrays are stored as tensors and numbers as Python floats, so the checkpoint loads with
        ``torch.load(weights_only=True)``.
        """
        return {
            "records": [
                {k: _to_tensor(v) for k, v in dataclasses.asdict(r).items()} for r in self.records
            ],
            "summaries": [{k: float(v) for k, v in s.items()} for s in self.summaries],
            "previous_weight": _to_tensor(self._previous_weight),
            "indices": _to_tensor(self.indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the probe must hold the same samples."""
        if not np.array_equal(_to_numpy(state["indices"]), self.indices):
            raise ValueError("the checkpoint's probe holds other samples than this run's")
        self.records = [
            ProbeRecord(**{k: _to_numpy(v) for k, v in r.items()}) for r in state["records"]
        ]
        self.summaries = list(state["summaries"])
        self._previous_weight = _to_numpy(state["previous_weight"])

    def save(self, out_dir: Path, *, max_plot_stages: int = 4) -> dict[str, Any]:
        """Write the analysis directory of run directory ``out_dir`` (paths:
        :class:`robustface.utils.run.RunDir`): the arrays (``angles_file``), the angle plot (at
        most ``max_plot_stages`` stages, evenly spaced in steps: :func:`stages_by_step`), the
        centre drift plot and the summary (group sizes and every stage's summary with its step).
        Returns the last stage's."""
        if not self.records:
            raise RuntimeError("no stage recorded yet")
        max_plot_stages = check_int("max_plot_stages", max_plot_stages, 1)
        run = RunDir(out_dir)
        run.analysis_dir.mkdir(parents=True, exist_ok=True)
        arrays = {
            "step": np.array([r.step for r in self.records], dtype=np.int64),
            "cos_label": np.stack([r.cos_label for r in self.records]),
            "max_neg": np.stack([r.max_neg for r in self.records]),
            "neg_class": np.stack([r.neg_class for r in self.records]),
            "cos_true": np.stack([r.cos_true for r in self.records]),
            "groups": self.groups,
            "labels": self.labels,
            "true_labels": self.true_labels,
            "indices": self.indices,
        }
        with atomic_path(run.angles_file) as tmp, tmp.open("wb") as fh:
            np.savez_compressed(fh, **arrays)
        steps = [r.step for r in self.records]
        shown = stages_by_step(steps, max_plot_stages)
        plot_angle_distributions(
            [self.records[int(i)] for i in shown], self.groups, run.angles_plot
        )
        plot_center_drift(steps, self.summaries, run.center_drift_plot)
        groups = {GROUP_NAMES[c]: int((self.groups == c).sum()) for c in range(len(GROUP_NAMES))}
        stages = [{"step": step, **s} for step, s in zip(steps, self.summaries, strict=True)]
        payload = {"groups": groups, "stages": stages}
        write_text_atomic(run.analysis_summary, json.dumps(payload, indent=2) + "\n")
        return stages[-1]


def plot_run_angles(runs: Mapping[str, Path], path: Path, title: str = "") -> None:
    """One column per run: its training loss (top; each run on its own axis, as the losses of
    different heads are not on one scale) and the angle to the labelled class centre of its clean
    and noisy training samples at its last probe (bottom, the run's ``angles_file``; one angle axis
    fitted to every run's data)."""
    plt = pyplot()

    fig, axes = plt.subplots(2, len(runs), figsize=(5.0 * len(runs), 7.6), squeeze=False)
    probes: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for name, run in runs.items():
        if RunDir(run).angles_file.is_file():
            with np.load(RunDir(run).angles_file) as data:
                angles = np.degrees(np.arccos(np.clip(data["cos_label"][-1], -1, 1)))
                probes[name] = (angles, data["groups"], int(data["step"][-1]))
    bins = np.linspace(*angle_axis_range([a for a, _, _ in probes.values()]), 61)
    for col, (name, run) in enumerate(runs.items()):
        ax_loss, ax = axes[0, col], axes[1, col]
        rows = RunDir(run).metrics()
        ax_loss.plot([r["step"] for r in rows if "loss" in r],
                     [r["loss"] for r in rows if "loss" in r], color=f"C{col}")  # fmt: skip
        ax_loss.set(xlabel="step", ylabel=f"{name} training loss", title=name)
        ax_loss.grid(alpha=0.3)
        if name not in probes:
            ax.text(0.5, 0.5, f"{name}: no angle probe\n(train.probe_every = 0)", ha="center",
                    va="center", transform=ax.transAxes)  # fmt: skip
            ax.set_axis_off()
            continue
        angles, groups, step = probes[name]
        for code, label in ((0, "clean"), (1, "closed-set noise"), (2, "open-set noise")):
            mask = groups == code
            if mask.any():
                ax.hist(angles[mask], bins=bins, density=True, histtype="step", linewidth=1.6,
                        label=f"{label} ({int(mask.sum())})")  # fmt: skip
        ax.set(xlabel="angle to the labelled class centre (degrees)", ylabel="density",
               title=f"{name}, step {step}", xlim=(bins[0], bins[-1]))  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
