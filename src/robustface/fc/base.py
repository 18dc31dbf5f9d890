"""The classifier contract: the :class:`Classifier` base, its output :class:`FCOutput` and the
``CLASSIFIERS`` registry.

A classifier owns the class-centre weights and turns raw embeddings into the cosine matrix a
margin head (:mod:`robustface.heads`) consumes. Its output, :class:`FCOutput`, carries everything a
head may need: cosines, local labels, the shard context, the raw embeddings and norms of every row
and the class weights; :meth:`FCOutput.apply_head` hands a head the part of it that the head
declares (``head.needs``). The trainer knows classifiers only through this base: whether the
classes are sharded over ranks (:attr:`Classifier.sharded`, :attr:`Classifier.class_range`), the
class centres (:meth:`Classifier.class_centres`) and the shard's checkpoint state
(:meth:`Classifier.shard_state`).

Adding a classifier: one module with a ``Classifier`` subclass decorated with
``@CLASSIFIERS.register("name")``, built as ``cls(embedding_size, num_classes, **fc.params)``,
plus its import in ``robustface/fc/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from robustface.heads.base import HEAD_CONTEXT, HeadOutput, MarginHead, ShardContext
from robustface.utils.registry import Registry

__all__ = ["CLASSIFIERS", "TRAINER_SUPPLIED", "Classifier", "FCOutput"]

CLASSIFIERS: Registry[type[Classifier]] = Registry("classifier")
"""Registered classifiers, each built as ``cls(embedding_size, num_classes, **params)``."""

TRAINER_SUPPLIED = ("embedding_size", "num_classes", "group", "device", "dtype")
"""Constructor arguments the trainer supplies (from the model, the data and the process group);
``fc.params`` may not set them."""


@dataclasses.dataclass
class FCOutput:
    """A classifier's output, in the head's terms (see :mod:`robustface.heads.base`).

    ``cosine`` (B x C_local) and ``labels`` (B,) local columns, -1 where the class is not among
    them; ``shard`` how to reach the other shards; ``embeddings`` (B x d) the raw embeddings the
    cosines were computed from (gathered from every rank under Partial FC) and ``norms`` (B,)
    their L2 norms; ``weight`` (count x d) the class weights of every class of this shard (not
    only the sampled columns), ``None`` where a class has no single weight row (sub-center).
    Nothing is detached.
    """

    cosine: Tensor
    labels: Tensor
    shard: ShardContext
    embeddings: Tensor
    norms: Tensor
    weight: Tensor | None = None

    def apply_head(self, head: MarginHead, **progress: int) -> HeadOutput:
        """``head`` on these cosines, given ``shard`` and only the context it declares.

        ``progress``: the training position, ``step`` and ``epoch``, for heads that declare them.
        ``ValueError`` names what a head declares and this output or ``progress`` lacks.
        """
        unknown = sorted(set(progress) - {"step", "epoch"})
        if unknown:
            raise TypeError(f"progress must be step and/or epoch, got {unknown}")
        available = {"norms": self.norms, "embeddings": self.embeddings, "weight": self.weight}
        available.update(progress)
        missing = [name for name in head.needs.context if available.get(name) is None]
        if missing:
            raise ValueError(
                f"head {type(head).__name__} needs {missing} "
                f"({'; '.join(HEAD_CONTEXT[name] for name in missing)}), which were not given"
            )
        context = {name: available[name] for name in head.needs.context}
        return head(self.cosine, self.labels, shard=self.shard, **context)


class Classifier(nn.Module):
    """Base of every classifier: class-centre weights (``weight``) and the cosines they give.

    Subclasses set ``embedding_size``, ``num_classes`` and ``weight`` and implement
    ``forward(embeddings, labels) -> FCOutput``. Class attributes describe the layout:

    - ``sharded``: the classes are split over the ranks of a process group (each rank holds
      ``class_range``); the trainer then sums backbone gradients over ranks and checkpoints the
      classifier per rank.
    - ``one_row_per_class``: each class has exactly one weight row (heads that keep one statistic
      per class weight row, ``head.needs.classes``, require it).
    - ``centres_per_class``: weight rows per class (class-major), the cosine to a class being the
      maximum over its rows.
    """

    sharded: ClassVar[bool] = False
    one_row_per_class: ClassVar[bool] = True
    centres_per_class: int = 1
    embedding_size: int
    num_classes: int
    weight: nn.Parameter

    @property
    def class_range(self) -> tuple[int, int] | None:
        """``(first class, count)`` of this rank's shard; ``None`` when the classes are not
        sharded."""
        return None

    def class_centres(self) -> Tensor | None:
        """Every class's weight rows (C*centres_per_class x d), detached, on the group's rank 0
        (``None`` on other ranks of a sharded classifier). A collective when sharded."""
        return self.weight.detach()

    def shard_state(self, optimizer: Any, head_rows: dict[str, Tensor]) -> dict[str, Any]:
        """This classifier's checkpoint state: module and ``optimizer`` state; when sharded also
        the shard's ``start`` and ``count`` and the head's per-class rows (``head_rows``), so
        that a checkpoint can be re-sharded on another world size."""
        if self.class_range is None:
            return {"module": self.state_dict(), "optim": optimizer.state_dict()}
        start, count = self.class_range
        return {
            "start": start,
            "count": count,
            "module": self.state_dict(),
            "optim": optimizer.state_dict(),
            "head": head_rows,
        }

    def load_shard_state(self, state: dict[str, Any], optimizer: Any) -> dict[str, Tensor]:
        """Load a :meth:`shard_state` (this rank's rows); return its per-class head rows."""
        self.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optim"])
        return dict(state.get("head", {}))
