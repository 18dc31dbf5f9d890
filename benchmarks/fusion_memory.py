"""Fusion speed (frames/s) and peak memory versus set length, printed as Markdown tables.

::

    PYTHONPATH=src .venv/bin/python benchmarks/fusion_memory.py --repeats 3 --json fusion.json

Synthetic inputs as published: raw 512-d features (unit directions times norms ``|N(20, 6)|``)
and styles ``(384, 2)``, drawn chunk by chunk from a seeded generator; CAFace has random weights
(speed and memory do not depend on them). Every (method, length, repeat) runs in a fresh
subprocess (``--worker``) on one thread; its peak RSS (``resource.getrusage``) minus the peak of
the same worker with the matching ``none`` method (the same inputs made and dropped, no fusion)
is the fusion's memory. Frames/s counts the fusion calls only, not making the inputs. Methods:

- ``mean``, ``norm_weighted``, ``caface-stream-C``: the aggregator's ``memory()``, fed chunks
  of 512 (baselines) or ``C`` frames as they are made; the set is never held (baseline
  ``none-stream``);
- ``caface-seq-C``: ``CAFace.fuse_sequential(set, chunk_size=C, frame_weights=False)`` on the
  whole set held in memory (baseline ``none-set``: the same set, held);
- ``caface-whole``: one forward pass over the whole set (attention over all T frames: memory
  grows as T^2; skipped where the estimate exceeds ``--whole-max-gb``).

``--published`` also runs ``caface-stream-C`` at 10,000 frames for the official chunk sizes
(4 ... 256 swept by the IJB evaluation, 512 in the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LENGTHS = (100, 1_000, 10_000, 100_000)
PUBLISHED_CHUNKS = (4, 8, 16, 32, 64, 128, 256, 512)
DIM, CHANNELS, BASELINE_CHUNK = 512, 384, 512


def _chunks(length: int, size: int, seed: int = 0) -> Iterator[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    for start in range(0, length, size):
        n = min(size, length - start)
        unit = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)
        norms = (20.0 + 6.0 * torch.randn(n, 1, generator=g)).abs() + 1.0
        yield unit * norms, torch.randn(n, CHANNELS, 2, generator=g)


def _whole_set(length: int) -> tuple[Any, Any]:
    """The set held in memory, ``(1, T, 512)`` and ``(1, T, 384, 2)``, filled chunk by chunk (no
    transient second copy, which fusion could reuse and so hide its own memory)."""
    import torch

    features, styles = torch.empty(1, length, DIM), torch.empty(1, length, CHANNELS, 2)
    start = 0
    for f, s in _chunks(length, BASELINE_CHUNK):
        features[0, start : start + len(f)], styles[0, start : start + len(f)] = f, s
        start += len(f)
    return features, styles


def worker(method: str, length: int) -> dict[str, float]:
    """Run one method on one set length in this process; returns seconds and peak RSS (MB)."""
    import torch

    from robustface.fuse import AGGREGATORS, CAFace, CAFaceAggregator

    torch.set_num_threads(1)
    torch.manual_seed(0)
    caface = CAFace().eval()
    seconds = 0.0
    with torch.inference_mode():
        if method in ("none-stream", "mean", "norm_weighted") or method.startswith("caface-stream"):
            if method.startswith("caface-stream"):
                size = int(method.rsplit("-", 1)[1])
                memory = CAFaceAggregator(caface, chunk_size=size).memory()
            else:
                size = BASELINE_CHUNK
                memory = None if method == "none-stream" else AGGREGATORS.build(method).memory()
            for features, styles in _chunks(length, size):
                t0 = time.perf_counter()
                if memory is not None:
                    memory.update(features, styles)
                seconds += time.perf_counter() - t0
            if memory is not None:
                memory.result()
        else:
            features, styles = _whole_set(length)
            t0 = time.perf_counter()
            if method.startswith("caface-seq"):
                size = int(method.rsplit("-", 1)[1])
                caface.fuse_sequential(features, styles, size, frame_weights=False)
            elif method == "caface-whole":
                caface(features, styles)
            elif method != "none-set":
                raise ValueError(f"unknown method {method!r}")
            seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": seconds, "peak_mb": peak_kb / 1024}


def _run(method: str, length: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", method, str(length)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _whole_gb(length: int) -> float:
    """Rough peak of one whole-set forward: 8 heads x (T+4)^2 float32 attention, ~3 copies."""
    return 3 * 8 * (length + 4) ** 2 * 4 / 1e9


def measure(
    methods: list[str], lengths: list[int], repeats: int, whole_max_gb: float
) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        base = {}
        for kind in ("none-stream", "none-set"):
            runs = [_run(kind, length) for _ in range(repeats)]
            base[kind] = statistics.median(r["peak_mb"] for r in runs)
        for method in methods:
            row: dict[str, Any] = {"method": method, "frames": length}
            if method == "caface-whole" and _whole_gb(length) > whole_max_gb:
                row["skipped"] = f"estimated {_whole_gb(length):.1f} GB"
                rows.append(row)
                continue
            runs = [_run(method, length) for _ in range(repeats)]
            held = method.startswith("caface-seq") or method == "caface-whole"
            baseline = base["none-set" if held else "none-stream"]
            row["frames_per_s"] = statistics.median(length / r["seconds"] for r in runs)
            row["extra_mb"] = statistics.median(r["peak_mb"] - baseline for r in runs)
            row["extra_mb_spread"] = [min(r["peak_mb"] for r in runs) - baseline]
            row["extra_mb_spread"].append(max(r["peak_mb"] for r in runs) - baseline)
            row["baseline_mb"] = baseline
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    from robustface.utils.table import markdown_table

    body = []
    for r in rows:
        if "skipped" in r:
            body.append([r["method"], f"{r['frames']:,}", "-", f"skipped ({r['skipped']})"])
            continue
        lo, hi = r["extra_mb_spread"]
        body.append(
            [
                r["method"],
                f"{r['frames']:,}",
                f"{r['frames_per_s']:,.0f}",
                f"{r['extra_mb']:.1f} ({lo:.1f} .. {hi:.1f})",
            ]
        )
    headers = ["method", "frames", "frames/s", "peak RSS - baseline, MB (min .. max)"]
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "mean",
            "norm_weighted",
            "caface-stream-128",
            "caface-stream-512",
            "caface-seq-128",
            "caface-seq-512",
            "caface-whole",
        ],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole-max-gb", type=float, default=3.0)
    parser.add_argument(
        "--published", action="store_true", help="also the official chunk sizes at 10,000 frames"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    load = os.getloadavg()
    rows = measure(args.methods, args.lengths, args.repeats, args.whole_max_gb)
    text = table(rows)
    if args.published:
        chunks = [f"caface-stream-{c}" for c in PUBLISHED_CHUNKS]
        published = measure(chunks, [10_000], args.repeats, args.whole_max_gb)
        rows += published
        text += "\n\nOfficial chunk sizes, 10,000 frames:\n\n" + table(published)
    load_after = os.getloadavg()
    print(text)
    print(f"\nload average (1 min) before {load[0]:.1f}, after {load_after[0]:.1f}; 1 thread")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
