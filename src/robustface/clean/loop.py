"""The cleaning loop (``robustface clean run CONFIG``): train, score, clean, retrain, repeat.

One run directory holds every round; each step of a round is resumable and marked done by the
file it writes last, so an interrupted run continues where it stopped::

    OUT/clean_config.yaml            the loop's config (a later call must match it)
    OUT/round_1/train/               round 1's training run (train.resume=auto inside)
    OUT/round_1/score/               its scoring pass: flags.csv, scores.npz, score.json, ...
    OUT/round_1/data/                the cleaned set: train.rec/.idx/property, origin.npy,
                                     label_map.csv, cleaned.json (written last), truth/noise
    OUT/round_1/round.json           the round's summary (written last: the round is done)
    OUT/round_2/...                  trains on round_1/data, and so on
    OUT/flags.csv                    per sample of the input set: the round it left, flag, reason
    OUT/report.md, rounds.json, rounds.png   per round; with a truth list, also rounds 1..r
                                     together against the original set (``cumulative``)

Round ``r`` trains on the set round ``r - 1`` wrote (round 1 on ``data``), scores that set and
writes the next one into its own directory; no round writes into another's. Actions: ``remove``
drops every sample flagged for removal; ``relabel`` keeps confident mislabels under their
suggested class (the kNN majority or the nearest centre, when it is a class that keeps samples)
and merges the proposed duplicate pairs (the higher class id into the lower). A class left
without samples is removed and the labels re-indexed compactly: ``label_map.csv`` lists
``old_label,new_label`` (``-1``: emptied) and the report names the emptied classes. The loop
stops after ``rounds`` rounds, or after a round that changes less than ``min_change`` of its set.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from robustface.clean.dirty import Truth, truth_for
from robustface.clean.evaluate import EXPECTED, evaluate_cumulative, evaluation_table
from robustface.clean.score import (
    FLAGS,
    REMOVED,
    THRESHOLD_NAMES,
    flags_table,
    knn_settings,
    score_to_dir,
    threshold_problems,
)
from robustface.config import Config, changes_text, saved_config_changes, to_dict
from robustface.data.noise import NOISE_LIST, noise_list_for, save_noise_list
from robustface.data.recordio import RecordIODataset
from robustface.data.subset import link_verification_sets, write_rec_subset
from robustface.utils.io import atomic_directory, write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.table import markdown_table

__all__ = ["CleanConfig", "clean_loop", "clean_round", "remap_labels", "write_cleaned"]

CONFIG_FILE = "clean_config.yaml"
ROUND_JSON = "round.json"
CLEANED_JSON = "cleaned.json"


def _default_base() -> Config:
    base = Config()
    base.head.name = "robustface_stable"
    return base


@dataclasses.dataclass
class CleanConfig:
    """The cleaning loop: ``data`` (the ``.rec`` to clean), ``base`` (the training config of every
    round; ``data.source``/``data.path``/``output_dir`` are set by the loop; the best robust head,
    ``robustface_stable``, by default), ``rounds``, ``min_change`` (stop after a round that
    changes less than this fraction of its set), ``action`` (``remove`` or ``relabel``),
    ``thresholds`` (fixed values instead of those read off the scores), ``knn`` (neighbours of
    the purity score), ``knn_method`` / ``knn_params`` (its index:
    :func:`~robustface.clean.score.knn_settings`)."""

    output_dir: str = "runs/clean"
    data: str = ""
    base: Config = dataclasses.field(default_factory=_default_base)
    rounds: int = 3
    min_change: float = 0.01
    action: Literal["remove", "relabel"] = "remove"
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    knn: int = 10
    knn_method: str = "auto"
    knn_params: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_size: int = 256
    device: str = "cpu"

    def check(self) -> list[str]:
        """Return the problems with these values (empty when valid)."""
        problems = []
        if not self.data:
            problems.append("data: the training set (.rec or its directory) to clean is required")
        if self.rounds < 1:
            problems.append(f"rounds: must be >= 1, got {self.rounds}")
        if not 0.0 <= self.min_change <= 1.0:
            problems.append(f"min_change: must be in [0, 1], got {self.min_change}")
        if self.action not in ("remove", "relabel"):
            problems.append(f"action: must be remove or relabel, got {self.action!r}")
        for key in self.thresholds:
            if key not in THRESHOLD_NAMES:
                problems.append(
                    f"thresholds.{key}: unknown; use one of {', '.join(THRESHOLD_NAMES)}"
                )
        problems += threshold_problems(dict(self.thresholds))
        if self.knn < 1:
            problems.append(f"knn: must be >= 1, got {self.knn}")
        try:
            knn_settings(0, self.knn_method, self.knn_params)
        except ValueError as exc:
            problems.append(str(exc))
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        return problems


def remap_labels(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(new labels, old -> new map)``: the classes that keep samples, re-indexed ``0..C'-1`` in
    their old order; an emptied class maps to -1."""
    kept = np.bincount(labels, minlength=num_classes) > 0
    mapping = np.full(num_classes, -1, dtype=np.int64)
    mapping[kept] = np.arange(int(kept.sum()))
    return mapping[labels], mapping


def _remap_truth(truth: Truth, labels: np.ndarray, mapping: np.ndarray) -> Truth:
    """A subset's truth under the new labels (``truth`` already has the subset's rows)."""
    true_label = np.where(truth.true_label >= 0, mapping[np.maximum(truth.true_label, 0)], -1)
    duplicate_of = np.full(int(mapping.max()) + 1, -1, dtype=np.int64)
    for old, orig in enumerate(truth.duplicate_of):
        if orig >= 0 and mapping[old] >= 0 and mapping[orig] >= 0:
            duplicate_of[mapping[old]] = mapping[orig]
    return dataclasses.replace(
        truth, label=labels, true_label=true_label, duplicate_of=duplicate_of
    )


def _label_map_csv(mapping: np.ndarray) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["old_label", "new_label"])
    writer.writerows([i, int(m)] for i, m in enumerate(mapping))
    return out.getvalue()


def write_cleaned(
    source: Path,
    out: Path,
    keep: np.ndarray,
    new_labels: np.ndarray,
    origin: np.ndarray,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write the kept samples of ``source`` (with ``new_labels``, pre-remap) into ``out``."""
    dataset = RecordIODataset(source)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"{source}: cleaning would remove every sample; check the thresholds")
    labels, mapping = remap_labels(new_labels[kept], dataset.num_classes)
    emptied = np.flatnonzero(mapping < 0).tolist()
    with atomic_directory(out) as partial:
        picks = np.stack([np.zeros_like(kept), kept], axis=1)
        order = write_rec_subset(
            partial, [dataset.rec_path], picks, labels, num_classes=int(mapping.max()) + 1
        )
        rows = kept[order]
        np.save(partial / "origin.npy", origin[rows])
        write_text_atomic(partial / "label_map.csv", _label_map_csv(mapping))
        truth = truth_for(dataset.rec_path.parent, len(dataset))
        if truth is not None:
            _remap_truth(truth.take(rows), labels[order], mapping).save(partial)
        noise = noise_list_for(dataset.rec_path)
        if noise is not None and not np.any(new_labels != dataset.labels) and not emptied:
            save_noise_list(noise.take(rows), partial / NOISE_LIST)  # labels unchanged only
        link_verification_sets(dataset.rec_path.parent, partial)
        summary = {**summary, "samples": int(kept.size), "classes": int(mapping.max()) + 1,
                   "emptied_classes": emptied}  # fmt: skip
        write_text_atomic(partial / CLEANED_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def _train_round(cfg: CleanConfig, data: Path, out: Path, progress: bool) -> None:
    """Train (or resume, or skip when finished) the round's model on ``data``."""
    from robustface.train import Trainer
    from robustface.utils.run import RunDir

    if RunDir(out).is_finished:
        return
    base = cfg.base
    train_cfg = dataclasses.replace(
        base,
        output_dir=str(out),
        data=dataclasses.replace(base.data, source="rec", path=str(data)),
        train=dataclasses.replace(base.train, resume="auto", progress=progress),
    )
    Trainer(train_cfg).fit()


def _clean_decisions(
    cfg: CleanConfig, score_dir: Path, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(keep, new labels, counts)`` from a scoring pass and the loop's action."""
    z = np.load(score_dir / "scores.npz")
    flag, suggested = z["flag"], z["suggested"]
    removed = np.isin(flag, [FLAGS.index(f) for f in REMOVED])
    keep, new = ~removed, labels.copy()
    relabelled = merged = 0
    if cfg.action == "relabel":
        summary = json.loads((score_dir / "score.json").read_text(encoding="utf-8"))
        mis = (flag == FLAGS.index("mislabeled")) & (suggested >= 0)
        keep[mis] = True
        new[mis] = suggested[mis]
        relabelled = int(mis.sum())
        for a, b, _ in summary["merges"]:
            moved = keep & (new == int(b))
            new[moved] = int(a)
            merged += int(moved.sum())
    changed = int(np.sum(~keep)) + int(np.sum(keep & (new != labels)))
    counts = {"removed": int(np.sum(~keep)), "relabelled": relabelled, "merged": merged,
              "changed": changed, "change": changed / max(len(labels), 1)}  # fmt: skip
    return keep, new, counts


def _plot_rounds(path: Path, rounds: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, (ax_flags, ax_pr) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["round"] for r in rounds]
    for name in FLAGS[2:]:
        ax_flags.plot(x, [r["flags"][name] for r in rounds], marker="o", label=name)
    ax_flags.set(xlabel="round", ylabel="samples flagged", title="flags per round")
    ax_flags.legend(fontsize=8)
    if all("evaluation" in r for r in rounds):
        for name in (*EXPECTED, "removal"):
            ax_pr.plot(x, [r["evaluation"][name]["recall"] for r in rounds], marker="o",
                       label=f"{name} recall")  # fmt: skip
        ax_pr.plot(x, [r["evaluation"]["removal"]["precision"] for r in rounds], "k--",
                   marker="s", label="removal precision")  # fmt: skip
        ax_pr.set(xlabel="round", ylabel="against the truth", ylim=(0, 1.02))
        ax_pr.legend(fontsize=7)
    else:
        ax_pr.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path)


def _check_same_config(out: Path, cfg: CleanConfig) -> None:
    """Write ``cfg`` to a new ``out``, or refuse a run there whose config differs from it (keys
    added to :class:`CleanConfig` since the run read as their defaults; ``output_dir``, the
    directory it was found in, however spelt, is not compared)."""
    file = out / CONFIG_FILE
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if file.is_file():
        if file.read_text(encoding="utf-8") == text:
            return
        changes = saved_config_changes(file, cfg, ignore=("output_dir",))
        if changes == []:  # the same settings, as another version or spelling wrote them
            write_text_atomic(file, text)
            return
        what = f": {changes_text(changes)}" if changes else ""
        raise ValueError(
            f"{out} holds a cleaning run with another config ({file}{what}); resume it with "
            "that config or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, text)


def clean_round(
    cfg: CleanConfig,
    run_dir: str | Path,
    data: str | Path,
    round_dir: str | Path,
    origin: np.ndarray,
    r: int = 1,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Round ``r``'s cleaning with the trained run ``run_dir``: score ``data`` into
    ``round_dir/score``, apply ``cfg.action``, write the cleaned set into ``round_dir/data``
    (``origin``: each record's index in the loop's input set) and the summary into
    ``round_dir/round.json`` (written last); a step whose output exists is not redone."""
    data, round_dir = Path(data), Path(round_dir)
    score_dir = round_dir / "score"
    if not (score_dir / "score.json").is_file():
        score_to_dir(run_dir, score_dir, data=data, thresholds=dict(cfg.thresholds), knn=cfg.knn,
                     knn_method=cfg.knn_method, knn_params=dict(cfg.knn_params),
                     batch_size=cfg.batch_size, device=cfg.device, overwrite=True,
                     progress=progress)  # fmt: skip
    labels = RecordIODataset(data).labels
    keep, new_labels, counts = _clean_decisions(cfg, score_dir, labels)
    score = json.loads((score_dir / "score.json").read_text(encoding="utf-8"))
    data_dir = round_dir / "data"
    if not (data_dir / CLEANED_JSON).is_file():
        write_cleaned(data, data_dir, keep, new_labels, origin, {"round": r, **counts})
    cleaned = json.loads((data_dir / CLEANED_JSON).read_text(encoding="utf-8"))
    summary = {
        "round": r,
        "input": str(data),
        "input_samples": len(labels),
        "output": str(data_dir),
        **counts,
        "samples": cleaned["samples"],
        "classes": cleaned["classes"],
        "emptied_classes": cleaned["emptied_classes"],
        "flags": score["flags"],
        "thresholds": score["thresholds"],
        "merges": len(score["merges"]),
        "splits": score["splits"],
        "images_per_second": score["images_per_second"],
    }
    if "evaluation" in score:
        summary["evaluation"] = score["evaluation"]
    write_text_atomic(round_dir / ROUND_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def clean_loop(cfg: CleanConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the loop of ``cfg``; returns the summary also written to ``rounds.json``."""
    problems = cfg.check()
    if problems:
        raise ValueError("invalid cleaning config:\n  " + "\n  ".join(problems))
    out = Path(cfg.output_dir)
    source = RecordIODataset(cfg.data)
    _check_same_config(out, cfg)
    current = source.rec_path.parent
    origin = np.arange(len(source))
    left_in = np.zeros(len(source), dtype=np.int64)  # 0: kept to the end, else the round
    final_flag = np.zeros(len(source), dtype=np.int8)
    final_reason = np.full(len(source), "", dtype=object)
    ever = np.zeros((len(source), len(FLAGS)), dtype=bool)  # flags received in any round
    truth = truth_for(source.rec_path.parent, len(source))
    rounds: list[dict[str, Any]] = []
    cumulative: list[dict[str, Any]] = []
    for r in range(1, cfg.rounds + 1):
        round_dir = out / f"round_{r}"
        done = round_dir / ROUND_JSON
        if done.is_file():
            summary = json.loads(done.read_text(encoding="utf-8"))
        else:
            _train_round(cfg, current, round_dir / "train", progress)
            summary = clean_round(cfg, round_dir / "train", current, round_dir, origin, r,
                                  progress=progress)  # fmt: skip
        # carry the per-sample record back to the input set
        z = np.load(round_dir / "score" / "scores.npz")
        removed = np.isin(z["flag"], [FLAGS.index(f) for f in REMOVED])
        if cfg.action == "relabel":
            removed &= ~((z["flag"] == FLAGS.index("mislabeled")) & (z["suggested"] >= 0))
        final_flag[origin] = z["flag"]
        left_in[origin[removed]] = r
        ever[origin, z["flag"]] = True
        if truth is not None:  # rounds 1..r together, against the original set's truth
            cumulative.append(evaluate_cumulative(ever, left_in > 0, truth))
        with open(round_dir / "score" / "flags.csv", newline="", encoding="utf-8") as fh:
            final_reason[origin] = [row["reason"] for row in csv.DictReader(fh)]
        rounds.append(summary)
        current = Path(summary["output"])
        origin = np.load(current / "origin.npy")
        if summary["change"] < cfg.min_change:
            break
    return _report(out, cfg, rounds, left_in, final_flag, final_reason, current, cumulative)


def _report(
    out: Path,
    cfg: CleanConfig,
    rounds: list[dict[str, Any]],
    left_in: np.ndarray,
    flag: np.ndarray,
    reason: np.ndarray,
    final: Path,
    cumulative: list[dict[str, Any]],
) -> dict[str, Any]:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "removed_in_round", "flag", "reason"])
    names = np.asarray(FLAGS)[flag]
    for i in range(len(left_in)):
        writer.writerow([i, int(left_in[i]), names[i], reason[i]])
    write_text_atomic(out / "flags.csv", text.getvalue())
    rows = [[r["round"], r["input_samples"], r["removed"], r["relabelled"], r["merged"],
             f"{100 * r['change']:.2f}", r["samples"], r["classes"], len(r["emptied_classes"])]
            for r in rounds]  # fmt: skip
    parts = [
        "# Cleaning report\n",
        f"Input: `{cfg.data}`; head `{cfg.base.head.name}`; action `{cfg.action}`; "
        f"{len(rounds)} round(s) of at most {cfg.rounds}; cleaned set: `{final}`.\n",
        markdown_table(
            ["round", "in", "removed", "relabelled", "merged", "changed %", "out", "classes",
             "emptied classes"],
            rows,
        ),
    ]  # fmt: skip
    for r in rounds:
        parts.append(f"\n## Round {r['round']}\n\n" + flags_table(r["flags"]))
        thresholds = {k: v for k, v in r["thresholds"].items() if k != "source"}
        parts.append("\nthresholds: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in thresholds.items()
        ))  # fmt: skip
        if r["emptied_classes"]:
            parts.append(
                f"\nclasses emptied and removed (labels re-indexed, see "
                f"round_{r['round']}/data/label_map.csv): {r['emptied_classes']}"
            )
        if "evaluation" in r:
            parts.append("\nagainst the truth:\n\n" + evaluation_table(r["evaluation"]))
    for r, result in enumerate(cumulative, 1):
        parts.append(
            f"\n## Rounds 1 to {r} together\n\nAgainst the original set's truth: a sample counts "
            "as flagged with a flag if any of these rounds gave it that flag.\n\n"
            + evaluation_table(result)
        )
    write_text_atomic(out / "report.md", "\n".join(parts) + "\n")
    _plot_rounds(out / "rounds.png", rounds)
    summary = {"rounds": rounds, "final": str(final), "removed_total": int(np.sum(left_in > 0))}
    if cumulative:
        summary["cumulative"] = cumulative
    write_text_atomic(out / "rounds.json", json.dumps(summary, indent=2) + "\n")
    return summary
