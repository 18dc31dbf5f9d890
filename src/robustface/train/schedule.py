"""Learning-rate schedule: linear warmup, then polynomial decay to zero, per optimizer step."""

from __future__ import annotations

from collections.abc import Callable

from robustface.utils.guards import check_int


def warmup_poly(
    total_steps: int, warmup_steps: int = 0, power: float = 1.0
) -> Callable[[int], float]:
    """The factor applied to the base lr at optimizer step ``step`` (arcface_torch's PolyScheduler).

    ``step / warmup_steps`` during warmup, then
    ``(1 - (step - warmup) / (total - warmup)) ** power``, reaching 0 at ``total_steps``.
    """
    total_steps = check_int("total_steps", total_steps, 1)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if total_steps == warmup_steps:
            return 1.0
        return max(0.0, 1.0 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power

    return factor
