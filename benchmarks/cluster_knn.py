"""Time kNN graph building for face clustering (faiss flat / IVF / HNSW): stages, memory, recall.

Run: ``.venv/bin/python benchmarks/cluster_knn.py [--num 584013] [--dim 256] [--k 80]
[--methods flat,ivf,hnsw] [--shard-size ROWS] [--clusters 8573]``.

Fake features at learn-to-cluster's scale (part1_test: 584,013 samples of 8,573 identities):
``--clusters`` random unit centres, each sample its centre plus Gaussian noise (``--noise`` per
dimension; 0.05 at 256-d gives same-identity cosines near 0.6, other pairs near 0), built in
batches. Each method runs ``build_knn`` in a forked child process, so its peak RSS (getrusage) is
its own: the features it inherits plus the index and the ``N x k`` graph. Recall: for
``--queries`` random rows, the exact top k by brute force (numpy, database in chunks) against those
rows of each graph. Prints a Markdown table of wall times per stage (index = train + add,
search = all queries), peak RSS and recall@k.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time
from multiprocessing.connection import Connection

import faiss
import numpy as np

from robustface.cluster.knn import KnnGraph, build_knn, knn_recall
from robustface.utils.table import markdown_table

LTC_PART1 = 584_013
LTC_PART1_IDS = 8_573


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fake_features(num: int, dim: int, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    """``num x dim`` float32 unit rows: a random unit centre per identity plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = rng.integers(0, clusters, num)
    feats = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 1 << 16):
        stop = min(start + (1 << 16), num)
        block = centres[identity[start:stop]]
        block += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        feats[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return feats


def exact_rows(feats: np.ndarray, queries: np.ndarray, k: int, chunk: int = 16384) -> KnnGraph:
    """Exact top ``k`` (cosine, ties by lower id) of the rows ``queries`` over all of ``feats``."""
    q = feats[queries]
    best_ids = np.full((len(q), 0), -1, dtype=np.int64)
    best_sims = np.full((len(q), 0), -np.inf, dtype=np.float32)
    for start in range(0, len(feats), chunk):
        sims = q @ feats[start : start + chunk].T
        top = min(k, sims.shape[1])
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        ids = np.concatenate([best_ids, part + start], axis=1)
        vals = np.concatenate([best_sims, np.take_along_axis(sims, part, 1)], axis=1)
        order = np.lexsort((ids, -vals), axis=1)[:, :k]
        best_ids = np.take_along_axis(ids, order, 1)
        best_sims = np.take_along_axis(vals, order, 1)
    return KnnGraph(best_ids, best_sims)


def run_method(
    conn: Connection, feats: np.ndarray, queries: np.ndarray, method: str, args: argparse.Namespace
) -> None:
    """Child process: build the graph, send back timings, peak RSS and the query rows."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    graph = build_knn(
        feats, args.k, method, shard_size=args.shard_size, timings=timings, show_progress=False
    )
    timings["total"] = time.perf_counter() - start
    conn.send((timings, peak_rss_gib(), graph.nbrs[queries], graph.sims[queries]))
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=LTC_PART1, help="number of samples")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=80)
    parser.add_argument("--methods", default="flat,ivf,hnsw", help="comma-separated")
    parser.add_argument("--shard-size", type=int, default=None, help="rows per index shard")
    parser.add_argument("--clusters", type=int, default=None, help="identities (default: N/68)")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std per dimension")
    parser.add_argument("--queries", type=int, default=2000, help="rows checked for recall")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    clusters = args.clusters or max(1, round(args.num * LTC_PART1_IDS / LTC_PART1))

    start = time.perf_counter()
    feats = fake_features(args.num, args.dim, clusters, args.noise)
    times = {"fake features": time.perf_counter() - start}
    feats_gib = peak_rss_gib()
    queries = np.sort(np.random.default_rng(1).choice(args.num, min(args.queries, args.num), False))
    start = time.perf_counter()
    exact = exact_rows(feats, queries, args.k)
    times[f"exact kNN of {len(queries)} queries (numpy)"] = time.perf_counter() - start

    ctx = mp.get_context("fork")
    rows = []
    for method in methods:
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=run_method, args=(send, feats, queries, method, args))
        child.start()
        send.close()
        timings, rss, nbrs, sims = receive.recv()
        child.join()
        recall = knn_recall(KnnGraph(nbrs, sims), exact)
        rows.append(
            [
                method,
                f"{timings['index']:.1f}",
                f"{timings['search']:.1f}",
                f"{timings['total']:.1f}",
                f"{rss:.2f}",
                f"{recall:.4f}",
            ]
        )

    print(
        f"{args.num:,} x {args.dim} features, {clusters:,} identities (noise {args.noise}), "
        f"k={args.k}, shard size {args.shard_size or 'none'}; {platform.machine()}, "
        f"{faiss.omp_get_max_threads()} faiss threads, faiss {faiss.__version__}, "
        f"numpy {np.__version__}"
    )
    print(markdown_table(["stage", "seconds"], [[s, f"{t:.1f}"] for s, t in times.items()]))
    print()
    headers = ["method", "index s", "search s", "total s", "peak RSS GiB", f"recall@{args.k}"]
    print(markdown_table(headers, rows))
    print(f"peak RSS with the features alone: {feats_gib:.2f} GiB")


if __name__ == "__main__":
    main()
