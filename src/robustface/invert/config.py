"""The typed config of an inversion run (``robustface invert run CONFIG --set key=value``).

Loaded with :func:`robustface.config.load_config` (``cls=InvertConfig``): every problem reported at
once, each naming its key. Shipped configs: ``configs/invert_tiny_cpu.yaml`` (a SynthFace tiny
model on a CPU) and ``configs/invert_r50_paper.yaml`` (the ArcFace paper's setting, for a GPU).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = [
    "AugmentConfig",
    "EvalConfig",
    "InvertConfig",
    "LossConfig",
    "OptimizerConfig",
    "TargetConfig",
]


@dataclasses.dataclass
class TargetConfig:
    """What to invert.

    ``kind``: ``class`` (close-set: class centres of the model's trained classifier, which needs a
    run directory), ``embedding`` (open-set: rows of an ``N x d`` ``.npy`` of raw embeddings, or
    of a ``robustface embed`` output directory, its unit rows times their norms), ``image``
    (open-set: an image file or a folder of images, embedded by the inverted model) or ``pairs``
    (open-set: the first image of pairs of a verification ``.bin``; the evaluation then replaces
    that side of each pair by its inversion). ``classes``: the class ids (``class``; empty: the
    first ``count`` classes). ``path``: the ``.npy`` or embed output, image(s) or ``.bin``.
    ``count``: at most this many targets (0: all; ``pairs``: the pairs kept, balanced over the 10
    folds and same / different, so rounded down to a multiple of 20, at least 20).
    """

    kind: Literal["class", "embedding", "image", "pairs"] = "class"
    classes: list[int] = dataclasses.field(default_factory=list)
    path: str | None = None
    count: int = 0

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if self.count < 0:
            problems.append(f"count: must be >= 0 (0 = all), got {self.count}")
        if self.kind != "class" and not self.path:
            problems.append(f"path: required for kind {self.kind!r}")
        if self.kind == "class" and self.path:
            problems.append("path: not used by kind 'class' (the classifier is the model's)")
        if self.classes and self.kind != "class":
            problems.append(f"classes: only for kind 'class', not {self.kind!r}")
        if any(c < 0 for c in self.classes):
            problems.append(f"classes: must be >= 0, got {self.classes}")
        if self.kind == "class" and self.classes and self.count:
            problems.append("count: give classes or count, not both")
        return problems


@dataclasses.dataclass
class LossConfig:
    """The objective: target loss + ``bn_weight`` * BN-statistics prior + image priors.

    ``head`` / ``head_params``: the margin head of the close-set cross-entropy (the ArcFace paper:
    ArcFace). ``open_set``: ``l2`` (squared Euclidean distance of the raw embedding to the target,
    the paper's) or ``cosine`` (``1 - cos``). ``bn_weight``: weight of the BN term (0: off, the
    ablation); ``first_bn_weight``: extra factor on the first BN layer's term (DeepInversion: 10).
    ``tv_weight`` / ``l2_weight``: total variation and pixel L2 norm.
    """

    head: str = "arcface"
    head_params: dict[str, float | int | bool | str] = dataclasses.field(
        default_factory=lambda: {"scale": 64.0, "margin": 0.5}
    )
    open_set: Literal["l2", "cosine"] = "l2"
    bn_weight: float = 0.05
    first_bn_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-4

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid), the head checked against
        the ``HEADS`` registry (built once; a head that needs the training's state is refused)."""
        from robustface.heads import build_head, head_needs

        names = ("bn_weight", "first_bn_weight", "tv_weight", "l2_weight")
        problems = [
            f"{n}: must be >= 0, got {getattr(self, n)}" for n in names if getattr(self, n) < 0
        ]
        try:
            needs = head_needs(self.head)
        except KeyError as err:
            return [*problems, f"head: {err.args[0]}"]
        training_state = sorted({"step", "epoch"} & set(needs.context))
        if needs.classes or training_state:
            what = "per-class state" if needs.classes else f"the training {training_state[0]}"
            return [
                *problems,
                f"head: {self.head!r} depends on {what}; use a head without it "
                "(arcface, cosface, softmax, ...)",
            ]
        try:
            build_head(self.head, **self.head_params)
        except (TypeError, ValueError) as err:
            problems.append(f"head_params: {err}")
        return problems


@dataclasses.dataclass
class OptimizerConfig:
    """Adam on the pixels, cosine learning-rate decay to 0 after a linear warm-up."""

    steps: int = 1000
    lr: float = 0.25
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if self.steps < 1:
            problems.append(f"steps: must be >= 1, got {self.steps}")
        if self.lr <= 0:
            problems.append(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < max(self.steps, 1):
            problems.append(f"warmup_steps: must be in [0, steps), got {self.warmup_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas: must be in [0, 1), got {list(self.betas)}")
        return problems


@dataclasses.dataclass
class AugmentConfig:
    """Per-step augmentation of the whole batch: a random roll by up to ``jitter`` pixels in each
    direction and, with ``flip``, a horizontal flip with probability 1/2."""

    jitter: int = 4
    flip: bool = True

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        return [] if self.jitter >= 0 else [f"jitter: must be >= 0, got {self.jitter}"]


@dataclasses.dataclass
class EvalConfig:
    """How the inversions are scored after the run (see :mod:`robustface.invert.evaluate`).

    ``model``: an independent model (another seed or another head; a run directory trained on
    the same classes for ``class`` targets); without it only the inverted model scores them, which
    says little (it was optimised for exactly that). ``input_size`` / ``embedding_size`` /
    ``width``: its architecture where a ``.pth`` does not determine it (None: inferred; a 32 or
    56 px SynthFace model needs ``input_size``).
    """

    model: str | None = None
    batch_size: int = 64
    input_size: int | None = None
    embedding_size: int | None = None
    width: float | None = None

    def model_kwargs(self) -> dict[str, int | float | None]:
        """``load_backbone``'s architecture arguments for ``model``."""
        return _model_kwargs(self)


def _model_kwargs(section: EvalConfig | InvertConfig) -> dict[str, int | float | None]:
    return {n: getattr(section, n) for n in ("input_size", "embedding_size", "width")}


@dataclasses.dataclass
class InvertConfig:
    """Root config of ``robustface invert run``. ``input_size`` / ``embedding_size`` / ``width``:
    the architecture of ``model`` where a ``.pth`` does not determine it (None: inferred, as
    ``load_backbone`` does; a 32 or 56 px SynthFace model needs ``input_size``)."""

    seed: int = 0
    output_dir: str = "runs/invert"
    model: str = ""
    input_size: int | None = None
    embedding_size: int | None = None
    width: float | None = None
    device: str = "cpu"
    batch_size: int = 16
    progress: bool = True
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if not self.model:
            problems.append("model: required (a run directory or a .pth; --set model=PATH)")
        if not self.output_dir:
            problems.append("output_dir: must not be empty")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        for section, prefix in ((self, ""), (self.eval, "eval.")):
            for name, value in _model_kwargs(section).items():
                if value is not None and value <= 0:
                    problems.append(f"{prefix}{name}: must be > 0, got {value}")
        return problems

    def model_kwargs(self) -> dict[str, int | float | None]:
        """``load_backbone``'s architecture arguments for ``model``."""
        return _model_kwargs(self)
