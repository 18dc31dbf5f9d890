"""ROC curves and TAR at FAR for 1:1 verification scores (higher score = more likely the same).

Two readings of "TAR at FAR = x" are offered:

* ``"closest"`` (default): the ROC point whose FPR is closest to ``x``, as insightface's IJB
  evaluation reads it, so that numbers compare with published IJB-B/C results. It reproduces
  ``sklearn.metrics.roc_curve`` (with its default ``drop_intermediate=True``: points in the middle
  of a straight run of the curve are dropped) followed by ``fpr, tpr = flipud(fpr), flipud(tpr)``
  and ``argmin(abs(fpr - x))``: among equally close points the one with the highest TPR wins. The
  point taken may have an FPR above ``x``.
* ``"conservative"``: the highest TPR among operating points with ``FPR <= x``.

**Measurable FARs.** With ``n`` impostor (negative) pairs a FAR target ``f`` is *measurable* when
at least one impostor pair may be accepted at it: ``f * n >= 1``, i.e. ``f >= 1 / n``
(:func:`far_measurable`; ``f * n`` is rounded to 9 decimals first, so ``1e-4 * 10_000`` counts).
Below ``1 / n`` the only operating points with ``FPR <= f`` have FPR 0, and FPR 0 on ``n`` pairs
says nothing about a rate of ``f``: SynthFace's IJB set, 12,000 impostor pairs, cannot measure
FAR 1e-5. Two readings of such targets (``reading``, :data:`FAR_READINGS`):

* ``"measurable"`` (default): ``None`` ("not measurable"); measurable targets are read with
  ``mode``.
* ``"insightface"``: every target read with ``mode``, as insightface's ``eval_ijbc.py`` prints
  them (below ``1 / n`` that is the point at FPR 0, or at FPR ``1 / n`` when it is closer), for
  side-by-side comparisons with its numbers. These are not measurements of TAR at that FAR.

The ROC has one point per distinct score (ties are one threshold: "accept when
``score >= threshold``") plus the point ``(0, 0)`` at threshold ``+inf``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from robustface.utils.guards import check_choice

__all__ = [
    "FARS",
    "FAR_MODES",
    "FAR_READINGS",
    "NOT_MEASURABLE",
    "Roc",
    "check_far_reading",
    "far_measurable",
    "roc_curve",
    "tar_at_far",
    "unmeasurable_cell",
    "unmeasurable_note",
]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FAR targets of the IJB-B/C tables."""
FAR_MODES = ("closest", "conservative")
FAR_READINGS = ("measurable", "insightface")
"""``"measurable"``: targets below ``1 / impostor pairs`` give None; ``"insightface"``: a number."""
NOT_MEASURABLE = "n/m"
"""The table cell of a rate at a FAR that the data cannot measure."""


def far_measurable(far: float, num_negatives: int) -> bool:
    """Whether ``num_negatives`` impostor pairs can measure FAR ``far``: ``far * n >= 1``."""
    return round(far * num_negatives, 9) >= 1


def unmeasurable_cell(insightface_text: str, reading: str) -> str:
    """The table cell of a not-measurable rate: ``"n/m"``, or with ``reading="insightface"``
    insightface's number (already formatted) marked ``*``."""
    return f"{insightface_text}*" if reading == "insightface" else NOT_MEASURABLE


def unmeasurable_note(reading: str, detail: str) -> str:
    """The footnote under a table with not-measurable cells; ``detail`` says what limits them."""
    if reading == "insightface":
        return f"*: not measurable ({detail}); insightface's reading, not a measurement."
    return (
        f"{NOT_MEASURABLE}: not measurable ({detail}); "
        "`--far-reading insightface` shows insightface's number."
    )


def check_far_reading(reading: str) -> None:
    """Raise ValueError unless ``reading`` is one of :data:`FAR_READINGS`."""
    check_choice("far reading", reading, FAR_READINGS)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"scores must be a 1-D numeric array, got {s.dtype} {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels must have the shape of scores {s.shape}, got {y.shape}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must hold only 0/1 or True/False")
        y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores hold {int(np.sum(~np.isfinite(s)))} NaN/infinite values")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"labels need both classes: {n_pos} positive and {y.size - n_pos} negative pairs"
        )
    return s, y


@dataclass(frozen=True)
class Roc:
    """A ROC as counts: ``fps[i]``/``tps[i]`` negatives/positives with ``score >= thresholds[i]``.

    Index 0 is the ``(0, 0)`` point at threshold ``+inf``; thresholds decrease, counts increase.
    """

    fps: np.ndarray  # (K,) int64
    tps: np.ndarray  # (K,) int64
    thresholds: np.ndarray  # (K,) float64
    num_negatives: int
    num_positives: int

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray) -> Roc:
        """Build the ROC of ``scores`` with binary ``labels`` (1 = genuine) in one sort."""
        s, y = _check(scores, labels)
        order = np.argsort(s)[::-1]
        s_sorted = s[order]
        tps = np.cumsum(y[order], dtype=np.int64)
        del order
        last = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])  # last index of each tied run
        ends = np.append(last, s.size - 1)
        tps = tps[ends]
        fps = ends + 1 - tps
        return cls(
            fps=np.concatenate([[0], fps]),
            tps=np.concatenate([[0], tps]),
            thresholds=np.concatenate([[np.inf], s_sorted[ends].astype(np.float64)]),
            num_negatives=int(fps[-1]),
            num_positives=int(tps[-1]),
        )

    @property
    def fpr(self) -> np.ndarray:
        """False positive rate of every point (float64)."""
        return self.fps / self.num_negatives

    @property
    def tpr(self) -> np.ndarray:
        """True positive rate of every point (float64)."""
        return self.tps / self.num_positives

    def kept_points(self) -> np.ndarray:
        """Indices sklearn's ``drop_intermediate=True`` keeps (and the ``(0, 0)`` point)."""
        fps, tps = self.fps[1:], self.tps[1:]
        if fps.size <= 2:
            return np.arange(fps.size + 1)
        corner = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        return np.concatenate([[0], 1 + np.flatnonzero(np.r_[True, corner, True])])

    def operating_points(self, fars: Iterable[float] = FARS, mode: str = "closest") -> np.ndarray:
        """Index of the ROC point read for each FAR target with ``mode`` (see the module)."""
        targets = np.asarray([float(f) for f in fars], dtype=np.float64)
        check_choice("mode", mode, FAR_MODES)
        if np.any((targets < 0.0) | (targets > 1.0)):
            raise ValueError(f"fars must lie in [0, 1], got {targets.tolist()}")
        fpr = self.fpr
        if mode == "conservative":
            return np.searchsorted(fpr, targets, side="right") - 1
        keep = self.kept_points()
        flipped = fpr[keep][::-1]
        last = keep.size - 1
        return np.array([keep[last - np.argmin(np.abs(flipped - f))] for f in targets], np.int64)

    @property
    def min_measurable_far(self) -> float:
        """The smallest FAR the impostor pairs can measure, ``1 / num_negatives``."""
        return 1.0 / self.num_negatives

    def tar_at_far(
        self, fars: Iterable[float] = FARS, mode: str = "closest", reading: str = "measurable"
    ) -> dict[float, float | None]:
        """``{far: tar}`` read with ``mode``, ``"closest"`` or ``"conservative"``; with
        ``reading="measurable"`` a target below :attr:`min_measurable_far` gives None."""
        check_far_reading(reading)
        targets = [float(f) for f in fars]
        tpr = self.tpr[self.operating_points(targets, mode)].tolist()
        return {
            f: t if reading == "insightface" or far_measurable(f, self.num_negatives) else None
            for f, t in zip(targets, tpr, strict=True)
        }


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, *, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with one point per distinct score plus ``(0, 0)`` at ``+inf``.

    A pair is accepted at threshold ``t`` when ``score >= t``; thresholds decrease. With
    ``drop_intermediate`` the points sklearn drops (inside straight runs) are left out.
    """
    roc = Roc.from_scores(scores, labels)
    keep = roc.kept_points() if drop_intermediate else slice(None)
    return roc.fpr[keep], roc.tpr[keep], roc.thresholds[keep]


def tar_at_far(
    scores: np.ndarray,
    labels: np.ndarray,
    fars: Iterable[float] = FARS,
    *,
    mode: str = "closest",
    reading: str = "measurable",
) -> dict[float, float | None]:
    """True accept rate at each false accept rate in ``fars``: ``{far: tar}``, None where the
    impostor pairs cannot measure the FAR unless ``reading="insightface"`` (see the module)."""
    return Roc.from_scores(scores, labels).tar_at_far(fars, mode, reading)
