"""Reading model files safely, and building the backbone a state dict was saved from.

**Weights only.** Every PyTorch file robustface reads (backbones, model-zoo weights, AdaFace
checkpoints, training checkpoints, GCN models) goes through :func:`load_weights`, which calls
``torch.load(weights_only=True)``: tensors, containers, numbers and strings are built, and a file
that names any other Python object is refused before anything in it runs (a plain ``torch.load``
unpickles, and unpickling can call any function, e.g. ``os.system``). Files pickled with other
objects (numpy arrays, custom classes: some old checkpoints) load only with the explicit opt-in
``unsafe_legacy_load=True`` (``--unsafe-legacy-load`` on the command line), for files from a
source one trusts.

**Architecture from the weights.** :func:`build_from_state_dict` reads the architecture from a
bare state dict where it is determined: the family and blocks per stage from the keys (they must
match a registered backbone's exactly), ``width`` from the stem's output channels,
``embedding_size`` from the rows of the embedding ``Linear`` and the final feature-map side from
its columns (IResNet, IR) or the GDC kernel (MobileFaceNet). The input size is determined only up
to that side (``ceil(input_size / 16)``: 97 to 112 px all give 7x7), so it comes from
``input_size`` or the backbone's default (112, or a preset's: ``r18_tiny`` 56) when that gives the
file's side; otherwise the error says to set it. Given values that contradict the file fail with
an error naming the flag.

**Backbones to evaluate.** :func:`load_backbone` turns a run directory, a weights file or an
``.onnx`` model into a module in eval mode that takes RGB input (BGR weights are wrapped).
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustface.errors import DataFormatError
from robustface.models.ir import adaface_backbone_state
from robustface.models.meta import BACKBONES, FaceBackbone, final_map_size
from robustface.models.onnx import OnnxBackbone
from robustface.utils.run import RunDir

UNSAFE_FLAG = "--unsafe-legacy-load"

__all__ = [
    "UNSAFE_FLAG",
    "BGRInput",
    "StateDictArchitecture",
    "backbone_state_dict",
    "build_from_state_dict",
    "infer_architecture",
    "load_backbone",
    "load_weights",
]


def load_weights(path: str | Path, *, unsafe_legacy_load: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``.

    A file that needs more than weights raises :class:`DataFormatError` naming the file, the
    refused object and the opt-in; with ``unsafe_legacy_load=True`` it is unpickled in full,
    which runs whatever code it contains (only for files from a trusted source). An unreadable
    file raises :class:`DataFormatError` too. ``mmap`` memory-maps the tensors (zip format only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns before failing on a non-PyTorch file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(
                path, map_location="cpu", weights_only=not unsafe_legacy_load, mmap=mmap
            )
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = reason.group(1).strip() if reason else _first_line(exc)
            raise DataFormatError(
                path, f"not a PyTorch checkpoint (unpickling failed: {detail})"
            ) from None
        raise DataFormatError(
            path,
            f"refused to unpickle {refused.group(1)}: PyTorch files are read weights-only "
            "(tensors, containers, numbers, strings) since unpickling anything else can run code, "
            "and nothing in this file was run. If you trust its source, load it with "
            f"{UNSAFE_FLAG} (Python: unsafe_legacy_load=True)",
        ) from None
    except Exception as exc:  # zip and storage errors come in many types
        raise DataFormatError(
            path, f"not a readable PyTorch checkpoint ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _training_checkpoint_model(obj: Any) -> Mapping[str, Any] | None:
    """The ``model`` config section of a robustface training checkpoint (a step's ``main.pt``:
    ``backbone`` weights beside the run's ``config``), else None."""
    if not isinstance(obj, Mapping):
        return None
    config = obj.get("config")
    if isinstance(obj.get("backbone"), Mapping) and isinstance(config, Mapping):
        model = config.get("model")
        return model if isinstance(model, Mapping) else None
    return None


def backbone_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's state dict in what a weights file held: a bare state dict, a
    ``{"state_dict": ...}`` wrapper, an AdaFace Lightning checkpoint (``model.`` prefix), a
    robustface training checkpoint (``main.pt``), or any of these saved from a
    ``DistributedDataParallel`` wrapper (every key prefixed ``module.``, dropped)."""
    if not isinstance(obj, Mapping):
        raise DataFormatError(path, f"expected a state dict, got {type(obj).__name__}")
    if _training_checkpoint_model(obj) is not None:
        obj = obj["backbone"]
    try:
        state, _ = adaface_backbone_state(obj)
    except TypeError as exc:
        raise DataFormatError(path, str(exc)) from None
    prefix = "module."
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise DataFormatError(path, f"not a state dict: {bad[0]!r} is not a named tensor")
    return dict(state)


@dataclass(frozen=True)
class _Layout:
    """Where a family's state dict shows its sizes."""

    marker: str  # a key only this family has
    stem: str  # a conv whose output channels are ``width * stem_unit``
    stem_unit: int
    linear: str  # the embedding Linear: rows = embedding size
    side: Callable[[Mapping[str, torch.Tensor]], float]  # side of the final feature map


def _flatten_side(linear: str, channels: str) -> Callable[[Mapping[str, torch.Tensor]], float]:
    """Final side from a Linear over the flattened ``C x s x s`` map and the BN giving ``C``."""
    return lambda state: math.sqrt(state[linear].shape[1] / state[channels].shape[0])


_LAYOUTS = {
    "IResNet": _Layout(
        "layer1.0.conv1.weight",
        "conv1.weight",
        64,
        "fc.weight",
        _flatten_side("fc.weight", "bn2.weight"),
    ),
    "IR": _Layout(
        "input_layer.0.weight",
        "input_layer.0.weight",
        64,
        "output_layer.3.weight",
        _flatten_side("output_layer.3.weight", "output_layer.0.weight"),
    ),
    "MobileFaceNet": _Layout(
        "conv_sep.layers.0.weight",
        "conv_sep.layers.0.weight",
        512,
        "features.layers.2.weight",
        lambda state: state["features.layers.0.layers.0.weight"].shape[-1],
    ),
}


@dataclass(frozen=True)
class StateDictArchitecture:
    """What a state dict determines: the registered backbones with its keys, ``width``,
    ``embedding_size`` and the side of the final feature map."""

    family: str
    names: tuple[str, ...]
    width: float
    embedding_size: int
    final_side: int

    def input_range(self) -> tuple[int, int]:
        """The input sizes giving ``final_side`` (``ceil(size / 16) == final_side``)."""
        return 16 * (self.final_side - 1) + 1, 16 * self.final_side


@functools.cache
def _registered_layout(name: str) -> tuple[frozenset[str], int]:
    """Keys and default input size of backbone ``name`` (built on the meta device, tiny)."""
    with torch.device("meta"):
        model = BACKBONES.build(name, width=1 / 64, embedding_size=1)
    return _architecture_keys(model.state_dict()), int(model.meta.input_size)


def _architecture_keys(state: Mapping[str, Any]) -> frozenset[str]:
    """The keys that tell architectures apart (BatchNorm's ``num_batches_tracked`` counters are
    absent from files saved by PyTorch < 0.4.1, and ``load_state_dict`` accepts that)."""
    return frozenset(k for k in state if not k.endswith("num_batches_tracked"))


def infer_architecture(
    state: Mapping[str, torch.Tensor], path: str | Path = "state dict"
) -> StateDictArchitecture | None:
    """The architecture of a backbone state dict, or ``None`` for a family it does not know."""
    family = next((f for f, layout in _LAYOUTS.items() if layout.marker in state), None)
    if family is None:
        return None
    layout = _LAYOUTS[family]
    try:
        width = state[layout.stem].shape[0] / layout.stem_unit
        embedding_size = int(state[layout.linear].shape[0])
        side = layout.side(state)
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        raise DataFormatError(path, f"an incomplete {family} state dict ({exc!r})") from None
    if side != int(side) or side < 1:
        raise DataFormatError(path, f"{layout.linear} does not fit a square feature map")
    keys = _architecture_keys(state)
    names = tuple(n for n in BACKBONES.names() if _registered_layout(n)[0] == keys)
    return StateDictArchitecture(family, names, width, embedding_size, int(side))


def build_from_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    backbone: str | None = None,
    embedding_size: int | None = None,
    width: float | None = None,
    input_size: int | None = None,
) -> FaceBackbone:
    """The backbone ``state`` was saved from, with ``state`` loaded (``strict=True``).

    Unset arguments are read from ``state`` (see the module docstring); set ones must agree with
    it. Every disagreement raises :class:`DataFormatError` naming the flag to change or set.
    """
    if not state:
        raise DataFormatError(path, "an empty state dict")
    arch = infer_architecture(state, path)
    if arch is None:
        if backbone is None:
            raise DataFormatError(
                path,
                f"cannot tell the architecture from its keys ({', '.join(list(state)[:3])}, ...): "
                "set --backbone",
            )
        return _load_strict(state, path, backbone, embedding_size, width, input_size)
    if not arch.names:
        raise DataFormatError(
            path,
            f"an {arch.family} state dict whose keys match no registered backbone (other blocks "
            "per stage, or keys missing / added)",
        )
    if backbone is not None and backbone not in arch.names:
        BACKBONES.get(backbone)  # an unknown name gets the registry's error
        raise DataFormatError(
            path,
            f"holds weights of {' / '.join(arch.names)}, not {backbone}: set --backbone "
            f"{arch.names[0]} or leave it out",
        )
    for flag, given, found in (
        ("--width", width, arch.width),
        ("--embedding-size", embedding_size, arch.embedding_size),
    ):
        if given is not None and not math.isclose(given, found):
            raise DataFormatError(
                path, f"{flag} {given:g} does not fit its weights ({flag} {found:g}): leave it out"
            )
    lo, hi = arch.input_range()
    if input_size is not None and final_map_size(input_size) != arch.final_side:
        raise DataFormatError(
            path,
            f"--input-size {input_size} gives a {final_map_size(input_size)}x"
            f"{final_map_size(input_size)} final feature map, its weights take "
            f"{arch.final_side}x{arch.final_side}: set --input-size between {lo} and {hi}",
        )
    names = [backbone] if backbone is not None else list(arch.names)
    if input_size is None:
        fitting = [n for n in names if final_map_size(_registered_layout(n)[1]) == arch.final_side]
        if not fitting:
            default = _registered_layout(names[0])[1]
            raise DataFormatError(
                path,
                f"its weights take a {arch.final_side}x{arch.final_side} final feature map "
                f"(input size {lo} to {hi}), {names[0]}'s default input size {default} does not: "
                "set --input-size",
            )
        names = fitting
        input_size = _registered_layout(names[0])[1]
    return _load_strict(state, path, names[0], arch.embedding_size, arch.width, input_size)


def _load_strict(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    backbone: str,
    embedding_size: int | None,
    width: float | None,
    input_size: int | None,
) -> FaceBackbone:
    """Build ``backbone`` with the given sizes (unset: its defaults) and load ``state`` into it."""
    given = {"embedding_size": embedding_size, "width": width, "input_size": input_size}
    model = BACKBONES.build(backbone, **{k: v for k, v in given.items() if v is not None})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise DataFormatError(
            path,
            f"does not fit {backbone} ({detail[:300]}); set --backbone, --width, "
            "--embedding-size and --input-size to match the file",
        ) from None
    return model


class BGRInput(nn.Module):
    """Feed a BGR-trained backbone from RGB input (channel flip; mean/std are channel-symmetric)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed RGB images ``x`` (N x 3 x H x W) with the wrapped BGR backbone."""
        return self.backbone(x.flip(1))


def weights_file(source: str | Path) -> Path:
    """The file :func:`load_backbone` reads the weights of ``source`` from: a run directory's
    :meth:`~robustface.utils.run.RunDir.weights_file` (``best_backbone.pth`` if present, else
    ``backbone.pth``), else ``source`` itself (a checkpoint or ``.onnx`` file)."""
    source = Path(source)
    if source.is_dir():
        return RunDir(source).weights_file()
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint")
    return source


def load_backbone(
    source: str | Path,
    *,
    backbone: str | None = None,
    embedding_size: int | None = None,
    input_size: int | None = None,
    width: float | None = None,
    color_order: str | None = None,
    unsafe_legacy_load: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, int]:
    """Return ``(model in eval mode taking RGB input, input size)``.

    ``source`` is a run directory (its config names the architecture, read through
    :meth:`robustface.utils.run.RunDir.config`; the best backbone is used if present, else the
    last: :func:`weights_file`) or a checkpoint file: a bare state_dict
    (arcface_torch's ``backbone.pth``), an AdaFace checkpoint (``model.``-prefixed keys) or a
    training checkpoint's ``main.pt`` (its config names the architecture, as a run's does). The
    architecture of a file is read from its weights where they determine it, and explicit
    arguments (and a run's config) must agree with them: see
    :func:`robustface.models.loading.build_from_state_dict`. Files are read weights-only;
    ``unsafe_legacy_load`` unpickles them in full (runs any code they contain: trusted files only).
    ``color_order`` is the channel order the weights expect: robustface runs are RGB; a bare file
    defaults to its family's published convention (BGR for IR / AdaFace, RGB for IResNet). BGR
    models are wrapped so that callers always pass RGB.

    An ``.onnx`` file becomes a :class:`robustface.models.onnx.OnnxBackbone` (onnxruntime on the
    CPU, insightface input convention). Its input size comes from the graph (``input_size`` is
    needed only where that is dynamic), ``color_order`` defaults to RGB, and ``backbone``,
    ``embedding_size`` and ``width`` are refused.
    """
    source = Path(source)
    if source.suffix.lower() == ".onnx":
        given = {"backbone": backbone, "embedding_size": embedding_size, "width": width}
        if any(v is not None for v in given.values()):
            named = ", ".join(k for k, v in given.items() if v is not None)
            raise ValueError(f"{source}: an ONNX model has a fixed architecture; drop {named}")
        onnx_model = OnnxBackbone(source, input_size=input_size, color_order=color_order or "RGB")
        return onnx_model.eval(), onnx_model.input_size
    arch: dict[str, Any] = {
        "embedding_size": embedding_size,
        "input_size": input_size,
        "width": width,
    }
    if source.is_dir():
        run = RunDir(source)
        model_cfg = run.config().model
        backbone = backbone or model_cfg.backbone
        for key, value in arch.items():
            if value is None:
                arch[key] = getattr(model_cfg, key)
        color_order = color_order or "RGB"
    weights = weights_file(source)
    obj = load_weights(weights, unsafe_legacy_load=unsafe_legacy_load)
    saved = _training_checkpoint_model(obj)
    if saved is not None:  # a step's main.pt names its architecture, as a run's config does
        backbone = backbone or saved.get("backbone")
        for key, value in arch.items():
            if value is None:
                arch[key] = saved.get(key)
        color_order = color_order or "RGB"
    state = backbone_state_dict(obj, weights)
    model = build_from_state_dict(state, weights, backbone=backbone, **arch)
    color_order = color_order or model.meta.color_order
    if color_order not in ("RGB", "BGR"):
        raise ValueError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    wrapped: nn.Module = BGRInput(model) if color_order == "BGR" else model
    return wrapped.to(device).eval(), int(model.meta.input_size)
