"""The training settings shared by the four GCN trainers (GCN-V, GCN-E, GCN-D, GCN-S).

Each trainer (:func:`~robustface.cluster.gcn_v.train_gcn_v`,
:func:`~robustface.cluster.gcn_e.train_gcn_e`, :func:`~robustface.cluster.gcn_ds.train_gcn_d`,
:func:`~robustface.cluster.gcn_ds.train_gcn_s`) takes a :class:`TrainSettings` (default: its
module's published or robustface defaults, :data:`GCN_V_TRAINING`, :data:`GCN_E_TRAINING`,
:data:`GCN_DS_TRAINING`) and keyword overrides of its fields, e.g.
``train_gcn_e(..., epochs=5, show_progress=False)`` or
``train_gcn_d(..., settings=GCN_DS_TRAINING.replace(lr=0.02))``. Model sizes (hidden widths,
dropout) and the data choices of one model (GCN-E's ``ignore_ratio``, GCN-S's ``iop_range``)
stay the trainers' own keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "GCN_DS_TRAINING",
    "GCN_E_TRAINING",
    "GCN_V_TRAINING",
    "Optimizer",
    "TrainSettings",
    "resolve_settings",
]

Optimizer = Literal["sgd", "adamw"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser, schedule, length and run settings of a GCN trainer.

    ``optimizer``: ``"sgd"`` (``momentum``) or ``"adamw"`` (GCN-V only; betas 0.9/0.999);
    ``lr`` (None: the optimiser's default, GCN-V only); ``weight_decay``; the length in
    ``iters`` (optimiser steps: GCN-V) or ``epochs`` (GCN-E/D/S), the other left None;
    ``batch_size`` (GCN-V: rows per step, None for the whole graph; others: subgraphs or
    proposals per step); ``lr_steps`` where the learning rate is multiplied by ``lr_gamma``
    (GCN-V and GCN-E: fractions of the length; GCN-D/S: epochs; GCN-V with AdamW: None, a
    warm-up then a cosine); ``seed`` (initialisation, shuffling, dropout); ``device``;
    ``show_progress`` (a bar); ``log_every`` (steps between loss log lines, GCN-V and GCN-E).
    """

    optimizer: Optimizer = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-5
    iters: int | None = None
    epochs: int | None = None
    batch_size: int | None = 32
    lr_steps: Sequence[float] | None = None
    lr_gamma: float = 0.1
    seed: int = 0
    device: str | torch.device = "cpu"
    show_progress: bool = True
    log_every: int = 100

    def replace(self, **changes: Any) -> TrainSettings:
        """A copy with ``changes``; a name that is not a setting raises ``TypeError``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(
                f"unknown training setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(names)}"
            )
        return dataclasses.replace(self, **changes)


GCN_V_TRAINING = TrainSettings(optimizer="adamw", iters=12000, batch_size=1024)
"""GCN-V (robustface's defaults; the published recipe is ``optimizer="sgd"``, ``iters=80000``,
``batch_size=None``, see :func:`~robustface.cluster.gcn_v.train_gcn_v`)."""
GCN_E_TRAINING = TrainSettings(lr=0.1, epochs=40, batch_size=32, lr_steps=(0.5, 0.8, 0.9))
"""GCN-E (learn-to-cluster ``cfg_train_gcne_ms1m.py``)."""
GCN_DS_TRAINING = TrainSettings(
    lr=0.01, weight_decay=1e-4, epochs=30, batch_size=32, lr_steps=(15, 24, 28)
)
"""GCN-D and GCN-S (learn-to-cluster ``cfg_train_ms1m_8_prpsls.py``, ``cfg_train_seg_...``)."""


def resolve_settings(
    trainer: str,
    default: TrainSettings,
    settings: TrainSettings | None,
    overrides: Mapping[str, Any],
) -> TrainSettings:
    """``settings`` (None: ``default``) with ``overrides``, checked for ``trainer``: GCN-V
    (``"GCN-V"``) counts ``iters`` and takes either optimiser; the others count ``epochs`` and
    train with SGD."""
    if settings is not None and not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    out = (default if settings is None else settings).replace(**overrides)
    length, other = ("iters", "epochs") if trainer == "GCN-V" else ("epochs", "iters")
    if getattr(out, length) is None:
        raise ValueError(f"{trainer} training needs {length} (its length), got None")
    if getattr(out, other) is not None:
        raise ValueError(f"{trainer} trains for {length}, not {other}: leave {other} None")
    if trainer != "GCN-V" and out.optimizer != "sgd":
        raise ValueError(f"{trainer} trains with optimizer='sgd', got {out.optimizer!r}")
    if trainer != "GCN-V" and out.lr is None:
        raise ValueError(f"{trainer} training needs lr, got None")
    return out
