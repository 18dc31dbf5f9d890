"""Deployment: face alignment from 5 landmarks to the ArcFace crop, ONNX export, and using a model:
:class:`Recognizer` (embed, compare), :func:`embed_to_dir`, :func:`calibrate` and :class:`Gallery`.

The "use a model" names are imported on first use (``from robustface.deploy import Recognizer``),
so that ``robustface.deploy.align``, which evaluation imports, pulls in neither faiss nor the
evaluation modules those build on.
"""

from __future__ import annotations

import importlib
from typing import Any

from robustface.deploy.align import (
    ARCFACE_TEMPLATE,
    align_face,
    align_faces,
    arcface_template,
    similarity_transform,
    similarity_transforms,
)
from robustface.deploy.onnx import ExportReport, OnnxBackbone, export_onnx

_LAZY = {
    "Recognizer": "robustface.deploy.recognizer",
    "ModelInfo": "robustface.deploy.recognizer",
    "embed_to_dir": "robustface.deploy.embed",
    "open_inputs": "robustface.deploy.embed",
    "read_embeddings": "robustface.deploy.embed",
    "calibrate": "robustface.deploy.verify",
    "Gallery": "robustface.deploy.gallery",
    "IndexSpec": "robustface.deploy.gallery",
}

__all__ = [
    "ARCFACE_TEMPLATE",
    "ExportReport",
    "OnnxBackbone",
    "align_face",
    "align_faces",
    "arcface_template",
    "export_onnx",
    "similarity_transform",
    "similarity_transforms",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robustface.deploy' has no attribute {name!r}")
