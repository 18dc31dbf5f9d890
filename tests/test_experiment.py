"""``robustface experiment``: the grid runs, resumes, isolates failures and tabulates correctly."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from robustface.cli import main
from robustface.config import load_config
from robustface.errors import ConfigError
from robustface.train.experiment import (
    CellResult,
    ExperimentConfig,
    cell_config,
    run_experiment,
    summarize,
)

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


@pytest.mark.slow
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

    # a finished cell is never reused for another config
    with pytest.raises(ValueError, match="trained with another config"):
        run_experiment(_exp(tmp_path / "e", "base.optim.lr=0.2"), progress=False)

    # a failing method loses nothing else; the CLI reports it with exit code 1
    bad = [f"output_dir={out}", *TINY, "methods.broken={head.name: arcface, "
           "head.params: {scale: -1.0}}"]  # fmt: skip
    code = main(["experiment", str(REPO / "configs/experiment_noise.yaml"), "--quiet",
                 *(x for o in bad for x in ("--set", o))])  # fmt: skip
    assert code == 1
    assert (out / "runs" / "broken" / "clean" / "s0" / "FAILED").is_file()
    failure = (out / "runs/broken/clean/s0/FAILED").read_text()
    assert "head.params: scale must be > 0.0, got -1.0" in failure
    report = (out / "results.md").read_text()
    assert "## Failed cells" in report and "broken/C34O34/s1" in report
    assert "| stable" in report


def test_bad_experiment_config_names_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path / "x", "noise=[clean, C120]", "seeds=[0, 0]", "reference=cosface")
    text = str(err.value)
    assert "noise:" in text and "seeds:" in text and "reference: 'cosface'" in text


def test_summarize_against_a_hand_computation(tmp_path):
    exp = _exp(tmp_path / "s", "seeds=[0, 1]")
    acc = {  # (method, noise, seed) -> accuracy on the three sets
        ("arcface", "clean", 0): (0.90, 0.80, 0.70), ("arcface", "clean", 1): (0.92, 0.82, 0.72),
        ("arcface", "C34O34", 0): (0.70, 0.60, 0.50), ("arcface", "C34O34", 1): (0.74, 0.64, 0.54),
        ("stable", "clean", 0): (0.91, 0.81, 0.71), ("stable", "clean", 1): (0.91, 0.81, 0.71),
        ("stable", "C34O34", 0): (0.85, 0.75, 0.65), ("stable", "C34O34", 1): (0.81, 0.71, 0.61),
    }  # fmt: skip
    cells = [CellResult(m, n, s, dict(zip(["cfp_fp", "lfw", "lowq"], a, strict=True)))
             for (m, n, s), a in acc.items()]  # fmt: skip
    out = summarize(exp, cells)
    # arcface: clean avg 0.81 (0.80, 0.82), noisy 0.62 (0.60, 0.64); stable noisy 0.73 (0.75, 0.71)
    gap, delta = 0.81 - 0.62, 0.73 - 0.62
    spread = math.hypot(np.std([0.75, 0.71], ddof=1), np.std([0.60, 0.64], ddof=1))
    got = out["gaps"]["stable/C34O34"]
    assert got["delta"] == pytest.approx(delta)
    assert got["gap_closed"] == pytest.approx(delta / gap)
    assert got["z"] == pytest.approx(delta / spread)
    assert out["gaps"]["arcface/C34O34"]["delta"] == pytest.approx(0.0, abs=1e-12)
    report = (Path(exp.output_dir) / "results.md").read_text()
    assert "| stable  | 83.00 ± 2.83 | 73.00 ± 2.83 | 63.00 ± 2.83 | 73.00 ± 2.83 | 2 |" in report
    assert f"{100 * delta / gap:.0f}%" in report


def test_cell_config_of_the_batch_protocol(tmp_path):
    exp = _exp(tmp_path / "b", "protocol=batch")
    cfg = cell_config(exp, "stable", "C34O34", 1, tmp_path / "b" / "synthface")
    assert (cfg.data.batch_noise_closed, cfg.data.batch_noise_open) == (0.34, 0.34)
    assert cfg.data.open_source == str(tmp_path / "b" / "synthface" / "open_set")
    assert cfg.head.name == "robustface_stable" and cfg.seed == 1
    assert cfg.output_dir == str(tmp_path / "b" / "runs" / "stable" / "C34O34" / "s1")


def test_cell_config_check_reads_configs_written_before_fc_params(tmp_path):
    """A finished cell whose config.yaml has the old fc layout (sample_rate and k written for
    every classifier) is the same config when it builds the same classifier."""
    import yaml

    from robustface.config import to_dict
    from robustface.train.experiment import _check_same_config, cell_config

    exp = load_config(REPO / "configs" / "experiment_noise.yaml", cls=ExperimentConfig)
    noise, seed = exp.noise[0], exp.seeds[0]
    for method in ("arcface", "subcenter_arcface"):
        old = to_dict(cell_config(exp, method, noise, seed, tmp_path))
        params = old["fc"].pop("params")
        old["fc"] = {"name": old["fc"]["name"], "sample_rate": 1.0, "k": params.get("k", 3)}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
        _check_same_config(tmp_path, exp, method, noise, seed)  # the same classifier
    old["fc"]["k"] = 5  # subcenter_arcface with other sub-centers per class
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ValueError, match="trained with another config"):
        _check_same_config(tmp_path, exp, "subcenter_arcface", noise, seed)
