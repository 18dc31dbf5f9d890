"""Evaluation protocols: 1:1 verification on pair sets (``.bin``)."""

from robustface.evaluate.verification import embed_pairs, evaluate, format_results, verify_bin

__all__ = ["embed_pairs", "evaluate", "format_results", "verify_bin"]
