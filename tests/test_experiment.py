"""``robustface experiment``: the grid runs, resumes, isolates failures and tabulates correctly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from robustface.cli import main
from robustface.config import load_config
from robustface.errors import ConfigError
from robustface.train.experiment import ExperimentConfig, run_experiment

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "base.synth.identities=6", "base.synth.images_per_identity=6",
    "base.synth.open_set_identities=2", "base.synth.open_set_images_per_identity=5",
    "base.synth.test_identities=20", "base.synth.lfw_pairs=20", "base.synth.cfp_fp_pairs=20",
    "base.synth.lowq_pairs=20", "base.synth.ijb_identities=0", "base.data.batch_size=6",
    "base.data.num_workers=0", "base.model.input_size=32", "base.model.width=0.125",
    "base.model.embedding_size=16", "base.train.max_steps=2", "base.train.probe_every=1",
    "base.train.probe_samples=20", "base.train.progress=false", "seeds=[0, 1]",
    "noise=[clean, C34O34]",
    "methods={arcface: {head.name: arcface, head.params: {scale: 16.0}}, "
    "stable: {head.name: robustface_stable, head.params: {scale: 16.0}}}",
]  # fmt: skip


def _exp(out: Path, *extra: str) -> ExperimentConfig:
    path = REPO / "configs" / "experiment_noise.yaml"
    return load_config(path, [f"output_dir={out}", *TINY, *extra], cls=ExperimentConfig)


def test_grid_tables_resume_and_failures(tmp_path, capsys):
    exp = _exp(tmp_path / "e")
    cells = run_experiment(exp, progress=False)
    assert len(cells) == 8 and all(c.error is None for c in cells)
    out = Path(exp.output_dir)
    noisy = json.loads((out / "data" / "C34O34-s1" / "noise.json").read_text())
    assert noisy["seed"] == 1  # one noisy copy per seed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 * 3  # cells x verification sets
    # summary.csv: mean and sample std over seeds of the per-run average, recomputed by hand
    per_run: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        per_run.setdefault((r["method"], r["noise"]), {}).setdefault(r["seed"], []).append(
            float(r["accuracy"])
        )
    summary = {(r["method"], r["noise"], r["set"]): r for r in csv.DictReader(
        (out / "summary.csv").open())}  # fmt: skip
    for (method, noise), seeds in per_run.items():
        avgs = [float(np.mean(v)) for v in seeds.values()]
        got = summary[(method, noise, "avg")]
        assert float(got["mean"]) == pytest.approx(np.mean(avgs), abs=1e-6)
        assert float(got["std"]) == pytest.approx(np.std(avgs, ddof=1), abs=1e-6)
    # the gap table: (stable_noisy - arc_noisy) / (arc_clean - arc_noisy)
    mean = {k: np.mean([np.mean(v) for v in s.values()]) for k, s in per_run.items()}
    gap = mean[("arcface", "clean")] - mean[("arcface", "C34O34")]
    delta = mean[("stable", "C34O34")] - mean[("arcface", "C34O34")]
    report = (out / "results.md").read_text()
    assert f"{100 * delta:+.2f}" in report
    if gap > 0:
        assert f"{100 * delta / gap:.0f}%" in report
    assert (out / "experiment.png").stat().st_size > 5000
    assert (out / "angles_C34O34.png").stat().st_size > 5000
    capsys.readouterr()

    # a second run trains nothing and rebuilds the same tables
    stamp = (out / "runs" / "arcface" / "clean" / "s0" / "train_results.json").stat().st_mtime_ns
    assert len(run_experiment(exp, progress=False)) == 8
    assert "] arcface on" not in capsys.readouterr().out
    assert (out / "runs/arcface/clean/s0/train_results.json").stat().st_mtime_ns == stamp

    # a failing method loses nothing else; the CLI reports it with exit code 1
    bad = [f"output_dir={out}", *TINY, "methods.broken={head.name: arcface, "
           "head.params: {scale: -1.0}}"]  # fmt: skip
    code = main(["experiment", str(REPO / "configs/experiment_noise.yaml"), "--quiet",
                 *(x for o in bad for x in ("--set", o))])  # fmt: skip
    assert code == 1
    assert (out / "runs" / "broken" / "clean" / "s0" / "FAILED").is_file()
    assert "scale must be finite and > 0" in (out / "runs/broken/clean/s0/FAILED").read_text()
    report = (out / "results.md").read_text()
    assert "## Failed cells" in report and "broken/C34O34/s1" in report
    assert "| stable" in report


def test_bad_experiment_config_names_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path / "x", "noise=[clean, C120]", "seeds=[0, 0]", "reference=cosface")
    text = str(err.value)
    assert "noise:" in text and "seeds:" in text and "reference: 'cosface'" in text
