"""Gallery search (``robustface gallery``): build time, memory, queries/s, recall@1 per index.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/gallery_search.py [--sizes 100000 1000000]
[--dim 512] [--queries 2000] [--indexes flat,ivf,hnsw] [--threads 2] [--repeats 3]``.

Gallery entries are clustered synthetic features (``cluster_knn.fake_features``: ``N / 10``
random unit centres plus Gaussian noise, so that every entry has near neighbours, as sibling
identities do); each query is a planted near-duplicate of a random entry (the entry plus noise
``--query-noise`` per dimension, renormalised). Each index is built by
:func:`robustface.deploy.gallery.build_index`, the function the gallery uses, in a forked child
process so that its peak RSS (getrusage) is its own: the inherited features plus the index.
Search: all queries in one call, ``k=10``, the median of ``--repeats`` runs. Recall@1: the
fraction of queries whose first result is the exact search's (``IndexFlatIP``) first result;
``planted@1`` is the fraction whose first result is the planted entry.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from cluster_knn import fake_features
from robustface.deploy.gallery import IndexSpec, build_index
from robustface.utils.table import markdown_table


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_index(
    conn: Connection, feats: np.ndarray, queries: np.ndarray, spec: IndexSpec, repeats: int
) -> None:
    """Child process: build, search ``repeats`` times; send timings, RSS, size and top-1 ids."""
    start = time.perf_counter()
    index = build_index(feats, spec)
    build = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, 10)
        times.append(time.perf_counter() - start)
    size = faiss.serialize_index(index).nbytes / 2**30
    conn.send((build, statistics.median(times), peak_rss_gib(), size, ids[:, 0]))
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--indexes", default="flat,ivf,hnsw", help="comma-separated")
    parser.add_argument("--noise", type=float, default=0.03, help="entry noise per dimension")
    parser.add_argument("--query-noise", type=float, default=0.03, help="query noise per dim")
    parser.add_argument("--threads", type=int, default=2, help="faiss threads")
    parser.add_argument("--repeats", type=int, default=3, help="search runs (median)")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: the gallery's)")
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--ef-search", type=int, default=128)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    kinds = [k.strip() for k in args.indexes.split(",") if k.strip()]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at start; {args.threads} faiss "
        f"threads, faiss {faiss.__version__}, numpy {np.__version__}; dim {args.dim}, "
        f"{args.queries} queries, k=10"
    )
    rows = []
    for n in args.sizes:
        feats = fake_features(n, args.dim, max(1, n // 10), args.noise)
        rng = np.random.default_rng(2)
        planted = rng.choice(n, args.queries, replace=False)
        queries = feats[planted] + args.query_noise * rng.standard_normal(
            (args.queries, args.dim), dtype=np.float32
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact_top = None
        ctx = mp.get_context("fork")
        for kind in ["flat", *[k for k in kinds if k != "flat"]]:
            spec = IndexSpec(
                type=kind, nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search
            )
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=run_index, args=(send, feats, queries, spec, args.repeats))
            child.start()
            send.close()
            build, search, rss, size, top = receive.recv()
            child.join()
            if exact_top is None:
                exact_top = top
            if kind not in kinds:
                continue
            params = {"flat": "exact", "ivf": f"nprobe {spec.nprobe}", "hnsw": "M 32, ef 80/"}
            params["hnsw"] += str(spec.ef_search)
            rows.append(
                [
                    f"{n:,}",
                    kind,
                    params[kind],
                    f"{build:.1f}",
                    f"{args.queries / search:,.0f}",
                    f"{rss:.2f}",
                    f"{size:.2f}",
                    f"{np.mean(top == exact_top):.4f}",
                    f"{np.mean(top == planted):.4f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        del feats
    headers = ["entries", "index", "parameters", "build s", "queries/s", "peak RSS GiB"]
    headers += ["index GiB", "recall@1 vs exact", "planted@1"]
    print(markdown_table(headers, rows))
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
