"""Time the GCN-V clustering pipeline on one set: kNN, GCN-V inference, peak linking; memory peaks.

Run: ``.venv/bin/python benchmarks/cluster_pipeline.py ROOT NAME --model GCN_V.pth
[--knn-method ivf] [--k 80] [--link input|gcn|both] [--nprobe P] [--shard-size ROWS]
[--out results.json]``.

``ROOT``/``NAME`` is a set in the learn-to-cluster layout (e.g. written by ``robustface cluster
simulate``; ``part1_test`` is 584K x 256 at the published scale). Stages, each timed with its own
peak resident memory (``/proc/self/statm`` sampled every 50 ms, so short spikes can be missed;
the process peak from ``getrusage`` is printed too):

1. read the features (L2-normalised, as ``robustface cluster`` reads them) and labels;
2. kNN (``k`` neighbours, faiss ``--knn-method``), built and written to the set's kNN cache
   ``ROOT/knns/NAME/faiss[_METHOD]_k_K.npz`` (the file ``robustface cluster`` reads later); an
   existing cache is refused unless ``--reuse-knn`` (then the stage is a read, not a build);
3. GCN-V inference (confidence and hidden features, in row chunks);
4. peak linking: ``input`` links on the input kNN (tau_0 0.65), ``gcn`` rebuilds the kNN on the
   hidden features (same method and k) and links there (tau 0.8, learn-to-cluster's default),
   ``both`` does both.

With labels, each linking's pairwise / BCubed F and NMI are printed (not timed); with
``--recall-queries Q``, the recall@k of the input kNN against exact search on Q random rows (not
timed). Prints a Markdown table and optionally writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from cluster_knn import exact_rows  # this directory is on sys.path when run as a script
from robustface.cluster.dataset import knn_file_method, knn_path, load_cluster_set
from robustface.cluster.gcn_v import (
    TAU_GCN_FEATURES,
    TAU_INPUT_KNN,
    confidence_link,
    load_gcn_v,
    predict_gcn_v,
    unit_rows,
)
from robustface.cluster.knn import KnnGraph, build_knn, knn_recall, load_or_build_knn
from robustface.cluster.metrics import evaluate_clustering
from robustface.utils.table import markdown_table

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE / 2**30


class Stages:
    """Wall time and sampled peak RSS of named stages."""

    def __init__(self, interval: float = 0.05) -> None:
        self.rows: list[dict[str, Any]] = []
        self.interval = interval

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peak = [rss_gib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.interval):
                peak[0] = max(peak[0], rss_gib())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            thread.join()
            peak[0] = max(peak[0], rss_gib())
            self.rows.append({"stage": name, "seconds": seconds, "peak_rss_gib": peak[0]})
            print(f"{name}: {seconds:.1f} s, peak RSS {peak[0]:.2f} GiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("name")
    p.add_argument("--model", type=Path, required=True, help="trained GCN-V file")
    p.add_argument("--knn-method", choices=["flat", "ivf", "hnsw"], default="ivf")
    p.add_argument("--k", type=int, default=80)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: rule)")
    p.add_argument("--shard-size", type=int, default=None, help="database rows per faiss index")
    p.add_argument("--link", choices=["input", "gcn", "both"], default="both")
    p.add_argument("--reuse-knn", action="store_true", help="read an existing kNN cache")
    p.add_argument("--recall-queries", type=int, default=0, help="rows to check against exact")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    kwargs: dict[str, Any] = {"show_progress": False}
    if args.nprobe is not None:
        kwargs["nprobe"] = args.nprobe
    if args.shard_size is not None:
        kwargs["shard_size"] = args.shard_size
    cache = knn_path(args.root, args.name, args.k, method=knn_file_method(args.knn_method))
    if cache.exists() and not args.reuse_knn:
        raise SystemExit(
            f"{cache} exists: pass --reuse-knn to read it, or delete it to time a build"
        )

    stages = Stages()
    with stages.stage("read features"):
        data = load_cluster_set(args.root, args.name, dim=args.dim)
    knn_stage = "kNN (read cache)" if cache.exists() else f"kNN ({args.knn_method}, k={args.k})"
    with stages.stage(knn_stage):
        knn = load_or_build_knn(cache, data.features, k=args.k, method=args.knn_method, **kwargs)
    model = load_gcn_v(args.model)
    with stages.stage("GCN-V inference"):
        conf, hidden = predict_gcn_v(
            model, data.features, knn, return_hidden=args.link != "input", show_progress=False
        )
    labels: dict[str, np.ndarray] = {}
    if args.link in ("input", "both"):
        with stages.stage(f"peak linking, input kNN (tau {TAU_INPUT_KNN})"):
            labels["input kNN"] = confidence_link(knn, conf, TAU_INPUT_KNN)
    if args.link in ("gcn", "both"):
        gcn_kwargs = kwargs | {"normalize": False}
        with stages.stage(f"kNN of GCN-V features ({args.knn_method}, k={args.k})"):
            gcn_knn = build_knn(unit_rows(hidden), args.k, args.knn_method, **gcn_kwargs)
        with stages.stage(f"peak linking, GCN-V feature kNN (tau {TAU_GCN_FEATURES})"):
            labels["GCN-V feature kNN"] = confidence_link(gcn_knn, conf, TAU_GCN_FEATURES)

    total_input = sum(r["seconds"] for r in stages.rows if "GCN-V feature" not in r["stage"])
    print(f"\n{data.name}: {data.num_samples} x {data.dim}, model {args.model}")
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"faiss threads {faiss.omp_get_max_threads()}")  # fmt: skip
    rows = [[r["stage"], f"{r['seconds']:.1f}", f"{r['peak_rss_gib']:.2f}"] for r in stages.rows]
    print(markdown_table(["stage", "time (s)", "peak RSS (GiB)"], rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nend to end with input-kNN linking: {total_input:.0f} s; process peak {peak:.2f} GiB")
    recall = None
    if args.recall_queries > 0:
        rows_q = np.random.default_rng(0).choice(
            data.num_samples, min(args.recall_queries, data.num_samples), replace=False
        )
        exact = exact_rows(np.asarray(data.features), rows_q, knn.k)
        recall = knn_recall(KnnGraph(knn.nbrs[rows_q], knn.sims[rows_q]), exact)
        print(f"kNN recall@{knn.k} on {len(rows_q)} random rows: {recall:.4f}")
    scores: dict[str, Any] = {}
    if data.labels is not None:
        for link, pred in labels.items():
            s = evaluate_clustering(data.labels, pred)
            scores[link] = s
            print(f"{link}: pairwise F {100 * s['pairwise_fscore']:.2f}, BCubed F "
                  f"{100 * s['bcubed_fscore']:.2f}, NMI {100 * s['nmi']:.2f}, "
                  f"{s['num_clusters']} clusters")  # fmt: skip
    if args.out is not None:
        result = {
            "set": data.name,
            "samples": data.num_samples,
            "stages": stages.rows,
            "scores": scores,
            "recall": recall,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
