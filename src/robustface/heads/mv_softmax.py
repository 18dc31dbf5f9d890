"""MV-Softmax (Wang et al., AAAI 2020): mis-classified vector guided softmax.

A negative that beats the margined target (a *mis-classified vector*) is emphasised with a fixed
weight: ``cos_j > target`` turns ``cos_j`` into ``(t + 1) * cos_j + t``; other negatives keep
``cos_j``. Two targets:

* ``variant="am"`` (MV-AM-Softmax): ``target = cos_y - m`` (CosFace margin), s = 32, m = 0.35;
* ``variant="arc"`` (MV-Arc-Softmax): ``target = cos(theta_y + m)`` with the continuous fallback
  of :func:`~robustface.heads.margin.combined_margin_target`.

``t = 0.2`` is the paper's fixed MV weight (FaceX-Zoo's ``MV_Softmax`` writes it as
``mv_weight = 1 + t``, default 1.12). Unlike FaceX-Zoo, which applies the AM margin only where
``cos_y > m`` and the Arc margin only where ``cos_y > 0`` (easy margin), the margin here always
applies (the Arc variant with our continuous fallback). Stateless, but a row's mis-classified
negatives may sit on ranks that do not own its target, so every rank receives each row's
(detached) target through one ``all_reduce`` per call.
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
from robustface.utils.guards import check_choice, check_real

__all__ = ["MVSoftmaxHead", "mv_arc"]

VARIANTS = ("am", "arc")


@HEADS.register("mv_softmax")
class MVSoftmaxHead(MarginHead):
    """Margined target; negatives with ``cos_j > target`` become ``(t + 1) * cos_j + t``.

    ``variant`` ``"am"``: target ``cos_y - margin`` (margin >= 0, a cosine offset); ``"arc"``:
    target ``cos(theta_y + margin)`` (margin in [0, pi) radians). ``t`` >= 0. Rows whose label
    is -1 (target on another shard) are left unchanged.
    """

    def __init__(
        self, scale: float = 32.0, margin: float = 0.35, t: float = 0.2, variant: str = "am"
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        check_choice("variant", variant, VARIANTS)
        if variant == "am":
            margin = check_real("margin (additive cosine margin)", margin, 0)
        else:
            margin = check_margin("margin (additive angular margin)", margin)
        t = check_real("t (weight of mis-classified negatives)", t, 0)
        self.margin, self.t, self.variant = margin, t, variant

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """Scaled logits with the margined target and the re-weighted mis-classified negatives."""
        check_head_inputs(cosine, labels)
        rows, cols = target_positions(labels)
        cos_y = cosine[rows, cols]
        if self.variant == "am":
            target = cos_y - self.margin
        else:
            target = combined_margin_target(cos_y, 1.0, self.margin)
        threshold = row_thresholds(target, rows, cosine, shard)
        hard = cosine > threshold.unsqueeze(1)
        logits = torch.where(hard, (self.t + 1.0) * cosine + self.t, cosine)
        logits = torch.index_put(logits, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, t={self.t}, variant={self.variant!r}"


@HEADS.register("mv_arc")
def mv_arc(scale: float = 32.0, margin: float = 0.5, t: float = 0.2) -> MarginHead:
    """MV-Arc-Softmax: ArcFace target ``cos(theta_y + m)``, m = 0.5 rad (ArcFace's), s = 32."""
    return MVSoftmaxHead(scale=scale, margin=margin, t=t, variant="arc")
