"""Model inversion on SynthFace: how well independent models recognise the inversions, with and
without the BN-statistics prior (the ArcFace paper's ablation).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/inversion.py [--out runs/bench_inversion]
[--seeds 3] [--steps 600] [--classes 16] [--pairs 20]`` (59 minutes on one thread of a shared
2-core machine under a load of about 14: 3 trainings and 12 inversion runs).

1. A SynthFace set (``--identities`` x 20 images, 56 px, an LFW-like ``lfw.bin``) and one tiny
   IResNet (``r18_tiny``, 128-d, ArcFace) per seed, trained on it with that seed (reused when the
   run directory is finished).
2. For each seed ``s`` and each setting (BN prior on: ``loss.bn_weight=0.05``; off: 0), the model
   of seed ``s`` is inverted with inversion seed ``s`` towards ``--classes`` class centres
   (close-set) and towards the first image of ``--pairs`` pairs of ``lfw.bin`` (open-set), and
   the inversions are scored by the model of seed ``s + 1`` (mod ``--seeds``): an independent
   model trained on the same classes.
3. The table (mean ± standard deviation over the seeds) goes to ``OUT/results.md`` and the
   picture to ``OUT/inversion_grid.png``: a training image of each of the first 8 classes, then
   seed 0's inversions of them with the BN prior, then without; written to
   ``--doc-image`` too. Finished runs in ``OUT`` are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustface.config import SynthConfig, load_config
from robustface.data.synth.builder import ensure_synthface
from robustface.invert import InvertConfig, run_inversion
from robustface.train import Trainer
from robustface.utils.io import write_bytes_atomic, write_text_atomic
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

SETTINGS = {"with BN prior": 0.05, "without BN prior": 0.0}


def _train(data: Path, out: Path, seed: int, epochs: int) -> Path:
    run = RunDir(out)
    if run.is_finished:
        return out
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(
        None,
        [
            f"seed={seed}",
            f"output_dir={out}",
            "data.source=rec",
            f"data.path={data}",
            "data.batch_size=64",
            "data.num_workers=0",
            "data.val_targets=[lfw]",
            "model.backbone=r18_tiny",
            "model.embedding_size=128",
            "fc.name=full",
            "head.name=arcface",
            "head.params={scale: 32.0, margin: 0.5}",
            "optim.lr=0.1",
            "optim.warmup_epochs=0.5",
            f"train.epochs={epochs}",
            "train.tensorboard=false",
            "train.progress=false",
            "train.log_every=20",
        ],
    )
    result = Trainer(cfg).fit()
    print(f"  seed {seed}: lfw {100 * result.verification['lfw']['accuracy_mean']:.2f}%")
    return out


def _invert(model: Path, scorer: Path, out: Path, seed: int, bn: float, args: Any, **target: Any):
    """The results of one inversion run (reused when ``out`` holds a finished one)."""
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text(encoding="utf-8"))
    cfg = InvertConfig(
        seed=seed,
        output_dir=str(out),
        model=str(model),
        batch_size=args.batch_size,
        progress=False,
    )
    cfg.target = dataclasses.replace(cfg.target, **target)
    cfg.loss = dataclasses.replace(cfg.loss, bn_weight=bn)
    cfg.optim = dataclasses.replace(cfg.optim, steps=args.steps, lr=args.lr)
    cfg.eval = dataclasses.replace(cfg.eval, model=str(scorer))
    return run_inversion(cfg, overwrite=True)


def _bn_distance(results: dict[str, Any], out: Path, model: Path, data: Path) -> tuple[float, ...]:
    """BN distance of (16 inversions, 16 real lfw.bin faces) as batches, under the inverted model
    (the checkpoint's backbone for class targets, as the run inverted)."""
    from robustface.data.image import decode_image
    from robustface.data.transforms import to_tensor_normalized
    from robustface.data.verification import load_bin_images
    from robustface.invert.priors import bn_distance
    from robustface.invert.targets import load_invertible, load_run_classifier

    if results["target"] == "class":
        net, size = load_run_classifier(model).backbone, results["input_size"]
    else:
        net, size = load_invertible(model)
    files = [out / t["image"] for t in results["targets"]][:16]
    images = np.stack([decode_image(f.read_bytes(), f) for f in files])
    real = load_bin_images(data / "lfw.bin", image_size=(size, size))[0][: len(images)]
    return (
        bn_distance(net, to_tensor_normalized(images)),
        bn_distance(net, to_tensor_normalized(np.ascontiguousarray(real))),
    )


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def _picture(out: Path, runs: dict[str, Path], data: Path, count: int = 8) -> Path:
    """A training image of each of the first ``count`` classes, then seed 0's inversions of them,
    one row per setting (in ``runs`` order), as a mosaic PNG at the images' own resolution
    (noise-like images compress badly)."""
    from robustface.data.image import decode_image, encode_image
    from robustface.data.recordio import RecordIODataset

    train = RecordIODataset(data)
    first = [int(np.flatnonzero(train.labels == c)[0]) for c in range(count)]
    rows = [[train[i][0] for i in first]]
    for run in runs.values():
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        files = [run / t["image"] for t in results["targets"]][:count]
        rows.append([decode_image(f.read_bytes(), f) for f in files])
    side, gap = rows[0][0].shape[0], 2
    mosaic = np.full(
        (len(rows) * (side + gap) - gap, count * (side + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            mosaic[r * (side + gap) : r * (side + gap) + side, c * (side + gap) :][:, :side] = image
    path = out / "inversion_grid.png"
    write_bytes_atomic(path, encode_image(mosaic, "png"))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_inversion"))
    p.add_argument("--identities", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc-image", type=Path, help="copy the picture here (e.g. docs/img/)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = args.out / "synthface"
    synth = SynthConfig(
        identities=args.identities,
        images_per_identity=20,
        open_set_identities=0,
        test_identities=100,
        lfw_pairs=400,
        cfp_fp_pairs=0,
        lowq_pairs=0,
        ijb_identities=0,
        image_size=56,
        difficulty=1.0,
    )
    print(f"SynthFace in {data} ...", flush=True)
    ensure_synthface(data, synth, workers=1, progress=False)
    print("training the tiny models ...", flush=True)
    models = [_train(data, args.out / f"model_seed{s}", s, args.epochs) for s in range(args.seeds)]
    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    picture_runs = {}
    for seed in range(args.seeds):
        model, scorer = models[seed], models[(seed + 1) % args.seeds]
        for setting, bn in SETTINGS.items():
            print(f"seed {seed}, {setting} ...", flush=True)
            for kind, target in (
                ("class", {"kind": "class", "count": args.classes}),
                ("pairs", {"kind": "pairs", "path": str(data / "lfw.bin"), "count": args.pairs}),
            ):
                out = args.out / f"{kind}_{'bn' if bn else 'nobn'}_seed{seed}"
                results = _invert(model, scorer, out, seed, bn, args, **target)
                res = results["scores"]
                if kind == "class" and seed == 0:
                    picture_runs[setting] = out
                cell = scores.setdefault(setting, {}).setdefault(kind, {})
                inverted_bn, real_bn = _bn_distance(results, out, model, data)
                cell.setdefault("bn_distance", []).append(inverted_bn)
                cell.setdefault("bn_distance_real", []).append(real_bn)
                for role in ("inverted", "independent"):
                    cell.setdefault(f"cos_{role}", []).append(res[role]["cosine"]["mean"])
                if kind == "class":
                    cell.setdefault("top1", []).append(res["independent"]["top1"])
                    cell.setdefault("chance", []).append(res["independent"]["chance_top1"])
                else:
                    ver = res["independent"]["verification"]
                    cell.setdefault("ver_real", []).append(ver["real"]["accuracy_mean"])
                    cell.setdefault("ver_inv", []).append(ver["inverted"]["accuracy_mean"])
    rows = []
    for setting, kinds in scores.items():
        c, o = kinds["class"], kinds["pairs"]
        rows.append([
            setting, _cell(c["cos_inverted"]), _cell(c["cos_independent"]),
            _cell(c["top1"], 100, 1) + f" (chance {100 * c['chance'][0]:.1f})",
            _cell(o["cos_inverted"]), _cell(o["cos_independent"]),
            _cell(o["ver_real"], 100, 1), _cell(o["ver_inv"], 100, 1),
            _cell(c["bn_distance"], 1, 0), _cell(o["bn_distance"], 1, 0),
        ])  # fmt: skip
    real_bn = [v for kinds in scores.values() for v in kinds["class"]["bn_distance_real"]]
    headers = [
        "setting", "close-set cos (inverted)", "close-set cos (independent)",
        "close-set top-1 % (independent)", "open-set cos (inverted)",
        "open-set cos (independent)", "verif. real % (indep.)",
        "verif. one side inverted % (indep.)", "BN distance close-set", "BN distance open-set",
    ]  # fmt: skip
    table = markdown_table(headers, rows)
    minutes = (time.perf_counter() - started) / 60
    note = (
        f"{args.seeds} seeds (mean ± std), {args.steps} steps, {args.classes} classes, "
        f"{args.pairs} pairs of lfw.bin; {minutes:.1f} min on {args.threads} thread(s). "
        "BN distance: the BN-statistics term (every layer weighted 1) of 16 inversions as one "
        f"batch under the inverted model; 16 real lfw.bin faces: {_cell(real_bn, 1, 0)}"
    )
    write_text_atomic(args.out / "results.md", table + "\n\n" + note + "\n")
    write_text_atomic(args.out / "results.json", json.dumps(scores, indent=2) + "\n")
    picture = _picture(args.out, picture_runs, data)
    if args.doc_image:
        args.doc_image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, args.doc_image)
    print(table)
    print(note)
    print(f"picture: {picture} ({picture.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
