"""Shared pieces of the robust-head tests: the ArcFace target in plain Python, random batches,
two fake ranks (threads) that all-reduce through a hub, and a loss-falls training loop."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustface.fc import FullFC
from robustface.fc.loss import distributed_cross_entropy
from robustface.heads import ShardContext


def arc_target(c: float, m: float) -> float:
    """cos(theta + m) with the continuous fallback beyond theta_c = pi - m."""
    theta = math.acos(min(max(c, -1 + 1e-6), 1 - 1e-6))
    if theta <= math.pi - m:
        return math.cos(theta + m)
    return c - (1.0 + math.cos(math.pi - m))


def random_batch(seed, rows=24, cols=7, drop=0.0):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.95, 0.95, size=(rows, cols))
    labels = rng.integers(0, cols, size=rows)
    labels[rng.random(rows) < drop] = -1
    # some targets close to their label so that easy, hard and noise pairs all occur
    near = rng.random(rows) < 0.5
    cos[near, labels[near]] = rng.uniform(0.3, 0.9, size=int(near.sum()))
    return torch.from_numpy(cos), torch.from_numpy(labels)


class _Hub:
    """Lets two threads (one per fake rank) all-reduce real tensors with each other."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=20)

    def reduce(self, rank: int, tensor: Tensor, op: str) -> Tensor:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        stacked = torch.stack([s for s in self.slots if s is not None])
        out = stacked.sum(0) if op == "sum" else stacked.max(0).values
        self.barrier.wait()
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class ThreadShard(ShardContext):
    """A ShardContext whose all_reduce combines the threads' local values through a hub."""

    hub: Any = None

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        assert op in ("sum", "max")
        return self.hub.reduce(self.rank, tensor, op)


def run_sharded(make_head, cosine, labels, steps=2, split=4, context=None, per_shard=None):
    """Run ``steps`` forwards on two column shards in two threads; returns heads and outputs."""
    num = cosine.size(1)
    hub = _Hub(2)
    bounds = [(0, split), (split, num)]
    heads = [make_head(r) for r in range(2)]
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(rank):
        try:
            lo, hi = bounds[rank]
            shard = ThreadShard(rank=rank, world_size=2, class_offset=lo, num_classes=num, hub=hub)
            local = torch.where((labels >= lo) & (labels < hi), labels - lo, -1)
            outs = []
            for _ in range(steps):
                extra = per_shard(rank, lo, hi) if per_shard else {}
                outs.append(
                    heads[rank](cosine[:, lo:hi], local, shard=shard, **(context or {}), **extra)
                )
            results[rank] = outs
        except BaseException as err:  # pragma: no cover - surfaced below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return heads, results


def train_loss_falls(head, steps=30, **context):
    torch.manual_seed(0)
    emb = torch.randn(32, 16) + 2.0 * torch.randn(8, 16).repeat_interleave(4, 0)
    labels = torch.arange(8).repeat_interleave(4)
    fc = FullFC(16, 8)
    opt = torch.optim.SGD(list(fc.parameters()) + list(head.parameters()), lr=1.0)
    losses = []
    for _ in range(steps):
        out = fc(emb, labels)
        kw = dict(context)
        if "weight" in kw:
            kw["weight"] = fc.weight
        hout = head(out.cosine, out.labels, norms=out.norms, embeddings=out.embeddings, **kw)
        loss = distributed_cross_entropy(hout.logits, hout.labels, out.shard)
        if hout.extra_loss is not None:
            loss = loss + hout.extra_loss
        loss = loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
