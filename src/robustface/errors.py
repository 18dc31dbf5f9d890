"""Exception types shared across robustface.

Every error raised for bad user input names what was wrong (file, record key, parameter) and what
was expected. They subclass ``ValueError`` so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

from pathlib import Path


class RobustfaceError(Exception):
    """Base class of robustface's own exceptions."""


class DataFormatError(RobustfaceError, ValueError):
    """A data file is malformed: wrong magic, truncated record, bad label, undecodable image..."""

    def __init__(self, path: str | Path, message: str, key: int | str | None = None) -> None:
        self.path = str(path)
        self.key = key
        where = f"{self.path}" if key is None else f"{self.path} [record {key}]"
        super().__init__(f"{where}: {message}")


class ConfigError(RobustfaceError, ValueError):
    """A config file or override is invalid; the message lists every problem found."""
