"""Combine evaluation results of several runs into one Markdown comparison table.

Each argument of :func:`combine` is a JSON file or a directory; a directory contributes every
``*.json`` directly inside it whose shape is recognised (others, such as a run's metadata, are
skipped). The row of a directory is named after it; the row of a file is ``parent/stem``.
Results that land in the same row are merged; a metric may appear only once per row.

Recognised JSON shapes:

* ``robustface eval verification --out FILE``: ``{set: {"accuracy_mean": a, ...}, ...}``, and
  a training run's results (:attr:`robustface.utils.run.RunDir.results_file`):
  ``{"verification": {set: {"accuracy_mean": ...}}}``.
  Columns: one per set, the mean 10-fold accuracy in percent; when every row has the same sets
  (two or more) an ``avg (%)`` column follows them.
* :func:`robustface.evaluate.report.write_evaluation` output, ``{"kind": K, "results": R, ...}``:

  - ``K`` starting with ``megaface`` (:func:`robustface.evaluate.megaface.evaluate_megaface`):
    ``MegaFace Id (%)`` (rank-1) and ``MegaFace Ver (%)`` (TAR at ``R["far_target"]``), at the
    largest distractor-set size; a size other than 1M is named in the header.
  - ``K`` starting with ``ijb`` (``robustface eval ijb``): ``R["verification"]`` maps FAR to TAR
    (``{"1e-06": t, ...}``) in ``tar_at_far_insightface`` (or ``tar_at_far`` in files written
    before it existed), giving ``{K upper-case} TAR@FAR=x (%)`` columns; with 1:N results
    (``R["identification"]``, one entry per gallery, e.g. G1 and G2 of IJB-C), ``{K} G rank-1
    (%)`` and ``{K} G TPIR@FPIR=x (%)`` columns for each gallery ``G``, from
    ``tpir_at_fpir_insightface`` (or ``tpir_at_fpir`` in older files). Galleries are not
    averaged: insightface pools G1 and G2 into one gallery, which their mean is not.
  - ``K == "verification"`` with ``R`` in the verification shape above.

A TAR at a FAR that the file's impostor pairs cannot measure (below ``1 / impostor pairs``, the
rule of :func:`robustface.evaluate.roc.far_measurable`, applied to the counts ``impostor`` and
``num_negatives`` the files record, so older files get it too), and a TPIR at an FPIR below
``1 / nonmated_probes`` (the same rule), show ``n/m``, with the smallest measurable FAR or FPIR
of each such row in a footnote; ``far_reading="insightface"`` shows insightface's
number there, marked ``*``. Missing cells show ``-``. The verification sets come first, then the
other metrics; each in the order in which they are first met.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustface.evaluate.roc import (
    check_far_reading,
    far_measurable,
    unmeasurable_cell,
    unmeasurable_note,
)
from robustface.utils.table import markdown_table

__all__ = ["Unmeasurable", "combine", "metrics_of"]


@dataclass(frozen=True)
class Unmeasurable:
    """A rate (%) at a FAR or FPIR its data cannot measure: insightface's number and the limit,
    e.g. ``"IJBC: 12,000 impostor pairs, FAR >= 8.33e-05"``."""

    insightface: float
    limit: str


Metric = float | Unmeasurable


def _rate_at_far(
    value: float,
    far: float,
    negatives: int,
    what: str,
    counted: str = "impostor pairs",
    rate: str = "FAR",
) -> Metric:
    """``value`` in %, or :class:`Unmeasurable` when ``negatives`` (``counted``, e.g. impostor
    pairs or non-mated probes) cannot measure ``far`` (a ``rate``, e.g. a FAR or an FPIR)."""
    if far_measurable(far, negatives):
        return 100 * value
    return Unmeasurable(
        100 * value, f"{what}: {negatives:,} {counted}, {rate} >= {1 / negatives:.3g}"
    )


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


def _megaface_metrics(results: Mapping[str, Any]) -> dict[str, Metric]:
    size, best = max(results["sizes"].items(), key=lambda kv: int(kv[0]))
    at = "" if int(size) == 1_000_000 else f" @{_size_label(int(size))}"
    tar = float(best.get("tar_insightface", best["tar"]))
    what = f"MegaFace @{_size_label(int(size))}"
    return {
        f"MegaFace Id{at} (%)": 100 * float(best["rank1"]),
        f"MegaFace Ver{at} (%)": _rate_at_far(
            tar, float(results["far_target"]), int(best["num_negatives"]), what
        ),
    }


def _ijb_metrics(kind: str, results: Mapping[str, Any]) -> dict[str, Metric]:
    ver = results["verification"]
    name = kind.upper()
    tars = ver.get("tar_at_far_insightface", ver["tar_at_far"])
    metrics: dict[str, Metric] = {
        f"{name} TAR@FAR={float(far):g} (%)": _rate_at_far(
            float(tar), float(far), int(ver["impostor"]), name
        )
        for far, tar in sorted(tars.items(), key=lambda kv: float(kv[0]))
        if tar is not None
    }
    for gallery, r in results.get("identification", {}).items():
        metrics[f"{name} {gallery} rank-1 (%)"] = 100 * float(r["rank"]["1"])
        tpirs = r.get("tpir_at_fpir_insightface", r["tpir_at_fpir"])
        for fpir, tpir in sorted(tpirs.items(), key=lambda kv: float(kv[0])):
            if tpir is not None:
                metrics[f"{name} {gallery} TPIR@FPIR={float(fpir):g} (%)"] = _rate_at_far(
                    float(tpir),
                    float(fpir),
                    int(r["nonmated_probes"]),
                    f"{name} {gallery}",
                    "non-mated probes",
                    "FPIR",
                )
    return metrics


def metrics_of(doc: Any) -> tuple[dict[str, Metric], list[str]] | None:
    """``(metrics {column: value in % or Unmeasurable}, verification set names)`` of a JSON
    document, or None when its shape is not one of those in the module docstring."""
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


Found = tuple[Path, dict[str, Metric], list[str]]

ACCEPTED = (
    "accepted: the JSON of `eval verification --out`, a training run's train_results.json, "
    "megaface.json (`eval megaface`), an `eval ijb` report (e.g. ijbc.json), or a directory "
    "holding them"
)


def _documents(path: Path) -> tuple[str, list[Found]]:
    """The row label of one argument and ``(file, metrics, set names)`` of its results."""
    if path.is_dir():
        files = [*sorted(path.glob("*.json")), *sorted(path.glob("eval/*.json"))]
        found = [(f, metrics_of(_read(f))) for f in files]
        results = [(f, *m) for f, m in found if m is not None]
        if not results:
            raise ValueError(f"{path}: no evaluation JSON inside ({ACCEPTED})")
        resolved = path.resolve()
        # `eval ijb` writes into RUN/eval/: name such a directory after its run
        return (resolved.parent.name if resolved.name == "eval" else resolved.name), results
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    metrics = metrics_of(_read(path))
    if metrics is None:
        raise ValueError(f"{path}: not an evaluation result ({ACCEPTED})")
    parent = path.resolve().parent.name
    return (f"{parent}/{path.stem}" if parent else path.stem), [(path, *metrics)]


def _cell(value: Metric, far_reading: str) -> str:
    if isinstance(value, Unmeasurable):
        return unmeasurable_cell(f"{value.insightface:.2f}", far_reading)
    return f"{value:.2f}"


def combine(paths: Sequence[str | Path], far_reading: str = "measurable") -> str:
    """One Markdown table comparing the evaluation results in ``paths`` (rows = runs), with a
    footnote on not-measurable cells (``far_reading``: see the module)."""
    check_far_reading(far_reading)
    if not paths:
        raise ValueError("no runs or result files given")
    rows: dict[str, dict[str, Metric]] = {}
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
        [label, *(_cell(row[c], far_reading) if c in row else "-" for c in headers)]
        for label, row in rows.items()
    ]
    text = markdown_table(["run", *headers], table)
    limits = {
        f"{label}, {v.limit}": None
        for label, row in rows.items()
        for v in row.values()
        if isinstance(v, Unmeasurable)
    }
    if not limits:
        return text
    return f"{text}\n\n{unmeasurable_note(far_reading, '; '.join(limits))}"
