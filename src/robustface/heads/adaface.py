"""AdaFace (Kim et al., CVPR 2022): a margin adapted to image quality through the feature norm.

The raw embedding norm ``n = clip(|x|, 0.001, 100)`` (detached) is a proxy for image quality.
Its batch mean and standard deviation are tracked by EMAs (buffers ``batch_mean``, init 20, and
``batch_std``, init 100, weight ``t_alpha``), and each sample gets a normalised quality
``z = clip(h * (n - batch_mean) / (batch_std + eps), -1, 1)``. The target logit is::

    scale * [cos(clip(theta_y - m * z, eps, pi - eps)) - (m + m * z)]

(high quality, z -> 1: ArcFace-like angular margin; low quality, z -> -1: a smaller margin on
hard samples); negatives are ``scale * cos_j``.

Statistics. The batch mean and the *unbiased* standard deviation (``torch.std``, as
``safe_norms.std()`` in the official ``head.py``, mk-minchul/AdaFace, ``AdaFace.forward``) are
over every sample counted once: the rows with ``labels != -1`` on each shard, combined with two
``all_reduce`` sums (sum and count, then the sum of squared deviations from the global mean: a
two-pass variance, free of the cancellation of ``sum(n^2) - sum(n)^2 / k``). The mean is updated
only when at least one sample has a target, the std only when at least two do. Order: as in the
official code (the ``with torch.no_grad(): ... self.batch_mean = ...`` block precedes
``margin_scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)``) the buffers are
updated first and ``z`` uses the updated values; in eval mode they are used unchanged.
Differences from the official code: it clamps *every* cosine to [-1 + eps, 1 - eps]; here only
the target's angle is clipped (to [eps, pi - eps]) and the negatives are the plain cosines.
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
    check_scale,
    target_positions,
)
from robustface.heads.margin import ACOS_EPS
from robustface.utils.guards import check_real

__all__ = ["AdaFaceHead"]

NORM_MIN, NORM_MAX = 0.001, 100.0
"""The feature norms are clipped to this range (official ``safe_norms``)."""


@HEADS.register("adaface")
class AdaFaceHead(MarginHead):
    """Quality-adaptive margin from the feature norms: needs ``norms`` (B,) in ``forward``.

    ``margin`` m >= 0 (radians and cosine offset), ``h`` > 0 the concentration of ``z``,
    ``t_alpha`` in (0, 1] the EMA weight, ``eps`` in (0, pi / 2) the angle clip and std guard.
    Rows whose label is -1 (target on another shard) are left unchanged.
    """

    needs = HeadNeeds(context=("norms",))
    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        margin = check_real("margin", margin, 0)
        h = check_real("h (concentration of the norm score)", h, 0, open_low=True)
        t_alpha = check_real(
            "t_alpha (EMA weight of the batch statistics)", t_alpha, 0, 1, open_low=True
        )
        eps = check_real("eps", eps)
        if not 0 < eps < math.pi / 2:
            raise ValueError(f"eps must be in (0, pi/2), got {eps}")
        self.margin, self.h, self.t_alpha, self.eps = margin, h, t_alpha, eps
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        norms: Tensor | None = None,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """Scaled logits; in training mode the norm statistics are updated first, then used."""
        check_head_inputs(cosine, labels)
        if norms is None:
            raise ValueError(
                "norms (the raw embedding norms |x|, shape (B,)) are required by adaface, got None"
            )
        if (
            not isinstance(norms, Tensor)
            or norms.shape != (cosine.size(0),)
            or not norms.is_floating_point()
        ):
            got = (
                f"shape {tuple(norms.shape)} dtype {norms.dtype}"
                if isinstance(norms, Tensor)
                else type(norms).__name__
            )
            raise ValueError(
                f"norms must be a floating-point ({cosine.size(0)},) tensor, got {got}"
            )
        rows, cols = target_positions(labels)
        n = norms.detach()[rows].clamp(NORM_MIN, NORM_MAX)
        if self.training:
            self._update(n, shard)
        mean = self.batch_mean.to(cosine.dtype)
        std = self.batch_std.to(cosine.dtype)
        z = (self.h * (n.to(cosine.dtype) - mean) / (std + self.eps)).clamp(-1.0, 1.0)
        cos_y = cosine[rows, cols]
        acos_eps = max(ACOS_EPS, torch.finfo(cosine.dtype).eps)
        theta = torch.acos(cos_y.clamp(-1.0 + acos_eps, 1.0 - acos_eps))
        theta_m = (theta - self.margin * z).clamp(self.eps, math.pi - self.eps)
        target = torch.cos(theta_m) - (self.margin + self.margin * z)
        logits = torch.index_put(cosine, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    @torch.no_grad()
    def _update(self, n: Tensor, shard: ShardContext) -> None:
        """EMA of the mean and unbiased std of the clipped norms over every shard's targets."""
        dtype = torch.promote_types(n.dtype, torch.float32)
        n = n.to(dtype)
        count = torch.tensor(n.numel(), dtype=dtype, device=n.device)
        total, count = shard.all_reduce(torch.stack([n.sum(), count]), "sum").unbind()
        mean = total / count.clamp_min(1)
        squares = shard.all_reduce((n - mean).square().sum(), "sum")
        std = (squares / (count - 1).clamp_min(1)).sqrt()
        a = self.t_alpha
        old_mean, old_std = self.batch_mean.to(dtype), self.batch_std.to(dtype)
        self.batch_mean.copy_(torch.where(count > 0, a * mean + (1 - a) * old_mean, old_mean))
        self.batch_std.copy_(torch.where(count > 1, a * std + (1 - a) * old_std, old_std))

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, h={self.h}, t_alpha={self.t_alpha}, "
            f"eps={self.eps}"
        )
