"""Classifier memory per rank: Partial FC (class-sharded, sampled) against a full FC.

For C classes, W ranks, embedding size d and a per-rank batch B, one rank of Partial FC holds
C/W rows of the weight, their gradient and their momentum, and a (B*W) x (rate * C/W) logit matrix
with its gradient. A data-parallel full FC holds all C rows on every rank. The analytic column
counts exactly those tensors (fp32). With ``--measure`` each configuration under ``--max-gib`` is
also run (forward + backward + SGD step of one rank's shard with the ArcFace head, single process,
global batch B*W) and its peak memory measured, twice: with the package's in-place cosine clamp,
fused margin logits and cross-entropy (``new``) and with the previous formulas, written out below
(``old``: out-of-place clamp, ``index_put`` copy then scale, cross-entropy saving the
exponentials). On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the peak of
the bytes held by live tensor storages, tracked op by op with a dispatch mode (``PeakTracker``).

    python benchmarks/partial_fc_memory.py                                   # analytic table
    python benchmarks/partial_fc_memory.py --measure --device cuda           # plus measured peaks
    python benchmarks/partial_fc_memory.py --measure --classes 100000 1000000 --max-gib 4  # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import weakref
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from robustface.fc import PartialFC, distributed_cross_entropy
from robustface.heads import build_head
from robustface.heads.base import target_positions
from robustface.heads.margin import combined_margin_target

GIB = 2**30


class PeakTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once, counting those created under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


class _OldCrossEntropy(torch.autograd.Function):
    """The previous single-process cross-entropy: saves the (B x C) exponentials."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        row_max = logits.amax(dim=1)
        shifted_exp = torch.exp(logits - row_max[:, None])
        sum_exp = shifted_exp.sum(dim=1)
        ctx.save_for_backward(shifted_exp, sum_exp, labels)
        return torch.log(sum_exp) + (row_max - logits.gather(1, labels[:, None]).squeeze(1))

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None]:
        shifted_exp, sum_exp, labels = ctx.saved_tensors
        grad_logits = shifted_exp * (grad_loss / sum_exp)[:, None]
        rows, cols = target_positions(labels)
        grad_logits = torch.index_put(
            grad_logits, (rows, cols), grad_logits[rows, cols] - grad_loss[rows]
        )
        return grad_logits, None


def old_normalized_cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    """The previous cosine: an out-of-place clamp, which keeps the unclamped product."""
    return F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)


def old_arcface_loss(cosine: Tensor, labels: Tensor, scale: float = 64.0) -> Tensor:
    """The previous ArcFace head and cross-entropy: ``index_put`` copy, then scale, then CE."""
    rows, cols = target_positions(labels)
    target = combined_margin_target(cosine[rows, cols], m2=0.5)
    logits = torch.index_put(cosine, (rows, cols), target) * scale
    return _OldCrossEntropy.apply(logits, labels)


def step_loss(fc: PartialFC, emb: Tensor, labels: Tensor, old: bool) -> Tensor:
    """The mean loss, holding nothing else once it returns (as the trainer's ``_forward_loss``)."""
    if old:
        with mock.patch("robustface.fc.partial_fc.normalized_cosine", old_normalized_cosine):
            out = fc(emb, labels)
        return old_arcface_loss(out.cosine, out.labels).mean()
    out = fc(emb, labels)
    head_out = build_head("arcface")(out.cosine, out.labels, shard=out.shard)
    return distributed_cross_entropy(head_out.logits, head_out.labels, out.shard).mean()


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Yield a dict whose ``"peak"`` holds the peak bytes of the block once it exits."""
    result = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated()
    else:
        with PeakTracker() as tracker:
            yield result
        result["peak"] = tracker.peak


def analytic_bytes(classes: int, world: int, rate: float, dim: int, batch: int) -> int:
    """fp32 bytes on one rank: weight + grad + momentum of its shard, logits + their gradient."""
    local = -(-classes // world)
    sampled = max(1, int(rate * local))
    return 4 * (3 * local * dim + 2 * batch * world * sampled)


def measured_bytes(
    classes: int, world: int, rate: float, dim: int, batch: int, device: str, old: bool
) -> int:
    """Peak bytes of one training step of one rank's shard (``old``: the unfused formulas)."""
    dev = torch.device(device)
    local = -(-classes // world)
    with peak_memory(dev) as result:
        fc = PartialFC(dim, local, sample_rate=rate, device=dev).train()
        opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
        emb = torch.randn(batch * world, dim, device=dev, requires_grad=True)
        labels = torch.randint(0, local, (batch * world,), device=dev)
        step_loss(fc, emb, labels, old).backward()
        opt.step()
        del fc, opt, emb, labels
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure", action="store_true", help="also measure the peaks")
    parser.add_argument("--max-gib", type=float, default=60.0, help="skip measuring above this")
    args = parser.parse_args()
    print(f"embedding {args.dim}, batch {args.batch} per rank, fp32; GiB per rank")
    print("| classes | ranks | classifier | analytic GiB | old GiB | new GiB | new / analytic |")
    print("|---|---|---|---|---|---|---|")
    for classes in args.classes:
        for world in args.worlds:
            for rate in args.rates:
                if world == 1 and rate < 1.0:
                    continue
                est = analytic_bytes(classes, world, rate, args.dim, args.batch)
                cells = ["-", "-", "-"]
                if args.measure and est / GIB < args.max_gib:
                    old, new = (
                        measured_bytes(
                            classes, world, rate, args.dim, args.batch, args.device, is_old
                        )
                        for is_old in (True, False)
                    )
                    cells = [f"{old / GIB:.3f}", f"{new / GIB:.3f}", f"{new / est:.2f}"]
                name = "full FC (data parallel)" if world == 1 else f"Partial FC, rate {rate}"
                print(f"| {classes:,} | {world} | {name} | {est / GIB:.3f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
