"""``robustface fuse ...``: the command-line layer over :mod:`robustface.fuse`.

``fuse extract MODEL TRAIN_DIR --out FEATS`` writes CAFace training features
(:func:`robustface.fuse.extract.extract_fusion_features`); ``fuse train CONFIG [--set KEY=VALUE]``
trains CAFace on them (:func:`robustface.fuse.training.train_caface`); ``fuse plot MODEL DATA
--fusion-model CKPT --out PNG`` draws one SynthFace track's per-frame cosines and fusion weights
(:mod:`robustface.fuse.plot`).
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
    path = train_caface(cfg, out_dir=args.out, out_name="--out")
    print(f"trained CAFace: {path} (load with CAFaceAggregator(model=PATH) or --fusion-model)")
    return 0


def _track_dir(data: Path) -> Path:
    """A track directory, or the first ``tracks_s*`` of a fusion benchmark's output."""
    if (data / "tracks.json").is_file():
        return data
    found = sorted(p for p in data.glob("tracks_s*") if (p / "tracks.json").is_file())
    if not found:
        raise FileNotFoundError(
            f"{data}: neither a track directory (tracks.json) nor a fusion benchmark output "
            "with tracks_s*/ (benchmarks/fusion_lowq.py)"
        )
    return found[0]


def _cmd_plot(args: argparse.Namespace) -> int:
    from robustface.cli import model_args
    from robustface.data.synth.tracks import read_tracks
    from robustface.fuse import AGGREGATORS, CAFaceAggregator
    from robustface.fuse.build import check_fusion_model
    from robustface.fuse.plot import plot_track_fusion, track_plot_data
    from robustface.models.loading import load_backbone
    from robustface.utils.guards import check_int

    aggregators = {}
    for name in args.fusion:
        if name != "caface":
            aggregators[name] = AGGREGATORS.build(name)
        elif args.fusion_model is None:
            raise ValueError(
                "--fusion-model: the caface panel needs a CAFace checkpoint (robustface fuse "
                "train's caface.ckpt or the released .ckpt); or pass --fusion mean norm_weighted"
            )
        else:
            aggregators[name] = CAFaceAggregator(args.fusion_model, chunk_size=args.chunk_size)
    root = _track_dir(args.data)
    # named as the options, before loading the model (track_plot_data names its parameters)
    check_int("--track", args.track, 0, len(read_tracks(root)["tracks"]) - 1)
    if args.length is not None:
        check_int("--length", args.length, 1)
    model, size = load_backbone(args.model, **model_args(args))
    if "caface" in aggregators:  # before embedding the track, naming the files
        check_fusion_model(
            aggregators["caface"],
            model,
            size,
            style_blocks=args.blocks,
            fusion_model=args.fusion_model,
        )
    data = track_plot_data(
        model, size, root, aggregators, track=args.track, length=args.length, blocks=args.blocks
    )
    plot_track_fusion(data, args.out, x=args.x)
    fused = ", ".join(f"{k} {v:.3f}" for k, v in data.fused_cosine.items())
    print(
        f"wrote {args.out}: track {data.track} of {root} ({len(data.cosine)} frames, identity "
        f"{data.identity}); fused cosine to the gallery: {fused}"
    )
    return 0


def add_fuse_parser(sub: Any) -> None:
    """Register ``fuse`` and its subcommands on the top-level subparsers ``sub``."""
    from robustface.cli import _add_config_args, add_model_args

    p = sub.add_parser(
        "fuse", help="feature fusion (CAFace): extract training features, train, plot a track"
    )
    fuse_sub = p.add_subparsers(dest="fuse_command", required=True, metavar="COMMAND")

    q = fuse_sub.add_parser(
        "extract",
        help="K augmented views per training image: fp16 features + styles for CAFace training",
    )
    q.add_argument("model", type=Path, help="run directory or .pth backbone (not ONNX)")
    q.add_argument("train_dir", type=Path, help=".rec training set, or its (SynthFace) directory")
    q.add_argument("--out", required=True, type=Path, help="feature directory to write")
    q.add_argument(
        "--views", type=int, default=16, help="augmented views per image (default: %(default)s)"
    )
    q.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per forward batch, each as views + 1 images (default: %(default)s)",
    )
    q.add_argument(
        "--blocks", nargs="+", help="style blocks (default: the backbone's stage 2 and 3 ends)"
    )
    q.add_argument("--seed", type=int, default=0, help="augmentation seed (default: %(default)s)")
    q.add_argument(
        "--device", default="cpu", help="torch device of the backbone (default: %(default)s)"
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(q)
    q.set_defaults(func=_cmd_extract)

    q = fuse_sub.add_parser("train", help="train CAFace on extracted features (configs/fuse/)")
    _add_config_args(q, positional=True, example="train.epochs=5")
    q.add_argument("--out", type=Path, help="run directory (default: output_dir of the config)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_train)

    q = fuse_sub.add_parser(
        "plot",
        help="one SynthFace track: per-frame cosine to the gallery coloured by fusion weight",
    )
    q.add_argument("model", type=Path, help="backbone: run directory or .pth (not ONNX)")
    q.add_argument(
        "data", type=Path, help="track directory, or a fusion benchmark output (its tracks_s*)"
    )
    q.add_argument("--out", required=True, type=Path, help="PNG to write")
    q.add_argument(
        "--fusion-model",
        type=Path,
        help="CAFace checkpoint for the caface panel; without one the default --fusion "
        "(mean caface) is refused: pass --fusion mean norm_weighted",
    )
    q.add_argument(
        "--fusion",
        nargs="+",
        default=["mean", "caface"],
        choices=["mean", "norm_weighted", "caface"],
        help="one panel per fusion (default: mean caface)",
    )
    q.add_argument("--track", type=int, default=0, help="track index in tracks.json")
    q.add_argument("--length", type=int, help="first frames of the track (default: all)")
    q.add_argument(
        "--x", choices=["frame", "quality"], default="frame", help="x axis: frame index or quality"
    )
    q.add_argument("--chunk-size", type=int, default=512, help="CAFace chunk size")
    q.add_argument(
        "--blocks", nargs="+", help="style blocks (default: the backbone's stage 2 and 3 ends)"
    )
    add_model_args(q)
    q.set_defaults(func=_cmd_plot)
