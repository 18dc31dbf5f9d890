"""The training loop: one process or ``torchrun`` DDP, AMP, exact resume, logging, evaluation.

One optimizer step consumes ``grad_accum`` batches of ``data.batch_size`` per rank::

    embeddings = backbone(images)                       # DDP over ranks
    fc_out = classifier(embeddings, labels)             # cosines of this rank's class shard
    head_out = head(fc_out.cosine, fc_out.labels, ...)  # margin policy -> logits
    loss = mean(distributed_cross_entropy(...) + head_out.extra_loss)

With Partial FC every rank sees the whole (all-gathered) batch, and its loss is the global-batch
mean. Backbone gradients are therefore *summed* over ranks (a DDP communication hook) instead of
averaged: arcface_torch multiplies the gathered gradient by the world size for the same reason.

Exactness: augmentation draws from ``rng([seed, epoch, sample index])``. The sampler's position is
the number of global samples consumed. The checkpoint holds every RNG, optimizer, scheduler and
scaler state. A run stopped after any step and resumed therefore ends with the same weights as a
run that never stopped (same world size; on CPU, bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from robustface.config import Config, check_config, to_dict
from robustface.data import RecordIODataset, TrainTransform, load_bin_images, normalize_images
from robustface.data.loader import BatchWriter, CarryUserErrors, collate, unwrap
from robustface.data.sources import DATA_SOURCES
from robustface.errors import RobustfaceError
from robustface.evaluate.verification import embed_pairs, evaluate
from robustface.fc import build_classifier, distributed_cross_entropy
from robustface.heads import build_head
from robustface.models import BACKBONES, build_backbone
from robustface.train import checkpoint as ckpt
from robustface.train.callbacks import CALLBACK_ORDER, CALLBACKS, Callback
from robustface.train.components import classifier_kwargs, head_params
from robustface.train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from robustface.train.sampler import ResumableSampler
from robustface.train.schedule import warmup_poly
from robustface.utils.io import atomic_path, write_bytes_atomic, write_text_atomic
from robustface.utils.run import RunDir
from robustface.utils.seeding import keyed_first_uniforms, keyed_generators


class NonFiniteLossError(RobustfaceError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainSet(Dataset):
    """A dataset with per-sample, per-epoch deterministic augmentation.

    Sample ``i`` of epoch ``e`` is augmented with ``np.random.default_rng([seed, e, i])``. The
    result therefore depends neither on the worker that loads it nor on when the loader was started.

    With ``open_source`` and non-zero rates, each batch gets RobustFace's on-the-fly label noise
    (:func:`robustface.data.noise.batch_noise`), drawn from ``rng([seed, epoch, *batch indices])``:
    the same batch is corrupted the same way however it is loaded or resumed.
    """

    def __init__(
        self,
        base: Dataset,
        transform: TrainTransform,
        seed: int,
        *,
        num_classes: int = 0,
        batch_noise: tuple[float, float] = (0.0, 0.0),
        open_source: Dataset | None = None,
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.num_classes = num_classes
        self.closed, self.open = batch_noise
        self.open_source = open_source
        if self.open > 0 and open_source is None:
            raise ValueError("batch noise with an open-set rate > 0 needs an open_source dataset")
        if transform.normalize:
            raise ValueError("TrainSet sends uint8 images: its transform needs normalize=False")
        self.batches = BatchWriter()

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _augment(self, image: np.ndarray, index: int) -> torch.Tensor:
        return self.transform(image, rng=self._rng(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self._augment(image, index), label

    def __getitems__(self, indices: list[int]) -> Any:
        """One batch (the DataLoader's batched fetch), with per-batch label noise if configured,
        which :func:`~robustface.data.loader.collate` hands on as ``(images, labels, flips)``:
        the augmented images before their flip, as they are (``NxHxWx3`` uint8, written in place
        into one batch by :class:`BatchWriter`), and whether to flip each (bool), for
        ``normalize_images(images, flips, channels_last=True)`` on the training device. That
        equals ``normalize_images`` of ``self[i]`` stacked for ``i`` in ``indices``."""
        if self.closed == 0 and self.open == 0:
            samples: Iterable[tuple[np.ndarray, int]] = (self.base[i] for i in indices)
        else:
            samples = self._noisy(indices)
        labels = np.empty(len(indices), dtype=np.int64)
        flips = np.empty(len(indices), dtype=bool)
        images = None
        for pos, (index, (image, label), draws) in enumerate(
            zip(indices, samples, self._draws(indices), strict=True)
        ):
            image, flips[pos] = self.transform.augment_unflipped(image, **draws)
            if images is None:
                images = self.batches.start(len(indices), image.shape)
            elif image.shape != images.shape[1:]:
                raise ValueError(
                    f"sample {index} is {image.shape[0]}x{image.shape[1]}, the batch's first "
                    f"{images.shape[1]}x{images.shape[2]}: the images of a batch must share one "
                    "size"
                )
            images[pos] = image
            labels[pos] = label
        return self.batches.finish(labels, flips)

    def _draws(self, indices: list[int]) -> Iterator[dict[str, Any]]:
        """For each index, what :meth:`TrainTransform.augment` draws from in place of
        ``rng=self._rng(i)``, with the same numbers but cheaper: nothing for a transform that
        draws nothing, the flip's one uniform for a flip alone, else one generator (reused) per
        sample."""
        prefix = (self.seed, self.epoch)
        steps = self.transform.random_steps
        if not steps:
            return iter([{}] * len(indices))
        if steps == ("flip",):
            return ({"flip_draw": u} for u in keyed_first_uniforms(prefix, indices))
        return ({"rng": rng} for rng in keyed_generators(prefix, indices))

    def _noisy(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
        """The raw samples at ``indices`` with RobustFace's per-batch label noise applied."""
        from robustface.data.noise import OPEN, batch_noise

        samples = [self.base[i] for i in indices]
        labels = np.array([label for _, label in samples], dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, 0xB47C, *indices])
        kind, new_labels, open_index = batch_noise(
            labels,
            self.closed,
            self.open,
            num_classes=self.num_classes,
            open_pool=len(self.open_source) if self.open_source is not None else 0,  # type: ignore[arg-type]
            rng=rng,
        )
        for pos, (image, _) in enumerate(samples):
            if kind[pos] == OPEN:
                image = self.open_source[int(open_index[pos])][0]  # type: ignore[index]
            samples[pos] = (image, int(new_labels[pos]))
        return samples


@dataclasses.dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    steps: int
    loss: float
    verification: dict[str, dict[str, Any]]
    best: dict[str, Any]
    backbone_path: Path


def _sum_gradients_hook(_state, bucket):  # DDP checks the annotation objects: none here
    """DDP communication hook: all-reduce SUM (Partial FC's loss is the global-batch mean).

    ``bucket`` is a ``dist.GradBucket``; returns a future of the summed gradient buffer.
    """
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states in types ``torch.load(weights_only=True)`` accepts (no numpy)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _restore(out: Path, fresh: bool, before: dict[Path, bytes | None]) -> None:
    """Undo what a failed set-up wrote: the run directory it created, or the ``config.yaml`` and
    ``meta.json`` it replaced in an existing one (``before``: their bytes, None if absent).

    A finished SynthFace render in a new run directory (``data.source: synthface`` without a
    ``data.path``: minutes of work) is kept, alone, for the next try to reuse."""
    if fresh:
        render = out / "synthface"
        if not (render / "synthface.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            return
        for entry in out.iterdir():
            if entry == render:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    for file, data in before.items():
        if data is None:
            file.unlink(missing_ok=True)
        else:
            write_bytes_atomic(file, data)


# what the saved weights and head state are made for: a resumed run must keep them
_ARCHITECTURE_KEYS = (
    ("model", "backbone"),
    ("model", "embedding_size"),
    ("model", "input_size"),
    ("model", "width"),
    ("fc", "name"),
    ("head", "name"),
)


def _own_values(model: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` config section whose unset (None) ``input_size`` / ``width`` are replaced by
    the backbone's own (built on the meta device: allocates nothing), so that leaving a key
    unset and giving its default describe the same model."""
    unset = [k for k in ("input_size", "width") if k in model and model[k] is None]
    if not unset or model.get("backbone") not in BACKBONES:
        return model
    given = {
        k: model[k] for k in ("embedding_size", "input_size", "width") if model.get(k) is not None
    }
    with torch.device("meta"):
        built = build_backbone(model["backbone"], **given)
    own = {"input_size": int(built.meta.input_size), "width": getattr(built, "width", None)}
    return {**model, **{k: own[k] for k in unset}}


def _architecture_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: checkpoint X, config Y`` for each architecture key that differs (none
    when the checkpoint holds no config; a key its config does not hold, from an older version,
    is not compared; an unset ``model.input_size`` / ``width`` is the backbone's own)."""
    saved = {**saved, "model": _own_values(saved.get("model") or {})}
    new = {**new, "model": _own_values(new.get("model") or {})}
    changes = []
    for section, key in _ARCHITECTURE_KEYS:
        held = saved.get(section) or {}
        if key in held and held[key] != new[section].get(key):
            changes.append(
                f"{section}.{key}: checkpoint {held[key]!r}, config {new[section].get(key)!r}"
            )
    return changes


def _shape_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name: checkpoint (a, b), config (c, d)`` for each tensor both state dicts hold with
    another shape (what ``load_state_dict`` would fail on with a traceback)."""
    return [
        f"{name}: checkpoint {tuple(saved[name].shape)}, config {tuple(value.shape)}"
        for name, value in new.items()
        if torch.is_tensor(saved.get(name)) and saved[name].shape != value.shape
    ]


class Trainer:
    """Trains a backbone + classifier + margin head from a :class:`~robustface.config.Config`.

    The components come from their registries (:mod:`robustface.train.components`), the
    training set from ``DATA_SOURCES``; logging, evaluation, probes and checkpoints are
    callbacks (:mod:`robustface.train.callbacks`) called at fixed points of :meth:`fit`. Nothing
    is written before the whole config is valid (``ConfigError``), and a set-up that fails
    afterwards (a data path or verification set not there, a checkpoint of another model to
    resume, Ctrl-C) removes the run directory it created, or puts back the ``config.yaml`` and
    ``meta.json`` it replaced."""

    def __init__(self, cfg: Config, info: DistInfo | None = None) -> None:
        check_config(cfg)  # before anything is written, rendered or initialised
        self.cfg = cfg
        ckpt.refuse_fresh_start(cfg.output_dir, cfg)
        self.info = info or init_distributed(cfg.train.device)
        self.device = self.info.device
        self.out = Path(cfg.output_dir)
        self.run = RunDir(self.out)
        fresh = not self.out.exists()
        files = (self.run.config_file, self.run.meta_file)
        before = {f: f.read_bytes() if f.is_file() else None for f in files}
        if self.info.is_main:
            RunDir.create(self.out, cfg, cfg.seed)
        barrier()
        try:
            self._set_up()
        except BaseException:  # a missing data path, a bad record, Ctrl-C: no half-made run left
            if self.info.is_main:
                _restore(self.out, fresh, before)
            raise

    def _set_up(self) -> None:
        """Everything after the run directory: data, model, optimiser, callbacks, resumption."""
        cfg = self.cfg
        if cfg.train.threads:  # CPU results depend on the thread count: fix it for repeatable runs
            torch.set_num_threads(cfg.train.threads)
        _seed_everything(cfg.seed + self.info.rank)
        self._last_saved = -1
        self._build_data()
        self._build_model()
        self._build_optim()
        self.seconds = {"probes": 0.0, "evaluation": 0.0}  # time spent outside training steps
        self.final_verification: dict[str, dict[str, Any]] = {}  # set by the final evaluation
        self.callbacks: list[Callback] = [CALLBACKS.get(name)(self) for name in CALLBACK_ORDER]
        self.global_step = 0
        self.epoch = 0
        self.consumed = 0  # global samples consumed in the current epoch
        self.best: dict[str, Any] = {}
        self.last_loss = float("nan")
        if cfg.train.resume:
            self._resume(cfg.train.resume)

    # ------------------------------------------------------------------------------------ set-up
    def _build_data(self) -> None:
        cfg, data = self.cfg, self.cfg.data
        val_dir = data.verification_dir(self.out)
        source = DATA_SOURCES.get(data.source)(data, cfg.synth, self.out)
        if self.info.is_main:
            source.prepare(progress=cfg.train.progress)
        barrier()
        base = source.dataset()
        self.base = base
        self.num_classes = int(base.num_classes)
        transform = TrainTransform(
            flip_p=0.5 if data.flip else 0.0,
            resize_down_up=data.resize_down_up,
            blur=data.blur,
            color_jitter=data.color_jitter,
            grayscale=data.grayscale,
            normalize=False,  # workers send uint8 (a quarter of the bytes); see _train_step
        )
        open_source: Dataset | None = None
        if data.batch_noise_open > 0:
            if data.open_source:
                open_source = RecordIODataset(data.open_source)
            else:
                open_source = source.open_set()
        self.trainset = TrainSet(
            base,
            transform,
            cfg.seed,
            num_classes=self.num_classes,
            batch_noise=(data.batch_noise_closed, data.batch_noise_open),
            open_source=open_source,
        )
        self.sampler = ResumableSampler(
            len(base),
            data.batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=cfg.seed,
        )
        self.loader = DataLoader(
            CarryUserErrors(self.trainset),  # a bad record reads as one line with workers too
            batch_size=data.batch_size,
            sampler=self.sampler,
            num_workers=data.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            collate_fn=collate,
            # Iterators draw their worker base seed from this generator, not from the global RNG,
            # so starting an epoch leaves dropout / negative sampling streams untouched (exact
            # resume). Augmentation itself is seeded per sample (TrainSet).
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.val_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.info.is_main and data.val_targets:
            for name in data.val_targets:
                file = (
                    Path(name) if name.endswith(".bin") else (val_dir or Path(".")) / f"{name}.bin"
                )
                if not file.is_file():
                    raise FileNotFoundError(f"data.val_targets: verification set {file} not found")
                self.val_sets[file.stem] = load_bin_images(file)

    def _build_model(self) -> None:
        cfg = self.cfg
        m = cfg.model
        self.backbone = build_backbone(m.backbone, **m.kwargs()).to(self.device)
        # robustface trains on RGB input whatever the published weights of this family expect
        self.backbone.meta = dataclasses.replace(self.backbone.meta, color_order="RGB")
        self.input_size = int(self.backbone.meta.input_size)
        self.trainset.transform.input_size = self.input_size
        fc_kwargs = classifier_kwargs(cfg)[0]
        self.fc = build_classifier(cfg.fc.name, m.embedding_size, self.num_classes, **fc_kwargs).to(
            self.device
        )
        self.sharded = self.fc.sharded
        params = head_params(cfg, self.num_classes, self.fc.class_range)
        self.head = build_head(cfg.head.name, **params)
        self.head.to(self.device)
        self.model: nn.Module = self.backbone
        self.fc_model: nn.Module = self.fc
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.backbone, device_ids=ids)
            if self.sharded:
                self.model.register_comm_hook(None, _sum_gradients_hook)
            else:
                self.fc_model = DistributedDataParallel(self.fc, device_ids=ids)

    def head_stats(self) -> dict[str, float]:
        """The head's :meth:`~robustface.heads.MarginHead.stats` for the log, as ``head_*``."""
        return {f"head_{name}": value for name, value in self.head.stats().items()}

    def _param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        params = [p for p in module.parameters() if p.requires_grad]
        if not self.cfg.optim.no_decay_bn_bias:
            return [{"params": params}]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(
                groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
            )
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)

    def _build_optim(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train.grad_accum={cfg.train.grad_accum} exceeds the "
                f"{self.sampler.batches_per_epoch} "
                "batches of one epoch"
            )
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        warmup = min(round(cfg.optim.warmup_epochs * self.steps_per_epoch), self.total_steps)
        factor = warmup_poly(self.total_steps, warmup, cfg.optim.power)
        body = nn.ModuleList([self.backbone, self.head])
        self.opt_body = self._make_optimizer(self._param_groups(body))
        self.opt_fc = self._make_optimizer(self._param_groups(self.fc))
        self.sched_body = torch.optim.lr_scheduler.LambdaLR(self.opt_body, factor)
        self.sched_fc = torch.optim.lr_scheduler.LambdaLR(self.opt_fc, factor)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            enabled=cfg.train.amp and self.amp_dtype == torch.float16,
            growth_interval=100,
        )

    # ------------------------------------------------------------------------------------- state
    def _main_state(self) -> dict[str, Any]:
        state = {
            "backbone": self.backbone.state_dict(),
            "head": self._head_state(per_class=False),
            "opt_body": self.opt_body.state_dict(),
            "sched_body": self.sched_body.state_dict(),
            "sched_fc": self.sched_fc.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "consumed": self.consumed,
                "best": self.best,
            },
            "config": to_dict(self.cfg),
            "num_classes": self.num_classes,
        }
        for callback in self.callbacks:
            saved = callback.state_dict() if callback.state_key else None
            if saved is not None:
                state[callback.state_key] = saved
        if not self.sharded:
            state["fc"] = self.fc.shard_state(self.opt_fc, {})
        return state

    def _rank_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": _rng_state(self.device)}
        if self.sharded:
            state["fc"] = self.fc.shard_state(self.opt_fc, self._head_state(per_class=True))
        elif self.info.distributed:
            # data-parallel with a replicated classifier: each rank's head statistics follow its
            # own batches (as in the reference code), so each rank keeps its own copy
            state["head"] = self.head.state_dict()
        return state

    def _head_state(self, per_class: bool) -> dict[str, Any]:
        """The head's buffers: per-class ones (``class_buffers``) go with the rank's class shard."""
        rows = set(self.head.class_buffers) if self.sharded else set()
        return {k: v for k, v in self.head.state_dict().items() if (k in rows) == per_class}

    def save(self) -> Path:
        """Write a checkpoint of the current step (all ranks must call this; once per step)."""
        root = self.run.checkpoints_dir
        if self._last_saved == self.global_step:
            return ckpt.checkpoint_dir(root, self.global_step)
        self._last_saved = self.global_step
        main = self._main_state() if self.info.is_main else None
        path = ckpt.save_checkpoint(root, self.global_step, main, self._rank_state(), self.info)
        if self.info.is_main:
            ckpt.prune_checkpoints(root, self.cfg.train.keep_checkpoints)
        return path

    def _resume(self, where: str) -> None:
        if where == "auto":
            found = ckpt.list_checkpoints(self.run.checkpoints_dir) if self.info.is_main else []
            choice = [str(found[-1]) if found else None]
            if self.info.distributed:  # every rank resumes from rank 0's choice
                dist.broadcast_object_list(choice, src=0)
            if choice[0] is None:
                return
            path = Path(choice[0])
        else:
            path = Path(where)
        main = ckpt.load_main(path)
        changed = _architecture_changes(main.get("config", {}), to_dict(self.cfg))
        if changed:
            raise ValueError(
                f"{path}: the checkpoint's model differs from the config's ("
                + "; ".join(changed)
                + "): resume with the run's settings, or choose another output_dir"
            )
        if main["num_classes"] != self.num_classes:
            raise ValueError(
                f"{path}: checkpoint has {main['num_classes']} classes, "
                f"the data has {self.num_classes}"
            )
        resized = [] if self.sharded else _shape_changes(main["fc"]["module"], self.fc.state_dict())
        if resized:  # e.g. another fc.params.k: the classifier's rows are C * k
            raise ValueError(
                f"{path}: the checkpoint's classifier does not fit the config's (fc.name "
                f"{self.cfg.fc.name!r} with its fc.params: "
                + "; ".join(resized)
                + "): resume with the run's settings, or choose another output_dir"
            )
        old_world = int(main["world_size"])
        ranks = ckpt.load_rank_states(path, old_world)
        self.backbone.load_state_dict(main["backbone"])
        head_state = dict(main["head"])
        self.opt_body.load_state_dict(main["opt_body"])
        self.sched_body.load_state_dict(main["sched_body"])
        self.sched_fc.load_state_dict(main["sched_fc"])
        self.scaler.load_state_dict(main["scaler"])
        if self.sharded:
            start, count = self.fc.class_range
            shards = [(r["fc"]["start"], r["fc"]) for r in ranks]
            rows = [r["fc"]["count"] for r in ranks]
            mine = ckpt.rows_from_shards(shards, start, count, rows)
            head_state.update(self.fc.load_shard_state(mine, self.opt_fc))
        else:
            self.fc.load_shard_state(main["fc"], self.opt_fc)
            if old_world == self.info.world_size and "head" in ranks[self.info.rank]:
                head_state = dict(ranks[self.info.rank]["head"])
        self.head.load_state_dict(head_state)
        for callback in self.callbacks:
            if callback.state_key and callback.state_key in main:
                callback.load_state_dict(main[callback.state_key])
        progress = main["progress"]
        self.global_step = progress["global_step"]
        self._last_saved = self.global_step
        self.epoch = progress["epoch"]
        self.consumed = progress["consumed"]
        self.best = progress["best"]
        if old_world == self.info.world_size:
            _set_rng_state(ranks[self.info.rank]["rng"], self.device)
        else:
            # the new global batch may not divide the samples consumed: skip to the next whole one
            per_step = self.sampler.global_batch * self.cfg.train.grad_accum
            self.consumed = -(-self.consumed // per_step) * per_step
            if self.info.is_main:
                print(
                    f"resumed a {old_world}-rank checkpoint on {self.info.world_size} ranks: "
                    "classifier re-sharded, RNG streams restart from the seed, epoch position "
                    f"rounded up to {self.consumed} samples"
                )
        if self.info.is_main:
            print(f"resumed from {path} at step {self.global_step}", flush=True)

    # -------------------------------------------------------------------------------------- loop
    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.train.amp):
            embeddings = self.model(images)
        fc_out = self.fc_model(embeddings.float(), labels)
        head_out = fc_out.apply_head(self.head, step=self.global_step, epoch=self.epoch)
        per_sample = distributed_cross_entropy(head_out.logits, head_out.labels, fc_out.shard)
        if head_out.extra_loss is not None:
            per_sample = per_sample + head_out.extra_loss
        return per_sample.mean()

    def _train_step(self, batches: Any) -> float:
        accum = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            images, labels, flips = unwrap(next(batches))
            images = normalize_images(
                images.to(self.device, non_blocking=True),
                flips.to(self.device, non_blocking=True),
                channels_last=True,
            )
            labels = labels.to(self.device, non_blocking=True)
            loss = self._forward_loss(images, labels)
            self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        mean_loss = all_reduce_mean(total)
        if not torch.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"loss is {mean_loss.item()} at step {self.global_step + 1} (epoch {self.epoch}); "
                f"stopped. The last good checkpoint is in {self.run.checkpoints_dir}"
            )
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.opt_body)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.opt_body)
        self.scaler.step(self.opt_fc)
        self.scaler.update()
        self.opt_body.zero_grad(set_to_none=True)
        self.opt_fc.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # GradScaler skips steps whose fp16 gradients overflow; the schedule still advances
            # per iteration (as arcface_torch's), which PyTorch would warn about.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched_body.step()
            self.sched_fc.step()
        return float(mean_loss)

    @torch.no_grad()
    def evaluate(self, progress: bool = False) -> dict[str, dict[str, Any]]:
        """Verification accuracy on every configured set (rank 0; others return an empty dict).

        With ``progress`` a status line and an embedding bar per set."""
        results: dict[str, dict[str, Any]] = {}
        if not self.info.is_main or not self.val_sets:
            return results
        start = time.perf_counter()
        progress = progress and self.cfg.train.progress
        was_training = self.backbone.training
        self.backbone.eval()
        for i, (name, (images, issame)) in enumerate(self.val_sets.items(), 1):
            if progress:
                self.status(f"verification {i}/{len(self.val_sets)}: {name}, {len(images)} images")
            embeddings, xnorm = embed_pairs(
                images,
                self.backbone,
                batch_size=max(self.cfg.data.batch_size, 64),
                device=self.device,
                input_size=self.input_size,
                show_progress=progress,
            )
            results[name] = {**evaluate(embeddings, issame), "xnorm": xnorm}
        self.backbone.train(was_training)
        self.seconds["evaluation"] += time.perf_counter() - start
        return results

    def status(self, message: str) -> None:
        """A status line on rank 0 when progress is shown (what the run is doing between bars)."""
        if self.info.is_main and self.cfg.train.progress:
            tqdm.write(f"  {message}", file=sys.stderr)

    def _timing(self, started: float, final_start: float) -> dict[str, Any]:
        """Where this session's time went (seconds), and the environment the numbers depend on."""
        now = time.perf_counter()
        return {
            "total_s": round(now - started, 3),
            "probes_s": round(self.seconds["probes"], 3),
            "evaluation_s": round(self.seconds["evaluation"], 3),
            "after_training_s": round(now - final_start, 3),
            **_environment(),
        }

    def _finished_result(self) -> TrainResult:
        """The saved results of a run that had already finished, announced as such."""
        saved = self.run.results()
        if self.info.is_main:
            print(
                f"{self.out} is already complete (step {self.global_step} of {self.total_steps}): "
                f"nothing to train; its results (train_results.json) follow. Use another "
                "output_dir, or raise train.epochs, to train more.",
                flush=True,
            )
        return TrainResult(
            self.out,
            int(saved["steps"]),
            float(saved["loss"]),
            saved.get("verification", {}) if self.info.is_main else {},
            saved.get("best", {}),
            self.run.backbone_file,
        )

    def log(self, row: dict[str, Any]) -> None:
        """Log a metrics row (``step``, ``epoch`` and values): every callback's ``on_log``."""
        for callback in self.callbacks:
            callback.on_log(row)

    def save_backbone(self, path: Path) -> None:
        """Write the backbone's state_dict to ``path`` (atomically)."""
        with atomic_path(path) as tmp:
            torch.save(self.backbone.state_dict(), tmp)

    def _emit(self, event: str) -> None:
        """Call hook ``event`` of every callback, in order."""
        for callback in self.callbacks:
            getattr(callback, event)()

    def fit(self) -> TrainResult:
        """Train until ``train.epochs`` (or ``train.max_steps``); return the results.

        The callbacks run at fixed points (see :mod:`robustface.train.callbacks.base`). A run
        resumed after it had finished (``train_results.json`` written at its last step) trains and
        evaluates nothing: it says so and returns the saved results."""
        cfg, info = self.cfg, self.info
        if self.global_step >= self.total_steps and self.run.is_finished:
            return self._finished_result()
        started = time.perf_counter()
        per_step = self.sampler.global_batch * cfg.train.grad_accum
        try:
            self._emit("on_train_start")
            self.backbone.train()
            self.fc.train()
            self.head.train()
            while self.global_step < self.total_steps and self.epoch < cfg.train.epochs:
                self.sampler.set_epoch(self.epoch, self.consumed)
                self.trainset.epoch = self.epoch
                batches = iter(self.loader)
                while self.consumed + per_step <= self.steps_per_epoch * per_step:
                    if self.global_step >= self.total_steps:
                        break
                    self.last_loss = self._train_step(batches)
                    self.global_step += 1
                    self.consumed += per_step
                    self._emit("on_step_end")
                else:
                    self.epoch += 1
                    self.consumed = 0
                    self._emit("on_epoch_end")
                del batches
            self._emit("on_loop_end")
            final_start = time.perf_counter()
            self._emit("on_train_end")
        finally:
            self._emit("close")
        backbone_path = self.run.backbone_file
        if info.is_main:
            self.save_backbone(backbone_path)
            summary: dict[str, Any] = {
                "steps": self.global_step,
                "loss": self.last_loss,
                "best": self.best,
            }
            for callback in self.callbacks:
                callback.summarize(summary)
            summary["timing"] = self._timing(started, final_start)
            write_text_atomic(self.run.results_file, json.dumps(summary, indent=2) + "\n")
        barrier()
        return TrainResult(
            self.out,
            self.global_step,
            self.last_loss,
            self.final_verification,
            self.best,
            backbone_path,
        )


def _environment() -> dict[str, Any]:
    """What CPU results depend on besides config and seed: PyTorch's version, its CPU thread count
    and the vector instruction set its kernels use."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def train(cfg: Config) -> TrainResult:
    """Train from ``cfg`` (one process, or one rank of a ``torchrun`` job)."""
    started_group = not dist.is_initialized()
    try:
        return Trainer(cfg).fit()
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
