"""Atomic, sharded training checkpoints.

A checkpoint is a directory of the run's ``checkpoints/`` (its file names:
:class:`robustface.utils.run.Checkpoint`) holding rank 0's main file (backbone, head, backbone
optimizer, schedulers, scaler, progress) and one file per rank (its RNG states and its class shard
of the classifier with the shard's optimizer state). The directory is written under a staging name
and renamed when every rank has finished, so a crash
never leaves a checkpoint that looks complete but is not. Class shards are saved per rank, so no
rank ever holds the whole 10M-class weight. Resuming on another world size re-cuts the rows.
All ranks must see the same file system (the usual shared run directory of multi-node training).
Checkpoints hold only tensors, containers, numbers and strings (RNG states included), so they load
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from robustface.config import changes_text, saved_config_changes
from robustface.models.loading import load_weights
from robustface.train.distributed import DistInfo, barrier
from robustface.utils.io import atomic_path
from robustface.utils.run import Checkpoint, RunDir
from robustface.utils.run import list_checkpoints as _list_checkpoints


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after optimizer step ``step``."""
    return Checkpoint.at(root, step).path


def save_checkpoint(
    root: str | Path,
    step: int,
    main_state: dict[str, Any] | None,
    rank_state: dict[str, Any],
    info: DistInfo,
) -> Path:
    """Write this rank's part of checkpoint ``step``; rank 0 adds ``main_state`` and publishes."""
    checkpoint = Checkpoint.at(root, step)
    final, staging, tmp = checkpoint.path, checkpoint.staging, checkpoint.staging.path
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    with atomic_path(staging.rank_file(info.rank)) as path:
        torch.save(rank_state, path)
    if info.is_main:
        with atomic_path(staging.main_file) as path:
            torch.save({**(main_state or {}), "world_size": info.world_size}, path)
    barrier()
    if info.is_main:
        # replace an older checkpoint of this step without a moment where none is complete
        old = checkpoint.replaced.path
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [c.path for c in _list_checkpoints(root)]


def refuse_fresh_start(output_dir: str | Path, cfg: Any, out_name: str = "output_dir") -> None:
    """Raise ``FileExistsError`` if ``output_dir`` holds checkpoints and ``cfg.train.resume`` is
    unset (a fresh start would overwrite them). The message says whether they are this config's
    run (the same command again) or another config's, and then which keys differ; it names the
    directory ``out_name`` (a command's option, e.g. ``--out``)."""
    run = RunDir(output_dir)
    found = _list_checkpoints(run.checkpoints_dir)
    if cfg.train.resume or not found:
        return
    where = f"{run.checkpoints_dir} already holds checkpoints (last {found[-1].path.name})"
    # train.resume aside, and output_dir: the directory it was found in, however spelt
    changes = saved_config_changes(run.config_file, cfg, ignore=("train.resume", "output_dir"))
    if changes is None:
        whose = "of a run whose config.yaml cannot be read"
    elif not changes:
        whose = "of this run (the same config)"
    else:
        whose = f"of a run with another config ({changes_text(changes)})"
    raise FileExistsError(
        f"{where} {whose}; set train.resume=auto to continue it, or choose another {out_name}"
    )


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def load_main(path: str | Path, *, unsafe_legacy_load: bool = False) -> dict[str, Any]:
    """Load rank 0's main file of a checkpoint directory (on the CPU, weights-only: see
    :func:`robustface.models.loading.load_weights` for ``unsafe_legacy_load``)."""
    file = Checkpoint(path).main_file
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no {file.name})")
    return load_weights(file, unsafe_legacy_load=unsafe_legacy_load)


def load_rank_states(
    path: str | Path, world_size: int, *, unsafe_legacy_load: bool = False
) -> list[dict[str, Any]]:
    """Load every rank's file of a checkpoint written by ``world_size`` ranks (memory-mapped,
    weights-only as :func:`load_main`)."""
    states = []
    checkpoint = Checkpoint(path)
    for r in range(world_size):
        file = checkpoint.rank_file(r)
        if not file.is_file():
            raise FileNotFoundError(
                f"{path}: missing {file.name} (checkpoint of {world_size} ranks)"
            )
        states.append(load_weights(file, unsafe_legacy_load=unsafe_legacy_load, mmap=True))
    return states


def rows_from_shards(
    shards: list[tuple[int, Any]], start: int, count: int, rows_of: list[int]
) -> Any:
    """Rows ``[start, start + count)`` of a row-sharded nested structure.

    ``shards`` are ``(shard_start, payload)`` pairs; ``rows_of[i]`` is shard ``i``'s row count.
    Tensors whose first dimension equals their shard's row count are cut and concatenated.
    Everything else (scalars, hyper-parameters, Adam's step counter) comes from the first shard.
    """
    first = shards[0][1]
    if isinstance(first, dict):
        return {
            k: rows_from_shards([(s, p[k]) for s, p in shards], start, count, rows_of)
            for k in first
        }
    if isinstance(first, (list, tuple)):
        items = [
            rows_from_shards([(s, p[i]) for s, p in shards], start, count, rows_of)
            for i in range(len(first))
        ]
        return type(first)(items)
    if isinstance(first, torch.Tensor) and first.ndim >= 1 and first.shape[0] == rows_of[0]:
        pieces = []
        for (s, tensor), n in zip(shards, rows_of, strict=True):
            lo, hi = max(start, s), min(start + count, s + n)
            if lo < hi:
                pieces.append(tensor[lo - s : hi - s])
        return torch.cat(pieces).clone()
    return first


def classifier_weight(path: str | Path, main: dict[str, Any] | None = None) -> torch.Tensor:
    """The whole classifier weight (rows class-major, as the classifier holds them) of the
    checkpoint directory ``path``: from rank 0's main file, or joined from every rank's class
    shard when the classifier was sharded (Partial FC). ``main``: the already loaded main file."""
    main = load_main(path) if main is None else main
    if "fc" in main:
        return main["fc"]["module"]["weight"]
    ranks = load_rank_states(path, int(main["world_size"]))
    shards = sorted(ranks, key=lambda r: int(r["fc"]["start"]))
    return torch.cat([r["fc"]["module"]["weight"] for r in shards])
