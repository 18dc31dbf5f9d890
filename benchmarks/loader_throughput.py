"""Data-loading throughput: the training loader against plain JPEG decoding.

Writes a ``.rec`` of N smooth random 112x112 JPEGs (quality 95) to a temporary directory and
measures, in images per second:

(a) plain ``simplejpeg`` decoding of the same JPEG bytes, held in memory;
(b) ``RecordIODataset(rec, TrainTransform(normalize=False))[i]`` in this process (read + decode +
    flip into a uint8 tensor): a worker's work before whole batches;
(b'1), (b') the third round's and today's ``TrainSet.__getitems__`` in this process, one batch at
    a time (the same, plus the flip's draw, written straight into one uint8 batch: flipped into
    ``3xHxW`` planes, or copied ``HxWx3`` as decoded with the flips sent along): a worker's work;
(c) the previous training loader: ``DataLoader(CarryUserErrors(TrainSet), num_workers=--workers)``
    with a tensor per sample and ``default_collate`` (kept here as ``_PerSampleTrainSet``);
(c'0) the training loader of the second round: the same DataLoader over ``TrainSet``, whose
    workers write whole batches into reused shared-memory slots (``BatchWriter``), each record
    read with ``seek`` + ``read`` and each sample's flip drawn from its own generator (kept here as
    ``_FileReadReader`` and ``_Round2TrainSet``);
(c'1) the training loader of the third round: (c'0) with the records copied out of a memory map
    and the flip's one draw computed from the sample's key (``keyed_first_uniforms``); the workers
    flip each image and de-interleave it into ``3xHxW`` planes of the batch (kept here as
    ``_PlanarTrainSet``);
(c') the training loader now: (c'1) with channels-last batches, the flip left to the device: the
    workers copy each decoded ``HxWx3`` image into the batch as it is and send the flips;
(c''1), (c'') (c'1), (c') with ``normalize_images`` applied to each batch in the main process
    (planar; channels-last with the flips), as on a CPU run, where the training device is the main
    process; on a GPU it runs on the device.

Loaders keep persistent workers and are timed over an epoch. All rows run in turn within each
round, so background load hits them alike; a row's ratio to (a) is taken within each round and
the table gives the median over rounds ("per worker": the loader's rate divided by the workers).
For the loaders it also gives the CPU time per image spent in the workers and in the main process
(from ``/proc``; load-independent, unlike the rates). Target (issue 20): (c') per worker >= 80% of
(a). Run:

    .venv/bin/python benchmarks/loader_throughput.py [--num-images 3000] [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg
import torch

from robustface.data.image import encode_image
from robustface.data.loader import CarryUserErrors, collate, unwrap
from robustface.data.recordio import (
    MAGIC,
    IndexedRecordReader,
    RecordIODataset,
    write_insightface_rec,
)
from robustface.data.transforms import TrainTransform, image_planes, normalize_images
from robustface.train.trainer import TrainSet
from robustface.utils.seeding import keyed_generators


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


class _PerSampleTrainSet(TrainSet):
    """The previous training dataset: a batch is a list of per-sample ``(tensor, label)``,
    collated by ``default_collate`` (into a new shared-memory segment per batch in a worker)."""

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [self[i] for i in indices]


class _FileReadReader(IndexedRecordReader):
    """The previous record reader: ``seek`` + ``read`` of a whole single-part record per call."""

    def read(self, key: int, limit: int | None = None) -> bytes:
        j = self._slot(key)
        if limit is None:
            fh = self.__dict__.get("_file")
            if fh is None:
                fh = self.__dict__["_file"] = open(self.rec_path, "rb", buffering=0)  # noqa: SIM115
            fh.seek(int(self._offsets[j]))
            buf = fh.read(int(self._extents[j]))
            magic, lrec = struct.unpack_from("<II", buf)
            if magic == MAGIC and lrec >> 29 == 0 and 8 + lrec <= len(buf):
                return buf[8 : 8 + lrec]
        return super().read(key, limit)

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "_file"}


class _PlanarTrainSet(TrainSet):
    """``TrainSet`` of the third round: the workers flip and write ``3xHxW`` planes, and the batch
    is ``(images, labels)``."""

    def __getitems__(self, indices: list[int]) -> Any:
        labels = np.empty(len(indices), dtype=np.int64)
        images = None
        for pos, ((image, label), draws) in enumerate(
            zip((self.base[i] for i in indices), self._draws(indices), strict=True)
        ):
            image = self.transform.augment(image, **draws)
            if images is None:
                images = self.batches.start(len(indices), (3, *image.shape[:2]))
            image_planes(image, images[pos])
            labels[pos] = label
        return self.batches.finish(labels)


class _Round2TrainSet(_PlanarTrainSet):
    """``TrainSet`` of the second round: a generator per sample, whatever the transform draws."""

    def _draws(self, indices: list[int]) -> Iterator[dict[str, Any]]:
        return ({"rng": rng} for rng in keyed_generators((self.seed, self.epoch), indices))


def _file_reads(tmp: str) -> RecordIODataset:
    dataset = RecordIODataset(tmp)
    dataset.reader = _FileReadReader(dataset.rec_path)
    return dataset


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Row:
    """One measured method: a function returning the images it handled, its rates per round and,
    for a loader, the CPU seconds its workers and the main process spent."""

    def __init__(self, name: str, fn: Callable[[], int], loader=None) -> None:
        self.name, self.fn, self.loader = name, fn, loader
        self.rates: list[float] = []
        self.images = 0
        self.worker_cpu = self.main_cpu = 0.0

    def run(self) -> None:
        workers = [w.pid for w in self.loader._iterator._workers] if self.loader else []
        before = [_cpu_seconds(pid) for pid in workers]
        main_cpu, start = time.process_time(), time.perf_counter()
        count = self.fn()
        self.rates.append(count / (time.perf_counter() - start))
        self.main_cpu += time.process_time() - main_cpu
        self.worker_cpu += sum(_cpu_seconds(p) - b for p, b in zip(workers, before, strict=True))
        self.images += count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also save the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded too
    cv2.setNumThreads(1)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = [encode_image(im, "jpg", 95) for im in smooth_images(args.num_images, args.size, 0)]
        labels = np.arange(args.num_images) // 10
        write_insightface_rec(
            tmp, zip(jpegs, labels.tolist(), strict=True), image_size=(args.size, args.size)
        )
        transform = TrainTransform(seed=0, normalize=False)
        dataset = RecordIODataset(tmp, transform=transform)
        trainset = TrainSet(RecordIODataset(tmp), transform, seed=0)
        previous = _PerSampleTrainSet(RecordIODataset(tmp), transform, seed=0)
        round2 = _Round2TrainSet(_file_reads(tmp), transform, seed=0)
        planar = _PlanarTrainSet(RecordIODataset(tmp), transform, seed=0)
        n = len(dataset)
        size = args.batch_size
        batches = [list(range(i, i + size)) for i in range(0, n - size + 1, size)]

        def plain_decode() -> int:
            for data in jpegs:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            return n

        def items() -> int:
            for i in range(n):
                dataset[i]
            return n

        def whole_batches(ds: TrainSet) -> Callable[[], int]:
            return lambda: sum(len(collate(ds.__getitems__(b))[1]) for b in batches)

        def loader(ds: TrainSet) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                CarryUserErrors(ds),  # as the trainer builds it
                batch_size=args.batch_size,
                num_workers=args.workers,
                persistent_workers=True,
                shuffle=True,
                drop_last=True,
                collate_fn=collate,
            )

        previous_loader, round2_loader = loader(previous), loader(round2)
        planar_loader, planar_norm = loader(planar), loader(planar)
        loader_now, loader_norm = loader(trainset), loader(trainset)

        def epoch(batches, normalize: bool = False) -> Callable[[], int]:
            def run() -> int:
                count = 0
                for batch in batches:
                    images, labels, *flips = unwrap(batch)
                    if normalize and flips:
                        normalize_images(images, flips[0], channels_last=True)
                    elif normalize:
                        normalize_images(images)
                    count += len(labels)
                return count

            return run

        w = args.workers
        rows = [
            Row("(a) simplejpeg decode (same bytes, in memory)", plain_decode),
            Row("(b) RecordIODataset + TrainTransform(normalize=False), per sample", items),
            Row("(b'1) third round's __getitems__, planar batches, 1 process",
                whole_batches(planar)),
            Row("(b') TrainSet.__getitems__, channels-last batches, 1 process",
                whole_batches(trainset)),
            Row(f"(c) DataLoader, {w} workers, per-sample tensors + default_collate (previous)",
                epoch(previous_loader), previous_loader),
            Row(f"(c'0) DataLoader, {w} workers, whole batches in shared slots, file reads, "
                "a generator per sample (round 2)", epoch(round2_loader), round2_loader),
            Row(f"(c'1) DataLoader, {w} workers, records from a memory map, planar batches "
                "flipped in the workers (round 3)", epoch(planar_loader), planar_loader),
            Row(f"(c') DataLoader, {w} workers, channels-last batches, the flip left to the "
                "device (now)", epoch(loader_now), loader_now),
            Row("(c''1) (c'1) + normalize_images in the main process",
                epoch(planar_norm, normalize=True), planar_norm),
            Row("(c'') (c') + normalize_images(flips, channels_last) in the main process",
                epoch(loader_norm, normalize=True), loader_norm),
        ]  # fmt: skip
        loaders = (previous_loader, round2_loader, planar_loader, loader_now, planar_norm,
                   loader_norm)  # fmt: skip
        for ld in loaders:
            epoch(ld)()  # start the workers
        for _ in range(args.repeats):
            for row in rows:
                row.run()
    load_after = os.getloadavg()

    decode = rows[0].rates
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(
        f"{n} JPEGs of {args.size}x{args.size}, quality 95, mean {mean_kb:.1f} KiB, batches of "
        f"{args.batch_size}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs;"
        f" load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{args.repeats} rounds\n"
    )
    print(
        "| method | images/s (median) | per worker vs (a), median [min-max] "
        "| worker CPU µs/image | main CPU µs/image |"
    )
    print("|---|---:|---:|---:|---:|")
    results = []
    for row in rows:
        per = w if row.loader else 1
        ratios = [r / per / d for r, d in zip(row.rates, decode, strict=True)]
        cpu = row.worker_cpu if row.loader else row.main_cpu
        worker_us, main_us = 1e6 * cpu / row.images, 1e6 * row.main_cpu / row.images
        results.append(
            {
                "method": row.name,
                "images_per_s": row.rates,
                "ratio_to_decode_per_worker": ratios,
                "worker_cpu_us_per_image": worker_us,
                "main_cpu_us_per_image": main_us if row.loader else None,
            }
        )
        main_text = f"{main_us:.0f}" if row.loader else "-"
        print(
            f"| {row.name} | {np.median(row.rates):,.0f} | {np.median(ratios):.0%} "
            f"[{min(ratios):.0%}-{max(ratios):.0%}] | {worker_us:.0f} | {main_text} |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "num_images": n,
                    "size": args.size,
                    "mean_jpeg_bytes": mean_kb * 1024,
                    "workers": w,
                    "batch_size": args.batch_size,
                    "cpus": os.cpu_count(),
                    "load_average": [load_before, load_after],
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
