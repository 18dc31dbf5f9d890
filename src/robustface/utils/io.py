"""Atomic writing of files and directories: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory (so the rename is atomic on POSIX) and is removed
    if the block raises. A directory at ``path`` (``--out DIR`` where a file is meant) is a
    ``FileExistsError`` naming it, before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a directory; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_dir(
    out: str | Path, *, overwrite: bool, marker: str, inputs: Iterable[str | Path] = ()
) -> None:
    """Refuse to write ``out`` over one of ``inputs``, or over an existing directory that is not
    ours: one is replaced only with ``overwrite`` and when it holds ``marker`` (a file only this
    kind of output writes) or is empty."""
    out = Path(out)
    for path in inputs:
        if out.resolve() == Path(path).resolve():
            raise ValueError(f"output {out} is the input directory {path}; choose another")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite)")
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not an output directory: not replacing it")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise FileExistsError(f"{out} exists and holds no {marker}: not replacing it")


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a fresh ``OUT.partial`` directory; it replaces ``out`` only if the block succeeds.

    A stale ``OUT.partial`` from an interrupted run is removed first; on an error the partial
    directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_directory(partial, out)


def replace_directory(new: str | Path, out: str | Path) -> None:
    """Move the finished directory ``new`` to ``out``, replacing an existing ``out`` by renames
    (``out`` is never missing for longer than two renames; the old one is then removed)."""
    new, out = Path(new), Path(out)
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists():
        shutil.rmtree(old)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` to ``dst``, or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
