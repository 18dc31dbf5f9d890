"""IJB-B / IJB-C evaluation: 1:1 template verification and 1:N open-set identification.

The protocol follows insightface's IJB evaluation (``recognition/arcface_torch/eval_ijbc.py``) on
its helper layout (see :mod:`robustface.data.ijb`):

1. Every image in ``loose_crop/`` is aligned from its 5 landmarks to the ArcFace template by a
   least-squares similarity transform (:mod:`robustface.deploy.align`), at the model's input size
   (112 px for the published models).
2. The crop and its horizontal flip are embedded. The cache keeps both raw embeddings,
   ``(N, 2, d)``; the image feature is their sum (insightface concatenates ``[e, e_flip]`` into
   ``2d`` columns and adds the two halves). Without flip only ``e`` is embedded (``V = 1``).
3. Each image is weighted by its faceness score (insightface's default, ``faceness=False`` turns
   it off) and the template feature is built by an aggregator from :data:`AGGREGATORS`: media
   pooling, then template pooling, then L2 normalisation. ``mean`` and ``norm_weighted`` pool the
   per-image terms of the fusion aggregators of the same names (:mod:`robustface.fuse.baselines`).
4. A pair's score is the cosine of its two template features; TAR at FAR comes from the ROC
   (:mod:`robustface.evaluate.roc`, reading ``"closest"`` or ``"conservative"``). A FAR below
   ``1 / impostor pairs`` is not measurable: its TAR is null in the JSON's ``tar_at_far`` and
   ``n/m`` in the table; ``tar_at_far_insightface`` holds insightface's number for every FAR
   (deviation from insightface, which prints a number at every FAR; ``far_reading="insightface"``
   puts it in the table, marked ``*``).
5. With the 1:N meta files (``{name}_1N_gallery_*.csv`` and ``{name}_1N_probe_mixed.csv``, CSV
   with a header and ``TEMPLATE_ID,SUBJECT_ID,...`` columns, one row per image) each gallery is
   searched with every probe template: see :func:`identification`. An FPIR below ``1 / non-mated
   probes`` is not measurable, as a FAR in step 4: ``tpir_at_fpir`` null, ``n/m`` in the table,
   ``tpir_at_fpir_insightface`` the number read at every FPIR (at FPIR 0 below the limit).
   ``operating_points`` (1:1 and 1:N) gives the point read for every target, marked
   ``"measurable": false`` where it is not a measurement of the target.

insightface's defaults (flip summed, faceness weighting, raw norms kept) are ``flip=True,
faceness=True, aggregation="norm_weighted"``.

**Fusion aggregators** (:data:`robustface.fuse.AGGREGATORS` names that are not template poolers
here, i.e. ``caface``) replace steps 2-3 by :func:`fused_template_features`: every template's
images are fused at once by the aggregator's ``fuse``, media ignored, as CAFace's official IJB
evaluation does (``mk-minchul/caface``). Their defaults are upstream's: no flip and no faceness
(``flip=None``/``faceness=None`` in :class:`IJBSettings` pick them). With ``flip=True`` the
mirror of every image is one more frame of the set (2 frames per image; the raw features are not
summed, since CAFace reads each frame's norm); faceness cannot be used (CAFace takes no
per-image weights). Aggregators with ``needs_styles`` get their styles from the same forward pass
(:func:`robustface.fuse.styles.embed_with_styles`), cached beside the embeddings under a key that
includes the style blocks. ``caface`` needs ``fusion_model``, a CAFace checkpoint (read
weights-only by :func:`robustface.fuse.caface.load_caface_checkpoint`), whose style channels and
512-d features must match the backbone's; ``fusion_chunk_size`` fuses a template in chunks with
CAFace's memory instead of at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm import tqdm

from robustface.data.ijb import IJBMeta
from robustface.data.image import decode_image
from robustface.deploy.align import ARCFACE_TEMPLATE, TEMPLATE_RULES, align_face
from robustface.errors import DataFormatError
from robustface.evaluate.report import model_fingerprint, to_jsonable, write_evaluation
from robustface.evaluate.roc import (
    FAR_MODES,
    FARS,
    Roc,
    check_far_reading,
    far_measurable,
    unmeasurable_cell,
    unmeasurable_note,
)
from robustface.evaluate.verification import embed_views, pixel_views
from robustface.fuse.base import AGGREGATORS as FUSION_AGGREGATORS
from robustface.fuse.base import Aggregator as FusionAggregator
from robustface.fuse.baselines import LinearAggregator, MeanAggregator, NormWeightedAggregator
from robustface.fuse.build import (
    build_aggregator,
    check_fusion_options,
    check_fusion_shapes,
)
from robustface.fuse.styles import embed_with_styles, style_block_names
from robustface.utils.guards import check_choice, check_int
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.registry import Registry, UnknownNameError
from robustface.utils.sparse import torch_csr
from robustface.utils.table import markdown_table

__all__ = [
    "AGGREGATORS",
    "FPIRS",
    "RANKS",
    "Aggregator",
    "IJB1NMeta",
    "IJBEmbeddings",
    "IJBScores",
    "IJBSettings",
    "TemplateGroups",
    "build_fusion",
    "checkpoint_key",
    "embed_ijb",
    "embed_ijb_images",
    "embed_ijb_images_with_styles",
    "fuse_views",
    "fused_template_features",
    "group_templates",
    "identification",
    "is_fusion_aggregation",
    "read_ijb_1n_meta",
    "score_ijb",
    "score_pairs",
    "template_features",
    "write_ijb_report",
]

RANKS = (1, 5, 10)
"""Ranks of the 1:N identification rates."""
FPIRS = (0.01, 0.1)
"""False positive identification rates at which TPIR is read."""
CACHE_FORMAT = 1
SCORE_DTYPES = ("float32", "float64")
_ROW_CHUNK = 1 << 16
_DENSE_SPAN = 16
"""Template ids spanning at most this many times their count (plus 65,536) are looked up in a
dense id-to-row table; sparser ids by binary search."""
_GATHER_COST = 64
"""One pair scored by gathering two rows costs about as much as this many dot products done as a
matrix product (measured on a 2-core x86 CPU); :func:`score_pairs` picks the cheaper per block."""


# ---- templates and aggregation ------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateGroups:
    """Which template and which media every image belongs to, as dense indices.

    A media group is one media *within one template* (insightface pools media per template).
    """

    template_ids: np.ndarray  # (T,) int64, sorted
    image_template: np.ndarray  # (N,) int64 in [0, T)
    image_media: np.ndarray  # (N,) int64 in [0, M)
    media_template: np.ndarray  # (M,) int64 in [0, T)
    media_counts: np.ndarray  # (M,) int64, images per media group


def group_templates(templates: np.ndarray, medias: np.ndarray) -> TemplateGroups:
    """Group images by template id and, within a template, by media id (vectorised)."""
    templates = np.asarray(templates)
    medias = np.asarray(medias)
    if templates.ndim != 1 or templates.shape != medias.shape or templates.size == 0:
        raise ValueError(
            f"templates and medias must be equal-length non-empty 1-D arrays, got "
            f"{templates.shape} and {medias.shape}"
        )
    template_ids, image_template = np.unique(templates, return_inverse=True)
    media_ids, media_index = np.unique(medias, return_inverse=True)
    key = image_template.astype(np.int64) * media_ids.size + media_index
    keys, image_media, counts = np.unique(key, return_inverse=True, return_counts=True)
    return TemplateGroups(
        template_ids=template_ids.astype(np.int64),
        image_template=image_template.astype(np.int64).ravel(),
        image_media=image_media.astype(np.int64).ravel(),
        media_template=keys // media_ids.size,
        media_counts=counts.astype(np.int64),
    )


Aggregator = Callable[[np.ndarray, np.ndarray, TemplateGroups], np.ndarray]
"""``aggregator(features, weights, groups) -> (T, d)`` template features (normalised afterwards).

``features`` is ``(N, d)`` float32, the raw image features (image + flip embeddings summed);
``weights`` ``(N,)`` float32 per-image weights (faceness scores, or ones); ``groups`` says which
media and template each image belongs to. Row ``t`` of the result belongs to
``groups.template_ids[t]``; the caller L2-normalises it. Register new ones (e.g. CAFace) with
``@AGGREGATORS.register("name")``.
"""

AGGREGATORS: Registry[Aggregator] = Registry("template aggregator")


def _media_template_pool(
    features: np.ndarray, weights: np.ndarray, groups: TemplateGroups, fusion: LinearAggregator
) -> np.ndarray:
    """``fusion``'s per-image terms, weighted, averaged per media, media summed per template.

    Template ``t`` is ``sum_i w_i / |media(i)| * terms(x_i)`` over its images ``i``: one sparse
    ``(templates x images)`` product with those coefficients (a torch CSR tensor, all cores), done
    for blocks of templates holding about ``_ROW_CHUNK`` images, so only one block's terms exist
    at a time. Images already grouped by template (the usual order) are read without a copy.
    """
    d = features.shape[1]
    n_templates = groups.template_ids.size
    coef = np.asarray(weights, np.float64) / groups.media_counts[groups.image_media]
    order = np.argsort(groups.image_template, kind="stable")
    in_order = bool(np.all(order == np.arange(order.size)))
    starts = np.zeros(n_templates + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups.image_template, minlength=n_templates), out=starts[1:])
    pooled = torch.empty((n_templates, d), dtype=torch.float32)
    lo = 0
    while lo < n_templates:
        hi = max(lo + 1, int(np.searchsorted(starts, starts[lo] + _ROW_CHUNK, "right")) - 1)
        first, stop = int(starts[lo]), int(starts[hi])
        images = slice(first, stop) if in_order else order[first:stop]
        x = torch.from_numpy(np.asarray(features[images], dtype=np.float32))
        block = sp.csr_matrix(
            (
                coef[order[first:stop]].astype(np.float32),
                np.arange(stop - first, dtype=np.int64),
                starts[lo : hi + 1] - first,
            ),
            shape=(hi - lo, stop - first),
        )
        pooled[lo:hi] = torch_csr(block) @ fusion.terms(x)
        lo = hi
    return pooled.numpy()


@AGGREGATORS.register("mean")
def mean_aggregation(
    features: np.ndarray, weights: np.ndarray, groups: TemplateGroups
) -> np.ndarray:
    """Directions only: each image feature L2-normalised and weighted, averaged within a media,
    media summed (insightface with ``use_norm_score=False``; the ``mean`` fusion's terms)."""
    return _media_template_pool(features, weights, groups, MeanAggregator())


@AGGREGATORS.register("norm_weighted")
def norm_weighted_aggregation(
    features: np.ndarray, weights: np.ndarray, groups: TemplateGroups
) -> np.ndarray:
    """Each image's direction weighted by its feature norm (a quality proxy) and its weight, i.e.
    raw features averaged within a media, media summed (insightface's default; the
    ``norm_weighted`` fusion's terms)."""
    return _media_template_pool(features, weights, groups, NormWeightedAggregator())


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def template_features(
    features: np.ndarray,
    weights: np.ndarray,
    groups: TemplateGroups,
    aggregation: str = "norm_weighted",
) -> np.ndarray:
    """L2-normalised ``(T, d)`` float32 template features; row ``t`` is ``template_ids[t]``."""
    n = groups.image_template.size
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"features must be ({n}, d) for {n} images, got {features.shape}")
    if np.shape(weights) != (n,):
        raise ValueError(f"weights must have shape ({n},), got {np.shape(weights)}")
    pooled = np.asarray(AGGREGATORS.get(aggregation)(features, weights, groups), np.float32)
    expected = (groups.template_ids.size, features.shape[1])
    if pooled.shape != expected:
        raise ValueError(f"aggregator {aggregation!r} returned {pooled.shape}, expected {expected}")
    return _l2_normalize(pooled)


# ---- fusion aggregators (robustface.fuse): one set per template ----------------------------------


def is_fusion_aggregation(name: str) -> bool:
    """Whether ``name`` is fused per template by a :mod:`robustface.fuse` aggregator (``caface``)
    rather than pooled per media and template (the names of :data:`AGGREGATORS`, which win);
    an unknown name raises ``UnknownNameError`` listing both kinds."""
    if name in AGGREGATORS:
        return False
    if name in FUSION_AGGREGATORS:
        return True
    valid = sorted({*AGGREGATORS.names(), *FUSION_AGGREGATORS.names()})
    raise UnknownNameError(f"unknown template aggregator {name!r}; valid names: {', '.join(valid)}")


def build_fusion(settings: IJBSettings, *, unsafe_legacy_load: bool = False) -> FusionAggregator:
    """The fusion aggregator of ``settings`` (:func:`robustface.fuse.build.build_aggregator`:
    ``caface`` from its ``fusion_model`` checkpoint, chunked by ``fusion_chunk_size``)."""
    return build_aggregator(
        settings.aggregation,
        fusion_model=settings.fusion_model,
        chunk_size=settings.fusion_chunk_size,
        unsafe_legacy_load=unsafe_legacy_load,
    )


def fused_template_features(
    embeddings: np.ndarray,
    styles: np.ndarray | None,
    groups: TemplateGroups,
    fusion: FusionAggregator,
    *,
    source: str | Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """L2-normalised ``(T, d)`` float32 template features, row ``t`` = ``template_ids[t]``:
    ``fusion.fuse`` of all the template's images at once, media ignored. The ``V`` views of each
    image (``embeddings`` ``(N, V, d)`` raw, ``styles`` ``(N, V, C, 2)`` or None) are ``V``
    frames, in image order then view order. Bad rows (NaN, wrong width) raise ``ValueError``
    naming the template and ``source`` (the cache file)."""
    n, views, d = embeddings.shape
    if groups.image_template.size != n:
        raise ValueError(f"embeddings must have {groups.image_template.size} rows, got {n}")
    if fusion.needs_styles and (styles is None or styles.shape[:2] != (n, views)):
        got = None if styles is None else styles.shape
        raise ValueError(
            f"styles: the {fusion.name} aggregator needs ({n}, {views}, C, 2), got {got}"
        )
    order = np.argsort(groups.image_template, kind="stable")
    bounds = np.searchsorted(groups.image_template[order], np.arange(groups.template_ids.size + 1))
    out = np.empty((groups.template_ids.size, d), dtype=np.float32)
    ids = tqdm(groups.template_ids, desc="template fusion", disable=not show_progress)
    for t, template in enumerate(ids):
        rows = order[bounds[t] : bounds[t + 1]]
        x = np.asarray(embeddings[rows], dtype=np.float32).reshape(-1, d)
        s = None
        if fusion.needs_styles:
            assert styles is not None
            s = np.asarray(styles[rows], dtype=np.float32).reshape(-1, *styles.shape[2:])
        try:
            out[t] = fusion.fuse(x, s).float().numpy()
        except ValueError as exc:
            where = "" if source is None else f"{source}: "
            raise ValueError(f"{where}template {int(template)}: {exc}") from None
    return out  # fuse returns unit features


# ---- 1:1 scoring --------------------------------------------------------------------------------


def _dense_rows(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A dense id-to-row table over every id of the sorted ``ids`` and of ``wanted`` (-1 where an
    id is not in ``ids``) and its first id; ``None`` when the ids are not integers or span more
    than ``_DENSE_SPAN`` times their count (plus 65,536), where a binary search is used."""
    integer = np.issubdtype(ids.dtype, np.integer) and np.issubdtype(wanted.dtype, np.integer)
    if not (integer and ids.size and wanted.size):
        return None
    low = min(int(ids[0]), int(wanted.min()))
    span = max(int(ids[-1]), int(wanted.max())) - low + 1
    if span > _DENSE_SPAN * ids.size + (1 << 16):
        return None
    table = np.full(span, -1, dtype=np.int32)
    table[ids.astype(np.int64) - low] = np.arange(ids.size, dtype=np.int32)
    return table, low


def _rows_of(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row (int32) of every id of ``wanted`` in the sorted ``template_ids``; names the first
    missing one. Works in chunks of ``_ROW_CHUNK`` rows, so temporaries stay small."""
    wanted = np.asarray(wanted)
    rows = np.empty(wanted.shape, dtype=np.int32)
    flat_rows, flat_wanted = rows.reshape(len(wanted), -1), wanted.reshape(len(wanted), -1)
    template_ids = np.asarray(template_ids)
    dense = _dense_rows(template_ids, wanted)
    missing_rows = 0
    first_bad: tuple[int, int] | None = None
    for start in range(0, len(wanted), _ROW_CHUNK):
        part = flat_wanted[start : start + _ROW_CHUNK]
        if dense is not None:
            table, low = dense
            found = table.take(part - low if low else part)
            missing = found < 0
        else:
            found = np.minimum(np.searchsorted(template_ids, part), template_ids.size - 1)
            missing = template_ids[found] != part
        flat_rows[start : start + len(part)] = found
        if missing.any():
            bad = np.flatnonzero(missing.any(axis=1))
            missing_rows += bad.size
            if first_bad is None:
                row = int(bad[0])
                first_bad = (start + row, int(part[row][missing[row]][0]))
    if first_bad is not None:
        raise ValueError(
            f"{what}: row {first_bad[0]} names template {first_bad[1]}, which has no image in the "
            f"template list ({missing_rows} such rows)"
        )
    return rows


def score_pairs(
    template_feats: np.ndarray,
    template_ids: np.ndarray,
    pairs: np.ndarray,
    *,
    block_rows: int = 1024,
    dtype: str = "float32",
) -> np.ndarray:
    """Cosine score (dot product of the normalised features) of every template pair.

    ``dtype`` (``float32`` or ``float64``) is the precision of the features and scores: float32
    (the default) is twice as fast and agrees with float64 to about 1e-7, which can reorder
    near-ties at FAR 1e-6 on the full IJB-C; float64 reproduces insightface's numbers exactly.

    ``pairs`` is ``(P, 2)`` template ids, looked up in a dense id-to-row table. Each pair is
    scored as (lower row, higher row), the score being symmetric, and the pairs are bucketed by
    block of ``block_rows`` lower rows (a linear-time radix sort). A block is scored either as one
    matrix product against the templates from its first row on (the upper triangle of the Gram
    matrix), then read at the pairs' cells, or by gathering the two rows of each pair, whichever
    costs less; memory stays at one ``block_rows x T`` block (or ``65536 x d`` gathered rows)
    beyond the index arrays.
    """
    check_choice("dtype", dtype, SCORE_DTYPES)
    feats = np.ascontiguousarray(template_feats, dtype=dtype)
    template_ids = np.asarray(template_ids)
    pairs = np.asarray(pairs)
    if feats.ndim != 2 or template_ids.shape != (feats.shape[0],):
        raise ValueError(
            f"template_feats must be (T, d) with T = len(template_ids), got {feats.shape} "
            f"and {template_ids.shape}"
        )
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2), got {pairs.shape}")
    block_rows = check_int("block_rows", block_rows, 1)
    rows = _rows_of(template_ids, pairs, "pairs")
    # a score is symmetric: score the pair as (first, second) with first <= second
    first, second = np.minimum(rows[:, 0], rows[:, 1]), np.maximum(rows[:, 0], rows[:, 1])
    del rows
    n_templates = feats.shape[0]
    n_blocks = -(-n_templates // block_rows)
    block = first // block_rows
    # numpy sorts 8- and 16-bit keys stably by radix sort, linear in the pairs
    key = next((t for t in (np.uint8, np.uint16) if n_blocks <= np.iinfo(t).max + 1), np.int64)
    order = np.argsort(block.astype(key), kind="stable")
    bounds = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(block, minlength=n_blocks), out=bounds[1:])
    del block
    first, second = first.take(order), second.take(order)
    scores = np.empty(pairs.shape[0], dtype=dtype)
    table = torch.from_numpy(feats)
    for b, start in enumerate(range(0, n_templates, block_rows)):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        if lo == hi:
            continue
        stop, width = min(start + block_rows, n_templates), n_templates - start
        if (hi - lo) * _GATHER_COST >= (stop - start) * width:
            # the block's rows against the templates from `start` on (the upper triangle)
            gram = (table[start:stop] @ table[start:].T).numpy().ravel()
            cells = (first[lo:hi] - start).astype(np.int64) * width + (second[lo:hi] - start)
            scores[order[lo:hi]] = gram[cells]
            continue
        for s in range(lo, hi, _ROW_CHUNK):
            e = min(s + _ROW_CHUNK, hi)
            scores[order[s:e]] = np.einsum("ij,ij->i", feats[first[s:e]], feats[second[s:e]])
    return scores


# ---- 1:N identification -------------------------------------------------------------------------


def _floor_count(rate: float, total: int) -> int:
    """``floor(rate * total)`` robust to float error (``0.29 * 100`` is 28.999...)."""
    return math.floor(round(rate * total, 9))


def identification(
    gallery_feats: np.ndarray,
    gallery_ids: np.ndarray,
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    *,
    ranks: Sequence[int] = RANKS,
    fpirs: Sequence[float] = FPIRS,
    max_rank: int = 50,
    chunk: int = 4096,
) -> dict[str, Any]:
    """Open-set 1:N identification of probe templates against one gallery.

    Features are L2-normalised templates (score = dot product). A gallery subject's score is the
    best score over its templates. A probe is *mated* when its subject is in the gallery.

    * ``rank`` ``{k: rate}``: fraction of mated probes whose subject is among the ``k``
      best-scoring gallery subjects (rank = 1 + subjects with a strictly higher score); ``cmc`` the
      same for k = 1 .. ``min(max_rank, subjects)``.
    * ``tpir_at_fpir_insightface`` ``{x: rate}``: with threshold ``t`` the lowest that keeps FPIR
      (the fraction of non-mated probes whose best score is ``> t``) at most ``x``, the fraction
      of mated probes whose subject is at rank 1 with a score ``> t``. ``operating_points``
      ``{x: {"fpir", "threshold", "measurable"}}`` gives the FPIR reached and ``t``. Named for
      the ``far_reading="insightface"`` convention (a number at every target); insightface's own
      1:N script pools the galleries and reads FPIR otherwise.
    * ``tpir_at_fpir``: the same where FPIR ``x`` is measurable, ``x * nonmated_probes >= 1``
      (:func:`robustface.evaluate.roc.far_measurable`), else ``None``: below ``1 / nonmated_probes``
      (``min_measurable_fpir``) ``t`` is the best non-mated score, FPIR 0, which says nothing
      about a rate of ``x``.

    Every rate is ``None`` when there are no non-mated probes.
    """
    gallery_feats = np.ascontiguousarray(gallery_feats, dtype=np.float32)
    probe_feats = np.ascontiguousarray(probe_feats, dtype=np.float32)
    gallery_ids = np.asarray(gallery_ids)
    probe_ids = np.asarray(probe_ids)
    for name, feats, ids in (
        ("gallery", gallery_feats, gallery_ids),
        ("probe", probe_feats, probe_ids),
    ):
        if feats.ndim != 2 or ids.shape != (feats.shape[0],) or ids.size == 0:
            raise ValueError(
                f"{name}_feats must be (n, d) with n = len({name}_ids) > 0, got {feats.shape} "
                f"and {ids.shape}"
            )
    if gallery_feats.shape[1] != probe_feats.shape[1]:
        raise ValueError(
            f"gallery and probe features differ in width: {gallery_feats.shape[1]} and "
            f"{probe_feats.shape[1]}"
        )
    if any(k < 1 for k in ranks) or max_rank < 1:
        raise ValueError(f"ranks and max_rank must be >= 1, got {list(ranks)} and {max_rank}")
    if any(not 0.0 <= x <= 1.0 for x in fpirs):
        raise ValueError(f"fpirs must lie in [0, 1], got {list(fpirs)}")
    subjects, gallery_subject = np.unique(gallery_ids, return_inverse=True)
    n_sub = subjects.size
    probe_subject = np.minimum(np.searchsorted(subjects, probe_ids), n_sub - 1)
    mated = subjects[probe_subject] == probe_ids
    n_probe = probe_ids.size
    rank = np.zeros(n_probe, dtype=np.int64)
    mated_score = np.full(n_probe, -np.inf, dtype=np.float32)
    top_score = np.empty(n_probe, dtype=np.float32)
    gallery = torch.from_numpy(gallery_feats)
    scatter = torch.from_numpy(gallery_subject.astype(np.int64).ravel())
    for start in range(0, n_probe, chunk):
        stop = min(start + chunk, n_probe)
        sim = torch.from_numpy(probe_feats[start:stop]) @ gallery.T
        per_subject = torch.full((stop - start, n_sub), -torch.inf)
        per_subject.scatter_reduce_(1, scatter.expand(stop - start, -1), sim, reduce="amax")
        top_score[start:stop] = per_subject.max(dim=1).values.numpy()
        own = per_subject.gather(1, torch.from_numpy(probe_subject[start:stop])[:, None])
        rank[start:stop] = 1 + (per_subject > own).sum(dim=1).numpy()
        mated_score[start:stop] = own[:, 0].numpy()
    n_mated = int(mated.sum())
    if n_mated == 0:
        raise ValueError("no probe's subject is in the gallery: identification rates undefined")
    mated_rank = rank[mated]
    cmc = [float(np.mean(mated_rank <= k)) for k in range(1, min(max_rank, n_sub) + 1)]
    nonmated_top = np.sort(top_score[~mated])[::-1]
    n_non = nonmated_top.size
    hit_rank1 = mated_score[mated][mated_rank == 1]
    tpir: dict[float, float | None] = {}
    every: dict[float, float | None] = {}
    points: dict[float, dict[str, Any]] = {}
    for x in fpirs:
        if n_non == 0:
            tpir[x] = every[x] = None
            points[x] = {"fpir": None, "threshold": None, "measurable": False}
            continue
        k = _floor_count(x, n_non)
        t = -math.inf if k >= n_non else float(nonmated_top[k])
        measurable = far_measurable(x, n_non)
        every[x] = float(np.sum(hit_rank1 > t)) / n_mated
        tpir[x] = every[x] if measurable else None
        reached = float(np.sum(nonmated_top > t)) / n_non
        points[x] = {"fpir": reached, "threshold": t, "measurable": measurable}
    return {
        "gallery_templates": int(gallery_ids.size),
        "gallery_subjects": int(n_sub),
        "probes": int(n_probe),
        "mated_probes": n_mated,
        "nonmated_probes": int(n_non),
        "rank": {int(k): float(np.mean(mated_rank <= k)) for k in ranks},
        "cmc": cmc,
        "tpir_at_fpir": tpir,
        "tpir_at_fpir_insightface": every,
        "min_measurable_fpir": 1.0 / n_non if n_non else None,
        "operating_points": points,
    }


@dataclass
class IJB1NMeta:
    """The 1:N protocol: per gallery (``G1``, ``G2`` or ``S1``, ``S2``) and for the probes, the
    template ids and their subject ids (one entry per template)."""

    galleries: dict[str, tuple[np.ndarray, np.ndarray]]
    probe: tuple[np.ndarray, np.ndarray]


def _read_template_subjects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(templates, subjects)``, one per template, from an IJB 1:N CSV (one row per image)."""
    with path.open(encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    if [h.strip().upper() for h in header[:2]] != ["TEMPLATE_ID", "SUBJECT_ID"]:
        raise DataFormatError(
            path, f"expected a header starting TEMPLATE_ID,SUBJECT_ID, got {','.join(header)!r}"
        )
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1), dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataFormatError(path, f"expected integer TEMPLATE_ID,SUBJECT_ID: {exc}") from None
    if table.shape[0] == 0:
        raise DataFormatError(path, "no templates listed")
    templates, first, inverse = np.unique(table[:, 0], return_index=True, return_inverse=True)
    subjects = table[first, 1]
    clash = np.flatnonzero(subjects[inverse.ravel()] != table[:, 1])
    if clash.size:
        row = int(clash[0])
        raise DataFormatError(
            path,
            f"line {row + 2}: template {int(table[row, 0])} has subject {int(table[row, 1])}, "
            f"but subject {int(subjects[inverse.ravel()[row]])} on an earlier line",
        )
    return templates, subjects


def read_ijb_1n_meta(root: str | Path, name: str = "IJBC") -> IJB1NMeta | None:
    """The 1:N meta files under ``root/meta`` (``{name}_1N_gallery_*.csv`` and
    ``{name}_1N_probe_mixed.csv``, ``name`` lower-cased), or None when there is no gallery file."""
    meta = Path(root) / "meta"
    stem = name.lower()
    gallery_files = sorted(meta.glob(f"{stem}_1N_gallery_*.csv"))
    if not gallery_files:
        return None
    probe_file = meta / f"{stem}_1N_probe_mixed.csv"
    if not probe_file.is_file():
        raise FileNotFoundError(f"IJB 1:N probe file not found: {probe_file} (galleries exist)")
    prefix = f"{stem}_1N_gallery_"
    galleries = {p.stem[len(prefix) :]: _read_template_subjects(p) for p in gallery_files}
    return IJB1NMeta(galleries=galleries, probe=_read_template_subjects(probe_file))


# ---- embedding and its cache --------------------------------------------------------------------


def _read_aligned(path: Path, landmarks: np.ndarray, size: int, rule: str) -> np.ndarray:
    """Decode one IJB image and align it (runs in a decode thread; OpenCV releases the GIL)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IJB image not found: {path}") from None
    image = decode_image(data, path)
    try:
        return align_face(image, landmarks, size, rule)
    except ValueError as exc:
        raise DataFormatError(
            path, f"cannot align with landmarks {landmarks.tolist()}: {exc}"
        ) from exc


def _iter_embeddings(
    embed_batch: Callable[[np.ndarray], tuple[np.ndarray, ...]],
    meta: IJBMeta,
    *,
    size: int,
    rule: str,
    batch_size: int,
    workers: int,
    show_progress: bool,
) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
    """Yield ``(start, embed_batch(aligned uint8 crops))`` per batch; ``workers`` threads decode
    and align the next batch while this one runs."""
    paths = meta.image_paths()
    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode():

        def submit(start: int) -> list[Any]:
            stop = min(start + batch_size, len(paths))
            return [
                pool.submit(_read_aligned, paths[j], meta.landmarks[j], size, rule)
                for j in range(start, stop)
            ]

        pending = submit(0)
        for i, start in enumerate(tqdm(starts, desc="IJB embedding", disable=not show_progress)):
            crops = np.stack([f.result() for f in pending])
            if i + 1 < len(starts):
                pending = submit(starts[i + 1])
            yield start, embed_batch(crops)


def _collect(
    batches: Iterator[tuple[int, tuple[np.ndarray, ...]]],
    n: int,
    out_paths: Sequence[str | Path] | None,
) -> tuple[np.ndarray, ...]:
    """Stack the batches' arrays into ``n``-row arrays, in memory or, with ``out_paths`` (one
    per array), written there as ``.npy`` batch by batch (atomically) and returned
    memory-mapped, so memory stays at one batch."""
    first = next(batches)
    shapes = [(n, *a.shape[1:]) for a in first[1]]
    if out_paths is None:
        outs = [np.empty(shape, dtype=np.float32) for shape in shapes]
        for start, arrays in itertools.chain([first], batches):
            for out, a in zip(outs, arrays, strict=True):
                out[start : start + len(a)] = a
        return tuple(outs)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in out_paths]
        mms = [
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for tmp, shape in zip(tmps, shapes, strict=True)
        ]
        for start, arrays in itertools.chain([first], batches):
            for mm, a in zip(mms, arrays, strict=True):
                mm[start : start + len(a)] = a
        for mm in mms:
            mm.flush()
        del mms
    return tuple(np.load(p, mmap_mode="r") for p in out_paths)


def embed_ijb_images(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    meta: IJBMeta,
    *,
    size: int = 112,
    align_rule: str = "scale",
    batch_size: int = 128,
    flip: bool = True,
    device: str | torch.device = "cpu",
    workers: int = 4,
    show_progress: bool = False,
    out_path: str | Path | None = None,
) -> np.ndarray:
    """Raw embeddings ``(N, V, d)`` float32 of every IJB image (V = 2: image, flip; or 1).

    Images are aligned at ``size`` px (template placed by ``align_rule``, see
    :func:`robustface.deploy.align.arcface_template`) and normalised to ``(x / 255 - 0.5) / 0.5``
    RGB; ``workers`` threads decode and align. With ``out_path`` the array is written there as
    ``.npy`` batch by batch (atomically) and returned memory-mapped, so memory stays at one batch.
    """
    batch_size, workers = check_int("batch_size", batch_size, 1), check_int("workers", workers, 1)
    batches = _iter_embeddings(
        lambda crops: (embed_views(crops, embed_fn, flip=flip, device=device),),
        meta,
        size=size,
        rule=align_rule,
        batch_size=batch_size,
        workers=workers,
        show_progress=show_progress,
    )
    (out,) = _collect(batches, meta.images.size, None if out_path is None else [out_path])
    return out


def embed_ijb_images_with_styles(
    model: nn.Module,
    meta: IJBMeta,
    *,
    blocks: Sequence[str] | None = None,
    size: int = 112,
    align_rule: str = "scale",
    batch_size: int = 128,
    flip: bool = True,
    device: str | torch.device = "cpu",
    workers: int = 4,
    show_progress: bool = False,
    out_paths: tuple[str | Path, str | Path] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed_ijb_images` plus the CAFace styles of the same views from the same forward
    pass (:func:`robustface.fuse.styles.embed_with_styles`, ``blocks`` as there): ``(N, V, d)``
    and ``(N, V, C, 2)`` float32, written to ``out_paths`` (embeddings, styles) when given."""
    batch_size, workers = check_int("batch_size", batch_size, 1), check_int("workers", workers, 1)
    names = style_block_names(model, blocks)

    def embed_batch(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = [
            embed_with_styles(model, v, names, batch_size=v.shape[0], device=device)
            for v in pixel_views(crops, flip=flip, device=device)
        ]
        return (
            np.stack([f.numpy() for f, _ in views], axis=1),
            np.stack([st.numpy() for _, st in views], axis=1),
        )

    batches = _iter_embeddings(
        embed_batch,
        meta,
        size=size,
        rule=align_rule,
        batch_size=batch_size,
        workers=workers,
        show_progress=show_progress,
    )
    emb, styles = _collect(batches, meta.images.size, out_paths)
    return emb, styles


def _module_fingerprint(model: nn.Module) -> dict[str, Any]:
    """sha256 over the names, dtypes, shapes and bytes of a module's state_dict."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{t.dtype}:{tuple(value.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return {"module": type(model).__qualname__, "sha256": digest.hexdigest()}


def _meta_digest(meta: IJBMeta) -> str:
    digest = hashlib.sha256("\n".join(meta.images.tolist()).encode())
    digest.update(np.ascontiguousarray(meta.landmarks, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _open_cached(path: Path) -> np.ndarray:
    """The cached ``.npy`` at ``path`` memory-mapped, or a :class:`DataFormatError` naming it
    (a truncated or damaged file, e.g. of a full disk)."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(
            path, f"unreadable cache file ({e}); delete it and it will be recomputed"
        ) from None


def _load_or_embed(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    meta: IJBMeta,
    cache_dir: Path,
    key: dict[str, Any],
    style_blocks: list[str] | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray | None, Path, bool]:
    """``(embeddings, styles, cache file, reused)``: the cached ``.npy`` if its key matches ``key``.

    Each key (model, alignment, flip setting, image list; with ``style_blocks`` also the style
    blocks) has its own file, ``{name}_{sha256(key)[:16]}_embeddings.npy`` with the key beside it
    in ``.json`` (and the styles in ``..._styles.npy``), so caches of several models or settings
    live side by side in one directory. A key file that differs from ``key`` (a hash collision or
    an edited file) is refused, never overwritten; an ``.npy`` without its key file or its styles
    (an interrupted write) is redone. Without ``style_blocks`` styles is None.
    """
    if style_blocks is not None:
        key = {**key, "styles": {"blocks": list(style_blocks)}}
    key = json.loads(json.dumps(to_jsonable(key)))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{meta.name.lower()}_{digest}"
    npy, key_file = cache_dir / f"{stem}_embeddings.npy", cache_dir / f"{stem}_embeddings.json"
    styles_npy = None if style_blocks is None else cache_dir / f"{stem}_styles.npy"
    complete = styles_npy is None or styles_npy.is_file()
    if npy.is_file() and key_file.is_file() and complete:
        stored = json.loads(key_file.read_text(encoding="utf-8"))
        differ = sorted(k for k in key.keys() | stored.keys() if key.get(k) != stored.get(k))
        if differ:
            raise ValueError(
                f"{npy}: its key file {key_file.name} records other {', '.join(differ)} than "
                "this run's; delete both files or pass another cache directory (--cache)"
            )
        emb = _open_cached(npy)
        if emb.ndim != 3 or emb.shape[0] != meta.images.size:
            raise DataFormatError(npy, f"expected ({meta.images.size}, V, d), got {emb.shape}")
        styles = None
        if styles_npy is not None:
            styles = _open_cached(styles_npy)
            if styles.ndim != 4 or styles.shape[:2] != emb.shape[:2] or styles.shape[3] != 2:
                raise DataFormatError(
                    styles_npy,
                    f"expected ({emb.shape[0]}, {emb.shape[1]}, C, 2), got {styles.shape}",
                )
        return emb, styles, npy, True
    key_file.unlink(missing_ok=True)
    if styles_npy is None:
        emb, styles = embed_ijb_images(embed_fn, meta, out_path=npy, **kwargs), None
    else:
        assert isinstance(embed_fn, nn.Module)
        emb, styles = embed_ijb_images_with_styles(
            embed_fn, meta, blocks=style_blocks, out_paths=(npy, styles_npy), **kwargs
        )
    write_text_atomic(key_file, json.dumps(key, indent=2) + "\n")
    return emb, styles, npy, False


def fuse_views(embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """``(features (N, d) float32, xnorm)``: the views summed per image (image + flip), and the
    mean norm of the single raw embeddings (XNorm). Reads ``embeddings`` in chunks."""
    n, views, d = embeddings.shape
    features = np.empty((n, d), dtype=np.float32)
    norm_sum = 0.0
    for start in range(0, n, _ROW_CHUNK):
        block = np.asarray(embeddings[start : start + _ROW_CHUNK], dtype=np.float32)
        features[start : start + len(block)] = block.sum(axis=1)
        norm_sum += float(np.linalg.norm(block, axis=2).sum(dtype=np.float64))
    return features, norm_sum / (n * views)


# ---- report -------------------------------------------------------------------------------------


def _far_label(x: float) -> str:
    exponent = math.log10(x) if x > 0 else 0.5
    return f"1e{round(exponent)}" if exponent == round(exponent) else f"{x:g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _rate_cells(
    rates: dict[float, float | None], insightface: dict[float, float | None], far_reading: str
) -> list[str]:
    """Table cells of rates (%) in the order of ``rates``: the rate, or where it is None
    (not measurable) :func:`unmeasurable_cell` of ``insightface``'s rate; ``-`` where both are
    None (no rate at all)."""
    return [
        _pct(t)
        if t is not None or insightface[x] is None
        else unmeasurable_cell(_pct(insightface[x]), far_reading)
        for x, t in rates.items()
    ]


def _tables(label: str, name: str, results: dict[str, Any], far_reading: str) -> str:
    ver = results["verification"]
    mode = {
        "closest": "the ROC point with the closest FPR (insightface's reading)",
        "conservative": "the best TPR with FPR <= FAR (conservative reading)",
    }[ver["far_mode"]]
    tars = ver["tar_at_far"]
    cells = _rate_cells(tars, ver["tar_at_far_insightface"], far_reading)
    text = [
        f"{name} 1:1 verification, TAR (%) at FAR, read at {mode}; "
        f"{ver['pairs']:,} pairs ({ver['impostor']:,} impostor), {results['templates']} templates.",
        "",
        markdown_table(["model", *(_far_label(f) for f in tars)], [[label, *cells]]),
    ]
    if any(t is None for t in tars.values()):
        detail = (
            f"{ver['impostor']:,} impostor pairs measure FAR >= {ver['min_measurable_far']:.3g} "
            "only: at least one impostor pair must be accepted"
        )
        text += ["", unmeasurable_note(far_reading, detail)]
    ident = results.get("identification")
    if ident:
        first = next(iter(ident.values()))
        ranks, fpirs = list(first["rank"]), list(first["tpir_at_fpir"])
        headers = [
            "model",
            "gallery",
            *(f"rank-{k}" for k in ranks),
            *(f"TPIR@FPIR={x:g}" for x in fpirs),
        ]
        id_rows = [
            [
                label,
                g,
                *(_pct(r["rank"][k]) for k in ranks),
                *_rate_cells(r["tpir_at_fpir"], r["tpir_at_fpir_insightface"], far_reading),
            ]
            for g, r in ident.items()
        ]
        text += [
            "",
            f"{name} 1:N open-set identification (%).",
            "",
            markdown_table(headers, id_rows),
        ]
        limits = [
            f"{g}: {r['nonmated_probes']:,} non-mated probes measure FPIR >= "
            f"{r['min_measurable_fpir']:.3g} only"
            for g, r in ident.items()
            if r["nonmated_probes"] and any(t is None for t in r["tpir_at_fpir"].values())
        ]
        if limits:
            detail = f"{'; '.join(limits)}: at least one non-mated probe must be accepted"
            text += ["", unmeasurable_note(far_reading, detail)]
    return "\n".join(text) + "\n"


def _aggregation_note(settings: IJBSettings, fusion_model: dict[str, Any] | None) -> str:
    """One Markdown line saying how the template features were made."""
    views = "image + flip" if settings.flip else "no flip"
    if not is_fusion_aggregation(settings.aggregation):
        weights = "faceness-weighted" if settings.faceness else "unweighted"
        return (
            f"Templates: `{settings.aggregation}` pooling (media, then template), {weights}, "
            f"{views}."
        )
    text = f"Templates: `{settings.aggregation}` fusion of all images of a template (media ignored)"
    if fusion_model is not None:
        chunks = settings.fusion_chunk_size or "the whole template"
        text += f", model sha256 `{fusion_model['sha256'][:16]}`, chunks of {chunks}"
    return f"{text}, {views} (with flip each mirror is one more frame)."


def _plot_roc(roc: Roc, points: np.ndarray, mode: str, title: str, path: Path) -> None:
    """The ROC on a log FPR axis, with the operating points read for the TAR@FAR table."""
    plt = pyplot()
    lowest = max(1e-6, 1.0 / roc.num_negatives)
    grid = np.logspace(math.log10(lowest), 0, 400)
    envelope = roc.tar_at_far(grid, "conservative")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(grid, list(envelope.values()), lw=1.5, label="ROC")
    fpr, tpr = roc.fpr[points], roc.tpr[points]
    shown = fpr >= lowest
    ax.plot(fpr[shown], tpr[shown], "o", label=f"TAR@FAR points ({mode})")
    ax.set(xscale="log", xlabel="FAR (false positive rate)", ylabel="TAR", title=title)
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", ls=":", lw=0.5)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _plot_cmc(ident: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for gallery, r in ident.items():
        ax.plot(np.arange(1, len(r["cmc"]) + 1), r["cmc"], marker=".", label=gallery)
    ax.set(xlabel="rank", ylabel="identification rate", title=title)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylim(0, 1.01)
    ax.grid(True, ls=":", lw=0.5)
    ax.legend(loc="lower right")
    save_figure(fig, path)


# ---- the evaluation: embed -> score -> report ---------------------------------------------------


@dataclass(frozen=True)
class IJBSettings:
    """How an IJB set is embedded, scored and reported; checked on construction.

    The defaults are insightface's. ``align_rule`` places the template at crop sizes other than
    112 (:func:`robustface.deploy.align.arcface_template`); ``score_dtype`` is the precision of
    pair scoring (:func:`score_pairs`); ``far_reading`` says what the tables show at a FAR below
    ``1 / impostor pairs`` and an FPIR below ``1 / non-mated probes``: ``"measurable"`` ``n/m``,
    ``"insightface"`` insightface's reading marked ``*`` (the JSON holds both). ``batch_size``,
    ``device`` and ``workers`` (decoding threads) only change the speed.

    ``aggregation`` is a template pooler (:data:`AGGREGATORS`) or a fusion aggregator
    (:func:`is_fusion_aggregation`: ``caface``). ``flip`` and ``faceness`` left at ``None``
    become the aggregation's default: on for the poolers (insightface), off for fusion
    (upstream CAFace); faceness with a fusion aggregator is an error. ``fusion_model`` (the
    CAFace checkpoint, required by ``caface`` and refused by the others), ``fusion_chunk_size``
    (``None``: each template at once) and ``style_blocks`` (``None``: the backbone family's
    default) configure fusion only.
    """

    aggregation: str = "norm_weighted"
    far_mode: str = "closest"
    far_reading: str = "measurable"
    fars: tuple[float, ...] = FARS
    flip: bool | None = None
    faceness: bool | None = None
    align_rule: str = "scale"
    score_dtype: str = "float32"
    batch_size: int = 128
    device: str | torch.device = "cpu"
    workers: int = 4
    fusion_model: str | Path | None = None
    fusion_chunk_size: int | None = None
    style_blocks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("far_mode", self.far_mode, FAR_MODES)
        check_far_reading(self.far_reading)
        check_choice("align_rule", self.align_rule, TEMPLATE_RULES)
        check_choice("score_dtype", self.score_dtype, SCORE_DTYPES)
        fusion = is_fusion_aggregation(self.aggregation)
        object.__setattr__(self, "fars", tuple(float(f) for f in self.fars))
        for name in ("flip", "faceness"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, not fusion)
        if fusion and self.faceness:
            raise ValueError(
                f"faceness: the {self.aggregation!r} aggregation takes no per-image weights "
                "(CAFace's IJB evaluation ignores faceness); leave faceness off (--no-faceness)"
            )
        check_fusion_options(self.aggregation, self.fusion_model, self.fusion_chunk_size)
        if self.fusion_chunk_size is not None:
            check_int("fusion_chunk_size", self.fusion_chunk_size, 1)
        if self.style_blocks is not None:
            needs = fusion and FUSION_AGGREGATORS.get(self.aggregation).needs_styles
            if not needs:
                raise ValueError(
                    f"style_blocks: the {self.aggregation!r} aggregation uses no styles"
                )
            blocks = self.style_blocks
            names = [blocks] if isinstance(blocks, str) else blocks
            object.__setattr__(self, "style_blocks", tuple(names))

    @property
    def needs_styles(self) -> bool:
        """Whether the aggregation fuses styles, computed while embedding."""
        return is_fusion_aggregation(self.aggregation) and bool(
            FUSION_AGGREGATORS.get(self.aggregation).needs_styles
        )


@dataclass(frozen=True)
class IJBEmbeddings:
    """The raw embeddings ``(N, V, d)`` of an IJB set (:func:`embed_ijb`) and their origin; the
    styles ``(N, V, C, 2)`` of the same views (None unless the aggregation needs them)."""

    embeddings: np.ndarray
    input_size: int
    model_key: dict[str, Any]
    cache_file: Path | None
    reused: bool
    seconds: float
    styles: np.ndarray | None = None
    style_blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class IJBScores:
    """What :func:`score_ijb` measured: 1:1 ROC and the points read at ``fars``, 1:N results."""

    templates: int
    media: int
    xnorm: float
    pairs: int
    roc: Roc
    points: np.ndarray
    identification: dict[str, dict[str, Any]] | None
    seconds: float


def checkpoint_key(
    checkpoint: str | Path, backbone: str | None = None, color_order: str | None = None
) -> dict[str, Any]:
    """The model part of the embedding cache key of a checkpoint file loaded with ``backbone``
    and ``color_order`` (the flags that change what the same file computes)."""
    sha = model_fingerprint(checkpoint)["sha256"]
    return {"sha256": sha, "backbone": backbone, "color_order": color_order}


def embed_ijb(
    model: Callable[[torch.Tensor], torch.Tensor],
    meta: IJBMeta,
    settings: IJBSettings,
    *,
    input_size: int = 112,
    model_key: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> IJBEmbeddings:
    """Embed every image of ``meta`` at ``input_size`` px with ``model`` (in eval mode, on
    ``settings.device``, taking normalised RGB ``N x 3 x H x W``).

    With ``cache_dir`` the embeddings are cached there, one ``.npy`` per key: ``model_key``
    (:func:`checkpoint_key` for a loaded checkpoint; default the module's content hash), the
    alignment, ``flip`` and the image list. A new ``aggregation``, ``faceness`` or ``far_mode``
    reuses them and several models can share one cache directory. An aggregation that needs
    styles (``caface``) computes them in the same pass (``model`` must be a robustface backbone,
    not ONNX) and caches them beside the embeddings, keyed by the style blocks too.
    """
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("put the model in eval mode first (model.eval())")
    if model_key is None:
        if not isinstance(model, nn.Module):
            raise ValueError("give model_key for a model that is not an nn.Module")
        model_key = _module_fingerprint(model)
    options: dict[str, Any] = {
        "size": input_size,
        "align_rule": settings.align_rule,
        "batch_size": settings.batch_size,
        "flip": settings.flip,
        "device": settings.device,
        "workers": settings.workers,
        "show_progress": show_progress,
    }
    blocks = None
    if settings.needs_styles:
        if not isinstance(model, nn.Module):
            raise ValueError("model: styles need a robustface backbone module")
        blocks = style_block_names(model, settings.style_blocks)
    t0 = time.perf_counter()
    if cache_dir is None:
        cache_file, reused = None, False
        if blocks is None:
            embeddings, styles = embed_ijb_images(model, meta, **options), None
        else:
            assert isinstance(model, nn.Module)
            embeddings, styles = embed_ijb_images_with_styles(model, meta, blocks=blocks, **options)
    else:
        key = {
            "format": CACHE_FORMAT,
            "model": model_key,
            "align": {
                "template": ARCFACE_TEMPLATE,
                "size": input_size,
                "rule": settings.align_rule,
                "interpolation": "bilinear",
            },
            "flip": settings.flip,
            "images": int(meta.images.size),
            "meta_sha256": _meta_digest(meta),
        }
        embeddings, styles, cache_file, reused = _load_or_embed(
            model, meta, Path(cache_dir), key, blocks, **options
        )
    seconds = time.perf_counter() - t0
    return IJBEmbeddings(
        embeddings,
        input_size,
        model_key,
        cache_file,
        reused,
        seconds,
        styles,
        None if blocks is None else tuple(blocks),
    )


def score_ijb(
    embedded: IJBEmbeddings,
    meta: IJBMeta,
    settings: IJBSettings,
    one_n: IJB1NMeta | None = None,
    *,
    fusion: FusionAggregator | None = None,
    show_progress: bool = False,
) -> IJBScores:
    """Pool the embeddings into template features (faceness-weighted if ``settings.faceness``,
    with ``settings.aggregation``), score the 1:1 pairs and, with ``one_n``
    (:func:`read_ijb_1n_meta`), search every 1:N gallery with the probes. A fusion aggregation
    fuses each template with ``fusion`` (default :func:`build_fusion` of ``settings``)."""
    t0 = time.perf_counter()
    features, xnorm = fuse_views(embedded.embeddings)
    groups = group_templates(meta.templates, meta.medias)
    if is_fusion_aggregation(settings.aggregation):
        del features
        fusion = build_fusion(settings) if fusion is None else fusion
        feats = _fuse_templates(embedded, groups, settings, fusion, show_progress)
    else:
        weights = meta.faceness if settings.faceness else np.ones(meta.images.size, np.float32)
        feats = template_features(features, weights, groups, settings.aggregation)
        del features
    scores = score_pairs(feats, groups.template_ids, meta.pairs, dtype=settings.score_dtype)
    roc = Roc.from_scores(scores, meta.pair_labels)
    points = roc.operating_points(settings.fars, settings.far_mode)
    ident = None
    if one_n is not None:
        probe_templates, probe_subjects = one_n.probe
        probe_feats = feats[_rows_of(groups.template_ids, probe_templates, "1:N probe")]
        ident = {
            g: identification(
                feats[_rows_of(groups.template_ids, g_templates, f"1:N gallery {g}")],
                g_subjects,
                probe_feats,
                probe_subjects,
            )
            for g, (g_templates, g_subjects) in one_n.galleries.items()
        }
    return IJBScores(
        templates=int(groups.template_ids.size),
        media=int(groups.media_counts.size),
        xnorm=xnorm,
        pairs=int(scores.size),
        roc=roc,
        points=points,
        identification=ident,
        seconds=time.perf_counter() - t0,
    )


def _fuse_templates(
    embedded: IJBEmbeddings,
    groups: TemplateGroups,
    settings: IJBSettings,
    fusion: FusionAggregator,
    show_progress: bool,
) -> np.ndarray:
    """:func:`fused_template_features` of ``embedded`` after checking that ``fusion`` fits its
    feature width and style channels (errors name the fusion model and the cache file)."""
    source = "embeddings" if embedded.cache_file is None else str(embedded.cache_file)
    if fusion.needs_styles and embedded.styles is None:
        raise ValueError(
            f"styles: the {fusion.name} aggregator needs styles, but {source} has none "
            "(embed with this aggregation's settings)"
        )
    channels = None if embedded.styles is None else int(embedded.styles.shape[2])
    where = f"the embeddings of {source}"
    check_fusion_shapes(
        fusion, int(embedded.embeddings.shape[2]), channels, where, settings.fusion_model
    )
    return fused_template_features(
        embedded.embeddings,
        embedded.styles,
        groups,
        fusion,
        source=embedded.cache_file,
        show_progress=show_progress,
    )


def write_ijb_report(
    out_dir: str | Path,
    meta: IJBMeta,
    embedded: IJBEmbeddings,
    scores: IJBScores,
    settings: IJBSettings,
    *,
    label: str,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report of model ``label`` and return its results (``"report"``: the JSON path).

    Writes ``out_dir/{name}.json`` (results, settings, the hash of ``checkpoint``, versions),
    ``{name}.md`` (TAR at FAR, the 1:N table when there are 1:N results), ``{name}_roc.png`` and
    ``{name}_cmc.png``; ``name`` is lower-case ``meta.name``, followed by ``_{aggregation}``
    for another aggregation than the default ``norm_weighted`` (``ijbc_caface.json``), so the
    reports of several aggregations sit side by side in one directory.
    """
    out_dir = Path(out_dir)
    name, roc, fars = meta.name, scores.roc, settings.fars
    grid = np.logspace(-6, 0, 61)
    # the points score_ijb read for every FAR: insightface's reading, None where not measurable
    every = dict(zip(map(float, fars), roc.tpr[scores.points].tolist(), strict=True))
    measured = {f: t if far_measurable(f, roc.num_negatives) else None for f, t in every.items()}
    results: dict[str, Any] = {
        "name": name,
        "model": label,
        "images": int(meta.images.size),
        "templates": scores.templates,
        "media": scores.media,
        "xnorm": scores.xnorm,
        "verification": {
            "tar_at_far": measured,
            "tar_at_far_insightface": every,
            "min_measurable_far": roc.min_measurable_far,
            "far_mode": settings.far_mode,
            "far_reading": settings.far_reading,
            "operating_points": {
                f: {
                    "fpr": roc.fpr[i],
                    "threshold": roc.thresholds[i],
                    "measurable": far_measurable(f, roc.num_negatives),
                }
                for f, i in zip(fars, scores.points.tolist(), strict=True)
            },
            "pairs": scores.pairs,
            "genuine": roc.num_positives,
            "impostor": roc.num_negatives,
            "roc": {"fpr": grid, "tpr": list(roc.tar_at_far(grid, "conservative").values())},
        },
    }
    if scores.identification is not None:
        results["identification"] = scores.identification
    results["seconds"] = {"embedding": embedded.seconds, "scoring": scores.seconds}
    results["embedding_cache"] = {"path": embedded.cache_file, "reused": embedded.reused}

    stem = name.lower()
    if settings.aggregation != IJBSettings.aggregation:  # beside the default's report
        stem = f"{stem}_{settings.aggregation}"
    title = f"{name} 1:1 verification: {label}"
    _plot_roc(roc, scores.points, settings.far_mode, title, out_dir / f"{stem}_roc.png")
    if "identification" in results:
        _plot_cmc(results["identification"], f"{name} 1:N: {label}", out_dir / f"{stem}_cmc.png")
    else:  # a CMC of an earlier run must not sit beside these results
        (out_dir / f"{stem}_cmc.png").unlink(missing_ok=True)
    cache = embedded.cache_file
    fusion_model = None
    if settings.fusion_model is not None:
        fusion_model = model_fingerprint(settings.fusion_model)
    config = {
        "data": str(meta.root),
        "name": name,
        "aggregation": settings.aggregation,
        "fusion_model": fusion_model,
        "fusion_chunk_size": settings.fusion_chunk_size,
        "style_blocks": embedded.style_blocks,
        "far_mode": settings.far_mode,
        "far_reading": settings.far_reading,
        "fars": list(fars),
        "flip": settings.flip,
        "faceness": settings.faceness,
        "input_size": embedded.input_size,
        "align_rule": settings.align_rule,
        "score_dtype": settings.score_dtype,
        "backbone": embedded.model_key.get("backbone"),
        "color_order": embedded.model_key.get("color_order"),
        "batch_size": settings.batch_size,
        "device": str(settings.device),
        "cache": None if cache is None else str(cache.parent),
    }
    table = _tables(label, name, results, settings.far_reading)
    table += "\n" + _aggregation_note(settings, fusion_model) + "\n"
    results["report"] = write_evaluation(
        out_dir, stem, results, table, model=checkpoint, config=config
    )
    return results
