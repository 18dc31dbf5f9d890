"""GCN-V inference: robustface now, before issue 20, and learn-to-cluster's, side by side.

Run: ``.venv/bin/python benchmarks/gcn_v_inference.py [--num 100000] [--dim 256] [--k 80]
[--repeats 3] [--methods now round2 ltc model]``.

Fake features of ``--num`` samples (clusters of 60 around random centres, unit rows) and a kNN
graph built without a search: each sample's 60 cluster mates (itself included) with their true
cosines, plus 20 random samples from elsewhere, sorted nearest first; so about 3/4 of the edges
are mutual, as in a real face kNN. One randomly initialised GCN-V (hidden 512) is saved and used
by every method. From the kNN lists to the confidence and the hidden features:

* ``now``: :func:`robustface.cluster.gcn_v.predict_gcn_v` (blocks of 8,192 rows: the rows of
  ``max(S, S^T)`` built one block ahead in a thread, ``A X`` by ``F.embedding_bag`` with the self
  loop and the normalisation applied to its output, one ``[X, AX] W`` product and the
  classifier's first layer by oneDNN: ``GCNV.predict_rows``);
* ``round2``: the same after issue 20's second round, copied below (graph blocks of 16,384 rows
  in column order, a torch CSR product each, the dense layers by MKL on 65,536 rows at a time
  written in place into reused buffers and the output arrays);
* ``earlier``: the dense path after issue 20's first round, copied below (blocks of 65,536 rows, a
  new tensor for every intermediate, the hidden features copied into the output); its graph rows
  come from today's ``gcn_adjacency_blocks`` (unsorted columns, so ``to_torch_sparse`` sorts them),
  not from the first round's graph code;
* ``previous``: the same before issue 20, copied below (reverse edges by ``argsort`` +
  ``searchsorted`` + ``unique`` per block, normalisation by a diagonal product, a COO tensor);
* ``ltc``: learn-to-cluster's code path (``vegcn/datasets/gcn_v_dataset.py`` then
  ``vegcn/test_gcn_v.py``; MIT licence, functions copied below): ``fast_knns2spmat``,
  ``build_symmetric_adj``, ``row_normalize``, ``sparse_mx_to_torch_sparse_tensor``, then one
  ``torch.spmm`` over the whole graph and the model;
* ``model``: the model alone (``A X``, the graph convolution, the classifier) over the whole
  graph, built beforehand: the work every method shares, a floor for all of them.

Each (repeat, method) runs in a fresh process, methods interleaved, so that one method's freed
memory does not count for the next; the table gives median wall times, their ratios (of the
medians, and per repeat: each repeat runs the methods back to back, so they share the load of
that moment), the sampled peak resident memory of the run (inputs included: the inputs alone are
the "inputs" row), and the largest difference of the confidences from ``ltc``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from cluster_pipeline import Stages  # this directory is on sys.path when run as a script
from robustface.cluster.gcn_v import (
    GCNV,
    _kept,
    _one_ahead,
    gcn_adjacency,
    gcn_adjacency_blocks,
    load_gcn_v,
    predict_gcn_v,
    reverse_edges,
    save_gcn,
    to_torch_sparse,
)
from robustface.cluster.graph import knn_edges
from robustface.cluster.knn import KnnGraph
from robustface.utils.table import markdown_table

METHODS = ("now", "round2", "earlier", "previous", "ltc", "model")
CLUSTER = 60
OUTSIDERS = 20
ROW_BATCH = 65536


def fake_set(num: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, KnnGraph]:
    """Unit features in clusters of ``CLUSTER`` and their kNN lists (see the module docstring)."""
    if k != CLUSTER + OUTSIDERS:
        raise SystemExit(f"--k must be {CLUSTER + OUTSIDERS} for this fake graph")
    rng = np.random.default_rng(seed)
    num -= num % CLUSTER
    centres = rng.standard_normal((num // CLUSTER, dim), dtype=np.float32)
    feats = np.repeat(centres, CLUSTER, axis=0)
    feats += 1.2 * rng.standard_normal(feats.shape, dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    grouped = feats.reshape(-1, CLUSTER, dim)
    inside = np.einsum("cid,cjd->cij", grouped, grouped).reshape(num, CLUSTER)
    mates = (np.arange(num) // CLUSTER * CLUSTER)[:, None] + np.arange(CLUSTER)
    others = (mates[:, :1] + CLUSTER + rng.integers(0, num - CLUSTER, (num, OUTSIDERS))) % num
    outside = np.empty(others.shape, dtype=np.float32)
    for start in range(0, num, ROW_BATCH):  # in chunks: the gathered rows are 20 KB a sample
        part = slice(start, start + ROW_BATCH)
        outside[part] = np.einsum("nd,nkd->nk", feats[part], feats[others[part]])
    nbrs, sims = np.hstack([mates, others]), np.hstack([inside, outside]).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")
    return feats, KnnGraph(np.take_along_axis(nbrs, order, 1), np.take_along_axis(sims, order, 1))


# ---- robustface after issue 20's second round (commit b9fa6f4) ----------------------------------

ROUND2_GRAPH_BATCH = 16384


def round2_adjacency_rows(
    knn: KnnGraph, reverse: sp.csr_matrix, start: int, stop: int
) -> sp.csr_matrix:
    n = knn.num_samples
    stop = min(stop, n)
    rows = stop - start
    nbrs, sims, keep = _kept(knn, start, stop)
    indptr = np.zeros(len(nbrs) + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    fwd = sp.csr_matrix(
        (sims[keep].astype(np.float32, copy=False), nbrs[keep], indptr), shape=(rows, n)
    )
    fwd = fwd.T.tocsr().T.tocsr()
    fwd.has_sorted_indices = True
    fwd.sum_duplicates()
    back = reverse[start:stop]
    back.sum_duplicates()
    eye = sp.csr_matrix(
        (np.ones(rows, dtype=np.float32), (np.arange(rows), np.arange(start, stop))),
        shape=(rows, n),
    )
    adj = (fwd.maximum(back) + eye).tocsr().astype(np.float32, copy=False)
    sums = np.asarray(adj.sum(axis=1), dtype=np.float32).ravel()
    adj.data *= np.repeat(1.0 / sums, np.diff(adj.indptr))
    return adj


def round2_blocks(knn: KnnGraph, batch_size: int):
    reverse = reverse_edges(knn, batch_size)
    for start in range(0, knn.num_samples, batch_size):
        stop = min(start + batch_size, knn.num_samples)
        yield start, stop, round2_adjacency_rows(knn, reverse, start, stop)


def round2_predict_into(
    model: GCNV,
    x: torch.Tensor,
    agg: torch.Tensor,
    hidden: torch.Tensor,
    conf: torch.Tensor,
    work: torch.Tensor,
    chunk: int = 4096,
) -> None:
    conv, (first, prelu, last) = model.conv1, model.classifier
    torch.mm(x, conv.weight[: conv.in_dim], out=hidden)
    torch.mm(agg, conv.weight[conv.in_dim :], out=work)
    hidden += work
    hidden += conv.bias
    hidden.relu_()
    torch.addmm(first.bias, hidden, first.weight.t(), out=work)
    for start in range(0, len(work), chunk):
        part = F.prelu(work[start : start + chunk], prelu.weight)
        conf[start : start + chunk] = F.linear(part, last.weight, last.bias).squeeze(-1)


@torch.no_grad()
def round2_predict(model: GCNV, feats: np.ndarray, knn: KnnGraph) -> tuple[np.ndarray, np.ndarray]:
    """``predict_gcn_v`` on the CPU after the second round: graph blocks of 16,384 rows (a torch
    CSR product each), the dense layers on 65,536 rows written in place (MKL's products)."""
    num = len(feats)
    x = torch.from_numpy(feats)
    conf = np.empty(num, dtype=np.float32)
    hidden = np.empty((num, model.hidden), dtype=np.float32)
    size = min(ROW_BATCH, num)
    agg = torch.empty((size, feats.shape[1]))
    work = torch.empty((size, model.hidden))
    block_conf = torch.from_numpy(conf)
    graph = _one_ahead(round2_blocks(knn, min(ROUND2_GRAPH_BATCH, size)))
    with contextlib.closing(graph):
        for start in range(0, num, size):  # 16,384 divides 65,536: no graph block straddles
            stop = min(start + size, num)
            n, last = stop - start, start
            while last < stop:
                first, last, rows = next(graph)
                torch.mm(to_torch_sparse(rows), x, out=agg[first - start : last - start])
            h, c = torch.from_numpy(hidden[start:stop]), block_conf[start:stop]
            round2_predict_into(model, x[start:stop], agg[:n], h, c, work[:n])
    return conf, hidden


# ---- robustface after issue 20's first round (commit fff35c1) -----------------------------------


def earlier_predict(model: GCNV, feats: np.ndarray, knn: KnnGraph) -> np.ndarray:
    """Confidences by the first round's dense path over today's graph blocks."""
    x = torch.from_numpy(feats)
    conf = np.empty(len(feats), dtype=np.float32)
    hidden = np.empty((len(feats), model.hidden), dtype=np.float32)
    for start, stop, rows in gcn_adjacency_blocks(knn, ROW_BATCH):
        agg = torch.sparse.mm(to_torch_sparse(rows), x)
        h = model.conv1.combine(x[start:stop], agg)
        conf[start:stop] = model.head(h).numpy()
        hidden[start:stop] = h.numpy()
    return conf


# ---- robustface before issue 20 -----------------------------------------------------------------


def previous_reverse_edges(knn: KnnGraph, batch_size: int = ROW_BATCH) -> sp.csr_matrix:
    n = knn.num_samples
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        dst = knn_edges(knn, min_sim=0.0, start=start, stop=start + batch_size)[1]
        counts += np.bincount(dst, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    index_dtype = np.int32 if n < 2**31 and indptr[-1] < 2**31 else np.int64
    indices = np.empty(indptr[-1], dtype=index_dtype)
    data = np.empty(indptr[-1], dtype=np.float32)
    fill = indptr[:-1].copy()
    for start in range(0, n, batch_size):
        src, dst, sim = knn_edges(knn, min_sim=0.0, start=start, stop=start + batch_size)
        order = np.argsort(dst, kind="stable")
        dst = dst[order]
        first = np.searchsorted(dst, dst, side="left")
        pos = fill[dst] + np.arange(len(dst)) - first
        indices[pos], data[pos] = src[order], sim[order]
        rows, run = np.unique(dst, return_counts=True)
        fill[rows] += run
    return sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, n))


def previous_adjacency_rows(
    knn: KnnGraph, reverse: sp.csr_matrix, start: int, stop: int
) -> sp.csr_matrix:
    n = knn.num_samples
    stop = min(stop, n)
    rows = stop - start
    src, dst, sim = knn_edges(knn, min_sim=0.0, start=start, stop=stop)
    fwd = sp.csr_matrix((sim, (src - start, dst)), shape=(rows, n), dtype=np.float32)
    fwd.sum_duplicates()
    back = reverse[start:stop]
    back.sum_duplicates()
    eye = sp.csr_matrix(
        (np.ones(rows, dtype=np.float32), (np.arange(rows), np.arange(start, stop))),
        shape=(rows, n),
    )
    adj = (fwd.maximum(back) + eye).tocsr()
    sums = np.asarray(adj.sum(axis=1), dtype=np.float32).ravel()
    return (sp.diags(1.0 / sums) @ adj).tocsr().astype(np.float32)


def previous_to_torch_sparse(adj: sp.spmatrix) -> torch.Tensor:
    coo = sp.coo_matrix(adj)
    coo.sum_duplicates()
    indices = np.stack([coo.row, coo.col]).astype(np.int64)
    return torch.sparse_coo_tensor(
        torch.from_numpy(indices),
        torch.from_numpy(coo.data.astype(np.float32)),
        size=coo.shape,
        is_coalesced=True,
        check_invariants=False,
    )


def previous_predict(model: GCNV, feats: np.ndarray, knn: KnnGraph) -> np.ndarray:
    x = torch.from_numpy(feats)
    conf = np.empty(len(feats), dtype=np.float32)
    hidden = np.empty((len(feats), model.hidden), dtype=np.float32)
    reverse = previous_reverse_edges(knn)
    for start in range(0, len(feats), ROW_BATCH):
        stop = min(start + ROW_BATCH, len(feats))
        rows = previous_adjacency_rows(knn, reverse, start, stop)
        agg = torch.sparse.mm(previous_to_torch_sparse(rows), x)
        h = model.conv1.combine(x[start:stop], agg)
        conf[start:stop] = model.head(h).numpy()
        hidden[start:stop] = h.numpy()
    return conf


# ---- learn-to-cluster (github.com/yl-1993/learn-to-cluster, MIT licence) ----------------------


def fast_knns2spmat(knns: np.ndarray, k: int, th_sim: float = 0.7, use_sim: bool = False):
    """``utils/knn.py`` (the list-input branch and ``fill_value`` left out)."""
    n = len(knns)
    nbrs = knns[:, 0, :]
    dists = knns[:, 1, :]
    sims = 1.0 - dists if use_sim else dists
    row, col = np.where(sims >= th_sim)
    idxs = np.where(row != nbrs[row, col])
    row = row[idxs]
    col = col[idxs]
    data = sims[row, col]
    col = nbrs[row, col]
    return sp.csr_matrix((data, (row, col)), shape=(n, n))


def build_symmetric_adj(adj, self_loop: bool = True):
    """``utils/adjacency.py``."""
    adj = adj + adj.T.multiply(adj.T > adj) - adj.multiply(adj.T > adj)  # noqa: SIM300
    if self_loop:
        adj = adj + sp.eye(adj.shape[0])
    return adj


def row_normalize(mx):
    """``utils/adjacency.py``."""
    rowsum = np.array(mx.sum(1))
    rowsum[rowsum <= 0] = 1
    r_inv = np.power(rowsum, -1).flatten()
    r_inv[np.isinf(r_inv)] = 0.0
    return sp.diags(r_inv).dot(mx)


def sparse_mx_to_torch_sparse_tensor(sparse_mx) -> torch.Tensor:
    """``utils/adjacency.py`` (``torch.sparse.FloatTensor`` spelled as its successor)."""
    sparse_mx = sparse_mx.tocoo().astype(np.float32)
    indices = torch.from_numpy(np.vstack((sparse_mx.row, sparse_mx.col)).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(sparse_mx.data), sparse_mx.shape)


def ltc_predict(model: GCNV, feats: np.ndarray, knn: KnnGraph) -> np.ndarray:
    """``GCNVDataset`` (adjacency, ``th_sim`` 0) then ``test``: the model over the whole graph."""
    knns = np.stack([knn.nbrs.astype(np.float32), 1.0 - knn.sims], axis=1)  # npz 'data'
    adj = fast_knns2spmat(knns, knn.k, 0.0, use_sim=True)
    adj = row_normalize(build_symmetric_adj(adj, self_loop=True))
    features, adj = torch.FloatTensor(feats), sparse_mx_to_torch_sparse_tensor(adj)
    conv = model.conv1
    agg = torch.spmm(adj, features)
    out = torch.einsum("nd,df->nf", (torch.cat([features, agg], dim=-1), conv.weight))
    hidden = torch.relu(out + conv.bias)
    return model.classifier(hidden).view(-1).detach().numpy()


# ---- driver -------------------------------------------------------------------------------------


def run_one(method: str, data: Path, model_path: Path, out: Path) -> None:
    """One timed run of ``method`` in this process (``inputs``: read the inputs, nothing else);
    writes its time and peak to ``out`` and its confidences beside it."""
    with np.load(data) as z:
        feats, knn = z["feats"], KnnGraph(z["nbrs"], z["sims"])
    model = load_gcn_v(model_path)
    runs: dict[str, Callable[[], np.ndarray]] = {
        "now": lambda: predict_gcn_v(model, feats, knn, show_progress=False)[0],
        "round2": lambda: round2_predict(model, feats, knn)[0],
        "earlier": lambda: earlier_predict(model, feats, knn),
        "previous": lambda: previous_predict(model, feats, knn),
        "ltc": lambda: ltc_predict(model, feats, knn),
        "inputs": lambda: np.zeros(len(feats), np.float32),
    }
    if method == "model":  # the graph built outside the timing: the work every method shares
        adj = to_torch_sparse(gcn_adjacency(knn))
        x = torch.from_numpy(feats)
        runs["model"] = lambda: model(x, adj)[0].numpy()
    stages = Stages()
    with torch.no_grad(), stages.stage(method):
        conf = runs[method]()
    np.save(out.with_suffix(".npy"), conf)
    out.write_text(json.dumps(stages.rows[0]))


def check(num: int, dim: int, k: int) -> None:
    """Print how far ``now``'s outputs are from ``round2``'s (same data, same weights)."""
    feats, knn = fake_set(num, dim, k)
    torch.manual_seed(0)
    model = GCNV(dim, 512).eval()
    conf, hidden = predict_gcn_v(model, feats, knn, show_progress=False)
    want_conf, want_hidden = round2_predict(model, feats, knn)
    print(
        f"{len(feats):,} x {dim}: max |conf diff| {np.abs(conf - want_conf).max():.1e} "
        f"(|conf| up to {np.abs(want_conf).max():.2f}), max |hidden diff| "
        f"{np.abs(hidden - want_hidden).max():.1e} (hidden up to {want_hidden.max():.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=CLUSTER + OUTSIDERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "DATA", "MODEL", "OUT"))
    parser.add_argument(
        "--check", action="store_true",
        help="no timing: the largest differences of now's confidences and hidden features "
        "from round2's, in this process",
    )  # fmt: skip
    args = parser.parse_args()
    if args.check:
        check(args.num, args.dim, args.k)
        return
    if args.worker:
        method, data, model_path, out = args.worker
        if args.threads:
            torch.set_num_threads(args.threads)
        run_one(method, Path(data), Path(model_path), Path(out))
        return

    runs: dict[str, list[dict]] = {m: [] for m in [*args.methods, "inputs"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        feats, knn = fake_set(args.num, args.dim, args.k)
        data, model_path = tmp_dir / "data.npz", tmp_dir / "gcn_v.pth"
        np.savez(data, feats=feats, nbrs=knn.nbrs, sims=knn.sims)
        torch.manual_seed(0)
        save_gcn(GCNV(args.dim, 512), model_path)
        print(
            f"{len(feats):,} x {args.dim}, k={args.k}; {platform.machine()}, {os.cpu_count()} "
            f"CPUs, torch {torch.__version__} ({args.threads or torch.get_num_threads()} threads); "
            f"load average before {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for r in range(args.repeats):
            for method in [*args.methods, "inputs"] if r == 0 else args.methods:
                out = tmp_dir / f"{method}_{r}.json"
                worker = [__file__, "--worker", method, str(data), str(model_path), str(out)]
                worker += ["--threads", str(args.threads)] if args.threads else []
                subprocess.run([sys.executable, *worker], check=True, stdout=subprocess.DEVNULL)
                runs[method].append(
                    {**json.loads(out.read_text()), "conf": np.load(out.with_suffix(".npy"))}
                )
                print(f"repeat {r + 1}, {method}: {runs[method][-1]['seconds']:.2f} s", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    reference = "ltc" if "ltc" in args.methods else args.methods[0]
    ref_seconds = statistics.median(x["seconds"] for x in runs[reference])
    rows = []
    for method in args.methods:
        seconds = statistics.median(x["seconds"] for x in runs[method])
        peak = max(x["peak_rss_gib"] for x in runs[method])
        diff = float(np.abs(runs[method][0]["conf"] - runs[reference][0]["conf"]).max())
        times = ", ".join(f"{x['seconds']:.1f}" for x in runs[method])
        per_repeat = ", ".join(
            f"{x['seconds'] / r['seconds']:.2f}"
            for x, r in zip(runs[method], runs[reference], strict=True)
        )
        rows.append(
            [
                method,
                times,
                f"{seconds:.2f}",
                f"{seconds / ref_seconds:.2f}",
                per_repeat,
                f"{peak:.2f}",
                f"{diff:.1e}",
            ]
        )
    inputs_peak = f"{runs['inputs'][0]['peak_rss_gib']:.2f}"
    rows.append(["inputs only", "-", "-", "-", "-", inputs_peak, "-"])
    heads = [
        "method",
        "runs (s)",
        "median (s)",
        f"vs {reference}",
        "per repeat",
        "peak RSS (GiB)",
        "max conf diff",
    ]
    print(markdown_table(heads, rows))


if __name__ == "__main__":
    main()
