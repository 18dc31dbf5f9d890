"""The CAFace paper's picture for one SynthFace track: which frames each fusion listens to.

For one track of a :func:`~robustface.data.synth.tracks.build_tracks` directory (its first
``length`` frames) and each aggregator, one panel: every frame's cosine similarity to the
gallery feature of the track's identity (y) against its frame index or its recorded quality (x),
each dot coloured by the frame's fusion weight (:func:`~robustface.fuse.benchmark.frame_weights`:
uniform for ``mean``, proportional to the norm for ``norm_weighted``, CAFace's per-frame weights),
and the fused feature's cosine as a star and a dashed line. The gallery feature is the ``mean``
fusion of the identity's gallery images (unit vector). A strip of frames (aligned, evenly spaced
along the track) runs above the panels. ``robustface fuse plot`` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from robustface.data.synth.tracks import read_tracks
from robustface.fuse.base import Aggregator
from robustface.fuse.baselines import MeanAggregator
from robustface.fuse.benchmark import embed_images, frame_weights
from robustface.utils.guards import check_choice, check_int
from robustface.utils.plot import pyplot, save_figure

__all__ = ["TrackPlotData", "plot_track_fusion", "track_plot_data"]

X_AXES = ("frame", "quality")


@dataclass
class TrackPlotData:
    """What :func:`plot_track_fusion` draws. ``cosine`` ``(T,)``: each frame's cosine to the
    gallery feature; ``weights[name]`` ``(T,)`` and ``fused_cosine[name]`` per aggregator;
    ``quality`` ``(T,)`` the recorded quality; ``thumbnails`` aligned frames for the strip."""

    track: int
    identity: int
    quality: np.ndarray
    cosine: np.ndarray
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    fused_cosine: dict[str, float] = field(default_factory=dict)
    thumbnails: list[np.ndarray] = field(default_factory=list)


def track_plot_data(
    model: nn.Module,
    size: int,
    root: str | Path,
    aggregators: dict[str, Aggregator],
    *,
    track: int = 0,
    length: int | None = None,
    blocks: list[str] | None = None,
    thumbnails: int = 12,
) -> TrackPlotData:
    """Embed track ``track`` of the track directory ``root`` (its first ``length`` frames; all
    when None) and its identity's gallery with ``model`` (``size`` px input), and fuse the frames
    with each of ``aggregators``."""
    summary = read_tracks(root)
    tracks = summary["tracks"]
    track = check_int("track", track, 0, len(tracks) - 1)
    info = tracks[track]
    length = check_int("length", len(info["frames"]) if length is None else length, 1)
    frames = info["frames"][:length]
    identity = int(info["identity"])
    gallery = summary["gallery"]["images"][summary["gallery"]["identity"].index(identity)]
    features, styles, crops = embed_images(
        model, root, [*gallery, *frames], size, blocks=blocks, keep_crops=True
    )
    g = MeanAggregator().fuse(features[: len(gallery)]).numpy()
    x, s = features[len(gallery) :], styles[len(gallery) :]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(thumbnails, len(frames))).round())
    data = TrackPlotData(
        track=track,
        identity=identity,
        quality=np.asarray(info["quality"][:length], np.float64),
        cosine=unit @ g,
        thumbnails=[crops[len(gallery) + int(i)] for i in picks],
    )
    for name, aggregator in aggregators.items():
        fused, weights = frame_weights(aggregator, x, s)
        data.weights[name] = weights
        data.fused_cosine[name] = float(fused @ g)
    return data


def plot_track_fusion(
    data: TrackPlotData, path: str | Path, *, x: str = "frame", dpi: int = 90
) -> None:
    """Draw ``data`` (one panel per aggregator, frames on top, one colour scale for every
    panel's weights) into the PNG ``path``."""
    check_choice("x", x, X_AXES)
    plt = pyplot()
    names = list(data.weights)
    fig = plt.figure(figsize=(4.8 * len(names) + 1.0, 5.4), layout="constrained")
    grid = fig.add_gridspec(2, len(names), height_ratios=(1, 4.2))
    strip = fig.add_subplot(grid[0, :])
    strip.imshow(np.concatenate(data.thumbnails, axis=1))
    strip.set_axis_off()
    strip.set_title(
        f"track {data.track} (identity {data.identity}), {len(data.cosine)} frames: "
        f"{len(data.thumbnails)} evenly spaced",
        fontsize=9,
    )
    xs = np.arange(len(data.cosine)) if x == "frame" else data.quality
    vmax = max(float(w.max()) for w in data.weights.values())
    low = min(float(data.cosine.min()), *data.fused_cosine.values()) - 0.05
    high = max(float(data.cosine.max()), *data.fused_cosine.values()) + 0.05
    axes = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1, i])
        axes.append(ax)
        order = np.argsort(data.weights[name])  # heaviest frames drawn last, on top
        dots = ax.scatter(
            xs[order], data.cosine[order], c=data.weights[name][order], cmap="viridis", s=14,
            vmin=0.0, vmax=vmax,
        )  # fmt: skip
        fused = data.fused_cosine[name]
        ax.axhline(fused, color="tab:red", ls="--", lw=1)
        star_x = xs.max() + 0.04 * (xs.max() - xs.min() + 1e-9)
        ax.scatter([star_x], [fused], marker="*", s=220, color="tab:red", zorder=3,
                   label=f"fused feature: cos {fused:.3f}")  # fmt: skip
        ax.set_ylim(low, high)
        ax.set(
            xlabel="frame index" if x == "frame" else "recorded quality",
            ylabel="cosine to the gallery feature" if i == 0 else None,
            title=f"{name}: frames coloured by fusion weight",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(dots, ax=axes, label="per-frame fusion weight", fraction=0.03, pad=0.01)
    save_figure(fig, path, dpi=dpi)
