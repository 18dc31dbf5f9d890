"""Partial FC (An et al., CVPR 2022): the class-sharded cosine classifier with negative sampling.

Rank ``r`` of ``W`` owns ``C // W + (r < C % W)`` consecutive classes starting at
``C // W * r + min(r, C % W)`` (:func:`shard_bounds`, insightface ``partial_fc_v2``'s split). Each
step every rank gathers the whole batch (embeddings and labels of every rank), keeps the labels
of its own classes (-1 elsewhere) and computes the cosine with its weight shard; in training mode
with ``sample_rate < 1`` only the positive classes of the batch plus random negatives, in total
``max(1, int(sample_rate * C_local))`` columns (more if the batch has more positives), take part.
The margin head then works on local columns and
:func:`~robustface.fc.loss.distributed_cross_entropy` combines the shards.
``sample_rate = 1`` is plain model parallelism.

Gradients. The embedding all-gather is differentiable: its backward sums the gradient over ranks
and gives each rank the slice of its own samples (reduce-scatter semantics, done with an
all-reduce so that gloo works too). With the same loss reduction on every rank, each rank then
holds the exact gradient of the *global* loss for its local embeddings and its weight shard. A
backbone wrapped in DistributedDataParallel averages its gradients over ranks, so the backbone
gradient it ends with is ``1 / W`` of the global loss's gradient; multiply the loss (or the
backbone's learning rate) by ``W`` to train the backbone on the global loss.

Initial weights: each rank draws its shard from a generator seeded with ``torch.initial_seed()``
and its rank, so the shards differ even when every rank was seeded alike (the usual DDP set-up).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustface.fc.base import CLASSIFIERS, Classifier, FCOutput
from robustface.fc.full import (
    check_embeddings,
    check_global_labels,
    check_sizes,
    normalized_cosine,
)
from robustface.heads.base import ShardContext
from robustface.utils.guards import check_real

__all__ = ["PartialFC", "gather_rows", "reshard_rows", "shard_bounds"]


def shard_bounds(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, count)`` of the classes rank ``rank`` of ``world_size`` owns."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def reshard_rows(full: Tensor, num_classes: int, rank: int, world_size: int) -> Tensor:
    """The rows of ``full`` (C x ...) that rank ``rank`` of ``world_size`` owns, as a copy.

    Works for anything stored per class: weights, optimizer momentum, per-class head buffers.
    Resuming on another world size: concatenate the old shards in rank order, then reshard.
    """
    if full.dim() < 1 or full.size(0) != num_classes:
        raise ValueError(
            f"full must have num_classes = {num_classes} rows, got shape {tuple(full.shape)}"
        )
    start, count = shard_bounds(num_classes, rank, world_size)
    return full[start : start + count].clone()


def _group_info(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    if group is not None:
        raise ValueError("group was given but torch.distributed is not initialised")
    return 0, 1


def _gather_padded(tensor: Tensor, sizes: list[int], group: Any) -> Tensor:
    """Concatenate every rank's ``tensor`` (rank r has ``sizes[r]`` rows) in rank order."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.size(0)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _AllGatherRows(torch.autograd.Function):
    """All-gather of row blocks whose backward hands each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], rank: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(local: Tensor, num_classes: int, group: Any = None) -> Tensor | None:
    """Reassemble a class-sharded tensor (this rank's rows of a C x ... tensor).

    A collective: every rank of ``group`` calls it. Returns the full tensor on the group's rank 0
    and ``None`` on the others (so no other rank holds the whole thing); in one process, a copy.
    """
    rank, world_size = _group_info(group)
    count = shard_bounds(num_classes, rank, world_size)[1]
    if local.dim() < 1 or local.size(0) != count:
        raise ValueError(
            f"local must hold this rank's {count} rows of {num_classes}, "
            f"got shape {tuple(local.shape)}"
        )
    if world_size == 1:
        return local.detach().clone()
    longest = shard_bounds(num_classes, 0, world_size)[1]
    padded = local.detach().new_zeros((longest, *local.shape[1:]))
    padded[:count] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dst = 0 if group is None else dist.get_global_rank(group, 0)
    dist.gather(padded, parts, dst=dst, group=group)
    if parts is None:
        return None
    counts = [shard_bounds(num_classes, r, world_size)[1] for r in range(world_size)]
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


@CLASSIFIERS.register("partial_fc")
class PartialFC(Classifier):
    """Class-sharded cosine classifier with sampled negatives (see the module docstring).

    ``group``: the process group sharing the classes (``None``: the default group). Without an
    initialised ``torch.distributed`` it is a single shard holding every class (sampling still
    applies in training mode). ``weight`` is this rank's (C_local x d) shard.
    """

    shard_bounds = staticmethod(shard_bounds)
    sharded = True

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        group: Any = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(embedding_size, num_classes)
        sample_rate = check_real("sample_rate", sample_rate, 0, 1, open_low=True)
        rank, world_size = _group_info(group)
        if num_classes < world_size:
            raise ValueError(
                f"num_classes must be >= the world size ({world_size}) so that every rank owns "
                f"a class, got {num_classes}"
            )
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.class_start, self.num_local = shard_bounds(num_classes, rank, world_size)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        generator = torch.Generator(device=device or "cpu")
        generator.manual_seed((torch.initial_seed() + 1_000_003 * rank) % (1 << 63))
        weight = torch.empty(self.num_local, embedding_size, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight.normal_(0, 0.01, generator=generator))

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> FCOutput:
        """Gather the batch from every rank and return this shard's (sampled) cosines."""
        check_embeddings(local_embeddings, self.embedding_size)
        check_global_labels(local_labels, self.num_classes, local_embeddings.size(0))
        labels, embeddings = local_labels.long(), local_embeddings
        if self.world_size > 1:
            size = torch.tensor([local_embeddings.size(0)], device=local_embeddings.device)
            sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group)
            batch_sizes = [int(s) for s in sizes]
            labels = _gather_padded(labels, batch_sizes, self.group)
            embeddings = _AllGatherRows.apply(embeddings, batch_sizes, self.rank, self.group)

        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local = torch.where(in_shard, labels - self.class_start, -1)
        weight, class_ids = self.weight, None
        if self.training and self.num_sample < self.num_local:
            index = self._sample(local[in_shard])
            local = torch.where(in_shard, torch.searchsorted(index, local.clamp(min=0)), -1)
            weight, class_ids = self.weight[index], index + self.class_start
        return FCOutput(
            cosine=normalized_cosine(embeddings, weight),
            labels=local,
            shard=ShardContext(
                rank=self.rank,
                world_size=self.world_size,
                class_offset=self.class_start,
                num_classes=self.num_classes,
                class_ids=class_ids,
                group=self.group,
            ),
            embeddings=embeddings,
            norms=embeddings.norm(dim=1),
            weight=self.weight,
        )

    def _sample(self, positives: Tensor) -> Tensor:
        """Sorted local class indices: all positives plus random negatives, ``num_sample`` total."""
        positives = torch.unique(positives)
        if positives.numel() >= self.num_sample:
            return positives
        scores = torch.rand(self.num_local, device=self.weight.device)
        scores[positives] = 2.0
        return torch.topk(scores, self.num_sample).indices.sort().values

    @property
    def class_range(self) -> tuple[int, int]:
        """``(class_start, num_local)``: the classes this rank owns."""
        return self.class_start, self.num_local

    def class_centres(self) -> Tensor | None:
        """The full (C x d) weight on rank 0 of the group, ``None`` elsewhere (a collective)."""
        return self.gather_full_weight()

    def gather_full_weight(self) -> Tensor | None:
        """The full (C x d) weight on rank 0 of the group, ``None`` elsewhere (a collective)."""
        return gather_rows(self.weight, self.num_classes, self.group)

    def load_full_weight(self, weight: Tensor) -> None:
        """Copy this rank's rows of a full (C x d) weight into the shard (not a collective)."""
        if weight.dim() != 2 or weight.size(1) != self.embedding_size:
            raise ValueError(
                f"weight must be (num_classes x {self.embedding_size}), got {tuple(weight.shape)}"
            )
        rows = reshard_rows(weight, self.num_classes, self.rank, self.world_size)
        with torch.no_grad():
            self.weight.copy_(rows)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"sample_rate={self.sample_rate}, rank={self.rank}/{self.world_size}, "
            f"classes=[{self.class_start}, {self.class_start + self.num_local})"
        )
