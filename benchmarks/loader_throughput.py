"""Data-loading throughput: RecordIODataset + TrainTransform against plain JPEG decoding.

Writes a ``.rec`` of N smooth random 112x112 JPEGs (quality 95) to a temporary directory and
measures, in images per second:

(a) plain ``simplejpeg`` decoding of the same JPEG bytes, held in memory;
(b) ``RecordIODataset(rec, TrainTransform())[i]`` in this process (read + decode + flip +
    normalise into a float32 tensor), i.e. the work of one DataLoader worker before issue 20;
(b') the same with ``TrainTransform(normalize=False)`` (read + decode + flip into a uint8
    tensor), one worker's work now;
(c) the float dataset through ``DataLoader(num_workers=--workers)`` (the previous training
    loader), timed on an epoch of persistent workers; its "per worker" column is the total
    divided by the worker count;
(c') the uint8 dataset through the same DataLoader, each batch normalised in the main process
    by ``normalize_images`` (the trainer does it on the training device; on a CPU run that is
    the main process, counted here).

Rows run in turn within each round (best of ``--repeats``), so background load hits them alike.
Targets from the issues: (b) >= 70% of (a); (c') per worker >= 80% of (a). Run:

    .venv/bin/python benchmarks/loader_throughput.py [--num-images 5000] [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch

from robustface.data.image import encode_image
from robustface.data.recordio import RecordIODataset, write_insightface_rec
from robustface.data.transforms import TrainTransform, normalize_images


def smooth_images(n: int, size: int, seed: int):
    """Yield blurred noise plus random gradients: JPEG sizes close to real aligned faces."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    for _ in range(n):
        noise = rng.normal(128, 60, (size, size, 3)).astype(np.float32)
        image = cv2.GaussianBlur(noise, (0, 0), sigmaX=rng.uniform(1.0, 3.0))
        gx, gy = rng.uniform(-60, 60, 2)
        image += gx * ramp[None, :, None] + gy * ramp[:, None, None]
        yield np.clip(image, 0, 255).astype(np.uint8)


def best_rates(fns: list[Callable[[], int]], repeats: int) -> list[float]:
    """Best images/s of each ``fn`` (returning the images it handled) over ``repeats`` rounds.

    The functions run in turn within each round, so background load hits them alike.
    """
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_rates in zip(fns, rates, strict=True):
            start = time.perf_counter()
            count = fn()
            fn_rates.append(count / (time.perf_counter() - start))
    return [max(r) for r in rates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also save the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded too
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = [encode_image(im, "jpg", 95) for im in smooth_images(args.num_images, args.size, 0)]
        labels = np.arange(args.num_images) // 10
        write_insightface_rec(
            tmp, zip(jpegs, labels.tolist(), strict=True), image_size=(args.size, args.size)
        )
        dataset = RecordIODataset(tmp, transform=TrainTransform(seed=0))
        dataset_u8 = RecordIODataset(tmp, transform=TrainTransform(seed=0, normalize=False))
        n = len(dataset)

        def plain_decode() -> int:
            for data in jpegs:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            return n

        def items(ds: RecordIODataset) -> Callable[[], int]:
            def run() -> int:
                for i in range(n):
                    ds[i]
                return n

            return run

        def loader(ds: RecordIODataset) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                ds,
                batch_size=args.batch_size,
                num_workers=args.workers,
                persistent_workers=True,
                shuffle=True,
            )

        float_loader, uint8_loader = loader(dataset), loader(dataset_u8)

        def float_epoch() -> int:
            return sum(len(labels) for _, labels in float_loader)

        def uint8_epoch() -> int:
            return sum(len(normalize_images(images)) for images, _ in uint8_loader)

        decode_rate, dataset_rate, uint8_rate = best_rates(
            [plain_decode, items(dataset), items(dataset_u8)], args.repeats
        )
        float_epoch(), uint8_epoch()  # start the workers
        float_rate, loader_rate = best_rates([float_epoch, uint8_epoch], args.repeats)

    rows = [
        ("(a) simplejpeg decode (same bytes, in memory)", decode_rate, decode_rate),
        ("(b) RecordIODataset + TrainTransform, float32, 1 process", dataset_rate, dataset_rate),
        ("(b') the same, uint8 (normalize=False)", uint8_rate, uint8_rate),
        (
            f"(c) DataLoader, {args.workers} workers, float32 batches (previous)",
            float_rate,
            float_rate / args.workers,
        ),
        (
            f"(c') DataLoader, {args.workers} workers, uint8 batches + normalize_images",
            loader_rate,
            loader_rate / args.workers,
        ),
    ]
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(
        f"{n} JPEGs of {args.size}x{args.size}, quality 95, mean {mean_kb:.1f} KiB; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    print("| method | images/s | images/s per worker | per worker vs (a) |")
    print("|---|---:|---:|---:|")
    for name, total, per_worker in rows:
        print(f"| {name} | {total:,.0f} | {per_worker:,.0f} | {per_worker / decode_rate:.0%} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "num_images": n,
                    "size": args.size,
                    "mean_jpeg_bytes": mean_kb * 1024,
                    "workers": args.workers,
                    "batch_size": args.batch_size,
                    "cpus": os.cpu_count(),
                    "results": [
                        {
                            "method": name,
                            "images_per_s": total,
                            "per_worker": per_worker,
                            "ratio_to_decode": per_worker / decode_rate,
                        }
                        for name, total, per_worker in rows
                    ],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
