"""Classifier memory per rank: Partial FC (class-sharded, sampled) against a full FC.

For C classes, W ranks, embedding size d and a per-rank batch B, one rank of Partial FC holds
C/W rows of the weight, their gradient and their momentum, and a (B*W) x (rate * C/W) logit matrix
with its gradient. A data-parallel full FC holds all C rows on every rank. The analytic column
counts exactly those tensors (fp32). With ``--device cuda`` each configuration that fits is also run
(forward + backward + SGD step of one rank's shard, single process, global batch B*W) and the peak
allocated memory is measured.

    python benchmarks/partial_fc_memory.py                      # analytic table
    python benchmarks/partial_fc_memory.py --device cuda        # plus measured peaks
"""

from __future__ import annotations

import argparse

import torch

from robustface.fc import PartialFC, distributed_cross_entropy
from robustface.heads import build_head

GIB = 2**30


def analytic_bytes(classes: int, world: int, rate: float, dim: int, batch: int) -> int:
    """fp32 bytes on one rank: weight + grad + momentum of its shard, logits + their gradient."""
    local = -(-classes // world)
    sampled = max(1, int(rate * local))
    return 4 * (3 * local * dim + 2 * batch * world * sampled)


def measured_bytes(classes: int, world: int, rate: float, dim: int, batch: int) -> int:
    """Peak CUDA bytes of one training step of one rank's shard."""
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    local = -(-classes // world)
    fc = PartialFC(dim, local, sample_rate=rate, device=dev).train()
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
    head = build_head("arcface")
    emb = torch.randn(batch * world, dim, device=dev, requires_grad=True)
    labels = torch.randint(0, local, (batch * world,), device=dev)
    out = fc(emb, labels)
    logits = head(out.cosine, out.labels, shard=out.shard)
    distributed_cross_entropy(logits.logits, logits.labels, out.shard).mean().backward()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del fc, opt, emb, labels, out, logits
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-gib", type=float, default=60.0, help="skip measuring above this")
    args = parser.parse_args()
    print(f"embedding {args.dim}, batch {args.batch} per rank, fp32; GiB per rank")
    print("| classes | ranks | classifier | analytic GiB | measured GiB |")
    print("|---|---|---|---|---|")
    for classes in args.classes:
        for world in args.worlds:
            for rate in args.rates:
                if world == 1 and rate < 1.0:
                    continue
                est = analytic_bytes(classes, world, rate, args.dim, args.batch)
                measured = "-"
                if args.device == "cuda" and est / GIB < args.max_gib:
                    measured = (
                        f"{measured_bytes(classes, world, rate, args.dim, args.batch) / GIB:.2f}"
                    )
                name = "full FC (data parallel)" if world == 1 else f"Partial FC, rate {rate}"
                print(f"| {classes:,} | {world} | {name} | {est / GIB:.2f} | {measured} |")


if __name__ == "__main__":
    main()
