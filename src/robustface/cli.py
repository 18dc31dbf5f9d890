"""The ``robustface`` command line: a thin layer over functions usable from Python.

Commands: ``demo``, ``train``, ``eval verification``, ``eval ijb``, ``eval megaface``, ``synth``,
``noise``,
``clean dirty|score|evaluate|run|subcenter-drop``, ``experiment``, ``convert``, ``inspect``,
``export onnx``, ``report``, ``cluster simulate|extract|knn|train|run|eval|benchmark``,
``fuse extract|train|plot``, ``embed``, ``verify``, ``gallery build|add|remove|search``,
``invert run|eval``.
``eval`` commands take a run directory, a ``.pth`` checkpoint or an ``.onnx`` model. Every
command that takes a config accepts ``--config FILE.yaml`` (``train``, ``experiment``: a
positional CONFIG) and repeated ``--set key.sub=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from robustface import __version__
from robustface.cli_clean import add_clean_parser
from robustface.cli_cluster import add_cluster_parser
from robustface.cli_deploy import add_deploy_parser
from robustface.cli_fuse import add_fuse_parser
from robustface.cli_invert import add_invert_parser
from robustface.config import Config, SynthConfig, load_config
from robustface.errors import RobustfaceError
from robustface.utils.run import RunDir


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no default or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is False  # a flag; a default of 0 (== False) is shown
            or default == argparse.SUPPRESS
            or (isinstance(default, list) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)"


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subparsers inherit the class."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


_SYNTH_HELP = {
    "seed": "random seed of identities and samples",
    "identities": "training identities",
    "images_per_identity": "training images per identity",
    "open_set_identities": "identities of the open-set noise source (open_set/)",
    "open_set_images_per_identity": "images per open-set identity",
    "test_identities": "identities of the verification sets (>= 20)",
    "sibling_rate": "fraction of identities that are near-duplicates of the previous one",
    "image_size": "side of the square images in pixels",
    "difficulty": "scale of all nuisance magnitudes (pose, blur, occlusion...)",
    "sketch_fraction": "fraction of training samples drawn as sketches",
    "nonface_fraction": "fraction of training samples replaced by non-faces",
    "lowq_fraction": "fraction of training samples rendered with the low_quality profile",
    "duplicate_fraction": "fraction of training classes that repeat another class's person",
    "lfw_pairs": "frontal pairs of lfw.bin (multiple of 20)",
    "cfp_fp_pairs": "frontal-profile pairs of cfp_fp.bin (multiple of 20)",
    "lowq_pairs": "frontal-low-quality pairs of lowq.bin (multiple of 20)",
    "ijb_identities": "identities of the IJB-like set IJBS/ (0: none)",
    "ijb_templates_per_identity": "IJB templates per identity",
    "ijb_max_media_per_template": "most media per IJB template",
    "ijb_max_images_per_media": "most images per IJB medium",
    "ijb_impostor_ratio": "IJB impostor template pairs per genuine pair",
    "image_folder": "also write the training set as images/<label>/<n>.jpg",
}


def _add_config_args(
    parser: argparse.ArgumentParser, positional: bool = False, example: str = "synth.identities=200"
) -> None:
    """CONFIG (or ``--config``) and ``--set KEY=VALUE``, ``example`` a key of that config."""
    if positional:
        parser.add_argument("config", type=Path, help="YAML config (see configs/)")
    else:
        parser.add_argument("--config", type=Path, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _add_far_reading(parser: argparse.ArgumentParser, rate: str, tpir: bool = False) -> None:
    also = " (and TPIR at an FPIR below 1/non-mated probes)" if tpir else ""
    parser.add_argument(
        "--far-reading",
        choices=["measurable", "insightface"],
        default="measurable",
        help=f"{rate} at a FAR below 1/impostor pairs{also}: 'n/m' (not measurable, the default) "
        "or insightface's number marked '*', for comparisons with its tables",
    )


def _add_fusion_model(parser: argparse.ArgumentParser) -> None:
    """``--fusion-model``: the CAFace checkpoint of ``--aggregation caface`` (ijb, megaface)."""
    parser.add_argument(
        "--fusion-model",
        type=Path,
        help="CAFace checkpoint (.ckpt) for --aggregation caface, which refuses to run without "
        "one; the other aggregations take none",
    )


def _add_synth_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SynthConfig field (``--images-per-identity 20``); each is a synth.* override."""
    group = parser.add_argument_group("SynthFace parameters (override --config and --set)")
    hints = typing.get_type_hints(SynthConfig)
    for field in dataclasses.fields(SynthConfig):
        flag = "--" + field.name.replace("_", "-")
        tp = hints[field.name]
        text = f"{_SYNTH_HELP[field.name]} (default: synth.{field.name} of the config"
        text += "; off)" if tp is bool else f"; built-in {field.default})"
        dest = f"synth_{field.name}"
        if tp is bool:
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        else:
            metavar = tp.__name__.upper()
            group.add_argument(flag, dest=dest, type=tp, default=None, metavar=metavar, help=text)


def add_model_args(parser: argparse.ArgumentParser, what: str = "a .pth") -> None:
    """The flags of commands that load a model: architecture, colour order, the unsafe opt-in."""
    group = parser.add_argument_group(
        "model (architecture from a run's config or read from a .pth's weights; flags must agree)"
    )
    group.add_argument("--backbone", help=f"architecture of {what}, e.g. r50 (default: inferred)")
    group.add_argument(
        "--embedding-size", type=int, help=f"embedding size of {what} (default: inferred)"
    )
    group.add_argument(
        "--width", type=float, help=f"channel multiplier of {what} (default: inferred)"
    )
    group.add_argument(
        "--input-size",
        type=int,
        help="model input size (default: the run's, else the backbone's if the weights fit it)",
    )
    group.add_argument(
        "--color-order",
        choices=["RGB", "BGR"],
        help="channel order the weights expect (default: RGB for runs, the family's for files)",
    )
    group.add_argument(
        "--unsafe-legacy-load",
        action="store_true",
        help="unpickle a model file in full, not weights-only: this RUNS ANY CODE the file "
        "contains; only for old files from a source you trust",
    )


def model_args(args: argparse.Namespace) -> dict[str, typing.Any]:
    """Keyword arguments of ``load_backbone`` from the flags of :func:`add_model_args`."""
    names = ("backbone", "embedding_size", "width", "input_size", "color_order")
    return {n: getattr(args, n) for n in (*names, "unsafe_legacy_load")}


def _synth_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for field in dataclasses.fields(SynthConfig):
        value = getattr(args, f"synth_{field.name}", None)
        if value is not None:
            out.append(
                f"synth.{field.name}={str(value).lower() if isinstance(value, bool) else value}"
            )
    return out


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    return load_config(args.config, [*args.overrides, *extra])


def _cmd_synth(args: argparse.Namespace) -> int:
    from robustface.data.synth.builder import build_synthface

    cfg = _load(args, _synth_overrides(args))
    info = build_synthface(
        args.out, cfg.synth, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet
    )
    print(
        f"SynthFace: {info.summary['images']} images in {info.seconds:.1f} s "
        f"({info.images_per_second:.0f} images/s, {info.workers} workers) -> {info.path}"
    )
    return 0


def _cmd_noise(args: argparse.Namespace) -> int:
    from robustface.data.noise import inject_noise, noise_summary_table

    info = inject_noise(
        args.train,
        args.out,
        args.setting,
        open_source=args.open_source,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(noise_summary_table(info.plan))
    print(f"{info.setting} (seed {args.seed}) in {info.seconds:.1f} s -> {info.path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from robustface.demo import DEMO_RECIPE, run_demo

    overrides = [f"output_dir={args.out}"] if args.out else []
    if args.config is None:
        args.config = DEMO_RECIPE
    cfg = _load(args, [*overrides, *_synth_overrides(args)])
    run_demo(
        cfg,
        noise=args.noise,
        robust_head=args.robust_head,
        clean=not args.no_clean,
        workers=args.workers,
        progress=not args.quiet,
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from robustface.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.verification:
        from robustface.evaluate.verification import format_results

        print(format_results(result.verification))
    print(f"{result.steps} steps, final loss {result.loss:.4f}; backbone: {result.backbone_path}")
    return 0


def _verification_dirs(checkpoint: Path, data_dir: Path | None) -> list[tuple[Path, str]]:
    """Where ``eval verification --targets`` looks, each with the reason: ``--data-dir`` if
    given, else the run's verification directory (as its training found it) and the current one."""
    if data_dir is not None:
        return [(data_dir, "--data-dir")]
    dirs = []
    run = RunDir(checkpoint)
    if run.is_run:
        found = run.config().data.verification_dir(checkpoint)
        if found is not None:
            dirs.append((found, "the run's data.val_dir / data.path"))
    return [*dirs, (Path("."), "the current directory")]


def _find_verification_set(name: str, dirs: list[tuple[Path, str]]) -> Path:
    """``NAME.bin`` in the first of ``dirs`` that has it; the error names every one searched."""
    for directory, _ in dirs:
        if (directory / f"{name}.bin").is_file():
            return directory / f"{name}.bin"
    searched = "; ".join(f"{d} ({why})" for d, why in dirs)
    raise FileNotFoundError(
        f"{name}.bin: verification set not found in {searched}: set --data-dir or give --bins FILE"
    )


def _cmd_eval_verification(args: argparse.Namespace) -> int:
    import json

    from robustface.evaluate.verification import format_results, verify_bin
    from robustface.models.loading import load_backbone, weights_file
    from robustface.utils.io import write_text_atomic

    model, input_size = load_backbone(args.checkpoint, **model_args(args), device=args.device)
    weights = weights_file(args.checkpoint)
    files = [Path(b) for b in args.bins]
    targets = args.targets
    run = RunDir(args.checkpoint)
    if not files and not targets and run.is_run:
        targets = run.config().data.val_targets
        if targets:
            print(f"sets: the run's data.val_targets {' '.join(targets)}", file=sys.stderr)
    if targets:
        dirs = _verification_dirs(args.checkpoint, args.data_dir)
        files += [
            Path(t) if t.endswith(".bin") else _find_verification_set(t, dirs) for t in targets
        ]
    if not files:
        raise FileNotFoundError(
            f"{args.checkpoint}: no verification set given: use --bins FILE... or --targets "
            "NAME... (a run directory's default, its data.val_targets, is empty)"
            if run.is_run
            else "no verification set given: use --bins FILE... or --targets NAME..."
        )
    results = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: verification set not found")
        results[file.stem] = verify_bin(
            file,
            model,
            batch_size=args.batch_size,
            device=args.device,
            input_size=input_size,
            show_progress=not args.quiet,
        )
    print(f"weights: {weights}")
    print(format_results(results, args.far_reading))
    if args.out:
        keep = ("accuracy_mean", "accuracy_std", "threshold", "val", "val_std", "far", "xnorm")
        keep += ("val_insightface", "val_std_insightface", "val_impostor_pairs")
        keep += ("min_measurable_far", "far_target")
        # the weights file in each set's entry: a top-level key would not be a set for `report`
        slim = {
            k: {**{m: v[m] for m in keep if m in v}, "weights": str(weights.resolve())}
            for k, v in results.items()
        }
        write_text_atomic(args.out, json.dumps(slim, indent=2) + "\n")
    return 0


def _cmd_eval_megaface(args: argparse.Namespace) -> int:
    from robustface.evaluate.megaface import (
        FeatureSource,
        ImageEmbedder,
        fusion_record,
        run_megaface,
        write_megaface_report,
    )
    from robustface.evaluate.report import model_fingerprint
    from robustface.fuse.build import build_aggregator, check_fusion_model
    from robustface.models.loading import load_backbone

    fusion = None  # norm_weighted: image + flip summed, as insightface
    record = fusion_record(args.aggregation)
    if args.aggregation != "norm_weighted" or args.fusion_model is not None:
        fusion = build_aggregator(
            args.aggregation,
            fusion_model=args.fusion_model,
            unsafe_legacy_load=args.unsafe_legacy_load,
        )
        if args.fusion_model is not None:
            record = fusion_record(args.aggregation, model_fingerprint(args.fusion_model)["sha256"])
    embedder = None
    if args.model is not None and (args.probe_images or args.distractor_images):
        model, input_size = load_backbone(args.model, **model_args(args), device=args.device)
        blocks = None if args.style_blocks is None else tuple(args.style_blocks)
        if fusion is not None:
            check_fusion_model(
                fusion, model, input_size, style_blocks=blocks, fusion_model=args.fusion_model
            )
        embedder = ImageEmbedder(model, input_size, args.batch_size, args.device, fusion, blocks)
    probe = FeatureSource(
        args.probe_features,
        args.probe_images,
        args.probe_list,
        args.probe_labels,
        args.facescrub_noises,
    )
    distractors = FeatureSource(
        args.distractor_features,
        args.distractor_images,
        args.distractor_list,
        noises=args.megaface_noises,
    )
    run = run_megaface(
        probe,
        distractors,
        embedder=embedder,
        model_sha256=model_fingerprint(args.model)["sha256"] if args.model is not None else None,
        file_ending=args.file_ending,
        cache_dir=args.cache,
        sizes=args.sizes,
        max_rank=args.max_rank,
        far=args.far,
        far_reading=args.far_reading,
        progress=not args.quiet,
        fusion=record,
    )
    print(run.table)
    if args.out:
        path = write_megaface_report(
            args.out, run.results, run.table, model=args.model, config=run.config
        )
        print(f"wrote {path}")
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from robustface.deploy.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx

    report = export_onnx(
        args.checkpoint,
        args.out,
        opset=args.opset,
        check=not args.no_check,
        atol=args.atol,
        overwrite=args.overwrite,
        **model_args(args),
    )
    s = report.input_size
    print(
        f"wrote {report.path}: {INPUT_NAME} N x 3 x {s} x {s} (RGB, (x - 127.5) / 127.5) -> "
        f"{OUTPUT_NAME} N x {report.embedding_size}, opset {report.opset}"
    )
    if report.max_abs_diff is not None:
        print(
            f"onnxruntime vs PyTorch: max |diff| {report.max_abs_diff:.3g} raw, "
            f"{report.max_abs_diff_normalised:.3g} normalised (atol {report.atol:g})"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from robustface.evaluate.compare import combine
    from robustface.utils.io import write_text_atomic

    table = combine(args.runs, args.far_reading)
    print(table)
    if args.out:
        write_text_atomic(args.out, table + "\n")
    return 0


def _cmd_eval_ijb(args: argparse.Namespace) -> int:
    from robustface.data.ijb import read_ijb_meta
    from robustface.evaluate.ijb import (
        IJBSettings,
        build_fusion,
        checkpoint_key,
        embed_ijb,
        is_fusion_aggregation,
        read_ijb_1n_meta,
        score_ijb,
        write_ijb_report,
    )
    from robustface.fuse.build import check_fusion_model
    from robustface.models.loading import load_backbone

    settings = IJBSettings(
        aggregation=args.aggregation,
        far_mode=args.far_mode,
        far_reading=args.far_reading,
        flip=args.flip,
        faceness=args.faceness,
        align_rule=args.align_rule,
        score_dtype="float64" if args.float64 else "float32",
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        fusion_model=args.fusion_model,
        fusion_chunk_size=args.fusion_chunk_size,
        style_blocks=args.style_blocks,
    )
    out = args.out
    if out is None:
        out = (args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent) / "eval"
    meta = read_ijb_meta(args.data, args.name)
    one_n = read_ijb_1n_meta(args.data, args.name)
    model, input_size = load_backbone(args.checkpoint, **model_args(args), device=args.device)
    fusion = None
    if is_fusion_aggregation(settings.aggregation):  # checked before the long embedding
        fusion = build_fusion(settings, unsafe_legacy_load=args.unsafe_legacy_load)
        check_fusion_model(
            fusion,
            model,
            input_size,
            style_blocks=settings.style_blocks,
            fusion_model=settings.fusion_model,
        )
    embedded = embed_ijb(
        model,
        meta,
        settings,
        input_size=input_size,
        model_key=checkpoint_key(args.checkpoint, args.backbone, args.color_order),
        cache_dir=args.cache if args.cache is not None else out / "cache",
        show_progress=not args.quiet,
    )
    scores = score_ijb(embedded, meta, settings, one_n, fusion=fusion, show_progress=not args.quiet)
    results = write_ijb_report(
        out,
        meta,
        embedded,
        scores,
        settings,
        label=args.checkpoint.stem,
        checkpoint=args.checkpoint,
    )
    report = Path(results["report"])
    print(report.with_suffix(".md").read_text(encoding="utf-8"), end="")
    print(f"wrote {report} (+ .md, ROC/CMC .png)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from robustface.train.experiment import ExperimentConfig, run_experiment

    exp = load_config(args.config, args.overrides, cls=ExperimentConfig)
    results = run_experiment(exp, progress=not args.quiet, retry_failed=args.retry_failed)
    failed = [r for r in results if r.error is not None]
    print(f"{len(results) - len(failed)} cells finished, {len(failed)} failed: {exp.output_dir}")
    return 1 if failed else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from robustface.data.folder import folder_to_rec

    size = (args.image_size, args.image_size) if args.image_size else None
    out = folder_to_rec(
        args.src,
        args.out,
        image_size=size,
        quality=args.quality,
        show_progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from robustface.data.inspect import inspect_dataset

    report = inspect_dataset(
        args.path, quick=args.quick, max_problems=args.max_problems, progress=not args.quiet
    )
    print(report.text)
    if report.ok:
        return 0
    shown = len(report.problems)
    first = f" (the first {shown} listed)" if shown < report.num_problems else ""
    print(f"\n{report.num_problems} problem(s) found{first}:")
    print("\n".join(f"- {p}" for p in report.problems))
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``robustface`` command."""
    parser = _ArgumentParser(
        prog="robustface",
        description="Face recognition on noisy data: train, clean, evaluate, cluster.",
    )
    parser.add_argument("--version", action="version", version=f"robustface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="the pipeline on SynthFace on a CPU in minutes (recipe: robustface/recipes/demo.yaml)",
    )
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default: output_dir of the config, runs/demo)")
    p.add_argument("--noise", default="MS1MCON-0.20", help="label noise of the training set")
    p.add_argument(
        "--robust-head",
        default="robustface_stable",
        help="head compared with the config's head (ArcFace in the recipe)",
    )
    p.add_argument(
        "--no-clean",
        action="store_true",
        help="skip the cleaning round (scoring with the robust head's model, retraining on the "
        "cleaned set)",
    )
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_synth_flags(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("synth", help="generate a SynthFace benchmark directory")
    _add_config_args(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_synth_flags(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("noise", help="copy a .rec training set with synthetic label noise")
    p.add_argument("train", type=Path, help="training set: a .rec or a directory (e.g. SynthFace)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--setting",
        required=True,
        help="clean, C20, C20O20, C10O30, C30O10, MS1MCON-0.20, or C<pct>O<pct>",
    )
    p.add_argument(
        "--open-source", type=Path, help="open-set images (default: TRAIN/open_set if present)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise plan")
    p.add_argument("--overwrite", action="store_true", help="replace an existing noise --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_noise)

    p = sub.add_parser(
        "train",
        help="train a backbone + classifier + margin head",
        description="Train from CONFIG into its output_dir (docs/training.md). The data: "
        "data.source=rec with data.path a .rec directory (insightface layout; the val_targets "
        ".bin sets beside it), data.source=folder with data.path one sub-folder of images per "
        "identity and data.val_dir the directory of the .bin sets, or data.source=synthface "
        "(rendered from the synth section). An interrupted run continues with --set "
        "train.resume=auto.",
    )
    _add_config_args(p, positional=True, example="data.path=/data/faces_emore")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a model")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="PROTOCOL")
    q = eval_sub.add_parser("verification", help="1:1 verification on .bin pair sets (10-fold)")
    q.add_argument(
        "checkpoint", type=Path, help="run directory, a backbone state_dict .pth or an .onnx model"
    )
    add_model_args(q)
    q.add_argument("--bins", nargs="*", default=[], help=".bin files")
    q.add_argument(
        "--data-dir",
        type=Path,
        help="directory of the --targets .bin files (default: the run's verification directory, "
        "then the current one)",
    )
    q.add_argument(
        "--targets",
        nargs="*",
        default=[],
        help="set names, e.g. lfw cfp_fp agedb_30 (default, without --bins: a run directory's "
        "data.val_targets)",
    )
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--out", type=Path, help="write the results as JSON")
    _add_far_reading(q, "VAL")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_eval_verification)

    q = eval_sub.add_parser(
        "ijb", help="IJB-B/C: 1:1 template verification (TAR@FAR) and 1:N identification"
    )
    q.add_argument(
        "checkpoint", type=Path, help="run directory, a backbone state_dict .pth or an .onnx model"
    )
    q.add_argument(
        "--data", required=True, type=Path, help="IJB directory with meta/ and loose_crop/"
    )
    q.add_argument("--name", default="IJBC", help="set name, prefix of the meta files (IJBB, IJBC)")
    q.add_argument("--out", type=Path, help="report directory (default: eval/ by the checkpoint)")
    q.add_argument("--cache", type=Path, help="embedding cache directory (default: OUT/cache)")
    q.add_argument(
        "--aggregation",
        default="norm_weighted",
        help="template aggregation: norm_weighted (insightface's default) or mean, pooled per "
        "media then template; caface: each template's images fused at once (needs "
        "--fusion-model)",
    )
    _add_fusion_model(q)
    q.add_argument(
        "--fusion-chunk-size",
        type=int,
        help="caface: fuse a template in chunks of this many frames with the memory "
        "(default: the whole template at once, as upstream's IJB evaluation)",
    )
    q.add_argument(
        "--style-blocks",
        nargs="+",
        help="caface: backbone blocks whose maps give the styles (default: the ends of stages "
        "2 and 3, IR-101's body.15 and body.45)",
    )
    q.add_argument(
        "--far-mode",
        choices=["closest", "conservative"],
        default="closest",
        help="TAR@FAR reading: closest ROC point (insightface) or best TPR with FPR <= FAR",
    )
    _add_far_reading(q, "TAR", tpir=True)
    q.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="add the flipped image (default: on for mean/norm_weighted, off for caface; with "
        "caface each mirror is one more frame of the set)",
    )
    q.add_argument(
        "--faceness",
        action=argparse.BooleanOptionalAction,
        help="weight images by faceness (default: on for mean/norm_weighted; caface cannot)",
    )
    q.add_argument(
        "--align-rule",
        choices=["scale", "insightface"],
        default="scale",
        help="template at sizes other than 112: scaled by size/112, or insightface's 128-px rule",
    )
    q.add_argument(
        "--float64", action="store_true", help="score pairs in float64 (insightface's precision)"
    )
    add_model_args(q)
    q.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--workers", type=int, default=4, help="image decoding threads")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_eval_ijb)

    q = eval_sub.add_parser(
        "megaface",
        help="MegaFace identification (CMC) and verification (TAR@FAR) with distractors",
    )
    q.add_argument(
        "model",
        nargs="?",
        type=Path,
        help="checkpoint or .onnx: embeds --*-images, else is recorded in the report",
    )
    q.add_argument("--probe-features", type=Path, help=".npz cache, .npy or devkit FaceScrub dir")
    q.add_argument("--probe-labels", type=Path, help="identity per probe (.npy or text lines)")
    q.add_argument("--probe-list", type=Path, help="devkit facescrub_features_list.json")
    q.add_argument("--probe-images", type=Path, help="aligned FaceScrub images (with MODEL)")
    q.add_argument(
        "--distractor-features", type=Path, help=".npz cache, .npy or devkit MegaFace dir"
    )
    q.add_argument(
        "--distractor-list", type=Path, help="devkit megaface_features_list.json_1000000_1"
    )
    q.add_argument("--distractor-images", type=Path, help="aligned MegaFace images (with MODEL)")
    q.add_argument("--file-ending", help="devkit feature file ending, e.g. _insightface.bin")
    q.add_argument("--facescrub-noises", type=Path, help="insightface facescrub_noises.txt")
    q.add_argument("--megaface-noises", type=Path, help="insightface megaface_noises.txt")
    q.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10, 100, 1000, 10000, 100000, 10**6],
        help="distractor-set sizes (default: the devkit's 10 ... 1M; capped to those available)",
    )
    q.add_argument("--far", type=float, default=1e-6, help="FAR of the verification TAR")
    q.add_argument("--max-rank", type=int, default=10, help="last rank of the CMC")
    q.add_argument("--cache", type=Path, help="save embedded images as probe.npz/distractor.npz")
    q.add_argument(
        "--aggregation",
        default="norm_weighted",
        help="how an embedded image and its mirror become one feature: norm_weighted (summed, "
        "insightface's gen_megaface), mean, or caface (needs --fusion-model)",
    )
    _add_fusion_model(q)
    q.add_argument(
        "--style-blocks",
        nargs="+",
        help="caface: backbone blocks of the styles (default: stages 2, 3)",
    )
    add_model_args(q, "a .pth MODEL")
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--out", type=Path, help="write megaface.json/.md and megaface_cmc.png here")
    _add_far_reading(q, "TAR")
    q.set_defaults(func=_cmd_eval_megaface)

    add_clean_parser(sub)

    p = sub.add_parser(
        "experiment",
        help="a grid of runs (methods x noise settings x seeds) on SynthFace, with the table",
    )
    _add_config_args(p, positional=True)
    p.add_argument("--retry-failed", action="store_true", help="run the FAILED cells again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser(
        "convert", help="convert an image folder (one sub-folder per identity) to .rec"
    )
    p.add_argument(
        "src", type=Path, help="folder with one sub-folder of aligned images per identity"
    )
    p.add_argument("out", type=Path, help="output directory for train.rec/.idx/property")
    p.add_argument("--image-size", type=int, default=None, help="require this square size")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for non-JPEG inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/train.rec")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "inspect",
        help="summarise and check a .rec training set, a .bin set, an IJB directory or an "
        "image folder",
        description="Summarise the datasets at PATH and check every record: framing, labels in "
        "range, every image decodes (IJB: exists and decodes). Lists the problems found with "
        "their file and record; exits with status 1 if there are any.",
    )
    p.add_argument(
        "path",
        type=Path,
        help=".rec, .bin, or a directory (searched with its sub-directories for .rec, .bin and "
        "IJB meta/; else an image folder: one sub-folder of images per identity)",
    )
    p.add_argument(
        "--quick", action="store_true", help="decode only the first image of each set (fast)"
    )
    p.add_argument("--max-problems", type=int, default=20, help="problems listed (all are counted)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="export a backbone for deployment")
    export_sub = p.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    q = export_sub.add_parser(
        "onnx", help="ONNX, insightface convention (input data, N x 3 x H x W, dynamic batch)"
    )
    q.add_argument("checkpoint", type=Path, help="run directory or backbone .pth")
    q.add_argument("--out", required=True, type=Path, help="output .onnx file")
    q.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    q.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    q.add_argument("--atol", type=float, default=1e-4, help="tolerance on normalised embeddings")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_args(q)
    q.set_defaults(func=_cmd_export_onnx)

    add_cluster_parser(sub)
    add_deploy_parser(sub)
    add_fuse_parser(sub)
    add_invert_parser(sub)

    p = sub.add_parser("report", help="combine evaluation results of several runs in one table")
    p.add_argument("runs", nargs="+", type=Path, help="run directories or result JSON files")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    _add_far_reading(p, "TAR", tpir=True)
    p.set_defaults(func=_cmd_report)
    return parser


def _check_device(device: str | None) -> None:
    """``ValueError`` naming ``--device`` when ``device`` is not a torch device string, or a
    CUDA device where CUDA is not available (or that index is not there)."""
    if device is None:
        return
    import torch

    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"--device {device!r}: CUDA is not available (use --device cpu)")
        if where.index is not None and where.index >= count:
            raise ValueError(
                f"--device {device!r}: only {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )


# what to do after Ctrl-C, where running the same command again does not resume by itself
_RESUME_HINTS = {"train": "; continue the run with --set train.resume=auto"}


def _one_line(exc: BaseException) -> str:
    """A user error as the CLI prints it: an ``OSError`` from ``open`` reads ``PATH: reason``, not
    ``[Errno 2] No such file or directory: 'PATH'``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robustface`` console script.

    User errors (:class:`~robustface.errors.RobustfaceError`, which includes unknown registry
    names, a ``ValueError`` for a bad parameter, a missing or existing path, a file where a
    directory goes or the reverse) are printed as one line, exit status 2; any other exception
    is a bug and keeps its traceback. Ctrl-C
    (``KeyboardInterrupt``) is one line too, exit status 130, with how to resume where it helps.
    """
    args = build_parser().parse_args(argv)
    try:
        _check_device(getattr(args, "device", None))
        return args.func(args)
    except (
        RobustfaceError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,  # a file given where a directory goes (or the reverse)
        IsADirectoryError,
    ) as exc:
        print(f"robustface {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _RESUME_HINTS.get(args.command, "")
        print(f"robustface {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
