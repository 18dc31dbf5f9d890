"""SynthFace generation rate per CPU core, now and before the generation-rate work, side by side.

Run::

    .venv/bin/python benchmarks/synth_rate.py [--identities 100] [--per-identity 20] [--json OUT]

Single process, ``cv2.setNumThreads(1)``, no torch: the rate of one core. Times are CPU time of
this process (``time.process_time``). Every stage is timed in chunks of ``CHUNK`` images over
``--repeats`` rounds that alternate over the rows, and a stage's time is the sum of its chunks'
best rounds, so a slow spell of a shared machine inflates no row much. Rows render identities
whose 3D model is already cached (the builder renders all samples of an identity in a row); the
"cold" row renders new identities, so it includes each one's model build, spread over
``--per-identity`` images.

Each row renders its images with the current renderer ("now") and with the previous one
("previous": the functions that the generation-rate work replaced, copied in
``synth_previous.py`` and swapped in by ``previous_renderer``), one after the other in every
round, in alternating order; both give the same bytes. ``speed-up`` is the median over rounds of
the ratio of the two renders' times in that round (the cold row: new identities for each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from robustface.data.image import encode_image
from robustface.data.synth import render
from robustface.data.synth.identity import make_identities
from robustface.data.synth.render import PROFILES, render_nonface, sample_nuisance
from synth_previous import previous_renderer  # this directory is on sys.path when run as a script

IMPLS = {"previous": previous_renderer, "now": contextlib.nullcontext}
CHUNK = 100  # images per timed chunk


def _cpu(fn: Callable[[], object]) -> float:
    """CPU time of one call of ``fn``, in seconds."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _chunks(items: Sequence) -> list[Sequence]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _row(kind: str, sample: float, render_s: dict[str, float], encode: float, ratios: list) -> dict:
    """A table row from seconds per image (``render_s`` per implementation) and per-round ratios."""
    row = {"kind": kind, "sample_us": 1e6 * sample, "encode_us": 1e6 * encode}
    for impl, seconds in render_s.items():
        row[f"render_us_{impl}"] = 1e6 * seconds
        row[f"images_per_s_{impl}"] = 1.0 / (seconds + encode)
    row["speedup"] = statistics.median(ratios)
    return row


def _render_chunks(kind: str, jobs: list, size: int) -> list[Callable[[], list]]:
    """Chunks rendering ``jobs`` with whatever renderer the module holds when they run."""
    if kind == "nonface":
        rngs = [np.random.default_rng(i) for i in range(len(_chunks(jobs)))]
        return [lambda r=r: [render_nonface(r, size) for _ in range(CHUNK)] for r in rngs]
    name = "render_sketch" if kind == "sketch" else "render_face"
    return [
        lambda c=c: [getattr(render, name)(i, n, size).image for i, n in c] for c in _chunks(jobs)
    ]


def _stages(kind: str, identities: list, per_identity: int, size: int) -> dict[str, list]:
    """The timed chunks of one row: sampling nuisances, rendering, JPEG encoding."""
    profile = "train" if kind in ("sketch", "nonface") else kind
    count = len(identities) * per_identity
    rng = np.random.default_rng(1)
    jobs = [(identities[i // per_identity], sample_nuisance(rng, profile)) for i in range(count)]
    renders = _render_chunks(kind, jobs, size)
    images = [im for chunk in renders for im in chunk()]  # also fills the identity cache
    pairs = [(im, n.jpeg_quality) for im, (_, n) in zip(images, jobs, strict=True)]
    sample_rngs = [np.random.default_rng(i) for i in range(len(_chunks(jobs)))]
    return {
        "sample": [
            lambda r=r: [sample_nuisance(r, profile) for _ in range(CHUNK)] for r in sample_rngs
        ],
        "render": renders,
        "encode": [
            lambda c=c: [encode_image(im, quality=q) for im, q in c] for c in _chunks(pairs)
        ],
    }


def _cold_chunks(r: int, impl: int, identities: int, per_identity: int, size: int) -> list:
    """Rendering chunks of identities never seen before (their own for each round and renderer):
    each one's 3D model is built once, then reused."""
    fresh = make_identities(0, 10**6 * (2 * r + impl + 1), identities)
    rng = np.random.default_rng(2)
    count = identities * per_identity
    jobs = [(fresh[i // per_identity], sample_nuisance(rng, "train")) for i in range(count)]
    return _render_chunks("train", jobs, size)


def measure(identities: int, per_identity: int, size: int, repeats: int) -> list[dict]:
    """One row per profile, sketch, non-face and cold identities: microseconds per image, now and
    with the previous renderer."""
    count = identities * per_identity
    ids = make_identities(0, 0, identities)
    kinds = (*PROFILES, "sketch", "nonface")
    stages = {kind: _stages(kind, ids, per_identity, size) for kind in kinds}
    cold_kind = f"train, cold identities ({per_identity} images each)"
    n_chunks = len(_chunks(range(count)))
    best = {k: {s: [float("inf")] * n_chunks for s in ("sample", "encode")} for k in kinds}
    best_render = {k: {i: [float("inf")] * n_chunks for i in IMPLS} for k in (*kinds, cold_kind)}
    ratios: dict[str, list[float]] = {k: [] for k in (*kinds, cold_kind)}
    for r in range(repeats):
        order = list(IMPLS) if r % 2 == 0 else list(IMPLS)[::-1]
        for kind, fns in stages.items():
            for stage in ("sample", "encode"):
                for c, fn in enumerate(fns[stage]):
                    best[kind][stage][c] = min(best[kind][stage][c], _cpu(fn))
            total = {}
            for impl in order:
                with IMPLS[impl]():
                    times = [_cpu(fn) for fn in fns["render"]]
                total[impl] = sum(times)
                best_render[kind][impl] = list(map(min, best_render[kind][impl], times))
            ratios[kind].append(total["previous"] / total["now"])
        total = {}
        for impl in order:
            chunks = _cold_chunks(r, list(IMPLS).index(impl), identities, per_identity, size)
            with IMPLS[impl]():
                times = [_cpu(fn) for fn in chunks]
            total[impl] = sum(times)
            best_render[cold_kind][impl] = list(map(min, best_render[cold_kind][impl], times))
        ratios[cold_kind].append(total["previous"] / total["now"])
    rows = []
    for kind in (*kinds, cold_kind):
        b = best[kind if kind in best else "train"]
        per_image = {impl: sum(t) / count for impl, t in best_render[kind].items()}
        rows.append(
            _row(kind, sum(b["sample"]) / count, per_image, sum(b["encode"]) / count, ratios[kind])
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| kind | sample_nuisance µs | render µs, previous | render µs, now | render speed-up "
        "| JPEG encode µs | render+encode images/s/core, previous | ..., now |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['sample_us']:.0f} | {r['render_us_previous']:.0f} | "
            f"{r['render_us_now']:.0f} | {r['speedup']:.2f}x | {r['encode_us']:.0f} | "
            f"{r['images_per_s_previous']:,.0f} | {r['images_per_s_now']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--per-identity", type=int, default=20)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.identities * args.per_identity % CHUNK:
        parser.error(f"--identities x --per-identity must be a multiple of {CHUNK}")
    cv2.setNumThreads(1)
    rows = measure(args.identities, args.per_identity, args.size, args.repeats)
    cpu = platform.processor() or platform.machine()
    print(f"SynthFace rate, {args.size}x{args.size}, one core ({cpu}), CPU time")
    print(to_markdown(rows))
    if args.json is not None:
        meta = {"size": args.size, "identities": args.identities, "per_identity": args.per_identity}
        args.json.write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
