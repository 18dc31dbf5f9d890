"""Where a scoring pass goes wrong on a dirty set: truth kind x flag, and the centre statistics.

Run: ``.venv/bin/python benchmarks/clean_diagnose.py SCORE_DIR --truth SET [--run RUN]
[--reflag]``, with ``SCORE_DIR`` a ``clean score`` output (or a loop's ``round_r/score``), ``SET``
the dirty set (or its ``truth.npz``) and ``RUN`` the training run that scored it (default:
``SCORE_DIR/../train`` when it exists), for its verification accuracies. ``--reflag`` flags the
stored scores again with the current :func:`~robustface.clean.score.choose_thresholds` (default
thresholds) and :func:`~robustface.clean.score.flag_samples` instead of reading the stored flags:
a rule change measured without scoring again.

Prints (Markdown):
- the confusion table, truth kind (clean split into easy and hard) x flag;
- the ``mislabeled`` flag's samples per truth kind, and how many of them belong to a class of a
  duplicate pair and are pointed at its twin (one person under two labels: a merge problem);
- the model's centre statistics: the share of clean samples whose nearest class centre is their
  own, the share of closed-set flips whose nearest other centre (and kNN majority label) is the
  class of the person shown, the share of duplicate-class samples whose nearest other centre is
  the twin class, and the median angles;
- the run's last verification accuracies and their mean.

Nothing here feeds the cleaning: it reads the truth after the flags were chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from robustface.clean.dirty import TRUTH_KINDS, Truth, load_truth
from robustface.clean.score import FLAGS, Scores, choose_thresholds, flag_samples, scores_path
from robustface.data.noise import read_npz_arrays
from robustface.utils.table import markdown_table


def twin_classes(duplicate_of: np.ndarray) -> np.ndarray:
    """Per class, the other class of its duplicate pair (-1 when it is in none)."""
    twin = np.full(duplicate_of.size, -1, dtype=np.int64)
    for c, d in enumerate(duplicate_of.tolist()):
        if d >= 0:
            twin[c], twin[d] = d, c
    return twin


def reflag(scores: dict[str, np.ndarray]) -> np.ndarray:
    """The flags of the current rules at their default thresholds on stored score columns."""
    names = [f.name for f in dataclasses.fields(Scores)]
    table = Scores(**{name: scores[name] for name in names if name in scores})
    return flag_samples(table, choose_thresholds(table)).flag


ROWS = ("clean (easy)", "clean (hard)", *TRUTH_KINDS[1:])
"""The confusion table's rows: the truth kinds, clean split by ``hard``."""


def diagnose(scores: dict[str, np.ndarray], truth: Truth) -> dict[str, Any]:
    """The confusion counts (``confusion[row][flag]``, rows :data:`ROWS`, columns ``FLAGS``), the
    ``mislabeled`` flag's samples per row (``mislabeled``: samples, in a duplicate pair, pointed at
    the twin) and the centre statistics of one scoring pass."""
    flag, other = scores["flag"], scores["other_class"]
    row = np.where(truth.kind == 0, truth.hard.astype(np.int64), truth.kind + 1)
    twin = twin_classes(truth.duplicate_of)[scores["label"]]
    mis = flag == FLAGS.index("mislabeled")
    own_nearest = scores["angle_own"] < scores["angle_other"]
    clean, closed = truth.kind == 0, truth.kind == TRUTH_KINDS.index("closed")
    duplicate = truth.kind == TRUTH_KINDS.index("duplicate")
    true_other = closed & (other == truth.true_label)
    return {
        "confusion": [
            [int(((row == r) & (flag == f)).sum()) for f in range(len(FLAGS))]
            for r in range(len(ROWS))
        ],
        "mislabeled": [
            [
                int((mis & (row == r)).sum()),
                int((mis & (row == r) & (twin >= 0)).sum()),
                int((mis & (row == r) & (twin >= 0) & (other == twin)).sum()),
            ]
            for r in range(len(ROWS))
        ],
        "clean_own_nearest": float(own_nearest[clean].mean()),
        "easy_own_nearest": float(own_nearest[clean & ~truth.hard].mean()),
        "hard_own_nearest": float(own_nearest[clean & truth.hard].mean()),
        "closed_true_other": float(true_other.sum() / closed.sum()),
        "closed_true_knn": float((scores["knn_label"] == truth.true_label)[closed].mean()),
        "duplicate_twin_other": float((other == twin)[duplicate].mean()),
        "clean_angle_own": float(np.median(scores["angle_own"][clean])),
        "closed_angle_true": float(np.median(scores["angle_other"][true_other])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("score_dir", type=Path)
    parser.add_argument("--truth", required=True, type=Path, help="dirty set or its truth.npz")
    parser.add_argument("--run", type=Path, help="the scoring run (default: SCORE_DIR/../train)")
    parser.add_argument(
        "--reflag", action="store_true", help="flag the stored scores with the current rules"
    )
    args = parser.parse_args()

    _, scores = read_npz_arrays(scores_path(args.score_dir), "scores.npz", "scores")
    truth = load_truth(args.truth)
    if args.reflag:
        scores["flag"] = reflag(scores)
    d = diagnose(scores, truth)
    row = np.where(truth.kind == 0, truth.hard, truth.kind + 1)
    counts = np.bincount(row, minlength=len(ROWS)).tolist()
    print(
        markdown_table(
            ["truth kind", "n", *FLAGS],
            [[name, counts[r], *d["confusion"][r]] for r, name in enumerate(ROWS)],
        )
    )
    print()
    print(
        markdown_table(
            ["flagged mislabeled", "samples", "in a duplicate pair", "nearest other = twin"],
            [[name, *d["mislabeled"][r]] for r, name in enumerate(ROWS)],
        )
    )
    print()
    print(
        f"clean samples nearest their own centre: {d['clean_own_nearest']:.3f} "
        f"(easy {d['easy_own_nearest']:.3f}, hard {d['hard_own_nearest']:.3f})"
    )
    print(
        f"closed flips whose nearest other centre is the true class: "
        f"{d['closed_true_other']:.3f}; kNN majority is the true class: "
        f"{d['closed_true_knn']:.3f}"
    )
    print(
        "duplicate-class samples whose nearest other centre is the twin class: "
        f"{d['duplicate_twin_other']:.3f}"
    )
    print(
        f"median angle: clean to own centre {d['clean_angle_own']:.1f} deg, flips to their true "
        f"class (when nearest other) {d['closed_angle_true']:.1f} deg"
    )

    run = args.run or args.score_dir.parent / "train"
    results = run / "train_results.json"
    if results.is_file():
        ver = json.loads(results.read_text(encoding="utf-8"))["verification"]
        acc = {name: v["accuracy_mean"] for name, v in ver.items()}
        listed = ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
        print(f"verification (last checkpoint): {listed}; mean {np.mean(list(acc.values())):.4f}")


if __name__ == "__main__":
    main()
