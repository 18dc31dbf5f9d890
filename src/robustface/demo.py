"""``robustface demo``: the pipeline on SynthFace, end to end, on a CPU.

1. Generate (or reuse) a SynthFace benchmark: training set, open-set source, verification pair sets
   and an IJB-style set, in the real file formats.
2. Inject label noise (MS1MCON-0.20: 15% closed-set + 5% open-set) with its ground-truth list.
3. Train a tiny IResNet with ArcFace, then with the best robust head, on the noisy set, probing
   the angles of clean and noisy samples to their class centres as they train; then ArcFace on
   the clean labels: the ceiling that says how much of the noise damage the robust head undoes.
4. One cleaning round (``run_demo(clean=False)`` / ``--no-clean`` skips it): score and flag every
   noisy training sample with the robust head's model (:func:`robustface.clean.clean_round`, as a
   round of ``robustface clean run`` with its defaults), remove the flagged ones, score the flags
   against the noise list, and retrain ArcFace on what is kept. It comes after the three runs
   above, whose numbers it leaves unchanged.
5. Evaluate every run on the verification sets, print the headline table (with the share of
   ArcFace's clean-vs-noisy gap closed, as ``robustface experiment`` reports it), and save plots.

Same config and seed give the same numbers on a CPU with the same PyTorch version, thread count
(``train.threads``: 1 in the recipe) and vector instruction set; ``results.json`` records them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustface.config import Config, HeadConfig
from robustface.data.synth.builder import ensure_synthface
from robustface.evaluate.verification import format_results
from robustface.train import Trainer
from robustface.train.analysis import plot_run_angles
from robustface.train.experiment import gap_closed
from robustface.utils.io import write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"
CLEAN_SUFFIX = "_clean"
"""The clean-label reference run is the baseline head's name plus this (``arcface_clean``)."""
CLEANED_SUFFIX = "_cleaned"
"""The run on the cleaned set is the baseline head's name plus this (``arcface_cleaned``)."""
CLEANING_DIR = "cleaning"
"""The cleaning round's directory in the demo's run: ``score/``, ``data/``, ``round.json``."""


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (rendering pool, data loader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def headline(
    verification: dict[str, dict[str, dict[str, Any]]],
    analysis: dict[str, dict[str, Any]],
    baseline: str,
    noise: str,
) -> tuple[str, dict[str, Any]]:
    """The headline table and its numbers: each run's verification accuracy (%) per set and
    average, the share of ``baseline``'s clean-vs-noisy gap each noisy run closes
    (:func:`~robustface.train.experiment.gap_closed`) and the share of clean probe samples that
    ended nearer another class centre than their own (how far from fitted each model is)."""
    sets = sorted(next(iter(verification.values())))
    avg = {name: float(np.mean([v[s]["accuracy_mean"] for s in sets]))
           for name, v in verification.items()}  # fmt: skip
    clean, cleaned = baseline + CLEAN_SUFFIX, baseline + CLEANED_SUFFIX
    closed = {
        name: gap_closed(avg[name], avg[baseline], avg[clean])
        for name in verification
        if name != clean and clean in avg
    }
    rows = []
    for name in sorted(verification, key=lambda n: n == clean):  # the ceiling last
        v = verification[name]
        labels = {clean: "clean (ceiling)", cleaned: f"{noise}, cleaned"}.get(name, noise)
        share = closed.get(name)
        gap = "-" if share is None else "n/a" if math.isnan(share) else f"{100 * share:.0f}%"
        nearer = analysis.get(name, {}).get("clean_neg_closer_frac")
        rows.append([name, labels, *(f"{100 * v[s]['accuracy_mean']:.2f}" for s in sets),
                     f"{100 * avg[name]:.2f}", gap,
                     "-" if nearer is None else f"{100 * nearer:.0f}"])  # fmt: skip
    table = markdown_table(
        ["method", "training labels", *sets, "avg", "gap closed", "clean nearer other (%)"], rows
    )
    retrained = (
        f"{cleaned}: {baseline} on the noisy labels less the samples one cleaning round removed. "
        if cleaned in verification
        else ""
    )
    notes = (
        f"gap closed: the share of {baseline}'s clean-vs-noisy gap in average accuracy that a run "
        f"on the noisy labels closes ({baseline} on {noise} = 0%, {clean} = 100%; n/a when the "
        f"clean run is not better). {retrained}clean nearer other: clean training samples of the "
        "angle probe that ended nearer another class centre than their own (far from fitted when "
        "high)."
    )
    return table + "\n\n" + notes, {"avg": avg, "gap_closed": closed}


def _synthface_table(summary: dict[str, Any]) -> str:
    rows = [["train (.rec)", summary["train"]["samples"], summary["train"]["classes"], "train.rec"]]
    if "open_set" in summary:
        s = summary["open_set"]
        rows.append(["open-set source", s["samples"], s["classes"], "open_set/open_set.rec"])
    for name, pairs in summary["verification"].items():
        rows.append([f"verification {name}", f"{pairs} pairs", "-", f"{name}.bin"])
    if "ijb" in summary:
        s = summary["ijb"]
        rows.append(["IJB-style", f"{s['images']} images", f"{s['templates']} templates", "IJBS/"])
    return markdown_table(["part", "size", "classes", "file"], rows)


def cleaning_table(summary: dict[str, Any], scored_with: str) -> str:
    """What one cleaning round (a :func:`~robustface.clean.clean_round` summary) removed and,
    when its set has a truth or noise list, the flags' precision / recall against it
    (:func:`~robustface.clean.evaluate_flags`: closed-set noise flagged ``mislabeled``, open-set
    ``open_set``, and removal for any reason vs noise) and the share of clean samples kept."""
    from robustface.clean.evaluate import format_ratio

    n, removed = summary["input_samples"], summary["removed"]
    lines = [
        f"{scored_with}'s model flagged {removed} of {n} training samples for removal "
        f"({100 * removed / max(n, 1):.1f}%); {summary['samples']} samples of "
        f"{summary['classes']} classes are left."
    ]
    evaluation = summary.get("evaluation")
    if evaluation is not None:
        rows = []
        for key, name in (("closed", "closed-set (mislabeled)"), ("open", "open-set (open_set)"),
                          ("removal", "all noise (any removal flag)")):  # fmt: skip
            r = evaluation[key]
            rows.append([name, r["samples"], r["flagged"],
                         format_ratio(r["precision"]), format_ratio(r["recall"])])  # fmt: skip
        removal, kept = evaluation["removal"], evaluation["clean"]
        lines += [
            "",
            markdown_table(["noise (flag)", "samples", "flagged", "precision", "recall"], rows),
            "",
            f"against the noise list: removal precision {format_ratio(removal['precision'])}, "
            f"recall {format_ratio(removal['recall'])}; clean samples kept: "
            f"{format_ratio(kept['kept'])} of {kept['samples']}.",
        ]
    return "\n".join(lines)


def plot_training(
    run_dir: Path, verification: dict[str, dict[str, Any]], path: Path, head: str = "arcface"
) -> None:
    """Save the loss curve (from the run's metrics) and one ROC curve per verification set."""
    plt = pyplot()

    rows = RunDir(run_dir).metrics()
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    fig, (ax_loss, ax_roc) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.plot(steps, losses, color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{head} training loss")
    ax_loss.grid(alpha=0.3)
    for name, result in verification.items():
        fpr, tpr = np.asarray(result["fpr"]), np.asarray(result["tpr"])
        order = np.argsort(fpr)
        label = f"{name} ({100 * result['accuracy_mean']:.1f}%)"
        ax_roc.plot(fpr[order], tpr[order], label=label)
    ax_roc.set(xlabel="false accept rate", ylabel="true accept rate", title="Verification ROC")
    ax_roc.set_xscale("symlog", linthresh=1e-3)
    ax_roc.set_xlim(0, 1)
    ax_roc.grid(alpha=0.3)
    ax_roc.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def run_plots(run_dir: Path) -> str:
    """``" (analysis/angles.png, training.png)"``: the plots a run has, for the final printout
    (no angles plot without the probe, no training plot without verification); ``""`` if none."""
    run = RunDir(run_dir)
    found = [p for p in (run.angles_plot, run.training_plot) if p.is_file()]
    return f" ({', '.join(p.relative_to(run.path).as_posix() for p in found)})" if found else ""


def run_demo(
    cfg: Config,
    *,
    noise: str = "MS1MCON-0.20",
    robust_head: str = "robustface_stable",
    clean: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo into ``cfg.output_dir`` and return its results (also saved as results.json).

    ``cfg.head`` is the baseline (ArcFace in the recipe); ``robust_head`` trains with the same
    head params on the same noisy data (``noise``: a setting of :mod:`robustface.data.noise`).
    ``clean``: then one cleaning round with the ``robust_head`` model and ``cfg.head`` retrained
    on the cleaned set.
    """
    from robustface.clean.loop import CleanConfig, clean_round
    from robustface.data.noise import inject_noise, noise_summary_table, parse_noise_setting
    from robustface.data.recordio import RecordIODataset
    from robustface.heads import HEADS

    parse_noise_setting(noise)
    HEADS.get(robust_head)
    if robust_head == cfg.head.name:
        raise ValueError(f"robust_head {robust_head!r} is the config's head: nothing to compare")
    steps = 5 if clean else 4
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    out = RunDir.create(cfg.output_dir, cfg, cfg.seed).path
    data_dir = out / "synthface"
    print(f"[1/{steps}] SynthFace in {data_dir} ...", flush=True)
    summary, info = ensure_synthface(data_dir, cfg.synth, workers=workers, progress=progress)
    if info is None:
        print("      reusing the existing set (same config)", flush=True)
    else:
        print(
            f"      {summary['images']} images in {info.seconds:.1f} s "
            f"({info.images_per_second:.0f} images/s on {info.workers} workers)",
            flush=True,
        )
    noisy_dir = out / f"synthface_{noise}"
    print(f"[2/{steps}] label noise {noise} -> {noisy_dir}", flush=True)
    noise_info = inject_noise(
        data_dir, noisy_dir, noise, seed=cfg.seed, overwrite=True, progress=False
    )
    print(noise_summary_table(noise_info.plan), flush=True)
    # (head, training set) per run: both heads on the noisy labels, then the baseline on clean ones
    plan = {
        cfg.head.name: (cfg.head, noisy_dir),
        robust_head: (dataclasses.replace(cfg.head, name=robust_head), noisy_dir),
        cfg.head.name + CLEAN_SUFFIX: (cfg.head, data_dir),
    }
    results: dict[str, Any] = {"synthface": summary, "noise": noise_info.counts, "runs": {}}
    runs: dict[str, Path] = {}
    tables = ["## SynthFace\n\n" + _synthface_table(summary)]
    verification: dict[str, dict[str, dict[str, Any]]] = {}
    analysis: dict[str, dict[str, Any]] = {}

    def train(step: str, name: str, head: HeadConfig, train_data: Path, labels: str) -> None:
        """Train ``name`` afresh on ``train_data`` and record its results, tables and plots."""
        train_dir = out / name
        if train_dir.exists():  # the demo's own training runs: start them afresh each time
            shutil.rmtree(train_dir)
        train_cfg = dataclasses.replace(
            cfg,
            output_dir=str(train_dir),
            head=head,
            data=dataclasses.replace(
                cfg.data, source="rec", path=str(train_data), val_dir=str(data_dir)
            ),
            train=dataclasses.replace(cfg.train, progress=progress),
        )
        trainer = Trainer(train_cfg)
        print(
            f"{step} {cfg.model.backbone} + {head.name} on {len(trainer.trainset)} {labels} "
            f"images of {trainer.num_classes} identities: {trainer.total_steps} steps, "
            f"{torch.get_num_threads()} CPU thread(s) ...",
            flush=True,
        )
        result = trainer.fit()
        runs[name] = train_dir
        verification[name] = result.verification
        saved = RunDir(train_dir).results()
        analysis[name] = saved.get("analysis", {})
        results["runs"][name] = {
            "head": head.name,
            "labels": labels,
            "steps": result.steps,
            "loss": result.loss,
            "timing": saved["timing"],
            "verification": {
                k: {m: v[m] for m in ("accuracy_mean", "accuracy_std", "val", "far", "xnorm")}
                for k, v in result.verification.items()
            },
        }
        if result.verification:
            plot_training(train_dir, result.verification, RunDir(train_dir).training_plot, name)
            shown = {"noisy": noise, "cleaned": f"{noise}, cleaned"}.get(labels, labels)
            title = f"## {head.name} on {shown} labels, {cfg.model.backbone}, verification\n\n"
            tables.append(title + format_results(result.verification))

    for i, (name, (head, train_data)) in enumerate(plan.items(), 1):
        labels = "clean" if train_data == data_dir else "noisy"
        train(f"[3/{steps}] training {i}/{len(plan)}:", name, head, train_data, labels)
    round_dir, cleaned_run = out / CLEANING_DIR, out / (cfg.head.name + CLEANED_SUFFIX)
    for stale in (round_dir, cleaned_run):  # an earlier run's round: redone, or gone if skipped
        if stale.exists():
            shutil.rmtree(stale)
    if clean:
        print(
            f"[4/{steps}] one cleaning round: scoring the {noise} training set with "
            f"{robust_head}'s model -> {round_dir}",
            flush=True,
        )
        cleaning_started = time.perf_counter()
        cleaned = clean_round(
            CleanConfig(data=str(noisy_dir), rounds=1, action="remove"),
            runs[robust_head],
            noisy_dir,
            round_dir,
            np.arange(len(RecordIODataset(noisy_dir))),
            progress=progress,
        )
        cleaning = cleaning_table(cleaned, robust_head)
        print(cleaning, flush=True)
        results["cleaning"] = {
            "scored_with": robust_head,
            "seconds": round(time.perf_counter() - cleaning_started, 1),
            **cleaned,
        }
        tables.append(f"## One cleaning round ({robust_head}'s flags)\n\n" + cleaning)
        train(f"[4/{steps}] retraining:", cleaned_run.name, cfg.head, Path(cleaned["output"]),
              "cleaned")  # fmt: skip
    print(f"[{steps}/{steps}] headline comparison", flush=True)
    plot_path = out / "demo.png"
    baseline, ceiling = cfg.head.name, cfg.head.name + CLEAN_SUFFIX
    title = f"{baseline} and {robust_head} on {noise} labels, {ceiling} on clean labels"
    if clean:
        title += f", {cleaned_run.name} on the cleaned set"
    plot_run_angles(runs, plot_path, title)
    if all(verification.values()):
        table, numbers = headline(verification, analysis, cfg.head.name, noise)
        results["headline"] = numbers
        tables.append(f"## Headline: {noise} label noise, verification accuracy (%)\n\n" + table)
    results["seconds"] = {
        "wall": round(time.perf_counter() - started, 1),
        "cpu": round(_cpu_seconds() - cpu_started, 1),
    }
    report = "\n\n".join(tables) + "\n"
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", report)
    print()
    print(report)
    print(f"sample grid (rows = identities):  {data_dir / 'preview.png'}")
    print(f"loss and angle distributions:     {plot_path}")
    for name, run in runs.items():
        print(f"{name + ' run:':<33} {run}{run_plots(run)}")
    if clean:
        print(f"{'cleaning round:':<33} {round_dir} (score/angles.png, score/flags.csv, data/)")
    sec = results["seconds"]
    print(f"\ndemo time: {sec['wall'] / 60:.1f} min wall, {sec['cpu']:.0f} s of CPU")
    print(
        "\nThe full comparison (more methods, 3 seeds): robustface experiment "
        "configs/experiment_noise.yaml (docs/results.md)."
    )
    return results
