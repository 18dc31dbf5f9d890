"""Exception types shared across robustface.

Every error raised for bad user input names what was wrong (file, record key, parameter) and what
was expected. They subclass ``ValueError`` so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

from pathlib import Path


def _restore(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    """Rebuild a pickled exception without calling its ``__init__`` (see ``__reduce__``)."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class RobustfaceError(Exception):
    """Base class of robustface's own exceptions."""

    def __reduce__(self) -> tuple:
        # Pickle as message + attributes: subclasses whose __init__ takes other arguments than the
        # message (DataFormatError) must survive the trip from a worker process.
        return (_restore, (type(self), self.args, self.__dict__))


class DataFormatError(RobustfaceError, ValueError):
    """A data file is malformed: wrong magic, truncated record, bad label, undecodable image..."""

    def __init__(self, path: str | Path, message: str, key: int | str | None = None) -> None:
        self.path = str(path)
        self.key = key
        self.reason = message  # the message without the file and record it names
        where = f"{self.path}" if key is None else f"{self.path} [record {key}]"
        super().__init__(f"{where}: {message}")


class ConfigError(RobustfaceError, ValueError):
    """A config file or override is invalid; the message lists every problem found."""


class ParameterTypeError(RobustfaceError, TypeError):
    """A user-given parameter has the wrong type (``"abc"`` for a number): a user error, shown on
    one line by the CLI, and still a ``TypeError`` for callers that catch one."""
