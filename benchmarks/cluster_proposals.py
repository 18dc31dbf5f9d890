"""Pick GCN-D's proposal thresholds on a training set, then cluster the test set once with them.

Run: ``.venv/bin/python benchmarks/cluster_proposals.py ROOT --model GCN_D.pth [--train part0_train]
[--test part1_test] [--knn-method ivf] [--k 80] [--starts 0.3 0.4 0.5 0.6 0.7] [--step 0.05]
[--seg-model GCN_S.pth]``.

The published proposal presets (``test_2``: super-vertices at similarity 0.7 and 0.75) were set
on MS1M features; other features need their own. Each candidate is three k-NN super-vertex
settings at ``start``, ``start + step`` and ``start + 2 step`` (the published preset without
the last one is ``--starts 0.7``). Every candidate clusters ``--train`` with GCN-D (GCN-D + GCN-S
with ``--seg-model``); the one of best pairwise F there is applied once to ``--test``. Both sets
need labels and a cached kNN graph (``robustface cluster knn``). Prints a Markdown table of every
candidate on the training set, then the test row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from robustface.cluster.dataset import ClusterSet, knn_file_method, knn_path, load_cluster_set
from robustface.cluster.gcn_ds import gcn_d_cluster, gcn_ds_cluster
from robustface.cluster.knn import KnnGraph
from robustface.cluster.metrics import evaluate_clustering
from robustface.utils.table import markdown_table


def _load(root: Path, name: str, index: str, k: int) -> tuple[ClusterSet, KnnGraph]:
    data = load_cluster_set(root, name, require_labels=True)
    return data, KnnGraph.load(knn_path(root, name, k, method=knn_file_method(index)))


def _scores(data: ClusterSet, knn: KnnGraph, cluster) -> list[str]:
    start = time.perf_counter()
    pred = cluster(data.features, knn)
    seconds = time.perf_counter() - start
    m = evaluate_clustering(data.labels, pred)
    values = [m["pairwise_fscore"], m["bcubed_fscore"], m["nmi"]]
    return [f"{100 * v:.2f}" for v in values] + [f"{m['num_clusters']:,}", f"{seconds:.0f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--model", type=Path, required=True, help="trained GCN-D")
    p.add_argument("--seg-model", type=Path, help="trained GCN-S (cluster with gcn_ds)")
    p.add_argument("--train", default="part0_train")
    p.add_argument("--test", default="part1_test")
    p.add_argument("--knn-method", choices=["flat", "ivf", "hnsw"], default="ivf")
    p.add_argument("--k", type=int, default=80)
    p.add_argument("--starts", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--step", type=float, default=0.05)
    args = p.parse_args()

    def clusterer(start: float):
        settings = [{"k": args.k, "th": round(start + i * args.step, 4)} for i in range(3)]
        if args.seg_model is None:
            return lambda x, knn: gcn_d_cluster(
                x, knn, model=args.model, settings=settings, show_progress=False
            )
        return lambda x, knn: gcn_ds_cluster(
            x, knn, model=args.model, seg_model=args.seg_model, settings=settings,
            show_progress=False,
        )  # fmt: skip

    header = ["set", "thresholds", "pairwise F", "BCubed F", "NMI", "clusters", "time (s)"]
    rows = []
    train = _load(args.root, args.train, args.knn_method, args.k)
    for start in args.starts:
        ths = f"{start:g}, {start + args.step:g}, {start + 2 * args.step:g}"
        rows.append([args.train, ths, *_scores(*train, clusterer(start))])
        print(markdown_table(header, rows[-1:]), flush=True)
    del train
    best = max(range(len(rows)), key=lambda i: float(rows[i][2]))
    start = args.starts[best]
    test = _scores(*_load(args.root, args.test, args.knn_method, args.k), clusterer(start))
    rows.append([f"{args.test} (picked on {args.train})", rows[best][1], *test])
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
