"""Name -> object registries (backbones, heads, classifiers, clusterers), one per kind.

Usage::

    BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

    @BACKBONES.register("r50")
    def r50(**kwargs): ...

    BACKBONES.get("r50")      # the factory
    BACKBONES.names("r*")     # ['r100', 'r18', ...]

Registering a name twice is an error (the second definition would silently win otherwise), and a
typo in ``get`` names the close matches and every valid name.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from robustface.errors import RobustfaceError

T = TypeVar("T")


class UnknownNameError(RobustfaceError, KeyError):
    """``Registry.get`` was given a name that is not registered (a user error: a typo in a
    config or a flag).

    A ``KeyError`` whose ``str()`` is the plain message (``KeyError`` would show it quoted).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A registry of named objects of one kind (e.g. ``"backbone"``), filled by a decorator."""

    def __init__(self, kind: str) -> None:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: the object's ``__name__``).

        Raises ``ValueError`` when the name is already taken and ``TypeError`` when no name is
        given and the object has no ``__name__``.
        """

        def decorator(obj: T) -> T:
            key = name if name is not None else getattr(obj, "__name__", None)
            if not isinstance(key, str) or not key:
                raise TypeError(
                    f"{self.kind} registry: name must be a non-empty string, got {key!r}"
                )
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``UnknownNameError`` (a ``KeyError``) otherwise."""
        try:
            return self._items[name]
        except KeyError:
            valid = sorted(self._items)
            close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; valid names: {', '.join(valid) or 'none'}"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``args`` and ``kwargs``.

        Arguments the factory does not take raise ``TypeError`` naming the factory and listing its
        parameters (before anything is built); unknown names raise as :meth:`get`.
        """
        factory = self.get(name)
        signature = inspect.signature(factory)  # type: ignore[arg-type]
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"{self.kind} {name!r}: {err}; its parameters are {', '.join(signature.parameters)}"
            ) from None
        return factory(*args, **kwargs)  # type: ignore[operator]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the shell-style ``pattern`` (``fnmatch``), sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
