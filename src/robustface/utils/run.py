"""The run directory: one owner of its layout, and the metadata every run records.

A training run's directory (``output_dir``) holds::

    config.yaml           the resolved config (read back through load_config)
    meta.json             versions, git revision, seed, command line, start time
    metrics.jsonl         one JSON row per log step / verification / probe
    backbone.pth          the last backbone (bare state dict)
    best_backbone.pth     the backbone of the best mean verification accuracy
    verification.md       the final verification table
    train_results.json    final loss, verification, timing, probe summary (written last)
    training.png          loss and ROC curves (the demo draws it)
    tb/                   TensorBoard events (train.tensorboard)
    analysis/             the angle probe: angles.npz, angles.png, center_drift.png, summary.json
    checkpoints/step_00001234/   main.pt (rank 0's state) and rank{r}.pt per rank

:class:`RunDir` names these paths and reads them (missing files raise ``FileNotFoundError``
naming the file); :class:`Checkpoint` names the files of one checkpoint directory. Every other
module asks them instead of spelling a file name.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import robustface
from robustface.config import Config, load_config, save_config
from robustface.utils.io import write_text_atomic


def git_revision(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout containing ``path`` (default: the package), or None."""
    where = Path(path) if path is not None else Path(robustface.__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(seed: int) -> dict[str, Any]:
    """Versions, git revision, command line and time of the current process."""
    return {
        "robustface": robustface.__version__,
        "git_revision": git_revision(),
        "seed": seed,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    """The files of one checkpoint directory (``checkpoints/step_XXXXXXXX/``, or its ``.tmp``
    twin while it is written): ``main.pt`` from rank 0 and one ``rank{r}.pt`` per rank."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def at(cls, root: str | Path, step: int) -> Checkpoint:
        """The checkpoint taken after optimizer step ``step`` under ``root``."""
        return cls(Path(root) / f"step_{step:08d}")

    @property
    def staging(self) -> Checkpoint:
        """Where the checkpoint is written before it is renamed into place."""
        return Checkpoint(self.path.with_name(self.path.name + ".tmp"))

    @property
    def replaced(self) -> Checkpoint:
        """Where an older checkpoint of the same step waits while a new one takes its place."""
        return Checkpoint(self.path.with_name(self.path.name + ".old"))

    @property
    def main_file(self) -> Path:
        """Rank 0's part: backbone, head, optimizers, schedulers, progress, world size."""
        return self.path / "main.pt"

    def rank_file(self, rank: int) -> Path:
        """Rank ``rank``'s part: its RNG states and its class shard."""
        return self.path / f"rank{rank}.pt"

    @property
    def is_complete(self) -> bool:
        """A published step directory whose ``main.pt`` exists."""
        return _STEP_DIR.match(self.path.name) is not None and self.main_file.is_file()


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (Checkpoint(p) for p in root.iterdir())
    return sorted((c for c in found if c.is_complete), key=lambda c: c.path.name)


@dataclass(frozen=True)
class RunDir:
    """A training run's directory: the paths of its files (see the module docstring) and typed
    readers of them. Readers raise ``FileNotFoundError`` naming the missing file."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def create(cls, path: str | Path, cfg: Any, seed: int) -> RunDir:
        """Create the directory and write ``config.yaml`` (resolved) and ``meta.json``."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config_file)
        write_text_atomic(run.meta_file, json.dumps(run_metadata(seed), indent=2) + "\n")
        return run

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_file(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def backbone_file(self) -> Path:
        """The last backbone."""
        return self.path / "backbone.pth"

    @property
    def best_backbone_file(self) -> Path:
        """The backbone of the best mean verification accuracy."""
        return self.path / "best_backbone.pth"

    @property
    def verification_report(self) -> Path:
        return self.path / "verification.md"

    @property
    def results_file(self) -> Path:
        """``train_results.json``: written last, so its presence marks a finished run."""
        return self.path / "train_results.json"

    @property
    def training_plot(self) -> Path:
        return self.path / "training.png"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def analysis_dir(self) -> Path:
        """The angle probe's output."""
        return self.path / "analysis"

    @property
    def angles_file(self) -> Path:
        """The angle probe's arrays (``analysis/angles.npz``)."""
        return self.analysis_dir / "angles.npz"

    @property
    def angles_plot(self) -> Path:
        return self.analysis_dir / "angles.png"

    @property
    def center_drift_plot(self) -> Path:
        return self.analysis_dir / "center_drift.png"

    @property
    def analysis_summary(self) -> Path:
        return self.analysis_dir / "summary.json"

    @property
    def is_run(self) -> bool:
        """Whether this is a run directory (it has ``config.yaml``)."""
        return self.config_file.is_file()

    @property
    def is_finished(self) -> bool:
        """Whether training wrote ``train_results.json``."""
        return self.results_file.is_file()

    def _require(self, file: Path) -> Path:
        if not file.is_file():
            raise FileNotFoundError(f"{self.path}: no {file.relative_to(self.path)}")
        return file

    def config(self) -> Config:
        """The run's config, read and validated by :func:`robustface.config.load_config`."""
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path}: not a run directory (no config.yaml)")
        return load_config(self.config_file)

    def meta(self) -> dict[str, Any]:
        """``meta.json``: versions, git revision, seed, command line, start time."""
        return json.loads(self._require(self.meta_file).read_text(encoding="utf-8"))

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` in order."""
        text = self._require(self.metrics_file).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def results(self) -> dict[str, Any]:
        """``train_results.json``: final loss, verification, timing, probe summary."""
        return json.loads(self._require(self.results_file).read_text(encoding="utf-8"))

    def weights_file(self) -> Path:
        """The backbone to evaluate: ``best_backbone.pth`` if present, else ``backbone.pth``."""
        weights = self._present_weights()
        if weights is None:
            saved = self.checkpoints()
            hint = (
                f" (an unfinished run: its last checkpoint is {saved[-1].main_file})"
                if saved
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no best_backbone.pth or backbone.pth{hint}")
        return weights

    def _present_weights(self) -> Path | None:
        """``best_backbone.pth`` if present, else ``backbone.pth`` if present, else None."""
        files = (self.best_backbone_file, self.backbone_file)
        return next((file for file in files if file.is_file()), None)

    def model_files(self) -> list[Path]:
        """The files :func:`robustface.models.loading.load_backbone` reads, those present: the
        config and the best backbone, else the last one."""
        weights = self._present_weights()
        files = [p for p in (self.config_file, weights) if p is not None and p.is_file()]
        if not files:
            raise FileNotFoundError(
                f"{self.path}: no config.yaml, best_backbone.pth or backbone.pth"
            )
        return files

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.checkpoints_dir)

    def last_checkpoint(self) -> Checkpoint:
        """The newest complete checkpoint."""
        found = self.checkpoints()
        if not found:
            raise FileNotFoundError(f"{self.checkpoints_dir}: no complete checkpoint")
        return found[-1]
