"""Write a SynthFace benchmark directory in the real formats (insightface ``.rec``, ``.bin``, IJB).

Layout of ``build_synthface(out_dir, cfg)``::

    out_dir/
      train.rec train.idx property manifest.json   training set (insightface layout)
      lfw.bin cfp_fp.bin lowq.bin                  verification pair sets (10 folds)
      verification.json                            per pair: identities, qualities, siblings
      open_set/open_set.rec .idx property manifest.json   open-set noise source
      IJBS/meta/ijbs_*.txt IJBS/loose_crop/*.jpg   IJB-style template set
      IJBS/meta/ijbs_1N_*.csv                      1:N galleries G1/G2 + probes (2+ templates/id)
      images/<label>/<index>.jpg                   image-folder copy (``image_folder: true``)
      preview.png  synthface.json

Every sample is rendered from ``np.random.default_rng([seed, stream, identity, index])``, so the
bytes do not depend on the number of worker processes. The directory is built under
``out_dir.partial`` and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

import robustface
from robustface.config import SynthConfig, to_dict
from robustface.data.ijb import write_ijb_meta
from robustface.data.image import decode_image, encode_image
from robustface.data.recordio import write_insightface_rec
from robustface.data.synth.identity import Identity, make_identities
from robustface.data.synth.render import (
    Nuisance,
    make_grid,
    render_face,
    render_nonface,
    render_sketch,
    sample_nuisance,
)
from robustface.data.verification import write_bin
from robustface.utils.io import write_bytes_atomic, write_text_atomic

# Random streams: each part of the benchmark draws from its own stream.
STREAM_TRAIN, STREAM_OPEN_SET, STREAM_KIND, STREAM_PAIRS, STREAM_IJB = 1, 2, 3, 4, 5
STREAM_DUPLICATE = 6  # the images of a duplicate class and the choice of its originals
VERIFICATION_SETS = {
    # name: (stream, profile of the first image, profile of the second image)
    "lfw": (10, "frontal", "frontal"),
    "cfp_fp": (11, "frontal", "profile"),
    "lowq": (12, "frontal", "low_quality"),
}
KINDS = ("face", "sketch", "nonface", "low_quality")
"""Training sample kinds; ``low_quality`` is a face rendered with the ``low_quality`` profile."""
IJB_NAME = "IJBS"


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """One image to render: who, which random stream/index, which nuisance profile, which kind.

    ``nuisance``, when given, is used as it is instead of a draw from ``profile`` (video-like
    tracks, :mod:`robustface.data.synth.tracks`)."""

    identity: Identity
    stream: int
    index: int
    profile: str = "train"
    kind: str = "face"
    nuisance: Nuisance | None = None


@dataclasses.dataclass
class RenderedSample:
    """A rendered, JPEG-encoded sample and its ground truth."""

    jpeg: bytes
    landmarks: np.ndarray
    quality: float
    nuisance: dict[str, Any]


@dataclasses.dataclass
class SynthFaceInfo:
    """What :func:`build_synthface` wrote: the directory, its summary and how long it took."""

    path: Path
    summary: dict[str, Any]
    seconds: float
    workers: int

    @property
    def images_per_second(self) -> float:
        """Images generated (rendered, encoded and written) per second of wall time."""
        return self.summary["images"] / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class IdentityRanges:
    """Disjoint global identity-id ranges ``[start, stop)`` of each part of the benchmark."""

    train: range
    open_set: range
    test: range
    ijb: range

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> IdentityRanges:
        """Lay the ranges end to end: train, open-set source, verification test, IJB."""
        a = cfg.identities
        b = a + cfg.open_set_identities
        c = b + cfg.test_identities
        return cls(range(0, a), range(a, b), range(b, c), range(c, c + cfg.ijb_identities))


def render_sample(spec: SampleSpec, seed: int, difficulty: float, size: int) -> RenderedSample:
    """Render and encode one sample; deterministic in ``(seed, spec)``."""
    rng = np.random.default_rng([seed, spec.stream, spec.identity.id, spec.index])
    nuisance = (
        spec.nuisance
        if spec.nuisance is not None
        else sample_nuisance(rng, spec.profile, difficulty=difficulty)
    )
    if spec.kind in ("face", "low_quality"):
        out = render_face(spec.identity, nuisance, size=size)
        image, landmarks, quality = out.image, out.landmarks, out.quality
    elif spec.kind == "sketch":
        out = render_sketch(spec.identity, nuisance, size=size)
        image, landmarks, quality = out.image, out.landmarks, out.quality
    elif spec.kind == "nonface":
        image = render_nonface(rng, size=size)
        landmarks, quality = np.full((5, 2), np.nan, np.float32), 0.0
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    jpeg = encode_image(image, quality=int(nuisance.jpeg_quality))
    return RenderedSample(
        jpeg, np.asarray(landmarks, np.float32), float(quality), _nuisance_dict(nuisance)
    )


def _nuisance_dict(nuisance: Any) -> dict[str, Any]:
    """Nuisance parameters as JSON-friendly values (floats rounded to 4 decimals)."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(nuisance).items():
        if isinstance(value, (np.ndarray, list, tuple)):
            value = np.asarray(value).tolist()
        if isinstance(value, float):
            value = round(value, 4)
        elif isinstance(value, list):
            value = [round(v, 4) if isinstance(v, float) else v for v in value]
        out[key] = value
    return out


def _render_chunk(args: tuple[list[SampleSpec], int, float, int]) -> list[RenderedSample]:
    specs, seed, difficulty, size = args
    return [render_sample(s, seed, difficulty, size) for s in specs]


def _init_worker() -> None:
    cv2.setNumThreads(1)


class _Renderer:
    """Renders lists of samples in order, in worker processes when ``workers > 1``."""

    def __init__(self, cfg: SynthConfig, workers: int, progress: bool) -> None:
        self.cfg = cfg
        self.workers = workers
        self.progress = progress
        self._pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(workers, initializer=_init_worker)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def render(
        self, specs: Sequence[SampleSpec], desc: str, chunk: int = 64
    ) -> Iterator[RenderedSample]:
        """Yield the rendered samples of ``specs`` in order."""
        cfg = self.cfg
        tasks = [
            (list(specs[i : i + chunk]), cfg.seed, cfg.difficulty, cfg.image_size)
            for i in range(0, len(specs), chunk)
        ]
        results = self._pool.imap(_render_chunk, tasks) if self._pool else map(_render_chunk, tasks)
        with tqdm(
            total=len(specs), desc=desc, unit="img", disable=not self.progress, leave=False
        ) as bar:
            for batch in results:
                bar.update(len(batch))
                yield from batch


def _train_kinds(cfg: SynthConfig, n: int) -> np.ndarray:
    """Kind (index into :data:`KINDS`) of each training sample: exactly ``round(n * fraction)``
    sketches, non-faces and low-quality faces, at seeded random positions; the rest are faces."""
    rng = np.random.default_rng([cfg.seed, STREAM_KIND])
    order = rng.permutation(n)
    kinds = np.zeros(n, dtype=np.int64)
    start = 0
    for kind, fraction in enumerate((cfg.sketch_fraction, cfg.nonface_fraction, cfg.lowq_fraction)):
        count = min(round(n * fraction), n - start)
        kinds[order[start : start + count]] = kind + 1
        start += count
    return kinds


def _duplicate_identities(cfg: SynthConfig, identities: list[Identity]) -> dict[int, int]:
    """``{duplicate class: original class}``: the last ``round(C * duplicate_fraction)`` classes
    show the person of a seeded random distinct earlier class (one person under two labels)."""
    count = round(len(identities) * cfg.duplicate_fraction)
    if count == 0:
        return {}
    rng = np.random.default_rng([cfg.seed, STREAM_DUPLICATE])
    first = len(identities) - count
    originals = rng.choice(first, size=count, replace=False)
    return {first + i: int(o) for i, o in enumerate(originals)}


def _write_classification_set(
    renderer: _Renderer,
    identities: list[Identity],
    per_identity: int,
    stream: int,
    kinds: np.ndarray | None,
    out_dir: Path,
    prefix: str,
    desc: str,
    image_folder: Path | None = None,
    preview: int = 0,
    duplicates: dict[int, int] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Render ``per_identity`` samples per identity into an insightface ``.rec`` and a manifest.

    ``duplicates`` maps a class to the class whose person it shows: its images are that person's,
    drawn from :data:`STREAM_DUPLICATE` (other images than the original class's). Also returns the
    decoded first ``preview`` samples of each of the first ``preview`` classes.
    """
    duplicates = duplicates or {}
    specs = []
    for i, ident in enumerate(identities):
        for j in range(per_identity):
            kind = KINDS[kinds[i * per_identity + j]] if kinds is not None else "face"
            specs.append(
                SampleSpec(
                    identities[duplicates[i]] if i in duplicates else ident,
                    STREAM_DUPLICATE if i in duplicates else stream,
                    j,
                    "low_quality" if kind == "low_quality" else "train",
                    kind,
                )
            )
    columns: dict[str, list[Any]] = {
        k: []
        for k in ("identity", "label", "kind", "quality", "sibling_of", "landmarks", "nuisance")
    }
    previews: list[np.ndarray] = []

    def items() -> Iterator[tuple[bytes, int]]:
        for n, (spec, sample) in enumerate(zip(specs, renderer.render(specs, desc), strict=True)):
            label = n // per_identity
            columns["identity"].append(spec.identity.id)
            columns["label"].append(label)
            columns["kind"].append(spec.kind)
            columns["quality"].append(round(sample.quality, 4))
            columns["sibling_of"].append(spec.identity.sibling_of)
            columns["landmarks"].append(np.round(sample.landmarks, 2).tolist())
            columns["nuisance"].append(sample.nuisance)
            if image_folder is not None:
                path = image_folder / f"{label:06d}" / f"{n % per_identity:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(sample.jpeg)
            if label < preview and n % per_identity < preview:
                previews.append(decode_image(sample.jpeg))
            yield sample.jpeg, label

    size = renderer.cfg.image_size
    write_insightface_rec(
        out_dir, items(), image_size=(size, size), prefix=prefix, num_classes=len(identities)
    )
    manifest = {
        "description": "Per-sample ground truth; sample i is record key i+1 of the .rec.",
        "num_samples": len(specs),
        "num_classes": len(identities),
        "samples": columns,
    }
    write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, separators=(",", ":")))
    return manifest, previews


def _pair_plan(
    cfg: SynthConfig, test: list[Identity], num_pairs: int, stream: int
) -> list[tuple[Identity, Identity, bool]]:
    """LFW-style pairs: 10 identity-disjoint folds, each ``P/20`` same then ``P/20`` different.

    Hard negatives: each sibling pair inside a fold gives two different pairs (at most a quarter of
    the fold's negatives), so that one confusable pair cannot dominate a fold's accuracy.
    """
    rng = np.random.default_rng([cfg.seed, STREAM_PAIRS, stream])
    order = rng.permutation(len(test))
    folds = np.array_split(order, 10)
    by_id = {ident.id: ident for ident in test}
    half = num_pairs // 20
    plan: list[tuple[Identity, Identity, bool]] = []
    for fold in folds:
        members = [test[i] for i in fold]
        member_ids = {m.id for m in members}
        siblings = [(by_id[m.sibling_of], m) for m in members if m.sibling_of in member_ids]
        for k in range(half):
            ident = (
                members[k % len(members)]
                if k < len(members)
                else members[rng.integers(len(members))]
            )
            plan.append((ident, ident, True))
        hard = [pair for pair in siblings for _ in range(2)][: half // 4]
        for n in range(half):
            if n < len(hard):
                a, b = hard[n]
            else:
                i, j = rng.choice(len(members), size=2, replace=False)
                a, b = members[i], members[j]
            plan.append((a, b, False))
    return plan


def _write_verification_sets(
    renderer: _Renderer, test: list[Identity], out: Path
) -> dict[str, Any]:
    cfg = renderer.cfg
    meta: dict[str, Any] = {}
    for name, (stream, prof_a, prof_b) in VERIFICATION_SETS.items():
        num_pairs = getattr(cfg, f"{name}_pairs")
        if num_pairs == 0:
            continue
        plan = _pair_plan(cfg, test, num_pairs, stream)
        specs = []
        for p, (a, b, _) in enumerate(plan):
            specs.append(SampleSpec(a, stream, 2 * p, prof_a))
            specs.append(SampleSpec(b, stream, 2 * p + 1, prof_b))
        samples = list(renderer.render(specs, f"{name}.bin"))
        write_bin(out / f"{name}.bin", [s.jpeg for s in samples], [same for _, _, same in plan])
        meta[name] = {
            "pairs": len(plan),
            "profiles": [prof_a, prof_b],
            "identity": [[a.id, b.id] for a, b, _ in plan],
            "sibling": [
                bool(not same and (b.sibling_of == a.id or a.sibling_of == b.id))
                for a, b, same in plan
            ],
            "quality": [
                [round(samples[2 * p].quality, 4), round(samples[2 * p + 1].quality, 4)]
                for p in range(len(plan))
            ],
        }
    write_text_atomic(out / "verification.json", json.dumps(meta, separators=(",", ":")))
    return meta


def _loose_crop(
    sample: RenderedSample, rng: np.random.Generator, size: int
) -> tuple[bytes, np.ndarray]:
    """Place an aligned face into a larger, unaligned canvas (an IJB-style loose crop)."""
    canvas = round(size * rng.uniform(1.3, 1.7))
    angle = rng.uniform(-15.0, 15.0)
    scale = rng.uniform(0.8, 1.2)
    center = (size / 2.0, size / 2.0)
    matrix = cv2.getRotationMatrix2D(center, angle, scale)
    matrix[:, 2] += (canvas - size) / 2.0 + rng.uniform(-0.1, 0.1, size=2) * size
    image = decode_image(sample.jpeg)
    crop = cv2.warpAffine(
        image, matrix, (canvas, canvas), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    pts = np.concatenate([sample.landmarks, np.ones((5, 1), np.float32)], axis=1) @ matrix.T
    return encode_image(crop, quality=90), pts.astype(np.float32)


def write_1n_list(
    root: Path,
    name: str,
    part: str,
    templates: np.ndarray,
    subjects: np.ndarray,
    images: np.ndarray,
) -> None:
    """One IJB-C-style 1:N list ``root/meta/{name}_1N_{part}.csv`` (one row per image:
    ``TEMPLATE_ID,SUBJECT_ID,FILENAME``), as :func:`robustface.evaluate.ijb.read_ijb_1n_meta`
    reads it; ``part`` is ``gallery_<G>`` or ``probe_mixed``."""
    lines = [
        f"{t},{s},{n}\n"
        for t, s, n in zip(templates.tolist(), subjects.tolist(), images.tolist(), strict=True)
    ]
    path = root / "meta" / f"{name.lower()}_1N_{part}.csv"
    write_text_atomic(path, "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(lines))


def _write_ijb_1n(
    root: Path, names: np.ndarray, templates: np.ndarray, owners: list[int], cfg: SynthConfig
) -> None:
    """IJB-C-style 1:N lists (one row per image): each identity's first template enrols it in
    gallery G1 (even identities) or G2 (odd ones); its other templates are the mixed probes."""
    index = templates - 1
    per_identity = cfg.ijb_templates_per_identity
    subjects = np.asarray(owners)[index]
    enrolled = index % per_identity == 0
    odd = (index // per_identity) % 2 == 1
    parts = {"gallery_G1": enrolled & ~odd, "gallery_G2": enrolled & odd, "probe_mixed": ~enrolled}
    for part, rows in parts.items():
        write_1n_list(root, IJB_NAME, part, templates[rows], subjects[rows], names[rows])


def _write_ijb(renderer: _Renderer, identities: list[Identity], root: Path) -> dict[str, Any]:
    """An IJB-style set: templates of several media, loose crops, 5-point landmarks, pair list."""
    cfg = renderer.cfg
    rng = np.random.default_rng([cfg.seed, STREAM_IJB])
    specs: list[SampleSpec] = []
    templates: list[int] = []
    medias: list[int] = []
    template_owner: list[int] = []
    template_id = media_id = 0
    for ident in identities:
        for _ in range(cfg.ijb_templates_per_identity):
            template_id += 1
            template_owner.append(ident.id)
            for _ in range(int(rng.integers(1, cfg.ijb_max_media_per_template + 1))):
                media_id += 1
                for _ in range(int(rng.integers(1, cfg.ijb_max_images_per_media + 1))):
                    specs.append(SampleSpec(ident, STREAM_IJB, len(specs), "train"))
                    templates.append(template_id)
                    medias.append(media_id)
    crops_dir = root / "loose_crop"
    crops_dir.mkdir(parents=True, exist_ok=True)
    names, landmarks, faceness = [], [], []
    for n, sample in enumerate(renderer.render(specs, IJB_NAME)):
        crop_rng = np.random.default_rng([cfg.seed, STREAM_IJB, n])
        jpeg, pts = _loose_crop(sample, crop_rng, cfg.image_size)
        name = f"{n + 1}.jpg"
        (crops_dir / name).write_bytes(jpeg)
        names.append(name)
        landmarks.append(pts)
        faceness.append(round(0.5 + 0.5 * sample.quality, 4))
    owner = np.asarray(template_owner)
    t_ids = np.arange(1, len(owner) + 1)
    same_i, same_j = np.nonzero(
        (owner[:, None] == owner[None, :]) & (t_ids[:, None] < t_ids[None, :])
    )
    genuine = np.stack([t_ids[same_i], t_ids[same_j]], axis=1)
    n_imp = len(genuine) * cfg.ijb_impostor_ratio
    a = rng.integers(0, len(owner), size=n_imp * 2)
    b = rng.integers(0, len(owner), size=n_imp * 2)
    keep = owner[a] != owner[b]
    candidates = np.unique(
        np.sort(np.stack([t_ids[a[keep]], t_ids[b[keep]]], axis=1), axis=1), axis=0
    )
    # a random subset (np.unique sorts, so truncating it would favour low template ids)
    chosen = np.sort(rng.permutation(len(candidates))[:n_imp])
    impostor = candidates[chosen]
    pairs = np.concatenate([genuine, impostor]).astype(np.int64)
    labels = np.concatenate([np.ones(len(genuine)), np.zeros(len(impostor))]).astype(np.int64)
    write_ijb_meta(
        root,
        IJB_NAME,
        np.asarray(names),
        np.asarray(templates, np.int64),
        np.asarray(medias, np.int64),
        np.stack(landmarks).astype(np.float32),
        np.asarray(faceness, np.float32),
        pairs,
        labels,
    )
    if cfg.ijb_templates_per_identity >= 2:
        _write_ijb_1n(root, np.asarray(names), np.asarray(templates), template_owner, cfg)
    return {
        "images": len(names),
        "templates": int(template_id),
        "media": int(media_id),
        "pairs": len(pairs),
        "genuine": len(genuine),
    }


def build_synthface(
    out_dir: str | Path,
    cfg: SynthConfig,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthFaceInfo:
    """Generate the SynthFace benchmark described by ``cfg`` into ``out_dir``.

    ``workers`` render in parallel (default: all cores); the output is byte-identical for any number
    of workers. An existing ``out_dir`` is an error unless ``overwrite`` is set.
    """
    problems = cfg.check()
    if problems:
        raise ValueError("invalid SynthConfig:\n  " + "\n  ".join(problems))
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it"
            )
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a SynthFace directory; not replacing it")
        if any(out.iterdir()) and not (out / "synthface.json").is_file():
            raise FileExistsError(
                f"{out} is not empty and not a SynthFace directory; not replacing it"
            )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    ranges = IdentityRanges.from_config(cfg)
    t0 = time.perf_counter()
    renderer = _Renderer(cfg, workers, progress)
    try:
        summary = _build_parts(renderer, ranges, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        renderer.close()
    summary.update(
        {
            "robustface": robustface.__version__,
            "config": to_dict(cfg),
            "identity_ranges": {
                k: [v.start, v.stop] for k, v in dataclasses.asdict(ranges).items()
            },
        }
    )
    write_text_atomic(partial / "synthface.json", json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return SynthFaceInfo(out, summary, time.perf_counter() - t0, workers)


def _build_parts(renderer: _Renderer, ranges: IdentityRanges, partial: Path) -> dict[str, Any]:
    """Write every part of the benchmark into ``partial``; return the summary."""
    cfg = renderer.cfg
    train_ids = make_identities(cfg.seed, ranges.train.start, len(ranges.train), cfg.sibling_rate)
    n_train = len(train_ids) * cfg.images_per_identity
    duplicates = _duplicate_identities(cfg, train_ids)
    train_manifest, previews = _write_classification_set(
        renderer,
        train_ids,
        cfg.images_per_identity,
        STREAM_TRAIN,
        _train_kinds(cfg, n_train),
        partial,
        "train",
        "train.rec",
        image_folder=partial / "images" if cfg.image_folder else None,
        preview=8,
        duplicates=duplicates,
    )
    summary: dict[str, Any] = {
        "train": {
            "samples": n_train,
            "classes": len(train_ids),
            "kinds": {k: train_manifest["samples"]["kind"].count(k) for k in KINDS},
            "duplicates": {str(d): o for d, o in duplicates.items()},
        },
    }
    if cfg.open_set_identities and cfg.open_set_images_per_identity:
        open_ids = make_identities(
            cfg.seed, ranges.open_set.start, len(ranges.open_set), cfg.sibling_rate
        )
        _write_classification_set(
            renderer,
            open_ids,
            cfg.open_set_images_per_identity,
            STREAM_OPEN_SET,
            None,
            partial / "open_set",
            "open_set",
            "open_set.rec",
        )
        summary["open_set"] = {
            "samples": len(open_ids) * cfg.open_set_images_per_identity,
            "classes": len(open_ids),
        }
    test_ids = make_identities(cfg.seed, ranges.test.start, len(ranges.test), cfg.sibling_rate)
    verification = _write_verification_sets(renderer, test_ids, partial)
    summary["verification"] = {k: v["pairs"] for k, v in verification.items()}
    if cfg.ijb_identities:
        ijb_ids = make_identities(cfg.seed, ranges.ijb.start, len(ranges.ijb), cfg.sibling_rate)
        summary["ijb"] = _write_ijb(renderer, ijb_ids, partial / IJB_NAME)
    grid = make_grid(previews, ncols=min(8, cfg.images_per_identity))
    write_bytes_atomic(partial / "preview.png", encode_image(grid, fmt="png"))
    total = summary["train"]["samples"] + summary.get("open_set", {}).get("samples", 0)
    total += 2 * sum(summary["verification"].values()) + summary.get("ijb", {}).get("images", 0)
    summary["images"] = total
    return summary


def check_synthface(path: str | Path, cfg: SynthConfig) -> dict[str, Any]:
    """The summary of the SynthFace set at ``path``; raises if it was built from another config."""
    summary_file = Path(path) / "synthface.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{path}: not a SynthFace directory (no synthface.json)")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    wanted = to_dict(cfg)
    # a field added after the set was built had its default's behaviour then
    built = {**to_dict(SynthConfig()), **summary.get("config", {})}
    differ = sorted(k for k in wanted if built.get(k) != wanted[k])
    if differ:
        raise ValueError(
            f"{path}: SynthFace set was built with other values of "
            f"synth.{', synth.'.join(differ)}; "
            "point data.path elsewhere (or drop it to build one in the run directory)"
        )
    return summary


def ensure_synthface(
    path: str | Path, cfg: SynthConfig, *, workers: int | None = None, progress: bool = True
) -> tuple[dict[str, Any], SynthFaceInfo | None]:
    """Reuse the SynthFace set at ``path`` if it was built from ``cfg``, else (re)build it.

    Returns the set's summary and, when it was built now, the build info (None when reused).
    """
    summary_file = Path(path) / "synthface.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if (
            summary.get("config") == to_dict(cfg)
            and summary.get("robustface") == robustface.__version__
        ):
            return summary, None
    info = build_synthface(path, cfg, workers=workers, overwrite=True, progress=progress)
    return info.summary, info
