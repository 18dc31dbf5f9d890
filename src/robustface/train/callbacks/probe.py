"""The angle probe: cosines of a fixed, stratified training subset to the class centres."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustface.data import RecordIODataset
from robustface.train.analysis import AngleProbe, probe_groups, select_probe
from robustface.train.callbacks.base import CALLBACKS, Callback

if TYPE_CHECKING:
    from robustface.train.trainer import Trainer


@CALLBACKS.register("probe")
class Probe(Callback):
    """Probes every ``train.probe_every`` steps and once at the end (unless the last step was
    probed), logs the summary, and saves the arrays and plots (``analysis/``) with the results.

    Every rank takes part (a sharded classifier gathers its centres); the probe itself lives on
    rank 0. Its records are checkpointed (``probe``)."""

    state_key = "probe"

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.probe = self._build()
        self.last_step = -1  # on every rank: the final probe is a collective

    def _build(self) -> AngleProbe | None:
        """The probe (rank 0, ``train.probe_every > 0``): a stratified training subset.

        Noise kinds and true labels come from the noise list beside the ``.rec`` (written by
        ``robustface noise``), quality from it or from a SynthFace manifest; without them every
        sample counts as clean.
        """
        t, cfg = self.trainer, self.trainer.cfg
        if not (cfg.train.probe_every and t.info.is_main):
            return None
        from robustface.data.noise import manifest_quality, noise_list_for

        base = t.base
        n = len(base)
        labels = np.asarray(base.labels, dtype=np.int64)
        kind, true, quality = np.zeros(n, np.int8), None, None
        if isinstance(base, RecordIODataset):
            plan = noise_list_for(base.rec_path)
            if plan is not None:
                kind, true, quality = plan.kind, plan.original_label, plan.quality
            else:
                quality = manifest_quality(base.rec_path.parent, n)
        if quality is not None and not np.isfinite(quality[kind == 0]).all():
            quality = None
        groups = probe_groups(kind, quality)
        index = select_probe(groups, cfg.train.probe_samples, cfg.seed)
        images = np.stack([base[int(i)][0] for i in index])
        return AngleProbe(
            images,
            labels[index],
            groups[index],
            true_labels=None if true is None else true[index],
            indices=index,
            input_size=t.input_size,
        )

    def on_step_end(self) -> None:
        every = self.trainer.cfg.train.probe_every
        if every and self.trainer.global_step % every == 0:
            self._run()

    def on_train_end(self) -> None:
        t = self.trainer
        if t.cfg.train.probe_every and self.last_step != t.global_step:
            t.status(f"final angle probe ({len(self.probe or ())} samples)")
            self._run()

    @torch.no_grad()
    def _run(self) -> None:
        """Probe the model at the current step (every rank calls it: sharded centres gather)."""
        t = self.trainer
        self.last_step = t.global_step
        weight = t.fc.class_centres()
        if self.probe is None or weight is None:
            return
        weight = F.normalize(weight.float(), dim=1)
        k = t.fc.centres_per_class

        def cosine_fn(embeddings: Tensor) -> Tensor:
            cos = embeddings.to(weight) @ weight.T
            return cos.view(cos.size(0), -1, k).amax(2)

        was_training = t.backbone.training
        t.backbone.eval()
        start = time.perf_counter()
        try:
            summary = self.probe.record(
                t.global_step,
                lambda x: t.backbone(x.to(t.device)).float(),
                cosine_fn,
                weight.cpu().numpy(),
                k=k,
            )
        finally:
            t.backbone.train(was_training)
            t.seconds["probes"] += time.perf_counter() - start
        t.log({"step": t.global_step, "epoch": t.epoch, **summary})

    def summarize(self, summary: dict[str, Any]) -> None:
        if self.probe is not None and self.probe.records:
            self.trainer.status("saving the angle probe's arrays and plots (analysis/)")
            summary["analysis"] = self.probe.save(self.trainer.out)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.probe is None else self.probe.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.probe is not None:
            self.probe.load_state_dict(state)
