"""k-nearest-neighbour graphs of L2-normalised face features (faiss), learn-to-cluster layout.

A :class:`KnnGraph` holds, for each of N samples, its k nearest neighbours by cosine similarity,
most similar first, the sample itself included (as learn-to-cluster's files do). Missing entries
(an approximate index that found fewer than k, or entries removed by a similarity threshold) have
id ``-1`` and similarity ``-inf``.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from tqdm import tqdm

from robustface.data.ltc import read_knn, write_knn
from robustface.errors import DataFormatError
from robustface.utils.guards import check_choice, check_int
from robustface.utils.io import write_text_atomic

__all__ = [
    "KnnGraph",
    "build_knn",
    "check_features",
    "features_fingerprint",
    "ivf_nlist",
    "knn_brute_force",
    "knn_recall",
    "load_or_build_knn",
    "normalize_rows",
]

Method = Literal["flat", "ivf", "hnsw"]
METHODS: tuple[str, ...] = ("flat", "ivf", "hnsw")
# faiss does not promise which of tied candidates it keeps at the k-th place: ask for this many
# more, order by (similarity, lower id), then cut to k
_TIE_MARGIN = 4


@dataclass
class KnnGraph:
    """Neighbour ids ``(N, k)`` int64 and cosine similarities ``(N, k)`` float32, best first."""

    nbrs: np.ndarray
    sims: np.ndarray

    def __post_init__(self) -> None:
        if self.nbrs.ndim != 2 or self.nbrs.shape != self.sims.shape:
            raise ValueError(
                f"nbrs and sims must be (N, k) arrays of one shape, got {self.nbrs.shape} "
                f"and {self.sims.shape}"
            )

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.nbrs.shape[0])

    @property
    def k(self) -> int:
        """Neighbours kept per sample (self included)."""
        return int(self.nbrs.shape[1])

    @property
    def dists(self) -> np.ndarray:
        """Distances ``1 - cos`` (learn-to-cluster's convention); missing entries are ``inf``."""
        return (1.0 - self.sims).astype(np.float32)

    def threshold(self, min_sim: float) -> KnnGraph:
        """A copy without neighbours of similarity below ``min_sim`` (set to -1 / -inf)."""
        drop = self.sims < min_sim
        nbrs = np.where(drop, -1, self.nbrs)
        sims = np.where(drop, -np.inf, self.sims).astype(np.float32)
        return KnnGraph(nbrs, sims)

    def truncate(self, k: int) -> KnnGraph:
        """The first ``k`` neighbours of each sample."""
        k = check_int("k", k, 1, self.k)
        return KnnGraph(self.nbrs[:, :k].copy(), self.sims[:, :k].copy())

    def save(self, path: str | Path) -> None:
        """Write learn-to-cluster's ``.npz`` (key ``data``, ``[N, 2, k]``, ``1 - cos``)."""
        write_knn(path, self.nbrs, self.dists)

    @classmethod
    def load(cls, path: str | Path) -> KnnGraph:
        """Read a learn-to-cluster kNN ``.npz`` (distances ``1 - cos``); rows stored in another
        order are sorted most similar first (:func:`~robustface.data.ltc.read_knn`)."""
        nbrs, dists = read_knn(path)
        sims = (1.0 - dists.astype(np.float64)).astype(np.float32)
        sims[nbrs < 0] = -np.inf
        return cls(nbrs, sims)


def _checked(
    block: np.ndarray, rows: range | np.ndarray, normalize: bool, name: str, where: str = ""
) -> np.ndarray:
    """``block`` (rows ``rows`` of ``name``) as C-contiguous float32, L2-normalised with
    ``normalize``; a NaN/inf row (or, to normalise, an all-zero row) is an error naming it."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} has {bad.size} row(s) with NaN or inf values{where} "
            f"(first: row {int(rows[bad[0]])})"
        )
    if not normalize:
        return block
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero row(s) that cannot be normalised{where} "
            f"(first: row {int(rows[np.flatnonzero(zero)[0]])})"
        )
    return block / norms


def _matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    """``features`` as a floating ``(N, d)`` array without reading or copying it (a ``np.memmap``
    stays one)."""
    feats = features if isinstance(features, np.ndarray) else np.asarray(features)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, dim) array, got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {feats.dtype}")
    return feats


def check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """``features`` as a C-contiguous float32 ``(N, d)`` array; NaN/inf rows are an error."""
    feats = _matrix(features, name)
    return _checked(feats, range(len(feats)), normalize=False, name=name)


def normalize_rows(features: np.ndarray, name: str = "features", copy: bool = True) -> np.ndarray:
    """L2-normalised float32 copy of ``features``; a zero row is an error that names it.

    With ``copy=False``, ``features`` itself is returned when it is already C-contiguous float32
    with unit rows (squared norms within 1e-5 of 1): no second copy of a million-row matrix.
    """
    feats = _matrix(features, name)
    if not copy and feats.dtype == np.float32 and feats.flags.c_contiguous:
        checked = _checked(feats, range(len(feats)), normalize=False, name=name)
        if np.all(np.abs(np.einsum("ij,ij->i", checked, checked) - 1.0) <= 1e-5):
            return checked
    return _checked(feats, range(len(feats)), normalize=True, name=name)


def knn_brute_force(features: np.ndarray, k: int) -> KnnGraph:
    """Exact kNN by a dense numpy similarity matrix (reference for tests; O(N^2) memory).

    Ties are broken by the lower id; the sample itself is first unless a duplicate ties with it.
    """
    feats = normalize_rows(features).astype(np.float64)
    sims = feats @ feats.T
    k = min(k, len(feats))
    order = np.lexsort((np.broadcast_to(np.arange(len(feats)), sims.shape), -sims), axis=1)[:, :k]
    return KnnGraph(order.astype(np.int64), np.take_along_axis(sims, order, 1).astype(np.float32))


def ivf_nlist(num_rows: int, nlist: int | None = None) -> int:
    """The IVF list count used for an index of ``num_rows`` rows.

    Default ``min(4096, 8 sqrt(N))`` (learn-to-cluster); any value is capped at ``N // 39`` (at
    least 1) so that k-means has at least 39 training points per list, below which faiss warns
    that the clustering is unreliable.
    """
    if nlist is not None:
        nlist = check_int("nlist", nlist, 1)
    wanted = nlist if nlist is not None else min(4096, int(8 * np.sqrt(num_rows)))
    return max(1, min(wanted, num_rows // 39))


def _sorted_rows(nbrs: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best entries, by similarity then lower id; missing (-1) entries last."""
    sims = np.where(nbrs < 0, -np.inf, sims).astype(np.float32, copy=False)
    order = np.lexsort((nbrs, -sims), axis=1)[:, :k]
    return np.take_along_axis(nbrs, order, 1), np.take_along_axis(sims, order, 1)


def _shard_bounds(n: int, shard_size: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` of near-equal shards of at most ``shard_size`` rows (one if None)."""
    if shard_size is None:
        return [(0, n)]
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 or None, got {shard_size}")
    edges = np.linspace(0, n, -(-n // shard_size) + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _shard_index(
    feats: np.ndarray,
    start: int,
    stop: int,
    method: str,
    *,
    batch_size: int,
    normalize: bool,
    nlist: int | None,
    nprobe: int | None,
    hnsw_m: int,
    ef_search: int,
    bar: tqdm,
) -> faiss.Index:
    """A faiss index of rows ``start:stop``, added batch by batch (``bar`` counts the batches);
    local ids ``0..stop-start-1``."""
    n, dim = stop - start, feats.shape[1]
    if method == "flat":
        index = faiss.IndexFlatIP(dim)
    elif method == "ivf":
        lists = ivf_nlist(n, nlist)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        rows = np.arange(start, stop)
        if n > 256 * lists:  # faiss's own cap on useful training points
            rows = np.sort(np.random.default_rng(0).choice(rows, 256 * lists, replace=False))
        train = feats[start:stop] if len(rows) == n else feats[rows]
        index.train(_checked(train, rows, normalize, "features", " among the training rows"))
        index.nprobe = nprobe or min(128, lists)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        index.add(_checked(feats[lo:hi], range(lo, hi), normalize, "features"))
        bar.update()
    return index


def build_knn(
    features: np.ndarray,
    k: int = 80,
    method: Method = "flat",
    *,
    batch_size: int = 65536,
    shard_size: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 256,
    min_sim: float | None = None,
    normalize: bool = True,
    show_progress: bool = True,
    timings: dict[str, float] | None = None,
) -> KnnGraph:
    """The k nearest neighbours (self included) of every row by cosine similarity.

    ``method``: ``flat`` (exact, faiss ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, nlist
    ``min(4096, 8 sqrt N)`` and nprobe ``min(128, nlist)`` as in learn-to-cluster, nlist capped
    by :func:`ivf_nlist` at 39 training points per list) or ``hnsw`` (``IndexHNSWFlat``, ``hnsw_m``
    links, ``ef_search``). Rows are read, checked and normalised ``batch_size`` at a time, so
    ``features`` may be a ``np.memmap`` (e.g. ``read_features(..., mmap=True)``) that is never
    loaded or copied whole; ``normalize=False`` skips normalising rows that already are.

    With ``shard_size``, the rows are split into near-equal shards of at most that many rows, each
    its own index (built, searched by every query batch, then freed), and each query's neighbours
    are merged into the global top k: memory is one shard's index plus the ``N x k`` result. For
    ``flat`` this equals the unsharded result; IVF/HNSW then build one index per shard (nlist
    from the shard's size).

    Neighbours are ordered by similarity, ties by the lower id (up to five candidates tied at the
    k-th place are resolved so: faiss is asked for k + 4 and the list is cut after sorting).
    Missing ones (an approximate index finding fewer than k) are -1 / -inf. With ``k > N``, every
    row gets all N. With ``min_sim``, neighbours below that similarity are dropped (id -1).
    ``timings``, if given, receives the seconds spent building indexes (``"index"``) and searching
    (``"search"``).
    """
    k, batch_size = check_int("k", k, 1), check_int("batch_size", batch_size, 1)
    check_choice("method", method, METHODS)
    feats = _matrix(features)
    n = len(feats)
    if n == 0:
        raise ValueError("features is empty (0 rows)")
    k = min(k, n)
    shards = _shard_bounds(n, shard_size)
    nbrs = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    spent = {"index": 0.0, "search": 0.0}
    batches = range(0, n, batch_size)
    adds = sum(-(-(hi - lo) // batch_size) for lo, hi in shards)
    desc = f"kNN ({method}, {len(shards)} shard{'s' * (len(shards) > 1)}: add, search)"
    with tqdm(
        total=adds + len(shards) * len(batches), desc=desc, unit="batch", disable=not show_progress
    ) as bar:
        for lo, hi in shards:
            tic = time.perf_counter()
            index = _shard_index(
                feats,
                lo,
                hi,
                method,
                batch_size=batch_size,
                normalize=normalize,
                nlist=nlist,
                nprobe=nprobe,
                hnsw_m=hnsw_m,
                ef_search=ef_search,
                bar=bar,
            )
            spent["index"] += time.perf_counter() - tic
            tic = time.perf_counter()
            for start in batches:
                stop = min(start + batch_size, n)
                queries = _checked(feats[start:stop], range(start, stop), normalize, "features")
                d, i = index.search(queries, min(k + _TIE_MARGIN, hi - lo))
                i = np.where(i >= 0, i + lo, -1)
                if len(shards) > 1:  # merge with what the earlier shards found
                    i = np.concatenate([nbrs[start:stop], i], axis=1)
                    d = np.concatenate([sims[start:stop], d], axis=1)
                nbrs[start:stop], sims[start:stop] = _sorted_rows(i, d, k)
                bar.update()
            spent["search"] += time.perf_counter() - tic
            del index
    if timings is not None:
        timings.update(spent)
    graph = KnnGraph(nbrs, sims)
    return graph.threshold(min_sim) if min_sim is not None else graph


_PARAMS_BY_METHOD = {
    "flat": ("normalize", "min_sim"),
    "ivf": ("normalize", "min_sim", "shard_size", "nlist", "nprobe"),
    "hnsw": ("normalize", "min_sim", "shard_size", "hnsw_m", "ef_search"),
}
_BUILD_OPTIONS = {  # build_knn's keyword arguments and their defaults
    name: p.default
    for name, p in inspect.signature(build_knn).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def features_fingerprint(features: np.ndarray, num_rows: int = 1024) -> str:
    """A cheap identity of a feature matrix: sha256 of its shape and of up to ``num_rows`` rows
    evenly spaced over it (as float32). Changes outside those rows go unnoticed."""
    feats = _matrix(features)
    rows = np.unique(np.linspace(0, len(feats) - 1, min(len(feats), num_rows)).astype(np.int64))
    digest = hashlib.sha256(f"{feats.shape[0]}x{feats.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(feats[rows], dtype="<f4").tobytes())
    return "sha256:" + digest.hexdigest()


def _cache_key(features: np.ndarray, k: int, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(_BUILD_OPTIONS))
    if unknown:
        raise TypeError(f"load_or_build_knn got unknown build_knn argument(s): {unknown}")
    check_choice("method", method, METHODS)
    params = {}
    for name in _PARAMS_BY_METHOD[method]:
        value = kwargs.get(name, _BUILD_OPTIONS[name])
        params[name] = value.item() if isinstance(value, np.generic) else value
    return {
        "num_samples": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "k": int(k),
        "method": method,
        "params": params,
        "fingerprint": features_fingerprint(features),
    }


def _load_hand_made(path: Path, n: int, k: int) -> KnnGraph:
    """A learn-to-cluster ``.npz`` without our sidecar: N must match and k suffice; each row's
    ``k`` nearest are kept (rows are sorted on reading)."""
    graph = KnnGraph.load(path)
    if graph.num_samples != n:
        raise ValueError(
            f"{path}: kNN file has {graph.num_samples} rows but features has {n}; it belongs "
            "to other features (no sidecar to tell more)"
        )
    if graph.k < min(k, n):
        raise ValueError(f"{path}: kNN file has k={graph.k} neighbours per row, fewer than k={k}")
    bad = (graph.nbrs < -1) | (graph.nbrs >= n)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataFormatError(path, f"row {row} has neighbour ids outside [0, {n})")
    return graph.truncate(min(k, n))


def load_or_build_knn(
    path: str | Path, features: np.ndarray, k: int = 80, method: Method = "flat", **kwargs: Any
) -> KnnGraph:
    """The kNN graph cached at ``path`` (learn-to-cluster ``.npz``), built and cached if absent.

    Beside the ``.npz`` a sidecar ``<path>.json`` records N, dim, k, method, the parameters that
    change the graph (``kwargs`` of :func:`build_knn`, defaults filled in) and
    :func:`features_fingerprint`. A cache whose record differs from this request is refused with
    an error that names each difference; it is never rebuilt or overwritten (delete it, or use
    another path). An ``.npz`` without a sidecar (e.g. one from learn-to-cluster) is accepted
    when it has N rows and at least k neighbours (each row's k nearest are kept; rows are sorted
    nearest first on reading, whatever their stored order); its provenance is unchecked.
    A sidecar without its ``.npz`` is left by an interrupted build (the sidecar is written first),
    so the graph is then built. Both files are written atomically.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    feats = _matrix(features)
    key = _cache_key(feats, k, method, kwargs)
    if path.exists() and not sidecar.exists():
        return _load_hand_made(path, len(feats), k)
    if path.exists():
        try:
            cached = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFormatError(sidecar, f"not a readable JSON kNN cache record: {exc}") from exc
        if not isinstance(cached, dict):
            raise DataFormatError(sidecar, "expected a JSON object")
        differ = [
            f"{name} {cached.get(name)!r} (cache) != {value!r} (requested)"
            for name, value in key.items()
            if cached.get(name) != value
        ]
        if differ:
            raise ValueError(
                f"{path}: stale kNN cache, made for other data or settings: {'; '.join(differ)}. "
                f"Delete {path.name} and {sidecar.name} to rebuild, or choose another path"
            )
        graph = KnnGraph.load(path)
        expected = (key["num_samples"], min(k, key["num_samples"]))
        if (graph.num_samples, graph.k) != expected:
            raise DataFormatError(
                path, f"holds a ({graph.num_samples}, {graph.k}) graph, its sidecar says {expected}"
            )
        return graph
    graph = build_knn(feats, k, method, **kwargs)
    write_text_atomic(sidecar, json.dumps(key, indent=2) + "\n")
    graph.save(path)
    return graph


def knn_recall(approx: KnnGraph, exact: KnnGraph) -> float:
    """Mean over samples of the fraction of ``exact``'s neighbours that ``approx`` also lists.

    Missing entries (-1) of ``exact`` are not counted; samples without any exact neighbour are
    left out of the mean.
    """
    if approx.num_samples != exact.num_samples:
        raise ValueError(
            f"approx and exact must cover the same samples, got {approx.num_samples} and "
            f"{exact.num_samples} rows"
        )
    span = max(int(approx.nbrs.max(initial=-1)), int(exact.nbrs.max(initial=-1))) + 1
    rows = np.arange(exact.num_samples, dtype=np.int64)[:, None]
    valid = exact.nbrs >= 0
    wanted = (rows * span + exact.nbrs)[valid]
    listed = (rows * span + approx.nbrs)[approx.nbrs >= 0]
    per_row = valid.sum(axis=1)
    if not per_row.any():
        raise ValueError("exact has no neighbours (every entry is -1)")
    hits = np.bincount(
        np.broadcast_to(rows, valid.shape)[valid],
        weights=np.isin(wanted, listed),
        minlength=exact.num_samples,
    )
    has = per_row > 0
    return float((hits[has] / per_row[has]).mean())
