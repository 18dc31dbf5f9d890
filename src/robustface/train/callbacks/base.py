"""The callback contract: what the trainer calls, and when.

:meth:`Trainer.fit <robustface.train.trainer.Trainer.fit>` calls every callback, in the order of
``CALLBACK_ORDER`` (:mod:`robustface.train.callbacks`), at fixed points, on every rank:

- ``on_train_start()`` before the first step of this session;
- ``on_step_end()`` after each optimizer step (``trainer.global_step`` already counts it);
- ``on_epoch_end()`` after an epoch's last step (``trainer.epoch`` already advanced);
- ``on_loop_end()`` after the last step, before the final evaluation;
- ``on_train_end()`` for the final work (evaluation, probe);
- ``close()`` always after the above (also when training failed): release files and bars;
- ``summarize(summary)`` on rank 0 once training succeeded, to add entries to
  ``train_results.json``;

and ``on_log(row)`` whenever anything logs a metrics row (:meth:`Trainer.log`). A callback with a
``state_key`` is checkpointed: ``state_dict()`` (``None``: nothing to save) goes into the
checkpoint under that key and comes back through ``load_state_dict`` on resume.

Adding a callback: one module with a ``Callback`` subclass decorated with
``@CALLBACKS.register("name")``, plus its name in ``CALLBACK_ORDER``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from robustface.utils.registry import Registry

if TYPE_CHECKING:
    from robustface.train.trainer import Trainer

__all__ = ["CALLBACKS", "Callback"]


class Callback:
    """Base of the training callbacks: every hook does nothing by default.

    Built as ``cls(trainer)`` once the trainer's data, model and optimizers exist and before it
    resumes from a checkpoint."""

    state_key: ClassVar[str | None] = None

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_start(self) -> None:
        """Before the first step of this session."""

    def on_step_end(self) -> None:
        """After each optimizer step."""

    def on_epoch_end(self) -> None:
        """After the last step of an epoch."""

    def on_loop_end(self) -> None:
        """After the last step, before the final evaluation."""

    def on_train_end(self) -> None:
        """The final work after training (evaluation, probes)."""

    def on_log(self, row: dict[str, Any]) -> None:
        """A metrics row was logged."""

    def summarize(self, summary: dict[str, Any]) -> None:
        """Add this callback's entries to the run's results (rank 0)."""

    def close(self) -> None:
        """Release files and bars; called after ``on_train_end``, also after a failure."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps under ``state_key`` (``None``: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


CALLBACKS: Registry[type[Callback]] = Registry("callback")
"""Registered training callbacks, each built as ``cls(trainer)``."""
