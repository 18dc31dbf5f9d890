"""``robustface clean ...``: the command-line layer over :mod:`robustface.clean`.

Subcommands: ``subcenter-drop`` (Sub-center ArcFace's drop step), ``dirty`` (a dirty SynthFace set
with its truth), ``score`` (per-sample scores and flags from a trained run), ``evaluate``
(flags against the truth) and ``run`` (the train / score / remove / retrain loop).
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
