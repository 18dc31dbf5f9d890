"""SynthFace generation rate per CPU core: render (+ JPEG encode) images per second.

Run::

    .venv/bin/python benchmarks/synth_rate.py [--identities 100] [--per-identity 20] [--json OUT]

Single process, ``cv2.setNumThreads(1)``, no torch: the rate of one core. Times are CPU time of
this process (``time.process_time``). Every stage is timed in chunks of ``CHUNK`` images over
``--repeats`` rounds that alternate over the rows, and a stage's time is the sum of its chunks'
best rounds, so a slow spell of a shared machine inflates no row much. Rows render identities
whose 3D model is already cached (the builder renders all samples of an identity in a row); the
"cold" row renders new identities, so it includes each one's model build, spread over
``--per-identity`` images.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from robustface.data.image import encode_image
from robustface.data.synth.identity import make_identities
from robustface.data.synth.render import (
    PROFILES,
    render_face,
    render_nonface,
    render_sketch,
    sample_nuisance,
)

CHUNK = 100  # images per timed chunk


def _cpu(fn: Callable[[], object]) -> float:
    """CPU time of one call of ``fn``, in seconds."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _chunks(items: Sequence) -> list[Sequence]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _row(kind: str, sample: float, render: float, encode: float) -> dict:
    """A table row from seconds per image."""
    return {
        "kind": kind,
        "sample_us": 1e6 * sample,
        "render_us": 1e6 * render,
        "encode_us": 1e6 * encode,
        "images_per_s": 1.0 / (render + encode),
    }


def _stages(kind: str, identities: list, per_identity: int, size: int) -> dict[str, list]:
    """The timed chunks of one row: sampling nuisances, rendering, JPEG encoding."""
    profile = "train" if kind in ("sketch", "nonface") else kind
    count = len(identities) * per_identity
    rng = np.random.default_rng(1)
    jobs = [(identities[i // per_identity], sample_nuisance(rng, profile)) for i in range(count)]
    if kind == "nonface":
        rngs = [np.random.default_rng(i) for i in range(len(_chunks(jobs)))]
        render = [lambda r=r: [render_nonface(r, size) for _ in range(CHUNK)] for r in rngs]
    else:
        fn = render_sketch if kind == "sketch" else render_face
        render = [lambda c=c, f=fn: [f(i, n, size).image for i, n in c] for c in _chunks(jobs)]
    images = [im for chunk in render for im in chunk()]  # also fills the identity cache
    pairs = [(im, n.jpeg_quality) for im, (_, n) in zip(images, jobs, strict=True)]
    sample_rngs = [np.random.default_rng(i) for i in range(len(_chunks(jobs)))]
    return {
        "sample": [
            lambda r=r: [sample_nuisance(r, profile) for _ in range(CHUNK)] for r in sample_rngs
        ],
        "render": render,
        "encode": [
            lambda c=c: [encode_image(im, quality=q) for im, q in c] for c in _chunks(pairs)
        ],
    }


def measure(identities: int, per_identity: int, size: int, repeats: int) -> list[dict]:
    """One row per profile, sketch, non-face and cold identities: microseconds per image."""
    count = identities * per_identity
    ids = make_identities(0, 0, identities)
    kinds = (*PROFILES, "sketch", "nonface")
    stages = {kind: _stages(kind, ids, per_identity, size) for kind in kinds}
    best = {k: {s: [float("inf")] * len(f) for s, f in v.items()} for k, v in stages.items()}
    cold = [float("inf")] * len(_chunks(range(count)))
    for r in range(repeats):
        for kind, fns in stages.items():
            for stage, chunks in fns.items():
                for c, fn in enumerate(chunks):
                    best[kind][stage][c] = min(best[kind][stage][c], _cpu(fn))
        # identities never seen before: each one's 3D model is built once, then reused
        fresh = make_identities(0, 10**6 * (r + 1), identities)
        rng = np.random.default_rng(2)
        jobs = [(fresh[i // per_identity], sample_nuisance(rng, "train")) for i in range(count)]
        for c, chunk in enumerate(_chunks(jobs)):
            cold[c] = min(cold[c], _cpu(lambda c=chunk: [render_face(i, n, size) for i, n in c]))
    rows = [
        _row(kind, *(sum(b[s]) / count for s in ("sample", "render", "encode")))
        for kind, b in best.items()
    ]
    train = best["train"]
    cold_kind = f"train, cold identities ({per_identity} images each)"
    rows.append(
        _row(
            cold_kind, sum(train["sample"]) / count, sum(cold) / count, sum(train["encode"]) / count
        )
    )
    return rows


def to_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| kind | sample_nuisance µs | render µs | JPEG encode µs | render+encode images/s/core |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['sample_us']:.0f} | {r['render_us']:.0f} | "
            f"{r['encode_us']:.0f} | {r['images_per_s']:.0f} |"
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
