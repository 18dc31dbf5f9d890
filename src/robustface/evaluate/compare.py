"""Combine evaluation results of several runs into one Markdown comparison table.

Each argument of :func:`combine` is a JSON file or a directory; a directory contributes every
``*.json`` directly inside it whose shape is recognised (others, such as ``meta.json``, are
skipped). The row of a directory is named after it; the row of a file is ``parent/stem``.
Results that land in the same row are merged; a metric may appear only once per row.

Recognised JSON shapes:

* ``robustface eval verification --out FILE``: ``{set: {"accuracy_mean": a, ...}, ...}``, and
  a training run's ``train_results.json``: ``{"verification": {set: {"accuracy_mean": ...}}}``.
  Columns: one per set, the mean 10-fold accuracy in percent; when every row has the same sets
  (two or more) an ``avg (%)`` column follows them.
* :func:`robustface.evaluate.report.write_evaluation` output, ``{"kind": K, "results": R, ...}``:

  - ``K`` starting with ``megaface`` (:func:`robustface.evaluate.megaface.evaluate_megaface`):
    ``MegaFace Id (%)`` (rank-1) and ``MegaFace Ver (%)`` (TAR at ``R["far_target"]``), at the
    largest distractor-set size; a size other than 1M is named in the header.
  - ``K`` starting with ``ijb`` (``robustface eval ijb``): ``R["verification"]["tar_at_far"]``
    maps FAR to TAR (``{"1e-06": t, ...}``), giving ``{K upper-case} TAR@FAR=x (%)`` columns;
    with 1:N results (``R["identification"]``, one entry per gallery), ``rank-1 (%)`` and
    ``TPIR@FPIR=x (%)`` columns, each the mean over the galleries (G1 and G2 of IJB-C).
  - ``K == "verification"`` with ``R`` in the verification shape above.

Missing cells show ``-``. The verification sets come first, then the other metrics; each in
the order in which they are first met.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustface.utils.table import markdown_table

__all__ = ["combine", "metrics_of"]


def _is_verification(doc: Any) -> bool:
    return (
        isinstance(doc, Mapping)
        and bool(doc)
        and all(isinstance(v, Mapping) and "accuracy_mean" in v for v in doc.values())
    )


def _size_label(n: int) -> str:
    for unit, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _verification_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    return {f"{name} (%)": 100 * float(r["accuracy_mean"]) for name, r in results.items()}


def _megaface_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    size, best = max(results["sizes"].items(), key=lambda kv: int(kv[0]))
    at = "" if int(size) == 1_000_000 else f" @{_size_label(int(size))}"
    return {
        f"MegaFace Id{at} (%)": 100 * float(best["rank1"]),
        f"MegaFace Ver{at} (%)": 100 * float(best["tar"]),
    }


def _ijb_metrics(kind: str, results: Mapping[str, Any]) -> dict[str, float]:
    tars = results["verification"]["tar_at_far"]
    metrics = {
        f"{kind.upper()} TAR@FAR={float(far):g} (%)": 100 * float(tar)
        for far, tar in sorted(tars.items(), key=lambda kv: float(kv[0]))
        if tar is not None
    }
    galleries = list(results.get("identification", {}).values())
    if galleries:
        rank1 = [float(g["rank"]["1"]) for g in galleries]
        metrics[f"{kind.upper()} rank-1 (%)"] = 100 * sum(rank1) / len(rank1)
        tpirs = [g["tpir_at_fpir"] for g in galleries]
        for fpir in sorted(tpirs[0], key=float):
            values = [t.get(fpir) for t in tpirs]
            if all(v is not None for v in values):
                mean = sum(float(v) for v in values) / len(values)
                metrics[f"{kind.upper()} TPIR@FPIR={float(fpir):g} (%)"] = 100 * mean
    return metrics


def metrics_of(doc: Any) -> tuple[dict[str, float], list[str]] | None:
    """``(metrics {column: value in %}, verification set names)`` of a JSON document, or None
    when its shape is not one of those in the module docstring."""
    if _is_verification(doc):
        return _verification_metrics(doc), list(doc)
    if not isinstance(doc, Mapping):
        return None
    if _is_verification(doc.get("verification")):
        return _verification_metrics(doc["verification"]), list(doc["verification"])
    kind, results = doc.get("kind"), doc.get("results")
    if not isinstance(kind, str) or not isinstance(results, Mapping):
        return None
    try:
        if kind.startswith("megaface"):
            return _megaface_metrics(results), []
        if kind.startswith("ijb"):
            return _ijb_metrics(kind, results), []
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{kind} results lack the expected fields: {exc!r}") from exc
    if kind == "verification" and _is_verification(results):
        return _verification_metrics(results), list(results)
    return None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc


Found = tuple[Path, dict[str, float], list[str]]


def _documents(path: Path) -> tuple[str, list[Found]]:
    """The row label of one argument and ``(file, metrics, set names)`` of its results."""
    if path.is_dir():
        files = [*sorted(path.glob("*.json")), *sorted(path.glob("eval/*.json"))]
        found = [(f, metrics_of(_read(f))) for f in files]
        results = [(f, *m) for f, m in found if m is not None]
        if not results:
            raise ValueError(f"{path}: no evaluation JSON inside (see robustface.evaluate.compare)")
        resolved = path.resolve()
        # `eval ijb` writes into RUN/eval/: name such a directory after its run
        return (resolved.parent.name if resolved.name == "eval" else resolved.name), results
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    metrics = metrics_of(_read(path))
    if metrics is None:
        raise ValueError(f"{path}: not an evaluation result (see robustface.evaluate.compare)")
    parent = path.resolve().parent.name
    return (f"{parent}/{path.stem}" if parent else path.stem), [(path, *metrics)]


def combine(paths: Sequence[str | Path]) -> str:
    """One Markdown table comparing the evaluation results in ``paths`` (rows = runs)."""
    if not paths:
        raise ValueError("no runs or result files given")
    rows: dict[str, dict[str, float]] = {}
    sources: dict[tuple[str, str], Path] = {}
    sets: dict[str, tuple[str, ...]] = {}
    columns: dict[str, None] = {}
    for arg in paths:
        label, found = _documents(Path(arg))
        row = rows.setdefault(label, {})
        for file, metrics, set_names in found:
            if set_names:
                sets[label] = sets.get(label, ()) + tuple(set_names)
            for column, value in metrics.items():
                if (label, column) in sources:
                    raise ValueError(
                        f"{column!r} of {label} is in both {sources[label, column]} and {file}"
                    )
                sources[label, column] = file
                row[column] = value
                columns.setdefault(column)
    set_columns = {f"{name} (%)" for names in sets.values() for name in names}
    headers = [c for c in columns if c in set_columns]
    set_lists = {tuple(sorted(s)) for s in sets.values()}
    if len(sets) == len(rows) and len(set_lists) == 1 and len(headers) > 1:
        headers.append("avg (%)")
        for label, row in rows.items():
            row["avg (%)"] = sum(row[f"{name} (%)"] for name in sets[label]) / len(sets[label])
    headers += [c for c in columns if c not in set_columns]
    table = [
        [label, *(f"{row[c]:.2f}" if c in row else "-" for c in headers)]
        for label, row in rows.items()
    ]
    return markdown_table(["run", *headers], table)
