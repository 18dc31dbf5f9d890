"""benchmarks/clean_table.py's run cache is keyed by content: a moved output or data directory
reuses its runs, a changed training or validation set retrains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest

import robustface.train
from benchmark_scripts import load_benchmark
from robustface.config import Config
from robustface.utils.run import RunDir
from test_noise import make_rec


class _Trainer:
    """Stands for the trainer: counts its runs and writes a finished run's results."""

    runs: ClassVar[list[str]] = []

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def fit(self) -> None:
        _Trainer.runs.append(self.cfg.output_dir)
        run = RunDir(self.cfg.output_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        results = {"verification": {"lfw": {"accuracy_mean": 0.9}}}
        run.results_file.write_text(json.dumps(results))


def test_moved_cache_is_reused_and_changed_content_retrains(tmp_path, monkeypatch):
    bench = load_benchmark("clean_table")
    monkeypatch.setattr(robustface.train, "Trainer", _Trainer)
    _Trainer.runs = []
    first = tmp_path / "first"
    make_rec(first / "data", [0, 0, 1, 1], 16, seed=0)
    (first / "data" / "lfw.bin").write_bytes(b"pairs")
    cfg = Config()
    cfg.data.val_targets = ["lfw"]

    def train(root: Path) -> dict:
        return bench._train(cfg, root / "data", root / "out" / "s0", root / "data", False)

    assert train(first) == {"accuracy": {"lfw": 0.9}, "seconds": pytest.approx(0, abs=5)}
    assert len(_Trainer.runs) == 1
    assert train(first) and len(_Trainer.runs) == 1  # cached
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    assert train(moved) and len(_Trainer.runs) == 1  # same content elsewhere: cached
    (moved / "data" / "lfw.bin").write_bytes(b"other pairs")
    assert train(moved) and len(_Trainer.runs) == 2  # another validation set: retrained
    make_rec(moved / "data", [0, 1, 1, 1], 16, seed=0)
    assert train(moved) and len(_Trainer.runs) == 3  # other training labels: retrained


def test_cell_written_with_locations_is_still_reused(tmp_path, monkeypatch):
    """A cell.json from before the content-only keys (locations in its config, no validation
    digest) is reused while its validation sets are where it says."""
    bench = load_benchmark("clean_table")
    monkeypatch.setattr(robustface.train, "Trainer", _Trainer)
    _Trainer.runs = []
    make_rec(tmp_path / "data", [0, 0, 1, 1], 16, seed=0)
    (tmp_path / "data" / "lfw.bin").write_bytes(b"pairs")
    cfg = Config()
    cfg.data.val_targets = ["lfw"]
    run = tmp_path / "out" / "s0"
    bench._train(cfg, tmp_path / "data", run, tmp_path / "data", False)
    cell = json.loads((run / "cell.json").read_text())
    del cell["val_digest"]
    cell["config"]["output_dir"] = "old/place"
    cell["config"]["data"].update(path="old/data", val_dir=str(tmp_path / "data"))
    (run / "cell.json").write_text(json.dumps(cell))
    bench._train(cfg, tmp_path / "data", run, tmp_path / "data", False)
    assert len(_Trainer.runs) == 1
