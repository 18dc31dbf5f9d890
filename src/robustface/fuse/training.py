"""Training CAFace on extracted features (:mod:`robustface.fuse.extract`), the published recipe.

``mk-minchul/caface`` (``caface/trainer.py``, ``face_datasets/feature_dataset.py``,
``scripts/run_best_model.sh``), on precomputed features of a frozen backbone:

- **Sets.** One set per training image (its *anchor*) per epoch, in a random order
  (``sets.per_epoch`` takes the first so many anchors of each epoch's order): 32 images of
  the anchor's class (the anchor and 31 drawn with replacement), cut into two halves of 16. Each
  half is made of 1-3 *source* images drawn (with replacement) from those 32, in consecutive runs
  whose lengths are cut at distinct random points in ``1..14`` (so the last run has >= 2), each run
  a random draw (with replacement) of that image's K augmented views. ``sets.size`` and
  ``sets.max_sources`` set 32 and 3 (upstream: ``randint(1, max(16 // 4, 3))``).
- **Centre loss.** ``l(x, y) = mean_b(1 - cos(x_b, y_b))`` (cosine with ``x / (|x| + 1e-5)``)
  against the class centre (the L2-normalised mean unit feature of the class's unaugmented
  images, detached), averaged over four terms: the mean over the even prefixes 2, 4, .., 16 of
  half 1, the same for half 2, the memory-fused half 2 (half 1 fused first, its cluster memory
  carried into half 2) and the whole set of 32 fused at once.
- **Memory loss.** ``l(memory-fused half 2, whole-set fusion)`` with gradients through both.
- ``loss = loss.center_weight * centre + loss.memory_weight * memory`` (both 1 as published).
- AdamW (lr 1e-3, weight decay 5e-4 on every parameter), 10 epochs, lr x0.1 at epochs 6 and 9,
  512 sets a step; the CAFace network in training mode (BatchNorm statistics per call, drop path).

Deliberate deviation from the official code: upstream divides the memory loss by the batch size
once more (``cossim_loss(...) / len(single_aggregated)``, on top of the mean over the batch), which
makes it vanish at batch 512; here it is the batch mean (``loss.memory_scale: mean``), and
``loss.memory_scale: upstream`` restores the extra ``1/B``. The sets' views come from
:mod:`robustface.fuse.extract`, whose augmentations differ (see there).

Outputs (a :class:`~robustface.utils.run.RunDir`): ``config.yaml``, ``meta.json``,
``metrics.jsonl`` (one row per ``train.log_every`` steps and per epoch), ``checkpoints/step_N/``
(model, AdamW, progress and torch RNG: a resumed run ends with the same weights as one that never
stopped, on CPU bit for bit), ``training.png`` (the loss curve) and ``caface.ckpt``: the trained
aggregator in the released checkpoint's layout (``state_dict`` with ``aggregator.*`` and
``center.weight``; ``hyper_parameters`` with the style channels, feature dimension, style blocks
and backbone), which :func:`~robustface.fuse.caface.load_caface_checkpoint` and
``CAFaceAggregator(model=PATH)`` read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from robustface.config import (
    apply_overrides,
    check_config,
    load_config,
    parse_override,
    to_dict,
)
from robustface.errors import DataFormatError
from robustface.fuse.caface import CAFace
from robustface.fuse.extract import CLEAN_FILE, FEATURES_FILE, STYLES_FILE, FusionFeatures
from robustface.train import checkpoint as ckpt
from robustface.train.distributed import DistInfo
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir

__all__ = [
    "FuseTrainConfig",
    "build_sets",
    "caface_loss",
    "class_centers",
    "load_fuse_config",
    "train_caface",
]

_ROW_CHUNK = 4096


@dataclasses.dataclass
class SetsConfig:
    """How a training set is drawn."""

    size: int = 32  # images per set, cut into two halves
    max_sources: int = 3  # each half from 1..max_sources source images
    per_epoch: int | None = None  # sets per epoch (anchors); None: one per image, as published

    def check(self) -> list[str]:
        """Problems with these values."""
        problems = []
        if self.size < 4 or self.size % 2:
            problems.append(f"size: must be even and >= 4, got {self.size}")
        if self.max_sources < 1 or self.max_sources > max(self.size // 2 - 1, 1):
            problems.append(
                f"max_sources: must be in [1, size/2 - 1] = [1, {self.size // 2 - 1}], "
                f"got {self.max_sources}"
            )
        if self.per_epoch is not None and self.per_epoch < 1:
            problems.append(f"per_epoch: must be >= 1 or null, got {self.per_epoch}")
        return problems


@dataclasses.dataclass
class LossConfig:
    """Loss weights and the memory-loss scale (``mean``, or ``upstream``'s extra 1/B)."""

    center_weight: float = 1.0
    memory_weight: float = 1.0
    memory_scale: Literal["mean", "upstream"] = "mean"

    def check(self) -> list[str]:
        """Problems with these values."""
        return [
            f"{name}: must be >= 0, got {getattr(self, name)}"
            for name in ("center_weight", "memory_weight")
            if getattr(self, name) < 0
        ]


@dataclasses.dataclass
class OptimConfig:
    """AdamW with a step schedule: lr x ``gamma`` at each epoch of ``milestones``."""

    lr: float = 1e-3
    weight_decay: float = 5e-4
    milestones: list[int] = dataclasses.field(default_factory=lambda: [6, 9])
    gamma: float = 0.1

    def check(self) -> list[str]:
        """Problems with these values."""
        problems = [] if self.lr > 0 else [f"lr: must be > 0, got {self.lr}"]
        if self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma: must be in (0, 1], got {self.gamma}")
        if any(m < 1 for m in self.milestones):
            problems.append(f"milestones: epochs must be >= 1, got {self.milestones}")
        return problems


@dataclasses.dataclass
class LoopConfig:
    """Epochs, batch, threads, logging and checkpoints."""

    epochs: int = 10
    batch_size: int = 512  # sets per step
    max_steps: int | None = None  # stop early (tests, smoke runs)
    threads: int = 0  # torch CPU threads (0: PyTorch's default); fix it for repeatable runs
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto": the last checkpoint of output_dir; or a checkpoint dir
    progress: bool = True

    def check(self) -> list[str]:
        """Problems with these values."""
        problems = []
        for name in ("epochs", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("threads", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps: must be >= 1 or null, got {self.max_steps}")
        return problems


@dataclasses.dataclass
class FuseTrainConfig:
    """Root config of ``robustface fuse train`` (see configs/fuse/)."""

    features: str = ""  # a directory written by `robustface fuse extract`
    output_dir: str = "runs/caface"
    seed: int = 0
    sets: SetsConfig = dataclasses.field(default_factory=SetsConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)

    def check(self) -> list[str]:
        """Problems with these values."""
        problems = [] if self.features else ["features: give the extracted feature directory"]
        if not self.output_dir:
            problems.append("output_dir: must not be empty")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        return problems


def load_fuse_config(
    config: FuseTrainConfig | Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()
) -> FuseTrainConfig:
    """A checked :class:`FuseTrainConfig` from a config object, a (nested) dict or a YAML file,
    with ``--set``-style ``overrides`` (``"train.epochs=2"``); problems raise ``ConfigError``."""
    if isinstance(config, (str, Path)):
        return load_config(config, overrides, cls=FuseTrainConfig)
    values: dict[str, Any] = {}
    if isinstance(config, Mapping):
        _flatten(config, "", values)
        config = FuseTrainConfig()
    for text in overrides:
        parts, value = parse_override(text)
        values[".".join(parts)] = value
    cfg = apply_overrides(config, values, "config")
    check_config(cfg)
    return cfg


def _flatten(tree: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (sections only; lists stay values)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


# ------------------------------------------------------------------------------------------- data
def class_centers(data: FusionFeatures, progress: bool = False) -> torch.Tensor:
    """``(num_classes, d)`` float32: per class the L2-normalised mean unit feature of its
    unaugmented images (``clean.npy``; rows of classes without images are 0). Reads every file in
    chunks and refuses NaN/inf or zero features and NaN/inf styles, naming the file and row."""
    sums = torch.zeros(data.num_classes, data.dim, dtype=torch.float64)
    rows = range(0, data.num_images, _ROW_CHUNK)
    for start in tqdm(rows, desc="centres", unit="chunk", disable=not progress):
        stop = min(start + _ROW_CHUNK, data.num_images)
        for name, array in ((FEATURES_FILE, data.features), (CLEAN_FILE, data.clean)):
            block = np.asarray(array[start:stop], dtype=np.float32)
            block = block.reshape(stop - start, -1, data.dim)
            _check_rows(data.path / name, block, start, zero=True)
        styles = np.asarray(data.styles[start:stop], dtype=np.float32)
        _check_rows(data.path / STYLES_FILE, styles.reshape(stop - start, -1), start, zero=False)
        clean = torch.from_numpy(np.asarray(data.clean[start:stop], dtype=np.float64))
        unit = clean / clean.norm(dim=1, keepdim=True)
        labels = torch.from_numpy(np.array(data.labels[start:stop], dtype=np.int64))
        sums.index_add_(0, labels, unit)
    norms = sums.norm(dim=1, keepdim=True)
    return (sums / torch.where(norms > 0, norms, 1.0)).float()


def _check_rows(file: Path, block: np.ndarray, start: int, zero: bool) -> None:
    finite = np.isfinite(block).reshape(len(block), -1).all(1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise DataFormatError(file, "NaN or infinite value", row)
    if zero:
        zeros = (block == 0).all(-1).any(-1) if block.ndim == 3 else (block == 0).all(-1)
        if zeros.any():
            raise DataFormatError(file, "zero-norm feature", start + int(np.flatnonzero(zeros)[0]))


class _ClassIndex:
    """The rows of each class, to draw a set's images from the anchor's class."""

    def __init__(self, labels: np.ndarray) -> None:
        self.order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.labels = labels

    def members(self, row: int) -> np.ndarray:
        label = int(self.labels[row])
        return self.order[self.starts[label] : self.starts[label + 1]]


def build_sets(
    index: _ClassIndex | np.ndarray,
    anchors: np.ndarray,
    views: int,
    size: int,
    max_sources: int,
    seed: int,
    epoch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, view)`` int64 arrays ``(len(anchors), size)``: the images and views of one set
    per anchor (module docstring), drawn from ``default_rng([seed, epoch, anchor])``. ``index`` is
    the labels of every row (or their :class:`_ClassIndex`)."""
    index = index if isinstance(index, _ClassIndex) else _ClassIndex(np.asarray(index))
    half = size // 2
    rows = np.empty((len(anchors), size), dtype=np.int64)
    picks = np.empty((len(anchors), size), dtype=np.int64)
    for b, anchor in enumerate(anchors):
        rng = np.random.default_rng([seed, epoch, int(anchor)])
        pool = np.concatenate(([anchor], rng.choice(index.members(int(anchor)), size - 1)))
        position = 0
        for _ in range(2):
            sources = int(rng.integers(1, max_sources + 1))
            chosen = rng.choice(pool, sources)
            cuts = np.sort(rng.choice(half - 2, sources - 1, replace=False) + 1)
            counts = np.diff(np.concatenate(([0], cuts, [half])))
            for source, count in zip(chosen, counts, strict=True):
                rows[b, position : position + count] = source
                picks[b, position : position + count] = rng.integers(0, views, count)
                position += count
    return rows, picks


# ------------------------------------------------------------------------------------------- loss
def _cos_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    y = y / (y.norm(dim=-1, keepdim=True) + 1e-5)
    return (1 - (x * y).sum(-1)).mean()


def caface_loss(
    model: CAFace,
    features: torch.Tensor,
    styles: torch.Tensor,
    centers: torch.Tensor,
    *,
    memory_scale: str = "mean",
) -> dict[str, torch.Tensor]:
    """The published loss of a batch of sets: ``features`` (B, T, d) raw, ``styles``
    (B, T, C, 2), ``centers`` (B, d) of the sets' classes. Returns ``center`` (the mean of the four
    centre terms), ``memory`` (scaled by ``1/B`` more with ``memory_scale="upstream"``) and the
    fused outputs used (module docstring); the caller weights and sums them."""
    half = features.shape[1] // 2
    centers = centers.detach()
    halves = [(features[:, :half], styles[:, :half]), (features[:, half:], styles[:, half:])]
    prefix: list[list[torch.Tensor]] = [[], []]
    for size in range(2, half + 1, 2):  # upstream's order: both halves per prefix size
        for h, (x, s) in enumerate(halves):
            prefix[h].append(_cos_loss(model(x[:, :size], s[:, :size]).fused, centers))
    first = model(*halves[0])
    memory_fused = model(*halves[1], memory=first.memory).fused
    all_fused = model(features, styles).fused
    terms = [
        torch.stack(prefix[0]).mean(),
        torch.stack(prefix[1]).mean(),
        _cos_loss(memory_fused, centers),
        _cos_loss(all_fused, centers),
    ]
    memory = _cos_loss(memory_fused, all_fused)
    if memory_scale == "upstream":
        memory = memory / features.shape[0]
    elif memory_scale != "mean":
        raise ValueError(f"memory_scale must be 'mean' or 'upstream', got {memory_scale!r}")
    return {"center": torch.stack(terms).mean(), "memory": memory}


# ---------------------------------------------------------------------------------------- trainer
def _lr(cfg: FuseTrainConfig, epoch: int) -> float:
    return cfg.optim.lr * cfg.optim.gamma ** sum(epoch >= m for m in cfg.optim.milestones)


def _features_key(data: FusionFeatures) -> dict[str, Any]:
    """What identifies the features a run trains on (a resume must see the same)."""
    meta = data.meta
    return {
        "key": meta["key"],
        "num_images": meta["num_images"],
        "dim": meta["dim"],
        "style_channels": meta["style_channels"],
    }


class _FuseTrainer:
    def __init__(self, cfg: FuseTrainConfig, out_name: str = "output_dir") -> None:
        self.cfg, self.out_name = cfg, out_name
        self.run = RunDir(cfg.output_dir)
        ckpt.refuse_fresh_start(cfg.output_dir, cfg, out_name)
        self.data = FusionFeatures.open(cfg.features)
        if self.data.views < 1 or self.data.num_images < 1:
            raise DataFormatError(self.data.path, "no images or no views")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        self.index = _ClassIndex(np.asarray(self.data.labels))
        self.centers = class_centers(self.data, progress=cfg.train.progress)
        self.model = CAFace(self.data.style_channels, self.data.dim)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.sets_per_epoch = min(cfg.sets.per_epoch or self.data.num_images, self.data.num_images)
        self.steps_per_epoch = -(-self.sets_per_epoch // cfg.train.batch_size)
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.step = self.epoch = self.batch_in_epoch = 0
        self._saved_step = self._logged_step = -1
        self.last: dict[str, float] = {}
        RunDir.create(self.run.path, cfg, cfg.seed)
        if not (cfg.train.resume and self._resume(cfg.train.resume)):
            # a fresh run: drop the rows of one stopped before its first checkpoint
            self.run.metrics_file.unlink(missing_ok=True)

    # state
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch},
            "last": self.last,
            "config": to_dict(self.cfg),
            "features": _features_key(self.data),
        }

    def save(self) -> None:
        """Checkpoint the current step (once per step)."""
        if self._saved_step == self.step:
            return
        self._saved_step = self.step
        info = DistInfo(0, 1, 0, torch.device("cpu"))
        rank = {"rng": {"torch": torch.get_rng_state()}}
        ckpt.save_checkpoint(self.run.checkpoints_dir, self.step, self._state(), rank, info)
        ckpt.prune_checkpoints(self.run.checkpoints_dir, self.cfg.train.keep_checkpoints)

    def _resume(self, where: str) -> bool:
        """Continue from checkpoint ``where`` (``auto``: the last one, if any); whether it did."""
        if where == "auto":
            found = ckpt.list_checkpoints(self.run.checkpoints_dir)
            if not found:
                return False
            path = found[-1]
        else:
            path = Path(where)
        main = ckpt.load_main(path)
        stored = json.loads(json.dumps(main["features"]))
        now = json.loads(json.dumps(_features_key(self.data)))
        if stored != now:
            raise ValueError(
                f"{path}: checkpoint of a run on other features than {self.data.path}; "
                f"train on the same features or choose another {self.out_name}"
            )
        self.model.load_state_dict(main["model"])
        self.optimizer.load_state_dict(main["optimizer"])
        progress = main["progress"]
        self.step, self.epoch, self.batch_in_epoch = (
            progress["step"],
            progress["epoch"],
            progress["batch"],
        )
        self.last = dict(main["last"])
        self._saved_step = self.step
        torch.set_rng_state(ckpt.load_rank_states(path, 1)[0]["rng"]["torch"])
        self._truncate_metrics()
        print(f"resumed from {path} at step {self.step}", flush=True)
        return True

    def _truncate_metrics(self) -> None:
        """Drop the metrics rows logged after the checkpoint resumed from."""
        file = self.run.metrics_file
        if not file.is_file():
            return
        keep = [
            line
            for line in file.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= self.step
        ]
        write_text_atomic(file, "".join(line + "\n" for line in keep))

    def _log(self, row: dict[str, Any]) -> None:
        self._logged_step = row["step"]
        with open(self.run.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # loop
    def _batch(self, anchors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rows, picks = build_sets(
            self.index,
            anchors,
            self.data.views,
            cfg.sets.size,
            cfg.sets.max_sources,
            cfg.seed,
            self.epoch,
        )
        feats = torch.from_numpy(np.asarray(self.data.features[rows, picks], dtype=np.float32))
        styles = torch.from_numpy(np.asarray(self.data.styles[rows, picks], dtype=np.float32))
        labels = torch.from_numpy(np.asarray(self.data.labels[anchors], dtype=np.int64))
        return feats, styles, self.centers[labels]

    def _train_step(self, anchors: np.ndarray) -> dict[str, float]:
        cfg = self.cfg
        feats, styles, centers = self._batch(anchors)
        parts = caface_loss(self.model, feats, styles, centers, memory_scale=cfg.loss.memory_scale)
        loss = cfg.loss.center_weight * parts["center"] + cfg.loss.memory_weight * parts["memory"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: the loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {
            "loss": loss.item(),
            "center_loss": parts["center"].item(),
            "memory_loss": parts["memory"].item(),
        }

    def fit(self) -> Path:
        cfg = self.cfg
        final = self.run.path / "caface.ckpt"
        if self.step >= self.total_steps and final.is_file():
            return final
        self.model.train()
        started = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="caface",
            unit="step",
            disable=not cfg.train.progress,
        )
        first_step = self.step
        with bar:
            while self.step < self.total_steps:
                lr = _lr(cfg, self.epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                order = np.random.default_rng([cfg.seed, self.epoch]).permutation(
                    self.data.num_images
                )[: self.sets_per_epoch]
                while self.batch_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    b = self.batch_in_epoch * cfg.train.batch_size
                    self.last = self._train_step(order[b : b + cfg.train.batch_size])
                    self.step += 1
                    self.batch_in_epoch += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.last['loss']:.4f}")
                    if self.step % cfg.train.log_every == 0:
                        self._log({"step": self.step, "epoch": self.epoch, "lr": lr, **self.last})
                    every = cfg.train.checkpoint_every
                    if every and self.step % every == 0:
                        self.save()
                if self.batch_in_epoch == self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    row = {"step": self.step, "epoch": self.epoch, "event": "epoch_end"}
                    self._log({**row, **self.last})
                    self.save()
        if self.step > first_step and self._logged_step != self.step:  # the last step, once
            self._log({"step": self.step, "epoch": self.epoch, "lr": lr, **self.last})
        self.save()
        self._write_outputs(final, time.perf_counter() - started)
        return final

    def _write_outputs(self, final: Path, seconds: float) -> None:
        state = {f"aggregator.{k}": v for k, v in self.model.state_dict().items()}
        state["center.weight"] = self.centers.clone()
        meta = self.data.meta
        hyper = {
            "aggregator_name": "style_norm_srm",
            "decoder_name": "catv9_g4_conf512_small",
            "use_memory": True,
            "style_channels": self.data.style_channels,
            "feature_dim": self.data.dim,
            "style_blocks": list(meta["key"]["blocks"]),
            "backbone": meta.get("model_path"),
            "backbone_sha256": meta["key"]["model"],
            "features": str(self.data.path.resolve()),
            "steps": self.step,
            "seed": self.cfg.seed,
        }
        with atomic_path(final) as tmp:
            torch.save({"state_dict": state, "hyper_parameters": hyper}, tmp)
        _plot_loss(self.run.metrics_file, self.run.training_plot)
        summary = {"steps": self.step, "seconds": seconds, **self.last, "checkpoint": str(final)}
        write_text_atomic(self.run.results_file, json.dumps(summary, indent=2) + "\n")


def _plot_loss(metrics: Path, out: Path) -> None:
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if "event" not in r]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "center_loss", "memory_loss"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("CAFace training")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)


def train_caface(
    config: FuseTrainConfig | Mapping[str, Any] | str | Path,
    out_dir: str | Path | None = None,
    *,
    out_name: str = "output_dir",
) -> Path:
    """Train CAFace from ``config`` (a :class:`FuseTrainConfig`, a dict or a YAML file) into
    ``out_dir`` (default: ``config.output_dir``); return the path of ``caface.ckpt``. Refusals
    and notes name that directory ``out_name`` (``fuse train`` passes its option, ``--out``)."""
    cfg = load_fuse_config(config)
    if out_dir is not None:
        cfg = dataclasses.replace(cfg, output_dir=str(out_dir))
    final = _completed_run(cfg)
    if final is not None:
        print(
            f"{cfg.output_dir} is already complete (caface.ckpt of this config): nothing to "
            f"train. Use another {out_name}, or raise train.epochs with train.resume=auto, to "
            "train more.",
            flush=True,
        )
        return final
    return _FuseTrainer(cfg, out_name).fit()


def _completed_run(cfg: FuseTrainConfig) -> Path | None:
    """``caface.ckpt`` of ``cfg.output_dir`` when it is the finished run of this very config
    (its last checkpoint's config equal but for ``train.progress`` and ``train.resume``, and
    its features the same)."""
    run = RunDir(cfg.output_dir)
    final = run.path / "caface.ckpt"
    found = ckpt.list_checkpoints(run.checkpoints_dir)
    if not final.is_file() or not found:
        return None

    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(json.dumps(config))
        for key in ("progress", "resume"):
            config.get("train", {}).pop(key, None)
        return config

    main = ckpt.load_main(found[-1])
    stored = main.get("config")
    if not isinstance(stored, dict) or comparable(stored) != comparable(to_dict(cfg)):
        return None
    features = json.loads(json.dumps(_features_key(FusionFeatures.open(cfg.features))))
    return final if json.loads(json.dumps(main.get("features"))) == features else None
