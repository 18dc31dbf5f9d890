"""Time IJB-C-scale scoring from cached image features: pooling, 1:1 scores of all pairs, TAR@FAR.

Run: ``.venv/bin/python benchmarks/ijb_scoring.py [--scale 1.0] [--dim 512] [--repeats 3]``.

Fake data at IJB-C's size (469,375 images, 23,124 templates, 15,658,489 template pairs), built
vectorised: images of a template share an identity centre plus noise, media ids are drawn per
template, and 20,000 pairs are genuine by construction (the rest are random pairs). Timing starts
from the image features, i.e. after the embedding cache has been read and image + flip summed.

Pooling and scoring are timed side by side with the previous implementation (kept below as
``previous_*``: ``index_add_`` pooling, ``searchsorted`` id lookup, stable ``argsort`` of the
pairs, a full-width Gram block per 1,024 first templates) on the same inputs in the same run,
with the largest difference of their outputs, and against a bound: pooling as one sparse
``(templates x images)`` product with the matrix built beforehand, scoring as the Gram products
of all templates in blocks of 1,024 rows plus one gather of every pair's cell, its index built
beforehand ("Gram and gather"). Times are medians of ``--repeats`` runs. Prints Markdown tables
and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from robustface.evaluate.ijb import TemplateGroups, group_templates, score_pairs, template_features
from robustface.evaluate.roc import Roc
from robustface.utils.sparse import torch_csr
from robustface.utils.table import markdown_table

IJBC_IMAGES, IJBC_TEMPLATES, IJBC_PAIRS, IJBC_SUBJECTS = 469_375, 23_124, 15_658_489, 3_531
GENUINE = 20_000
CHUNK = 1 << 16
BLOCK_ROWS = 1024
GATHER_COST = 64


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fake_ijb(scale: float, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Image features, template / media ids, faceness, pairs and labels at ``scale`` x IJB-C."""
    rng = np.random.default_rng(seed)
    n, t, p = (max(2, round(scale * x)) for x in (IJBC_IMAGES, IJBC_TEMPLATES, IJBC_PAIRS))
    subjects = max(2, round(scale * IJBC_SUBJECTS))
    template_of_image = np.sort(np.r_[np.arange(t), rng.integers(0, t, n - t)])
    template_ids = np.sort(rng.choice(10 * t, t, replace=False))
    subject = rng.integers(0, subjects, t)
    centres = 0.2 * rng.standard_normal((subjects, dim), dtype=np.float32)
    features = centres[subject[template_of_image]]
    for start in range(0, n, 1 << 16):
        stop = min(start + (1 << 16), n)
        features[start:stop] += rng.standard_normal((stop - start, dim), dtype=np.float32)
    pairs = rng.integers(0, t, (p, 2))
    by_subject = np.argsort(subject, kind="stable")
    first = np.searchsorted(subject[by_subject], subject[pairs[:GENUINE, 0]])
    count = np.bincount(subject, minlength=subjects)[subject[pairs[:GENUINE, 0]]]
    pairs[:GENUINE, 1] = by_subject[first + (rng.random(GENUINE) * count).astype(np.int64)]
    return {
        "features": features,
        "templates": template_ids[template_of_image],
        "medias": template_of_image * 8 + rng.integers(0, 8, n),
        "faceness": rng.uniform(0.5, 1.0, n).astype(np.float32),
        "pairs": template_ids[pairs],
        "labels": subject[pairs[:, 0]] == subject[pairs[:, 1]],
    }


# ---- the previous implementation (robustface before issue 20), for the side-by-side timing ------


def previous_template_features(
    features: np.ndarray, weights: np.ndarray, groups: TemplateGroups, unit: bool
) -> np.ndarray:
    """Media means by ``index_add_``, then media summed per template by ``index_add_``."""
    d = features.shape[1]
    media = torch.zeros((groups.media_counts.size, d), dtype=torch.float32)
    for start in range(0, features.shape[0], CHUNK):
        x = torch.from_numpy(np.asarray(features[start : start + CHUNK], dtype=np.float32))
        w = torch.from_numpy(np.asarray(weights[start : start + CHUNK], dtype=np.float32))
        index = torch.from_numpy(groups.image_media[start : start + CHUNK])
        terms = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) if unit else x
        media.index_add_(0, index, terms * w[:, None])
    media /= torch.from_numpy(groups.media_counts).to(torch.float32)[:, None]
    pooled = torch.zeros((groups.template_ids.size, d), dtype=torch.float32)
    pooled.index_add_(0, torch.from_numpy(groups.media_template), media)
    pooled = pooled.numpy()
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.divide(pooled, norms, out=np.zeros_like(pooled), where=norms > 0)


def previous_rows_of(template_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``searchsorted`` id lookup in chunks (the missing-id error path left out)."""
    rows = np.empty(wanted.shape, dtype=np.int32)
    for start in range(0, len(wanted), CHUNK):
        part = wanted[start : start + CHUNK]
        found = np.minimum(np.searchsorted(template_ids, part), template_ids.size - 1)
        if (template_ids[found] != part).any():
            raise ValueError("unknown template id")
        rows[start : start + len(part)] = found
    return rows


def previous_score_pairs(
    feats: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray, dtype: str
) -> np.ndarray:
    """Pairs sorted by first row (stable argsort), a full-width Gram block per 1,024 rows."""
    feats = np.ascontiguousarray(feats, dtype=dtype)
    rows = previous_rows_of(template_ids, pairs)
    order = np.argsort(rows[:, 0], kind="stable")
    first, second = rows[order, 0], rows[order, 1]
    del rows
    scores = np.empty(pairs.shape[0], dtype=dtype)
    n_templates = feats.shape[0]
    table = torch.from_numpy(feats)
    bounds = np.searchsorted(first, np.arange(0, n_templates + BLOCK_ROWS, BLOCK_ROWS))
    for b, start in enumerate(range(0, n_templates, BLOCK_ROWS)):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        if lo == hi:
            continue
        stop = min(start + BLOCK_ROWS, n_templates)
        if (hi - lo) * GATHER_COST >= (stop - start) * n_templates:
            gram = table[start:stop] @ table.T
            r = torch.from_numpy(first[lo:hi] - start)
            c = torch.from_numpy(second[lo:hi])
            scores[order[lo:hi]] = gram[r.long(), c.long()].numpy()
            continue
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            scores[order[s:e]] = np.einsum("ij,ij->i", feats[first[s:e]], feats[second[s:e]])
    return scores


# ---- the bound ----------------------------------------------------------------------------------


def pooling_bound(features: np.ndarray, weights: np.ndarray, groups: TemplateGroups) -> Callable:
    """One sparse (templates x images) product, the matrix built outside the timing."""
    coef = weights / groups.media_counts[groups.image_media]
    n = features.shape[0]
    matrix = sp.csr_matrix(
        (coef.astype(np.float32), (groups.image_template, np.arange(n))),
        shape=(groups.template_ids.size, n),
    )
    product = torch_csr(matrix)
    x = torch.from_numpy(features)
    return lambda: product @ x


def scoring_bound(feats: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray) -> Callable:
    """Gram of all templates in blocks of 1,024 rows plus one gather of every pair's cell, the
    pairs' rows, blocks and cell indices found outside the timing."""
    rows = np.searchsorted(template_ids, pairs)
    order = np.argsort(rows[:, 0], kind="stable")
    first, second = rows[order, 0], rows[order, 1]
    n_templates = feats.shape[0]
    bounds = np.searchsorted(first, np.arange(0, n_templates + BLOCK_ROWS, BLOCK_ROWS))
    cells = [
        (first[bounds[b] : bounds[b + 1]] - start) * n_templates + second[bounds[b] : bounds[b + 1]]
        for b, start in enumerate(range(0, n_templates, BLOCK_ROWS))
    ]
    table = torch.from_numpy(feats)

    def run() -> np.ndarray:
        out = []
        for b, start in enumerate(range(0, n_templates, BLOCK_ROWS)):
            gram = (table[start : start + BLOCK_ROWS] @ table.T).numpy().ravel()
            out.append(gram[cells[b]])
        return np.concatenate(out)

    return run


# ---- timing -------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    args = parser.parse_args()
    data = fake_ijb(args.scale, args.dim)
    inputs_gib = peak_rss_gib()
    load_before = os.getloadavg()
    r = args.repeats

    group_s, groups = timed(lambda: group_templates(data["templates"], data["medias"]), r)
    rows, feats = [], {}
    for aggregation, unit in (("norm_weighted", False), ("mean", True)):
        now_s, feats[aggregation] = timed(
            lambda a=aggregation: template_features(data["features"], data["faceness"], groups, a),
            r,
        )
        old_s, old = timed(
            lambda u=unit: previous_template_features(
                data["features"], data["faceness"], groups, u
            ),
            r,
        )
        diff = float(np.abs(old - feats[aggregation]).max())
        rows.append([f"template features ({aggregation})", old_s, now_s, diff])
    ids, pairs = groups.template_ids, data["pairs"]
    scores = {}
    for dtype in ("float32", "float64"):
        now_s, scores[dtype] = timed(
            lambda d=dtype: score_pairs(feats["norm_weighted"], ids, pairs, dtype=d), r
        )
        old_s, old = timed(
            lambda d=dtype: previous_score_pairs(feats["norm_weighted"], ids, pairs, d), r
        )
        diff = float(np.abs(old - scores[dtype]).max())
        rows.append([f"cosine scores of all pairs ({dtype})", old_s, now_s, diff])
    pool_bound_s, _ = timed(pooling_bound(data["features"], data["faceness"], groups), r)
    score_bound_s, _ = timed(scoring_bound(feats["norm_weighted"], ids, pairs), r)
    roc_s, tar = timed(lambda: Roc.from_scores(scores["float32"], data["labels"]), 1)
    tar = tar.tar_at_far(mode="closest")
    load_after = os.getloadavg()

    print(
        f"{data['features'].shape[0]:,} images x {args.dim}, {ids.size:,} templates, "
        f"{groups.media_counts.size:,} media, {pairs.shape[0]:,} pairs "
        f"({int(data['labels'].sum()):,} genuine); {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; "
        f"medians of {r}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print()
    table = [
        [stage, f"{old:.3f}", f"{now:.3f}", f"{old / now:.1f}x", f"{diff:.1e}"]
        for stage, old, now, diff in rows
    ]
    print(markdown_table(["stage", "previous (s)", "now (s)", "speed-up", "max abs diff"], table))
    print()
    pool_now, score_now = rows[0][2], rows[2][2]
    bound_rows = [
        [
            "pooling (norm_weighted)",
            f"{pool_now:.3f}",
            f"{pool_bound_s:.3f}",
            f"{pool_now / pool_bound_s:.2f}",
        ],
        [
            "scoring (float32)",
            f"{score_now:.3f}",
            f"{score_bound_s:.3f}",
            f"{score_now / score_bound_s:.2f}",
        ],
        [
            "pooling + scoring",
            f"{pool_now + score_now:.3f}",
            f"{pool_bound_s + score_bound_s:.3f}",
            f"{(pool_now + score_now) / (pool_bound_s + score_bound_s):.2f}",
        ],
    ]
    print(markdown_table(["work", "now (s)", "bound (s)", "now / bound"], bound_rows))
    print()
    print(f"group images by template and media: {group_s:.3f} s; ROC + TAR@FAR: {roc_s:.2f} s")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB (fake inputs alone: {inputs_gib:.2f} GiB)")
    shown = {f"{k:g}": "n/m" if v is None else round(v, 4) for k, v in tar.items()}
    print("TAR@FAR (closest):", shown)


if __name__ == "__main__":
    main()
