"""Per-sample softmax cross-entropy over logits split by class across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustface.heads.base import LOCAL, ShardContext, check_head_inputs, target_positions

__all__ = ["distributed_cross_entropy"]


_BLOCK = 1 << 20
"""Elements of the temporary exponentials block in :func:`_sum_exp` (4 MiB in float32)."""


def _sum_exp(logits: Tensor, row_max: Tensor) -> Tensor:
    """Row sums of ``exp(logits - row_max)``, a block of rows at a time (no B x C temporary)."""
    rows = max(1, _BLOCK // max(1, logits.size(1)))
    return torch.cat(
        [
            torch.sub(block, block_max[:, None]).exp_().sum(dim=1)
            for block, block_max in zip(logits.split(rows), row_max.split(rows), strict=True)
        ]
    )


class _ShardedCrossEntropy(torch.autograd.Function):
    """Cross-entropy whose softmax denominator and target logit are all-reduced over shards.

    Forward: ``loss_i = log(sum_r sum_j exp(z_ij - M_i)) + M_i - z_iy`` with ``M_i`` the global
    row maximum. Backward on each rank: ``(softmax_ij - [j == y_i]) * g_i`` for its own columns,
    which is the exact partial derivative of the (replicated) loss with respect to its logits.
    Memory: the forward sums the exponentials a block of rows at a time, and it saves the logits
    and the (B,) row maxima and sums, not the (B x C) exponentials, which the backward recomputes
    in the gradient's buffer: one (B x C) buffer beyond the logits, where the plain formula has
    three.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, shard: ShardContext) -> Tensor:
        has_target = labels != -1
        if logits.size(1):
            local_max = logits.amax(dim=1)
        else:
            local_max = logits.new_full((logits.size(0),), float("-inf"))
        row_max = shard.all_reduce(local_max, "max")
        sum_exp = shard.all_reduce(_sum_exp(logits, row_max), "sum")
        local_target = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        local_target = torch.where(has_target, local_target, torch.zeros_like(local_target))
        target_and_count = shard.all_reduce(
            torch.stack([local_target, has_target.to(logits.dtype)], dim=1), "sum"
        )
        count = target_and_count[:, 1]
        if logits.size(0) and not bool((count == 1).all()):
            row = int(torch.nonzero(count != 1)[0])
            raise ValueError(
                f"labels: every row's class must be on exactly one shard (label -1 on the "
                f"others), but row {row} has its label on {int(count[row])} of "
                f"{shard.world_size} shard(s)"
            )
        ctx.save_for_backward(logits, row_max, sum_exp, labels)
        return torch.log(sum_exp) + (row_max - target_and_count[:, 0])

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        logits, row_max, sum_exp, labels = ctx.saved_tensors
        grad_logits = torch.sub(logits, row_max[:, None]).exp_()
        grad_logits.mul_((grad_loss / sum_exp)[:, None])
        rows, cols = target_positions(labels)
        grad_logits.index_put_((rows, cols), grad_logits[rows, cols] - grad_loss[rows])
        return grad_logits, None, None


def distributed_cross_entropy(
    logits: Tensor, labels: Tensor, shard: ShardContext = LOCAL
) -> Tensor:
    """Per-sample cross-entropy (B,), no reduction, for logits split over ranks by class.

    ``logits`` (B x C_local) are this rank's columns; ``labels`` (B,) the local column of each
    row's class or -1 where it lives on another rank; exactly one rank must own each row's class
    (a ``ValueError`` on every rank otherwise). Every rank gets the same loss values; reduce them
    the same way on every rank (e.g. ``.mean()``) and call ``backward`` on each, and every rank
    gets the gradient of its own logits. In one process it equals
    ``F.cross_entropy(logits, labels, reduction="none")``. Numerically stable (global row maximum
    subtracted, log-sum-exp rather than the log of a clamped probability); half-precision logits
    are computed in float32.
    """
    check_head_inputs(logits, labels, name="logits")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return _ShardedCrossEntropy.apply(logits, labels.long(), shard)
