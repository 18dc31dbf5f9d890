"""The RobustFace seed's cleaning table on a dirty SynthFace set: heads trained on the dirty set,
on cleaned sets and on the truly clean set, over seeds.

Run: ``.venv/bin/python benchmarks/clean_table.py [--dirty /work/data/dirty/train]
[--cleaned runs/clean_synthface] [--config configs/clean_synthface.yaml] [--out runs/clean_table]
[--heads arcface,robustface_stable] [--seeds 2] [--epochs 8]``.

Training sets (rows), all from the dirty set ``--dirty`` (a ``robustface clean dirty`` set with
its ``truth.npz``):

- ``dirty``: as is;
- ``clean``: the truth's clean set: every closed, open, low-quality, sketch and non-face sample
  dropped; a duplicate class's samples are merged into the class they repeat (their
  ``true_label``), so each person is one class; the emptied duplicate classes are removed;
- ``cleaned``: the final round's ``data/`` of a ``robustface clean run`` output directory
  (``--cleaned``; one set for every seed: the loop ran once);
- ``subcenter``: per seed, a Sub-center ArcFace run (``fc: subcenter, k: 3``, head ArcFace) on
  the dirty set, its drop step at ``--subcenter-threshold`` degrees, then retraining;
- ``smallloss``: per seed, the small-loss selection (``robustface clean small-loss``: plain
  ArcFace loss, DivideMix's mixture, or ``--keep-fraction``) under that seed's dirty run of the
  first ``--heads`` entry (ArcFace by default),
  then retraining.

Every head (columns) is trained on every set with every seed from the ``base`` training config of
``--config`` (``--epochs`` overrides its epochs), and scored by the mean verification accuracy
over the ``.bin`` sets beside the dirty set (``base.data.val_targets``). Per (set, head): mean
and sample sd over seeds, and the share of the head's dirty-to-clean gap the set closes,
``(acc_set - acc_dirty) / (acc_clean - acc_dirty)`` (:func:`robustface.train.experiment.
gap_closed`): from the means over the seeds that have all three runs, and per seed (same-seed
dirty and clean runs) as mean +- sd; "no gap" where the head's clean mean is not above its dirty
mean, and "gap < seed sd" where the gap is smaller than hypot(sd_dirty, sd_clean) (the ratio
then divides by noise).

Cache: ``OUT/runs/<set>/<head>/s<seed>`` (and ``OUT/runs/subcenter-base/arcface/s<seed>``), each
with a ``cell.json`` recording its training config without locations (output, data and
validation paths) and digests of its training set and validation sets, so that a moved ``--out``
or data directory is still reused. A finished run whose record matches is reused; one that does
not (another ``--cleaned``, other epochs) is retrained. Derived sets are written once into
``OUT/data/``. Order: the dirty, clean and cleaned rows for every seed, then the baselines
(small-loss, sub-center) for every seed; a later ``--seeds N+1`` reuses every cached run and adds
one seed (``--baseline-seeds N``: to the dirty, clean and cleaned rows only). The outputs
(``table.md``, ``table.json``, ``table.png``) are rewritten after every training run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robustface.clean.dirty import TRUTH_KINDS, load_truth
from robustface.clean.loop import CLEANED_JSON, CleanConfig, write_cleaned
from robustface.config import Config, apply_overrides, load_config, to_dict
from robustface.data.recordio import RecordIODataset
from robustface.train.experiment import _pm, _stats, gap_closed
from robustface.utils.io import write_text_atomic
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

SETS = ("dirty", "clean", "cleaned", "subcenter", "smallloss")
NOISE_KINDS = ("closed", "open", "low_quality", "sketch", "nonface")


def _digest(data: Path) -> str:
    """A digest of a training set: its index and property files (record offsets and labels)."""
    dataset = RecordIODataset(data)
    h = hashlib.sha256(np.ascontiguousarray(dataset.labels).tobytes())
    for path in (dataset.rec_path.with_suffix(".idx"), dataset.rec_path.parent / "property"):
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


_LOCATIONS = (("output_dir",), ("data", "path"), ("data", "val_dir"))
"""Config entries that say where a run, its training set and its validation sets lie: a cached
run is keyed by their content instead (:func:`_cell_key`), so that moving ``--out`` or the data
reuses it."""


def _val_digest(val_dir: Path, targets: list[str]) -> str:
    """A digest of the validation sets ``targets``: names of ``.bin`` files in ``val_dir``, or
    ``.bin`` paths."""
    h = hashlib.sha256()
    for name in targets:
        path = Path(name) if name.endswith(".bin") else val_dir / f"{name}.bin"
        h.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"missing"))
    return h.hexdigest()[:16]


def _cell_key(config: dict[str, Any], data_digest: str | None = None) -> dict[str, Any]:
    """What a cached run depends on, by content only: ``config`` without its locations
    (:data:`_LOCATIONS`), the training set's digest (``data_digest``, else read from the
    config's ``data.path``) and the validation sets' digest."""
    config = json.loads(json.dumps(config))  # a deep copy, as stored in cell.json
    data, val_dir = Path(config["data"]["path"]), Path(config["data"]["val_dir"])
    for *parents, name in _LOCATIONS:
        node = config
        for parent in parents:
            node = node[parent]
        node.pop(name)
    targets = config["data"]["val_targets"]
    config["data"]["val_targets"] = [Path(t).name for t in targets]  # .bin paths: their names
    return {
        "config": config,
        "data_digest": data_digest or _digest(data),
        "val_digest": _val_digest(val_dir, targets),
    }


def _stored_key(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The key of a stored ``cell.json``; one written before the keys were content-only (with
    locations) gets its key from the validation sets where it says they are, or None if gone."""
    if "val_digest" in cell:
        return {name: cell[name] for name in ("config", "data_digest", "val_digest")}
    if not Path(cell["config"]["data"]["val_dir"]).is_dir():
        return None
    return _cell_key(cell["config"], cell["data_digest"])


def _fresh(selection: Path, marker: str, source_run: Path) -> bool:
    """Whether a selection written from ``source_run`` is complete and from that very run (its
    ``cell.json``); a stale one is rebuilt."""
    stamp = selection / "source_cell.sha"
    want = hashlib.sha256((source_run / "cell.json").read_bytes()).hexdigest()
    return (selection / marker).is_file() and stamp.is_file() and stamp.read_text() == want


def _stamp(selection: Path, source_run: Path) -> None:
    want = hashlib.sha256((source_run / "cell.json").read_bytes()).hexdigest()
    write_text_atomic(selection / "source_cell.sha", want)


def _train(cfg: Config, data: Path, run: Path, val_dir: Path, progress: bool) -> dict[str, Any]:
    """Train ``cfg`` on ``data`` into ``run`` unless a finished run with the same record is
    there; returns ``{"accuracy": {set: acc}, "seconds": s}``."""
    from robustface.train import Trainer

    cfg = apply_overrides(cfg, {"output_dir": str(run), "data.source": "rec",
                                "data.path": str(data), "data.val_dir": str(val_dir),
                                "train.progress": progress, "train.resume": "auto"},
                         "clean_table")  # fmt: skip
    wanted = to_dict(cfg)
    for key in ("progress", "resume"):  # an interrupted run resumes from its checkpoints
        wanted["train"].pop(key)
    record = _cell_key(wanted, _digest(data))
    cell = run / "cell.json"
    if RunDir(run).is_finished and cell.is_file():
        have = json.loads(cell.read_text(encoding="utf-8"))
        if _stored_key(have) == record:
            return have["result"]
    if cell.is_file() or RunDir(run).is_finished:
        shutil.rmtree(run)  # finished with another config or training set: retrain
    print(f"  training {run} ...", flush=True)
    start = time.perf_counter()
    Trainer(cfg).fit()
    seconds = time.perf_counter() - start
    results = RunDir(run).results()
    accuracy = {k: float(v["accuracy_mean"]) for k, v in results["verification"].items()}
    record["result"] = {"accuracy": accuracy, "seconds": round(seconds, 1)}
    write_text_atomic(cell, json.dumps(record, indent=2) + "\n")
    print(f"  {run}: mean accuracy {100 * np.mean(list(accuracy.values())):.2f}% "
          f"in {seconds:.0f} s", flush=True)  # fmt: skip
    return record["result"]


def truly_clean_set(dirty: Path, out: Path) -> Path:
    """The truth's clean set of ``dirty`` in ``out`` (see the module docstring), written once per
    dirty set (its index, labels and truth list)."""
    source = _digest(dirty) + hashlib.sha256((dirty / "truth.npz").read_bytes()).hexdigest()[:16]
    stamp = out / "source_set.sha"
    if (out / CLEANED_JSON).is_file() and stamp.is_file() and stamp.read_text() == source:
        return out
    if out.exists():
        shutil.rmtree(out)  # made from another dirty set: rebuilt
    truth = load_truth(dirty)
    kind = np.asarray(TRUTH_KINDS)[truth.kind]
    keep = np.isin(kind, ["clean", "duplicate"])
    labels = RecordIODataset(dirty).labels
    new_labels = np.where(kind == "duplicate", truth.true_label, labels)
    summary = {"set": "clean", "rule": "drop every noise kind; duplicates merged into their class"}
    write_cleaned(dirty, out, keep, new_labels, np.arange(len(labels)), summary)
    write_text_atomic(stamp, source)
    return out


def cleaned_set(path: Path) -> Path:
    """The final round's ``data/`` of a ``clean run`` directory (or a cleaned set itself)."""
    if (path / "rounds.json").is_file():
        final = Path(json.loads((path / "rounds.json").read_text(encoding="utf-8"))["final"])
        return path / final.parent.name / final.name  # round_r/data, wherever the run was made
    if (path / "train.rec").is_file():
        return path
    raise FileNotFoundError(f"--cleaned {path}: neither a clean run (rounds.json) nor a .rec set")


def source_indices(data: Path, dirty: Path) -> np.ndarray:
    """Indices into the dirty set of a derived set's records (all of them for the dirty set)."""
    if data.resolve() == dirty.resolve():
        return np.arange(len(RecordIODataset(dirty)))
    if (data / "origin.npy").is_file():
        return np.load(data / "origin.npy")
    z = np.load(data / "drop.npz")  # the sub-center drop: new_index per source sample
    order = np.argsort(z["new_index"])
    return order[z["new_index"][order] >= 0]


def composition(data: Path, dirty: Path) -> dict[str, Any]:
    """Samples, classes and the truth kinds a set holds."""
    truth = load_truth(dirty)
    rows = source_indices(data, dirty)
    counts = np.bincount(truth.kind[rows], minlength=len(TRUTH_KINDS))
    out = dict(zip(TRUTH_KINDS, counts.tolist(), strict=True))
    noisy = int(sum(out[k] for k in NOISE_KINDS))
    return {"samples": int(rows.size), "classes": RecordIODataset(data).num_classes,
            "kinds": out, "noise_share": noisy / max(rows.size, 1),
            "clean_kept": out["clean"] / max(int(np.sum(truth.kind == 0)), 1)}  # fmt: skip


def summarize(out: Path, cells: dict[tuple[str, str, int], dict[str, Any]], sets: dict[str, Any],
              heads: list[str], seeds: list[int], meta: dict[str, Any]) -> None:  # fmt: skip
    """Write ``table.md``, ``table.json`` and ``table.png`` from the finished cells."""
    acc = {key: float(np.mean(list(c["accuracy"].values()))) for key, c in cells.items()}
    rows, stats = [], {}
    for name in SETS:
        if name not in sets:
            continue
        row = [name, f"{sets[name]['samples']:.0f}", f"{100 * sets[name]['noise_share']:.1f}",
               f"{100 * sets[name]['clean_kept']:.1f}"]  # fmt: skip
        for head in heads:
            vals = [acc[(name, head, s)] for s in seeds if (name, head, s) in acc]
            mean, sd = _stats(vals) if vals else (math.nan, math.nan)
            gap = math.nan
            per_seed = []
            keys = (name, "dirty", "clean")
            paired = [s for s in seeds if all((k, head, s) in acc for k in keys)]
            if paired:  # over the seeds that have all three runs
                gap = gap_closed(*(float(np.mean([acc[(k, head, s)] for s in paired]))
                                   for k in keys))  # fmt: skip
                per_seed = [gap_closed(*(acc[(k, head, s)] for k in keys)) for s in paired]
            g_mean, g_sd = _stats(per_seed) if per_seed else (math.nan, math.nan)
            stats[f"{name}/{head}"] = {"accuracy": vals, "mean": mean, "sd": sd,
                                       "gap_closed": gap, "gap_seeds": paired,
                                       "gap_closed_per_seed": per_seed,
                                       "gap_closed_seed_mean": g_mean,
                                       "gap_closed_seed_sd": g_sd}  # fmt: skip
            gap_text = "-"
            if name not in ("dirty", "clean") and paired:
                gap_text = "no gap (clean <= dirty)" if math.isnan(gap) else f"{100 * gap:.0f}%"
                if len(per_seed) > 1 and not math.isnan(g_mean):
                    gap_text += f" ({100 * g_mean:.0f} ± {100 * g_sd:.0f})"
                d_mean, d_sd = _stats([acc[("dirty", head, s)] for s in paired])
                c_mean, c_sd = _stats([acc[("clean", head, s)] for s in paired])
                if not math.isnan(gap) and c_mean - d_mean < math.hypot(d_sd, c_sd):
                    gap_text += ", gap < seed sd"  # the ratio divides by noise
            row += [_pm(vals) + f" (n={len(vals)})", gap_text]
        rows.append(row)
    headers = ["set", "samples", "noise %", "clean kept %"]
    for head in heads:
        headers += [f"{head} acc %", f"{head} gap closed"]
    table = markdown_table(headers, rows)
    text = (
        f"# Cleaning table: {meta['dirty']}\n\n"
        f"Mean verification accuracy over {', '.join(meta['val_targets'])} (%), mean ± sample sd "
        f"over seeds (n = finished seeds); r18_tiny, {meta['epochs']} epochs per run. Gap "
        "closed: (acc_set - acc_dirty) / (acc_clean - acc_dirty) of the same head, from the "
        "means over the seeds with all three runs, then (per-seed mean ± sd). noise %: "
        "closed + open + low-quality + sketch + non-face samples in the set; clean kept %: "
        "of the dirty set's clean samples.\n\n" + table + "\n"
    )
    write_text_atomic(out / "table.md", text)
    payload = {"meta": meta, "sets": sets, "cells": {f"{k[0]}/{k[1]}/s{k[2]}": v
               for k, v in cells.items()}, "stats": stats}  # fmt: skip
    write_text_atomic(out / "table.json", json.dumps(payload, indent=2, default=float) + "\n")
    _plot(out / "table.png", stats, [n for n in SETS if n in sets], heads)


def _plot(path: Path, stats: dict[str, Any], names: list[str], heads: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.2))
    width = 0.8 / len(heads)
    x = np.arange(len(names))
    finite = []
    for k, head in enumerate(heads):
        means = [100 * stats[f"{n}/{head}"]["mean"] for n in names]
        sds = [100 * stats[f"{n}/{head}"]["sd"] for n in names]
        finite += [m for m in means if not math.isnan(m)]
        ax.bar(x + (k - (len(heads) - 1) / 2) * width, means, width, yerr=sds, capsize=3,
               label=head)  # fmt: skip
    ax.set_xticks(x, names)
    ax.set_ylabel("mean verification accuracy (%)")
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 3), min(100.0, max(finite) + 2))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="head")
    ax.set_title("training set vs accuracy, mean ± sd over seeds")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirty", type=Path, default=Path("/work/data/dirty/train"))
    parser.add_argument("--cleaned", type=Path, help="a `clean run` output directory")
    parser.add_argument("--config", type=Path, default=Path("configs/clean_synthface.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/clean_table"))
    parser.add_argument("--heads", default="arcface,robustface_stable")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1, in order")
    parser.add_argument(
        "--baseline-seeds",
        type=int,
        help="seeds of the small-loss and sub-center rows (default: --seeds)",
    )
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    parser.add_argument("--sets", default=",".join(SETS), help="rows to train")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the base training config, e.g. data.batch_size=16",
    )
    parser.add_argument("--subcenter-threshold", type=float, default=75.0)
    parser.add_argument("--keep-fraction", type=float, help="small-loss: fixed fraction kept")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()

    from robustface.clean.smallloss import small_loss_select
    from robustface.clean.subcenter import subcenter_drop

    heads = args.heads.split(",")
    seeds = list(range(args.seeds))
    wanted = args.sets.split(",")
    unknown = sorted(set(wanted) - set(SETS))
    if unknown:
        parser.error(f"--sets: unknown {unknown}; use {', '.join(SETS)}")
    if "cleaned" in wanted and args.cleaned is None:
        wanted.remove("cleaned")
        print("no --cleaned: the cleaned rows are skipped")
    base = load_config(args.config, [], cls=CleanConfig).base
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    base = apply_overrides(base, {k: yaml.safe_load(str(v)) for k, v in overrides.items()},
                           "--set / --epochs")  # fmt: skip
    dirty = RecordIODataset(args.dirty).rec_path.parent
    out = args.out
    data_dir = out / "data"
    meta = {"dirty": str(dirty), "config": str(args.config), "epochs": base.train.epochs,
            "heads": heads, "seeds": seeds, "val_targets": list(base.data.val_targets),
            "subcenter_threshold": args.subcenter_threshold,
            "keep_fraction": args.keep_fraction,
            "cleaned": str(args.cleaned) if args.cleaned else None}  # fmt: skip
    sets: dict[str, Any] = {}
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = time.perf_counter()

    def head_cfg(head: str, seed: int) -> Config:
        return apply_overrides(base, {"seed": seed, "head.name": head}, f"{head}/s{seed}")

    def train_all(name: str, data: Path, seed: int) -> None:
        sets.setdefault(name, {})
        info = composition(data, dirty)
        if name in ("subcenter", "smallloss"):  # one selection per seed: report their mean
            sets[name].setdefault("per_seed", {})[seed] = info
            per = list(sets[name]["per_seed"].values())
            for key in ("samples", "noise_share", "clean_kept"):
                sets[name][key] = float(np.mean([p[key] for p in per]))
        else:
            sets[name].update(info)
        for head in heads:
            run = out / "runs" / name / head / f"s{seed}"
            cells[(name, head, seed)] = _train(head_cfg(head, seed), data, run, dirty,
                                               args.progress)  # fmt: skip
            meta["seconds"] = round(time.perf_counter() - started, 1)
            summarize(out, cells, sets, heads, seeds, meta)

    clean = truly_clean_set(dirty, data_dir / "clean") if "clean" in wanted else None
    # first the rows the gap is measured on, for every seed; then the baselines
    for seed in seeds:
        if "dirty" in wanted or "smallloss" in wanted:
            train_all("dirty", dirty, seed)
        if clean is not None:
            train_all("clean", clean, seed)
        if "cleaned" in wanted:
            train_all("cleaned", cleaned_set(args.cleaned), seed)
    baseline_seeds = seeds if args.baseline_seeds is None else list(range(args.baseline_seeds))
    meta["baseline_seeds"] = baseline_seeds
    for seed in baseline_seeds:
        if "smallloss" in wanted:
            selection = data_dir / f"smallloss-s{seed}"
            source = out / "runs" / "dirty" / heads[0] / f"s{seed}"
            if not _fresh(selection, "losses.npz", source):
                small_loss_select(source, selection, data=dirty, keep_fraction=args.keep_fraction,
                                  seed=seed, overwrite=True, progress=args.progress)  # fmt: skip
                _stamp(selection, source)
            train_all("smallloss", selection, seed)
        if "subcenter" in wanted:
            sub_cfg = apply_overrides(
                head_cfg("arcface", seed), {"fc.name": "subcenter", "fc.params": {"k": 3}}, "sub"
            )
            sub_run = out / "runs" / "subcenter-base" / "arcface" / f"s{seed}"
            meta.setdefault("subcenter_base", {})[seed] = _train(
                sub_cfg, dirty, sub_run, dirty, args.progress
            )
            drop = data_dir / f"subcenter-s{seed}"
            if not _fresh(drop, "drop.json", sub_run):
                subcenter_drop(sub_run, drop, data=dirty, threshold_deg=args.subcenter_threshold,
                               overwrite=True, progress=args.progress)  # fmt: skip
                _stamp(drop, sub_run)
            train_all("subcenter", drop, seed)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"done in {time.perf_counter() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
