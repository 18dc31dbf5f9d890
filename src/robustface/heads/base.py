"""The margin-head contract: what a head receives, what it returns, how it talks across shards.

A head is a *margin policy*: it turns the cosine matrix computed by a classifier
(:mod:`robustface.fc`) into scaled logits and the labels the cross-entropy must use. It owns no
class weights; the classifier owns those and their sharding. One training step is::

    out = classifier(embeddings, labels)                       # FCOutput
    head_out = out.apply_head(head, step=step, epoch=epoch)    # passes what head.needs lists
    loss = distributed_cross_entropy(head_out.logits, head_out.labels, out.shard)
    if head_out.extra_loss is not None:
        loss = loss + head_out.extra_loss
    loss.mean().backward()                                     # the same reduction on every rank

Inputs of :meth:`MarginHead.forward`: ``head(cosine, labels, *, shard, **context)``
    ``cosine`` (B x C_local) in [-1, 1]: cosine between each sample and each class *column* on
    this rank. Under Partial FC, B is the batch gathered from every rank and the columns are this
    rank's classes, possibly a sampled subset (``shard.class_ids`` names the global class of
    each column; :meth:`ShardContext.column_classes` gives it in every case).
    ``labels`` (B,) int64: the column of the sample's labelled class, or -1 when that class is
    not among this rank's columns. Every sample's label is on exactly one rank.
    ``shard``: a :class:`ShardContext`.
    ``**context``: the items of :data:`HEAD_CONTEXT` (``norms``, ``embeddings``, ``weight``,
    ``step``, ``epoch``), by name, that the head *declares* in its class attribute ``needs`` (a
    :class:`HeadNeeds`); a classifier's :meth:`~robustface.fc.FCOutput.apply_head` passes those
    and nothing else. A head takes each one it declares as a keyword argument and raises if it
    is missing; a caller may pass more (they are ignored), so every head can be called with the
    whole context.

Class counts
    ``num_classes`` means the *global* number of classes everywhere (classifiers, heads,
    :class:`ShardContext`). A head that keeps per-class state declares ``HeadNeeds(classes=True)``:
    its constructor then takes ``num_classes`` (global), ``embedding_size`` and ``class_range``,
    the ``(first, count)`` of the classes this rank holds (:func:`~robustface.fc.shard_bounds`;
    ``None``: all of them), which the trainer supplies; its ``class_buffers`` have ``count`` rows.

Output (:class:`HeadOutput`)
    ``logits`` (B x C_local) already multiplied by the scale; ``labels`` those the cross-entropy
    uses (a label-correcting head, e.g. BoundaryFace, returns its corrected labels with the same
    -1 convention); ``extra_loss`` an optional per-sample (B,) term added to the cross-entropy.
    Heads never modify their input tensors in place; margins are in radians.

Statistics across shards
    A head that keeps statistics over samples (CurricularFace's ``t``, AdaFace's norm mean/std,
    RobustFace's easy fraction) computes a local sum over rows with ``labels != -1`` and the local
    count, ``all_reduce``\\s both with op ``"sum"`` and divides: each sample's target lives on
    exactly one rank (Partial FC) or each sample on one rank (data-parallel full FC), so every
    rank gets the same global value and the buffers stay identical. Maxima over classes that span
    shards (BoundaryFace's ``argmax_{j != y}``) use op ``"max"``: reduce the local maximum, then
    the rank whose local maximum equals the global one owns it (break ties by the lowest global
    class id, itself found with a second ``"max"`` reduction of ``-id``). ``all_reduce`` returns a
    detached copy: statistics carry no gradient. Values that the loss depends on differentiably
    (an ``extra_loss``) must hold the same value on every rank, with the gradient path only on the
    rank that owns the cosine it came from (mask the other ranks' contribution with a detached
    global value), so that every rank's ``backward`` of the same reduced loss yields the gradient
    of its own shard.

State
    Stateful heads keep state in registered buffers (saved with ``state_dict``, moved by ``.to``)
    and update it only in training mode, under ``torch.no_grad``. :meth:`MarginHead.stats` gives
    the scalar state and last-step counters for the training log.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustface.utils.guards import check_choice, check_int, check_real
from robustface.utils.registry import Registry

__all__ = [
    "HEADS",
    "HEAD_CONTEXT",
    "LOCAL",
    "HeadNeeds",
    "HeadOutput",
    "MarginHead",
    "ShardContext",
    "check_class_range",
    "check_head_inputs",
    "check_margin",
    "check_scale",
    "head_needs",
]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclasses.dataclass(frozen=True, eq=False)
class ShardContext:
    """How a head (and the distributed cross-entropy) reaches the ranks sharing its classes.

    ``rank``/``world_size`` are positions in ``group`` (``None``: the default group).
    ``class_offset`` is the global index of this shard's first class, ``num_classes`` the global
    number of classes (``None`` when not known: then every class is local, ``cosine.size(1)``).
    ``class_ids`` is the global class of each cosine column when the columns are not the
    contiguous range starting at ``class_offset`` (Partial FC negative sampling), else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    class_offset: int = 0
    num_classes: int | None = None
    class_ids: Tensor | None = None
    group: Any = None

    @property
    def distributed(self) -> bool:
        """True when the classes are split over more than one process."""
        return self.world_size > 1

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """``tensor`` reduced element-wise over the ranks of the shard group (``"sum"``/``"max"``).

        Returns a new, detached tensor; ``tensor`` itself is untouched. In one process it is a
        copy. Every rank must call it with a tensor of the same shape, in the same order.
        """
        check_choice("op", op, sorted(_REDUCE_OPS))
        out = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=_REDUCE_OPS[op], group=self.group)
        return out

    def column_classes(self, num_columns: int, device: torch.device | str | None = None) -> Tensor:
        """Global class index (int64) of each of the ``num_columns`` cosine columns."""
        if self.class_ids is not None:
            if self.class_ids.numel() != num_columns:
                raise ValueError(
                    f"num_columns must equal len(class_ids) = {self.class_ids.numel()}, "
                    f"got {num_columns}"
                )
            return self.class_ids.to(device) if device is not None else self.class_ids
        return torch.arange(
            self.class_offset, self.class_offset + num_columns, dtype=torch.long, device=device
        )


LOCAL = ShardContext()
"""The single-process context: every class is on this rank, all-reduce is a copy."""


@dataclasses.dataclass
class HeadOutput:
    """What a head returns: scaled logits, the labels to train on, an optional per-sample term."""

    logits: Tensor
    labels: Tensor
    extra_loss: Tensor | None = None


HEAD_CONTEXT: dict[str, str] = {
    "norms": "(B,) raw embedding norms |x|, not detached",
    "embeddings": "(B x d) raw embeddings the cosines came from, same rows as cosine",
    "weight": "(count x d) this shard's class weights: every class of class_range, sampled or not",
    "step": "optimizer steps done (int)",
    "epoch": "0-based epoch (int)",
}
"""The context a head may declare in ``HeadNeeds.context``, with what each name holds."""


@dataclasses.dataclass(frozen=True)
class HeadNeeds:
    """What a head needs beyond ``cosine``, ``labels`` and ``shard``, declared on its class.

    ``context``: names from :data:`HEAD_CONTEXT` that :meth:`~robustface.fc.FCOutput.apply_head`
    passes to ``forward`` (and only these). ``classes``: the constructor takes the class layout,
    ``num_classes`` (global), ``embedding_size`` and ``class_range``, which the trainer supplies.
    """

    context: tuple[str, ...] = ()
    classes: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.context if name not in HEAD_CONTEXT]
        if unknown:
            raise ValueError(
                f"HeadNeeds.context must be names from {sorted(HEAD_CONTEXT)}, got {unknown}"
            )


class MarginHead(nn.Module, abc.ABC):
    """Base class of margin heads; see the module docstring for the full contract.

    ``needs`` declares the context and the class layout the head takes. ``class_buffers``
    names the buffers with one row per class of this shard (CenterBiasFace's centres): the
    trainer checkpoints them per rank and re-shards them like the class weights.
    """

    needs: ClassVar[HeadNeeds] = HeadNeeds()
    class_buffers: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def forward(
        self, cosine: Tensor, labels: Tensor, *, shard: ShardContext = LOCAL, **context: Any
    ) -> HeadOutput:
        """Scaled logits (B x C_local) and training labels from cosines and local labels."""

    def stats(self) -> dict[str, float]:
        """Scalar state for the training log, by name: every one-element buffer (``t``, ``phi``).

        Heads with last-step counters (``last_*``) add them.
        """
        return {name: float(value) for name, value in self.named_buffers() if value.numel() == 1}


HEADS: Registry[Callable[..., MarginHead]] = Registry("head")
"""Registered heads: classes and preset factories, each called with keyword parameters."""


def head_needs(name: str) -> HeadNeeds:
    """What the head registered as ``name`` declares; a factory function (preset) declares nothing
    unless it carries a ``needs`` attribute of its own."""
    return getattr(HEADS.get(name), "needs", HeadNeeds())


def check_scale(scale: float) -> float:
    """``scale`` as a float, or raise unless it is a finite number > 0."""
    return check_real("scale", scale, 0.0, open_low=True)


def check_margin(name: str, value: object) -> float:
    """``value`` as a float, or raise unless an angle in ``[0, pi)`` radians (an angular margin)."""
    value = check_real(name, value)
    if not 0 <= value < math.pi:
        raise ValueError(f"{name} must be in [0, pi) radians, got {value}")
    return value


def check_class_range(class_range: tuple[int, int] | None, num_classes: int) -> tuple[int, int]:
    """``(first, count)`` of this rank's classes among ``num_classes``; ``None``: all of them."""
    if class_range is None:
        return 0, num_classes
    if not isinstance(class_range, (tuple, list)) or len(class_range) != 2:
        raise ValueError(f"class_range must be a (first, count) pair, got {class_range!r}")
    first = check_int("class_range first", class_range[0])
    count = check_int("class_range count", class_range[1])
    if first < 0 or count < 1 or first + count > num_classes:
        raise ValueError(
            f"class_range (first, count) must have first >= 0, count >= 1 and first + count <= "
            f"num_classes = {num_classes}, got {(first, count)}"
        )
    return first, count


def target_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)``: the rows whose target class lives on this shard (label != -1) and it."""
    rows = torch.nonzero(labels != -1).squeeze(1)
    return rows, labels[rows].long()


def row_thresholds(target: Tensor, rows: Tensor, cosine: Tensor, shard: ShardContext) -> Tensor:
    """Each row's detached margined target, from whichever shard owns it; ``inf`` where none.

    A row's hard-negative mask needs its target on every shard, not only the owner's. The owner
    contributes the value and a one, the others zeros, and a ``"sum"`` reduction (exact: one
    non-zero term) hands every shard the same (B,) thresholds. Every rank must call it.
    """
    local = torch.zeros(2, cosine.size(0), dtype=cosine.dtype, device=cosine.device)
    local = local.index_put((torch.zeros_like(rows), rows), target.detach())
    local = local.index_put((torch.ones_like(rows), rows), torch.ones_like(target))
    value, owned = shard.all_reduce(local, "sum").unbind()
    return torch.where(owned > 0, value, torch.full_like(value, math.inf))


def check_head_inputs(cosine: Tensor, labels: Tensor, *, name: str = "cosine") -> None:
    """Raise unless ``cosine`` is (B x C) floating and ``labels`` (B,) integers in [-1, C).

    ``name`` is the first argument's name in the messages (``"logits"`` for the loss).
    """
    if not isinstance(cosine, Tensor) or cosine.dim() != 2 or not cosine.is_floating_point():
        got = _describe(cosine)
        raise ValueError(f"{name} must be a floating-point (B x C) tensor, got {got}")
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor, got {_describe(labels)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.size(0) != cosine.size(0):
        raise ValueError(
            f"labels must have one entry per {name} row ({cosine.size(0)}), got {labels.size(0)}"
        )
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= cosine.size(1):
            bad = low if low < -1 else high
            raise ValueError(
                f"labels must be local class columns in [0, {cosine.size(1)}) or -1 "
                f"(not on this shard), got {bad}"
            )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__
