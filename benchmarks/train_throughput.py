"""Training throughput (samples/s) of one full step: backbone, classifier, margin head, CE, SGD.

Inputs are random tensors already on the device, so data loading is excluded (see
loader_throughput.py for that). Uses the Trainer's own step on a tiny generated dataset.

    python benchmarks/train_throughput.py                          # CPU: tiny, r18, r50
    python benchmarks/train_throughput.py --device cuda --amp --models r50 r100 --batch-size 128

Prints a Markdown table; ``--json OUT`` saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustface.fc import build_classifier, distributed_cross_entropy
from robustface.heads import build_head
from robustface.models import build_backbone

PRESETS = {"r18_tiny": 56}


def bench(
    name: str,
    batch: int,
    classes: int,
    device: str,
    amp: bool,
    iters: int,
    warmup: int,
    classifier: str,
    sample_rate: float,
) -> dict:
    """Time ``iters`` training steps of ``name`` at its input size; return samples/s."""
    dev = torch.device(device)
    size = PRESETS.get(name, 112)
    backbone = build_backbone(name).to(dev).train()
    kw = {"sample_rate": sample_rate} if classifier == "partial_fc" else {}
    fc = build_classifier(classifier, 512, classes, **kw).to(dev).train()
    head = build_head("arcface").to(dev)
    params = [p for p in [*backbone.parameters(), *fc.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dtype == torch.float16)
    images = torch.randn(batch, 3, size, size, device=dev)
    labels = torch.randint(0, classes, (batch,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=amp):
            emb = backbone(images)
        out = fc(emb.float(), labels)
        logits = head(out.cosine, out.labels, norms=out.norms, shard=out.shard)
        loss = distributed_cross_entropy(logits.logits, logits.labels, out.shard).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {
        "model": name,
        "input": size,
        "batch": batch,
        "classes": classes,
        "classifier": f"{classifier}" + (f"@{sample_rate}" if classifier == "partial_fc" else ""),
        "amp": amp,
        "samples_per_s": batch * iters / seconds,
        "ms_per_step": 1000 * seconds / iters,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["r18_tiny", "r18", "r50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--classifier", default="partial_fc")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        rows.append(
            bench(
                model,
                args.batch_size,
                args.classes,
                args.device,
                args.amp,
                args.iters,
                args.warmup,
                args.classifier,
                args.sample_rate,
            )
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | input | batch | classes | classifier | AMP | samples/s | ms/step | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(
            f"| {r['model']} | {r['input']} | {r['batch']} | {r['classes']} | {r['classifier']} | "
            f"{'yes' if r['amp'] else 'no'} | {r['samples_per_s']:.0f} | {r['ms_per_step']:.0f} | "
            f"{peak} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
