"""Normalised softmax and the combined angular margin (SphereFace m1, ArcFace m2, CosFace m3).

The combined margin (ArcFace paper, eq. 4) replaces the target cosine ``cos(theta_y)`` by
``cos(m1 * theta_y + m2) - m3``; the negatives keep ``cos(theta_j)``; all logits are multiplied by
``scale``. Margins are in radians (m2), a factor (m1) or a cosine offset (m3).

Fallback beyond pi. ``cos(m1 * theta + m2)`` stops decreasing once ``m1 * theta + m2`` passes
``pi``, i.e. beyond ``theta_c = (pi - m2) / m1``, so a sample pushed far from its class would be
pulled the wrong way. ArcFace replaces the target there by ``cos(theta) - m2 * sin(m2)`` (written
``cos - sin(pi - m2) * m2``): a first-order estimate of the margin's cost at ``theta_c``. It is
monotone but not continuous: at ``theta_c`` the target jumps from ``-1`` down to
``-cos(m2) - m2 * sin(m2)`` (-1.117 for m2 = 0.5). We keep ArcFace's form, ``cos(theta)`` minus a
constant, with the constant chosen so the target is continuous at ``theta_c``: the exact cost of
the margin there, ``cos(theta_c) - cos(pi) = 1 + cos(theta_c)``::

    target(theta) = cos(m1 * theta + m2) - m3                 theta <= theta_c
                    cos(theta) - (1 + cos(theta_c)) - m3      theta >  theta_c

For m1 = 1 the constant is ``1 - cos(m2)`` (0.1224 for m2 = 0.5, against ArcFace's 0.2397). The
target is continuous and strictly decreasing on [0, pi] for every m1 > 0 and 0 <= m2 < pi (with
m1 < 1, ``theta_c`` may exceed pi and there is no fallback region). ``easy_margin`` instead applies
the margin only where ``cos(theta_y) > 0`` and keeps the plain cosine elsewhere (discontinuous at
``cos = 0`` by design). Everything is differentiable: unlike arcface_torch, the margin is not
applied under ``no_grad`` (which drops its ``d/dtheta`` from the gradient), and m1, m2 and m3 all
take effect together (arcface_torch ignores m2 when m3 > 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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
    target_positions,
)
from robustface.utils.guards import check_real

__all__ = [
    "CombinedMarginHead",
    "SoftmaxHead",
    "arcface",
    "combined_margin_target",
    "cosface",
    "sphereface",
]

ACOS_EPS = 1e-6
"""Cosines are clamped to [-1 + eps, 1 - eps] before ``arccos`` so its gradient stays finite;
eps is ACOS_EPS, or the dtype's machine epsilon where that is larger (float16, bfloat16)."""


def combined_margin_target(
    cos_target: Tensor,
    m1: float | Tensor = 1.0,
    m2: float | Tensor = 0.0,
    m3: float | Tensor = 0.0,
    *,
    easy_margin: bool = False,
) -> Tensor:
    """The margined target ``cos(m1 * theta + m2) - m3`` with the continuous fallback.

    ``cos_target`` holds target cosines of any shape; the margins are floats or tensors that
    broadcast to it (per-sample margins), with m1 > 0 and 0 <= m2 < pi. See the module docstring
    for the fallback beyond ``theta_c = (pi - m2) / m1`` and for ``easy_margin``.
    """
    m1 = torch.as_tensor(m1, dtype=cos_target.dtype, device=cos_target.device)
    m2 = torch.as_tensor(m2, dtype=cos_target.dtype, device=cos_target.device)
    eps = max(ACOS_EPS, torch.finfo(cos_target.dtype).eps)
    theta = torch.acos(cos_target.clamp(-1.0 + eps, 1.0 - eps))
    theta_c = (math.pi - m2) / m1
    margined = torch.cos(m1 * theta + m2)
    fallback = cos_target - (1.0 + torch.cos(theta_c))
    target = torch.where(theta <= theta_c, margined, fallback) - m3
    if easy_margin:
        target = torch.where(cos_target > 0, target, cos_target)
    return target


class _MarginLogits(torch.autograd.Function):
    """``scale * cosine`` with each target entry replaced by ``scale * target_fn(cos_y)``.

    The same values and gradients as ``torch.index_put(cosine, (rows, cols), target) * scale``
    with ``target = target_fn(cosine[rows, cols])``, but with one (B x C) buffer in the forward and
    one in the backward where autograd keeps three (the index_put copy, its gradient with zeroed
    targets and the zero-filled gradient of the target gather). Only the small graph of the (B,)
    target cosines is kept; ``target_fn`` must take no tensor that needs a gradient other than
    its argument. First-order gradients only.
    """

    @staticmethod
    def forward(
        ctx: Any,
        cosine: Tensor,
        rows: Tensor,
        cols: Tensor,
        target_fn: Callable[[Tensor], Tensor],
        scale: float,
    ) -> Tensor:
        with torch.enable_grad():
            cos_y = cosine[rows, cols].detach().requires_grad_()
            target = target_fn(cos_y)
        logits = cosine * scale
        logits.index_put_((rows, cols), target.detach() * scale)
        ctx.save_for_backward(rows, cols)
        ctx.cos_y, ctx.target, ctx.scale = cos_y, target, scale
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, cols = ctx.saved_tensors
        (grad_cos_y,) = torch.autograd.grad(
            ctx.target, ctx.cos_y, grad[rows, cols] * ctx.scale, retain_graph=True
        )
        grad_cosine = grad * ctx.scale
        grad_cosine.index_put_((rows, cols), grad_cos_y)
        return grad_cosine, None, None, None, None


class SoftmaxHead(MarginHead):
    """Normalised softmax (NormFace): ``logits = scale * cos``, no margin."""

    def __init__(self, scale: float = 64.0) -> None:
        super().__init__()
        self.scale = check_scale(scale)

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """``scale * cosine``; the labels pass through."""
        check_head_inputs(cosine, labels)
        return HeadOutput(logits=cosine * self.scale, labels=labels)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class CombinedMarginHead(MarginHead):
    """Target logit ``scale * (cos(m1 * theta_y + m2) - m3)``, negatives ``scale * cos_j``.

    ``m1`` > 0 multiplies the angle (SphereFace), ``m2`` in [0, pi) radians is added to it
    (ArcFace), ``m3`` is subtracted from the cosine (CosFace); every combination is honoured.
    Rows whose label is -1 (target on another shard) get no margin.
    """

    def __init__(
        self,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        m1 = check_real("m1 (angle factor)", m1, 0, open_low=True)
        m2 = check_margin("m2 (additive angular margin)", m2)
        m3 = check_real("m3", m3)
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.easy_margin = bool(easy_margin)

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """Scaled logits with the margin on each row's target column (rows with label != -1)."""
        check_head_inputs(cosine, labels)
        rows, cols = target_positions(labels)
        target_fn = functools.partial(
            combined_margin_target, m1=self.m1, m2=self.m2, m3=self.m3, easy_margin=self.easy_margin
        )
        logits = _MarginLogits.apply(cosine, rows, cols, target_fn, self.scale)
        return HeadOutput(logits=logits, labels=labels)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"easy_margin={self.easy_margin}"
        )


HEADS.register("softmax")(SoftmaxHead)
HEADS.register("combined")(CombinedMarginHead)


@HEADS.register("arcface")
def arcface(scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False) -> MarginHead:
    """ArcFace (Deng et al., CVPR 2019): additive angular margin, s = 64, m = 0.5 rad."""
    return CombinedMarginHead(scale=scale, m2=margin, easy_margin=easy_margin)


@HEADS.register("cosface")
def cosface(scale: float = 64.0, margin: float = 0.4) -> MarginHead:
    """CosFace (Wang et al., CVPR 2018): additive cosine margin, s = 64, m = 0.4 (some use 0.35)."""
    return CombinedMarginHead(scale=scale, m3=margin)


@HEADS.register("sphereface")
def sphereface(scale: float = 64.0, margin: float = 1.35) -> MarginHead:
    """SphereFace in the combined-margin form: multiplicative angle margin ``cos(m * theta)``.

    Not the original A-Softmax (m = 4 with its piecewise ``psi`` and annealing against plain
    softmax); this is the feature- and weight-normalised variant that the ArcFace paper
    evaluates as "SphereFace (1.35)" (Table 2, CASIA / ResNet50), hence m = 1.35 and s = 64.
    """
    return CombinedMarginHead(scale=scale, m1=margin)
