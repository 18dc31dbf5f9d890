"""CurricularFace (Huang et al., CVPR 2020): an adaptive curriculum over hard negatives.

The target is ArcFace's ``cos(theta_y + m)`` (with the continuous fallback of
:func:`~robustface.heads.margin.combined_margin_target`). A negative that beats the margined
target, ``cos_j > target``, is a hard example and becomes ``cos_j * (t + cos_j)``: early in
training ``t`` is ~0 and hard negatives are damped (``cos_j^2 < |cos_j|``), later ``t`` grows with
the mean target cosine and they are emphasised. ``t`` is an EMA (buffer, ``t0 = 0``)::

    t <- momentum * mean(cos_y) + (1 - momentum) * t

the mean running over every sample with a target on any shard (sum and count all-reduced), from
the batch's detached ``cos_y``. Order: like the official code (HuangYG123/CurricularFace,
``head/metrics.py``, ``CurricularFace.forward``: ``self.t = target_logit.mean() * 0.01 + ...``
comes before ``cos_theta[mask] = hard_example * (self.t + hard_example)``) the buffer is updated
first and the updated ``t`` modulates this batch; in eval mode ``t`` is used unchanged.
Differences from the official code: the hard-negative threshold is our (continuous) target, where
the official mask compares with ``cos(theta_y + m)`` even in the fallback region; the fallback
itself is the continuous one; the modulation's gradient flows through ``cos_j`` only (``t`` is a
statistic), as in the official code.

Sharding: a row's hard negatives may sit on ranks that do not own its target, so every rank
receives each row's (detached) target through one ``all_reduce`` per call, in eval mode too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustface.heads.base import (
    HEADS,
    LOCAL,
    HeadOutput,
    MarginHead,
    ShardContext,
    check_head_inputs,
    check_margin,
    check_scale,
    row_thresholds,
    target_positions,
)
from robustface.heads.margin import combined_margin_target
from robustface.utils.guards import check_real

__all__ = ["CurricularFaceHead"]


@HEADS.register("curricularface")
class CurricularFaceHead(MarginHead):
    """Target ``scale * cos(theta_y + m)``; hard negatives ``scale * cos_j * (t + cos_j)``.

    ``margin`` in [0, pi) radians, ``momentum`` in (0, 1] for the EMA of the mean target cosine
    ``t`` (buffer). Rows whose label is -1 (target on another shard) are left unchanged.
    """

    t: Tensor

    def __init__(self, scale: float = 64.0, margin: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        margin = check_margin("margin (additive angular margin)", margin)
        momentum = check_real(
            "momentum (EMA weight of the batch mean)", momentum, 0, 1, open_low=True
        )
        self.margin, self.momentum = margin, momentum
        self.register_buffer("t", torch.zeros(()))

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """Scaled logits; in training mode ``t`` is updated from this batch first, then used."""
        check_head_inputs(cosine, labels)
        rows, cols = target_positions(labels)
        cos_y = cosine[rows, cols]
        target = combined_margin_target(cos_y, 1.0, self.margin)
        if self.training:
            self._update(cos_y, shard)
        t = self.t.to(cosine.dtype)
        threshold = row_thresholds(target, rows, cosine, shard)
        hard = cosine > threshold.unsqueeze(1)
        logits = torch.where(hard, cosine * (t + cosine), cosine)
        logits = torch.index_put(logits, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    @torch.no_grad()
    def _update(self, cos_y: Tensor, shard: ShardContext) -> None:
        """``t <- momentum * mean(cos_y) + (1 - momentum) * t`` over all shards' targets."""
        dtype = torch.promote_types(cos_y.dtype, torch.float32)
        local = torch.stack(
            [
                cos_y.detach().to(dtype).sum(),
                torch.tensor(cos_y.numel(), dtype=dtype, device=cos_y.device),
            ]
        )
        total, count = shard.all_reduce(local, "sum").unbind()
        mean = total / count.clamp_min(1)
        updated = self.momentum * mean + (1.0 - self.momentum) * self.t.to(dtype)
        self.t.copy_(torch.where(count > 0, updated, self.t.to(dtype)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, momentum={self.momentum}"
