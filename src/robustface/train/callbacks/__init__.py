"""Training callbacks (see :mod:`.base` for the contract), run in ``CALLBACK_ORDER``."""

from __future__ import annotations

from robustface.train.callbacks import checkpoints, log, probe, verification  # noqa: F401
from robustface.train.callbacks.base import CALLBACKS, Callback

__all__ = ["CALLBACKS", "CALLBACK_ORDER", "Callback"]

CALLBACK_ORDER = ("log", "verification", "probe", "checkpoints")
"""The order the trainer runs the callbacks in at each point: a step is logged, evaluated,
probed, then checkpointed (so the checkpoint holds the step's best score and probe records)."""
