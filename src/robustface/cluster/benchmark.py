"""Run several clustering methods on one labelled set and write the comparison table.

:func:`run_methods` builds (or reads) the kNN graph once, runs each method's estimator from the
:data:`~robustface.cluster.base.CLUSTERERS` registry, scores it against the ground truth with
:func:`~robustface.cluster.metrics.evaluate_clustering` and times it. The kNN time is reported
once, apart from the methods' own times (as learn-to-cluster reports them). A method that fails
is recorded with its error and the others still run. Outputs (``out_dir``): ``results.md``,
``results.csv``, ``results.json``, ``labels/{method}.npy`` and ``results.png`` (pairwise F-score
against time).

Thresholds published for MS1M features rarely suit other features. With ``tune_on`` (a labelled
training set), each method with a threshold (its estimator's ``tuned_param``) first gets it
picked on that set (:func:`tune_method`: the grid value of best training score); the
test set is then clustered once at that value. The picks, with every grid score, are written to
``results.md``/``results.json`` and plotted in ``tuning.png``.
"""

from __future__ import annotations

import csv
import io
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from robustface.cluster.base import CLUSTERERS, check_params, param_names, tunable
from robustface.cluster.dataset import ClusterSet
from robustface.cluster.knn import KnnGraph, Method, build_knn
from robustface.cluster.metrics import bcubed, evaluate_clustering, nmi, pairwise
from robustface.utils.guards import check_choice
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.table import markdown_table

__all__ = [
    "BASELINES",
    "LEARNED",
    "TUNE_METRICS",
    "MethodResult",
    "TuneResult",
    "method_params",
    "run_methods",
    "tune_method",
]

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
TUNE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "pairwise_fscore": lambda gt, pred: pairwise(gt, pred)[2],
    "bcubed_fscore": lambda gt, pred: bcubed(gt, pred)[2],
    "nmi": nmi,
}


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


@dataclass
class TuneResult:
    """A threshold picked on a labelled set: ``value`` of ``param`` scored best by ``metric``
    among ``grid`` (``scores`` aligned with it; the first best on ties), in ``seconds``."""

    set: str
    param: str
    value: float
    metric: str
    grid: list[float]
    scores: list[float]
    seconds: float


def tune_method(
    method: str,
    data: ClusterSet,
    knn: KnnGraph | None,
    params: Mapping[str, Any] | None = None,
    *,
    grid: Sequence[float] | None = None,
    metric: str = "pairwise_fscore",
    show_progress: bool = True,
) -> TuneResult:
    """Pick ``method``'s threshold (its estimator's ``tuned_param``) on the labelled ``data``:
    cluster at each ``grid`` value (default: the estimator's ``grid``) with the other ``params``
    fixed and keep the value of best ``metric`` (a :data:`TUNE_METRICS` name).

    The threshold-independent work (GCN-V/E inference, ARO distances) is done once
    (:meth:`~robustface.cluster.base.Clusterer.prepare`, then one
    :meth:`~robustface.cluster.base.Clusterer.relink` per value).
    """
    cls = CLUSTERERS.get(method)
    param = cls.tuned_param
    if param is None:
        raise ValueError(
            f"{method} has no threshold to tune; tunable methods: {', '.join(tunable())}"
        )
    if data.labels is None:
        raise ValueError(f"set {data.name!r} has no labels: tuning needs the ground truth")
    check_choice("metric", metric, TUNE_METRICS)
    values = [float(v) for v in (cls.grid if grid is None else grid)]
    if not values or not np.all(np.isfinite(values)):
        raise ValueError(f"{method}: the {param} grid must be finite values, got {grid}")
    fixed = {key: value for key, value in (params or {}).items() if key != param}
    t0 = time.perf_counter()
    estimator = cls(**fixed).prepare(data.features, knn)
    score = TUNE_METRICS[metric]
    scores = [
        float(score(data.labels, estimator.relink(value)))
        for value in tqdm(values, desc=f"tune {method}", disable=not show_progress)
    ]
    return TuneResult(
        set=data.name,
        param=param,
        value=values[int(np.argmax(scores))],
        metric=metric,
        grid=values,
        scores=scores,
        seconds=time.perf_counter() - t0,
    )


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
    ``knn_method`` of the graphs they build; ``overrides`` win. (What a method gets is read
    from its estimator class: ``true_count`` and ``models``.)"""
    cls = CLUSTERERS.get(method)
    params: dict[str, Any] = {}
    if cls.models:
        params.update(device=device, knn_method=knn_method)
    if cls.true_count is not None and labels is not None:
        params[cls.true_count] = int(np.unique(labels[labels >= 0]).size)
    for param, kind in cls.models.items():
        if not models or kind not in models:
            raise ValueError(
                f"method {method!r} needs a trained {kind} model (models[{kind!r}]; CLI: --model "
                f"{kind}=FILE, written by 'robustface cluster train')"
            )
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


def _place_labels(ax: Any, points: Sequence[tuple[float, float, str]], pad: float) -> float:
    """One pass of :func:`_label_points`; returns the top of the highest label (pixels)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []  # window extents of the labels written so far
    for x, y, name in sorted(points, key=lambda p: (p[1], p[0], p[2])):
        right = ax.transData.transform((x, y))[0] < ax.bbox.x0 + 0.75 * ax.bbox.width
        style = {"ha": "left" if right else "right", "va": "center", "fontsize": 8,
                 "textcoords": "offset points"}  # fmt: skip
        dx = 6.0 if right else -6.0
        box = ax.annotate(name, (x, y), xytext=(dx, 0.0), **style).get_window_extent(renderer)
        lift = 0.0  # pixels
        for _ in range(len(placed)):
            hits = [b for b in placed if box.translated(0, lift).overlaps(b)]
            if not hits:
                break
            lift = max(b.y1 for b in hits) - box.y0 + pad
        if lift:
            ax.texts[-1].remove()
            line = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"}
            dy = lift * 72.0 / fig.dpi
            ax.annotate(name, (x, y), xytext=(dx, dy), arrowprops=line, **style)
        placed.append(box.translated(0, lift))
    return max((b.y1 for b in placed), default=ax.bbox.y1)


def _label_points(ax: Any, points: Sequence[tuple[float, float, str]], pad: float = 2.0) -> None:
    """Write each ``(x, y, name)`` beside its point: right of it (left near the right edge),
    moved up from any label already placed that it would overlap (then with a thin line to
    its point), so that no two labels overlap; the y range grows to fit the highest."""
    for _ in range(3):
        top = _place_labels(ax, points, pad)
        if top <= ax.bbox.y1:
            return
        for text in list(ax.texts):
            text.remove()
        y0, y1 = ax.get_ylim()
        ax.set_ylim(y0, y1 + (top - ax.bbox.y1 + pad) * (y1 - y0) / ax.bbox.height)
    _place_labels(ax, points, pad)


def _results_figure(results: Sequence[MethodResult], title: str) -> Any:
    """Pairwise F against method time (log), one labelled point per method with metrics."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    points = []
    for r in results:
        if r.metrics is None:
            continue
        seconds = max(r.seconds or 0.0, 1e-2)
        ax.scatter(seconds, 100 * r.metrics["pairwise_fscore"], s=30)
        points.append((seconds, 100 * r.metrics["pairwise_fscore"], r.method))
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.1)
    ax.set_xlabel("method time (s, log)")
    ax.set_ylabel("pairwise F-score (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _label_points(ax, points)
    return fig


def _plot(results: Sequence[MethodResult], title: str, path: Path) -> None:
    save_figure(_results_figure(results, title), path)


def _tuning_rows(results: Sequence[MethodResult]) -> list[list[Any]]:
    rows = []
    for r in results:
        t = r.extra.get("tuning")
        if t is None:
            continue
        best = t["scores"][t["grid"].index(t["value"])]
        grid = f"{t['grid'][0]:g}..{t['grid'][-1]:g} ({len(t['grid'])} values)"
        edge = len(t["grid"]) > 1 and t["value"] in (min(t["grid"]), max(t["grid"]))
        note = "at the grid's edge: widen it (--tune-grid)" if edge else ""
        rows.append([r.method, t["param"], f"{t['value']:g}", f"{100 * best:.2f}", grid,
                     f"{t['seconds']:.1f}", note])  # fmt: skip
    return rows


def _plot_tuning(results: Sequence[MethodResult], path: Path) -> None:
    tuned = [r for r in results if "tuning" in r.extra]
    if not tuned:
        path.unlink(missing_ok=True)  # no plot from an earlier run left beside these results
        return
    plt = pyplot()
    cols = min(3, len(tuned))
    rows = -(-len(tuned) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, tuned, strict=False):
        t = r.extra["tuning"]
        ax.plot(t["grid"], [100 * v for v in t["scores"]], marker="o", ms=3)
        ax.axvline(t["value"], color="tab:red", lw=1, ls="--")
        ax.set_title(f"{r.method}: {t['param']} = {t['value']:g}", fontsize=9)
        ax.set_xlabel(t["param"], fontsize=8)
        ax.set_ylabel(f"{t['metric']} on {t['set']} (%)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tuned) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def _write(
    out_dir: Path,
    data: ClusterSet,
    knn_info: dict[str, Any],
    results: list[MethodResult],
    tune_info: dict[str, Any] | None = None,
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
    tuning = _tuning_rows(results)
    if tune_info is not None:
        table += (
            f"\n\n## Thresholds picked on {tune_info['set']}\n\nThe value of best "
            f"{tune_info['metric']} on {tune_info['set']} ({tune_info['samples']:,} samples; kNN "
            f"{tune_info['knn']['source']}), applied once to {data.name}; tuning time not included "
            "in the method times. Methods without a row were not tuned (k-means and HAC get the "
            "true number of identities; GCN-D/S use their proposal settings; a threshold given "
            "in params is kept).\n\n"
        )
        headers = ["method", "param", "picked", f"train {tune_info['metric']}", "grid", "time (s)",
                   "note"]  # fmt: skip
        table += markdown_table(headers, tuning)
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
        "tuning": tune_info,
        "methods": [asdict(r) for r in results],
    }
    write_text_atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    _plot(results, f"{data.name}: {n:,} samples", out_dir / "results.png")
    _plot_tuning(results, out_dir / "tuning.png")


def _graph(
    data: ClusterSet,
    knn: KnnGraph | None,
    knn_info: Mapping[str, Any] | None,
    k: int,
    knn_method: Method,
    show_progress: bool,
) -> tuple[KnnGraph, dict[str, Any]]:
    """``knn`` checked against ``data``, or built with ``k`` and ``knn_method``; and its info."""
    if knn is None:
        t0 = time.perf_counter()
        knn = build_knn(data.features, k=k, method=knn_method, show_progress=show_progress)
        info = {"method": knn_method, "k": knn.k, "seconds": time.perf_counter() - t0,
                "source": "built"}  # fmt: skip
        return knn, info
    if knn.num_samples != len(data.features):
        raise ValueError(
            f"knn has {knn.num_samples} rows but set {data.name!r} has {len(data.features)}"
        )
    info = {"method": "given", "seconds": 0.0, "source": "given", **(knn_info or {})}
    info["k"] = knn.k
    return knn, info


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
    tune_on: ClusterSet | None = None,
    tune_knn: KnnGraph | None = None,
    tune_knn_info: Mapping[str, Any] | None = None,
    tune_grids: Mapping[str, Sequence[float]] | None = None,
    tune_metric: str = "pairwise_fscore",
    device: str = "cpu",
    show_progress: bool = True,
) -> list[MethodResult]:
    """Run ``methods`` on ``data`` (labels required) and write the comparison (module docstring).

    ``knn`` is used when given, with ``knn_info`` (``method``, ``seconds``, ``source``) saying how
    it was made; otherwise it is built with ``k`` and ``knn_method``. ``params`` maps a method to
    keyword overrides, checked against each estimator's parameters before any work (every
    problem in one error); learned methods run on ``device``. A method is skipped above its
    estimator's ``max_samples`` (``hac``: 100,000). With ``tune_on`` (and its ``tune_knn``, built
    like ``knn`` when None), tunable methods first get their threshold picked there
    (:func:`tune_method`, ``tune_grids`` overriding the default grids, scored by
    ``tune_metric``); a tuning failure is recorded as the method's error.
    """
    if data.labels is None:
        raise ValueError(f"set {data.name!r} has no labels: a benchmark needs the ground truth")
    for method in methods:
        CLUSTERERS.get(method)  # unknown names fail before any work
    unknown = set(params or {}) - set(methods)
    if unknown:
        raise ValueError(f"params given for methods not run: {', '.join(sorted(unknown))}")
    if tune_grids and tune_on is None:
        raise ValueError("tune_grids given without tune_on")
    untunable = set(tune_grids or {}) - (set(methods) & set(tunable()))
    if untunable:
        raise ValueError(
            f"tune_grids names methods that are not run or have no threshold to tune: "
            f"{', '.join(sorted(untunable))} (tunable: {', '.join(tunable())})"
        )
    check_choice("tune_metric", tune_metric, TUNE_METRICS)
    if tune_on is not None and tune_on.labels is None:
        raise ValueError(f"set {tune_on.name!r} has no labels: tuning needs the ground truth")
    all_params = {
        m: method_params(
            m, data.labels, models, (params or {}).get(m), device=device, knn_method=knn_method
        )
        for m in methods
    }
    problems = [f"{m}: {problem}" for m in methods for problem in check_params(m, all_params[m])]
    if problems:
        raise ValueError("bad method parameters:\n  " + "\n  ".join(problems))
    out_dir = Path(out_dir)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    knn, knn_info = _graph(data, knn, knn_info, k, knn_method, show_progress)
    tune_info = None
    if tune_on is not None:
        tune_knn, info = _graph(tune_on, tune_knn, tune_knn_info, k, knn_method, show_progress)
        tune_info = {"set": tune_on.name, "samples": len(tune_on.features), "knn": info,
                     "metric": tune_metric}  # fmt: skip
    results: list[MethodResult] = []
    for method in methods:
        kwargs = all_params[method]
        shown = {key: value for key, value in kwargs.items() if key != "show_progress"}
        cls = CLUSTERERS.get(method)
        if cls.max_samples is not None and len(data.features) > cls.max_samples:
            reason = f"skipped: N > {cls.max_samples:,} ({cls.max_samples_reason})"
            results.append(MethodResult(method, shown, None, None, skipped=reason))
            continue
        if "show_progress" in param_names(cls):
            kwargs = {"show_progress": show_progress, **kwargs}
        extra: dict[str, Any] = {}
        try:
            param = cls.tuned_param
            if (
                tune_on is not None
                and param is not None
                and param not in (params or {}).get(method, {})
            ):
                tuned = tune_method(method, tune_on, tune_knn, kwargs,
                                        grid=(tune_grids or {}).get(method), metric=tune_metric,
                                        show_progress=show_progress)  # fmt: skip
                extra["tuning"] = asdict(tuned)
                kwargs = {**kwargs, param: tuned.value}
                shown = {**shown, param: tuned.value}
            t0 = time.perf_counter()
            labels = cls(**kwargs).fit_predict(data.features, knn)
        except Exception as exc:  # one failing method must not lose the others' results
            extra["traceback"] = traceback.format_exc()
            error = f"{type(exc).__name__}: {exc}"
            results.append(MethodResult(method, shown, None, None, error=error, extra=extra))
            continue
        seconds = time.perf_counter() - t0
        with atomic_path(out_dir / "labels" / f"{method}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, labels)
        metrics = evaluate_clustering(data.labels, labels)
        results.append(MethodResult(method, shown, seconds, metrics, extra=extra))
        _write(out_dir, data, knn_info, results, tune_info)
    _write(out_dir, data, knn_info, results, tune_info)
    return results
