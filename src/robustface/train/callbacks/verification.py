"""Verification during and after training, and the best backbone by mean accuracy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from robustface.evaluate.verification import format_results
from robustface.train.callbacks.base import CALLBACKS, Callback
from robustface.utils.io import write_text_atomic


@CALLBACKS.register("verification")
class Verification(Callback):
    """Evaluates every ``train.eval_every`` steps and once at the end
    (:meth:`Trainer.evaluate <robustface.train.trainer.Trainer.evaluate>`), logs the accuracies,
    keeps ``best_backbone.pth`` and writes ``verification.md``."""

    def on_step_end(self) -> None:
        t = self.trainer
        if t.cfg.train.eval_every and t.global_step % t.cfg.train.eval_every == 0:
            self._record(t.evaluate())

    def on_train_end(self) -> None:
        t = self.trainer
        t.final_verification = t.evaluate(progress=True)
        self._record(t.final_verification)

    def _record(self, results: dict[str, dict[str, Any]]) -> None:
        if not results:
            return
        t = self.trainer
        mean_acc = float(np.mean([r["accuracy_mean"] for r in results.values()]))
        row = {"step": t.global_step, "epoch": t.epoch, "val_mean_accuracy": mean_acc}
        row.update({f"val_{k}_accuracy": v["accuracy_mean"] for k, v in results.items()})
        t.log(row)
        if mean_acc > t.best.get("val_mean_accuracy", -1.0):
            t.best = {"step": t.global_step, "val_mean_accuracy": mean_acc}
            t.save_backbone(t.run.best_backbone_file)

    def summarize(self, summary: dict[str, Any]) -> None:
        t = self.trainer
        final = t.final_verification
        if final:
            write_text_atomic(t.run.verification_report, format_results(final) + "\n")
        summary["verification"] = {k: _jsonable(v) for k, v in final.items()}


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar and list entries of a verification result (arrays become lists)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, np.ndarray):
            if value.size > 1000:
                continue
            value = value.tolist()
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
