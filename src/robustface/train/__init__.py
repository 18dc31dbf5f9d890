"""Training: the loop, distributed set-up, schedules, checkpoints."""

from robustface.train.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]
