"""The optimisation of model inversion: pixels from noise until the model sees the targets.

A batch of images starts from ``N(0, 1)`` noise (clipped to the valid range) and is optimised with
Adam (cosine learning-rate decay after a linear warm-up) to minimise::

    L = L_target + bn_weight * L_bn + tv_weight * TV + l2_weight * ||x||_2

``L_target`` is a per-sample loss of the embeddings (:class:`ClassTargetLoss`: a margin head's
cross-entropy to a class of the trained classifier; :class:`EmbeddingTargetLoss`: L2 or cosine to a
target embedding), averaged over the batch; the priors are in :mod:`robustface.invert.priors`. At
each step the whole batch is rolled by a random offset of up to ``jitter`` pixels and flipped with
probability 1/2 before the forward pass; after each step the pixels are clipped to ``[-1, 1]``, the
range of ``(x / 255 - 0.5) / 0.5``. The model stays in eval mode with every parameter frozen:
gradients reach only the pixels.

Each batch draws its noise and augmentation from its own generator, seeded from ``(seed, batch
index)``, so the same seed gives the same images on the same device whatever the batch order.
A non-finite loss, gradient or image stops the run with :class:`InversionDivergedError`, which
names the step and carries the last good images of every batch done so far.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from robustface.errors import RobustfaceError
from robustface.fc import Classifier, distributed_cross_entropy
from robustface.heads import MarginHead
from robustface.invert.config import AugmentConfig, LossConfig, OptimizerConfig
from robustface.invert.priors import BNStatistics, pixel_l2, total_variation

__all__ = [
    "PIXEL_RANGE",
    "ClassTargetLoss",
    "EmbeddingTargetLoss",
    "InversionDivergedError",
    "InversionResult",
    "frozen",
    "invert",
    "to_uint8",
]

PIXEL_RANGE = (-1.0, 1.0)
"""The valid input range: RGB pixels normalised as ``(x / 255 - 0.5) / 0.5``."""

LOSS_TERMS = ("loss", "target", "bn", "tv", "l2")
"""The curves recorded per step (``bn`` is 0 when the BN prior is off)."""


class InversionDivergedError(RobustfaceError, FloatingPointError):
    """The loss, the gradient or the images became NaN or infinite at ``step`` of ``batch``;
    ``images`` holds the last good images of every target optimised so far."""

    def __init__(self, message: str, *, step: int, batch: int, images: Tensor) -> None:
        super().__init__(message)
        self.step = step
        self.batch = batch
        self.images = images


class ClassTargetLoss(nn.Module):
    """Close-set target: the cross-entropy of ``head`` on the trained ``classifier``'s cosines,
    per sample, towards the target classes (``labels``)."""

    def __init__(self, classifier: Classifier, head: MarginHead) -> None:
        super().__init__()
        self.classifier = classifier
        self.head = head

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Per-sample loss ``(B,)`` of ``embeddings`` towards classes ``labels``."""
        out = self.classifier(embeddings, labels)
        head_out = out.apply_head(self.head)
        loss = distributed_cross_entropy(head_out.logits, head_out.labels, out.shard)
        return loss if head_out.extra_loss is None else loss + head_out.extra_loss


class EmbeddingTargetLoss(nn.Module):
    """Open-set target: ``l2`` (squared Euclidean distance of the raw embedding to the target, the
    ArcFace paper's loss) or ``cosine`` (``1 - cos``) to rows of ``targets`` (N x d)."""

    def __init__(self, targets: Tensor, kind: str = "l2") -> None:
        super().__init__()
        if kind not in ("l2", "cosine"):
            raise ValueError(f"loss.open_set must be 'l2' or 'cosine', got {kind!r}")
        self.kind = kind
        self.register_buffer("targets", targets.detach().float())

    def forward(self, embeddings: Tensor, index: Tensor) -> Tensor:
        """Per-sample loss ``(B,)`` of ``embeddings`` towards target rows ``index``."""
        target = self.targets[index]
        if self.kind == "l2":
            return (embeddings.float() - target).square().sum(dim=1)
        return 1.0 - F.cosine_similarity(embeddings.float(), target, dim=1)


@dataclass
class InversionResult:
    """Images ``(N x 3 x H x W)`` in ``[-1, 1]`` on the CPU, in target order, and the loss terms
    per step (mean over the batches): ``history[term][step]``."""

    images: Tensor
    history: dict[str, list[float]] = field(default_factory=dict)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with every parameter's ``requires_grad`` off; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def to_uint8(images: Tensor) -> np.ndarray:
    """``N x 3 x H x W`` images in ``[-1, 1]`` as ``N x H x W x 3`` uint8 RGB (rounded)."""
    pixels = ((images.detach().float().cpu().clamp(*PIXEL_RANGE) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _schedule(opt: OptimizerConfig) -> Callable[[int], float]:
    """Learning-rate factor at step ``t``: linear warm-up, then cosine decay to 0."""

    def factor(t: int) -> float:
        if t < opt.warmup_steps:
            return (t + 1) / opt.warmup_steps
        span = max(opt.steps - opt.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (t - opt.warmup_steps) / span))

    return factor


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _augment(x: Tensor, augment: AugmentConfig, gen: torch.Generator) -> Tensor:
    if augment.jitter:
        dy, dx = torch.randint(-augment.jitter, augment.jitter + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if augment.flip and bool(torch.rand((), generator=gen) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _invert_batch(
    model: nn.Module,
    target_loss: nn.Module,
    keys: Tensor,
    input_size: int,
    *,
    loss_cfg: LossConfig,
    optim: OptimizerConfig,
    augment: AugmentConfig,
    gen: torch.Generator,
    bn: BNStatistics | None,
    device: torch.device,
    bar: tqdm,
    batch: int,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Optimise one batch; returns its images (CPU) and its loss terms per step."""
    noise = torch.randn((keys.numel(), 3, input_size, input_size), generator=gen)
    x = noise.clamp(*PIXEL_RANGE).to(device).requires_grad_(True)
    keys = keys.to(device)
    opt = torch.optim.Adam([x], lr=optim.lr, betas=tuple(optim.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(optim))
    history: dict[str, list[float]] = {term: [] for term in LOSS_TERMS}
    last_good = x.detach().cpu().clone()
    zero = torch.zeros((), device=device)
    for step in range(optim.steps):
        opt.zero_grad(set_to_none=True)
        embeddings = model(_augment(x, augment, gen))
        terms = {
            "target": target_loss(embeddings, keys).mean(),
            "bn": bn.loss() if bn is not None else zero,
            "tv": total_variation(x),
            "l2": pixel_l2(x),
        }
        loss = (
            terms["target"]
            + loss_cfg.bn_weight * terms["bn"]
            + loss_cfg.tv_weight * terms["tv"]
            + loss_cfg.l2_weight * terms["l2"]
        )
        problem = None
        if not _finite(loss):
            problem = f"the loss is {float(loss.detach())}"
        else:
            loss.backward()
            if not _finite(x.grad):
                problem = "the gradient of the images is not finite"
            else:
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(*PIXEL_RANGE)
                if not _finite(x):
                    problem = "the images are not finite"
        if problem is not None:
            raise InversionDivergedError(
                f"inversion diverged at step {step} of batch {batch}: {problem}; the last good "
                "images are kept (lower optim.lr or the loss weights)",
                step=step,
                batch=batch,
                images=last_good,
            )
        last_good = x.detach().cpu().clone()
        history["loss"].append(float(loss.detach()))
        for name, value in terms.items():
            history[name].append(float(value.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    return last_good, history


def invert(
    model: nn.Module,
    target_loss: nn.Module,
    keys: Tensor,
    input_size: int,
    *,
    batch_size: int,
    loss: LossConfig,
    optim: OptimizerConfig,
    augment: AugmentConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> InversionResult:
    """Invert ``model`` towards ``len(keys)`` targets, in batches of at most ``batch_size``.

    ``target_loss(embeddings, keys_of_batch)`` gives the per-sample target loss (``keys``: class
    ids for :class:`ClassTargetLoss`, row indices for :class:`EmbeddingTargetLoss`). ``model`` and
    ``target_loss`` are used in eval mode with frozen parameters (restored after). The BN prior
    (``loss.bn_weight > 0``) hooks every BatchNorm layer of ``model`` and raises ``ValueError``
    when it has none. Raises :class:`InversionDivergedError` on NaN/inf (see the module).
    """
    device = torch.device(device)
    keys = torch.as_tensor(keys).long().cpu()
    if keys.dim() != 1 or keys.numel() == 0:
        raise ValueError(f"keys must be a non-empty 1-D tensor, got shape {tuple(keys.shape)}")
    bn = BNStatistics(model, loss.first_bn_weight) if loss.bn_weight > 0 else None
    chunks = torch.arange(keys.numel()).split(batch_size)
    done: list[Tensor] = []
    histories: list[dict[str, list[float]]] = []
    bar = tqdm(total=len(chunks) * optim.steps, desc="inverting", unit="step", disable=not progress)
    with (
        frozen(model),
        frozen(target_loss),
        bn if bn is not None else contextlib.nullcontext(),
        bar,
    ):
        for b, rows in enumerate(chunks):
            try:
                images, history = _invert_batch(
                    model,
                    target_loss,
                    keys[rows],
                    input_size,
                    loss_cfg=loss,
                    optim=optim,
                    augment=augment,
                    gen=_batch_generator(seed, b),
                    bn=bn,
                    device=device,
                    bar=bar,
                    batch=b,
                )
            except InversionDivergedError as exc:
                exc.images = torch.cat([*done, exc.images])
                raise
            done.append(images)
            histories.append(history)
    mean_history = {
        term: np.mean([h[term] for h in histories], axis=0).tolist() for term in LOSS_TERMS
    }
    return InversionResult(torch.cat(done), mean_history)
