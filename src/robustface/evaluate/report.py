"""Evaluation reports: one JSON file with every number and one Markdown table per evaluation.

``write_evaluation(out_dir, kind, results, table, model=..., config=...)`` writes
``out_dir/{kind}.json`` and ``out_dir/{kind}.md``. The JSON holds::

    {"kind": ..., "results": {...}, "config": {...}, "model": model_fingerprint(model) or null,
     "meta": versions, git revision, command line and time}

NumPy scalars and arrays, paths and tuples become plain JSON values; non-finite floats become
``null``; float dictionary keys (e.g. ``{far: tar}``) are written with ``%g`` (``"1e-06"``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from robustface.utils.io import write_text_atomic
from robustface.utils.run import RunDir, run_metadata

__all__ = ["model_fingerprint", "to_jsonable", "write_evaluation"]

_HASH_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    """The file's sha256, hashed once per process for a given path, size and modification time
    (a command fingerprints its model for a cache key and again for its report)."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identify a checkpoint by content: ``{"path", "size", "sha256"}``.

    For a file (``.pth``, ``.onnx``, ...), ``size`` is its byte size and ``sha256`` its hash. For a
    run directory the files that ``load_backbone`` reads are hashed (its config and best backbone,
    else its last: :meth:`robustface.utils.run.RunDir.model_files`): ``files`` maps each name to
    its ``size`` and ``sha256``, ``size`` is their total and ``sha256`` hashes the sorted
    ``name:sha256`` lines, so it changes when the weights or the architecture change.
    """
    path = Path(path)
    if path.is_file():
        return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": _sha256(path)}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in RunDir(path).model_files()
    }
    lines = "".join(f"{name}:{info['sha256']}\n" for name, info in sorted(files.items()))
    return {
        "path": str(path.resolve()),
        "size": sum(info["size"] for info in files.values()),
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "files": files,
    }


def _key(key: Any) -> str:
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, float):
        return f"{key:g}"
    return str(key)


def to_jsonable(value: Any) -> Any:
    """``value`` with NumPy values, paths and tuples made plain JSON (non-finite floats: None)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Mapping):
        return {_key(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_evaluation(
    out_dir: str | Path,
    kind: str,
    results: dict[str, Any],
    table: str,
    *,
    model: str | Path | None,
    config: dict[str, Any],
) -> Path:
    """Write ``out_dir/{kind}.md`` (``table``) and then ``out_dir/{kind}.json``, each atomically.

    ``kind`` names the evaluation (e.g. ``"ijbc"``, ``"megaface"``) and becomes the file stem;
    ``model`` is the checkpoint evaluated (fingerprinted with :func:`model_fingerprint`) or None.
    Returns the JSON path.
    """
    if not kind or Path(kind).name != kind or kind.startswith("."):
        raise ValueError(f"kind must be a plain file stem like 'ijbc', got {kind!r}")
    out = Path(out_dir)
    meta = run_metadata(seed=0)
    meta.pop("seed")
    report = {
        "kind": kind,
        "results": results,
        "config": config,
        "model": None if model is None else model_fingerprint(model),
        "meta": meta,
    }
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    write_text_atomic(out / f"{kind}.md", table.rstrip("\n") + "\n")
    path = out / f"{kind}.json"
    write_text_atomic(path, text)
    return path
