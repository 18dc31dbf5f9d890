"""The names of the files a training run writes in its run directory, in one place.

``config.yaml`` and ``meta.json`` are written by :func:`robustface.utils.run.prepare_run_dir`; the
angle probe's ``analysis/`` by :meth:`robustface.train.analysis.AngleProbe.save`.
"""

from __future__ import annotations

CHECKPOINTS = "checkpoints"  # one sub-directory per saved step (robustface.train.checkpoint)
METRICS = "metrics.jsonl"  # one JSON row per logged step, evaluation and probe
TENSORBOARD = "tb"  # TensorBoard event files (train.tensorboard)
BACKBONE = "backbone.pth"  # the final backbone's state_dict
BEST_BACKBONE = "best_backbone.pth"  # the backbone of the best mean verification accuracy
VERIFICATION = "verification.md"  # the final verification table
RESULTS = "train_results.json"  # steps, loss, best, verification, analysis, timing
