"""ONNX face models as backbones: :class:`OnnxBackbone` runs one with onnxruntime on the CPU.

The input convention is insightface's (see :mod:`robustface.deploy.onnx`, which exports such
models): ``N x 3 x H x W`` float32 RGB normalised as ``(x - 127.5) / 127.5``. Old mxnet-converted
models that normalise inside the graph (their first nodes are ``_minus``/``_mul`` or
``Sub``/``Mul``) take raw pixels instead; this is detected the way insightface's ``ArcFaceONNX``
does it. onnx and onnxruntime are imported only when a model is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["INPUT_METADATA_KEY", "OnnxBackbone", "onnx_session"]

INPUT_METADATA_KEY = "robustface.input"
"""``metadata_props`` key with which robustface's exports state their (normalised) input."""


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU onnxruntime session for ``path`` (errors name the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc


def _graph_normalises_input(path: Path) -> bool:
    """Whether the graph normalises ``[0, 255]`` pixels itself: our exports say so in their
    metadata (they take normalised input); otherwise insightface's test, a ``Sub``/``_minus``
    and a ``Mul``/``_mul`` among the first 8 nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(prop.key == INPUT_METADATA_KEY for prop in model.metadata_props):
        return False
    nodes = model.graph.node[:8]
    names = [node.name for node in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


class OnnxBackbone(nn.Module):
    """An ONNX face model called like a torch backbone: ``(N x 3 x H x W) -> (N x d)`` float32.

    Input is what robustface feeds every backbone: RGB normalised as ``(x / 255 - 0.5) / 0.5``.
    ``raw_pixels`` says whether the graph instead takes ``[0, 255]`` pixels (None: detect it as
    insightface does); ``color_order="BGR"`` flips the channels for models that expect BGR.
    ``input_size`` is read from the model's input shape; it must be given when the graph's
    spatial axes are dynamic. Any batch size works; a graph with a fixed batch size is fed in
    chunks (the last one zero-padded). The session runs on the CPU; outputs come back on the
    input's device.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        input_size: int | None = None,
        color_order: str = "RGB",
        raw_pixels: bool | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX model")
        if color_order not in ("RGB", "BGR"):
            raise ValueError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
        self.session = onnx_session(self.path, threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input, got {[i.name for i in inputs]}")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise ValueError(f"{self.path}: input must be N x 3 x H x W, got {shape}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        fixed = [s for s in shape[2:] if isinstance(s, int)]
        if fixed and (len(fixed) != 2 or fixed[0] != fixed[1]):
            raise ValueError(f"{self.path}: input must be square, got {shape}")
        if fixed and input_size is not None and input_size != fixed[0]:
            raise ValueError(f"{self.path}: input_size={input_size} but the model takes {fixed[0]}")
        if not fixed and input_size is None:
            raise ValueError(f"{self.path}: the input size is dynamic; give input_size")
        self.input_size = int(fixed[0] if fixed else input_size)  # type: ignore[arg-type]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.color_order = color_order
        self.raw_pixels = (
            _graph_normalises_input(self.path) if raw_pixels is None else bool(raw_pixels)
        )

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        b, n = self.fixed_batch, x.shape[0]
        pad = np.zeros(((-n) % b, *x.shape[1:]), dtype=x.dtype)
        padded = np.concatenate([x, pad])
        outs = [
            self.session.run([self.output_name], {self.input_name: padded[i : i + b]})[0]
            for i in range(0, padded.shape[0], b)
        ]
        return np.concatenate(outs)[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised RGB images ``x`` (``N x 3 x H x W``); returns ``N x d`` float32."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be N x 3 x H x W, got {tuple(x.shape)}")
        if x.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.path.name} takes {self.input_size}x{self.input_size} input, "
                f"got {tuple(x.shape[2:])}"
            )
        host = x.detach().to("cpu", torch.float32)
        if self.color_order == "BGR":
            host = host.flip(1)
        if self.raw_pixels:
            host = host * 127.5 + 127.5
        out = self._run(np.ascontiguousarray(host.numpy()))
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return (
            f"path={str(self.path)!r}, input_size={self.input_size}, "
            f"color_order={self.color_order}, raw_pixels={self.raw_pixels}"
        )
