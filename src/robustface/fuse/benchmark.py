"""Fusion on SynthFace probe tracks: embed a track directory, fuse its sets, score them.

The data are :func:`robustface.data.synth.tracks.build_tracks` directories (a clean gallery and
video-like low-quality tracks, one IJB root per set length). :func:`embed_tracks` embeds every
image once (raw features and CAFace styles, no flip: CAFace's evaluation uses none);
:func:`evaluate_fusion` fuses, per set length, the first ``L`` frames of every track with one
aggregator and scores the result with the files of that length's IJB root:

- **1:1**: every pair of ``meta/tracks_template_pair_label.txt`` (every gallery against every
  track) scored with :func:`~robustface.evaluate.ijb.score_pairs`; TAR at each FAR read with
  :class:`~robustface.evaluate.roc.Roc` (``"closest"``), ``None`` where the impostor pairs cannot
  measure it (:func:`~robustface.evaluate.roc.far_measurable`).
- **1:N**: closed-set rank-1 of the tracks against the union of the 1:N galleries G1 and G2
  (every identity enrolled once), with :func:`~robustface.evaluate.ijb.identification`.

The gallery templates are fused with ``mean`` for every probe aggregator (clean frontal stills),
so that the comparison varies the probe fusion only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robustface.config import to_dict
from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.synth.builder import ensure_synthface
from robustface.data.synth.tracks import TRACKS_NAME, build_tracks, length_dir, read_tracks
from robustface.deploy.align import align_faces
from robustface.evaluate.ijb import identification, read_ijb_1n_meta, score_pairs
from robustface.evaluate.report import model_fingerprint, to_jsonable
from robustface.evaluate.roc import NOT_MEASURABLE, Roc
from robustface.fuse.base import Aggregator
from robustface.fuse.baselines import LinearAggregator, MeanAggregator, NormWeightedAggregator
from robustface.fuse.caface import CAFaceAggregator
from robustface.fuse.styles import embed_with_styles
from robustface.models.loading import load_backbone
from robustface.utils.guards import check_int
from robustface.utils.io import atomic_path, write_text_atomic
from robustface.utils.run import RunDir
from robustface.utils.table import markdown_table

__all__ = [
    "BENCH_FARS",
    "FusionBenchConfig",
    "TrackFeatures",
    "embed_images",
    "embed_tracks",
    "evaluate_fusion",
    "frame_weights",
    "fuse_tracks",
    "quality_oracle",
    "report",
    "run_fusion_benchmark",
    "set_fusion",
    "spearman",
    "summarize",
]

BENCH_FARS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class TrackFeatures:
    """Every image of a track directory embedded once, and where each set's rows are.

    ``features`` ``(N, d)`` raw, ``styles`` ``(N, C, 2)``, ``quality`` ``(N,)`` the recorded
    ground truth; ``gallery`` ``(I, G)`` and ``tracks`` ``(K, T)`` row indices, with the
    identities ``gallery_identity`` ``(I,)`` and ``track_identity`` ``(K,)``; ``root`` the track
    directory and ``lengths`` its set lengths.
    """

    root: Path
    features: np.ndarray
    styles: np.ndarray
    quality: np.ndarray
    gallery: np.ndarray
    gallery_identity: np.ndarray
    tracks: np.ndarray
    track_identity: np.ndarray
    lengths: list[int]

    @property
    def norms(self) -> np.ndarray:
        """``(N,)`` feature norms."""
        return np.linalg.norm(self.features, axis=1)


def embed_images(
    model: nn.Module,
    root: str | Path,
    names: list[str],
    size: int,
    *,
    blocks: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    keep_crops: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Raw features ``(n, d)``, styles ``(n, C, 2)`` and (with ``keep_crops``) the aligned
    ``size`` px RGB crops of the images ``names`` of the track directory ``root``: loose crops
    aligned with their landmarks, ``(x / 255 - 0.5) / 0.5``, :func:`embed_with_styles` with
    ``model`` (a robustface backbone taking ``size`` px RGB input, e.g. from
    :func:`~robustface.models.loading.load_backbone`)."""
    root = Path(root)
    batch_size = check_int("batch_size", batch_size, 1)
    meta = read_ijb_meta(length_dir(root, read_tracks(root)["lengths"][-1]), TRACKS_NAME)
    row = {name: i for i, name in enumerate(meta.images.tolist())}
    features, styles, kept = [], [], []
    starts = range(0, len(names), batch_size)
    for start in tqdm(starts, desc="track images", unit="batch", disable=not progress):
        part = names[start : start + batch_size]
        paths = [root / "loose_crop" / n for n in part]
        images = [decode_image(p.read_bytes(), p) for p in paths]
        crops = align_faces(images, meta.landmarks[[row[n] for n in part]], size)
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
        f, s = embed_with_styles(model, (x / 255 - 0.5) / 0.5, blocks, batch_size=batch_size)
        features.append(f.numpy())
        styles.append(s.numpy())
        if keep_crops:
            kept.extend(crops)
    return np.concatenate(features), np.concatenate(styles), kept


def embed_tracks(
    model: nn.Module,
    root: str | Path,
    size: int,
    *,
    blocks: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    names_only: bool = False,
) -> TrackFeatures:
    """Embed every gallery image and track frame of the track directory ``root`` once
    (:func:`embed_images`); with ``names_only`` the rows, identities and qualities only (empty
    ``features`` and ``styles``, to be filled from a cache)."""
    root = Path(root)
    summary = read_tracks(root)
    gallery_names = summary["gallery"]["images"]
    track_names = [track["frames"] for track in summary["tracks"]]
    names = [n for images in gallery_names for n in images] + [n for f in track_names for n in f]
    index = {name: i for i, name in enumerate(names)}
    features, styles = np.empty((0, 0), np.float32), np.empty((0, 0, 2), np.float32)
    if not names_only:
        features, styles, _ = embed_images(
            model, root, names, size, blocks=blocks, batch_size=batch_size, progress=progress
        )
    quality = {
        n: q
        for track in summary["tracks"]
        for n, q in zip(track["frames"], track["quality"], strict=True)
    }
    return TrackFeatures(
        root=root,
        features=features,
        styles=styles,
        quality=np.array([quality.get(n, np.nan) for n in names], np.float32),
        gallery=np.array([[index[n] for n in images] for images in gallery_names]),
        gallery_identity=np.array(summary["gallery"]["identity"], np.int64),
        tracks=np.array([[index[n] for n in frames] for frames in track_names]),
        track_identity=np.array([t["identity"] for t in summary["tracks"]], np.int64),
        lengths=[int(v) for v in summary["lengths"]],
    )


SetFusion = Callable[[np.ndarray], np.ndarray]
"""A fusion of one set given as the row indices of its images: ``fuse(rows) -> (d,)`` unit."""


def set_fusion(feats: TrackFeatures, aggregator: Aggregator) -> SetFusion:
    """``aggregator`` over the rows of ``feats`` (with their styles where it needs them)."""

    def fuse(rows: np.ndarray) -> np.ndarray:
        styles = feats.styles[rows] if aggregator.needs_styles else None
        return aggregator.fuse(feats.features[rows], styles).numpy()

    return fuse


def quality_oracle(feats: TrackFeatures) -> SetFusion:
    """A reference that reads the ground truth: unit features weighted by their recorded quality
    (plus 1e-4, so that a set of frames of quality 0 still has a direction)."""

    def fuse(rows: np.ndarray) -> np.ndarray:
        x = feats.features[rows]
        weights = feats.quality[rows].astype(np.float64) + 1e-4
        v = (weights[:, None] * x / np.linalg.norm(x, axis=1, keepdims=True)).sum(0)
        return v / np.linalg.norm(v)

    return fuse


def fuse_tracks(feats: TrackFeatures, fusion: Aggregator | SetFusion, length: int) -> np.ndarray:
    """``(K, d)`` unit features: the first ``length`` frames of every track fused."""
    fuse = set_fusion(feats, fusion) if isinstance(fusion, Aggregator) else fusion
    return np.stack([fuse(rows) for rows in feats.tracks[:, :length]]).astype(np.float32)


def evaluate_fusion(
    feats: TrackFeatures,
    fusion: Aggregator | SetFusion,
    lengths: list[int] | None = None,
    fars: tuple[float, ...] = BENCH_FARS,
) -> dict[int, dict[str, Any]]:
    """Per set length (default: all of the directory's): ``{"tar_at_far": {far: tar or None},
    "rank1", "impostor_pairs", "genuine_pairs"}`` of ``fusion`` (module docstring)."""
    gallery = np.stack(
        [MeanAggregator().fuse(feats.features[rows]).numpy() for rows in feats.gallery]
    )
    results: dict[int, dict[str, Any]] = {}
    for length in lengths or feats.lengths:
        root = length_dir(feats.root, length)
        meta = read_ijb_meta(root, TRACKS_NAME)
        probes = fuse_tracks(feats, fusion, length)
        n_gallery = len(gallery)
        template_ids = np.arange(1, n_gallery + len(probes) + 1)
        scores = score_pairs(np.concatenate([gallery, probes]), template_ids, meta.pairs)
        roc = Roc.from_scores(scores, meta.pair_labels)
        one_n = read_ijb_1n_meta(root, TRACKS_NAME)
        assert one_n is not None  # build_tracks writes the 1:N lists
        enrolled = np.concatenate([t for t, _ in one_n.galleries.values()])
        subjects = np.concatenate([s for _, s in one_n.galleries.values()])
        probe_t, probe_s = one_n.probe
        ident = identification(
            gallery[enrolled - 1], subjects, probes[probe_t - n_gallery - 1], probe_s, ranks=(1,)
        )
        results[length] = {
            "tar_at_far": roc.tar_at_far(fars),
            "rank1": ident["rank"][1],
            "impostor_pairs": roc.num_negatives,
            "genuine_pairs": roc.num_positives,
        }
    return results


def frame_weights(
    aggregator: Aggregator, features: np.ndarray | torch.Tensor, styles: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(fused (d,) unit feature, per-frame weights (T,) summing to 1)`` of one set.

    A linear aggregator's weight of frame ``n`` is the share of its term in the sum
    (``|t_n| / sum_m |t_m|``: uniform for ``mean``, proportional to the norm for
    ``norm_weighted``); CAFace's are :meth:`~robustface.fuse.caface.CAFace.fuse_sequential`'s.
    """
    x, s = aggregator.check(features, styles)
    if isinstance(aggregator, CAFaceAggregator):
        with torch.inference_mode():
            fused, weights = aggregator.model.fuse_sequential(
                x[None], s[None], aggregator.chunk_size
            )
        fused, weights = torch.nn.functional.normalize(fused[0], dim=0), weights[0]
    elif isinstance(aggregator, MeanAggregator):
        fused, weights = aggregator.fuse(x), torch.full((len(x),), 1.0 / len(x))
    elif isinstance(aggregator, LinearAggregator):
        size = aggregator.terms(x).norm(dim=1)
        fused, weights = aggregator.fuse(x), size / size.sum()
    else:
        raise TypeError(f"no per-frame weights for {type(aggregator).__name__}")
    return fused.numpy(), weights.numpy()


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x))
    # ties share their mean rank
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length arrays (ties get their mean rank)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---- the whole benchmark ------------------------------------------------------------------------


@dataclass
class FusionBenchConfig:
    """The low-quality fusion benchmark (``benchmarks/fusion_lowq.py``, docs/fusion.md).

    ``train_overrides`` are ``--set``-style overrides of the demo recipe for the backbone
    (r18_tiny, ArcFace; 512-d features as CAFace takes); ``synth`` the training SynthFace set;
    ``tracks`` the probe tracks, rendered once per ``track_seeds`` entry (seed replaced, ids
    placed after the training set's); ``caface_seeds`` one CAFace training each (empty: only the
    baselines) with the config file ``caface_config`` (``robustface fuse train``'s) and its
    ``--set``-style ``caface_overrides``; ``views`` the augmented views per training image for
    its features (``robustface fuse extract``).
    """

    out: str
    synth: Any
    tracks: Any
    train_overrides: tuple[str, ...] = ()
    track_seeds: tuple[int, ...] = (0, 1, 2)
    caface_seeds: tuple[int, ...] = (0, 1, 2)
    caface_config: str = "configs/fuse/caface_synthface.yaml"
    caface_overrides: tuple[str, ...] = ()
    views: int = 8
    workers: int = 2
    progress: bool = True


def _mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` with the sample std (``ddof=1``; 0 for one value)."""
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "n": a.size,
    }


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return NOT_MEASURABLE
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _backbone(cfg: FusionBenchConfig, data: Path, out: Path) -> Path:
    """Train the backbone into ``out`` (the demo recipe with ``cfg.train_overrides``), or reuse
    a finished run there."""
    from robustface.config import load_config
    from robustface.demo import DEMO_RECIPE
    from robustface.train import Trainer

    if RunDir(out).backbone_file.is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # an unfinished run of this benchmark
    train_cfg = load_config(DEMO_RECIPE, list(cfg.train_overrides))
    train_cfg = dataclasses.replace(
        train_cfg,
        output_dir=str(out),
        synth=cfg.synth,
        data=dataclasses.replace(train_cfg.data, source="rec", path=str(data), val_dir=str(data)),
        train=dataclasses.replace(train_cfg.train, progress=cfg.progress),
    )
    Trainer(train_cfg).fit()
    return out


def _tracks(cfg: FusionBenchConfig, seed: int, data: Path, out: Path) -> Path:
    """The probe tracks of ``seed`` in ``out`` (reused when built from the same config), on
    identities after every identity of the SynthFace set ``data``."""
    ranges = json.loads((data / "synthface.json").read_text(encoding="utf-8"))["identity_ranges"]
    first = max(hi for _, hi in ranges.values())
    track_cfg = dataclasses.replace(cfg.tracks, seed=seed, first_identity=first)
    wanted = json.loads(json.dumps(to_dict(track_cfg)))  # tuples as JSON lists
    if (out / "tracks.json").is_file() and read_tracks(out)["config"] == wanted:
        return out
    build_tracks(
        out, track_cfg, workers=cfg.workers, overwrite=True, progress=cfg.progress, synthface=data
    )
    return out


def _embedded_tracks(
    model: nn.Module, size: int, root: Path, cache: Path, key: dict[str, Any], progress: bool
) -> TrackFeatures:
    """:func:`embed_tracks` of ``root``, or its features and styles from ``cache`` when that
    was written for the same backbone, input size and track directory."""
    key = {**key, "tracks": read_tracks(root)["config"]}
    if cache.is_file():
        with np.load(cache) as stored:
            if json.loads(str(stored["key"])) == key:
                feats = embed_tracks(model, root, size, names_only=True)
                feats.features, feats.styles = stored["features"], stored["styles"]
                return feats
    feats = embed_tracks(model, root, size, progress=progress)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=json.dumps(key), features=feats.features, styles=feats.styles)
    return feats


def _train_cafaces(cfg: FusionBenchConfig, backbone: Path, out: Path) -> list[Path]:
    """Extract fusion features of the training set with the backbone run ``backbone`` and
    train one CAFace per seed (finished runs are reused)."""
    from robustface.fuse.extract import extract_fusion_features
    from robustface.fuse.training import load_fuse_config, train_caface

    feats = extract_fusion_features(
        backbone, out / "synthface", out / "fusion_features", views=cfg.views,
        progress=cfg.progress,
    )  # fmt: skip
    paths = []
    for seed in cfg.caface_seeds:
        run = out / f"caface_s{seed}"
        overrides = [f"features={feats}", f"output_dir={run}", f"seed={seed}"]
        fuse_cfg = load_fuse_config(cfg.caface_config, [*overrides, *cfg.caface_overrides])
        if (run / "caface.ckpt").is_file():
            stored = load_fuse_config(run / "config.yaml")
            stored.train.progress = fuse_cfg.train.progress
            if stored == fuse_cfg:
                paths.append(run / "caface.ckpt")
                continue
        if run.exists():
            shutil.rmtree(run)  # another config's or an unfinished run of this benchmark
        fuse_cfg.train.progress = cfg.progress
        paths.append(train_caface(fuse_cfg))
    return paths


def run_fusion_benchmark(cfg: FusionBenchConfig) -> dict[str, Any]:
    """Run the benchmark into ``cfg.out``; returns the results (also ``results.json`` and the
    tables in ``results.md`` there). Finished stages (SynthFace, backbone, tracks) are reused."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    data = out / "synthface"
    ensure_synthface(data, cfg.synth, workers=cfg.workers, progress=cfg.progress)
    lap("synthface")
    backbone = _backbone(cfg, data, out / "backbone")
    model, size = load_backbone(backbone)
    lap("backbone")
    track_dirs = {s: _tracks(cfg, s, data, out / f"tracks_s{s}") for s in cfg.track_seeds}
    lap("tracks")
    key = {"backbone": model_fingerprint(backbone)["sha256"], "size": size}
    embedded = {
        s: _embedded_tracks(model, size, root, out / f"track_features_s{s}.npz", key, cfg.progress)
        for s, root in track_dirs.items()
    }
    lap("embed_tracks")
    methods: dict[str, list[tuple[int, Aggregator]]] = {
        "mean": [(-1, MeanAggregator())],
        "norm_weighted": [(-1, NormWeightedAggregator())],
    }
    if cfg.caface_seeds:
        checkpoints = _train_cafaces(cfg, backbone, out)
        methods["caface"] = [
            (seed, CAFaceAggregator(model=path))
            for seed, path in zip(cfg.caface_seeds, checkpoints, strict=True)
        ]
        lap("caface_training")
    runs: list[dict[str, Any]] = []
    for track_seed, feats in embedded.items():
        oracle = ("quality_oracle", [(-1, quality_oracle(feats))])
        for method, aggregators in [*methods.items(), oracle]:
            for fusion_seed, aggregator in aggregators:
                result = evaluate_fusion(feats, aggregator)
                corr = None  # uniform weights for mean, the quality itself for the oracle
                if isinstance(aggregator, Aggregator) and not isinstance(
                    aggregator, MeanAggregator
                ):
                    corr = float(np.mean([
                        spearman(
                            frame_weights(aggregator, feats.features[rows], feats.styles[rows])[1],
                            feats.quality[rows],
                        )
                        for rows in feats.tracks
                    ]))  # fmt: skip
                runs.append(
                    {
                        "method": method,
                        "track_seed": track_seed,
                        "fusion_seed": fusion_seed,
                        "lengths": result,
                        "weight_quality_spearman": corr,
                    }
                )
    lap("evaluation")
    frames = {
        s: spearman(f.norms[f.tracks.ravel()], f.quality[f.tracks.ravel()])
        for s, f in embedded.items()
    }
    results = {
        "config": to_jsonable(dataclasses.asdict(cfg)),
        "runs": runs,
        "summary": summarize(runs, [*methods, "quality_oracle"]),
        "norm_quality_spearman": frames,
        "seconds": seconds,
    }
    results["seconds"]["total"] = round(sum(seconds.values()), 1)
    write_text_atomic(out / "results.json", json.dumps(to_jsonable(results), indent=2) + "\n")
    write_text_atomic(out / "results.md", report(results))
    return results


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method and set length: mean ± std over the runs (track seeds x fusion seeds) of the
    rank-1 and of each measurable TAR (``None`` where a run could not measure it), and the
    paired differences ``caface - norm_weighted`` and ``norm_weighted - mean`` (same track seed)."""
    summary: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        per_length: dict[int, Any] = {}
        for length in mine[0]["lengths"]:
            cells = [r["lengths"][length] for r in mine]
            tar = {
                far: None
                if any(c["tar_at_far"][far] is None for c in cells)
                else _mean_std([c["tar_at_far"][far] for c in cells])
                for far in cells[0]["tar_at_far"]
            }
            per_length[length] = {
                "rank1": _mean_std([c["rank1"] for c in cells]),
                "tar_at_far": tar,
            }
        corr = [r["weight_quality_spearman"] for r in mine]
        summary[method] = {
            "runs": len(mine),
            "lengths": per_length,
            "weight_quality_spearman": None if None in corr else _mean_std(corr),
        }
    for better, worse in (("caface", "norm_weighted"), ("norm_weighted", "mean")):
        if better not in methods:
            continue
        diffs: dict[int, list[float]] = {}
        for run in (r for r in runs if r["method"] == better):
            base = next(
                r for r in runs if r["method"] == worse and r["track_seed"] == run["track_seed"]
            )
            for length, cell in run["lengths"].items():
                diffs.setdefault(length, []).append(
                    cell["rank1"] - base["lengths"][length]["rank1"]
                )
        summary[f"{better}-{worse}"] = {
            length: {**_mean_std(d), "positive": int(np.sum(np.asarray(d) > 0))}
            for length, d in diffs.items()
        }
    return summary


def _weight_cell(method: str, corr: dict[str, float] | None) -> str:
    if corr is not None:
        return f"{corr['mean']:.3f} ± {corr['std']:.3f}"
    return "1 (the weights are the quality)" if method == "quality_oracle" else "- (uniform)"


def report(results: dict[str, Any]) -> str:
    """The Markdown tables of :func:`run_fusion_benchmark`'s results."""
    summary, runs = results["summary"], results["runs"]
    methods = [m for m in ("mean", "norm_weighted", "caface", "quality_oracle") if m in summary]
    lengths = list(summary[methods[0]]["lengths"])
    rows = [
        [m, summary[m]["runs"], *(_cell(summary[m]["lengths"][n]["rank1"]) for n in lengths)]
        for m in methods
    ]
    for key in ("caface-norm_weighted", "norm_weighted-mean"):
        if key in summary:
            rows.append(
                [
                    f"{key} (paired)",
                    summary[key][lengths[0]]["n"],
                    *(
                        f"{100 * summary[key][n]['mean']:+.1f} ± {100 * summary[key][n]['std']:.1f}"
                        f" ({summary[key][n]['positive']}/{summary[key][n]['n']} > 0)"
                        for n in lengths
                    ),
                ]
            )
    rank = markdown_table(["method", "runs", *(f"L={n}" for n in lengths)], rows)
    fars = list(summary[methods[0]]["lengths"][lengths[0]]["tar_at_far"])
    tar_rows = [
        [m, n, *(_cell(summary[m]["lengths"][n]["tar_at_far"][f]) for f in fars)]
        for n in lengths
        for m in methods
    ]
    tar = markdown_table(["method", "L", *(f"TAR@{f:g}" for f in fars)], tar_rows)
    impostors = sorted({c["impostor_pairs"] for r in runs for c in r["lengths"].values()})
    corr = {m: summary[m]["weight_quality_spearman"] for m in methods}
    weights = markdown_table(
        ["method", "Spearman(frame weight, quality), mean over tracks"],
        [[m, _weight_cell(m, c)] for m, c in corr.items()],
    )
    norm_q = ", ".join(f"{v:.3f}" for v in results["norm_quality_spearman"].values())
    return (
        "## Closed-set rank-1 (%) vs set length L, mean ± std over runs\n\n"
        f"{rank}\n\n"
        "## 1:1 TAR (%) at FAR, every gallery against every track\n\n"
        f"{tar}\n\n{NOT_MEASURABLE}: not measurable with {', '.join(map(str, impostors))} "
        "impostor pairs (FAR x impostors < 1).\n\n"
        "quality_oracle: unit features weighted by the recorded ground-truth quality, a reference "
        "that reads the truth (no method can), not a contender.\n\n"
        "## Per-frame fusion weight vs recorded quality\n\n"
        f"{weights}\n\nSpearman(feature norm, quality) over all track frames, per track seed: "
        f"{norm_q}.\n\nTime (s): {results['seconds']}\n"
    )
