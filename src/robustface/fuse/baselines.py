"""Baseline aggregators: ``mean`` (average of unit features) and ``norm_weighted``.

With raw features ``f_n`` (see :mod:`robustface.fuse.base`) and ``u_n = f_n / |f_n|``:

- ``mean``: ``normalize(sum_n u_n / N)``, directions only (insightface ``use_norm_score=False``);
- ``norm_weighted``: ``normalize(sum_n |f_n| u_n / sum_n |f_n|) = normalize(sum_n f_n)``, each
  direction weighted by its norm, a quality proxy (insightface's IJB default; CAFace's "average").

Both are linear: the fused feature is the normalised sum of per-image ``terms`` (``u_n`` or
``f_n``), so their memory is a running sum (float64), exactly invariant to the order and the
chunking of the stream up to rounding. IJB template pooling
(:mod:`robustface.evaluate.ijb`) weights and groups the same ``terms``.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory

__all__ = ["LinearAggregator", "MeanAggregator", "NormWeightedAggregator", "SumMemory"]


class LinearAggregator(Aggregator):
    """An aggregator whose fused feature is the normalised sum of per-image :meth:`terms`."""

    @abstractmethod
    def terms(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` per-image contributions of raw ``(N, d)`` features (no input checks)."""

    def memory(self) -> SumMemory:
        return SumMemory(self)


class SumMemory(FusionMemory):
    """Running float64 sum of a :class:`LinearAggregator`'s terms."""

    aggregator: LinearAggregator

    def __init__(self, aggregator: LinearAggregator) -> None:
        super().__init__(aggregator)
        self._sum: torch.Tensor | None = None
        self._dtype = torch.float32

    def _update(self, features: torch.Tensor, styles: torch.Tensor | None) -> None:
        chunk = self.aggregator.terms(features).sum(dim=0, dtype=torch.float64)
        self._sum = chunk if self._sum is None else self._sum + chunk
        self._dtype = features.dtype

    def result(self) -> torch.Tensor:
        self._check_not_empty()
        assert self._sum is not None
        norm = self._sum.norm()
        if not norm > 0:
            raise ValueError(
                f"{self.aggregator.name!r} fusion: the features cancel out (zero-norm sum)"
            )
        return (self._sum / norm).to(self._dtype)


@AGGREGATORS.register("mean")
class MeanAggregator(LinearAggregator):
    """Average of the unit features ``f_n / |f_n|``."""

    name = "mean"

    def terms(self, features: torch.Tensor) -> torch.Tensor:
        return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


@AGGREGATORS.register("norm_weighted")
class NormWeightedAggregator(LinearAggregator):
    """Norm-weighted average of the unit features, i.e. the average raw feature."""

    name = "norm_weighted"

    def terms(self, features: torch.Tensor) -> torch.Tensor:
        return features
