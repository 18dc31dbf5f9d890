"""RobustFace: adaptive mining of noise and hard samples (official ``losses.py``, published rule).

Target ``T = cos(theta_y + m)`` (with the continuous fallback of
:func:`~robustface.heads.margin.combined_margin_target`); noise boundary ``N = cos(theta_y + m1)``
(m1 = -0.15 at the start). For every (sample, negative class j)::

    hard  = cos_j > T          noise = cos_j > N          hard-only = hard and not noise
    hard-only negatives:  (1 + t) * cos_j
    noise negatives:      max((1 - phi / (1 - mu)) ** gamma * cos_j, 1e-30)

``phi`` is an EMA (momentum 0.01, phi0 = 0) of the fraction of easy pairs, ``mu`` the assumed
noise rate. As in the official code, the fraction is over every (sample, class) pair of the
cosine matrix, ``num_classes * batch``, the target column included: the official mask
``cos_j > T`` runs over all columns, and ``cos_y > cos(theta_y + m)`` for every m > 0, so the
target counts as a pair that is never easy (it is easy only when m = 0). phi therefore stays
below ``(C - 1) / C`` with C classes. Each training step follows the official code's order:

1. ``m1 <- (1 - phi / (1 - mu)) * m1`` with the ``phi`` of the previous step (so m1 is unchanged
   at the first step, when phi = 0);
2. ``N`` from the new m1, then the hard and noise masks;
3. ``phi`` updated with this batch's easy fraction;
4. the noise factor ``(1 - phi / (1 - mu)) ** gamma`` uses the *updated* phi.

Known collapse (kept on purpose: this is the published rule). With many classes nearly every
pair is easy, so ``phi -> ~1`` within a few hundred steps; with mu = 0 the factor ``1 - phi``
then tends to 0, m1 shrinks geometrically to ~0 (the noise boundary becomes ``cos(theta_y)``)
and noise negatives are scaled to ~0. With mu > 0, ``phi / (1 - mu)`` exceeds 1 and m1 flips
sign. A better-behaved schedule belongs in a separately named variant.

Boundary below angle 0. With m1 < 0 and ``theta_y < |m1|`` the angle ``theta_y + m1`` is
negative; we clamp it at 0 (``N = 1``: no negative is noise), which is continuous (the official
code uses ``cos_y - m1 sin(m1)`` there, which is below ``cos_y``). For m1 >= 0 (after a sign
flip) ``N`` uses the same fallback as the target. The logged ``last_hard`` / ``last_noise`` count
negatives only (the official counts include the target column).

``robustface_stable`` (ours, not published; :class:`RobustFaceStableHead`) is the state the
published schedule collapses into, applied from the first step and kept: noise negatives
(``cos_j > cos(theta_y + m1)``, m1 = 0) get logit ~0, and no hard-negative boost (t = 0). On
SynthFace (docs/results.md) the boost t = 0.2 is what breaks the published rule even on clean
data, and its schedule silences noise negatives only after the first epoch, when the noisy
labels have done their damage.

Shards. ``T`` and ``N`` of a row live on the rank that owns its label; when the classes are split
over ranks (``shard.distributed`` with ``cosine.size(1) < shard.num_classes``) they are shared
with a ``"sum"`` all-reduce (detached: they only select columns). The easy and pair counts are
all-reduced, so phi and m1 are identical on every rank.
"""

from __future__ import annotations

import math
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
from robustface.heads.margin import ACOS_EPS, combined_margin_target
from robustface.utils.guards import check_real

__all__ = ["RobustFaceHead", "RobustFaceStableHead", "noise_boundary"]

NOISE_FLOOR = 1e-30
"""Lower bound of a scaled noise negative (the official ``clamp_min(1e-30)``)."""


def noise_boundary(cos_target: Tensor, m1: float | Tensor) -> Tensor:
    """``cos(theta_y + m1)``: angle clamped at 0 for m1 < 0, the target's fallback for m1 >= 0."""
    m1 = torch.as_tensor(m1, dtype=cos_target.dtype, device=cos_target.device)
    if bool(m1 >= 0):
        return combined_margin_target(cos_target, m2=m1)
    eps = max(ACOS_EPS, torch.finfo(cos_target.dtype).eps)
    theta = torch.acos(cos_target.clamp(-1.0 + eps, 1.0 - eps))
    return torch.cos((theta + m1).clamp(min=0.0))


def _check_arc_params(margin: object, m1: object, t: object) -> tuple[float, float, float]:
    """The ``margin``, noise margin ``m1`` and hard-negative boost ``t`` both heads take."""
    margin = check_margin("margin", margin)
    m1 = check_real("m1 (noise margin)", m1)
    if not -math.pi < m1 < math.pi:
        raise ValueError(f"m1 (noise margin) must be in (-pi, pi) radians, got {m1}")
    return margin, m1, check_real("t (hard-negative boost)", t, 0)


@HEADS.register("robustface")
class RobustFaceHead(MarginHead):
    """RobustFace (official rule): ArcFace target, hard negatives boosted, noise negatives damped.

    Buffers: ``phi`` (EMA of the easy-pair fraction) and ``m1`` (noise margin, radians). Counts
    of the last training step are kept as ``last_easy``, ``last_hard``, ``last_noise`` (logged
    through :meth:`stats`; hard counts hard-only pairs).
    """

    def __init__(
        self,
        scale: float = 64.0,
        margin: float = 0.5,
        m1: float = -0.15,
        t: float = 0.2,
        gamma: float = 2.0,
        noise_rate: float = 0.0,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        margin, m1, t = _check_arc_params(margin, m1, t)
        gamma = check_real("gamma", gamma, 0)
        noise_rate = check_real("noise_rate (mu)", noise_rate, 0, 1, open_high=True)
        momentum = check_real("momentum", momentum, 0, 1, open_low=True)
        self.margin, self.t, self.gamma = margin, t, gamma
        self.noise_rate, self.momentum = noise_rate, momentum
        self.register_buffer("phi", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m1", torch.tensor(m1, dtype=torch.float64))
        self.last_easy = self.last_hard = self.last_noise = 0

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """Scaled logits; in training mode updates m1, then phi (see the module docstring)."""
        check_head_inputs(cosine, labels)
        clear = 1.0 - self.noise_rate
        if self.training:
            with torch.no_grad():
                self.m1.mul_(1.0 - self.phi / clear)
        m1 = float(self.m1)
        rows, cols = target_positions(labels)
        cos_y = cosine[rows, cols]
        target = combined_margin_target(cos_y, m2=self.margin)
        with torch.no_grad():
            bounds = torch.zeros(2, cosine.size(0), dtype=cosine.dtype, device=cosine.device)
            bounds[0, rows] = target.detach()
            bounds[1, rows] = noise_boundary(cos_y.detach(), m1)
            split = shard.distributed and (
                shard.num_classes is not None and cosine.size(1) < shard.num_classes
            )
            if split:
                bounds = shard.all_reduce(bounds, "sum")
            own = torch.zeros_like(cosine, dtype=torch.bool)
            own[rows, cols] = True
            hard = (cosine > bounds[0].unsqueeze(1)) & ~own
            noise = (cosine > bounds[1].unsqueeze(1)) & ~own
            hard_only = hard & ~noise
            # official count: every column is a pair; the target is never easy when margin > 0
            pairs = cosine.numel()
            easy = pairs - int(hard.sum()) - (rows.numel() if self.margin > 0 else 0)
            counts = torch.tensor(
                [easy, pairs, int(hard_only.sum()), int(noise.sum())],
                dtype=torch.float64,
                device=cosine.device,
            )
            counts = shard.all_reduce(counts, "sum")
            if self.training:
                fraction = counts[0] / counts[1].clamp(min=1.0)
                self.phi.mul_(1.0 - self.momentum).add_(self.momentum * fraction)
                easy_n, _, hard_n, noise_n = (int(c) for c in counts)
                self.last_easy, self.last_hard, self.last_noise = easy_n, hard_n, noise_n
        base = 1.0 - float(self.phi) / clear
        # a negative base (mu > 0 collapse) with a non-integer gamma has no real power: use 0
        factor = base**self.gamma if base >= 0 or self.gamma.is_integer() else 0.0
        logits = torch.where(hard_only, cosine * (1.0 + self.t), cosine)
        logits = torch.where(noise, (cosine * factor).clamp(min=NOISE_FLOOR), logits)
        logits = torch.index_put(logits, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    def stats(self) -> dict[str, float]:
        """``phi``, ``m1`` and the last training step's pair counts (``last_easy`` ...)."""
        return {
            **super().stats(),
            "last_easy": float(self.last_easy),
            "last_hard": float(self.last_hard),
            "last_noise": float(self.last_noise),
        }

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, m1={float(self.m1):.4g}, t={self.t}, "
            f"gamma={self.gamma}, noise_rate={self.noise_rate}, momentum={self.momentum}"
        )


@HEADS.register("robustface_stable")
class RobustFaceStableHead(MarginHead):
    """RobustFace's noise rule at its limit, from the first step: noise negatives are silenced.

    Target ``T = cos(theta_y + m)``; a negative with ``cos_j > N = cos(theta_y + m1)`` (m1 = 0:
    any class closer than the label) is taken for the true class of a mislabelled sample and
    its logit is set to ``1e-30`` (no gradient, no push away from it); hard-only negatives
    (``T < cos_j <= N``) become ``(1 + t) cos_j``. This is the published rule with ``phi = 1``
    and a fixed m1, without the schedule that reaches that state only after a few hundred steps.
    Stateless. ``last_noise`` (a tensor) counts this shard's silenced pairs of the last step.
    It counts no easy pairs (phi is fixed at 1), so the official easy-pair fraction over
    ``num_classes * batch`` that :class:`RobustFaceHead` follows does not enter it.
    """

    def __init__(
        self, scale: float = 64.0, margin: float = 0.5, m1: float = 0.0, t: float = 0.0
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        margin, m1, t = _check_arc_params(margin, m1, t)
        self.margin, self.m1, self.t = margin, m1, t
        self.last_noise: Tensor | int = 0

    def forward(
        self,
        cosine: Tensor,
        labels: Tensor,
        *,
        shard: ShardContext = LOCAL,
        **context: Any,
    ) -> HeadOutput:
        """ArcFace logits with silenced noise negatives and boosted hard-only negatives."""
        check_head_inputs(cosine, labels)
        rows, cols = target_positions(labels)
        cos_y = cosine[rows, cols]
        target = combined_margin_target(cos_y, m2=self.margin)
        with torch.no_grad():
            hard_bound = row_thresholds(target, rows, cosine, shard)
            noise_bound = row_thresholds(noise_boundary(cos_y, self.m1), rows, cosine, shard)
            own = torch.zeros_like(cosine, dtype=torch.bool)
            own[rows, cols] = True
            noise = (cosine > noise_bound.unsqueeze(1)) & ~own
            hard_only = (cosine > hard_bound.unsqueeze(1)) & ~own & ~noise
            if self.training:
                self.last_noise = noise.sum()  # this shard's pairs; no host sync per step
        logits = torch.where(hard_only, cosine * (1.0 + self.t), cosine)
        logits = torch.where(noise, torch.full_like(cosine, NOISE_FLOOR), logits)
        logits = torch.index_put(logits, (rows, cols), target) * self.scale
        return HeadOutput(logits=logits, labels=labels)

    def stats(self) -> dict[str, float]:
        """``last_noise``: this shard's silenced pairs of the last training step."""
        return {**super().stats(), "last_noise": float(self.last_noise)}

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, m1={self.m1}, t={self.t}"
