"""BoundaryFace (Wu and Wu, ECCV 2022): ArcFace with label self-correction and a boundary term.

Until ``epoch_start`` (0-based ``epoch`` from the forward context; < epoch_start) the head is
plain ArcFace. From then on, for each sample with label y, ``phi_j = cos(theta_j + m)`` and
``relu(x) = max(0, x)``, the head relabels and adds a boundary term in one of two forms
(``formula``):

``"official"`` (default: the official code, ``head/boundaryMargin.py``, which produced the
published numbers). It masks the cosine matrix with the one-hot label, so the masked columns'
zeros enter both maxima::

    y' = argmax_{j != y} phi_j  if max(0, max_{j != y} phi_j) > max(0, cos_y)  else y
    extra_loss = lam * relu(max(0, max_{j != y'} cos_j) - max(0, phi_y'))

``"paper"`` (the paper's formulas, as written)::

    y' = argmax_{j != y} phi_j  if max_{j != y} phi_j > cos_y  else y
    extra_loss = lam * relu(max_{j != y'} cos_j - phi_y')

They differ only where a cosine or ``phi`` is negative: the official form never relabels a
sample whose best ``phi_j`` is <= 0, and it drops the negative part of both maxima, so for the
same ``y'`` its boundary term is never larger (mean 0.37 against the paper's 0.87 on the hard
batch of ``tests/test_heads_boundaryface.py``). The corrected label ``y'`` holds for this step only;
the logits are ArcFace logits for ``y'``. ``phi`` is increasing in ``cos``, so
``argmax_{j != y} phi_j`` is the largest non-target cosine.

Deliberate deviations from the official code:

- ``phi`` beyond ``theta = pi - m`` is the package's continuous fallback
  (:func:`~robustface.heads.margin.combined_margin_target`) instead of ArcFace's
  ``cos - m sin(m)``. Under ``"official"`` this changes only the target logit there: a negative
  ``phi`` never relabels and is clamped to 0 in the boundary term.
- The official code switches at ``epoch > epoch_start``; here "before ``epoch_start``" means
  ``epoch < epoch_start`` with 0-based epochs (the paper: 7 on WebFace, 10 on MS1M).
- ``extra_loss`` is per sample; the trainer averages it with the cross-entropy (the official code
  takes the batch mean of each rank's batch, times pi). Ties for the argmax go to the lowest
  global class id (the official ``torch.max`` takes the first column, the same on one shard).
- The official code appends every relabelled image path to a hard-coded file; here the number of
  corrected labels of the last forward is ``last_corrected``.

Shards. Maxima over classes are taken locally, then with a ``"max"`` all-reduce; the owner of
a maximum is the rank whose local maximum equals the global one, ties going to the lowest global
class id (a second ``"max"`` reduction of ``-id``). Target cosines are shared with a ``"sum"``
all-reduce. The corrected label is the owner's local column and -1 elsewhere (also on the rank
of the original label). ``extra_loss`` has the same value on every rank; its gradient flows only
through the cosines the owning ranks hold (the official clamps at 0 act on the global values, so
they agree on every rank). Under Partial FC with sampled classes the maxima run over the sampled
columns. Sharing happens only when the classes are split (``shard.distributed`` with
``cosine.size(1) < shard.num_classes``); otherwise every rank works on its own rows
(data-parallel full FC).
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
    check_head_inputs,
    check_margin,
    check_scale,
    target_positions,
)
from robustface.heads.margin import combined_margin_target
from robustface.utils.guards import check_choice, check_int, check_real

__all__ = ["BoundaryFaceHead", "global_row_max"]

_BELOW = -3.0
"""Stands in for excluded columns: below every cosine."""

FORMULAS = ("official", "paper")
"""``formula`` choices: the official code's masked maxima, or the paper's formulas."""


def classes_split(cosine: Tensor, shard: ShardContext) -> bool:
    """True when this rank holds only part of the classes of a distributed shard group."""
    return (
        shard.distributed and shard.num_classes is not None and cosine.size(1) < shard.num_classes
    )


def global_row_max(
    values: Tensor, shard: ShardContext, split: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row maxima of ``values`` (B x C_local) over every shard's columns.

    Returns the detached global maximum (B,), whether this rank owns it (B,) bool, the local
    column of this rank's maximum (B,) and the differentiable local maximum (B,).
    """
    local_max, local_col = values.max(dim=1)
    if not split:
        return (
            local_max.detach(),
            torch.ones_like(local_col, dtype=torch.bool),
            local_col,
            local_max,
        )
    global_max = shard.all_reduce(local_max, "max")
    ids = shard.column_classes(values.size(1), device=values.device)
    hit = values.detach() == global_max.unsqueeze(1)
    neg_ids = torch.where(hit, -ids.unsqueeze(0), torch.full_like(hit, -(2**62), dtype=torch.long))
    local_best = neg_ids.max(dim=1).values
    global_best = shard.all_reduce(local_best, "max")
    owner = (local_best == global_best) & hit.any(dim=1)
    local_col = torch.where(
        owner, (ids.unsqueeze(0) == -global_best.unsqueeze(1)).long().argmax(1), local_col
    )
    return global_max, owner, local_col, values.gather(1, local_col.unsqueeze(1)).squeeze(1)


@HEADS.register("boundaryface")
class BoundaryFaceHead(MarginHead):
    """BoundaryFace: ArcFace, then label self-correction and ``lam`` * the boundary term.

    Needs ``epoch`` (0-based int) in the forward context. ``lam = 0`` is "BoundaryF1".
    ``formula``: ``"official"`` (default, the official code) or ``"paper"`` (module docstring).
    ``last_corrected``: the number of labels corrected in the last forward (in :meth:`stats`).
    """

    needs = HeadNeeds(context=("epoch",))

    def __init__(
        self,
        scale: float = 32.0,
        margin: float = 0.5,
        epoch_start: int = 10,
        lam: float = math.pi,
        formula: str = "official",
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.margin = check_margin("margin", margin)
        self.lam = check_real("lam (boundary weight)", lam, 0)
        self.epoch_start = check_int("epoch_start", epoch_start, 0)
        self.formula = check_choice("formula", formula, FORMULAS)
        self.last_corrected = 0

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        epoch: int | None = None,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """ArcFace logits for the (corrected) labels; ``extra_loss`` from ``epoch_start`` on."""
        check_head_inputs(cosine, labels)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch (0-based int) is required in the context, got {epoch!r}")
        labels = labels.long()
        if epoch < self.epoch_start:
            self.last_corrected = 0
            return HeadOutput(logits=self._arcface(cosine, labels), labels=labels)
        split = classes_split(cosine, shard)
        official = self.formula == "official"
        own = labels.unsqueeze(1) == torch.arange(cosine.size(1), device=cosine.device)
        rows = torch.nonzero(labels != -1).squeeze(1)
        with torch.no_grad():
            cos_y = torch.zeros(cosine.size(0), dtype=cosine.dtype, device=cosine.device)
            cos_y[rows] = cosine[rows, labels[rows]]
            if split:
                cos_y = shard.all_reduce(cos_y, "sum")
            others = torch.where(own, torch.full_like(cosine, _BELOW), cosine.detach())
            best, owner, col, _ = global_row_max(others, shard, split)
            if official:  # the zeros of the masked columns enter both maxima
                cos_y = cos_y.clamp(min=0.0)
            corrected = combined_margin_target(best, m2=self.margin) > cos_y
            new_labels = torch.where(corrected, torch.where(owner, col, -1), labels)
            self.last_corrected = int(corrected.sum())
        new_own = new_labels.unsqueeze(1) == torch.arange(cosine.size(1), device=cosine.device)
        # max_{j != y'} cos_j, same value everywhere, gradient only on the owning rank
        rest = torch.where(new_own, torch.full_like(cosine, _BELOW), cosine)
        neg_max, neg_owner, _, neg_local = global_row_max(rest, shard, split)
        neg = neg_max + torch.where(neg_owner, neg_local - neg_local.detach(), 0.0)
        new_rows = torch.nonzero(new_labels != -1).squeeze(1)
        target_local = torch.zeros(cosine.size(0), dtype=cosine.dtype, device=cosine.device)
        target_local = torch.index_put(
            target_local,
            (new_rows,),
            combined_margin_target(cosine[new_rows, new_labels[new_rows]], m2=self.margin),
        )
        target_sum = shard.all_reduce(target_local, "sum") if split else target_local.detach()
        target = target_sum + (target_local - target_local.detach())
        if official:
            neg, target = neg.clamp(min=0.0), target.clamp(min=0.0)
        extra = self.lam * (neg - target).clamp(min=0.0)
        return HeadOutput(
            logits=self._arcface(cosine, new_labels), labels=new_labels, extra_loss=extra
        )

    def stats(self) -> dict[str, float]:
        """``last_corrected``: the labels corrected in the last forward."""
        return {**super().stats(), "last_corrected": float(self.last_corrected)}

    def _arcface(self, cosine: Tensor, labels: Tensor) -> Tensor:
        rows, cols = target_positions(labels)
        target = combined_margin_target(cosine[rows, cols], m2=self.margin)
        return torch.index_put(cosine, (rows, cols), target) * self.scale

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, epoch_start={self.epoch_start}, "
            f"lam={self.lam}, formula={self.formula!r}"
        )
