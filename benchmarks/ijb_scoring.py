"""Time IJB-C-scale scoring from cached image features: pooling, 1:1 scores of all pairs, TAR@FAR.

Run: ``.venv/bin/python benchmarks/ijb_scoring.py [--scale 1.0] [--dim 512]``.

Fake data at IJB-C's size (469,375 images, 23,124 templates, 15,658,489 template pairs), built
vectorised: images of a template share an identity centre plus noise, media ids are drawn per
template, and 20,000 pairs are genuine by construction (the rest are random pairs). Timing starts
from the image features, i.e. after the embedding cache has been read and image + flip summed.
Prints a Markdown table of the wall time per stage and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from robustface.evaluate.ijb import group_templates, score_pairs, template_features
from robustface.evaluate.roc import Roc
from robustface.utils.table import markdown_table

IJBC_IMAGES, IJBC_TEMPLATES, IJBC_PAIRS, IJBC_SUBJECTS = 469_375, 23_124, 15_658_489, 3_531
GENUINE = 20_000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's size")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    data = fake_ijb(args.scale, args.dim)
    inputs_gib = peak_rss_gib()
    times = {}

    start = time.perf_counter()
    groups = group_templates(data["templates"], data["medias"])
    times["group images by template and media"] = time.perf_counter() - start
    for aggregation in ("norm_weighted", "mean"):
        start = time.perf_counter()
        feats = template_features(data["features"], data["faceness"], groups, aggregation)
        times[f"template features ({aggregation})"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_pairs(feats, groups.template_ids, data["pairs"])
    times["cosine scores of all pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    roc = Roc.from_scores(scores, data["labels"])
    tar = roc.tar_at_far(mode="closest")
    roc.tar_at_far(mode="conservative")
    times["ROC + TAR@FAR (both readings)"] = time.perf_counter() - start

    total = sum(v for k, v in times.items() if "(mean)" not in k)
    rows = [[stage, f"{seconds:.2f}"] for stage, seconds in times.items()]
    rows.append(["total (norm_weighted)", f"{total:.2f}"])
    print(
        f"{data['features'].shape[0]:,} images x {args.dim}, {groups.template_ids.size:,} "
        f"templates, {groups.media_counts.size:,} media, {scores.size:,} pairs "
        f"({int(data['labels'].sum()):,} genuine); {platform.machine()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    print(markdown_table(["stage", "seconds"], rows))
    print(f"peak RSS: {peak_rss_gib():.2f} GiB (fake inputs alone: {inputs_gib:.2f} GiB)")
    shown = {f"{k:g}": "n/m" if v is None else round(v, 4) for k, v in tar.items()}
    print("TAR@FAR (closest):", shown)


if __name__ == "__main__":
    main()
