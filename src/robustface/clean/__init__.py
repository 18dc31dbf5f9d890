"""Cleaning noisy training sets (Sub-center ArcFace's drop step)."""

from robustface.clean.subcenter import (
    DropReport,
    DropResult,
    dominant_subcenter,
    drop_decisions,
    embed_dataset,
    subcenter_assignments,
    subcenter_drop,
)

__all__ = [
    "DropReport",
    "DropResult",
    "dominant_subcenter",
    "drop_decisions",
    "embed_dataset",
    "subcenter_assignments",
    "subcenter_drop",
]
