"""Video-like low-quality probe tracks on SynthFace: the probe sets of the fusion benchmark.

For ``identities`` SynthFace identities (ids ``first_identity ..``, disjoint from a training set's
ids; :func:`check_disjoint`), :func:`build_tracks` renders a clean gallery of
``gallery_images`` frontal images per identity and ``tracks_per_identity`` probe tracks of
``max(lengths)`` frames each. A track is a video: its nuisances follow smooth random processes
over the frames (a Gaussian-smoothed white noise with a correlation length of ``smoothness``
frames, :func:`track_nuisances`), so pose, blur, resolution loss, sensor noise, JPEG loss, light
and expression drift from frame to frame, occlusions (glasses, sunglasses, mask, bar, hand) come
and go as events of several frames, and a fraction ``bad_frame_rate`` of single frames is
spoilt (heavy motion blur, very low resolution, or heavy noise with JPEG loss). A shared
"badness" process drives blur, resolution, noise and JPEG together, so a track has good and bad
stretches. Every frame records its ground-truth quality (:func:`~.render.quality_score`).

Set lengths: the probe set of length ``L`` is the first ``L`` frames of each track, so accuracy
versus ``L`` compares prefixes of the same videos. Layout::

    out/
      loose_crop/<n>.jpg     every gallery image and track frame once (loose crops, as IJBS/)
      L0004/ L0016/ ...      one IJB root per set length, read by read_ijb_meta(root, "TRACKS"):
        meta/tracks_face_tid_mid.txt, tracks_template_pair_label.txt, tracks_name_5pts_score.txt
        meta/tracks_1N_gallery_G1.csv, tracks_1N_gallery_G2.csv, tracks_1N_probe_mixed.csv
        loose_crop/          hard links to the images it lists (copies where links fail)
      tracks.json            config, identity range, gallery images, per track: identity, frame
                             names, per-frame quality, yaw, blur, resolution loss, occlusion, bad
      preview.png            the first frames of the first tracks, one track per row

Templates (the same ids in every ``L####``): ``1 .. identities`` are the galleries (one per
identity, each image its own media), then one template per track (one media: a video). 1:1
pairs: every gallery template against every track template (label 1 for the same identity).
1:N: galleries G1 (identities at even positions) and G2 (odd), the tracks as mixed probes, as
the builder writes for IJBS/. Deterministic in the config: every image is rendered from its own
seeded stream, byte-identical for any number of worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import robustface
from robustface.config import SynthConfig, to_dict
from robustface.data.ijb import write_ijb_meta
from robustface.data.image import decode_image, encode_image
from robustface.data.synth.builder import (
    SampleSpec,
    _loose_crop,
    _Renderer,
    write_1n_list,
)
from robustface.data.synth.identity import make_identities
from robustface.data.synth.render import OCCLUSIONS, Nuisance, make_grid, sample_nuisance
from robustface.utils.guards import check_int, check_real
from robustface.utils.io import (
    atomic_directory,
    check_output_dir,
    link_or_copy,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = [
    "TRACKS_NAME",
    "TrackConfig",
    "TrackSetInfo",
    "build_tracks",
    "check_disjoint",
    "length_dir",
    "read_tracks",
    "track_nuisances",
]

TRACKS_NAME = "TRACKS"
"""The IJB set name of every ``L####`` root (meta files ``tracks_*``)."""
STREAM_GALLERY, STREAM_TRACK, STREAM_CROP = 20, 21, 22
_OCCLUDERS = OCCLUSIONS[1:]  # glasses, sunglasses, mask, bar, hand
_DEG = math.pi / 180.0


@dataclasses.dataclass(frozen=True)
class TrackConfig:
    """What :func:`build_tracks` renders (see the module docstring)."""

    seed: int = 0
    identities: int = 100
    first_identity: int = 100_000
    gallery_images: int = 2
    tracks_per_identity: int = 2
    lengths: tuple[int, ...] = (4, 16, 64, 256)
    image_size: int = 112
    difficulty: float = 1.0
    smoothness: float = 8.0
    bad_frame_rate: float = 0.1
    sibling_rate: float = 0.1

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        check_int("identities", self.identities, 2)
        check_int("first_identity", self.first_identity, 0)
        check_int("gallery_images", self.gallery_images, 1)
        check_int("tracks_per_identity", self.tracks_per_identity, 1)
        check_int("image_size", self.image_size, 32, 512)
        check_real("difficulty", self.difficulty, 0, 3)
        check_real("smoothness", self.smoothness, 0.5)
        check_real("bad_frame_rate", self.bad_frame_rate, 0, 1)
        check_real("sibling_rate", self.sibling_rate, 0, 1)
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"lengths: need increasing set lengths, got {list(self.lengths)}")
        for length in self.lengths:
            check_int("lengths", length, 1, 9999)

    @property
    def track_length(self) -> int:
        """Frames rendered per track: the longest set length."""
        return self.lengths[-1]


@dataclasses.dataclass
class TrackSetInfo:
    """What :func:`build_tracks` wrote: the directory, its ``tracks.json`` and the build time."""

    path: Path
    summary: dict[str, Any]
    seconds: float


def length_dir(root: str | Path, length: int) -> Path:
    """The IJB root of the probe sets of ``length`` frames: ``root/L0064``."""
    return Path(root) / f"L{length:04d}"


def _smooth(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """``n`` samples of a stationary unit-variance Gaussian process: white noise convolved with
    a Gaussian of ``corr`` frames (std), normalised by the kernel's L2 norm."""
    pad = math.ceil(3.0 * corr)
    kernel = np.exp(-0.5 * (np.arange(-pad, pad + 1) / corr) ** 2)
    white = rng.standard_normal(n + 2 * pad)
    return np.convolve(white, kernel, mode="valid") / np.sqrt(np.sum(kernel**2))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def track_nuisances(
    rng: np.random.Generator,
    length: int,
    *,
    difficulty: float = 1.0,
    smoothness: float = 8.0,
    bad_frame_rate: float = 0.1,
) -> tuple[list[Nuisance], np.ndarray]:
    """The nuisances of one track of ``length`` frames and which frames are spoilt (bool).

    Per frame (``d`` = ``difficulty``, ``s(t)`` smooth unit processes, ``b(t)`` the shared
    badness process, ``sig`` the logistic function): yaw ``30 d s`` deg (|yaw| <= 80), pitch
    ``10 d s``, roll ``6 d s``; blur ``3 d sig(1.5 b + s - 0.5)`` px, resolution loss
    ``1 + 4 d sig(1.5 b + s - 1)``, noise ``14 d sig(1.5 b + s - 0.5)`` grey levels, JPEG quality
    ``95 - 70 d sig(1.5 b + s - 0.5)`` (at least 10); light azimuth ``0.9 tanh(s)``, a smile
    ``0.5 d max(s, 0)``; light strength, ambient, colour cast, exposure and eye state of the
    whole track from one ``frontal`` draw (the camera). Occlusion events: ``Poisson(d * length /
    96)`` events, each one occluder kind over ``smoothness * U(1, 4)`` frames. Spoilt frames
    (``bad_frame_rate``): one of blur ``+ d U(3, 6)``, resolution loss ``>= 1 + d U(5, 8)``, or
    noise ``>= 20 d`` with JPEG quality ``<= 15``.
    """
    n, d, corr = length, difficulty, smoothness
    base = sample_nuisance(rng, "frontal", difficulty=d)
    bad_state = _smooth(rng, n, 2.0 * corr)
    yaw = np.clip(30.0 * d * _smooth(rng, n, 2.0 * corr), -80.0, 80.0)
    pitch = np.clip(10.0 * d * _smooth(rng, n, corr), -40.0, 40.0)
    roll = np.clip(6.0 * d * _smooth(rng, n, corr), -30.0, 30.0)
    blur = 3.0 * d * _sigmoid(1.5 * bad_state + _smooth(rng, n, corr) - 0.5)
    lowres = 1.0 + 4.0 * d * _sigmoid(1.5 * bad_state + _smooth(rng, n, corr) - 1.0)
    noise = 14.0 * d * _sigmoid(1.5 * bad_state + _smooth(rng, n, corr) - 0.5)
    jpeg = np.maximum(
        10.0, 95.0 - 70.0 * d * _sigmoid(1.5 * bad_state + _smooth(rng, n, corr) - 0.5)
    )
    azimuth = 0.9 * np.tanh(_smooth(rng, n, 2.0 * corr))
    smile = 0.5 * d * np.maximum(_smooth(rng, n, corr), 0.0)
    shift = 1.5 * d * np.stack([_smooth(rng, n, corr), _smooth(rng, n, corr)], axis=1)
    scale = np.exp(0.05 * d * _smooth(rng, n, corr))
    occlusion = ["none"] * n
    occlusion_params = [base.occlusion_params] * n
    for _ in range(int(rng.poisson(d * n / 96.0))):
        start = int(rng.integers(n))
        stop = min(n, start + round(corr * rng.uniform(1.0, 4.0)))
        kind = _OCCLUDERS[int(rng.integers(len(_OCCLUDERS)))]
        params = tuple(rng.random(4).tolist())
        for t in range(start, stop):
            occlusion[t], occlusion_params[t] = kind, params
    bad = rng.random(n) < bad_frame_rate
    spoil = rng.integers(3, size=n)
    spike = rng.uniform(size=n)
    seeds = rng.integers(1 << 31, size=n)
    frames = []
    for t in range(n):
        f_blur, f_lowres, f_noise, f_jpeg = blur[t], lowres[t], noise[t], jpeg[t]
        if bad[t]:
            if spoil[t] == 0:
                f_blur += d * (3.0 + 3.0 * spike[t])
            elif spoil[t] == 1:
                f_lowres = max(f_lowres, 1.0 + d * (5.0 + 3.0 * spike[t]))
            else:
                f_noise, f_jpeg = max(f_noise, 20.0 * d), min(f_jpeg, 15.0)
        frames.append(
            dataclasses.replace(
                base,
                yaw=float(yaw[t]) * _DEG,
                pitch=float(pitch[t]) * _DEG,
                roll=float(roll[t]) * _DEG,
                scale=float(scale[t]),
                shift=(float(shift[t, 0]), float(shift[t, 1])),
                smile=float(min(smile[t], 1.0)),
                light_azimuth=float(azimuth[t]),
                blur_sigma=float(f_blur),
                noise_sigma=float(f_noise),
                lowres_factor=float(f_lowres),
                jpeg_quality=round(float(f_jpeg)),
                occlusion=occlusion[t],
                occlusion_params=occlusion_params[t],
                seed=int(seeds[t]),
            )
        )
    return frames, bad


def check_disjoint(cfg: TrackConfig, synthface: str | Path) -> None:
    """Raise ``ValueError`` when the track identities overlap the identities of the SynthFace set
    at ``synthface`` (same seed and overlapping id ranges, per its ``synthface.json``)."""
    summary_file = Path(synthface) / "synthface.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{synthface}: not a SynthFace directory (no synthface.json)")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if summary["config"]["seed"] != cfg.seed:
        return  # identity i is drawn from rng([seed, i]): other seeds, other people
    stop = cfg.first_identity + cfg.identities
    for part, (lo, hi) in summary["identity_ranges"].items():
        if lo < stop and cfg.first_identity < hi:
            raise ValueError(
                f"first_identity: track identities {cfg.first_identity}..{stop - 1} overlap the "
                f"{part} identities {lo}..{hi - 1} of {synthface} (same seed {cfg.seed}); "
                f"use first_identity >= {max(h for _, h in summary['identity_ranges'].values())}"
            )


def _write_length(
    out: Path,
    length: int,
    gallery: list[list[str]],
    tracks: list[dict[str, Any]],
    landmarks: dict[str, np.ndarray],
    quality: dict[str, float],
    subjects: list[int],
) -> None:
    """The IJB root of the probe sets of ``length`` frames (see the module docstring)."""
    root = length_dir(out, length)
    (root / "loose_crop").mkdir(parents=True)
    names, templates, medias = [], [], []
    media = 0
    for t, images in enumerate(gallery, 1):
        for name in images:
            media += 1
            names.append(name)
            templates.append(t)
            medias.append(media)
    for k, track in enumerate(tracks):
        media += 1
        for name in track["frames"][:length]:
            names.append(name)
            templates.append(len(gallery) + 1 + k)
            medias.append(media)
    for name in names:
        link_or_copy(out / "loose_crop" / name, root / "loose_crop" / name)
    owner = np.array(subjects + [track["identity"] for track in tracks], np.int64)
    gallery_t = np.arange(1, len(gallery) + 1)
    probe_t = np.arange(len(gallery) + 1, len(owner) + 1)
    pairs = np.stack(np.meshgrid(gallery_t, probe_t, indexing="ij"), axis=-1).reshape(-1, 2)
    labels = (owner[pairs[:, 0] - 1] == owner[pairs[:, 1] - 1]).astype(np.int64)
    write_ijb_meta(
        root,
        TRACKS_NAME,
        np.asarray(names),
        np.asarray(templates, np.int64),
        np.asarray(medias, np.int64),
        np.stack([landmarks[n] for n in names]),
        np.asarray([round(0.5 + 0.5 * quality[n], 4) for n in names], np.float32),
        pairs,
        labels,
    )
    names_a, templates_a = np.asarray(names), np.asarray(templates, np.int64)
    rows_owner = owner[templates_a - 1]
    in_gallery = templates_a <= len(gallery)
    odd = (templates_a - 1) % 2 == 1
    parts = {
        "gallery_G1": in_gallery & ~odd,
        "gallery_G2": in_gallery & odd,
        "probe_mixed": ~in_gallery,
    }
    for part, rows in parts.items():
        write_1n_list(root, TRACKS_NAME, part, templates_a[rows], rows_owner[rows], names_a[rows])


def build_tracks(
    out_dir: str | Path,
    cfg: TrackConfig,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    synthface: str | Path | None = None,
) -> TrackSetInfo:
    """Render the gallery and the probe tracks of ``cfg`` into ``out_dir`` (module docstring).

    ``workers`` render in parallel (default: all cores; the bytes do not depend on it). An
    existing ``out_dir`` is replaced only with ``overwrite`` and when it is a track directory.
    With ``synthface`` (a SynthFace directory), the track identities are checked to be disjoint
    from its identities (:func:`check_disjoint`).
    """
    cfg.check()
    if synthface is not None:
        check_disjoint(cfg, synthface)
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite, marker="tracks.json")
    started = time.perf_counter()
    identities = make_identities(cfg.seed, cfg.first_identity, cfg.identities, cfg.sibling_rate)
    specs: list[SampleSpec] = []
    for ident in identities:
        specs += [
            SampleSpec(ident, STREAM_GALLERY, j, "frontal") for j in range(cfg.gallery_images)
        ]
    tracks: list[dict[str, Any]] = []
    spoilt: list[np.ndarray] = []
    for ident in identities:
        for k in range(cfg.tracks_per_identity):
            rng = np.random.default_rng([cfg.seed, STREAM_TRACK, ident.id, k])
            frames, bad = track_nuisances(
                rng,
                cfg.track_length,
                difficulty=cfg.difficulty,
                smoothness=cfg.smoothness,
                bad_frame_rate=cfg.bad_frame_rate,
            )
            specs += [SampleSpec(ident, STREAM_TRACK, k, nuisance=n) for n in frames]
            tracks.append({"identity": ident.id, "nuisances": frames})
            spoilt.append(bad)
    # the gallery is rendered at difficulty 1 (clean frontal images); tracks carry their nuisances
    render_cfg = SynthConfig(seed=cfg.seed, image_size=cfg.image_size, difficulty=1.0)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    renderer = _Renderer(render_cfg, workers, progress)
    landmarks: dict[str, np.ndarray] = {}
    quality: dict[str, float] = {}
    names: list[str] = []
    previews: list[np.ndarray] = []
    n_gallery = len(identities) * cfg.gallery_images
    try:
        with atomic_directory(out) as partial:
            (partial / "loose_crop").mkdir()
            for n, sample in enumerate(renderer.render(specs, "tracks")):
                crop_rng = np.random.default_rng([cfg.seed, STREAM_CROP, n])
                jpeg, pts = _loose_crop(sample, crop_rng, cfg.image_size)
                name = f"{n + 1}.jpg"
                (partial / "loose_crop" / name).write_bytes(jpeg)
                names.append(name)
                landmarks[name] = pts
                quality[name] = round(sample.quality, 4)
                frame = n - n_gallery
                if 0 <= frame < 4 * cfg.track_length and frame % cfg.track_length < 8:
                    previews.append(decode_image(sample.jpeg))
            gallery = [
                names[i * cfg.gallery_images : (i + 1) * cfg.gallery_images]
                for i in range(len(identities))
            ]
            for k, track in enumerate(tracks):
                start = n_gallery + k * cfg.track_length
                frames = names[start : start + cfg.track_length]
                nuisances = track.pop("nuisances")
                track.update(
                    {
                        "frames": frames,
                        "quality": [quality[f] for f in frames],
                        "yaw": [round(v.yaw / _DEG, 2) for v in nuisances],
                        "blur": [round(v.blur_sigma, 3) for v in nuisances],
                        "lowres": [round(v.lowres_factor, 3) for v in nuisances],
                        "noise": [round(v.noise_sigma, 3) for v in nuisances],
                        "occlusion": [v.occlusion for v in nuisances],
                        "bad": spoilt[k].tolist(),
                    }
                )
            subjects = [ident.id for ident in identities]
            for length in cfg.lengths:
                _write_length(partial, length, gallery, tracks, landmarks, quality, subjects)
            summary = {
                "robustface": robustface.__version__,
                "config": to_dict(cfg),
                "identity_range": [cfg.first_identity, cfg.first_identity + cfg.identities],
                "images": len(names),
                "lengths": list(cfg.lengths),
                "gallery": {"identity": subjects, "images": gallery},
                "tracks": tracks,
            }
            grid = make_grid(previews, ncols=8)
            write_bytes_atomic(partial / "preview.png", encode_image(grid, fmt="png"))
            write_text_atomic(
                partial / "tracks.json", json.dumps(summary, separators=(",", ":")) + "\n"
            )
    finally:
        renderer.close()
    return TrackSetInfo(out, summary, time.perf_counter() - started)


def read_tracks(root: str | Path) -> dict[str, Any]:
    """The ``tracks.json`` of a track directory (see the module docstring)."""
    path = Path(root) / "tracks.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a track directory (no tracks.json)")
    return json.loads(path.read_text(encoding="utf-8"))
