"""Training log: ``metrics.jsonl``, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import json
import time
from typing import Any

from tqdm import tqdm

from robustface.train.callbacks.base import CALLBACKS, Callback
from robustface.utils.io import write_text_atomic


@CALLBACKS.register("log")
class TrainLog(Callback):
    """Writes every logged row to ``metrics.jsonl`` (and TensorBoard, ``train.tensorboard``) on
    rank 0, shows the progress bar, and logs loss, learning rate, throughput and the head's
    statistics every ``train.log_every`` steps (and at step 1)."""

    def on_train_start(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        self.metrics_file = None
        self.writer = None
        if t.info.is_main:
            self.metrics_file = self._open_metrics()
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(t.run.tensorboard_dir))
        self.per_step = t.sampler.global_batch * cfg.train.grad_accum
        self.bar = tqdm(
            total=t.total_steps,
            initial=t.global_step,
            disable=not (t.info.is_main and cfg.train.progress),
            unit="step",
            dynamic_ncols=True,
        )
        self.t_log, self.n_log = time.perf_counter(), 0

    def _open_metrics(self) -> Any:
        """metrics.jsonl for appending; a resumed run first drops rows logged after its step."""
        t = self.trainer
        path = t.run.metrics_file
        kept = []
        if t.global_step > 0 and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [(ln, json.loads(ln)) for ln in lines if ln]
            rows = [(ln, row) for ln, row in rows if row["step"] <= t.global_step]
            kept = [ln for ln, _ in rows]
            losses = [row["loss"] for _, row in rows if "loss" in row]
            t.last_loss = losses[-1] if losses else t.last_loss  # the loss at resume
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        return path.open("a", encoding="utf-8")

    def on_step_end(self) -> None:
        t = self.trainer
        self.n_log += 1
        self.bar.update(1)
        if t.global_step % t.cfg.train.log_every == 0 or t.global_step == 1:
            rate = self.n_log * self.per_step / max(time.perf_counter() - self.t_log, 1e-9)
            lr = t.sched_body.get_last_lr()[0]
            self.bar.set_postfix(loss=f"{t.last_loss:.3f}", lr=f"{lr:.4f}", img_s=f"{rate:.0f}")
            t.log({"step": t.global_step, "epoch": t.epoch, "loss": t.last_loss, "lr": lr,
                   "samples_per_s": rate, **t.head_stats()})  # fmt: skip
            self.t_log, self.n_log = time.perf_counter(), 0

    def on_loop_end(self) -> None:
        self.bar.close()  # the final steps report themselves

    def on_log(self, row: dict[str, Any]) -> None:
        if self.metrics_file is None:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if hasattr(self, "bar"):
            self.bar.close()
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
