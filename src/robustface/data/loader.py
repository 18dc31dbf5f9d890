"""DataLoader worker errors: a bad record reads the same with loader workers as without.

torch re-raises an exception from a worker process as a new exception (a ``RuntimeError`` when the
type cannot be rebuilt from one string, as ``DataFormatError`` cannot) whose message is the
worker's whole traceback, so the CLI's one-line report of a bad record became 40 lines. With
:class:`CarryUserErrors` around the dataset and :func:`collate` as the loader's ``collate_fn``, a
user error (``USER_ERRORS``) in a worker travels to the main process as the batch itself, and
:func:`unwrap` raises the original exception there. Other exceptions, our bugs, keep torch's report
with the worker's traceback::

    loader = DataLoader(CarryUserErrors(dataset), collate_fn=collate, num_workers=4, ...)
    for batch in loader:
        images, labels = unwrap(batch)

:func:`user_error_batches` does both for a loop that only reads batches.

Whole batches from the workers: a DataLoader's own per-sample path (a tensor per sample, then
``default_collate`` copying them into a new shared-memory segment per batch, which the main process
maps anew) cost more than decoding itself. A dataset whose ``__getitems__`` writes a batch of uint8
images in place through a :class:`BatchWriter` instead returns the finished batch
``(images, labels, ...)``; :func:`collate` passes it through. In a loader worker the writer's
buffers are a ring of ``slots`` batches in one shared-memory file, reused batch after batch (no new
segment, no page faults after the first round): a batch crosses to the main process as a few
numbers, and the main process copies it out of its slot as it receives it, so the tensors it hands
on are its own. A slot is written again only ``slots`` batches of that worker later; a DataLoader
keeps at most ``prefetch_factor`` batches of a worker that the main process has not received, so
``slots`` must exceed it (the default 4 suits the default 2). Each slot carries a sequence number
that the main process checks after copying: a slot overwritten too early raises instead of handing
on mixed images. The main process unlinks a worker's file as soon as it has mapped it; the file of a
worker killed before that (daemonic workers are terminated when the main process exits) is removed
when the main process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import multiprocessing.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from robustface.errors import RobustfaceError
from robustface.utils.guards import check_int

__all__ = [
    "USER_ERRORS",
    "BatchWriter",
    "CarryUserErrors",
    "collate",
    "unwrap",
    "user_error_batches",
]

USER_ERRORS = (RobustfaceError, FileNotFoundError)
"""Exceptions caused by the user's data: a malformed record, a missing image file."""


class _Carried:
    """A user error met in a loader worker, standing in for the batch it spoiled."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class CarryUserErrors(Dataset):
    """``dataset`` whose batched fetch, in a loader worker, returns a user error as the batch.

    In the main process (``num_workers=0``) the error is raised where it happens, as usual.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any] | _Carried:
        """The samples at ``indices`` (the dataset's own ``__getitems__`` if it has one)."""
        try:
            fetch = getattr(self.dataset, "__getitems__", None)
            return fetch(indices) if fetch else [self.dataset[i] for i in indices]
        except USER_ERRORS as exc:
            if get_worker_info() is None:
                raise
            return _Carried(exc)


def collate(batch: Any) -> Any:
    """``default_collate``, passing a carried user error and a :class:`BatchWriter`'s finished
    batch through untouched (the latter as ``(images, labels, ...)`` outside a worker)."""
    if isinstance(batch, _Carried | _InSlot):
        return batch
    if isinstance(batch, _Finished):
        return batch.tensors
    return default_collate(batch)


def unwrap(batch: Any) -> Any:
    """``batch``, or raise the user error a worker carried in its place."""
    if isinstance(batch, _Carried):
        raise batch.error
    return batch


def user_error_batches(dataset: Dataset, **loader_kwargs: Any) -> tuple[int, Iterator[Any]]:
    """``(number of batches, batches)`` of a ``DataLoader(dataset, **loader_kwargs)`` whose workers
    report user errors as the main process does (``collate_fn`` is :func:`collate`)."""
    loader = DataLoader(CarryUserErrors(dataset), collate_fn=collate, **loader_kwargs)
    return len(loader), (unwrap(batch) for batch in loader)


_HEADER = mmap.PAGESIZE  # the slots' sequence numbers (int64), then the slots, page-aligned
_RECEIVED: dict[str, tuple[int, mmap.mmap]] = {}
"""Main process: the slot files received from loader workers, by path: (writer pid, mapping)."""


class _Finished:
    """A batch a :class:`BatchWriter` finished outside a worker."""

    def __init__(self, images: torch.Tensor, *arrays: torch.Tensor) -> None:
        self.tensors = (images, *arrays)


class _InSlot:
    """A batch a :class:`BatchWriter` finished in a worker: it pickles as where it lies, and
    unpickles (in the main process) as ``(images, labels, *extra)`` copied out of the slot."""

    def __init__(self, *where: Any) -> None:
        self.where = where

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _copy_out, self.where


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slot_file(path: str, pid: int) -> mmap.mmap:
    """The main process's mapping of worker ``pid``'s slot file (mapped and unlinked once)."""
    entry = _RECEIVED.get(path)
    if entry is not None:
        return entry[1]
    for other, (owner, mapping) in list(_RECEIVED.items()):
        # a worker gone, or this worker's earlier ring (it has moved on to a new batch size, and
        # its batches arrive in order): nothing will be read from that mapping again
        if owner == pid or not _pid_alive(owner):
            mapping.close()
            del _RECEIVED[other]
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    os.unlink(path)  # both mappings keep the memory; nothing is left behind in the directory
    _RECEIVED[path] = (pid, mapping)
    return mapping


def _copy_out(
    path: str, pid: int, slot: int, seq: int, shape: tuple[int, ...], *arrays: np.ndarray
) -> tuple[torch.Tensor, ...]:
    mapping = _slot_file(path, pid)
    size = int(np.prod(shape))
    offset = _HEADER + slot * _slot_bytes(size)
    images = torch.empty(shape, dtype=torch.uint8)
    images.numpy().reshape(-1)[:] = np.frombuffer(mapping, np.uint8, size, offset)
    if np.frombuffer(mapping, np.int64, 1, slot * 8)[0] != seq:
        raise RuntimeError(
            f"loader worker {pid} wrote batch slot {slot} again before the main process had "
            "copied it out: BatchWriter(slots=...) must exceed the DataLoader's prefetch_factor"
        )
    return images, *map(torch.from_numpy, arrays)


def _slot_bytes(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # the main process unlinks it once mapped
        os.unlink(path)


def _slot_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _prefix(main_pid: int) -> str:
    return f"robustface-batches-{main_pid}-"


def _remove_slot_files(main_pid: int) -> None:
    """Unlink the slot files that workers of process ``main_pid`` left behind: those of a worker
    stopped by a signal (a daemonic worker is terminated when its main process exits) before the
    main process received a batch from it."""
    directory = Path(_slot_dir() or tempfile.gettempdir())
    for path in directory.glob(_prefix(main_pid) + "*"):
        _unlink_quietly(str(path))


_CLEANUP_PIDS: set[int] = set()


def _clean_at_exit() -> None:
    """Once per process: remove its workers' leftover slot files when it exits."""
    pid = os.getpid()
    if pid not in _CLEANUP_PIDS:
        _CLEANUP_PIDS.add(pid)
        atexit.register(lambda: os.getpid() == pid and _remove_slot_files(pid))


class BatchWriter:
    """The buffers into which a dataset's ``__getitems__`` writes a batch of uint8 images in place.

    ``images = writer.start(count, shape)`` gives the ``count x *shape`` uint8 array to fill (the
    trainer's is ``count x H x W x 3``); ``return writer.finish(labels, *extra)`` returns the batch
    for :func:`collate`, which the DataLoader yields as ``(images, labels, *extra)`` tensors
    (labels int64; ``extra``: more small per-image arrays, such as the trainer's flips, as they
    are). See the module docstring for the
    shared-memory ring a worker uses; ``slots`` must exceed the loader's ``prefetch_factor``.
    Outside a worker every batch is a new tensor.
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = check_int("slots", slots, 1, _HEADER // 8)  # their numbers fill a page
        # the process that made the writer names the slot files: under forkserver or spawn a
        # worker's parent is not the main process
        self._main_pid = os.getpid() if get_worker_info() is None else os.getppid()
        if get_worker_info() is None:
            _clean_at_exit()
        self._state: tuple[Any, ...] | None = None  # this process's ring
        self._current: tuple[Any, ...] | None = None  # the batch being written

    def __getstate__(self) -> dict[str, Any]:
        return {"slots": self.slots, "_main_pid": self._main_pid, "_state": None, "_current": None}

    def start(self, count: int, shape: tuple[int, ...]) -> np.ndarray:
        """The ``count x *shape`` uint8 array that the next :meth:`finish` hands on."""
        shape = (int(count), *map(int, shape))
        if get_worker_info() is None:
            images = torch.empty(shape, dtype=torch.uint8)
            self._current = (images,)
            return images.numpy()
        size = int(np.prod(shape))
        state = self._state
        if state is None or state[0] != os.getpid() or state[1] != size:
            state = self._state = self._open(size)
        pid, _, path, mapping, seqs, next_batch = state
        slot = next_batch % self.slots
        self._state = (*state[:5], next_batch + 1)
        seqs[slot] = next_batch + 1  # before the pixels: the main process checks it after copying
        self._current = (path, pid, slot, next_batch + 1, shape)
        offset = _HEADER + slot * _slot_bytes(size)
        return np.frombuffer(mapping, np.uint8, size, offset).reshape(shape)

    def finish(self, labels: np.ndarray, *extra: np.ndarray) -> Any:
        """The batch begun by :meth:`start`, with ``labels`` (one int per image) and ``extra``
        arrays (one entry per image each, sent as they are)."""
        current, self._current = self._current, None
        if current is None:
            raise RuntimeError("BatchWriter.finish() without start()")
        count = current[-1][0] if len(current) > 1 else len(current[0])
        arrays = [np.ascontiguousarray(labels, dtype=np.int64), *map(np.ascontiguousarray, extra)]
        if any(len(a) != count for a in arrays):
            raise ValueError(f"a batch of {count} images needs {count} entries in each array")
        if len(current) == 1:
            return _Finished(current[0], *map(torch.from_numpy, arrays))
        return _InSlot(*current, *arrays)

    def _open(self, size: int) -> tuple[Any, ...]:
        """A new ring of ``slots`` batches of ``size`` bytes in a shared-memory file."""
        fd, path = tempfile.mkstemp(prefix=_prefix(self._main_pid), dir=_slot_dir())
        try:
            os.ftruncate(fd, _HEADER + self.slots * _slot_bytes(size))
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        # at the worker's exit, in case the main process never received a batch (and unlinked it)
        multiprocessing.util.Finalize(None, _unlink_quietly, args=(path,), exitpriority=0)
        seqs = np.frombuffer(mapping, np.int64, self.slots, 0)
        return os.getpid(), size, path, mapping, seqs, 0
