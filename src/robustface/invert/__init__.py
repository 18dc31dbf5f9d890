"""Model inversion: faces from class centres and embeddings, with BN-statistics priors.

ArcFace (TPAMI, sections 3.3 and 4.5) shows that a trained recognition model can be inverted:
images optimised from noise until the model recognises them as a target identity, with the
batch-norm statistics of every layer as the prior that makes them look like faces.

* :mod:`.priors`: the BN-statistics term (forward hooks), total variation, pixel L2.
* :mod:`.inversion`: the optimisation (:func:`invert`), target losses, NaN stop.
* :mod:`.targets`: class / embedding / image / pair targets, the models to invert.
* :mod:`.evaluate`: scores by the inverted and by an independent model.
* :mod:`.run`: ``robustface invert run`` / ``eval``: outputs, plots, ``results.json``.
* :mod:`.config`: the typed config (:class:`InvertConfig`).

Deviations from the papers are listed in docs/inversion.md.
"""

from robustface.invert.config import InvertConfig
from robustface.invert.evaluate import score_inversions
from robustface.invert.inversion import (
    ClassTargetLoss,
    EmbeddingTargetLoss,
    InversionDivergedError,
    InversionResult,
    invert,
)
from robustface.invert.priors import BNStatistics, pixel_l2, total_variation
from robustface.invert.run import rescore, run_inversion
from robustface.invert.targets import build_targets, load_invertible, load_run_classifier

__all__ = [
    "BNStatistics",
    "ClassTargetLoss",
    "EmbeddingTargetLoss",
    "InversionDivergedError",
    "InversionResult",
    "InvertConfig",
    "build_targets",
    "invert",
    "load_invertible",
    "load_run_classifier",
    "pixel_l2",
    "rescore",
    "run_inversion",
    "score_inversions",
    "total_variation",
]
