"""Checkpoints: every ``train.checkpoint_every`` steps, at each epoch's end and after training."""

from __future__ import annotations

from robustface.train.callbacks.base import CALLBACKS, Callback


@CALLBACKS.register("checkpoints")
class Checkpoints(Callback):
    """Calls :meth:`Trainer.save <robustface.train.trainer.Trainer.save>` (a collective; a no-op
    when the step is already saved)."""

    def on_step_end(self) -> None:
        every = self.trainer.cfg.train.checkpoint_every
        if every and self.trainer.global_step % every == 0:
            self.trainer.save()

    def on_epoch_end(self) -> None:
        self.trainer.save()

    def on_loop_end(self) -> None:
        self.trainer.save()
