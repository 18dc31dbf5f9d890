"""Typed configs: dataclasses loaded from YAML, with dotted ``a.b=c`` overrides.

Every problem in a config (unknown key, wrong type, value out of range) is collected and reported
at once in a :class:`~robustface.errors.ConfigError` that names the key and where it came from (the
YAML file or the ``--set`` override). The resolved config is saved in each run directory with
:func:`save_config`.

A config section is a dataclass; a section may define ``check(self) -> list[str]`` returning
problems with its values (messages start with the field name).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from robustface.errors import ConfigError
from robustface.utils.io import write_text_atomic

T = TypeVar("T")


@dataclasses.dataclass
class SynthConfig:
    """SynthFace benchmark generation (see docs/synthface.md)."""

    seed: int = 0
    identities: int = 1000
    images_per_identity: int = 20
    open_set_identities: int = 200
    open_set_images_per_identity: int = 10
    test_identities: int = 600
    sibling_rate: float = 0.1
    image_size: int = 112
    difficulty: float = 1.0
    sketch_fraction: float = 0.0
    nonface_fraction: float = 0.0
    lowq_fraction: float = 0.0
    duplicate_fraction: float = 0.0
    lfw_pairs: int = 6000
    cfp_fp_pairs: int = 7000
    lowq_pairs: int = 6000
    ijb_identities: int = 200
    ijb_templates_per_identity: int = 4
    ijb_max_media_per_template: int = 3
    ijb_max_images_per_media: int = 3
    ijb_impostor_ratio: int = 10
    image_folder: bool = False

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        for name in (
            "identities",
            "images_per_identity",
            "test_identities",
            "ijb_templates_per_identity",
            "ijb_max_media_per_template",
            "ijb_max_images_per_media",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in (
            "open_set_identities",
            "open_set_images_per_identity",
            "lfw_pairs",
            "cfp_fp_pairs",
            "lowq_pairs",
            "ijb_identities",
            "ijb_impostor_ratio",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lfw_pairs", "cfp_fp_pairs", "lowq_pairs"):
            if getattr(self, name) % 20:
                problems.append(
                    f"{name}: must be a multiple of 20 (10 folds, half positive), "
                    f"got {getattr(self, name)}"
                )
        if self.identities >= 1 and self.ijb_identities == 1:
            problems.append("ijb_identities: needs 0 or >= 2 identities for impostor pairs, got 1")
        if self.test_identities < 20:
            problems.append(
                f"test_identities: need >= 20 (2 per verification fold), got {self.test_identities}"
            )
        for name in ("sibling_rate", "sketch_fraction", "nonface_fraction", "lowq_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.sketch_fraction + self.nonface_fraction + self.lowq_fraction > 1.0:
            problems.append("sketch_fraction + nonface_fraction + lowq_fraction: must be <= 1")
        if not 0.0 <= self.duplicate_fraction <= 0.5:
            problems.append(
                f"duplicate_fraction: must be in [0, 0.5] (each duplicate needs its own original), "
                f"got {self.duplicate_fraction}"
            )
        if not 32 <= self.image_size <= 512:
            problems.append(f"image_size: must be in [32, 512], got {self.image_size}")
        if not 0.0 <= self.difficulty <= 3.0:
            problems.append(f"difficulty: must be in [0, 3], got {self.difficulty}")
        return problems


@dataclasses.dataclass
class DataConfig:
    """Training data and verification targets."""

    source: str = "synthface"  # a registered data source: robustface.data.sources.DATA_SOURCES
    path: str | None = None
    batch_size: int = 128
    num_workers: int = 2
    flip: bool = True
    resize_down_up: float = 0.0
    blur: float = 0.0
    color_jitter: float = 0.0
    grayscale: float = 0.0
    val_targets: list[str] = dataclasses.field(default_factory=lambda: ["lfw", "cfp_fp"])
    val_dir: str | None = None
    # RobustFace's on-the-fly protocol: per batch, the first floor(B * batch_noise_open) samples
    # become outside images (from open_source) and the next floor(B * batch_noise_closed) get a
    # random other label. Static noise is made with `robustface noise` instead.
    batch_noise_closed: float = 0.0
    batch_noise_open: float = 0.0
    open_source: str | None = None

    def verification_dir(self, run_dir: str | Path) -> Path | None:
        """Where named ``val_targets`` (``lfw`` -> ``lfw.bin``) are found for a run in
        ``run_dir``: ``val_dir``, else what the data source says
        (:meth:`robustface.data.sources.DataSource.verification_dir`: the SynthFace directory, the
        ``.rec``'s directory; ``None`` for a folder).
        """
        if self.val_dir:
            return Path(self.val_dir)
        from robustface.data.sources import DATA_SOURCES

        return DATA_SOURCES.get(self.source)(self, None, Path(run_dir)).verification_dir()

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if self.source != "synthface" and not self.path:
            problems.append(f"path: required when source is '{self.source}'")
        named = [t for t in self.val_targets if not t.endswith(".bin")]
        if self.source == "folder" and named and not self.val_dir:
            problems.append(
                f"val_dir: needed to find val_targets {named} next to a folder dataset "
                "(or give .bin paths, or val_targets: [])"
            )
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        for name in ("resize_down_up", "blur", "color_jitter", "grayscale"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: probability must be in [0, 1], got {getattr(self, name)}")
        for name in ("batch_noise_closed", "batch_noise_open"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: rate must be in [0, 1], got {getattr(self, name)}")
        if self.batch_noise_closed + self.batch_noise_open > 1.0:
            problems.append("batch_noise_closed + batch_noise_open: must be <= 1")
        if self.batch_noise_open > 0 and not self.open_source and self.source != "synthface":
            problems.append(
                "open_source: needed for batch_noise_open > 0 (a .rec of outside identities)"
            )
        return problems


@dataclasses.dataclass
class ModelConfig:
    """Backbone (see ``robustface.models.list_backbones()``)."""

    backbone: str = "r50"
    embedding_size: int = 512
    input_size: int | None = None  # None: the backbone's own (112, or a preset's)
    width: float | None = None  # None: the backbone's own (1.0, or a preset's)
    dropout: float | None = None  # None: the backbone's own (0 for IResNet, 0.4 for IR)

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``build_backbone`` (unset options keep the backbone's default)."""
        out: dict[str, object] = {"embedding_size": self.embedding_size}
        for name in ("input_size", "width", "dropout"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if self.embedding_size < 1:
            problems.append(f"embedding_size: must be >= 1, got {self.embedding_size}")
        if self.input_size is not None and not 16 <= self.input_size <= 512:
            problems.append(f"input_size: must be in [16, 512], got {self.input_size}")
        if self.width is not None and not 0.0 < self.width <= 4.0:
            problems.append(f"width: must be in (0, 4], got {self.width}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return problems


@dataclasses.dataclass
class ClassifierConfig:
    """Classifier (see ``robustface.fc.list_classifiers()``); ``params`` go to its constructor
    (``partial_fc``: ``sample_rate``; ``subcenter``: ``k``).

    ``sample_rate`` and ``k`` are deprecated aliases of ``params.sample_rate`` / ``params.k``
    (kept readable for one release); given for a classifier that does not take them they are an
    error, except their old defaults (1.0 and 3), which older versions wrote into every run's
    ``config.yaml`` and which are dropped.
    """

    name: str = "partial_fc"
    params: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)
    sample_rate: float | None = None  # deprecated: fc.params.sample_rate
    k: int | None = None  # deprecated: fc.params.k

    def kwargs(self, accepted: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
        """The classifier's keyword arguments (``params`` plus the deprecated aliases), given the
        parameter names it ``accepted``, and the problems with the aliases."""
        out: dict[str, Any] = dict(self.params)
        problems = []
        for alias, old_default in (("sample_rate", 1.0), ("k", 3)):
            value = getattr(self, alias)
            if value is None:
                continue
            if alias not in accepted:
                if value != old_default:
                    problems.append(
                        f"{alias}: classifier {self.name!r} has no parameter {alias!r}; remove it"
                    )
            elif alias in self.params:
                problems.append(f"{alias}: given twice, here and as params.{alias}; keep params")
            else:
                out[alias] = value
        return out, problems


@dataclasses.dataclass
class HeadConfig:
    """Margin head (see ``robustface.heads.list_heads()``); ``params`` go to its constructor."""

    name: str = "arcface"
    params: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warmup, then polynomial decay per step)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    warmup_epochs: float = 0.0
    power: float = 1.0

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if self.lr <= 0:
            problems.append(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.power < 0:
            problems.append(f"power: must be >= 0, got {self.power}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum: must be in [0, 1), got {self.momentum}")
        return problems


@dataclasses.dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 20
    max_steps: int | None = None
    grad_accum: int = 1
    grad_clip: float = 5.0
    amp: bool = False
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    tensorboard: bool = True
    progress: bool = True
    probe_every: int = 0  # steps between angle probes (0 = off; also probes at the end when on)
    probe_samples: int = 2000  # training samples probed, stratified by noise kind / quality
    threads: int = 0  # PyTorch CPU threads (0 = PyTorch's default: one per core); see docs

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        for name in ("epochs", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "probe_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps: must be >= 1 or null, got {self.max_steps}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if self.probe_samples < 1:
            problems.append(f"probe_samples: must be >= 1, got {self.probe_samples}")
        if self.threads < 0:
            problems.append(f"threads: must be >= 0 (0 = PyTorch's default), got {self.threads}")
        return problems


@dataclasses.dataclass
class Config:
    """Root config of a robustface run."""

    seed: int = 0
    output_dir: str = "runs/demo"
    synth: SynthConfig = dataclasses.field(default_factory=SynthConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    fc: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid), including every component's
        name and parameters checked against its registry
        (:func:`robustface.train.components.component_problems`)."""
        from robustface.train.components import component_problems

        problems = [] if self.output_dir else ["output_dir: must not be empty"]
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        return problems + component_problems(self)


# --------------------------------------------------------------------------------------------------
# Generic loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, errors: list[str], source: str) -> Any:
    """Check ``value`` against annotation ``tp``; return the converted value or append errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = f"{source}: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(bad)
            return None
        return _build(tp, value, key + ".", errors, source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            trial: list[str] = []
            out = _convert(value, candidate, key, trial, source)
            if not trial:
                return out
        errors.append(bad)
        return None
    if origin is Literal:
        if value not in args:
            errors.append(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                errors.append(f"{source}: {key}: expected {len(args)} items, got {len(value)}")
                return None
            items = [
                _convert(v, a, f"{key}[{i}]", errors, source)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
            return tuple(items)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", errors, source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            errors.append(bad)
            return None
        val_tp = args[1] if args else Any
        return {k: _convert(v, val_tp, f"{key}.{k}", errors, source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(bad)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(bad)
        return value
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, errors: list[str], source: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            errors.append(f"{source}: unknown key '{prefix}{key}'{hint}")
            continue
        n_errors = len(errors)
        converted = _convert(value, hints[key], prefix + key, errors, source)
        # A mistyped value keeps its default, so checks stay safe; a nested section is kept (its own
        # bad fields were already dropped) so that its other values are still checked.
        if len(errors) == n_errors or dataclasses.is_dataclass(converted):
            kwargs[key] = converted
    return cls(**kwargs)


def _check_tree(obj: Any, prefix: str, errors: list[str]) -> None:
    """Run every section's ``check()``, prefixing messages with the section path."""
    if hasattr(obj, "check"):
        errors.extend(f"{prefix}{msg}" for msg in obj.check())
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_tree(value, f"{prefix}{f.name}.", errors)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=c"`` into ``(["a", "b"], value)``; the value is parsed as YAML (``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. synth.identities=100")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for a nested dict ``{"a": {"b": leaf}}``."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {
        k: v
        for key, sub in tree.items()
        for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()
    }


def config_changes(saved: Mapping[str, Any], cfg: Any, ignore: Sequence[str] = ()) -> list[str]:
    """``key: run X, now Y`` for each dotted key whose value in ``saved`` (a run's config read
    back from its YAML) differs from ``cfg``'s, sorted. ``saved`` is read as a config of
    ``cfg``'s type, as a resume reads it: a key it lacks (one added since the run) takes its
    default. Where it does not read (a key removed since), it is compared as it is, and a key one
    side lacks reads ``None``."""
    errors: list[str] = []
    built = _build(type(cfg), dict(saved), "", errors, "<run>")
    old, new = _flat(dict(saved) if errors else to_dict(built)), _flat(to_dict(cfg))
    keys = sorted((old.keys() | new.keys()) - set(ignore))
    return [
        f"{k}: run {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]


def saved_config_changes(
    file: str | Path, cfg: Any, ignore: Sequence[str] = ()
) -> list[str] | None:
    """:func:`config_changes` between the config a run saved as YAML in ``file`` and ``cfg``;
    ``None`` where the file is missing, unreadable or not a mapping."""
    try:
        saved = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config_changes(saved, cfg, ignore) if isinstance(saved, dict) else None


def changes_text(changes: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of :func:`config_changes` lines joined by ``; ``, and how many more."""
    more = f" (and {len(changes) - shown} more)" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) and apply overrides.

    Raises :class:`ConfigError` listing every problem: unreadable YAML, unknown keys (with the
    closest valid name), wrong types and out-of-range values, each naming the key and its source.
    """
    errors: list[str] = []
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = dict(loaded)
    cfg = _build(cls, data, "", errors, source)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(cfg, parts, value, f"--set {text}", errors)
    _check_tree(cfg, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def check_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` listing every problem with ``cfg``'s values (its sections'
    ``check()``, components included), as :func:`load_config` does: for configs built in code."""
    errors: list[str] = []
    _check_tree(cfg, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def apply_overrides(cfg: T, values: Mapping[str, Any], source: str) -> T:
    """A copy of ``cfg`` with dotted ``{"head.name": "cosface", ...}`` values applied and checked.

    Values are Python objects (as loaded from YAML). Raises :class:`ConfigError` listing every
    problem, each naming the key and ``source``.
    """
    out = copy.deepcopy(cfg)
    errors: list[str] = []
    for key, value in values.items():
        parts = str(key).split(".")
        if not all(parts):
            errors.append(f"{source}: empty key segment in {key!r}")
            continue
        _apply_override(out, parts, value, source, errors)
    _check_tree(out, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return out


def _apply_override(cfg: Any, parts: list[str], value: Any, source: str, errors: list[str]) -> None:
    target = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        prefix = ".".join(parts[:i])
        prefix = prefix + "." if prefix else ""
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            errors.append(f"{source}: unknown key '{prefix}{part}'{hint}")
            return
        if i < len(parts) - 1:
            tp = typing.get_type_hints(type(target))[part]
            if typing.get_origin(tp) is dict and i == len(parts) - 2:
                # one entry of a mapping field, e.g. head.params.margin=0.3
                n_errors = len(errors)
                key = ".".join(parts)
                new = _convert(value, typing.get_args(tp)[1], key, errors, source)
                if len(errors) == n_errors:
                    getattr(target, part)[parts[-1]] = new
                return
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                errors.append(f"{source}: '{prefix}{part}' is not a section")
                return
    tp = typing.get_type_hints(type(target))[parts[-1]]
    n_errors = len(errors)
    new = _convert(value, tp, ".".join(parts), errors, source)
    if len(errors) == n_errors:
        setattr(target, parts[-1], new)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
