"""How good is GCN-V's confidence, and how far could peak linking go with a perfect one?

Run: ``.venv/bin/python benchmarks/cluster_confidence.py ROOT NAME --model GCN_V.pth
[--knn-method ivf] [--k 80] [--taus 0.35 0.4 ...]``.

On a labelled set with a cached kNN graph (``robustface cluster knn``): the correlation and MSE
between GCN-V's predicted confidence and the true one (:func:`confidence_targets`, computed from
the set's labels), then the pairwise F of peak linking on the input kNN at each tau, with the true
and the predicted confidence. The true-confidence row is an upper bound of what training GCN-V
better can give with this linking; it uses the test labels and is a diagnostic, not a result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustface.cluster.dataset import knn_file_method, knn_path, load_cluster_set
from robustface.cluster.gcn_v import confidence_link, confidence_targets, load_gcn_v, predict_gcn_v
from robustface.cluster.knn import KnnGraph
from robustface.cluster.metrics import pairwise
from robustface.utils.table import markdown_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("name")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--knn-method", choices=["flat", "ivf", "hnsw"], default="ivf")
    p.add_argument("--k", type=int, default=80)
    p.add_argument("--taus", type=float, nargs="+", default=[0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65])
    args = p.parse_args()
    data = load_cluster_set(args.root, args.name, require_labels=True)
    knn = KnnGraph.load(
        knn_path(args.root, args.name, args.k, method=knn_file_method(args.knn_method))
    )
    truth = confidence_targets(data.labels, knn)
    pred, _ = predict_gcn_v(load_gcn_v(args.model), data.features, knn, return_hidden=False)
    corr = float(np.corrcoef(pred, truth)[0, 1])
    mse = float(np.mean((pred - truth) ** 2))
    print(f"corr {corr:.4f}, MSE {mse:.4f}, variance of the true confidence {truth.var():.4f}")
    rows = [
        [f"{tau:g}"]
        + [
            f"{100 * pairwise(data.labels, confidence_link(knn, c, tau))[2]:.2f}"
            for c in (truth, pred)
        ]
        for tau in args.taus
    ]
    print(markdown_table(["tau", "pairwise F, true confidence", "pairwise F, GCN-V"], rows))


if __name__ == "__main__":
    main()
