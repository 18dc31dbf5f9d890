"""Per-sample scores and flags of a training set, from a model trained on it.

Scores (one row per sample, :class:`Scores`), from the backbone's embeddings and the classifier's
class centres (the FC weight rows; with K sub-centres per class, the class's dominant sub-centre
as in :mod:`robustface.clean.subcenter`):

- ``angle_own``: angle (degrees) to the labelled class's centre;
- ``angle_other`` / ``other_class``: the nearest other class centre (the best of its sub-centres)
  and its angle; ``margin = angle_other - angle_own`` (negative: nearer another class);
- ``knn_purity``: share of the ``knn`` nearest other samples (cosine, faiss) with the same label;
  ``knn_label`` / ``knn_share``: their most common label and its share;
- ``norm``: the embedding's norm before normalising (low for poor images, as MagFace/AdaFace);
- ``crfiqa``: CR-FIQA's relative classifiability ``cos_own / (cos_other + 1 + 1e-9)`` (Boutros et
  al. 2023), here read off the trained classifier instead of a learned regressor (deviation);
- ``stroke``: ``log10`` of the variance of the grey image's Laplacian: line drawings, pencil
  sketches and cartoons have hard strokes that photographs (even sharp ones) do not;
- ``tones``: entropy (bits) of the grey-level histogram: drawings have few tones (paper and
  strokes, flat fills), photographs a continuous range;
- ``colour``: ``log(1 + M)`` with M the colourfulness of Hasler and Suesstrunk (2003): textures,
  painted shapes and cartoons are far more colourful, blank walls far less, than skin;
- ``skin``: share of the central half of the crop whose chroma is skin-like (the YCrCb box
  133 <= Cr <= 173, 77 <= Cb <= 127 of Chai and Ngan 1999): an aligned face has skin there.

Flags (:data:`FLAGS`, one per sample, :func:`flag_samples`) use thresholds read off the score
distributions alone (:func:`choose_thresholds`: the crossing of a two-component Gaussian mixture
fitted to a score when it finds a separate tail, or a robust outlier bound), never the truth.
Identity level:
:func:`merge_candidates` (class pairs whose mean embeddings are outliers of closeness) and
:func:`split_candidates` (classes whose samples form two distant modes).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from robustface.clean.subcenter import _unit_rows, dominant_subcenter, subcenter_assignments
from robustface.errors import DataFormatError
from robustface.utils.guards import check_choice, check_int, check_real
from robustface.utils.io import atomic_directory, atomic_path, check_output_dir, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.table import markdown_table

__all__ = [
    "FLAGS",
    "IMAGE_STATS",
    "REMOVED",
    "THRESHOLD_NAMES",
    "Flags",
    "ScoreResult",
    "Scores",
    "StageTimer",
    "Thresholds",
    "choose_thresholds",
    "compute_scores",
    "far_tail",
    "flag_samples",
    "flags_csv",
    "gmm_crossing",
    "image_stats",
    "knn_settings",
    "merge_candidates",
    "read_flags_csv",
    "score_to_dir",
    "score_training_set",
    "split_candidates",
    "threshold_problems",
]

FLAGS = ("clean", "hard", "mislabeled", "open_set", "low_quality", "nonface", "sketch")
"""Sample flags, in code order; ``clean`` and ``hard`` are kept, the others removed."""
REMOVED = frozenset(FLAGS[2:])
_CHUNK = 4096
_MERGE_CHUNK = 1024  # class means per block of the C x C cosines
KNN_METHODS = ("auto", "flat", "ivf", "hnsw")
"""kNN methods of the purity score: ``auto`` is ``flat`` below :data:`AUTO_FLAT_MAX` samples,
else ``ivf``; the others are :func:`robustface.cluster.knn.build_knn`'s."""
AUTO_FLAT_MAX = 200_000
_KNN_PARAMS = {  # build_knn's integer parameters that apply to each method
    "flat": ("batch_size", "shard_size"),
    "ivf": ("batch_size", "shard_size", "nlist", "nprobe"),
    "hnsw": ("batch_size", "shard_size", "hnsw_m", "ef_search"),
}
KNN_PARAMS = ("batch_size", "shard_size", "nlist", "nprobe", "hnsw_m", "ef_search")


IMAGE_STATS = ("stroke", "tones", "colour", "skin")
"""The columns of :func:`image_stats` (see the module docstring)."""


def image_stats(image: np.ndarray) -> np.ndarray:
    """:data:`IMAGE_STATS` of one HxWx3 uint8 RGB image: ``[stroke, tones, colour, skin]``."""
    image = np.ascontiguousarray(image)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    stroke = math.log10(float(cv2.Laplacian(grey, cv2.CV_64F).var()) + 1.0)
    share = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel() / grey.size
    share = share[share > 0]
    tones = float(-(share * np.log2(share)).sum())
    rgb = image.astype(np.float32)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    (m_rg,), (s_rg,) = (v.ravel() for v in cv2.meanStdDev(rg))
    (m_yb,), (s_yb,) = (v.ravel() for v in cv2.meanStdDev(yb))
    colourful = math.hypot(s_rg, s_yb) + 0.3 * math.hypot(m_rg, m_yb)
    h, w = grey.shape
    centre = np.ascontiguousarray(image[h // 4 : h - h // 4, w // 4 : w - w // 4])
    ycrcb = cv2.cvtColor(centre, cv2.COLOR_RGB2YCrCb)
    skin = cv2.countNonZero(cv2.inRange(ycrcb, (0, 133, 77), (255, 173, 127))) / max(
        centre.shape[0] * centre.shape[1], 1
    )
    return np.array([stroke, tones, math.log1p(colourful), skin], dtype=np.float32)


@dataclasses.dataclass
class Scores:
    """Per-sample scores (see the module docstring); every array has one row per sample."""

    label: np.ndarray
    angle_own: np.ndarray
    angle_other: np.ndarray
    other_class: np.ndarray
    knn_purity: np.ndarray
    knn_label: np.ndarray
    knn_share: np.ndarray
    norm: np.ndarray
    crfiqa: np.ndarray
    stroke: np.ndarray
    tones: np.ndarray | None = None
    colour: np.ndarray | None = None
    skin: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("tones", "colour", "skin"):  # not measured: NaN, which no rule flags
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self), np.nan, dtype=np.float32))

    @property
    def margin(self) -> np.ndarray:
        """``angle_other - angle_own`` in degrees (negative: nearer another class's centre)."""
        return self.angle_other - self.angle_own

    @property
    def angle_any(self) -> np.ndarray:
        """Angle to the nearest class centre of any class."""
        return np.minimum(self.angle_own, self.angle_other)

    def __len__(self) -> int:
        return int(self.label.size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns by name, with ``margin``."""
        out = dataclasses.asdict(self)
        out["margin"] = self.margin
        return out


class StageTimer:
    """Wall and CPU seconds of each named stage of a scoring pass (``with timer("name"): ...``),
    in ``stages``. CPU time is this process's and its finished children's (the loader workers),
    so that a pause or a busy machine shows as wall time without CPU time."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def start(self) -> Any:
        """What :meth:`stop` needs to measure a stage that starts now."""
        return time.perf_counter(), sum(os.times()[:4])

    def stop(self, started: Any) -> dict[str, float]:
        """The measures of the stage begun at ``started``."""
        wall, cpu = started
        return {"seconds": round(time.perf_counter() - wall, 2),
                "cpu_seconds": round(sum(os.times()[:4]) - cpu, 2)}  # fmt: skip

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = self.start()
        yield
        self.stages[name] = self.stop(started)

    def table(self) -> str:
        """The stages as a Markdown table."""
        keys = list(next(iter(self.stages.values()), {}))
        rows = [[name, *(v[k] for k in keys)] for name, v in self.stages.items()]
        return markdown_table(["stage", *keys], rows)


def knn_settings(
    num_samples: int, method: str = "auto", params: dict[str, int] | None = None
) -> tuple[str, dict[str, int]]:
    """The kNN method for ``num_samples`` samples and its :func:`~robustface.cluster.knn.build_knn`
    keyword arguments.

    ``method``: one of :data:`KNN_METHODS` (``auto``: ``flat``, exact, below
    :data:`AUTO_FLAT_MAX` samples, else ``ivf`` with build_knn's defaults, nlist
    ``min(4096, 8 sqrt N)`` and nprobe ``min(128, nlist)``). ``params``: integers >= 1 among
    :data:`KNN_PARAMS`; one that does not apply to an explicitly named method is an error, with
    ``auto`` those that do not apply to the method chosen are dropped.
    """
    check_choice("knn_method", method, KNN_METHODS)
    checked = {}
    for name, value in (params or {}).items():
        if name not in KNN_PARAMS:
            raise ValueError(f"knn_params: unknown parameter {name!r}; use {', '.join(KNN_PARAMS)}")
        checked[name] = check_int(f"knn_params.{name}", value, 1)
    chosen = method if method != "auto" else "flat" if num_samples < AUTO_FLAT_MAX else "ivf"
    wrong = [name for name in checked if name not in _KNN_PARAMS[chosen]]
    if wrong and method != "auto":
        raise ValueError(
            f"knn_params.{wrong[0]} does not apply to knn_method {method!r} "
            f"(it takes {', '.join(_KNN_PARAMS[chosen])})"
        )
    return chosen, {name: v for name, v in checked.items() if name not in wrong}


def _knn_votes(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int,
    progress: bool,
    method: str = "auto",
    params: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kNN label purity, majority label and its share over the ``k`` nearest other samples by
    cosine (faiss normalises ``embeddings`` a batch at a time; ``method`` / ``params`` as
    :func:`knn_settings`). Neighbours an approximate index did not find count as votes for no
    label."""
    from robustface.cluster.knn import build_knn

    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return np.ones(n), labels.copy(), np.ones(n)
    method, options = knn_settings(n, method, params)
    graph = build_knn(embeddings, k + 1, method, show_progress=progress, **options)
    nbrs = graph.nbrs
    # drop each sample itself (first unless an exact duplicate ties with it)
    is_self = nbrs == np.arange(n)[:, None]
    has_self = is_self.any(axis=1)
    drop = np.where(has_self, is_self.argmax(axis=1), k)
    keep = np.ones_like(nbrs, dtype=bool)
    keep[np.arange(n), drop] = False
    others = nbrs[keep].reshape(n, k)
    nbr_labels = np.where(others >= 0, labels[others], -1)
    purity = (nbr_labels == labels[:, None]).mean(axis=1)
    # majority label per row: sort each row, count runs
    srt = np.sort(nbr_labels, axis=1)
    starts = np.ones_like(srt, dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run_id = np.cumsum(starts, axis=1) - 1
    counts = np.zeros_like(srt)
    np.add.at(counts, (np.repeat(np.arange(n), k), run_id.ravel()), 1)
    counts[:, 0] *= srt[:, 0] >= 0  # missing neighbours (-1, sorted first) elect no label
    best_run = counts.argmax(axis=1)
    first_of_run = np.argmax(run_id == best_run[:, None], axis=1)
    major = srt[np.arange(n), first_of_run]
    share = counts[np.arange(n), best_run] / k
    return purity, major.astype(np.int64), share


def _centre_cosines(
    emb: np.ndarray, labels: np.ndarray, weight: np.ndarray, k: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cos_own, cos_other, other_class)`` of ``emb`` against the class centres (the own
    class's dominant sub-centre; the nearest other class's best sub-centre), computed
    ``_CHUNK`` rows at a time on unit-norm copies of the rows: no full-size copy of ``emb``."""
    num_classes = weight.shape[0] // k
    if num_classes < 2:
        raise ValueError(f"scoring needs at least 2 classes, the classifier has {num_classes}")
    if labels.shape != (len(emb),):
        raise ValueError(f"labels must be ({len(emb)},), got shape {labels.shape}")
    centres = _unit_rows(weight)
    n = len(labels)
    nearest, cosine = np.empty(n, np.int64), np.empty((n, k), np.float32)
    cos_other, other = np.empty(n, np.float32), np.empty(n, np.int64)
    chunks = range(0, n, _CHUNK)
    for start in tqdm(chunks, desc="centre angles", unit="chunk", disable=not progress):
        rows = slice(start, start + _CHUNK)
        x = _unit_rows(emb[rows])
        nearest[rows], cosine[rows] = subcenter_assignments(x, labels[rows], weight, k)
        sims = x @ centres.T  # (B x C*K)
        sims = sims.reshape(len(sims), num_classes, k).max(axis=2)
        sims[np.arange(len(sims)), labels[rows]] = -np.inf
        other[rows] = sims.argmax(axis=1)
        cos_other[rows] = sims[np.arange(len(sims)), other[rows]]
    dominant = dominant_subcenter(nearest, labels, num_classes, k)
    cos_own = np.take_along_axis(cosine, dominant[labels][:, None], axis=1)[:, 0]
    return cos_own, np.clip(cos_other, -1.0, 1.0), other


def compute_scores(
    embeddings: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    k: int = 1,
    *,
    norms: np.ndarray | None = None,
    stroke: np.ndarray | None = None,
    knn: int = 10,
    knn_method: str = "auto",
    knn_params: dict[str, int] | None = None,
    progress: bool = False,
    image: np.ndarray | None = None,
    timer: StageTimer | None = None,
) -> Scores:
    """The scores of ``embeddings`` (N x d) labelled ``labels`` against the class centres
    ``weight`` (C*K x d, class-major as :class:`~robustface.fc.full.SubCenterFC`; K = 1 for a
    plain FC). ``norms`` and ``stroke`` (N,) come from the embedding pass (NaN when absent);
    ``image`` (N x 4), the :data:`IMAGE_STATS` columns, sets ``stroke``, ``tones``, ``colour``
    and ``skin``.
    ``knn_method`` / ``knn_params``: the kNN index of the purity score (:func:`knn_settings`;
    ``auto`` is exact below 200K samples, faiss IVF above).
    Memory: ``O(chunk * C * K)`` for the nearest other centre, the kNN graph ``O(N * knn)`` and
    the kNN index; rows are normalised a chunk at a time, so float32 ``embeddings`` are never
    copied whole (a million rows of 512 floats are 2 GiB). ``timer`` records the two stages
    (``centre angles``, ``kNN``)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    k = check_int("k (sub-centers per class)", k, 1)
    knn = check_int("knn", knn, 1)
    knn_settings(len(labels), knn_method, knn_params)  # bad options fail before the long work
    timer = timer or StageTimer()
    with timer("centre angles"):
        cos_own, cos_other, other = _centre_cosines(emb, labels, w, k, progress)
    with timer("kNN"):
        purity, major, share = _knn_votes(emb, labels, knn, progress, knn_method, knn_params)
    n = len(labels)
    nan = np.full(n, np.nan, dtype=np.float32)
    stats = {}
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        if image.shape != (n, len(IMAGE_STATS)):
            raise ValueError(
                f"image statistics: shape {image.shape}, want ({n}, {len(IMAGE_STATS)})"
            )
        stats = dict(zip(IMAGE_STATS, image.T, strict=True))
        stroke = stats["stroke"]
    return Scores(
        label=labels,
        angle_own=np.degrees(np.arccos(cos_own)).astype(np.float32),
        angle_other=np.degrees(np.arccos(cos_other)).astype(np.float32),
        other_class=other,
        knn_purity=purity.astype(np.float32),
        knn_label=major,
        knn_share=share.astype(np.float32),
        norm=nan if norms is None else np.asarray(norms, dtype=np.float32),
        crfiqa=(cos_own / (cos_other + 1.0 + 1e-9)).astype(np.float32),
        stroke=nan if stroke is None else np.asarray(stroke, dtype=np.float32),
        tones=stats.get("tones"),
        colour=stats.get("colour"),
        skin=stats.get("skin"),
    )


def gmm_crossing(
    values: np.ndarray,
    *,
    seed: int = 0,
    min_weight: float = 0.005,
    max_upper: float = 0.5,
    edge: float = 2.5,
    min_separation: float = 2.0,
) -> float | None:
    """Where a two-component 1-D Gaussian mixture fitted to ``values`` changes its most likely
    component between the two means (the threshold between a bulk and its tail).

    None when the mixture does not separate a bulk from a tail: fewer than 20 finite values, a
    component holding under ``min_weight`` of the values, an upper component holding more than
    ``max_upper`` (noise is the minority), means closer than the larger spread, components that
    overlap (Ashman's D, ``sqrt(2) |m1 - m2| / sqrt(s1^2 + s2^2)``, below ``min_separation``: a
    skewed bulk, not a bulk and a tail), or a Bayesian information criterion no better (by 10)
    than one Gaussian's. A crossing inside the lower
    component's ``mean + edge * sd`` is raised to it (on a nearly clean set the mixture splits
    the bulk itself).
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 20 or np.ptp(x) == 0:
        return None
    gmm = GaussianMixture(2, random_state=seed, n_init=2).fit(x[:, None])
    one = GaussianMixture(1, random_state=seed).fit(x[:, None])
    means = gmm.means_[:, 0]
    sds = np.sqrt(gmm.covariances_.reshape(2))
    if gmm.weights_.min() < min_weight or abs(means[0] - means[1]) < max(sds):
        return None
    if math.sqrt(2) * abs(means[0] - means[1]) / math.hypot(*sds) < min_separation:
        return None
    if gmm.weights_[int(np.argmax(means))] > max_upper:
        return None
    if gmm.bic(x[:, None]) > one.bic(x[:, None]) - 10:
        return None
    lo, hi = np.sort(means)
    grid = np.linspace(lo, hi, 2001)
    post = gmm.predict_proba(grid[:, None])[:, int(np.argmax(means))]
    above = np.flatnonzero(post >= 0.5)
    if not above.size:
        return None
    # a mixture also splits a skewed bulk that has no tail: never cut inside the bulk's edge
    bulk = int(np.argmin(means))
    return float(max(grid[above[0]], means[bulk] + edge * sds[bulk]))


def far_tail(
    values: np.ndarray,
    group: np.ndarray,
    *,
    mads: float = 2.0,
    excess: float = 0.06,
    z: float = 3.0,
) -> bool:
    """Whether the samples in ``group`` hold an upper tail of ``values`` that the others lack.

    The bound is the others' ``median + mads * MAD`` (:func:`_robust_bound`); the group's share
    beyond it must exceed the others' share by at least ``excess`` (a share of the group), with
    a one-sided two-proportion z statistic of at least ``z`` (a small group's excess may be
    chance). Shares beyond a robust bound, not a mixture's fit: a scoring model trained with
    another seed moves them by little, where the mixture's BIC gain crossed its cut-off. False
    when either side has fewer than 20 finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    inside = np.asarray(group, dtype=bool)
    g, rest = inside & np.isfinite(x), ~inside & np.isfinite(x)
    n1, n0 = int(g.sum()), int(rest.sum())
    if min(n1, n0) < 20:
        return False
    bound = _robust_bound(x[rest], mads, True)
    p1, p0 = float((x[g] > bound).mean()), float((x[rest] > bound).mean())
    pooled = (p1 * n1 + p0 * n0) / (n1 + n0)
    if pooled in (0.0, 1.0):
        return False
    stat = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    return bool(p1 - p0 >= excess and stat >= z)


def _robust_bound(values: np.ndarray, z: float, upper: bool) -> float:
    """``median +- z * 1.4826 * MAD`` of the finite ``values``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med))) or float(np.std(x)) or 1.0
    return med + z * mad if upper else med - z * mad


@dataclasses.dataclass
class Thresholds:
    """The decision thresholds of :func:`flag_samples` (degrees for angles; None: never flag).

    ``angle_own``: above, a sample does not belong to its label's centre; ``angle_hard``: above it
    (and below ``angle_own``) a kept sample is "hard"; ``angle_member``: a typical member's angle
    to its centre: an off-centre sample this near another class's centre is a mislabel;
    ``angle_any``: above, a sample is
    far from every class centre (a non-face); ``norm_low``: below, an off-centre face is low
    quality; ``norm_floor``: below, any face is low quality; ``stroke``: above, a sample is a
    sketch; ``stroke_soft``: above, an off-centre sample is a sketch; ``stroke_tones``: above,
    a sample with fewer grey tones than ``tones_low`` is a sketch; ``knn_share``: the least
    share of neighbours that must carry another label to call a sample mislabeled by its kNN;
    ``skin_low``: below, a sample has
    no skin where an aligned face has it, and is a non-face when also farther than
    ``angle_any_soft`` from every centre or its ``colour`` is outside
    [``colour_low``, ``colour_high``].
    """

    angle_own: float
    angle_hard: float
    angle_member: float
    angle_any: float | None = None
    norm_low: float | None = None
    norm_floor: float | None = None
    stroke: float | None = None
    stroke_soft: float | None = None
    knn_share: float = 0.5
    source: dict[str, str] = dataclasses.field(default_factory=dict)
    angle_any_soft: float | None = None
    stroke_tones: float | None = None
    tones_low: float | None = None
    skin_low: float | None = None
    colour_low: float | None = None
    colour_high: float | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the first threshold out of range."""
        problems = threshold_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError(problems[0])

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly values."""
        return dataclasses.asdict(self)


THRESHOLD_NAMES = tuple(f.name for f in dataclasses.fields(Thresholds) if f.name != "source")
"""The names of the :class:`Thresholds` values (what ``--threshold`` and a loop config's
``thresholds`` may set)."""
_ANGLES = ("angle_own", "angle_hard", "angle_member", "angle_any", "angle_any_soft")
_SHARES = {"knn_share": "(0, 1]", "skin_low": "[0, 1]"}


def threshold_problems(values: dict[str, Any]) -> list[str]:
    """One line per :class:`Thresholds` value out of range in ``values`` (absent or None ones
    are skipped; other keys are ignored): angles in [0, 180] degrees, ``knn_share`` in (0, 1],
    ``skin_low`` in [0, 1], the rest >= 0; ``angle_hard`` / ``angle_member`` <= ``angle_own``,
    ``colour_low`` <= ``colour_high``. Shared by :meth:`Thresholds.check` and the loop's config."""
    problems, ok = [], {}
    for key, value in values.items():
        if key not in THRESHOLD_NAMES or value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            problems.append(f"thresholds.{key}: must be a number >= 0, got {value!r}")
        elif key in _ANGLES and value > 180:
            problems.append(f"thresholds.{key}: an angle in [0, 180] degrees, got {value}")
        elif key in _SHARES and (value > 1 or (key == "knn_share" and value == 0)):
            problems.append(f"thresholds.{key}: a share in {_SHARES[key]}, got {value}")
        else:
            ok[key] = value
    for low, high in (("angle_hard", "angle_own"), ("angle_member", "angle_own"),
                      ("colour_low", "colour_high")):  # fmt: skip
        if low in ok and high in ok and ok[low] > ok[high]:
            problems.append(
                f"thresholds.{low} ({ok[low]:g}) must be <= thresholds.{high} ({ok[high]:g})"
            )
    return problems


def choose_thresholds(scores: Scores, overrides: dict[str, float] | None = None) -> Thresholds:
    """Thresholds read off the score distributions (never the truth), then ``overrides``.

    ``angle_own``: the crossing of a 2-component mixture on the angles to the own centre (else the
    robust bound median + 3 MAD); ``angle_hard`` / ``angle_member``: median + 2 MAD / + 1 MAD of
    the angles below ``angle_own`` (the members), capped at ``angle_own``; ``angle_any``: median
    + 3 MAD of the angle to the nearest centre of any class, ``angle_any_soft`` + 1.5 MAD;
    ``skin_low``: median - 2 MAD of the skin share; ``colour_low`` / ``colour_high``: median
    -+ 3 MAD of the colourfulness; ``angle_any_soft``, ``colour_low`` and ``colour_high`` only
    when the samples below ``skin_low`` have a far tail of angles to the nearest centre that the
    others lack (:func:`far_tail`; else None: the no-skin rules would only cut the bulk);
    ``tones_low``: median - 1 MAD of the tones; ``norm_low`` /
    ``norm_floor``: the mixture crossing on log norms of the members, and their robust lower
    bound (median - 3 MAD); ``stroke`` / ``stroke_soft``: the mixture crossing on the stroke
    energy if it separates a mode above the bulk, else median + 2.5 MAD, and median + 1.5 MAD.
    A statistic that was not measured (all NaN) gets no threshold, and its rule never fires.
    """
    source: dict[str, str] = {}
    own = gmm_crossing(scores.angle_own)
    if own is None:
        own, source["angle_own"] = _robust_bound(scores.angle_own, 3, True), "median+3MAD"
    else:
        source["angle_own"] = "gmm"
    members = scores.angle_own[scores.angle_own <= own]
    hard = min(_robust_bound(members, 2, True), own)
    member = min(_robust_bound(members, 1, True), own)
    source["angle_hard"] = "median+2MAD of members"
    source["angle_member"] = "median+1MAD of members"
    # non-faces are too rare for a mixture: the robust outlier bound
    any_, source["angle_any"] = _robust_bound(scores.angle_any, 3, True), "median+3MAD"
    image: dict[str, float | None] = {}
    for name, bound, z, upper in (
        ("skin", "skin_low", 2, False),
        ("colour", "colour_low", 3, False),
        ("colour", "colour_high", 3, True),
        ("tones", "tones_low", 1, False),
    ):
        values = getattr(scores, name)
        image[bound] = None
        if np.isfinite(values).any():
            # all four statistics are >= 0 (a share, bits, a log1p): so are their bounds
            image[bound] = max(0.0, _robust_bound(values, z, upper))
            source[bound] = f"median{'+' if upper else '-'}{z}MAD"
    # the no-skin rules only when the no-skin samples hold a tail far from every centre that
    # the skin samples lack (non-faces are there); without non-faces they would cut the bulk
    any_soft = None
    if image["skin_low"] is not None:
        if far_tail(scores.angle_any, scores.skin < image["skin_low"]):
            any_soft = _robust_bound(scores.angle_any, 1.5, True)
            source["angle_any_soft"] = "median+1.5MAD (no-skin samples have a far tail)"
        else:
            image["colour_low"] = image["colour_high"] = None
            for name in ("angle_any_soft", "colour_low", "colour_high"):
                source[name] = "none: no tail among the no-skin samples"
    stroke_tones = None
    if np.isfinite(scores.stroke).any():
        stroke_tones, source["stroke_tones"] = _robust_bound(scores.stroke, 1, True), "median+1MAD"
    norm_low = norm_floor = None
    if np.isfinite(scores.norm).any():
        fit = np.log(np.maximum(scores.norm[scores.angle_own < own], 1e-12))
        crossing = gmm_crossing(fit)
        if crossing is not None and crossing < float(np.median(fit)):
            norm_low, source["norm_low"] = float(np.exp(crossing)), "gmm"
        norm_floor = float(np.exp(_robust_bound(fit, 3, False)))
        source["norm_floor"] = "median-3MAD"
    stroke = stroke_soft = None
    if np.isfinite(scores.stroke).any():
        crossing = gmm_crossing(scores.stroke)
        if crossing is not None and crossing > float(np.median(scores.stroke)):
            stroke, source["stroke"] = crossing, "gmm"
        else:
            stroke, source["stroke"] = _robust_bound(scores.stroke, 2.5, True), "median+2.5MAD"
        stroke_soft, source["stroke_soft"] = (
            _robust_bound(scores.stroke, 1.5, True),
            "median+1.5MAD",
        )
    values: dict[str, Any] = {
        "angle_own": float(own),
        "angle_hard": float(hard),
        "angle_member": float(member),
        "angle_any": any_,
        "norm_low": norm_low,
        "norm_floor": norm_floor,
        "stroke": stroke,
        "stroke_soft": stroke_soft,
        "angle_any_soft": any_soft,
        "stroke_tones": stroke_tones,
        **image,
    }
    valid = [*values, "knn_share"]
    for key, value in (overrides or {}).items():
        if key not in valid:
            raise ValueError(f"unknown threshold {key!r}: use one of {', '.join(valid)}")
        values[key] = value
        source[key] = "given"
    thresholds = Thresholds(**values, source=source)
    thresholds.check()
    return thresholds


@dataclasses.dataclass
class Flags:
    """One flag per sample (index into :data:`FLAGS`), its reason, and the suggested class of a
    mislabel (-1 elsewhere)."""

    flag: np.ndarray
    reason: list[str]
    suggested: np.ndarray

    def names(self) -> np.ndarray:
        """The flags as strings."""
        return np.asarray(FLAGS)[self.flag]

    @property
    def removed(self) -> np.ndarray:
        """Samples whose flag removes them."""
        return self.flag >= FLAGS.index("mislabeled")

    def counts(self) -> dict[str, int]:
        """Samples per flag."""
        values = np.bincount(self.flag, minlength=len(FLAGS)).tolist()
        return dict(zip(FLAGS, values, strict=True))


def flag_samples(scores: Scores, t: Thresholds) -> Flags:
    """One flag per sample, the first rule that applies (``off``: ``angle_own > t.angle_own``):

    1. ``sketch``: stroke energy above ``t.stroke``, or off and above ``t.stroke_soft``, or
       above ``t.stroke_tones`` with fewer grey tones than ``t.tones_low`` (strong strokes, few
       tones: a drawing);
    2. ``nonface``: farther than ``t.angle_any`` from every class centre, or no skin in the
       face's place (skin share below ``t.skin_low``) and either farther than
       ``t.angle_any_soft`` from every centre or a colourfulness outside
       [``t.colour_low``, ``t.colour_high``];
    3. off: ``mislabeled`` when its kNN majority is another label (share >= ``t.knn_share``)
       whose centre is also its nearest other centre, or when within ``t.angle_member`` of another
       class's centre (suggested class: that class); else ``low_quality`` when the norm is below
       ``t.norm_low``; else ``open_set``;
    4. ``low_quality``: a norm below ``t.norm_floor``;
    5. ``hard`` (kept): ``angle_own > t.angle_hard``; 6. ``clean``.
    """
    t.check()
    n = len(scores)
    code = {name: i for i, name in enumerate(FLAGS)}
    flag = np.full(n, code["clean"], dtype=np.int8)
    reason = np.full(n, "near its own centre", dtype=object)
    suggested = np.full(n, -1, dtype=np.int64)
    done = np.zeros(n, dtype=bool)

    def assign(mask: np.ndarray, name: str, why: str, suggest: np.ndarray | None = None) -> None:
        mask = mask & ~done
        flag[mask] = code[name]
        reason[mask] = why
        if suggest is not None:
            suggested[mask] = suggest[mask]
        done[mask] = True

    off = scores.angle_own > t.angle_own
    norm = np.nan_to_num(scores.norm, nan=np.inf)
    if t.stroke is not None:
        assign(scores.stroke > t.stroke, "sketch", f"stroke > {t.stroke:.3g}")
    if t.stroke_soft is not None:
        assign(off & (scores.stroke > t.stroke_soft), "sketch", f"off centre, stroke > "
               f"{t.stroke_soft:.3g}")  # fmt: skip
    if t.stroke_tones is not None and t.tones_low is not None:
        assign((scores.stroke > t.stroke_tones) & (scores.tones < t.tones_low), "sketch",
               f"stroke > {t.stroke_tones:.3g}, tones < {t.tones_low:.3g}")  # fmt: skip
    if t.angle_any is not None:
        assign(scores.angle_any > t.angle_any, "nonface", f"every centre > {t.angle_any:.1f} deg")
    if t.skin_low is not None:
        no_skin = scores.skin < t.skin_low
        if t.angle_any_soft is not None:
            why = f"skin < {t.skin_low:.2f}, every centre > {t.angle_any_soft:.1f} deg"
            assign(no_skin & (scores.angle_any > t.angle_any_soft), "nonface", why)
        lo = -np.inf if t.colour_low is None else t.colour_low
        hi = np.inf if t.colour_high is None else t.colour_high
        assign(no_skin & ((scores.colour < lo) | (scores.colour > hi)), "nonface",
               f"skin < {t.skin_low:.2f}, colour outside [{lo:.2f}, {hi:.2f}]")  # fmt: skip
    knn_other = (scores.knn_label != scores.label) & (scores.knn_share >= t.knn_share)
    knn_other &= scores.knn_label == scores.other_class
    assign(off & knn_other, "mislabeled", "neighbours carry the nearest other label",
           scores.other_class)  # fmt: skip
    near_other = scores.angle_other <= t.angle_member
    assign(off & near_other, "mislabeled", "as near another class as its members",
           scores.other_class)  # fmt: skip
    if t.norm_low is not None:
        assign(off & (norm < t.norm_low), "low_quality", f"off centre, norm < {t.norm_low:.3g}")
    assign(off, "open_set", f"own centre > {t.angle_own:.1f} deg, no class near")
    if t.norm_floor is not None:
        assign(norm < t.norm_floor, "low_quality", f"norm < {t.norm_floor:.3g}")
    assign(scores.angle_own > t.angle_hard, "hard", f"own centre > {t.angle_hard:.1f} deg (kept)")
    return Flags(flag, reason.tolist(), suggested)


def _rows(labels: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The row indices to use: all rows, or those of a boolean mask / index array ``rows``."""
    if rows is None:
        return np.arange(len(labels))
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != labels.shape:
            raise ValueError(f"rows: a mask must be {labels.shape}, got shape {rows.shape}")
        return np.flatnonzero(rows)
    return rows.astype(np.int64, copy=False)


def class_means(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Unit mean embedding of each class (zero rows for empty classes), over ``rows`` (a boolean
    mask or row indices; default all), summed ``_CHUNK`` rows at a time: no full-size copy."""
    embeddings, rows = np.asarray(embeddings), _rows(labels, rows)
    sums = np.zeros((num_classes, embeddings.shape[1]), dtype=np.float64)
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        np.add.at(sums, labels[chunk], embeddings[chunk].astype(np.float64))
    return _unit_rows(sums).astype(np.float32)


def merge_candidates(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    rows: np.ndarray | None = None,
    min_cos: float | None = None,
    z: float = 4.0,
    progress: bool = False,
) -> tuple[list[tuple[int, int, float]], float]:
    """Class pairs to merge (one person under two labels): ``[(a, b, cos)]`` with ``a < b``, and
    the cosine threshold used.

    Each class's mean embedding (over ``rows``, as :func:`class_means`) is compared with its
    nearest other class mean; a pair is a candidate if that cosine is above ``min_cos`` (default:
    the robust outlier bound median + ``z`` MAD of the nearest-mean cosines of all classes, at
    least 0.5). The C x C cosines are computed ``_MERGE_CHUNK`` classes at a time (85K classes
    would take 29 GB at once).
    """
    means = class_means(embeddings, labels, num_classes, rows)
    nearest = np.empty(num_classes, dtype=np.int64)
    best = np.empty(num_classes, dtype=np.float32)
    chunks = range(0, num_classes, _MERGE_CHUNK)
    for start in tqdm(chunks, desc="merge candidates", unit="chunk", disable=not progress):
        sims = means[start : start + _MERGE_CHUNK] @ means.T
        own = np.arange(len(sims))
        sims[own, start + own] = -np.inf
        nearest[start : start + len(sims)] = sims.argmax(axis=1)
        best[start : start + len(sims)] = sims[own, nearest[start : start + len(sims)]]
    if min_cos is None:
        min_cos = min(1.0, max(0.5, _robust_bound(best[np.isfinite(best)], z, True)))
    min_cos = check_real("merge min_cos", min_cos, -1, 1)
    pairs = {
        (min(a, int(b)), max(a, int(b))): float(best[a])
        for a, b in enumerate(nearest)
        if best[a] > min_cos
    }
    return [(a, b, c) for (a, b), c in sorted(pairs.items())], float(min_cos)


def split_candidates(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    rows: np.ndarray | None = None,
    min_angle: float = 60.0,
    min_share: float = 0.3,
    seed: int = 0,
    progress: bool = False,
) -> list[tuple[int, float, float]]:
    """Classes with two dense modes: ``[(class, angle between the modes, minor share)]``.

    Per class with at least 6 samples among ``rows`` (a boolean mask or row indices; default
    all), 2-means (cosine) on its embeddings; a candidate when the two mode centres are more than
    ``min_angle`` degrees apart and the smaller holds at least ``min_share`` of the class (so that
    a few outliers do not make a split). Reads one class's rows at a time.
    """
    check_real("split min_angle", min_angle, 0, 180)
    check_real("split min_share", min_share, 0, 0.5)
    rng = np.random.default_rng(seed)
    embeddings, rows = np.asarray(embeddings), _rows(labels, rows)
    out = []
    order = rows[np.argsort(labels[rows], kind="stable")]
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    for c in tqdm(range(num_classes), desc="split candidates", unit="class", disable=not progress):
        x = np.asarray(embeddings[order[bounds[c] : bounds[c + 1]]], np.float32)
        if len(x) < 6:
            continue
        centres = x[rng.choice(len(x), 2, replace=False)]
        for _ in range(10):
            assign = (x @ centres.T).argmax(axis=1)
            if assign.min() == assign.max():
                break
            centres = _unit_rows(np.stack([x[assign == j].mean(axis=0) for j in (0, 1)]))
        share = min(assign.mean(), 1 - assign.mean())
        angle = float(np.degrees(np.arccos(np.clip(centres[0] @ centres[1], -1, 1))))
        if share >= min_share and angle > min_angle:
            out.append((c, angle, float(share)))
    return out


def scores_path(directory: Path) -> Path:
    """Where a scoring pass keeps its raw arrays."""
    return directory / "scores.npz"


_CSV_COLUMNS = (
    "angle_own", "angle_other", "other_class", "margin", "knn_purity", "knn_label", "knn_share",
    "norm", "crfiqa", "stroke", "tones", "colour", "skin",
)  # fmt: skip


def flags_csv(scores: Scores, flags: Flags, progress: bool = False) -> str:
    """The per-sample flags file: index, label, flag, reason, suggested class, then the scores
    (``progress``: a bar over the rows, about a minute per million)."""
    arrays = scores.arrays()
    columns = [arrays[c] for c in _CSV_COLUMNS]
    names = flags.names()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "label", "flag", "reason", "suggested", *_CSV_COLUMNS])
    for i in tqdm(range(len(scores)), desc="flags.csv", unit="row", disable=not progress):
        values = [
            f"{col[i]:.4f}" if np.issubdtype(col.dtype, np.floating) else int(col[i])
            for col in columns
        ]
        writer.writerow(
            [i, int(scores.label[i]), names[i], flags.reason[i], int(flags.suggested[i]), *values]
        )
    return out.getvalue()


def read_flags_csv(path: str | Path, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flag codes, suggested classes)`` of a flags file; checked against the set's size."""
    path = Path(path)
    flag, suggested = [], []
    code = {name: i for i, name in enumerate(FLAGS)}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"index", "flag", "suggested"} <= set(reader.fieldnames):
            raise DataFormatError(path, "not a flags file (needs columns index, flag, suggested)")
        for row_number, row in enumerate(reader, 2):
            if row["flag"] not in code or row["index"] != str(row_number - 2):
                raise DataFormatError(
                    path, f"line {row_number}: index {row['index']!r} flag {row['flag']!r}"
                )
            flag.append(code[row["flag"]])
            suggested.append(int(row["suggested"]))
    if len(flag) != num_samples:
        raise DataFormatError(path, f"has {len(flag)} rows but the set has {num_samples} images")
    return np.asarray(flag, np.int8), np.asarray(suggested, np.int64)


@dataclasses.dataclass
class ScoreResult:
    """What :func:`score_training_set` computed (and wrote when given a directory)."""

    scores: Scores
    thresholds: Thresholds
    flags: Flags
    merges: list[tuple[int, int, float]]
    merge_min_cos: float
    splits: list[tuple[int, float, float]]
    embeddings: np.ndarray
    images_per_second: float
    stages: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def plot_angles_by_flag(path: Path, scores: Scores, flags: Flags, t: Thresholds) -> None:
    """Histogram of the angle to the own centre, kept vs removed, with the thresholds."""
    plt = pyplot()
    bins = np.linspace(0.0, 180.0, 91)
    fig, ax = plt.subplots(figsize=(7, 4))
    removed = flags.removed
    ax.hist([scores.angle_own[~removed], scores.angle_own[removed]], bins=bins, stacked=True,
            label=["kept", "removed"], color=["tab:blue", "tab:red"])  # fmt: skip
    ax.axvline(t.angle_own, color="black", linestyle="--", label=f"own {t.angle_own:.1f} deg")
    ax.axvline(t.angle_hard, color="grey", linestyle=":", label=f"hard {t.angle_hard:.1f} deg")
    ax.set(xlabel="angle to the labelled class centre (degrees)", ylabel="samples")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def score_training_set(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    thresholds: dict[str, float] | None = None,
    knn: int = 10,
    knn_method: str = "auto",
    knn_params: dict[str, int] | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    timer: StageTimer | None = None,
) -> ScoreResult:
    """Score and flag every sample of ``data`` (default: the run's training ``.rec``) with the
    backbone and class centres of the run's last checkpoint, streamed over the ``.rec``
    (``knn_method`` / ``knn_params``: :func:`knn_settings`). Each stage (embedding, centre
    angles, kNN, thresholds, flags, merge and split candidates) is timed by ``timer`` (default:
    a :class:`StageTimer`) into ``ScoreResult.stages``."""
    from robustface.clean.subcenter import embed_images, run_training_set

    run, dataset = run_training_set(run_dir, data)
    knn_settings(len(dataset), knn_method, knn_params)  # bad options fail before the long work
    backbone = run.backbone(device)
    input_size = int(backbone.meta.input_size)
    timer = timer or StageTimer()
    started = time.perf_counter()
    with timer("embedding (decode, forward, image statistics)"):
        embedded = embed_images(
            backbone,
            dataset,
            input_size=input_size,
            image_stats=image_stats,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )
    rate = len(dataset) / max(time.perf_counter() - started, 1e-9)
    labels = dataset.labels
    scores = compute_scores(
        embedded.embeddings,
        labels,
        run.weight.numpy(),
        run.k,
        norms=embedded.norms,
        knn=knn,
        knn_method=knn_method,
        knn_params=knn_params,
        progress=progress,
        image=embedded.stats,
        timer=timer,
    )
    with timer("thresholds"):
        chosen = choose_thresholds(scores, thresholds)
    with timer("flags"):
        flags = flag_samples(scores, chosen)
    kept = ~flags.removed
    emb, classes = embedded.embeddings, run.num_classes
    with timer("merge candidates"):
        merges, min_cos = merge_candidates(emb, labels, classes, rows=kept, progress=progress)
    with timer("split candidates"):
        splits = split_candidates(emb, labels, classes, rows=kept, progress=progress)
    return ScoreResult(scores, chosen, flags, merges, min_cos, splits, emb, rate, timer.stages)


SCORE_JSON = "score.json"
FLAGS_CSV = "flags.csv"


def write_score_outputs(
    result: ScoreResult, directory: Path, extra: dict[str, Any], progress: bool = False
) -> dict:
    """Write a scoring pass into ``directory`` (which exists): ``flags.csv``, ``scores.npz``,
    ``angles.png`` and ``score.json`` (thresholds, counts, merges, splits, ``extra``); returns the
    JSON summary (``progress``: a bar over the flags.csv rows)."""
    write_text_atomic(directory / FLAGS_CSV, flags_csv(result.scores, result.flags, progress))
    with atomic_path(directory / "scores.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, flag=result.flags.flag, suggested=result.flags.suggested,
                 **result.scores.arrays())  # fmt: skip
    plot_angles_by_flag(directory / "angles.png", result.scores, result.flags, result.thresholds)
    summary = {
        **extra,
        "samples": len(result.scores),
        "images_per_second": round(result.images_per_second, 1),
        "stages": result.stages,
        "thresholds": result.thresholds.as_dict(),
        "flags": result.flags.counts(),
        "removed": int(result.flags.removed.sum()),
        "merge_min_cos": result.merge_min_cos,
        "merges": [list(m) for m in result.merges],
        "splits": [list(s) for s in result.splits],
    }
    write_text_atomic(directory / SCORE_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def flags_table(counts: dict[str, int]) -> str:
    """Samples per flag as a Markdown table."""
    total = max(sum(counts.values()), 1)
    rows = [[name, counts[name], f"{100 * counts[name] / total:.2f}",
             "removed" if name in REMOVED else "kept"] for name in FLAGS]  # fmt: skip
    return markdown_table(["flag", "samples", "%", "action"], rows)


def score_to_dir(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    thresholds: dict[str, float] | None = None,
    knn: int = 10,
    knn_method: str = "auto",
    knn_params: dict[str, int] | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    timer: StageTimer | None = None,
) -> dict[str, Any]:
    """:func:`score_training_set` written to ``out_dir`` (built as ``OUT.partial``, renamed when
    complete). When the data has a truth list beside it (a dirty SynthFace set), the flags are
    also scored against it (``evaluation.json`` / ``.md``) *after* they were chosen. ``timer``
    (:func:`score_training_set`'s) also times the ``outputs`` stage (written, and not in
    ``score.json``, last)."""
    from robustface.clean.dirty import truth_for
    from robustface.clean.evaluate import evaluate_flags, evaluation_table
    from robustface.clean.subcenter import default_data
    from robustface.data.recordio import RecordIODataset
    from robustface.utils.run import RunDir

    out = Path(out_dir)
    data_path = (
        Path(data) if data is not None else default_data(RunDir(run_dir).config(), Path(run_dir))
    )
    dataset = RecordIODataset(data_path)
    check_output_dir(out, overwrite=overwrite, marker=SCORE_JSON, inputs=[dataset.rec_path.parent])
    result = score_training_set(
        run_dir,
        data=data_path,
        thresholds=thresholds,
        knn=knn,
        knn_method=knn_method,
        knn_params=knn_params,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        timer=timer,
    )
    method, options = knn_settings(len(dataset), knn_method, knn_params)
    extra: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": str(dataset.rec_path),
        "knn": {"k": knn, "method": method, "params": options},
    }
    # the truth is read only now, after every threshold and flag was chosen
    truth = truth_for(dataset.rec_path.parent, len(dataset))
    with (timer or StageTimer())("outputs"), atomic_directory(out) as partial:
        if truth is not None:
            evaluation = evaluate_flags(result.flags.flag, result.flags.suggested, truth,
                                        result.merges)  # fmt: skip
            write_text_atomic(partial / "evaluation.json", json.dumps(evaluation, indent=2) + "\n")
            write_text_atomic(partial / "evaluation.md", evaluation_table(evaluation) + "\n")
            extra["evaluation"] = evaluation
        summary = write_score_outputs(result, partial, extra, progress)
    return summary
