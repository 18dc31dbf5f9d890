"""``robustface clean ...``: the command-line layer over :mod:`robustface.clean`.

Subcommands: ``subcenter-drop`` (Sub-center ArcFace's drop step), ``dirty`` (a dirty SynthFace set
with its truth), ``score`` (per-sample scores and flags from a trained run), ``evaluate``
(flags against the truth), ``run`` (the train / score / remove / retrain loop) and ``small-loss``
(the small-loss selection baseline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_clean_parser"]


def _cmd_subcenter_drop(args: argparse.Namespace) -> int:
    from robustface.clean import subcenter_drop

    report = subcenter_drop(
        args.run_dir,
        args.out,
        data=args.data,
        threshold_deg=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(report.table())
    print(f"kept {report.kept} of {report.total} ({report.rescued} rescued) -> {report.path}")
    return 0


def _cmd_dirty(args: argparse.Namespace) -> int:
    import dataclasses

    from robustface.clean.dirty import DIRTY_PRESETS, DirtySpec, make_dirty_synthface
    from robustface.cli import _load, _synth_overrides

    cfg = _load(args, _synth_overrides(args))
    if args.preset not in DIRTY_PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}: use one of {', '.join(DIRTY_PRESETS)}")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DirtySpec)}
    spec = dataclasses.replace(
        DIRTY_PRESETS[args.preset], **{k: v for k, v in fields.items() if v is not None}
    )
    info = make_dirty_synthface(
        args.out,
        cfg.synth,
        spec,
        noise_seed=args.noise_seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(info.table())
    print(f"wrote {info.train} (train.rec, truth.npz, truth.csv); source {info.source}")
    return 0


def _named_values(
    items: list[str], option: str, cast: type[float] | type[int]
) -> dict[str, float] | dict[str, int]:
    """``["a=1", ...]`` of option ``option`` -> ``{"a": cast("1")}``, or a one-line error."""
    kind = "a number" if cast is float else "an integer"
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{option} must look like NAME=VALUE, got {item!r}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ValueError(f"{option} {key}: not {kind}: {value!r}") from None
    return out


def _cmd_score(args: argparse.Namespace) -> int:
    from robustface.clean.evaluate import evaluation_table
    from robustface.clean.score import StageTimer, flags_table, score_to_dir

    timer = StageTimer()
    summary = score_to_dir(
        args.run_dir,
        args.out,
        data=args.data,
        thresholds=_named_values(args.threshold, "--threshold", float),
        knn=args.knn,
        knn_method=args.knn_method,
        knn_params=_named_values(args.knn_param, "--knn-param", int),
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
        timer=timer,
    )
    print(flags_table(summary["flags"]))
    print(f"merge candidates: {len(summary['merges'])}, split candidates: {len(summary['splits'])}")
    if "evaluation" in summary:
        print("\nagainst the truth (not used to choose anything):\n")
        print(evaluation_table(summary["evaluation"]))
    print(f"\nstages (CPU: this process and its loader workers):\n\n{timer.table()}\n")
    print(f"wrote {args.out} (flags.csv, scores.npz, score.json, angles.png)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from robustface.clean.dirty import load_truth
    from robustface.clean.evaluate import evaluate_flags, evaluation_table
    from robustface.clean.score import FLAGS_CSV, SCORE_JSON, read_flags_csv

    truth = load_truth(args.truth)
    path = args.flags / FLAGS_CSV if args.flags.is_dir() else args.flags
    flag, suggested = read_flags_csv(path, len(truth))
    merges = None
    summary = path.parent / SCORE_JSON
    if summary.is_file():
        merges = [tuple(m) for m in json.loads(summary.read_text(encoding="utf-8"))["merges"]]
    print(evaluation_table(evaluate_flags(flag, suggested, truth, merges)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from robustface.clean.loop import CleanConfig, clean_loop
    from robustface.config import load_config

    cfg = load_config(args.config, args.overrides, cls=CleanConfig)
    summary = clean_loop(cfg, progress=not args.quiet)
    out = Path(cfg.output_dir)
    print((out / "report.md").read_text(encoding="utf-8"), end="")
    print(
        f"cleaned set: {summary['final']}; flags: {out / 'flags.csv'}; report: {out / 'report.md'}"
    )
    return 0


def _cmd_small_loss(args: argparse.Namespace) -> int:
    from robustface.clean.smallloss import small_loss_select, summary_table

    summary = small_loss_select(
        args.run_dir,
        args.out,
        data=args.data,
        keep_fraction=args.keep_fraction,
        p_threshold=args.p_threshold,
        scale=args.scale,
        margin=args.margin,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    table = summary_table(summary)
    if table:
        print("against the truth (not used to choose anything):\n\n" + table + "\n")
    split = summary["split"]
    print(
        f"kept {summary['samples']} samples ({split['method']}; largest kept ArcFace loss "
        f"{split['max_kept_loss']:.3f}) in {summary['classes']} classes -> {args.out}"
    )
    return 0


def add_clean_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``robustface clean ...`` on the top-level subparsers ``sub``."""
    from robustface.cli import _add_config_args, _add_synth_flags

    p = sub.add_parser("clean", help="clean a noisy training set")
    clean_sub = p.add_subparsers(dest="clean_command", required=True, metavar="METHOD")

    q = clean_sub.add_parser(
        "subcenter-drop", help="drop samples far from their class's dominant sub-center"
    )
    q.add_argument("run_dir", type=Path, help="run trained with fc.name: subcenter")
    q.add_argument("--out", required=True, type=Path, help="output directory (cleaned .rec)")
    q.add_argument("--data", type=Path, help="training .rec to clean (default: the run's)")
    q.add_argument("--threshold", type=float, default=75.0, help="max angle in degrees to keep")
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_subcenter_drop)

    q = clean_sub.add_parser(
        "dirty",
        help="a dirty SynthFace training set (label noise, low quality, sketches, non-faces, "
        "duplicate identities) with the truth of every sample",
    )
    q.add_argument("out", type=Path, help="output directory (OUT/synthface, OUT/train)")
    q.add_argument("--preset", default="ms1m-like", help="ms1m-like or MS1MCON-0.20")
    for name, what in (
        ("closed", "closed-set label noise per class"),
        ("open", "open-set label noise per class"),
        ("low_quality", "low-quality faces"),
        ("sketch", "sketches"),
        ("nonface", "non-face images"),
        ("duplicate", "classes repeating another class's person"),
    ):
        q.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            help=f"fraction of {what} (default: the preset's)",
        )
    q.add_argument("--noise-seed", type=int, default=0, help="seed of the label-noise plan")
    q.add_argument("--workers", type=int, help="rendering processes (default: all cores)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT/train")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(q)
    _add_synth_flags(q)
    q.set_defaults(func=_cmd_dirty)

    q = clean_sub.add_parser(
        "score",
        help="score and flag every sample of a training set with a run trained on it",
    )
    q.add_argument("run_dir", type=Path, help="run trained with fc.name: full or subcenter")
    q.add_argument("--out", required=True, type=Path, help="output directory")
    q.add_argument("--data", type=Path, help="training .rec to score (default: the run's)")
    q.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fix a threshold instead of reading it off the scores (angle_own, angle_hard, "
        "angle_member, angle_any, angle_any_soft, norm_low, norm_floor, stroke, stroke_soft, "
        "stroke_tones, tones_low, skin_low, colour_low, colour_high, knn_share); repeatable",
    )
    q.add_argument("--knn", type=int, default=10, help="neighbours of the kNN label purity")
    q.add_argument(
        "--knn-method",
        default="auto",
        help="kNN index: auto (flat below 200K samples, else ivf), flat, ivf or hnsw",
    )
    q.add_argument(
        "--knn-param",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="kNN index parameter (nlist, nprobe, hnsw_m, ef_search, shard_size, batch_size); "
        "repeatable",
    )
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument(
        "--workers",
        type=int,
        default=0,
        help="loader processes decoding images and their statistics (0: in the main process)",
    )
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_score)

    q = clean_sub.add_parser(
        "run",
        help="the loop: train, score, clean, retrain until little changes (resumable)",
    )
    _add_config_args(q, positional=True)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_run)

    q = clean_sub.add_parser(
        "small-loss",
        help="keep the samples with the smallest ArcFace loss under a run trained on the set "
        "(DivideMix's 2-component mixture, or --keep-fraction)",
    )
    q.add_argument("run_dir", type=Path, help="run trained on the set (fc full or subcenter)")
    q.add_argument("--out", required=True, type=Path, help="output directory (the kept set)")
    q.add_argument("--data", type=Path, help="training .rec to select from (default: the run's)")
    q.add_argument(
        "--keep-fraction",
        type=float,
        help="keep this lowest-loss fraction (default: a 2-component mixture on the losses)",
    )
    q.add_argument(
        "--p-threshold",
        type=float,
        default=0.5,
        help="keep when the mixture's low-loss posterior exceeds this (DivideMix: 0.5)",
    )
    q.add_argument("--scale", type=float, help="ArcFace scale (default: the run's head scale)")
    q.add_argument("--margin", type=float, default=0.5, help="ArcFace margin in radians")
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_small_loss)

    q = clean_sub.add_parser("evaluate", help="score a flags file against a dirty set's truth")
    q.add_argument("flags", type=Path, help="flags.csv (or the directory of clean score)")
    q.add_argument("--truth", required=True, type=Path, help="truth.npz or its directory")
    q.set_defaults(func=_cmd_evaluate)
