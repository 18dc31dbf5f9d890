"""The clusterer registry and the estimator base class every clustering method derives from.

A clustering method is a scikit-learn-style estimator (:class:`Clusterer`): ``__init__`` stores
its parameters and nothing else, ``fit(features, knn)`` sets ``labels_`` and returns the
estimator, ``fit_predict`` returns the labels. ``features`` is an ``(N, d)`` float32 array of
L2-normalised rows (``None`` for the methods that work on the graph alone), ``knn`` a
:class:`~robustface.cluster.knn.KnnGraph` over the same rows (``None`` for methods that do not
use one, e.g. k-means), and ``labels_`` an ``(N,)`` int64 array of cluster ids ``0..C-1`` (``-1``
only where a method leaves a sample unassigned, e.g. DBSCAN noise; metrics count each such
sample as its own singleton).

Methods with a threshold (:attr:`Clusterer.tuned_param`, tuned over :attr:`Clusterer.grid` by
:func:`~robustface.cluster.benchmark.tune_method`) split their work in two: ``_prepare`` does
what does not depend on the threshold (GCN-V's confidence, ARO's rank-order distances) and is
cached on the fitted estimator, ``_finish`` gives the labels from it; :meth:`Clusterer.relink`
re-links at another threshold without the first part. Every method is registered in
:data:`CLUSTERERS` under its name, and :func:`as_function` gives its function form
``fn(features, knn, **params) -> labels`` (``kmeans``, ``gcn_v_cluster``, ...).

Adding a method: one new module with a :class:`Clusterer` subclass decorated with
``@CLUSTERERS.register("name")``, plus its import line in ``robustface/cluster/__init__.py``.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from robustface.utils.registry import Registry

__all__ = [
    "CLUSTERERS",
    "SIM_GRID",
    "Clusterer",
    "as_function",
    "check_params",
    "cluster",
    "clusterer",
    "param_names",
    "tunable",
]

# Default grid of the cosine-similarity thresholds (cc, Chinese whispers, Infomap, GCN-V/E tau).
SIM_GRID: tuple[float, ...] = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))


class Clusterer(ABC):
    """Base of the clustering estimators (module docstring).

    Class attributes a method may set: ``tuned_param`` (the name of its threshold) with its
    default ``grid``; ``true_count`` (the parameter that a labelled benchmark sets to the true
    number of identities, as the published baselines); ``models`` (``{parameter: model kind}``
    for the trained models a learned method takes; learned methods also get ``device`` and
    ``knn_method``); ``max_samples`` and ``max_samples_reason`` (the benchmark skips the method
    on larger sets).
    """

    tuned_param: ClassVar[str | None] = None
    grid: ClassVar[tuple[float, ...]] = ()
    true_count: ClassVar[str | None] = None
    models: ClassVar[Mapping[str, str]] = {}
    max_samples: ClassVar[int | None] = None
    max_samples_reason: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = param_names(cls)
        if cls.tuned_param is not None:
            if cls.tuned_param not in names:
                raise TypeError(f"{cls.__name__}: {cls.tuned_param!r} is not a parameter")
            if not cls.grid:
                raise ValueError(f"{cls.__name__}: the grid of {cls.tuned_param!r} is empty")
        for name in (cls.true_count, *cls.models):
            if name is not None and name not in names:
                raise TypeError(f"{cls.__name__}: {name!r} is not a parameter")

    # -- parameters (scikit-learn's get_params / set_params) --------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters and their current values."""
        return {name: getattr(self, name) for name in param_names(type(self))}

    def set_params(self, **params: Any) -> Clusterer:
        """Change parameters (all checked before any is set); returns the estimator."""
        problems = check_params(type(self), params, require=False)
        if problems:
            raise ValueError(f"{type(self).__name__}: {'; '.join(problems)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitting -----------------------------------------------------------------------------

    def prepare(self, features: np.ndarray | None, knn: Any) -> Clusterer:
        """Do (and cache in ``state_``) the threshold-independent work; :meth:`relink` then
        gives the labels at any threshold. Returns the estimator."""
        self.state_ = self._prepare(features, knn)
        return self

    def fit(self, features: np.ndarray | None, knn: Any) -> Clusterer:
        """Cluster ``features`` / ``knn``: sets ``labels_`` (and the cached ``state_``)."""
        self.prepare(features, knn)
        self.labels_ = np.asarray(self._finish(self.state_))
        return self

    def fit_predict(self, features: np.ndarray | None, knn: Any) -> np.ndarray:
        """:meth:`fit` and return ``labels_``."""
        return self.fit(features, knn).labels_

    def relink(self, value: float) -> np.ndarray:
        """Labels at ``tuned_param = value`` from the cached work of :meth:`prepare` / :meth:`fit`
        (the estimator keeps ``value`` and the new ``labels_``)."""
        if self.tuned_param is None:
            raise TypeError(f"{type(self).__name__} has no threshold to re-link at")
        if not hasattr(self, "state_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit or prepare first")
        setattr(self, self.tuned_param, value)
        self.labels_ = np.asarray(self._finish(self.state_))
        return self.labels_

    def _prepare(self, features: np.ndarray | None, knn: Any) -> Any:
        """The threshold-independent work; by default none (the inputs are the state)."""
        return features, knn

    @abstractmethod
    def _finish(self, state: Any) -> np.ndarray:
        """The labels from the state of :meth:`_prepare` at the current parameters."""


CLUSTERERS: Registry[type[Clusterer]] = Registry("clusterer")


def param_names(cls: type[Clusterer]) -> list[str]:
    """The keyword parameters of ``cls.__init__``, in order."""
    params = inspect.signature(cls.__init__).parameters
    return [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _required(cls: type[Clusterer]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]


def clusterer(method: str | type[Clusterer]) -> type[Clusterer]:
    """The estimator class registered as ``method`` (a class is returned as is)."""
    return method if isinstance(method, type) else CLUSTERERS.get(method)


def cluster(method: str, features: np.ndarray | None, knn: Any, **params: Any) -> np.ndarray:
    """Labels of the method registered as ``method``:
    ``CLUSTERERS.get(method)(**params).fit_predict(features, knn)``."""
    return CLUSTERERS.get(method)(**params).fit_predict(features, knn)


def tunable() -> list[str]:
    """Names of the registered methods with a threshold to tune, sorted."""
    return [name for name in CLUSTERERS if CLUSTERERS.get(name).tuned_param is not None]


def check_params(
    method: str | type[Clusterer], params: Mapping[str, Any], *, require: bool = True
) -> list[str]:
    """Every problem of ``params`` against ``method``'s signature, one line each: names it does
    not take (with close matches) and, with ``require``, required parameters left out."""
    cls = clusterer(method)
    names = param_names(cls)
    problems = []
    for key in params:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"unknown parameter {key!r}{hint}; its parameters are {', '.join(names)}"
            )
    if require:
        problems += [
            f"parameter {name!r} is required" for name in _required(cls) if name not in params
        ]
    return problems


def as_function(cls: type[Clusterer], name: str) -> Callable[..., np.ndarray]:
    """The function form of an estimator: ``name(features, knn, **params) -> labels`` (the
    estimator's ``fit_predict``), with its signature and docstring."""

    def function(features: np.ndarray | None, knn: Any = None, **params: Any) -> np.ndarray:
        return cls(**params).fit_predict(features, knn)

    init = inspect.signature(cls.__init__)
    positional = [
        inspect.Parameter("features", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("knn", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    ]
    keywords = [p for p in init.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    function.__signature__ = init.replace(  # type: ignore[attr-defined]
        parameters=positional + keywords, return_annotation="np.ndarray"
    )
    function.__name__ = function.__qualname__ = name
    function.__module__ = cls.__module__
    function.__doc__ = f"``{cls.__name__}(**params).fit_predict(features, knn)``.\n\n{cls.__doc__}"
    return function
