"""Load a backbone to evaluate: a run directory, a bare state_dict file or an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from robustface.models.loading import backbone_state_dict, build_from_state_dict, load_weights


class _BGRInput(nn.Module):
    """Feed a BGR-trained backbone from RGB input (channel flip; mean/std are channel-symmetric)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed RGB images ``x`` (N x 3 x H x W) with the wrapped BGR backbone."""
        return self.backbone(x.flip(1))


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

    ``source`` is a run directory (its ``config.yaml`` names the architecture; ``best_backbone.pth``
    is used if present, else ``backbone.pth``) or a checkpoint file: a bare state_dict
    (arcface_torch's ``backbone.pth``) or an AdaFace checkpoint (``model.``-prefixed keys). The
    architecture of a file is read from its weights where they determine it, and explicit
    arguments (and a run's config) must agree with them: see
    :func:`robustface.models.loading.build_from_state_dict`. Files are read weights-only;
    ``unsafe_legacy_load`` unpickles them in full (runs any code they contain: trusted files only).
    ``color_order`` is the channel order the weights expect: robustface runs are RGB; a bare file
    defaults to its family's published convention (BGR for IR / AdaFace, RGB for IResNet). BGR
    models are wrapped so that callers always pass RGB.

    An ``.onnx`` file becomes a :class:`robustface.deploy.onnx.OnnxBackbone` (onnxruntime on the
    CPU, insightface input convention). Its input size comes from the graph (``input_size`` is
    needed only where that is dynamic), ``color_order`` defaults to RGB, and ``backbone``,
    ``embedding_size`` and ``width`` are refused.
    """
    source = Path(source)
    if source.suffix.lower() == ".onnx":
        from robustface.deploy.onnx import OnnxBackbone

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
        config_file = source / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{source}: not a run directory (no config.yaml)")
        model_cfg = yaml.safe_load(config_file.read_text(encoding="utf-8"))["model"]
        backbone = backbone or model_cfg["backbone"]
        for key, value in arch.items():
            if value is None:
                arch[key] = model_cfg.get(key)
        color_order = color_order or "RGB"
        weights = source / "best_backbone.pth"
        if not weights.is_file():
            weights = source / "backbone.pth"
        if not weights.is_file():
            raise FileNotFoundError(f"{source}: no best_backbone.pth or backbone.pth")
    else:
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such checkpoint")
        weights = source
    state = backbone_state_dict(
        load_weights(weights, unsafe_legacy_load=unsafe_legacy_load), weights
    )
    model = build_from_state_dict(state, weights, backbone=backbone, **arch)
    color_order = color_order or model.meta.color_order
    if color_order not in ("RGB", "BGR"):
        raise ValueError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    wrapped: nn.Module = _BGRInput(model) if color_order == "BGR" else model
    return wrapped.to(device).eval(), int(model.meta.input_size)
