"""The aggregator interface: one feature for a set (or a stream) of face features.

Convention: ``features`` are the backbone's **raw** features ``f`` (``N x d``, i.e. unit feature
times norm, ``f/|f| * |f|``; REFERENCE §7: CAFace callers pass ``f*|f|``). Each aggregator derives
the unit features and norms it needs itself, so there is no separate ``norms`` argument. ``styles``
is an ``(N, ...)`` tensor of per-image style inputs (CAFace: ``(N, 384, 2)``), required only by
aggregators with ``needs_styles`` and ignored by the others. Inputs may be torch tensors or numpy
arrays; floating tensors other than float64 are computed in float32.

API::

    agg = AGGREGATORS.build("norm_weighted")          # or AGGREGATORS.build("mean", dim=512)
    fused = agg.fuse(features, styles=None)           # (d,) unit feature of the whole set

    memory = agg.memory()                             # the same fusion over a stream of chunks
    for chunk_features, chunk_styles in stream:
        memory.update(chunk_features, chunk_styles)
    fused = memory.result()                           # (d,) unit feature so far

``Aggregator.fuse`` is ``memory(); update(whole set); result()`` unless an aggregator overrides
it. A memory is the aggregator's order-invariant running state: for the baselines running sums
(exactly invariant to the order and the chunking of the stream); for CAFace the M cluster features
and styles with their soft counts (REFERENCE §7: invariant to the chunk order, not to the chunking).

A new aggregator is one :class:`Aggregator` subclass with a :class:`FusionMemory` subclass
(implementing ``_update`` and ``result``) and one ``@AGGREGATORS.register("name")`` line.

Bad input raises ``ValueError`` naming the parameter: wrong feature dimension (``dim`` fixed by
the aggregator or, when it has none, by a memory's first chunk), NaN/inf or zero-norm features, an
empty set or chunk, a ``styles`` row count that does not match, styles missing where needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from robustface.utils.guards import check_int
from robustface.utils.registry import Registry

__all__ = ["AGGREGATORS", "Aggregator", "FusionMemory"]


_CHECK_ROWS = 4096
"""Rows checked at a time, so that checking a long set makes no temporary of its size."""


def _first_bad_row(x: torch.Tensor, bad: Any) -> int | None:
    """The first row ``i`` of ``x`` where ``bad(block)[i - start]`` holds, or None."""
    for start in range(0, x.shape[0], _CHECK_ROWS):
        hits = bad(x[start : start + _CHECK_ROWS])
        if bool(hits.any()):
            return start + int(hits.nonzero()[0])
    return None


def _as_float_tensor(value: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Aggregator(ABC):
    """Fuses a set of raw ``(N, d)`` features (and, where needed, styles) into one unit feature.

    ``dim`` (optional) fixes the feature dimension ``d``; ``needs_styles`` says whether ``styles``
    are required.
    """

    name: ClassVar[str] = ""
    needs_styles: ClassVar[bool] = False

    def __init__(self, dim: int | None = None) -> None:
        self.dim = None if dim is None else check_int("dim", dim, minimum=1)

    @abstractmethod
    def memory(self) -> FusionMemory:
        """A fresh, empty running memory for fusing a stream of chunks."""

    def fuse(self, features: Any, styles: Any = None) -> torch.Tensor:
        """The ``(d,)`` unit feature of the whole set ``features`` (``(N, d)`` raw)."""
        memory = self.memory()
        memory.update(features, styles)
        return memory.result()

    def fuse_sets(self, features: Any, styles: Any = None) -> torch.Tensor:
        """``(B, d)`` unit features of ``B`` sets of equal length (``features`` ``(B, T, d)``
        raw, ``styles`` ``(B, T, ...)``): :meth:`fuse` of each set, unless an aggregator
        batches them (CAFace: one forward pass for all)."""
        x = _as_float_tensor(features)
        if x.ndim != 3:
            raise ValueError(f"features must be a 3-D (B, T, d) array, got shape {tuple(x.shape)}")
        s = None if styles is None or not self.needs_styles else _as_float_tensor(styles)
        return torch.stack([self.fuse(x[b], None if s is None else s[b]) for b in range(len(x))])

    def check(
        self, features: Any, styles: Any = None, dim: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features`` (and ``styles`` where this aggregator uses them) as float tensors, or a
        ``ValueError`` naming the parameter. ``dim`` overrides ``self.dim`` (a memory's first
        chunk fixes it)."""
        x = _as_float_tensor(features)
        dim = self.dim if dim is None else dim
        if x.ndim != 2:
            raise ValueError(f"features must be a 2-D (N, d) array, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("features: empty set (0 rows); fusion needs at least one feature")
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"features must have dimension {dim}, got {x.shape[1]}")
        row = _first_bad_row(x, lambda b: ~torch.isfinite(b).all(dim=1))
        if row is not None:
            raise ValueError(f"features row {row} has NaN or infinite values")
        row = _first_bad_row(x, lambda b: (b == 0).all(dim=1))
        if row is not None:
            raise ValueError(f"features row {row} has zero norm")
        if not self.needs_styles:
            return x, None
        if styles is None:
            raise ValueError(f"styles are required by the {self.name!r} aggregator, got None")
        s = _as_float_tensor(styles)
        if s.ndim == 0 or s.shape[0] != x.shape[0]:
            raise ValueError(
                f"styles must have one row per feature ({x.shape[0]}), got shape {tuple(s.shape)}"
            )
        row = _first_bad_row(s, lambda b: ~torch.isfinite(b).reshape(len(b), -1).all(dim=1))
        if row is not None:
            raise ValueError(f"styles have NaN or infinite values (row {row})")
        return x, s


class FusionMemory(ABC):
    """The running state of one aggregator over a stream of chunks: ``update(chunk)``, then
    ``result()`` at any time. ``count`` is the number of features seen."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.dim = aggregator.dim
        self.count = 0

    def update(self, features: Any, styles: Any = None) -> None:
        """Add one chunk: raw ``(n, d)`` features and, where needed, their ``(n, ...)`` styles."""
        x, s = self.aggregator.check(features, styles, self.dim)
        self._update(x, s)
        self.dim = x.shape[1]
        self.count += x.shape[0]

    @abstractmethod
    def _update(self, features: torch.Tensor, styles: torch.Tensor | None) -> None:
        """Fold a checked chunk into the memory."""

    @abstractmethod
    def result(self) -> torch.Tensor:
        """The ``(d,)`` unit feature of everything given to :meth:`update` so far."""

    def _check_not_empty(self) -> None:
        if self.count == 0:
            raise ValueError(
                f"{self.aggregator.name!r} fusion memory is empty: call update(features) first"
            )


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")
"""Aggregator classes by name; ``AGGREGATORS.build(name, dim=...)`` makes one. The baselines
(``mean``, ``norm_weighted``) register in :mod:`robustface.fuse.baselines`."""
