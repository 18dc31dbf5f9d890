"""Backbone training throughput: forward + backward images/s, printed as a Markdown table.

Each model runs at its own default input size (``r18_tiny``: 56 px, the others 112 px) with a
float32 embedding and ``loss = mean(embedding**2)``; parameters, forward GMACs per image (conv and
linear only, from ``torch.utils.flop_counter``) and peak GPU memory are reported alongside.

CPU (all cores)::

    .venv/bin/python benchmarks/backbone_speed.py --iters 3 --json bench.json

GPU with mixed precision (the model's ``fp16`` flag: trunk in float16 autocast)::

    python benchmarks/backbone_speed.py --device cuda --amp --batch-size 128 --iters 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from robustface.models import build_backbone, list_backbones
from robustface.utils.table import markdown_table


def forward_gmacs(name: str) -> float:
    """Forward GMACs per image, counted on the meta device (no compute, no memory)."""
    with torch.device("meta"):
        model = build_backbone(name).eval()
        x = torch.empty(1, 3, model.input_size, model.input_size)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    return counter.get_total_flops() / 2e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, *, device: torch.device, batch_size: int, iters: int, warmup: int, amp: bool
) -> dict[str, Any]:
    """Time ``iters`` forward+backward steps of ``name`` after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = build_backbone(name, fp16=amp).to(device).train()
    size = model.input_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    return {
        "model": name,
        "input": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": forward_gmacs(name),
        "batch": batch_size,
        "ms_per_step": seconds * 1e3,
        "images_per_s": batch_size / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="r18_tiny,r18,r50", help="comma-separated names")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="set the backbones' fp16 flag")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in list_backbones()]
    if unknown:
        print(f"unknown backbone(s): {', '.join(unknown)}; valid: {', '.join(list_backbones())}")
        return 2
    if args.batch_size < 2 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        print("need --batch-size >= 2 (BatchNorm1d), --iters >= 1, --warmup >= 0, --threads >= 1")
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [
        measure(
            n,
            device=device,
            batch_size=args.batch_size,
            iters=args.iters,
            warmup=args.warmup,
            amp=args.amp,
        )
        for n in names
    ]
    where = f"{device.type}" + (
        f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    )
    print(f"forward+backward on {where}, amp={args.amp}, torch {torch.__version__}\n")
    headers = ["model", "input", "params (M)", "fwd GMACs/img", "batch", "ms/step", "images/s"]
    rows = [
        [
            r["model"],
            r["input"],
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.3f}",
            r["batch"],
            f"{r['ms_per_step']:.0f}",
            f"{r['images_per_s']:.1f}",
        ]
        for r in results
    ]
    if device.type == "cuda":
        headers.append("peak GB")
        for row, r in zip(rows, results, strict=True):
            row.append(f"{r['peak_mem_gb']:.2f}")
    print(markdown_table(headers, rows))
    if args.json:
        meta = {"device": str(device), "amp": args.amp, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
