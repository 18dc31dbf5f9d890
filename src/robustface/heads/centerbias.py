"""CenterBiasFace ("Hard class mining based on center bias estimation"): per-class ArcFace margins.

State: class mean centres ``C`` (num_classes x d; zeros at the start) and the convergence
parameter ``t`` (t0 = 0). Each training step, in the official code's order:

1. ``C[y] <- a * f + (1 - a) * C[y]`` for every labelled sample (a = ``momentum`` = 0.01, raw
   embeddings). Repeated labels apply the EMA once per occurrence in batch order, in closed form:
   a class seen k times with features f_1..f_k gets
   ``C <- (1 - a)^k C + sum_i a (1 - a)^(k - i) f_i`` (the official code keeps only the last
   write for a repeated label);
2. ``t <- a * mean(cos_y) + (1 - a) * t`` over the labelled rows of every shard;
3. hardness ``h_j = 1 - cos(W_j, C_j)`` (``cos(W_j, 0) = 0``: a class not seen yet has h = 1),
   min-max normalised over all classes to ``n_j`` (``n = 0`` when max = min);
4. ``m_j = clamp(m + n_j * t * m_m, m, m + m_m)``; the target becomes ``cos(theta_y + m_y)``
   (continuous fallback of :func:`~robustface.heads.margin.combined_margin_target`).

In eval mode nothing is updated and steps 3-4 use the stored state. Margins carry no gradient.

Inputs (declared in ``needs``). ``embeddings`` (B x d) and the class weights by name, ``weight=``
(count x d: this rank's rows; the cosine column ``c`` is class ``shard.column_classes(C)[c]``,
row ``class - shard.class_offset``). Under Partial FC the centres are sharded like the weight:
``num_classes`` is the global count and ``class_range = (first, count)`` the classes this rank
holds (``first`` must equal ``shard.class_offset``); each rank keeps the rows of its own
classes, and only the rank that owns a label updates that class's centre. The global min/max
of ``h`` and the mean of ``cos_y`` use ``"max"``/``"sum"`` all-reduces, so ``t`` is the same on
every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from robustface.heads.base import (
    HEADS,
    LOCAL,
    HeadNeeds,
    HeadOutput,
    MarginHead,
    ShardContext,
    check_class_range,
    check_head_inputs,
    check_scale,
    target_positions,
)
from robustface.heads.margin import combined_margin_target
from robustface.utils.guards import check_int, check_real

__all__ = ["CenterBiasFaceHead", "ema_rows"]


def ema_rows(state: Tensor, rows: Tensor, values: Tensor, momentum: float) -> Tensor:
    """``state`` after ``state[r] <- a * v + (1 - a) * state[r]`` for each (r, v) in order.

    Closed form per row seen k times: ``(1 - a)^k state + sum_i a (1 - a)^(k - i) v_i``.
    Returns a new tensor.
    """
    keep = 1.0 - momentum
    if rows.numel() == 0:
        return state.clone()
    counts = torch.bincount(rows, minlength=state.size(0))
    order = torch.sort(rows, stable=True).indices
    sorted_rows = rows[order]
    position = torch.arange(rows.numel(), device=rows.device)
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each row
    occurrence = torch.empty_like(rows)
    occurrence[order] = position - first[sorted_rows] + 1  # 1-based, in batch order
    power = (counts[rows] - occurrence).to(state.dtype)
    coef = momentum * torch.pow(torch.full_like(power, keep), power)
    base = torch.full((state.size(0),), keep, dtype=state.dtype, device=state.device)
    out = state * torch.pow(base, counts.to(state.dtype)).unsqueeze(1)
    return out.index_add(0, rows, coef.unsqueeze(1) * values.to(state.dtype))


@HEADS.register("centerbiasface")
class CenterBiasFaceHead(MarginHead):
    """CenterBiasFace: ArcFace with a per-class margin from the class-centre / weight bias.

    Needs ``embeddings`` and ``weight=`` (see the module docstring). ``num_classes`` is the
    global class count, ``class_range`` the ``(first, count)`` of this rank's classes (``None``:
    all). Buffers: ``centers`` (count x embedding_size) and ``t``; the last per-class margins
    are ``last_margins``.
    """

    needs = HeadNeeds(context=("embeddings", "weight"), classes=True)
    class_buffers = ("centers",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        margin: float = 0.4,
        margin_max: float = 0.2,
        momentum: float = 0.01,
        *,
        class_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.embedding_size = check_int("embedding_size", embedding_size, 1)
        self.class_range = check_class_range(class_range, self.num_classes)
        self.scale = check_scale(scale)
        margin, margin_max = check_real("margin", margin), check_real("margin_max", margin_max, 0)
        momentum = check_real("momentum", momentum, 0, 1, open_low=True)
        if margin < 0 or margin + margin_max >= math.pi:
            raise ValueError(
                f"margin must be >= 0 with margin + margin_max < pi radians, got {margin}"
            )
        self.margin, self.margin_max, self.momentum = margin, margin_max, momentum
        self.register_buffer("centers", torch.zeros(self.class_range[1], embedding_size))
        self.register_buffer("t", torch.zeros(()))
        self.last_margins: Tensor | None = None

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        embeddings: Tensor | None = None,
        weight: Tensor | None = None,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """ArcFace logits with margin ``m_y`` per target; in training updates centres, then t."""
        check_head_inputs(cosine, labels)
        first, count = self.class_range
        shape = (count, self.embedding_size)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != shape:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight= (class weights {shape}) is required, got {got}")
        if not isinstance(embeddings, Tensor) or tuple(embeddings.shape) != (
            cosine.size(0),
            self.embedding_size,
        ):
            got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else embeddings
            raise ValueError(
                f"embeddings must be ({cosine.size(0)} x {self.embedding_size}), got {got}"
            )
        if shard.class_offset != first:
            raise ValueError(
                f"shard.class_offset must be the first class of class_range ({first}), "
                f"got {shard.class_offset}"
            )
        class_rows = shard.column_classes(cosine.size(1), device=cosine.device) - first
        if class_rows.numel() and (int(class_rows.min()) < 0 or int(class_rows.max()) >= count):
            raise ValueError(
                f"cosine columns must map to weight rows in [0, {count}), "
                f"got classes {int(class_rows.min())}..{int(class_rows.max())} - offset"
            )
        rows, cols = target_positions(labels)
        cos_y = cosine[rows, cols]
        with torch.no_grad():
            if self.training:
                self.centers.copy_(
                    ema_rows(self.centers, class_rows[cols], embeddings[rows], self.momentum)
                )
                stats = torch.stack(
                    [
                        cos_y.detach().double().sum(),
                        torch.tensor(float(rows.numel()), dtype=torch.float64, device=cos_y.device),
                    ]
                )
                stats = shard.all_reduce(stats, "sum")
                if stats[1] > 0:
                    mean = (stats[0] / stats[1]).to(self.t)
                    self.t.mul_(1.0 - self.momentum).add_(self.momentum * mean)
            w = weight.detach().to(self.centers.dtype)
            c_norm = self.centers.norm(dim=1)
            cos_wc = (w * self.centers).sum(1) / (w.norm(dim=1).clamp(min=1e-12) * c_norm)
            hard = 1.0 - torch.where(c_norm > 0, cos_wc, torch.zeros_like(cos_wc))
            extremes = torch.stack([hard.max(), -hard.min()])
            extremes = shard.all_reduce(extremes, "max")
            h_max, h_min = extremes[0], -extremes[1]
            span = h_max - h_min
            norm = (hard - h_min) / span if bool(span > 0) else torch.zeros_like(hard)
            margins = (self.margin + norm * self.t * self.margin_max).clamp(
                self.margin, self.margin + self.margin_max
            )
            self.last_margins = margins
            m_y = margins[class_rows[cols]].to(cosine.dtype)
        target = combined_margin_target(cos_y, m2=m_y)
        logits = torch.index_put(cosine, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_range={self.class_range}, "
            f"embedding_size={self.embedding_size}, scale={self.scale}, margin={self.margin}, "
            f"margin_max={self.margin_max}, momentum={self.momentum}"
        )
