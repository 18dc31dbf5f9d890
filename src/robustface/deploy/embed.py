"""Embed a whole input set to a directory: resumable, atomic, bad inputs named.

Inputs (:func:`open_inputs`):

* an IJB-style directory (``meta/{name}_face_tid_mid.txt`` and ``_name_5pts_score.txt``,
  images in ``loose_crop/``): every image, aligned with its 5 landmarks;
* a ``.rec`` file (insightface or flat layout), or a directory holding one (``train.rec``, as
  ``data.path`` names a training set): every image record, as an aligned crop;
* any other directory: every non-hidden file below it (sorted by relative path), as aligned crops;
* any other file: a list of image paths, one per line (blank lines and ``#`` comments skipped;
  relative paths are relative to the list file's directory).

Output directory ``OUT`` (:func:`embed_to_dir`):

* ``embeddings.npy``: ``(N, d)`` unit embeddings, float32 or float16 (``np.load(...,
  mmap_mode="r")`` maps it);
* ``norms.npy``: ``(N,)`` float32 norms of the raw embeddings (raw = unit * norm);
* ``sources.tsv``: row ``i`` of the arrays and where it came from (path; record key and label;
  IJB image, template and media);
* ``bad.tsv`` (only with ``skip_bad`` and bad inputs): every input left out, with the reason;
* ``manifest.json``: model fingerprint and metadata, input, counts, dtype, time and throughput.

The run writes ``OUT.partial/`` and renames it to ``OUT`` when done. After every batch the rows
done are recorded (``progress.json``, written after the arrays are flushed), so an interrupted run
started again with the same model, input and settings goes on from there, in the same batches,
and gives the same files as an uninterrupted run. An input that cannot be read, decoded or aligned
is *bad*: bad inputs are named and counted; without ``skip_bad`` the run fails at the end with
their list (the partial output is kept, so a rerun with ``skip_bad`` finishes at once).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from robustface.data.ijb import read_ijb_meta
from robustface.data.recordio import RecordIODataset
from robustface.deploy.recognizer import Recognizer, l2_normalize
from robustface.errors import DataFormatError
from robustface.utils.guards import check_choice
from robustface.utils.io import check_output_dir, replace_directory, write_text_atomic
from robustface.utils.table import counted

__all__ = ["EmbedResult", "InputSet", "embed_to_dir", "open_inputs", "read_embeddings"]

FORMAT = "robustface-embeddings/1"
DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
_SHOWN = 10  # bad inputs named in an error message (all are in bad.tsv)


@dataclass
class InputSet:
    """The inputs of an embedding run: one row of ``columns`` per input, and how to read it."""

    kind: str  # "ijb", "rec", "folder" or "list"
    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    read: Callable[[int], tuple[Any, np.ndarray | None]]  # i -> (face, landmarks or None)
    workers: int = 4  # threads that read and decode (1 where the reader is not thread-safe)

    def __len__(self) -> int:
        return len(self.rows)

    def digest(self) -> str:
        """sha256 of the kind and the rows: what identifies the input of a run."""
        text = "\n".join(["\t".join(r) for r in [(self.kind, *self.columns), *self.rows]])
        return hashlib.sha256(text.encode()).hexdigest()


def _ijb_inputs(root: Path, names: list[str]) -> InputSet:
    if len(names) != 1:
        raise DataFormatError(root / "meta", f"holds several IJB sets ({', '.join(names)})")
    meta = read_ijb_meta(root, names[0])
    paths = meta.image_paths()
    rows = [
        (str(img), str(t), str(m))
        for img, t, m in zip(meta.images.tolist(), meta.templates, meta.medias, strict=True)
    ]
    return InputSet(
        "ijb", root, ("image", "template", "media"), rows, lambda i: (paths[i], meta.landmarks[i])
    )


def _rec_inputs(path: Path) -> InputSet:
    ds = RecordIODataset(path)
    labels = ds.labels
    rows = [(str(ds.record_key(i)), str(int(labels[i]))) for i in range(len(ds))]
    return InputSet("rec", ds.rec_path, ("record", "label"), rows, lambda i: (ds[i][0], None), 1)


def _folder_inputs(root: Path) -> InputSet:
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataFormatError(root, "no files below this directory")
    return InputSet(
        "folder", root, ("path",), [(f,) for f in files], lambda i: (root / files[i], None)
    )


def _list_inputs(path: Path) -> InputSet:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text list of image paths") from None
    entries = [line.strip() for line in lines]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise DataFormatError(path, "lists no image paths")
    base = path.parent
    return InputSet(
        "list", path, ("path",), [(e,) for e in entries], lambda i: (base / entries[i], None)
    )


def open_inputs(path: str | Path) -> InputSet:
    """The inputs at ``path``: an IJB-style directory, a ``.rec``, a folder tree or a list file
    (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        metas = sorted((path / "meta").glob("*_face_tid_mid.txt"))
        if metas:
            return _ijb_inputs(path, [m.name[: -len("_face_tid_mid.txt")].upper() for m in metas])
        if any(path.glob("*.rec")):  # a training set's directory, not a tree of its files
            return _rec_inputs(path)
        return _folder_inputs(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file or directory")
    if path.suffix == ".rec":
        return _rec_inputs(path)
    return _list_inputs(path)


@dataclass
class EmbedResult:
    """What :func:`embed_to_dir` did."""

    out: Path
    rows: int
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (input, source, reason)
    seconds: float = 0.0
    resumed_from: int = 0  # inputs already done by an interrupted run


def _key(recognizer: Recognizer, inputs: InputSet, dtype: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": recognizer.info.to_dict(),
        "input": {"kind": inputs.kind, "path": str(inputs.path.resolve()), "count": len(inputs)},
        "input_sha256": inputs.digest(),
        "dtype": dtype,
        "batch_size": recognizer.batch_size,
    }


def _read_crop(recognizer: Recognizer, inputs: InputSet, i: int) -> np.ndarray | str:
    """Input ``i``'s crop, or the reason it cannot be used (a bad input)."""
    try:
        face, landmarks = inputs.read(i)
        return recognizer.crop(face, landmarks, name=inputs.rows[i][0])
    except DataFormatError as exc:  # it names the input's file, as its row does: not twice
        return " ".join((exc.reason if exc.key is None else str(exc)).split())
    except (ValueError, OSError) as exc:
        return " ".join(str(exc).split())


def _start(partial: Path, key: dict[str, Any], n: int, d: int, dtype: str) -> dict[str, Any]:
    """The progress record of ``partial``: a matching interrupted run's, else a fresh one."""
    progress_file = partial / PROGRESS
    if progress_file.is_file():
        try:
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                progress_file, f"not a progress record ({exc}); delete {partial} to start again"
            ) from None
        if not isinstance(progress, dict):
            raise DataFormatError(
                progress_file, f"not a progress record; delete {partial} to start again"
            )
        if progress.get("key") == key:
            return progress
        differ = sorted(k for k in key if progress.get("key", {}).get(k) != key[k])
        raise ValueError(
            f"{partial}: an interrupted run with another {', '.join(differ)}; delete it to start "
            "again"
        )
    partial.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(partial / "embeddings.npy", "w+", dtype, (n, d)).flush()
    np.lib.format.open_memmap(partial / "norms.npy", "w+", np.float32, (n,)).flush()
    progress = {"key": key, "inputs_done": 0, "rows": 0, "bad": [], "seconds": 0.0}
    write_text_atomic(progress_file, json.dumps(progress))
    return progress


def _trim(path: Path, rows: int) -> None:
    """Rewrite the ``.npy`` at ``path`` keeping its first ``rows`` rows (bad inputs left gaps at
    the end of the preallocated array)."""
    full = np.load(path, mmap_mode="r")
    if full.shape[0] == rows:
        return
    tmp = path.with_name(path.name + ".trim")
    out = np.lib.format.open_memmap(tmp, "w+", full.dtype, (rows, *full.shape[1:]))
    for start in range(0, rows, 65536):
        stop = min(start + 65536, rows)
        out[start:stop] = full[start:stop]
    out.flush()
    del out, full
    tmp.replace(path)


def embed_to_dir(
    recognizer: Recognizer,
    inputs: InputSet,
    out: str | Path,
    *,
    dtype: str = "float32",
    skip_bad: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> EmbedResult:
    """Embed every input to ``out`` (see the module docstring for the files).

    ``stop_after`` stops after that many batches, leaving the partial output as an interruption
    would (for tests and for splitting work).
    """
    check_choice("dtype", dtype, DTYPES)
    out = Path(out)
    check_output_dir(out, overwrite=overwrite, marker=MANIFEST, inputs=[inputs.path])
    partial = out.with_name(out.name + ".partial")
    n, d, bs = len(inputs), recognizer.embedding_size, recognizer.batch_size
    key = _key(recognizer, inputs, dtype)
    progress = _start(partial, key, n, d, dtype)
    resumed = progress["inputs_done"]
    if resumed:
        log(f"resuming {partial}: {resumed} of {counted(n, 'input')} done")
    emb = np.load(partial / "embeddings.npy", mmap_mode="r+")
    norms = np.load(partial / "norms.npy", mmap_mode="r+")
    starts = range(resumed, n, bs)
    t0, batches = time.perf_counter(), 0
    bar = tqdm(total=n, initial=resumed, desc="embedding", unit="img", disable=not show_progress)
    with ThreadPoolExecutor(max_workers=inputs.workers) as pool:
        for start in starts:
            if stop_after is not None and batches >= stop_after:
                break
            stop = min(start + bs, n)
            results = list(
                pool.map(lambda i: _read_crop(recognizer, inputs, i), range(start, stop))
            )
            crops = [r for r in results if isinstance(r, np.ndarray)]
            for i, r in zip(range(start, stop), results, strict=True):
                if isinstance(r, str):
                    progress["bad"].append([i, inputs.rows[i][0], r])
            row = progress["rows"]
            if crops:
                raw = recognizer.embed_crops(np.stack(crops))
                emb[row : row + len(crops)] = l2_normalize(raw).astype(dtype)
                norms[row : row + len(crops)] = np.linalg.norm(raw, axis=1)
                emb.flush()
                norms.flush()
            progress["rows"] = row + len(crops)
            progress["inputs_done"] = stop
            progress["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            write_text_atomic(partial / PROGRESS, json.dumps(progress))
            bar.update(stop - start)
            batches += 1
    bar.close()
    del emb, norms
    seconds = progress["seconds"]
    bad = [tuple(b) for b in progress["bad"]]
    result = EmbedResult(out, progress["rows"], bad, seconds, resumed)  # type: ignore[arg-type]
    if progress["inputs_done"] < n:
        log(f"stopped after {progress['inputs_done']} of {counted(n, 'input')}; run again to go on")
        return result
    if bad and not skip_bad:
        listed = "; ".join(f"{src}: {why}" for _, src, why in bad[:_SHOWN])
        more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        them = "it" if len(bad) == 1 else "them"
        raise DataFormatError(
            inputs.path,
            f"{len(bad)} of {counted(n, 'input')} cannot be used: {listed}{more}. Fix or remove "
            f"{them}, or pass --skip-bad (skip_bad=True) to leave {them} out, listed in bad.tsv; "
            f"{counted(progress['rows'], 'row')} embedded so far kept in {partial}",
        )
    _finish(partial, out, inputs, progress, key)
    rate = n / seconds if seconds else float("inf")  # over every session of a resumed run
    log(
        f"embedded {progress['rows']} of {counted(n, 'input')} ({len(bad)} bad) in "
        f"{seconds:.1f} s, {rate:.1f} images/s -> {out}"
    )
    return result


def _finish(
    partial: Path, out: Path, inputs: InputSet, progress: dict[str, Any], key: dict[str, Any]
) -> None:
    rows = progress["rows"]
    for name in ("embeddings.npy", "norms.npy"):
        _trim(partial / name, rows)
    bad = progress["bad"]
    bad_rows = {b[0] for b in bad}
    good = [i for i in range(len(inputs)) if i not in bad_rows]
    lines = ["\t".join(("row", *inputs.columns))]
    lines += ["\t".join((str(r), *inputs.rows[i])) for r, i in enumerate(good)]
    write_text_atomic(partial / "sources.tsv", "\n".join(lines) + "\n")
    if bad:
        bad_lines = ["input\tsource\treason", *("\t".join(map(str, b)) for b in bad)]
        write_text_atomic(partial / "bad.tsv", "\n".join(bad_lines) + "\n")
    seconds = progress["seconds"]
    manifest = {
        **key,
        "rows": rows,
        "bad": len(bad),
        "normalized": True,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(inputs) / seconds, 2) if seconds else None,
    }
    write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (partial / PROGRESS).unlink()
    replace_directory(partial, out)


def read_embeddings(out: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """``(embeddings memory-mapped, norms, sources)`` of an :func:`embed_to_dir` directory; each
    source is a dict of the ``sources.tsv`` columns."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not an embedding directory")
    lines = (out / "sources.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    sources = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    return np.load(out / "embeddings.npy", mmap_mode="r"), np.load(out / "norms.npy"), sources
