"""Load a backbone to evaluate: a run directory, a bare state_dict file or an ONNX model."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from robustface.models import build_backbone
from robustface.models.ir import load_adaface_checkpoint


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
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, int]:
    """Return ``(model in eval mode taking RGB input, input size)``.

    ``source`` is a run directory (its ``config.yaml`` names the architecture; ``best_backbone.pth``
    is used if present, else ``backbone.pth``) or a checkpoint file: a bare state_dict
    (arcface_torch's ``backbone.pth``) or an AdaFace checkpoint (``model.``-prefixed keys), in which
    case ``backbone`` must name the architecture. Explicit arguments override the run's config.
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
    kwargs: dict[str, object] = {}
    if source.is_dir():
        config_file = source / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{source}: not a run directory (no config.yaml)")
        model_cfg = yaml.safe_load(config_file.read_text(encoding="utf-8"))["model"]
        backbone = backbone or model_cfg["backbone"]
        kwargs = {
            k: model_cfg[k]
            for k in ("embedding_size", "input_size", "width")
            if model_cfg.get(k) is not None
        }
        color_order = color_order or "RGB"
        weights = source / "best_backbone.pth"
        if not weights.is_file():
            weights = source / "backbone.pth"
        if not weights.is_file():
            raise FileNotFoundError(f"{source}: no best_backbone.pth or backbone.pth")
    else:
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such checkpoint")
        if backbone is None:
            raise ValueError(f"{source}: a bare state_dict needs --backbone (e.g. r50)")
        weights = source
    overrides = {"embedding_size": embedding_size, "input_size": input_size, "width": width}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = build_backbone(backbone, **kwargs)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ValueError(f"{weights}: not a readable PyTorch checkpoint ({exc})") from exc
    keys = state.get("state_dict", state).keys() if isinstance(state, dict) else []
    if any(str(k).startswith("model.") for k in keys):
        load_adaface_checkpoint(model, state)
    else:
        model.load_state_dict(state, strict=True)
    color_order = color_order or model.meta.color_order
    if color_order not in ("RGB", "BGR"):
        raise ValueError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    wrapped: nn.Module = _BGRInput(model) if color_order == "BGR" else model
    return wrapped.to(device).eval(), int(model.meta.input_size)
