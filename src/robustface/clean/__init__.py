"""Cleaning noisy training sets: the dirty SynthFace set with its truth (:mod:`.dirty`),
per-sample scores and flags (:mod:`.score`), their evaluation against the truth (:mod:`.evaluate`),
the train / score / clean loop (:mod:`.loop`) and Sub-center ArcFace's drop step
(:mod:`.subcenter`)."""

from robustface.clean.dirty import (
    DIRTY_PRESETS,
    TRUTH_KINDS,
    DirtySpec,
    Truth,
    load_truth,
    make_dirty_synthface,
    truth_from_noise,
)
from robustface.clean.evaluate import evaluate_flags, evaluation_table
from robustface.clean.loop import CleanConfig, clean_loop, clean_round
from robustface.clean.score import (
    FLAGS,
    Scores,
    Thresholds,
    choose_thresholds,
    compute_scores,
    flag_samples,
    merge_candidates,
    score_to_dir,
    score_training_set,
    split_candidates,
)
from robustface.clean.subcenter import (
    DropReport,
    DropResult,
    dominant_subcenter,
    drop_decisions,
    embed_dataset,
    embed_images,
    subcenter_assignments,
    subcenter_drop,
)

__all__ = [
    "DIRTY_PRESETS",
    "FLAGS",
    "TRUTH_KINDS",
    "CleanConfig",
    "DirtySpec",
    "DropReport",
    "DropResult",
    "Scores",
    "Thresholds",
    "Truth",
    "choose_thresholds",
    "clean_loop",
    "clean_round",
    "compute_scores",
    "dominant_subcenter",
    "drop_decisions",
    "embed_dataset",
    "embed_images",
    "evaluate_flags",
    "evaluation_table",
    "flag_samples",
    "load_truth",
    "make_dirty_synthface",
    "merge_candidates",
    "score_to_dir",
    "score_training_set",
    "split_candidates",
    "subcenter_assignments",
    "subcenter_drop",
    "truth_from_noise",
]
