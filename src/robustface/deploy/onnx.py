"""ONNX export of backbones (insightface convention) and ONNX models as evaluation backbones.

Exported graphs follow arcface_torch's ``torch2onnx.py``: one input named ``data``,
``N x 3 x H x W`` float32 (``112 x 112`` for the usual models) with a dynamic batch axis, holding
**RGB** pixels normalised as ``(x - 127.5) / 127.5``, i.e. ``(x / 255 - 0.5) / 0.5``; one output,
named ``fc1`` here (arcface_torch leaves it unnamed), the raw (not L2-normalised) ``N x d``
embedding. Backbones whose weights expect BGR (AdaFace / IR) are exported with the channel flip
inside the graph, so every exported model takes RGB. The model also records this in its
``metadata_props`` (``robustface.input`` and ``robustface.color_order``).

:class:`OnnxBackbone` runs any such model (ours, arcface_torch's, insightface's model zoo) with
onnxruntime on the CPU behind a torch-module interface. Old mxnet-converted models that normalise
inside the graph (their first nodes are ``_minus``/``_mul`` or ``Sub``/``Mul``) take raw pixels
instead; this is detected the way insightface's ``ArcFaceONNX`` does it.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustface.utils.io import atomic_path

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportReport", "OnnxBackbone", "export_onnx"]

INPUT_NAME = "data"
"""Input name of exported graphs (insightface convention)."""
OUTPUT_NAME = "fc1"
"""Output name of exported graphs (the embedding layer of insightface's models)."""
INPUT_NORMALISATION = "(x - 127.5) / 127.5"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduces PyTorch."""

    path: Path
    opset: int
    input_size: int
    embedding_size: int
    max_abs_diff: float | None
    """Largest |onnxruntime - PyTorch| of the raw embeddings (None when not checked)."""
    max_abs_diff_normalised: float | None
    """The same for L2-normalised embeddings: the number checked against ``atol``."""
    atol: float


def _session(path: str | Path, threads: int | None = None) -> Any:
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


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised in float64 (zero rows stay zero)."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _legacy_export_kwargs() -> dict[str, Any]:
    """torch>=2.5 takes ``dynamo``; the TorchScript exporter keeps arcface_torch's graph layout."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    opset: int = 17,
    input_size: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    **load_kwargs: Any,
) -> ExportReport:
    """Export the backbone of ``checkpoint`` to ``out_path`` in the insightface convention.

    ``checkpoint`` is anything :func:`robustface.evaluate.loading.load_backbone` reads (a run
    directory, or a ``.pth`` / AdaFace checkpoint), with ``input_size`` and ``load_kwargs``
    (``backbone``, ``embedding_size``, ``width``, ``color_order``) passed on to it.

    With ``check``, onnxruntime runs the exported graph on a random batch of 3 (the graph is
    traced with batch 1, so this also checks the dynamic batch axis) and the export fails with
    ``ValueError`` if the largest absolute difference between the L2-normalised embeddings of
    onnxruntime and PyTorch exceeds ``atol``: raw embeddings of an untrained model can have norms
    in the thousands, where float32 rounding alone exceeds any fixed absolute tolerance, and
    evaluation only uses directions. The file appears only when everything passed.
    """
    import onnx

    from robustface.evaluate.loading import load_backbone

    if opset < 11:
        raise ValueError(f"opset must be >= 11, got {opset}")
    out_path = Path(out_path)
    if Path(checkpoint).suffix.lower() == ".onnx":
        raise ValueError(f"{checkpoint}: already an ONNX model; export takes a PyTorch checkpoint")
    model, size = load_backbone(checkpoint, input_size=input_size, **load_kwargs)
    generator = torch.Generator().manual_seed(0)
    dummy = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    with atomic_path(out_path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                opset_version=opset,
                do_constant_folding=True,
                **_legacy_export_kwargs(),
            )
        proto = onnx.load(str(tmp))
        for key, value in (
            ("robustface.input", f"RGB, {INPUT_NORMALISATION}"),
            ("robustface.color_order", "RGB"),
            ("robustface.source", str(checkpoint)),
        ):
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        embedding_size = int(proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
        diff = diff_unit = None
        if check:
            x = torch.rand(3, 3, size, size, generator=generator) * 2 - 1
            with torch.no_grad():
                expected = model(x).float().numpy()
            got = _session(tmp).run(None, {INPUT_NAME: x.numpy()})[0]
            if got.shape != expected.shape:
                raise ValueError(
                    f"{out_path}: ONNX output shape {got.shape} != PyTorch {expected.shape}"
                )
            diff = float(np.max(np.abs(got - expected)))
            diff_unit = float(np.max(np.abs(_unit(got) - _unit(expected))))
            if not diff_unit <= atol:
                raise ValueError(
                    f"{out_path}: normalised onnxruntime embeddings differ from PyTorch's by "
                    f"{diff_unit:.3g} > atol={atol:g} (raw max abs diff {diff:.3g})"
                )
    return ExportReport(out_path, opset, size, embedding_size, diff, diff_unit, atol)


def _graph_normalises_input(path: Path) -> bool:
    """Whether the graph normalises ``[0, 255]`` pixels itself: our exports say so in their
    metadata (they take normalised input); otherwise insightface's test, a ``Sub``/``_minus``
    and a ``Mul``/``_mul`` among the first 8 nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(prop.key == "robustface.input" for prop in model.metadata_props):
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
        self.session = _session(self.path, threads)
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
