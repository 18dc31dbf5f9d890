"""Time ``robustface.evaluate.evaluate`` (10 folds, accuracy + VAL@FAR) on random pair sets.

Run: ``.venv/bin/python benchmarks/verification_speed.py [--pairs 6000 60000] [--repeats 3]``.
Prints a Markdown table: per pair count, the best and median wall time of ``evaluate`` in ms.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from robustface.evaluate import evaluate
from robustface.utils.table import markdown_table


def time_evaluate(num_pairs: int, dim: int, repeats: int, seed: int = 0) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``evaluate`` on ``num_pairs`` random pairs."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((2 * num_pairs, dim), dtype=np.float32)
    issame = rng.random(num_pairs) < 0.5
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(embeddings, issame)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[6000, 60000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for num_pairs in args.pairs:
        times = time_evaluate(num_pairs, args.dim, args.repeats)
        best, median = 1e3 * min(times), 1e3 * float(np.median(times))
        rows.append([num_pairs, args.dim, f"{best:.1f}", f"{median:.1f}"])
    machine = platform.processor() or platform.machine()
    print(f"evaluate(), 10 folds, {args.repeats} runs, {machine}, numpy {np.__version__}")
    print(markdown_table(["pairs", "dim", "best (ms)", "median (ms)"], rows))


if __name__ == "__main__":
    main()
