"""``robustface invert ...``: the command-line layer over :mod:`robustface.invert`.

``invert run [--config FILE] [--set KEY=VALUE ...]`` inverts a model (config: ``InvertConfig``,
e.g. ``configs/invert_tiny_cpu.yaml``); ``invert eval OUT --model MODEL`` scores the inversions
of a finished run with another, independent model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_invert_parser"]


def _cmd_run(args: argparse.Namespace) -> int:
    from robustface.config import load_config
    from robustface.invert import InvertConfig, run_inversion
    from robustface.invert.run import format_scores

    overrides = list(args.overrides)
    if args.quiet:
        overrides.append("progress=false")
    cfg = load_config(args.config, overrides, cls=InvertConfig)
    results = run_inversion(cfg, overwrite=args.overwrite)
    out = Path(cfg.output_dir)
    print(format_scores(results["scores"]))
    print(f"\n{len(results['targets'])} inversions in {results['seconds']:.0f} s -> {out}")
    print(f"grid: {out / 'grid.png'}   losses: {out / 'losses.png'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from robustface.cli import model_args
    from robustface.invert import rescore
    from robustface.invert.run import format_scores

    scores = rescore(args.out, args.model, **model_args(args))
    print(format_scores(scores))
    if args.json:
        print(json.dumps(scores, indent=2))
    return 0


def add_invert_parser(sub: Any) -> None:
    """Add ``invert`` and its sub-commands to the top-level sub-parser action ``sub``."""
    from robustface.cli import add_model_args

    p = sub.add_parser(
        "invert", help="model inversion: faces from class centres, embeddings or images"
    )
    cs = p.add_subparsers(dest="invert_command", required=True, metavar="COMMAND")
    q = cs.add_parser("run", help="invert a model towards the targets of a config")
    q.add_argument(
        "--config", type=Path, help="YAML config (see configs/invert_*.yaml; default: built-in)"
    )
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model=runs/tiny --set optim.steps=500 "
        "(repeatable)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_run)
    q = cs.add_parser("eval", help="score a run's inversions with another, independent model")
    q.add_argument("out", type=Path, help="output directory of 'invert run'")
    q.add_argument(
        "--model",
        required=True,
        type=Path,
        help="independent model: run directory, .pth, .onnx (class targets need a run "
        "directory trained on the same classes: its classifier scores them)",
    )
    add_model_args(q, "the --model .pth")
    q.add_argument("--json", action="store_true", help="also print the scores as JSON")
    q.set_defaults(func=_cmd_eval)
