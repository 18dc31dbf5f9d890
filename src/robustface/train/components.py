"""A run's components (backbone, data source, classifier, head) checked and built from its config.

Every component is named in the config and found in its registry: ``model.backbone`` in
``BACKBONES``, ``data.source`` in ``DATA_SOURCES``, ``fc`` (``{name, params}``) in
``CLASSIFIERS``, ``head`` (``{name, params}``) in ``HEADS``. :func:`component_problems` checks
names and parameters against the registered factories (``load_config`` calls it through
``Config.check``, so every problem is reported at once); the trainer builds the components with
:func:`classifier_kwargs` and :func:`head_params`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.distributed as dist

from robustface.config import Config
from robustface.data.sources import DATA_SOURCES
from robustface.errors import ConfigError
from robustface.fc import CLASSIFIERS, TRAINER_SUPPLIED
from robustface.heads import HEADS, build_head, head_needs
from robustface.models import BACKBONES

__all__ = ["classifier_kwargs", "classifier_settings", "component_problems", "head_params"]

_ALIAS_NOTE = (
    "fc.{0} is deprecated and will be removed in the next release: write fc.params.{0} "
    "(fc: {{name: ..., params: {{{0}: ...}}}})"
)


def classifier_kwargs(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for ``cfg.fc``'s classifier (``fc.params`` plus the deprecated
    ``fc.sample_rate`` / ``fc.k`` it takes) and the problems with them, as ``fc.KEY: ...``.

    The classifier must be registered (``KeyError`` otherwise)."""
    factory = CLASSIFIERS.get(cfg.fc.name)
    accepted = [p for p in inspect.signature(factory).parameters if p not in TRAINER_SUPPLIED]
    kwargs, problems = cfg.fc.kwargs(accepted)
    problems = [f"fc.{p}" for p in problems]
    for key in cfg.fc.params:
        if key in TRAINER_SUPPLIED:
            problems.append(f"fc.params.{key}: set by the trainer; remove it")
    return kwargs, problems


def classifier_settings(cfg: Config) -> dict[str, Any]:
    """Every parameter ``cfg.fc``'s classifier takes from the config, defaults filled in (e.g.
    ``{"k": 3}`` for ``subcenter``); ``ConfigError`` if the aliases conflict."""
    kwargs, problems = classifier_kwargs(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    signature = inspect.signature(CLASSIFIERS.get(cfg.fc.name))
    settings = {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in TRAINER_SUPPLIED and p.default is not inspect.Parameter.empty
    }
    return {**settings, **kwargs}


def head_params(
    cfg: Config, num_classes: int, class_range: tuple[int, int] | None = None
) -> dict[str, Any]:
    """``head.params`` plus the class layout for a head that declares it (``needs.classes``):
    the global ``num_classes``, ``embedding_size`` and this rank's ``class_range``.

    ``ValueError`` (naming the key) when ``head.params`` sets one of those, or when such a head
    is paired with a classifier that has several weight rows per class (an unknown classifier
    is left to :func:`component_problems`)."""
    params: dict[str, Any] = dict(cfg.head.params)
    if not head_needs(cfg.head.name).classes:
        return params
    supplied = {
        "num_classes": num_classes,
        "embedding_size": cfg.model.embedding_size,
        "class_range": class_range,
    }
    for name, value in supplied.items():
        if name in params:
            raise ValueError(
                f"head.params.{name}: set by the trainer from the data and model; remove it"
            )
        params[name] = value
    if cfg.fc.name in CLASSIFIERS and not CLASSIFIERS.get(cfg.fc.name).one_row_per_class:
        usable = [n for n in CLASSIFIERS.names() if CLASSIFIERS.get(n).one_row_per_class]
        raise ValueError(
            f"head {cfg.head.name!r} keeps one statistic per class weight row: use "
            f"fc.name {' or '.join(usable)}, not {cfg.fc.name}"
        )
    return params


def component_problems(cfg: Config) -> list[str]:
    """Every problem with the components of ``cfg``: unknown names (with close matches),
    parameters a factory does not take, and values its constructor rejects (checked by building
    the backbone on the meta device, and the classifier and head once at a tiny size, leaving the
    RNG untouched)."""
    problems: list[str] = []
    for key, registry, name in (
        ("model.backbone", BACKBONES, cfg.model.backbone),
        ("data.source", DATA_SOURCES, cfg.data.source),
        ("fc.name", CLASSIFIERS, cfg.fc.name),
        ("head.name", HEADS, cfg.head.name),
    ):
        if name not in registry:
            try:
                registry.get(name)
            except KeyError as err:
                problems.append(f"{key}: {err}")
    if cfg.model.backbone in BACKBONES:
        try:  # on the meta device: checks the arguments, allocates nothing
            with torch.device("meta"):
                BACKBONES.build(cfg.model.backbone, **cfg.model.kwargs())
        except (TypeError, ValueError) as err:
            problems.append(f"model: {err}")
    fc_known = cfg.fc.name in CLASSIFIERS
    if fc_known:
        kwargs, fc_problems = classifier_kwargs(cfg)
        problems += fc_problems
        for alias in ("sample_rate", "k"):
            if getattr(cfg.fc, alias) is not None and alias in kwargs and not fc_problems:
                warnings.warn(_ALIAS_NOTE.format(alias), FutureWarning, stacklevel=2)
        kwargs = {k: v for k, v in kwargs.items() if k not in TRAINER_SUPPLIED}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        try:
            with torch.random.fork_rng(devices=[]):
                CLASSIFIERS.build(cfg.fc.name, 1, world, **kwargs)
        except (TypeError, ValueError) as err:
            problems.append(f"fc.params: {err}")
    if cfg.head.name in HEADS:
        try:
            params = head_params(cfg, 1)
        except ValueError as err:
            problems.append(str(err))
        else:
            try:
                with torch.random.fork_rng(devices=[]):
                    build_head(cfg.head.name, **params)
            except (TypeError, ValueError) as err:
                problems.append(f"head.params: {err}")
    return problems
