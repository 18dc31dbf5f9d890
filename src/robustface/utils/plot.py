"""Matplotlib without a display: figures are saved as PNG files, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustface.utils.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as a PNG (temp file, then rename) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
