"""Pick the linking thresholds of GCN-V (tau) and connected components (min_sim) on a training set.

Run: ``.venv/bin/python benchmarks/cluster_tune.py ROOT --train part0_train --test part1_test
--model GCN_V.pth [--knn-method ivf] [--k 80]``.

The published thresholds (GCN-V tau_0 0.65 on the input kNN, CC 0.7) were set on real MS1M
features; simulated or other features need their own. For each threshold on a grid, the pairwise F
on the labelled ``--train`` set is computed (its cached kNN graph and GCN-V's confidence there);
the best one is then applied once to ``--test``. Both sets' kNN graphs must already be cached
(``robustface cluster knn``). Prints a Markdown table: method, threshold chosen on train, train F,
test pairwise / BCubed F and NMI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustface.cluster.baselines import cc
from robustface.cluster.dataset import knn_path, load_cluster_set
from robustface.cluster.gcn_v import confidence_link, load_gcn_v, predict_gcn_v
from robustface.cluster.knn import KnnGraph
from robustface.cluster.metrics import evaluate_clustering, pairwise
from robustface.utils.table import markdown_table

GRID = np.round(np.arange(0.30, 0.801, 0.05), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--train", default="part0_train")
    p.add_argument("--test", default="part1_test")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--knn-method", choices=["flat", "ivf", "hnsw"], default="ivf")
    p.add_argument("--k", type=int, default=80)
    args = p.parse_args()
    method = "faiss" if args.knn_method == "flat" else f"faiss_{args.knn_method}"
    model = load_gcn_v(args.model)
    sets = {}
    for split in (args.train, args.test):
        data = load_cluster_set(args.root, split, require_labels=True)
        knn = KnnGraph.load(knn_path(args.root, split, args.k, method=method))
        conf, _ = predict_gcn_v(model, data.features, knn, return_hidden=False)
        sets[split] = (data, knn, conf)
    methods = {
        "gcn_v (tau, input kNN)": lambda knn, conf, t: confidence_link(knn, conf, float(t)),
        "cc (min_sim)": lambda knn, conf, t: cc(None, knn, min_sim=float(t)),
    }
    rows = []
    for name, run in methods.items():
        data, knn, conf = sets[args.train]
        scores = {t: pairwise(data.labels, run(knn, conf, t))[2] for t in GRID}
        best = max(scores, key=scores.get)
        print(name, {float(t): round(100 * f, 2) for t, f in scores.items()}, flush=True)
        data, knn, conf = sets[args.test]
        s = evaluate_clustering(data.labels, run(knn, conf, best))
        rows.append([name, f"{best:.2f}", f"{100 * scores[best]:.2f}",
                     f"{100 * s['pairwise_fscore']:.2f}", f"{100 * s['bcubed_fscore']:.2f}",
                     f"{100 * s['nmi']:.2f}"])  # fmt: skip
    header = ["method", "threshold (train)", "train F", "test pairwise F", "BCubed F", "NMI"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
