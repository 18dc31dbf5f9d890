"""ONNX export of backbones (insightface convention) and ONNX models as evaluation backbones.

Exported graphs follow arcface_torch's ``torch2onnx.py``: one input named ``data``,
``N x 3 x H x W`` float32 (``112 x 112`` for the usual models) with a dynamic batch axis, holding
**RGB** pixels normalised as ``(x - 127.5) / 127.5``, i.e. ``(x / 255 - 0.5) / 0.5``; one output,
named ``fc1`` here (arcface_torch leaves it unnamed), the raw (not L2-normalised) ``N x d``
embedding. Backbones whose weights expect BGR (AdaFace / IR) are exported with the channel flip
inside the graph, so every exported model takes RGB. The model also records this in its
``metadata_props`` (``robustface.input`` and ``robustface.color_order``).

:class:`OnnxBackbone` (defined in :mod:`robustface.models.onnx`, re-exported here) runs any such
model (ours, arcface_torch's, insightface's model zoo) with onnxruntime on the CPU behind a
torch-module interface.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustface.models.loading import load_backbone, weights_file
from robustface.models.onnx import INPUT_METADATA_KEY, OnnxBackbone, onnx_session
from robustface.utils.guards import check_int
from robustface.utils.io import atomic_path
from robustface.utils.run import RunDir

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


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised in float64 (zero rows stay zero)."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _legacy_export_kwargs() -> dict[str, Any]:
    """torch>=2.5 takes ``dynamo``; the TorchScript exporter keeps arcface_torch's graph layout."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through links, relative or absolute)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    opset: int = 17,
    input_size: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
    **load_kwargs: Any,
) -> ExportReport:
    """Export the backbone of ``checkpoint`` to ``out_path`` in the insightface convention.

    ``checkpoint`` is anything :func:`robustface.models.loading.load_backbone` reads (a run
    directory, or a ``.pth`` / AdaFace checkpoint), with ``input_size`` and ``load_kwargs``
    (``backbone``, ``embedding_size``, ``width``, ``color_order``) passed on to it.

    With ``check``, onnxruntime runs the exported graph on a random batch of 3 (the graph is
    traced with batch 1, so this also checks the dynamic batch axis) and the export fails with
    ``ValueError`` if the largest absolute difference between the L2-normalised embeddings of
    onnxruntime and PyTorch exceeds ``atol``: raw embeddings of an untrained model can have norms
    in the thousands, where float32 rounding alone exceeds any fixed absolute tolerance, and
    evaluation only uses directions. The file appears only when everything passed. An existing
    ``out_path`` is replaced only with ``overwrite``, and never when it is the weights exported
    (by any name) or a run's other backbone.
    """
    import onnx

    opset = check_int("opset", opset, 11)
    out_path = Path(out_path)
    if Path(checkpoint).suffix.lower() == ".onnx":
        raise ValueError(f"{checkpoint}: already an ONNX model; export takes a PyTorch checkpoint")
    weights = [weights_file(checkpoint)]
    if Path(checkpoint).is_dir():  # a run: its other backbone too (best_backbone.pth exported)
        weights += [RunDir(checkpoint).backbone_file, RunDir(checkpoint).best_backbone_file]
    if any(_same_file(out_path, w) for w in weights):
        raise ValueError(f"{out_path}: the weights being exported; write the .onnx elsewhere")
    if out_path.is_dir():
        raise IsADirectoryError(f"{out_path}: a directory; the output is the .onnx file to write")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (CLI: --overwrite)")
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
            (INPUT_METADATA_KEY, f"RGB, {INPUT_NORMALISATION}"),
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
            got = onnx_session(tmp).run(None, {INPUT_NAME: x.numpy()})[0]
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
