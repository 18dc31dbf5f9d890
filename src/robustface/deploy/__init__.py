"""Deployment: face alignment from 5 landmarks to the ArcFace crop, ONNX export and models."""

from robustface.deploy.align import (
    ARCFACE_TEMPLATE,
    align_face,
    align_faces,
    arcface_template,
    similarity_transform,
    similarity_transforms,
)
from robustface.deploy.onnx import ExportReport, OnnxBackbone, export_onnx

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
]
