"""Where a scoring pass goes wrong on a dirty set: truth kind x flag, and the centre statistics.

Run: ``.venv/bin/python benchmarks/clean_diagnose.py SCORE_DIR --truth SET [--run RUN]``, with
``SCORE_DIR`` a ``clean score`` output (or a loop's ``round_r/score``), ``SET`` the dirty set (or
its ``truth.npz``) and ``RUN`` the training run that scored it (default: ``SCORE_DIR/../train``
when it exists), for its verification accuracies.

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
import json
from pathlib import Path

import numpy as np

from robustface.clean.dirty import TRUTH_KINDS, load_truth
from robustface.clean.score import FLAGS, scores_path
from robustface.data.noise import read_npz_arrays
from robustface.utils.table import markdown_table


def twin_classes(duplicate_of: np.ndarray) -> np.ndarray:
    """Per class, the other class of its duplicate pair (-1 when it is in none)."""
    twin = np.full(duplicate_of.size, -1, dtype=np.int64)
    for c, d in enumerate(duplicate_of.tolist()):
        if d >= 0:
            twin[c], twin[d] = d, c
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("score_dir", type=Path)
    parser.add_argument("--truth", required=True, type=Path, help="dirty set or its truth.npz")
    parser.add_argument("--run", type=Path, help="the scoring run (default: SCORE_DIR/../train)")
    args = parser.parse_args()

    truth = load_truth(args.truth)
    _, s = read_npz_arrays(scores_path(args.score_dir), "scores.npz", "scores")
    flag, label, other = s["flag"], s["label"], s["other_class"]
    rows = ["clean (easy)", "clean (hard)", *TRUTH_KINDS[1:]]
    row = np.where(truth.kind == 0, truth.hard.astype(np.int64), truth.kind + 1)
    print(
        markdown_table(
            ["truth kind", "n", *FLAGS],
            [
                [name, int((row == r).sum())]
                + [int(((row == r) & (flag == f)).sum()) for f in range(len(FLAGS))]
                for r, name in enumerate(rows)
            ],
        )
    )

    twin = twin_classes(truth.duplicate_of)[label]
    mis = flag == FLAGS.index("mislabeled")
    print()
    print(
        markdown_table(
            ["flagged mislabeled", "samples", "in a duplicate pair", "nearest other = twin"],
            [
                [
                    name,
                    int((mis & (row == r)).sum()),
                    int((mis & (row == r) & (twin >= 0)).sum()),
                    int((mis & (row == r) & (twin >= 0) & (other == twin)).sum()),
                ]
                for r, name in enumerate(rows)
            ],
        )
    )

    own_nearest = s["angle_own"] < s["angle_other"]
    clean, closed = truth.kind == 0, truth.kind == 1
    duplicate = truth.kind == TRUTH_KINDS.index("duplicate")
    true_other = closed & (other == truth.true_label)
    print()
    print(
        f"clean samples nearest their own centre: {own_nearest[clean].mean():.3f} "
        f"(easy {own_nearest[clean & ~truth.hard].mean():.3f}, "
        f"hard {own_nearest[clean & truth.hard].mean():.3f})"
    )
    print(
        f"closed flips whose nearest other centre is the true class: "
        f"{true_other.sum() / closed.sum():.3f}; kNN majority is the true class: "
        f"{(s['knn_label'][closed] == truth.true_label[closed]).mean():.3f}"
    )
    print(
        f"duplicate-class samples whose nearest other centre is the twin class: "
        f"{(other == twin)[duplicate].mean():.3f}"
    )
    print(
        f"median angle: clean to own centre {np.median(s['angle_own'][clean]):.1f} deg, "
        f"flips to their true class (when nearest other) "
        f"{np.median(s['angle_other'][true_other]):.1f} deg"
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
