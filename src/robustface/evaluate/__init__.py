"""Evaluation protocols: 1:1 verification on pair sets (``.bin``), IJB-B/C 1:1 and 1:N,
MegaFace identification and verification, ROC / TAR@FAR, reports."""

from robustface.evaluate.ijb import embed_ijb, identification, score_ijb, write_ijb_report
from robustface.evaluate.megaface import evaluate_megaface
from robustface.evaluate.report import model_fingerprint, write_evaluation
from robustface.evaluate.roc import roc_curve, tar_at_far
from robustface.evaluate.verification import embed_pairs, evaluate, format_results, verify_bin

__all__ = [
    "embed_ijb",
    "embed_pairs",
    "evaluate",
    "evaluate_megaface",
    "format_results",
    "identification",
    "model_fingerprint",
    "roc_curve",
    "score_ijb",
    "tar_at_far",
    "verify_bin",
    "write_evaluation",
    "write_ijb_report",
]
