"""The run directory: its layout, reading a run the trainer wrote, clear errors, no import cycle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustface.config import load_config, to_dict
from robustface.errors import ConfigError
from robustface.models.loading import load_backbone
from robustface.train import Trainer
from robustface.train import checkpoint as ckpt
from robustface.utils.run import Checkpoint, RunDir, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paths_follow_the_documented_layout(tmp_path):
    run = RunDir(str(tmp_path))  # a str is accepted and kept as a Path
    assert run.path == tmp_path
    expected = {
        "config_file": "config.yaml",
        "meta_file": "meta.json",
        "metrics_file": "metrics.jsonl",
        "backbone_file": "backbone.pth",
        "best_backbone_file": "best_backbone.pth",
        "verification_report": "verification.md",
        "results_file": "train_results.json",
        "training_plot": "training.png",
        "tensorboard_dir": "tb",
        "checkpoints_dir": "checkpoints",
        "analysis_dir": "analysis",
        "angles_file": "analysis/angles.npz",
        "angles_plot": "analysis/angles.png",
        "center_drift_plot": "analysis/center_drift.png",
        "analysis_summary": "analysis/summary.json",
    }
    assert {name: getattr(run, name) for name in expected} == {
        name: tmp_path / rel for name, rel in expected.items()
    }
    step = Checkpoint.at(tmp_path / "checkpoints", 1234)
    assert step.path == tmp_path / "checkpoints" / "step_00001234"
    assert step.main_file == step.path / "main.pt"
    assert step.rank_file(3) == step.path / "rank3.pt"
    assert step.staging.path.name == "step_00001234.tmp"
    assert step.replaced.path.name == "step_00001234.old"
    assert ckpt.checkpoint_dir(tmp_path / "checkpoints", 1234) == step.path


def test_only_complete_checkpoints_are_listed_oldest_first(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoints() == []
    for name in ("step_00000020", "step_00000003", "step_00000030.tmp", "step_00000040"):
        (run.checkpoints_dir / name).mkdir(parents=True)
    for name in ("step_00000020", "step_00000003", "step_00000030.tmp"):  # 40: no main.pt yet
        (run.checkpoints_dir / name / "main.pt").write_bytes(b"")
    (run.checkpoints_dir / "notes.txt").write_text("")
    names = ["step_00000003", "step_00000020"]
    assert [c.path.name for c in run.checkpoints()] == names
    assert [c.path.name for c in list_checkpoints(run.checkpoints_dir)] == names
    assert [p.name for p in ckpt.list_checkpoints(run.checkpoints_dir)] == names
    assert run.last_checkpoint().path.name == "step_00000020"


def test_missing_files_name_the_file(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_run and not run.is_finished
    for read, name in (
        (run.config, "config.yaml"),
        (run.meta, "meta.json"),
        (run.metrics, "metrics.jsonl"),
        (run.results, "train_results.json"),
        (run.weights_file, "best_backbone.pth or backbone.pth"),
        (run.model_files, "config.yaml, best_backbone.pth or backbone.pth"),
        (run.last_checkpoint, "no complete checkpoint"),
    ):
        with pytest.raises(FileNotFoundError, match=name) as info:
            read()
        assert str(tmp_path) in str(info.value)


def test_config_is_read_through_load_config(tmp_path):
    run = RunDir(tmp_path)
    run.config_file.write_text("model:\n  backbone: r18\n  embeding_size: 64\n")
    with pytest.raises(ConfigError, match=r"embeding_size.*embedding_size"):
        run.config()
    with pytest.raises(ConfigError, match="embeding_size"):  # load_backbone reads it the same way
        load_backbone(tmp_path)


def _tiny_run(out: Path, data: Path):
    return load_config(
        None,
        [
            f"output_dir={out}",
            "seed=5",
            "data.source=rec",
            f"data.path={data}",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.val_targets=[lfw]",
            "model.backbone=r18_tiny",
            "model.input_size=32",
            "model.width=0.125",
            "model.embedding_size=16",
            "head.name=arcface",
            "head.params={scale: 16.0}",
            "train.epochs=1",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.probe_every=2",
            "train.probe_samples=16",
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every=1",
        ],
    )


@pytest.mark.slow
def test_reads_a_run_the_trainer_wrote(synth_train_dir, tmp_path):
    cfg = _tiny_run(tmp_path / "run", synth_train_dir)
    trainer = Trainer(cfg)
    result = trainer.fit()
    run = RunDir(tmp_path / "run")
    assert run.is_run and run.is_finished
    assert to_dict(run.config()) == to_dict(cfg)
    assert run.meta()["seed"] == 5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert run.metrics() == [json.loads(line) for line in lines]
    assert [r["step"] for r in run.metrics() if "loss" in r] == list(range(1, result.steps + 1))
    saved = run.results()
    assert (
        saved["verification"]["lfw"]["accuracy_mean"] == result.verification["lfw"]["accuracy_mean"]
    )
    assert result.backbone_path == run.backbone_file
    assert run.weights_file() == run.best_backbone_file
    assert run.model_files() == [run.config_file, run.best_backbone_file]
    assert run.angles_file.is_file() and run.analysis_summary.is_file()
    assert run.verification_report.is_file()

    last = run.last_checkpoint()
    assert last.path.name == f"step_{result.steps:08d}"
    assert last.main_file.is_file() and last.rank_file(0).is_file()
    assert not last.rank_file(1).exists()
    assert ckpt.load_main(last.path)["world_size"] == 1

    model, size = load_backbone(run.path)
    best = torch.load(run.best_backbone_file, weights_only=True)
    torch.testing.assert_close(model.state_dict(), best)
    assert size == 32


def test_loading_models_imports_no_deploy_evaluate_or_train():
    alone = (
        "import sys\n"
        "from robustface.models.loading import load_backbone\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['robustface', 'deploy'], "
        "['robustface', 'evaluate'], ['robustface', 'train']) or m == 'onnxruntime']\n"
        "assert not bad, bad\n"
    )
    deploy_first = (
        "import robustface.deploy.onnx\nfrom robustface.models.loading import load_backbone\n"
    )
    for code in (alone, deploy_first):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
