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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from robustface.errors import RobustfaceError

__all__ = ["USER_ERRORS", "CarryUserErrors", "collate", "unwrap", "user_error_batches"]

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
    """``default_collate``, passing a carried user error through untouched."""
    return batch if isinstance(batch, _Carried) else default_collate(batch)


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
