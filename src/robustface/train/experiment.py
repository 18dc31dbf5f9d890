"""``robustface experiment``: a grid of runs (methods x noise settings x seeds) on SynthFace.

Layout of ``output_dir``::

    synthface/                      the benchmark, built once from ``base.synth``
    data/<noise>-s<seed>/           noisy training sets (``robustface.data.noise``), one per seed
    runs/<method>/<noise>/s<seed>/  one training run per cell (its own config, metrics, analysis)
    results.md  results.csv  summary.csv  experiment.png  angles_<noise>.png (first seed)

Cells are independent and resumable: a finished cell (its run directory's results written:
:attr:`robustface.utils.run.RunDir.is_finished`) is skipped, an interrupted one resumes from its
last checkpoint, and a failed one writes ``FAILED`` (the traceback) and the grid goes on.
Re-running the same command completes what is missing and rebuilds the tables from every
finished cell.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from robustface.config import Config, apply_overrides, save_config, to_dict
from robustface.train.analysis import plot_run_angles
from robustface.utils.io import write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

__all__ = ["CellResult", "ExperimentConfig", "gap_closed", "run_experiment", "summarize"]


@dataclasses.dataclass
class ExperimentConfig:
    """A grid of runs: each method's overrides applied to ``base``, on each noise setting and seed.

    ``methods`` maps a row name to dotted overrides of ``base`` (``{"head.name": "cosface"}``).
    ``noise`` names settings of :data:`robustface.data.noise.NOISE_SETTINGS` (or ``C15O5``-style).
    ``protocol``: ``static`` writes one noisy copy of the training set per (setting, seed), the
    BoundaryFace protocol; ``batch`` corrupts every batch on the fly, RobustFace's protocol.
    ``reference``: the method whose clean-vs-noisy gap the report measures the others against.
    """

    output_dir: str = "runs/experiment"
    base: Config = dataclasses.field(default_factory=Config)
    methods: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: {"arcface": {"head.name": "arcface"}}
    )
    noise: list[str] = dataclasses.field(default_factory=lambda: ["clean", "MS1MCON-0.20"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    protocol: Literal["static", "batch"] = "static"
    reference: str = "arcface"

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        from robustface.data.noise import parse_noise_setting

        problems = []
        if not self.methods:
            problems.append("methods: at least one method is needed")
        for name in self.methods:
            if not name or "/" in name:
                problems.append(f"methods: {name!r} is not a usable directory name")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: need distinct seeds, got {self.seeds}")
        if any(s < 0 for s in self.seeds):
            problems.append(f"seeds: must be >= 0, got {self.seeds}")
        if not self.noise or len(set(self.noise)) != len(self.noise):
            problems.append(f"noise: need distinct settings, got {self.noise}")
        for name in self.noise:
            try:
                parse_noise_setting(name)
            except ValueError as exc:
                problems.append(f"noise: {exc}")
        if self.reference not in self.methods:
            problems.append(
                f"reference: {self.reference!r} is not one of methods {list(self.methods)}"
            )
        if self.base.data.source != "synthface":
            problems.append("base.data.source: the experiment generates its data: use synthface")
        return problems


@dataclasses.dataclass
class CellResult:
    """One finished (or failed) cell of the grid."""

    method: str
    noise: str
    seed: int
    accuracy: dict[str, float]  # verification set -> accuracy (0..1)
    seconds: float | None = None
    analysis: dict[str, Any] | None = None
    error: str | None = None


def _cell_dir(out: Path, method: str, noise: str, seed: int) -> Path:
    return out / "runs" / method / noise / f"s{seed}"


def cell_config(exp: ExperimentConfig, method: str, noise: str, seed: int, data: Path) -> Config:
    """The training config of one cell (``data``: the training set directory)."""
    from robustface.data.noise import parse_noise_setting

    cfg = apply_overrides(exp.base, exp.methods[method], f"methods.{method}")
    overrides: dict[str, Any] = {
        "seed": seed,
        "output_dir": str(_cell_dir(Path(exp.output_dir), method, noise, seed)),
        "data.source": "rec",
        "data.path": str(data),
        "data.val_dir": str(Path(exp.output_dir) / "synthface"),
        "train.resume": "auto",
    }
    if exp.protocol == "batch":
        closed, open_ = parse_noise_setting(noise)
        overrides["data.batch_noise_closed"] = closed
        overrides["data.batch_noise_open"] = open_
        overrides["data.open_source"] = str(Path(exp.output_dir) / "synthface" / "open_set")
    return apply_overrides(cfg, overrides, f"cell {method}/{noise}/s{seed}")


def _training_set(exp: ExperimentConfig, noise: str, seed: int, progress: bool) -> Path:
    """The (noisy) training set of a cell, written on first use."""
    from robustface.data.noise import inject_noise, parse_noise_setting

    out = Path(exp.output_dir)
    synth = out / "synthface"
    if exp.protocol == "batch" or parse_noise_setting(noise) == (0.0, 0.0):
        return synth
    path = out / "data" / f"{noise}-s{seed}"
    if not (path / "noise.json").is_file():
        inject_noise(synth, path, noise, seed=seed, overwrite=True, progress=progress)
    return path


def _read_cell(run: Path, method: str, noise: str, seed: int) -> CellResult | None:
    if (run / "FAILED").is_file():
        return CellResult(method, noise, seed, {}, error=(run / "FAILED").read_text()[-2000:])
    if not RunDir(run).is_finished:
        return None
    data = RunDir(run).results()
    accuracy = {k: float(v["accuracy_mean"]) for k, v in data.get("verification", {}).items()}
    return CellResult(
        method, noise, seed, accuracy, data.get("seconds"), data.get("analysis"), None
    )


def run_experiment(
    exp: ExperimentConfig, *, progress: bool = True, retry_failed: bool = False
) -> list[CellResult]:
    """Run every missing cell of the grid, then write the tables and plots; return all cells."""
    from robustface.data.synth.builder import ensure_synthface
    from robustface.train.trainer import Trainer

    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(exp, out / "experiment.yaml")
    _, built = ensure_synthface(out / "synthface", exp.base.synth, progress=progress)
    if built is not None and (out / "data").exists():
        shutil.rmtree(out / "data")  # noisy copies of a previous benchmark

    cells = [(m, n, s) for n in exp.noise for s in exp.seeds for m in exp.methods]
    results: list[CellResult] = []
    for i, (method, noise, seed) in enumerate(cells, 1):
        run = _cell_dir(out, method, noise, seed)
        if retry_failed and (run / "FAILED").is_file():
            (run / "FAILED").unlink()
        done = _read_cell(run, method, noise, seed)
        if done is not None:
            _check_same_config(run, exp, method, noise, seed)
            results.append(done)
            continue
        print(f"[{i}/{len(cells)}] {method} on {noise}, seed {seed} -> {run}", flush=True)
        start = time.perf_counter()
        try:
            data = _training_set(exp, noise, seed, progress)
            cfg = cell_config(exp, method, noise, seed, data)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
            Trainer(cfg).fit()
            _add_seconds(RunDir(run), time.perf_counter() - start)
        except KeyboardInterrupt:
            raise
        except Exception:  # a failed cell must not lose the others
            run.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run / "FAILED", traceback.format_exc())
            print(f"      FAILED (traceback in {run / 'FAILED'}); going on", flush=True)
        cell = _read_cell(run, method, noise, seed)
        if cell is not None:
            results.append(cell)
    summarize(exp, results)
    return results


def _check_same_config(
    run: Path, exp: ExperimentConfig, method: str, noise: str, seed: int
) -> None:
    """Refuse to reuse a finished cell that was trained from another config."""
    if not RunDir(run).is_run:
        return
    want_cfg = cell_config(exp, method, noise, seed, Path("."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        have_cfg = RunDir(run).config()
    want, have = to_dict(want_cfg), to_dict(have_cfg)
    for section in (want, have):  # where the data lives and progress display do not matter
        section["data"].pop("path", None)
        section["train"].pop("progress", None)
    # the classifier as built: fc.params and the deprecated fc.k / fc.sample_rate (which older
    # versions wrote for every classifier) compare equal when they build the same classifier
    want["fc"], have["fc"] = _classifier(want_cfg), _classifier(have_cfg)
    if want != have:
        raise ValueError(
            f"{run} was trained with another config than this experiment's cell "
            f"{method}/{noise}/s{seed}; use a new output_dir, or delete {run} to rerun it"
        )


def _classifier(cfg: Config) -> dict[str, Any]:
    """The classifier's name and every parameter it is built with."""
    from robustface.train.components import classifier_settings

    return {"name": cfg.fc.name, "params": classifier_settings(cfg)}


def _add_seconds(run: RunDir, seconds: float) -> None:
    data = run.results()
    data["seconds"] = round(seconds, 1)
    write_text_atomic(run.results_file, json.dumps(data, indent=2) + "\n")


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _pm(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _stats(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def gap_closed(accuracy: float, ref_noisy: float, ref_clean: float) -> float:
    """Share of the reference's clean-vs-noisy gap that ``accuracy`` (on the noisy labels) closes:
    ``(accuracy - ref_noisy) / (ref_clean - ref_noisy)``; NaN when there is no gap (clean <= noisy).
    0 is the reference's own noisy accuracy, 1 its clean-label accuracy."""
    gap = ref_clean - ref_noisy
    return (accuracy - ref_noisy) / gap if gap > 0 else float("nan")


def summarize(exp: ExperimentConfig, results: Sequence[CellResult]) -> dict[str, Any]:
    """Write results.md / results.csv / summary.csv / plots from ``results``; return the summary.

    Accuracy columns are the verification sets and their average (per run, then over seeds:
    mean ± sample std). The gap table measures each method on each noisy setting against the
    reference method: ``closed = (acc - ref_noisy) / (ref_clean - ref_noisy)``, and the
    improvement in units of the seed spread, ``z = (acc - ref_noisy) / sqrt(s_m^2 + s_ref^2)``.
    """
    out = Path(exp.output_dir)
    ok = [r for r in results if r.error is None and r.accuracy]
    sets = sorted({name for r in ok for name in r.accuracy})
    avg: dict[tuple[str, str], list[float]] = {}
    per_set: dict[tuple[str, str, str], list[float]] = {}
    for r in ok:
        avg.setdefault((r.method, r.noise), []).append(float(np.mean(list(r.accuracy.values()))))
        for name, acc in r.accuracy.items():
            per_set.setdefault((r.method, r.noise, name), []).append(acc)

    sections = [f"# Experiment: {len(exp.methods)} methods x {len(exp.noise)} noise settings x "
                f"{len(exp.seeds)} seeds ({exp.protocol} noise)\n\nVerification accuracy (%), "
                "mean ± sample std over seeds (n = seeds that finished)."]  # fmt: skip
    headers = ["method", *sets, "avg", "n"]
    for noise in exp.noise:
        rows = []
        for method in exp.methods:
            vals = avg.get((method, noise), [])
            rows.append([method, *(_pm(per_set.get((method, noise, s), [])) for s in sets),
                         _pm(vals), len(vals)])  # fmt: skip
        sections.append(f"## {noise}\n\n" + markdown_table(headers, rows))

    gap_rows, gaps = [], {}
    clean = [n for n in exp.noise if _is_clean(n)]
    ref = exp.reference
    if clean and avg.get((ref, clean[0])):
        ref_clean, _ = _stats(avg[(ref, clean[0])])
        for noise in exp.noise:
            if _is_clean(noise) or not avg.get((ref, noise)):
                continue
            ref_noisy, ref_std = _stats(avg[(ref, noise)])
            for method in exp.methods:
                vals = avg.get((method, noise))
                if not vals:
                    continue
                mean, std = _stats(vals)
                delta = mean - ref_noisy
                spread = math.hypot(std, ref_std)
                closed = gap_closed(mean, ref_noisy, ref_clean)
                z = delta / spread if spread > 0 else float("nan")
                gaps[f"{method}/{noise}"] = {"delta": delta, "gap_closed": closed, "z": z}
                gap_rows.append([method, noise, f"{100 * delta:+.2f}", f"{100 * closed:.0f}%",
                                 f"{z:+.1f}"])  # fmt: skip
        if gap_rows:
            sections.append(
                f"## Gap closed\n\nPer method and noisy setting: the gain over {ref} on the same "
                f"noise (points of average accuracy), the share of {ref}'s clean-vs-noisy gap it "
                "closes, and the gain in units of the seed spread (z).\n\n"
                + markdown_table(["method", "noise", "gain", "gap closed", "z"], gap_rows)
            )
    failed = [r for r in results if r.error is not None]
    if failed:
        sections.append("## Failed cells\n\n" + "\n".join(
            f"- {r.method}/{r.noise}/s{r.seed}: {r.error.strip().splitlines()[-1]}" for r in failed
        ))  # fmt: skip
    report = "\n\n".join(sections) + "\n"
    write_text_atomic(out / "results.md", report)
    _write_csv(out / "results.csv", ["method", "noise", "seed", "set", "accuracy", "seconds"],
               [[r.method, r.noise, r.seed, s, f"{a:.6f}", r.seconds] for r in ok
                for s, a in sorted(r.accuracy.items())])  # fmt: skip
    summary_rows = []
    for (method, noise), vals in sorted(avg.items()):
        for name in [*sets, "avg"]:
            v = vals if name == "avg" else per_set.get((method, noise, name), [])
            if v:
                mean, std = _stats(v)
                summary_rows.append([method, noise, name, f"{mean:.6f}", f"{std:.6f}", len(v)])
    _write_csv(out / "summary.csv", ["method", "noise", "set", "mean", "std", "n"], summary_rows)
    if ok:
        plot_experiment(exp, avg, out / "experiment.png")
    for noise in exp.noise:  # what each method's model sees, first seed
        runs = {m: _cell_dir(out, m, noise, exp.seeds[0]) for m in exp.methods}
        runs = {m: r for m, r in runs.items() if RunDir(r).angles_file.is_file()}
        if runs:
            plot_run_angles(runs, out / f"angles_{noise}.png", f"{noise} labels")
    print(report)
    return {"table": report, "gaps": gaps}


def _is_clean(noise: str) -> bool:
    from robustface.data.noise import parse_noise_setting

    return parse_noise_setting(noise) == (0.0, 0.0)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def plot_experiment(
    exp: ExperimentConfig, avg: dict[tuple[str, str], list[float]], path: Path
) -> None:
    """Grouped bars: average verification accuracy per method, one bar per noise setting."""
    plt = pyplot()

    methods = list(exp.methods)
    width = 0.8 / len(exp.noise)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(methods) + 2), 4.2))
    x = np.arange(len(methods))
    for k, noise in enumerate(exp.noise):
        stats = [_stats(avg[(m, noise)]) if avg.get((m, noise)) else (np.nan, 0.0) for m in methods]
        means = [100 * s[0] for s in stats]
        errs = [100 * s[1] for s in stats]
        ax.bar(x + (k - (len(exp.noise) - 1) / 2) * width, means, width, yerr=errs, capsize=3,
               label=noise)  # fmt: skip
    ax.set_xticks(x, methods, rotation=20, ha="right")
    ax.set_ylabel("average verification accuracy (%)")
    finite = [100 * v for vals in avg.values() for v in vals]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 3), min(100.0, max(finite) + 2))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="noise")
    ax.set_title(f"SynthFace, mean ± std over {len(exp.seeds)} seeds")
    fig.tight_layout()
    save_figure(fig, path)
