"""``robustface invert run``: invert a model towards the targets of a config, score the
inversions, and write everything to the output directory::

    config.yaml     the resolved config
    images/         the inversions, one PNG per target (``0003_class_3.png``), uint8 RGB
    grid.png        the targets (image targets) above their inversions, with the cosines
    losses.png      the loss terms per step (mean over the batches)
    results.json    targets, final losses, per-step history, timing, scores (written last)

The directory is written under ``OUT.partial`` and renamed when complete. When the optimisation
diverges (NaN), the last good images are written all the same, ``results.json`` says at which step
it stopped, and :class:`~robustface.invert.inversion.InversionDivergedError` is raised after.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from robustface.config import load_config, save_config, to_dict
from robustface.data.image import decode_image, encode_image
from robustface.invert.config import InvertConfig
from robustface.invert.evaluate import check_independent, score_inversions
from robustface.invert.inversion import (
    LOSS_TERMS,
    InversionDivergedError,
    InversionResult,
    invert,
    to_uint8,
)
from robustface.invert.targets import (
    Targets,
    build_targets,
    count_notice,
    load_invertible,
    load_run_classifier,
)
from robustface.utils.io import (
    atomic_directory,
    check_output_dir,
    write_bytes_atomic,
    write_text_atomic,
)
from robustface.utils.plot import pyplot, save_figure
from robustface.utils.table import markdown_table

__all__ = ["format_scores", "plot_grid", "plot_losses", "rescore", "run_inversion"]

GRID_COLUMNS = 16
"""Targets per row block of ``grid.png``; at most ``4 * GRID_COLUMNS`` are drawn."""


def _file_name(index: int, name: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9]+', '_', Path(name).stem).strip('_')}.png"


def plot_grid(
    path: Path,
    inversions: np.ndarray,
    targets: Targets,
    cosines: list[float] | None = None,
    title: str = "",
) -> None:
    """Save the targets' images (if any) above their inversions, ``GRID_COLUMNS`` per block (at
    most ``4 * GRID_COLUMNS``), each inversion labelled with its target's name and, given, its
    cosine. One mosaic image in one axes: fast for many targets."""
    plt = pyplot()
    n = min(len(inversions), 4 * GRID_COLUMNS)
    side = inversions.shape[1]
    cols = min(n, GRID_COLUMNS)
    blocks = -(-n // cols)
    rows_per_block = 2 if targets.images is not None else 1
    gap, label_gap = max(2, side // 8), max(6, side // 4)  # between tiles, under each block
    cell_w, block_h = side + gap, rows_per_block * (side + gap) + label_gap
    mosaic = np.full((blocks * block_h, cols * cell_w, 3), 255, dtype=np.uint8)
    for i in range(n):
        block, col = divmod(i, cols)
        tiles = [inversions[i]] if targets.images is None else [targets.images[i], inversions[i]]
        for r, tile in enumerate(tiles):
            y = block * block_h + r * (side + gap)
            mosaic[y : y + side, col * cell_w : col * cell_w + side] = tile
    inches = 0.9 / cell_w  # per mosaic pixel
    title_h = 0.35
    fig = plt.figure(figsize=(mosaic.shape[1] * inches, mosaic.shape[0] * inches + title_h))
    ax = fig.add_axes((0, 0, 1, 1 - title_h / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    for i in range(n):
        block, col = divmod(i, cols)
        y = block * block_h + rows_per_block * (side + gap) - gap + 1
        label = targets.names[i] if cosines is None else f"{cosines[i]:.2f}"
        ax.text(col * cell_w + side / 2, y, label, ha="center", va="top", fontsize=5)
    ax.axis("off")
    text = title + ("" if targets.images is None else "\ntop: targets, below: inversions")
    fig.suptitle(text, fontsize=7, y=0.99, va="top")
    save_figure(fig, path, dpi=150)


def plot_losses(path: Path, history: dict[str, list[float]], title: str = "") -> None:
    """Save one panel per loss term (log scale where positive) against the step."""
    plt = pyplot()
    terms = [t for t in LOSS_TERMS if any(history.get(t, []))]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        values = np.asarray(history[term])
        ax.plot(np.arange(len(values)), values, lw=1)
        if (values > 0).all():
            ax.set_yscale("log")
        ax.set(xlabel="step", title=term)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def format_scores(scores: dict[str, Any]) -> str:
    """A Markdown table of the scores of :func:`~robustface.invert.evaluate.score_inversions`."""
    rows = []
    for role in ("inverted", "independent"):
        s = scores.get(role)
        if not s:
            continue
        cos, ver = s.get("cosine"), s.get("verification", {})
        top1 = "-"
        if "top1" in s:
            top1 = f"{100 * s['top1']:.1f}% (chance {100 * s['chance_top1']:.1f}%)"
        rows.append(
            [
                role,
                s["model"],
                "-" if cos is None else f"{cos['mean']:.3f} ± {cos['std']:.3f}",
                top1,
                "-" if not ver else f"{100 * ver['real']['accuracy_mean']:.2f}%",
                "-" if not ver else f"{100 * ver['inverted']['accuracy_mean']:.2f}%",
            ]
        )
    headers = ["scored by", "model", "cosine to target", "top-1", "verif. real", "verif. inverted"]
    return markdown_table(headers, rows)


def run_inversion(cfg: InvertConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the inversion of ``cfg`` into ``cfg.output_dir`` (see the module docstring) and
    return ``results.json``'s content."""
    out = Path(cfg.output_dir)
    check_output_dir(out, overwrite=overwrite, marker="results.json", inputs=[cfg.model])
    check_independent(cfg.eval.model, cfg.model)
    started = time.perf_counter()
    model, input_size, classifier = _load_inverted(cfg)
    targets, target_loss = build_targets(
        cfg.target, cfg.loss, model, input_size, classifier=classifier, device=cfg.device
    )
    notice = count_notice(cfg.target, len(targets.names))
    if notice:
        print(notice, file=sys.stderr)
    stopped: InversionDivergedError | None = None
    try:
        result = invert(
            model,
            target_loss,
            targets.keys,
            input_size,
            batch_size=cfg.batch_size,
            loss=cfg.loss,
            optim=cfg.optim,
            augment=cfg.augment,
            seed=cfg.seed,
            device=cfg.device,
            progress=cfg.progress,
        )
    except InversionDivergedError as exc:
        stopped, result = exc, InversionResult(exc.images)
    seconds = time.perf_counter() - started
    images = to_uint8(result.images)
    names = [_file_name(i, name) for i, name in enumerate(targets.names[: len(images)])]
    results: dict[str, Any] = {
        "model": str(cfg.model),
        "target": cfg.target.kind,
        "input_size": input_size,
        "count": len(targets.names),
        "targets": [
            {"name": name, "image": f"images/{file}"}
            for name, file in zip(targets.names, names, strict=False)
        ],
        "final_loss": {k: v[-1] for k, v in result.history.items() if v},
        "seconds": round(seconds, 1),
        "stopped": None
        if stopped is None
        else {"batch": stopped.batch, "step": stopped.step, "message": str(stopped)},
        "scores": None,
        "config": to_dict(cfg),
    }
    if stopped is None:
        results["scores"] = score_inversions(
            images,
            targets,
            (model, input_size, classifier),
            cfg.eval.model,
            inverted_source=cfg.model,
            device=cfg.device,
            batch_size=cfg.eval.batch_size,
            independent_kwargs=cfg.eval.model_kwargs(),
        )
    results["history"] = result.history
    with atomic_directory(out) as partial:
        save_config(cfg, partial / "config.yaml")
        for file, image in zip(names, images, strict=True):
            write_bytes_atomic(partial / "images" / file, encode_image(image, "png"))
        scored = (results["scores"] or {}).get("independent") or (results["scores"] or {}).get(
            "inverted"
        )
        cosines = None if not scored or not scored.get("cosine") else scored["cosine"]["per_target"]
        done = targets if stopped is None else Targets(
            targets.kind, targets.keys[: len(images)], targets.names[: len(images)],
            images=None if targets.images is None else targets.images[: len(images)],
        )  # fmt: skip
        plot_grid(partial / "grid.png", images, done, cosines, _grid_title(cfg, scored))
        if result.history:
            plot_losses(partial / "losses.png", result.history, f"inversion of {cfg.model}")
        write_text_atomic(partial / "results.json", json.dumps(results, indent=2) + "\n")
    if stopped is not None:
        raise stopped
    return results


def _grid_title(cfg: InvertConfig, scored: dict[str, Any] | None) -> str:
    prior = "with" if cfg.loss.bn_weight > 0 else "without"
    text = f"{cfg.target.kind} targets, {prior} the BN prior"
    if scored and scored.get("cosine"):
        text += f"; cosine to target by {Path(scored['model']).name}"
    return text


def _load_inverted(cfg: InvertConfig) -> tuple[Any, int, Any]:
    """``(model, input size, classifier or None)`` of the model ``cfg`` inverts."""
    if cfg.target.kind == "class":
        run = load_run_classifier(cfg.model, cfg.device, **cfg.model_kwargs())
        return run.backbone, run.input_size, run.classifier
    model, input_size = load_invertible(cfg.model, cfg.device, **cfg.model_kwargs())
    return model, input_size, None


def rescore(out_dir: str | Path, independent: str | Path, **model_kwargs: Any) -> dict[str, Any]:
    """Score the inversions of a finished output directory with another ``independent`` model
    (``model_kwargs``: its ``load_backbone`` arguments, e.g. ``input_size``); writes
    ``scores_<model name>.json`` there and returns the scores."""
    out = Path(out_dir)
    results_file = out / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{out}: not an inversion output directory (no results.json)")
    cfg = load_config(out / "config.yaml", cls=InvertConfig)
    results = json.loads(results_file.read_text(encoding="utf-8"))
    if results.get("stopped"):
        raise ValueError(f"{out}: the inversion stopped early ({results['stopped']['message']})")
    model, input_size, classifier = _load_inverted(cfg)
    targets, _ = build_targets(
        cfg.target, cfg.loss, model, input_size, classifier=classifier, device=cfg.device
    )
    files = [out / t["image"] for t in results["targets"]]
    images = np.stack([decode_image(f.read_bytes(), f) for f in files])
    scores = score_inversions(
        images,
        targets,
        (model, input_size, classifier),
        independent,
        inverted_source=cfg.model,
        device=cfg.device,
        batch_size=cfg.eval.batch_size,
        independent_kwargs=model_kwargs,
    )
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(independent).name)
    write_text_atomic(out / f"scores_{name}.json", json.dumps(scores, indent=2) + "\n")
    return scores
