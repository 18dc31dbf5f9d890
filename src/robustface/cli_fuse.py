"""``robustface fuse ...``: the command-line layer over :mod:`robustface.fuse`.

``fuse extract MODEL TRAIN_DIR --out FEATS`` writes CAFace training features
(:func:`robustface.fuse.extract.extract_fusion_features`); ``fuse train CONFIG [--set KEY=VALUE]``
trains CAFace on them (:func:`robustface.fuse.training.train_caface`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_fuse_parser"]


def _cmd_extract(args: argparse.Namespace) -> int:
    from robustface.cli import model_args
    from robustface.fuse.extract import FusionFeatures, extract_fusion_features

    out = extract_fusion_features(
        args.model,
        args.train_dir,
        args.out,
        views=args.views,
        batch_size=args.batch_size,
        blocks=args.blocks,
        seed=args.seed,
        progress=not args.quiet,
        model_options=model_args(args),
        device=args.device,
    )
    data = FusionFeatures.open(out)
    print(
        f"{out}: {data.num_images} images x {data.views} views, features {data.dim}-d, styles "
        f"{data.style_channels} channels ({', '.join(data.meta['key']['blocks'])}), "
        f"{data.num_classes} classes"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from robustface.fuse.training import load_fuse_config, train_caface

    cfg = load_fuse_config(args.config, args.overrides)
    if args.quiet:
        cfg.train.progress = False
    path = train_caface(cfg, out_dir=args.out)
    print(f"trained CAFace: {path} (load with CAFaceAggregator(model=PATH) or --fusion-model)")
    return 0


def add_fuse_parser(sub: Any) -> None:
    """Register ``fuse`` and its subcommands on the top-level subparsers ``sub``."""
    from robustface.cli import _add_config_args, add_model_args

    p = sub.add_parser("fuse", help="feature fusion (CAFace): extract training features, train")
    fuse_sub = p.add_subparsers(dest="fuse_command", required=True, metavar="COMMAND")

    q = fuse_sub.add_parser(
        "extract",
        help="K augmented views per training image: fp16 features + styles for CAFace training",
    )
    q.add_argument("model", type=Path, help="run directory or .pth backbone (not ONNX)")
    q.add_argument("train_dir", type=Path, help=".rec training set, or its (SynthFace) directory")
    q.add_argument("--out", required=True, type=Path, help="feature directory to write")
    q.add_argument("--views", type=int, default=16, help="augmented views per image (16)")
    q.add_argument(
        "--batch-size", type=int, default=32, help="images per forward batch (x views + 1)"
    )
    q.add_argument(
        "--blocks", nargs="+", help="style blocks (default: the backbone's stage 2 and 3 ends)"
    )
    q.add_argument("--seed", type=int, default=0, help="augmentation seed")
    q.add_argument("--device", default="cpu", help="torch device of the backbone (cpu, cuda)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(q)
    q.set_defaults(func=_cmd_extract)

    q = fuse_sub.add_parser("train", help="train CAFace on extracted features (configs/fuse/)")
    _add_config_args(q, positional=True)
    q.add_argument("--out", type=Path, help="run directory (default: output_dir of the config)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_train)
