"""Run several clustering methods on one labelled set and write the comparison table.

:func:`run_methods` builds (or reads) the kNN graph once, runs each method through the
:data:`~robustface.cluster.base.CLUSTERERS` registry, scores it against the ground truth with
:func:`~robustface.cluster.metrics.evaluate_clustering` and times it. The kNN time is reported
once, apart from the methods' own times (as learn-to-cluster reports them). A method that fails
is recorded with its error and the others still run. Outputs (``out_dir``): ``results.md``,
``results.csv``, ``results.json``, ``labels/{method}.npy`` and ``results.png`` (pairwise F-score
against time).
"""

from __future__ import annotations

import csv
import io
import json
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustface.cluster.base import CLUSTERERS
from robustface.cluster.dataset import ClusterSet
from robustface.cluster.knn import KnnGraph, Method, build_knn
from robustface.cluster.metrics import evaluate_clustering
from robustface.cluster.training import MODEL_PARAMS
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.table import markdown_table

__all__ = ["BASELINES", "LEARNED", "MethodResult", "method_params", "run_methods"]

BASELINES: tuple[str, ...] = (
    "kmeans",
    "hac",
    "dbscan",
    "aro",
    "cc",
    "chinese_whispers",
    "infomap",
)
LEARNED: tuple[str, ...] = ("gcn_d", "gcn_ds", "gcn_v", "gcn_e")
HAC_MAX_SAMPLES = 100_000  # sklearn's connectivity-restricted HAC needs O(N k) dense work per merge


@dataclass
class MethodResult:
    """One method's outcome: metrics (``None`` if it failed or was skipped) and its time."""

    method: str
    params: dict[str, Any]
    seconds: float | None
    metrics: dict[str, float] | None
    error: str | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def method_params(
    method: str,
    labels: np.ndarray | None,
    models: Mapping[str, str | Path] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    knn_method: Method = "flat",
) -> dict[str, Any]:
    """Keyword arguments of ``method``: with ground-truth ``labels``, ``kmeans`` and ``hac`` get
    the true number of identities (as the published baselines); learned methods get their model
    files from ``models`` (``gcn_v``, ``gcn_e``, ``gcn_d``, ``gcn_s``), ``device`` and the
    ``knn_method`` of the graphs they build; ``overrides`` win."""
    params: dict[str, Any] = {}
    if method in MODEL_PARAMS:
        params.update(device=device, knn_method=knn_method)
    if method in ("kmeans", "hac") and labels is not None:
        params["num_clusters"] = int(np.unique(labels[labels >= 0]).size)
    for param, kind in MODEL_PARAMS.get(method, {}).items():
        if not models or kind not in models:
            raise ValueError(f"method {method!r} needs a trained {kind} model (models[{kind!r}])")
        params[param] = str(models[kind])
    params.update(overrides or {})
    return params


def _row(result: MethodResult) -> list[Any]:
    m = result.metrics
    if m is None:
        note = result.skipped or f"failed: {result.error}"
        return [result.method, *["-"] * 8, note]
    return [
        result.method,
        f"{100 * m['pairwise_precision']:.2f}",
        f"{100 * m['pairwise_recall']:.2f}",
        f"{100 * m['pairwise_fscore']:.2f}",
        f"{100 * m['bcubed_fscore']:.2f}",
        f"{100 * m['nmi']:.2f}",
        m["num_clusters"],
        m["num_singletons"],
        f"{result.seconds:.1f}",
        "",
    ]


HEADERS = [
    "method",
    "pairwise P",
    "pairwise R",
    "pairwise F",
    "BCubed F",
    "NMI",
    "clusters",
    "singletons",
    "time (s)",
    "note",
]


def _plot(results: Sequence[MethodResult], title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        if r.metrics is None:
            continue
        seconds = max(r.seconds or 0.0, 1e-2)
        ax.scatter(seconds, 100 * r.metrics["pairwise_fscore"], s=30)
        ax.annotate(r.method, (seconds, 100 * r.metrics["pairwise_fscore"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("method time (s, log)")
    ax.set_ylabel("pairwise F-score (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _write(
    out_dir: Path, data: ClusterSet, knn_info: dict[str, Any], results: list[MethodResult]
) -> None:
    n = len(data.features)
    ids = int(np.unique(data.labels[data.labels >= 0]).size)
    header = (
        f"# Clustering benchmark: {data.name}\n\n"
        f"{n:,} samples x {data.features.shape[1]}, {ids:,} identities. kNN: "
        f"{knn_info['method']} k={knn_info['k']}, {knn_info['seconds']:.1f} s "
        f"({knn_info['source']}), not included in the method times. Metrics in %; NMI is "
        "sklearn's arithmetic-mean normalisation.\n\n"
    )
    table = markdown_table(HEADERS, [_row(r) for r in results])
    write_text_atomic(out_dir / "results.md", header + table + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = sorted({k for r in results if r.metrics for k in r.metrics})
    writer.writerow(["method", "seconds", "error", "skipped", *keys])
    for r in results:
        m = r.metrics or {}
        writer.writerow(
            [r.method, r.seconds, r.error or "", r.skipped or ""] + [m.get(k) for k in keys]
        )
    write_text_atomic(out_dir / "results.csv", buf.getvalue())
    doc = {
        "set": data.name,
        "samples": n,
        "identities": ids,
        "knn": knn_info,
        "methods": [asdict(r) for r in results],
    }
    write_text_atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    _plot(results, f"{data.name}: {n:,} samples", out_dir / "results.png")


def run_methods(
    data: ClusterSet,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    knn: KnnGraph | None = None,
    k: int = 80,
    knn_method: Method = "flat",
    knn_info: Mapping[str, Any] | None = None,
    models: Mapping[str, str | Path] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> list[MethodResult]:
    """Run ``methods`` on ``data`` (labels required) and write the comparison (module docstring).

    ``knn`` is used when given, with ``knn_info`` (``method``, ``seconds``, ``source``) saying how
    it was made; otherwise it is built with ``k`` and ``knn_method``. ``params`` maps a method to
    keyword overrides; learned methods run on ``device``. ``hac`` is skipped above
    :data:`HAC_MAX_SAMPLES` samples.
    """
    if data.labels is None:
        raise ValueError(f"set {data.name!r} has no labels: a benchmark needs the ground truth")
    for method in methods:
        CLUSTERERS.get(method)  # unknown names fail before any work
    unknown = set(params or {}) - set(methods)
    if unknown:
        raise ValueError(f"params given for methods not run: {', '.join(sorted(unknown))}")
    all_params = {
        m: method_params(
            m, data.labels, models, (params or {}).get(m), device=device, knn_method=knn_method
        )
        for m in methods
    }
    out_dir = Path(out_dir)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    if knn is None:
        t0 = time.perf_counter()
        knn = build_knn(data.features, k=k, method=knn_method, show_progress=show_progress)
        knn_info = {"method": knn_method, "k": knn.k, "seconds": time.perf_counter() - t0,
                    "source": "built"}  # fmt: skip
    else:
        if knn.num_samples != len(data.features):
            raise ValueError(
                f"knn has {knn.num_samples} rows but set {data.name!r} has {len(data.features)}"
            )
        knn_info = {"method": "given", "seconds": 0.0, "source": "given", **(knn_info or {})}
        knn_info["k"] = knn.k
    results: list[MethodResult] = []
    for method in methods:
        kwargs = all_params[method]
        shown = {key: value for key, value in kwargs.items() if key != "show_progress"}
        if method == "hac" and len(data.features) > HAC_MAX_SAMPLES:
            reason = f"skipped: N > {HAC_MAX_SAMPLES:,} (sklearn HAC does not scale)"
            results.append(MethodResult(method, shown, None, None, skipped=reason))
            continue
        fn = CLUSTERERS.get(method)
        if "show_progress" in fn.__code__.co_varnames:
            kwargs = {"show_progress": show_progress, **kwargs}
        t0 = time.perf_counter()
        try:
            labels = np.asarray(fn(data.features, knn, **kwargs))
        except Exception as exc:  # one failing method must not lose the others' results
            results.append(
                MethodResult(method, shown, None, None, error=f"{type(exc).__name__}: {exc}",
                             extra={"traceback": traceback.format_exc()})
            )  # fmt: skip
            continue
        seconds = time.perf_counter() - t0
        with atomic_path(out_dir / "labels" / f"{method}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, labels)
        metrics = evaluate_clustering(data.labels, labels)
        results.append(MethodResult(method, shown, seconds, metrics))
        _write(out_dir, data, knn_info, results)
    _write(out_dir, data, knn_info, results)
    return results
