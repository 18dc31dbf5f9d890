"""Flags scored against the truth of a dirty set: precision and recall per noise kind.

Each noise kind of :data:`~robustface.clean.dirty.TRUTH_KINDS` has the flag that names it
(:data:`EXPECTED`). Per kind: ``precision`` = flagged with that flag and of that kind / flagged
with that flag; ``recall`` = the same / samples of that kind; ``removed`` = samples of that kind
removed for any reason / samples of that kind. Overall: ``removal`` precision and recall of
"removed" against "noisy" (every kind but clean and duplicate). For clean samples, ``kept`` and,
for the hard clean ones, ``hard_kept``. Mislabels: the share of detected closed-set samples whose
suggested class is the person's class (either label of a duplicated person). Duplicates: merge
pairs against the truth's pairs.
"""

from __future__ import annotations

import math

import numpy as np

from robustface.clean.dirty import TRUTH_KINDS, Truth
from robustface.clean.score import FLAGS
from robustface.utils.table import markdown_table

__all__ = ["EXPECTED", "evaluate_cumulative", "evaluate_flags", "evaluation_table", "format_ratio"]

EXPECTED = {
    "closed": "mislabeled",
    "open": "open_set",
    "low_quality": "low_quality",
    "sketch": "sketch",
    "nonface": "nonface",
}
"""The flag that names each noise kind."""


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def format_ratio(x: float) -> str:
    """A ratio with 3 decimals; ``n/a`` for an undefined one (nothing flagged, no samples)."""
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def evaluate_flags(
    flag: np.ndarray,
    suggested: np.ndarray,
    truth: Truth,
    merges: list[tuple[int, int, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Precision / recall per noise kind and the overall numbers (see the module docstring)."""
    flag = np.asarray(flag)
    if flag.shape != truth.kind.shape:
        raise ValueError(f"flags have {flag.size} rows, the truth {truth.kind.size}")
    flagged = flag[:, None] == np.arange(len(FLAGS))[None, :]
    out = _per_kind(flagged, flag >= FLAGS.index("mislabeled"), truth)
    kind = truth.kind
    canon = np.where(
        truth.duplicate_of >= 0, truth.duplicate_of, np.arange(truth.duplicate_of.size)
    )
    found = (kind == TRUTH_KINDS.index("closed")) & (flag == FLAGS.index("mislabeled"))
    sugg = np.asarray(suggested)[found]
    right = (sugg >= 0) & (canon[np.maximum(sugg, 0)] == truth.true_label[found])
    out["suggested_class"] = {
        "detected": int(found.sum()),
        "correct": _ratio(int(right.sum()), int(found.sum())),
    }
    if merges is not None:
        want = {
            (min(d, int(o)), max(d, int(o))) for d, o in enumerate(truth.duplicate_of) if o >= 0
        }
        got = {(a, b) for a, b, _ in merges}
        out["merge"] = {
            "pairs": len(want),
            "proposed": len(got),
            "precision": _ratio(len(want & got), len(got)),
            "recall": _ratio(len(want & got), len(want)),
        }
    return out


def evaluate_cumulative(
    flagged: np.ndarray, removed: np.ndarray, truth: Truth
) -> dict[str, dict[str, float]]:
    """Precision / recall per noise kind of several rounds together, against the original set.

    ``flagged`` (N x len(FLAGS), bool): the flags each sample of the original set received in any
    round (the union over rounds: a sample counts as flagged ``f`` if some round flagged it
    ``f``); ``removed`` (N,): removed in some round. The same numbers as :func:`evaluate_flags`
    (without the suggested class and merges)."""
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.shape != (truth.kind.size, len(FLAGS)) or np.shape(removed) != truth.kind.shape:
        raise ValueError(
            f"flags have shape {flagged.shape} / {np.shape(removed)}, the truth {truth.kind.size} "
            "rows"
        )
    return _per_kind(flagged, np.asarray(removed, dtype=bool), truth)


def _per_kind(
    flagged: np.ndarray, removed: np.ndarray, truth: Truth
) -> dict[str, dict[str, float]]:
    """Per kind, removal and clean numbers from per-flag masks ``flagged`` (N x len(FLAGS))."""
    kind = truth.kind
    code = {name: i for i, name in enumerate(TRUTH_KINDS)}
    out: dict[str, dict[str, float]] = {}
    for name, expected in EXPECTED.items():
        is_kind = kind == code[name]
        has_flag = flagged[:, FLAGS.index(expected)]
        hit = int(np.sum(is_kind & has_flag))
        out[name] = {
            "samples": int(is_kind.sum()),
            "flagged": int(has_flag.sum()),
            "precision": _ratio(hit, int(has_flag.sum())),
            "recall": _ratio(hit, int(is_kind.sum())),
            "removed": _ratio(int(np.sum(is_kind & removed)), int(is_kind.sum())),
        }
    noisy = ~np.isin(kind, (code["clean"], code["duplicate"]))
    hit = int(np.sum(removed & noisy))
    out["removal"] = {
        "samples": int(noisy.sum()),
        "flagged": int(removed.sum()),
        "precision": _ratio(hit, int(removed.sum())),
        "recall": _ratio(hit, int(noisy.sum())),
        "removed": _ratio(hit, int(noisy.sum())),
    }
    clean = kind == code["clean"]
    out["clean"] = {
        "samples": int(clean.sum()),
        "kept": _ratio(int(np.sum(clean & ~removed)), int(clean.sum())),
        "hard": int(truth.hard.sum()),
        "hard_kept": _ratio(int(np.sum(truth.hard & ~removed)), int(truth.hard.sum())),
    }
    return out


def evaluation_table(result: dict[str, dict[str, float]]) -> str:
    """The per-kind precision / recall as a Markdown table, then clean-kept and merge lines."""
    rows = []
    for name in (*EXPECTED, "removal"):
        r = result[name]
        rows.append([name, r["samples"], r["flagged"], format_ratio(r["precision"]),
                     format_ratio(r["recall"]), format_ratio(r["removed"])])  # fmt: skip
    table = markdown_table(
        ["truth kind", "samples", "flagged as it", "precision", "recall", "removed (any flag)"],
        rows,
    )
    c = result["clean"]
    lines = [
        table,
        "",
        f"clean kept: {format_ratio(c['kept'])} of {c['samples']}; hard clean kept: "
        f"{format_ratio(c['hard_kept'])} of {c['hard']}",
    ]
    if "suggested_class" in result:
        s = result["suggested_class"]
        lines[-1] += (
            f"; mislabels with the right suggested class: {format_ratio(s['correct'])} of "
            f"{s['detected']}"
        )
    if "merge" in result:
        m = result["merge"]
        lines.append(
            f"merge pairs: {m['proposed']} proposed, {m['pairs']} true; precision "
            f"{format_ratio(m['precision'])}, recall {format_ratio(m['recall'])}"
        )
    return "\n".join(lines)
