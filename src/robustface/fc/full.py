"""Single-process classifiers: the full cosine FC and the sub-center FC.

The classifier contract (:class:`~robustface.fc.base.Classifier`, :class:`~robustface.fc.base.
FCOutput` and the ``CLASSIFIERS`` registry) lives in :mod:`robustface.fc.base`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustface.fc.base import CLASSIFIERS, Classifier, FCOutput
from robustface.heads.base import LOCAL
from robustface.utils.guards import check_int

__all__ = [
    "CLASSIFIERS",
    "FCOutput",
    "FullFC",
    "SubCenterFC",
    "check_embeddings",
    "check_global_labels",
    "check_sizes",
    "normalized_cosine",
]


def check_embeddings(embeddings: Tensor, embedding_size: int) -> None:
    """Raise unless ``embeddings`` is a floating (B x embedding_size) tensor."""
    if (
        not isinstance(embeddings, Tensor)
        or embeddings.dim() != 2
        or embeddings.size(1) != embedding_size
        or not embeddings.is_floating_point()
    ):
        got = (
            f"shape {tuple(embeddings.shape)} dtype {embeddings.dtype}"
            if isinstance(embeddings, Tensor)
            else type(embeddings).__name__
        )
        raise ValueError(f"embeddings must be a floating (B x {embedding_size}) tensor, got {got}")


def check_global_labels(labels: Tensor, num_classes: int, batch_size: int) -> None:
    """Raise unless ``labels`` is (batch_size,) integers in [0, num_classes)."""
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.size(0) != batch_size:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape ({batch_size},), got {got}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"labels must be class indices in [0, {num_classes}), got {bad}")


class _ClampUnit(torch.autograd.Function):
    """``clamp(-1, 1)`` in place: the same values and gradient as ``Tensor.clamp``, but it keeps a
    one-byte mask of the entries inside the range instead of a copy of the unclamped matrix."""

    @staticmethod
    def forward(ctx: Any, values: Tensor) -> Tensor:
        inside = (values >= -1.0) & (values <= 1.0)
        ctx.mark_dirty(values)
        ctx.save_for_backward(inside)
        return values.clamp_(-1.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def normalized_cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    """Cosine between each embedding and each weight row, clamped to [-1, 1].

    Under autocast the matrix product may run in half precision; the result is returned in
    float32 then, because the margins (``arccos`` near +-1) need it. The clamp is done in place
    on the product (:class:`_ClampUnit`), so only one (B x C) float matrix stays alive.
    """
    cosine = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))
    if cosine.dtype in (torch.float16, torch.bfloat16):
        cosine = cosine.float()
    return _ClampUnit.apply(cosine)


def check_sizes(embedding_size: int, num_classes: int) -> None:
    """Raise unless both sizes are positive integers."""
    check_int("embedding_size", embedding_size, 1)
    check_int("num_classes", num_classes, 1)


@CLASSIFIERS.register("full")
class FullFC(Classifier):
    """All classes in one process: ``cosine = normalize(x) @ normalize(W).T``, W (C x d)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(embedding_size, num_classes)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(
            torch.empty(num_classes, embedding_size, device=device, dtype=dtype).normal_(0, 0.01)
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> FCOutput:
        """Cosines to every class; labels pass through (validated to lie in [0, C))."""
        check_embeddings(embeddings, self.embedding_size)
        check_global_labels(labels, self.num_classes, embeddings.size(0))
        return FCOutput(
            cosine=normalized_cosine(embeddings, self.weight),
            labels=labels.long(),
            shard=LOCAL,
            embeddings=embeddings,
            norms=embeddings.norm(dim=1),
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


@CLASSIFIERS.register("subcenter")
class SubCenterFC(Classifier):
    """Sub-center FC (Deng et al., ECCV 2020): K centres per class, class cosine = max over them.

    ``weight`` is (C*K x d), class-major: row ``c * k + i`` is sub-center ``i`` of class ``c``.
    """

    one_row_per_class = False

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        k: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(embedding_size, num_classes)
        k = check_int("k (sub-centers per class)", k, 1)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.k = k
        self.centres_per_class = k
        self.weight = nn.Parameter(
            torch.empty(num_classes * k, embedding_size, device=device, dtype=dtype).normal_(
                0, 0.01
            )
        )

    def subcenter_cosines(self, embeddings: Tensor) -> Tensor:
        """Cosine of each embedding to every sub-center, (B x C x K)."""
        check_embeddings(embeddings, self.embedding_size)
        cosine = normalized_cosine(embeddings, self.weight)
        return cosine.view(embeddings.size(0), self.num_classes, self.k)

    def forward(self, embeddings: Tensor, labels: Tensor) -> FCOutput:
        """Class cosines (max over each class's sub-centers); labels pass through."""
        check_embeddings(embeddings, self.embedding_size)
        check_global_labels(labels, self.num_classes, embeddings.size(0))
        return FCOutput(
            cosine=self.subcenter_cosines(embeddings).amax(dim=2),
            labels=labels.long(),
            shard=LOCAL,
            embeddings=embeddings,
            norms=embeddings.norm(dim=1),
        )

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, k={self.k}"
