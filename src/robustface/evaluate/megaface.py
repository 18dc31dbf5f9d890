"""MegaFace challenge 1: identification (CMC, rank-1) and verification (TAR@FAR) with distractors.

Protocol (the devkit's ``run_experiment.py`` + ``FuseResults``, as re-implemented in Python by
FaceX-Zoo and checked there against the devkit's binaries):

* Features are L2-normalised; a score is the cosine (equivalent to the devkit's L2 distance on
  normalised features).
* **Identification.** For every probe identity (FaceScrub) each image ``g`` in turn is put in the
  gallery with the distractors, and every *other* image ``p`` of that identity is a probe: the
  trials are all ordered same-identity pairs ``(p, g)``, ``p != g``. The rank of the mate is
  ``1 + #{distractors d : s(p, d) > s(p, g)}`` (ties favour the mate); rank-k is the fraction of
  trials whose mate ranks within ``k``. Only ``p``'s best ``max_rank`` distractor scores are
  needed, so the distractors are searched once per probe (faiss ``IndexFlatIP``).
* **Verification.** Positives are the unordered same-identity probe pairs, negatives all
  probe x distractor pairs. With ``M = floor(far * #negatives)`` the threshold is the
  ``(M+1)``-th highest negative score and a pair is accepted when its score is strictly above it,
  so at most ``M`` negatives pass (actual FAR <= target); TAR is the accepted fraction of
  positives. The global top ``M+1`` negatives lie within every probe's top ``M+1``, so the same
  faiss search provides them.
  With ``M = 0`` (fewer than ``1 / far`` negatives: 3,530 probes need 284 distractors for FAR
  1e-6) no negative may pass, the FAR is not measurable and ``tar`` is None (the rule of
  :func:`robustface.evaluate.roc.far_measurable`); ``tar_insightface`` keeps the devkit's number,
  the TAR above the highest negative, which insightface's MegaFace tables report (a deviation
  from the devkit, which prints it).
* **Sizes.** A run at size ``N`` uses the first ``N`` distractors in the given order (a size
  above the number available is capped to it). The devkit draws a separate list per size
  (``megaface_features_list.json_{N}_1``); pass the 1M list to get its 1M numbers exactly.
* **Noise lists** (insightface's ``facescrub_noises.txt`` / ``megaface_noises.txt``, as in its
  ``remove_noises.py``): a noisy probe image is replaced by its identity's centre (the
  normalised mean of the identity's clean features; insightface adds a +-0.001 jitter, left out
  here for determinism); a noisy distractor is pushed away: it stays in the size-``N`` set and
  in the negative count, but never outranks a mate nor passes a threshold. Entries are matched
  on the image file name for FaceScrub and on the last three path components
  (``folder/owner/image.jpg``) for MegaFace; ``#`` lines are comments and a tab-separated line
  uses its last field.

**Fusion of the two views** (``aggregation``): MegaFace compares single images (a probe image
against one gallery image and the distractors), so the only set to fuse is an image and its
horizontal mirror. ``norm_weighted`` (the default) is insightface's ``gen_megaface.py``: the two
raw embeddings summed (unchanged, bit for bit). Any other aggregator of
:data:`robustface.fuse.AGGREGATORS` fuses the two views as a set of two frames
(:func:`fuse_flip_views`): ``mean`` averages their unit features, ``caface`` runs the CAFace
network on them with their styles (a ``fusion_model`` checkpoint; no published MegaFace
protocol exists for CAFace). The aggregation (and the fusion model's sha256) is recorded in the
``.npz`` caches and the report; a cache or feature file fused otherwise is refused (devkit and
``.npy`` features count as ``norm_weighted``).

Feature inputs: the devkit's per-image files (``{root}/{list path}{file_ending}``, e.g.
``_insightface.bin``: four native-endian int32 ``rows, cols, elem_size, cv_type`` = ``d, 1, 4,
5`` (``CV_32FC1``) followed by ``rows * cols`` float32, as OpenCV's matrix serialisation in the
devkit and insightface's ``gen_megaface.py`` write them) with the devkit's JSON lists
(``{"path": [...]}`` plus ``"id"`` for FaceScrub), our ``.npz`` caches (``features`` N x d
float32, ``paths`` N str, optional ``labels`` N), or a bare ``.npy`` feature matrix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from robustface.data.image import decode_image
from robustface.errors import DataFormatError
from robustface.evaluate.roc import (
    check_far_reading,
    far_measurable,
    unmeasurable_cell,
    unmeasurable_note,
)
from robustface.evaluate.verification import _resize, embed_pairs, pixel_views
from robustface.fuse.base import Aggregator
from robustface.fuse.styles import embed_with_styles
from robustface.utils.guards import check_int, check_real
from robustface.utils.io import atomic_path
from robustface.utils.table import markdown_table

__all__ = [
    "DEFAULT_SIZES",
    "FeatureSet",
    "FeatureSource",
    "ImageEmbedder",
    "MegafaceRun",
    "embed_image_files",
    "evaluate_megaface",
    "format_megaface",
    "fuse_flip_views",
    "fusion_record",
    "load_feature_set",
    "noise_mask",
    "plot_megaface",
    "read_devkit_feature",
    "read_devkit_features",
    "read_devkit_list",
    "read_noise_list",
    "run_megaface",
    "save_feature_cache",
    "source_feature_set",
    "write_devkit_feature",
    "write_megaface_report",
]

DEFAULT_SIZES = (10, 100, 1000, 10000, 100000, 1000000)
"""The devkit's distractor set sizes."""
_HEADER = np.dtype("<i4")
_CV_32FC1 = 5
DEFAULT_FUSION = {"aggregation": "norm_weighted", "fusion_model_sha256": None}
"""How the devkit's and insightface's features fuse an image with its mirror: summed."""
_MAX_TOPK_ENTRIES = 400_000_000
"""Largest probes x k score matrix the verification search may hold (1.6 GB of float32)."""


@dataclass
class FeatureSet:
    """Features (``N x d``) with their image paths and identity labels where known."""

    features: np.ndarray
    paths: list[str] | None = None
    labels: np.ndarray | None = None


# --------------------------------------------------------------------------- devkit files


def read_devkit_feature(path: str | Path) -> np.ndarray:
    """One devkit feature file: a ``rows x cols`` CV_32FC1 matrix returned flat (float32)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 16:
        raise DataFormatError(path, f"{len(data)} bytes: shorter than the 16-byte matrix header")
    rows, cols, elem_size, cv_type = np.frombuffer(data[:16], dtype=_HEADER)
    if cv_type != _CV_32FC1 or elem_size != 4:
        raise DataFormatError(
            path, f"matrix type {cv_type} with {elem_size}-byte elements; expected CV_32FC1 (5, 4)"
        )
    count = int(rows) * int(cols)
    if count < 1 or len(data) != 16 + 4 * count:
        raise DataFormatError(
            path, f"header says {rows} x {cols} float32 but the file has {len(data) - 16} bytes"
        )
    return np.frombuffer(data, dtype="<f4", offset=16).copy()


def write_devkit_feature(path: str | Path, feature: np.ndarray) -> None:
    """Write a 1-D feature as the devkit's ``d x 1`` CV_32FC1 matrix file (atomically)."""
    vec = np.asarray(feature, dtype="<f4")
    if vec.ndim != 1 or vec.size == 0:
        raise ValueError(f"feature must be a non-empty 1-D array, got shape {vec.shape}")
    header = np.array([vec.size, 1, 4, _CV_32FC1], dtype=_HEADER)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header.tobytes() + vec.tobytes())


def read_devkit_list(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """A devkit JSON list: ``(paths, ids or None)`` from ``{"path": [...], "id": [...]}``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), list):
        raise DataFormatError(path, 'expected a JSON object with a "path" list')
    if not doc["path"]:
        raise DataFormatError(path, 'its "path" list is empty')
    paths = [str(p) for p in doc["path"]]
    ids = doc.get("id")
    if ids is not None and len(ids) != len(paths):
        raise DataFormatError(path, f'{len(ids)} "id" entries for {len(paths)} paths')
    return paths, None if ids is None else np.asarray([str(i) for i in ids])


def read_devkit_features(
    root: str | Path, paths: Sequence[str], file_ending: str, *, progress: bool = False
) -> np.ndarray:
    """Stack the devkit feature files ``root / (path + file_ending)`` into ``N x d`` float32."""
    root = Path(root)
    if not paths:
        raise ValueError(f"{root}: the feature list is empty")
    first = read_devkit_feature(root / f"{paths[0]}{file_ending}")
    out = np.empty((len(paths), first.size), dtype=np.float32)
    out[0] = first
    for i, rel in enumerate(
        tqdm(paths[1:], desc="features", unit="file", disable=not progress), start=1
    ):
        file = root / f"{rel}{file_ending}"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: devkit feature file missing (list entry {i})")
        vec = read_devkit_feature(file)
        if vec.size != first.size:
            raise DataFormatError(file, f"{vec.size} values; the first file has {first.size}")
        out[i] = vec
    return out


# --------------------------------------------------------------------------- caches


def save_feature_cache(
    path: str | Path,
    features: np.ndarray,
    *,
    paths: Sequence[str] | None = None,
    labels: np.ndarray | Sequence[Any] | None = None,
    model_sha256: str | None = None,
    fusion: dict[str, Any] | None = None,
) -> None:
    """Write a feature cache ``.npz`` (``features`` float32, ``paths``, ``labels``, the
    ``model`` sha256 that made them and the ``fusion`` of the views, :func:`fusion_record`)
    atomically."""
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"features must be a non-empty N x d array, got shape {feats.shape}")
    arrays: dict[str, np.ndarray] = {"features": feats}
    for name, value in (("paths", paths), ("labels", labels)):
        if value is not None:
            arr = np.asarray(value) if name == "labels" else np.asarray(list(value), dtype=str)
            if arr.shape != (feats.shape[0],):
                raise ValueError(f"{name} must have {feats.shape[0]} entries, got {arr.shape}")
            arrays[name] = arr
    if model_sha256 is not None:
        arrays["model"] = np.asarray(model_sha256)
    if fusion is not None:
        arrays["fusion"] = np.asarray(json.dumps(fusion, sort_keys=True))
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def _read_labels(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    # one label per line: FaceScrub identity names contain spaces ("Aaron Eckhart")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return np.asarray([line for line in lines if line])


def load_feature_set(
    source: str | Path,
    *,
    list_file: str | Path | None = None,
    file_ending: str | None = None,
    labels: str | Path | None = None,
    model_sha256: str | None = None,
    fusion: dict[str, Any] | None = None,
    progress: bool = False,
) -> FeatureSet:
    """Read features from a ``.npz`` cache, a ``.npy`` matrix (memory-mapped) or a devkit folder.

    A devkit feature directory needs ``list_file`` (the devkit JSON list, whose ``id`` entries
    become the labels) and ``file_ending`` (e.g. ``_insightface.bin``). ``labels`` (``.npy``, or
    text with one label per line) gives or replaces the labels. With ``model_sha256``, a ``.npz``
    cache made by another model is refused; with ``fusion`` (:func:`fusion_record`), features
    whose views were fused otherwise (a cache's record; :data:`DEFAULT_FUSION` for the others).
    """
    source = Path(source)
    made_with = DEFAULT_FUSION
    if source.is_dir():
        if list_file is None or file_ending is None:
            raise ValueError(
                f"{source}: a devkit feature directory needs its JSON list and the file ending "
                "(--probe-list/--distractor-list and --file-ending)"
            )
        paths, ids = read_devkit_list(list_file)
        feats = read_devkit_features(source, paths, file_ending, progress=progress)
        result = FeatureSet(feats, paths, ids)
    elif source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as npz:
            if "features" not in npz:
                raise DataFormatError(source, f"no 'features' array (has {sorted(npz.files)})")
            made_by = str(npz["model"]) if "model" in npz else None
            if model_sha256 is not None and made_by is not None and made_by != model_sha256:
                raise ValueError(
                    f"{source}: features of another model (sha256 {made_by[:12]}...), "
                    f"not of MODEL ({model_sha256[:12]}...)"
                )
            if "fusion" in npz:
                made_with = json.loads(str(npz["fusion"]))
            result = FeatureSet(
                npz["features"],
                npz["paths"].tolist() if "paths" in npz else None,
                npz.get("labels"),
            )
    elif source.suffix == ".npy":
        result = FeatureSet(np.load(source, mmap_mode="r", allow_pickle=False))
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such feature file or directory")
    else:
        raise ValueError(f"{source}: expected a .npz cache, a .npy matrix or a devkit directory")
    if result.features.ndim != 2:
        raise DataFormatError(source, f"features must be N x d, got {result.features.shape}")
    if fusion is not None and made_with != fusion:
        raise ValueError(
            f"{source}: features whose image and mirror were fused with "
            f"{_describe(made_with)}, not {_describe(fusion)} (--aggregation); embed the images "
            "with this aggregation (--*-images with MODEL)"
        )
    if labels is not None:
        result.labels = _read_labels(Path(labels))
    n = result.features.shape[0]
    if result.labels is not None and result.labels.shape != (n,):
        raise ValueError(f"{source}: {result.labels.shape} labels for {n} feature rows")
    return result


def fusion_record(aggregation: str, fusion_model_sha256: str | None = None) -> dict[str, Any]:
    """What a cache records about how an image and its mirror were fused."""
    return {"aggregation": aggregation, "fusion_model_sha256": fusion_model_sha256}


def _describe(record: dict[str, Any]) -> str:
    sha = record.get("fusion_model_sha256")
    return repr(record.get("aggregation")) + ("" if sha is None else f" (model {sha[:12]}...)")


def fuse_flip_views(
    model: torch.nn.Module,
    images: np.ndarray,
    fusion: Aggregator,
    *,
    input_size: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    style_blocks: Sequence[str] | None = None,
) -> np.ndarray:
    """``(N, d)`` unit features of ``N x H x W x 3`` uint8 RGB images: each image and its mirror
    embedded (resized and normalised as :func:`~robustface.evaluate.verification.embed_pairs`
    does) and fused by ``fusion`` as a set of two frames (:meth:`Aggregator.fuse_sets`), with
    the styles of ``style_blocks`` where it needs them."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch = _resize(np.asarray(images[start : start + batch_size]), input_size)
        views = pixel_views(batch, flip=True, device=device)
        styles = None
        if fusion.needs_styles:
            pairs = [
                embed_with_styles(model, v, style_blocks, batch_size=len(v), device=device)
                for v in views
            ]
            feats = torch.stack([f for f, _ in pairs], 1)
            styles = torch.stack([st for _, st in pairs], 1)
        else:
            with torch.inference_mode():
                feats = torch.stack([model(v).float().cpu() for v in views], 1)
        parts.append(fusion.fuse_sets(feats, styles).float().numpy())
    return np.concatenate(parts)


def embed_image_files(
    model: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    paths: Sequence[str],
    *,
    input_size: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    fusion: Aggregator | None = None,
    style_blocks: Sequence[str] | None = None,
) -> np.ndarray:
    """Embed aligned face images ``root / path`` as insightface's ``gen_megaface.py``: image +
    flip summed (:func:`robustface.evaluate.verification.embed_pairs`), or with ``fusion`` the
    two views fused by it (:func:`fuse_flip_views`); returns ``N x d``."""
    root = Path(root)
    if not paths:
        raise ValueError(f"{root}: no images to embed")
    chunk = max(1, 8 * batch_size)
    out: np.ndarray | None = None  # filled in place: no second copy of a 1M x d matrix
    starts = range(0, len(paths), chunk)
    for start in tqdm(starts, desc="embedding", unit="chunk", disable=not progress):
        images = []
        for rel in paths[start : start + chunk]:
            file = root / rel
            if not file.is_file():
                raise FileNotFoundError(f"{file}: image missing")
            images.append(decode_image(file.read_bytes(), file))
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"{root}: images of different sizes {sorted(shapes)}; align them")
        if fusion is None:
            emb, _ = embed_pairs(
                np.stack(images), model, batch_size=batch_size, device=device, input_size=input_size
            )
        else:
            emb = fuse_flip_views(
                model,  # type: ignore[arg-type]
                np.stack(images),
                fusion,
                input_size=input_size,
                batch_size=batch_size,
                device=device,
                style_blocks=style_blocks,
            )
        if out is None:
            out = np.empty((len(paths), emb.shape[1]), dtype=np.float32)
        out[start : start + len(emb)] = emb
    assert out is not None
    return out


# --------------------------------------------------------------------------- noise lists


def read_noise_list(path: str | Path) -> set[str]:
    """Entries of an insightface noise list (``#`` comments; a tabbed line's last field)."""
    entries = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.add(line.split("\t")[-1].strip())
    return entries


def noise_mask(paths: Sequence[str], noises: set[str], components: int) -> np.ndarray:
    """Which ``paths`` are listed in ``noises``, comparing their last ``components`` parts.

    Use 1 for FaceScrub (file names) and 3 for MegaFace (``folder/owner/image.jpg``).
    """
    keys = ["/".join(Path(p).parts[-components:]) for p in paths]
    mask = np.fromiter((k in noises for k in keys), dtype=bool, count=len(keys))
    if noises and not mask.any():
        raise ValueError(
            f"none of the {len(noises)} noise-list entries matches a path (compared by their "
            f"last {components} part(s), e.g. {keys[0] if keys else '-'!r}): wrong list or paths?"
        )
    return mask


# --------------------------------------------------------------------------- evaluation


def _unit_rows(x: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
    """Rows of ``x`` as float32 L2-normalised; errors name the first bad row."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = offset + int(np.argmax(bad))
        raise ValueError(f"{what} row {row} is zero or not finite ({int(bad.sum())} such rows)")
    return x / norms[:, None]


def _same_identity_pairs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs ``(a, b)``, ``a < b`` in sorted order, of rows with equal codes."""
    order = np.argsort(codes, kind="stable")
    _, starts, counts = np.unique(codes[order], return_index=True, return_counts=True)
    firsts, seconds = [], []
    for n in np.unique(counts[counts > 1]):
        i, j = np.triu_indices(n, 1)
        group_starts = starts[counts == n][:, None]
        firsts.append(order[(group_starts + i).ravel()])
        seconds.append(order[(group_starts + j).ravel()])
    if not firsts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def _clean_probes(feats: np.ndarray, codes: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Replace noisy probe rows by their identity's normalised mean of clean rows."""
    out = feats.copy()
    n_codes = int(codes.max()) + 1
    sums = np.zeros((n_codes, feats.shape[1]), dtype=np.float64)
    np.add.at(sums, codes[~noisy], feats[~noisy])
    clean_count = np.bincount(codes[~noisy], minlength=n_codes)
    orphans = np.unique(codes[noisy & (clean_count[codes] == 0)])
    if orphans.size:
        raise ValueError(
            f"{orphans.size} probe identities have only noisy images (first: code {orphans[0]}); "
            "their images cannot be replaced by an identity centre"
        )
    centres = sums[codes[noisy]]
    out[noisy] = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    return out


def _topk_scores(index: Any, probes: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best inner products of each probe in ``index`` (descending; -inf padded)."""
    scores = np.full((probes.shape[0], k), -np.inf, dtype=np.float32)
    found = min(k, int(index.ntotal))
    if found:
        scores[:, :found], _ = index.search(probes, found)
    return scores


def evaluate_megaface(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray | Sequence[Any],
    distractor_feats: np.ndarray,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    max_rank: int = 10,
    far: float = 1e-6,
    probe_noisy: np.ndarray | None = None,
    distractor_noisy: np.ndarray | None = None,
    batch_size: int = 65536,
    progress: bool = False,
) -> dict[str, Any]:
    """MegaFace identification and verification (see the module docstring for the protocol).

    ``probe_feats`` (``P x d``) with identity labels ``probe_ids`` (any comparable values);
    ``distractor_feats`` (``D x d``, may be memory-mapped: it is read ``batch_size`` rows at a
    time). ``probe_noisy`` / ``distractor_noisy`` are boolean masks from the noise lists.
    Returns plain Python values: ``num_probes``, ``num_identities``, ``num_trials`` (ordered
    probe-mate pairs), ``num_positive_pairs``, ``num_noisy_probes``, ``max_rank``,
    ``far_target`` and ``sizes``: ``{N: {"distractors", "noisy_distractors", "cmc" (rank 1..
    max_rank), "rank1", "tar" (None where ``far`` is not measurable), "tar_insightface", "far",
    "threshold", "num_negatives", "min_measurable_far"}}`` keyed by the size as an int.
    """
    import faiss

    probes = np.asarray(probe_feats)
    ids = np.asarray(probe_ids)
    if probes.ndim != 2 or probes.shape[0] == 0:
        raise ValueError(f"probe_feats must be a non-empty P x d array, got {probes.shape}")
    if ids.shape != (probes.shape[0],):
        raise ValueError(f"probe_ids must have {probes.shape[0]} entries, got shape {ids.shape}")
    if distractor_feats.ndim != 2 or distractor_feats.shape[1] != probes.shape[1]:
        raise ValueError(
            f"distractor_feats must be D x {probes.shape[1]}, got {distractor_feats.shape}"
        )
    total = int(distractor_feats.shape[0])
    if total == 0:
        raise ValueError("distractor_feats is empty")
    max_rank = check_int("max_rank", max_rank, 1)
    far = check_real("far", far, 0, 1, open_low=True, open_high=True)
    batch_size = check_int("batch_size", batch_size, 1)
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be positive ints, got {list(sizes)}")
    capped = sorted({min(int(s), total) for s in sizes})
    d_noisy = np.zeros(total, bool) if distractor_noisy is None else np.asarray(distractor_noisy)
    if d_noisy.shape != (total,) or d_noisy.dtype != bool:
        raise ValueError(f"distractor_noisy must be a bool mask of {total} entries")
    p_noisy = np.zeros(len(ids), bool) if probe_noisy is None else np.asarray(probe_noisy)
    if p_noisy.shape != ids.shape or p_noisy.dtype != bool:
        raise ValueError(f"probe_noisy must be a bool mask of {len(ids)} entries")

    _, codes = np.unique(ids, return_inverse=True)
    codes = codes.ravel()
    probes = _unit_rows(probes, "probe_feats")
    if p_noisy.any():
        probes = _clean_probes(probes, codes, p_noisy)
    first, second = _same_identity_pairs(codes)
    if first.size == 0:
        raise ValueError("no probe identity has two or more images: nothing to identify")
    pos = np.einsum("ij,ij->i", probes[first], probes[second])
    trial_probe = np.concatenate([first, second])  # (p, g) and (g, p) share the score
    trial_score = np.concatenate([pos, pos])

    n_probes = probes.shape[0]
    allowed = [math.floor(far * n_probes * n * (1 + 1e-12)) for n in capped]
    k_max = max(max_rank, *(a + 1 for a in allowed))
    k_max = min(k_max, total)
    if n_probes * k_max > _MAX_TOPK_ENTRIES:
        raise ValueError(
            f"far={far:g} needs the top {k_max} distractors of each of {n_probes} probes; "
            "lower far or use fewer probes"
        )

    index = faiss.IndexFlatIP(probes.shape[1])
    by_size: dict[int, dict[str, Any]] = {}
    added = 0
    for size, m in tqdm(
        list(zip(capped, allowed, strict=True)), desc="sizes", disable=not progress
    ):
        for start in range(added, size, batch_size):
            stop = min(start + batch_size, size)
            chunk = _unit_rows(distractor_feats[start:stop], "distractor_feats", start)
            keep = ~d_noisy[start:stop]
            if keep.any():
                index.add(np.ascontiguousarray(chunk[keep]))
        added = size
        effective = int(index.ntotal)
        k = min(max(max_rank, m + 1), effective) if effective else max_rank
        top = _topk_scores(index, probes, max(k, max_rank))

        above = (top[trial_probe, :max_rank] > trial_score[:, None]).sum(axis=1)
        cmc = [float(np.mean(above < r)) for r in range(1, max_rank + 1)]

        n_neg = n_probes * size
        if m >= n_probes * effective:
            threshold = -math.inf  # every real negative may pass
        else:
            flat = top[:, :k].ravel()
            threshold = float(np.partition(flat, flat.size - m - 1)[flat.size - m - 1])
        accepted_neg = int(np.sum(top[:, :k] > threshold)) if effective else 0
        tar = float(np.mean(pos > threshold))
        by_size[size] = {
            "distractors": size,
            "noisy_distractors": int(d_noisy[:size].sum()),
            "cmc": cmc,
            "rank1": cmc[0],
            "tar": tar if far_measurable(far, n_neg) else None,
            "tar_insightface": tar,
            "far": accepted_neg / n_neg,
            "threshold": threshold,
            "num_negatives": n_neg,
            "min_measurable_far": 1.0 / n_neg,
        }
    return {
        "num_probes": int(n_probes),
        "num_identities": int(codes.max()) + 1,
        "num_trials": int(trial_probe.size),
        "num_positive_pairs": int(pos.size),
        "num_noisy_probes": int(p_noisy.sum()),
        "max_rank": max_rank,
        "far_target": float(far),
        "sizes": by_size,
    }


# --------------------------------------------------------------------------- reports


def format_megaface(results: dict[str, Any], far_reading: str = "measurable") -> str:
    """Markdown table: one row per distractor-set size, rank-1/5/10 (%) and TAR@FAR (%).

    A TAR whose FAR the size cannot measure (``tar`` None) shows ``n/m`` with a footnote, or
    with ``far_reading="insightface"`` the devkit's number marked ``*``.
    """
    check_far_reading(far_reading)
    ranks = [r for r in (1, 5, 10) if r <= results["max_rank"]]
    far = results["far_target"]
    headers = [
        "distractors",
        *(f"Id rank-{r} (%)" for r in ranks),
        f"Ver TAR@FAR={far:g} (%)",
    ]
    rows = []
    unmeasured = []
    for size, r in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        tar = f"{100 * r['tar_insightface']:.2f}"
        if r["tar"] is None:
            unmeasured.append(r)
            tar = unmeasurable_cell(tar, far_reading)
        rows.append([f"{int(size):,}", *(f"{100 * r['cmc'][k - 1]:.2f}" for k in ranks), tar])
    table = markdown_table(headers, rows)
    if not unmeasured:
        return table
    largest = max(unmeasured, key=lambda r: r["num_negatives"])
    detail = (
        f"FAR {far:g} needs >= {math.ceil(round(1 / far, 9)):,} probe x distractor impostor "
        f"pairs; {results['num_probes']:,} probes x {int(largest['distractors']):,} distractors "
        f"give {largest['num_negatives']:,}, FAR >= {largest['min_measurable_far']:.3g}"
    )
    return f"{table}\n\n{unmeasurable_note(far_reading, detail)}"


def plot_megaface(results: dict[str, Any], path: str | Path) -> None:
    """Save a PNG: the CMC per distractor-set size, and rank-1 against the number of distractors."""
    from robustface.utils.plot import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    items = sorted(results["sizes"].items(), key=lambda kv: int(kv[0]))
    for size, r in items:
        ranks = np.arange(1, len(r["cmc"]) + 1)
        left.plot(ranks, 100 * np.asarray(r["cmc"]), marker="o", ms=3, label=f"{int(size):,}")
    left.set(xlabel="rank", ylabel="identification rate (%)", title="CMC")
    left.legend(title="distractors", fontsize=8)
    left.grid(alpha=0.3)
    sizes = [int(s) for s, _ in items]
    right.plot(sizes, [100 * r["rank1"] for _, r in items], marker="o")
    right.set(xscale="log", xlabel="distractors", ylabel="rank-1 (%)", title="Rank-1")
    right.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_megaface_report(
    out_dir: str | Path,
    results: dict[str, Any],
    table: str,
    *,
    model: str | Path | None,
    config: dict[str, Any],
) -> Path:
    """Write ``megaface.json`` and ``megaface.md`` (with
    :func:`robustface.evaluate.report.write_evaluation`) and ``megaface_cmc.png``
    (:func:`plot_megaface`) into ``out_dir``; returns the JSON path."""
    from robustface.evaluate.report import write_evaluation

    plot_megaface(results, Path(out_dir) / "megaface_cmc.png")
    return write_evaluation(out_dir, "megaface", results, table, model=model, config=config)


# --------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class FeatureSource:
    """Where the probe (FaceScrub) or distractor (MegaFace) features of a run come from.

    Exactly one of ``features`` (read with :func:`load_feature_set`: a ``.npz`` cache, a ``.npy``
    matrix or a devkit directory) and ``images`` (aligned images, embedded by an
    :class:`ImageEmbedder`, listed in the devkit JSON ``list_file``). ``labels`` gives the probe
    identities (:func:`load_feature_set`), ``noises`` an insightface noise list.
    """

    features: Path | None = None
    images: Path | None = None
    list_file: Path | None = None
    labels: Path | None = None
    noises: Path | None = None


@dataclass(frozen=True)
class ImageEmbedder:
    """A loaded model that embeds :attr:`FeatureSource.images` (see :func:`embed_image_files`);
    ``fusion`` fuses each image with its mirror (None: summed, insightface's way)."""

    model: Callable[[torch.Tensor], torch.Tensor]
    input_size: int
    batch_size: int = 256
    device: str | torch.device = "cpu"
    fusion: Aggregator | None = None
    style_blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MegafaceRun:
    """The outcome of :func:`run_megaface`: results, their table and the settings to record."""

    results: dict[str, Any]
    table: str
    config: dict[str, Any]


def source_feature_set(
    role: str,
    source: FeatureSource,
    *,
    embedder: ImageEmbedder | None = None,
    file_ending: str | None = None,
    model_sha256: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    fusion: dict[str, Any] | None = None,
) -> FeatureSet:
    """The ``role`` (``"probe"`` or ``"distractor"``) FeatureSet of ``source``: read, or embedded
    with ``embedder`` and then cached as ``cache_dir/{role}.npz`` (with ``model_sha256``, which
    also refuses a ``.npz`` cache of another model, and the ``fusion`` record, which refuses
    features fused otherwise)."""
    if (source.features is None) == (source.images is None):
        raise ValueError(f"give exactly one of --{role}-features and --{role}-images")
    if source.features is not None:
        return load_feature_set(
            source.features,
            list_file=source.list_file,
            file_ending=file_ending,
            labels=source.labels if role == "probe" else None,
            model_sha256=model_sha256,
            fusion=fusion,
            progress=progress,
        )
    needs = {"a MODEL": embedder is None, f"--{role}-list": source.list_file is None}
    if any(needs.values()):
        missing = " and ".join(what for what, absent in needs.items() if absent)
        raise ValueError(f"--{role}-images needs {missing}")
    paths, ids = read_devkit_list(source.list_file)
    feats = embed_image_files(
        embedder.model,
        source.images,
        paths,
        input_size=embedder.input_size,
        batch_size=embedder.batch_size,
        device=embedder.device,
        progress=progress,
        fusion=embedder.fusion,
        style_blocks=embedder.style_blocks,
    )
    if cache_dir is not None:
        save_feature_cache(
            Path(cache_dir) / f"{role}.npz",
            feats,
            paths=paths,
            labels=ids,
            model_sha256=model_sha256,
            fusion=fusion,
        )
    return FeatureSet(feats, paths, ids)


def run_megaface(
    probe: FeatureSource,
    distractors: FeatureSource,
    *,
    embedder: ImageEmbedder | None = None,
    model_sha256: str | None = None,
    file_ending: str | None = None,
    cache_dir: str | Path | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    max_rank: int = 10,
    far: float = 1e-6,
    far_reading: str = "measurable",
    progress: bool = True,
    fusion: dict[str, Any] | None = None,
) -> MegafaceRun:
    """Read or embed both feature sets (:func:`source_feature_set`), apply their noise lists and
    run :func:`evaluate_megaface`; the table is :func:`format_megaface`'s. Write the report with
    :func:`write_megaface_report` (``config=run.config``). ``fusion`` (:func:`fusion_record`,
    default :data:`DEFAULT_FUSION`) says how ``embedder.fusion`` fuses an image with its mirror;
    features fused otherwise are refused."""
    import faiss

    fusion = DEFAULT_FUSION if fusion is None else fusion
    if embedder is not None and (embedder.fusion is None) != (fusion == DEFAULT_FUSION):
        raise ValueError(
            f"fusion: the record {_describe(fusion)} does not describe the embedder's fusion"
        )

    probe_set = source_feature_set(
        "probe",
        probe,
        embedder=embedder,
        file_ending=file_ending,
        model_sha256=model_sha256,
        cache_dir=cache_dir,
        progress=progress,
        fusion=fusion,
    )
    distractor_set = source_feature_set(
        "distractor",
        distractors,
        embedder=embedder,
        file_ending=file_ending,
        model_sha256=model_sha256,
        cache_dir=cache_dir,
        progress=progress,
        fusion=fusion,
    )
    if probe_set.labels is None:
        raise ValueError("the probe features have no identity labels: give --probe-labels")
    masks = {}
    for name, fs, noises, parts in (
        ("probe", probe_set, probe.noises, 1),
        ("distractor", distractor_set, distractors.noises, 3),
    ):
        if noises is not None:
            if fs.paths is None:
                raise ValueError(f"a noise list needs the {name} image paths (.npz or devkit list)")
            masks[name] = noise_mask(fs.paths, read_noise_list(noises), parts)
    results = evaluate_megaface(
        probe_set.features,
        probe_set.labels,
        distractor_set.features,
        sizes=sizes,
        max_rank=max_rank,
        far=far,
        probe_noisy=masks.get("probe"),
        distractor_noisy=masks.get("distractor"),
        progress=progress,
    )
    config = {
        "probe_features": probe.features,
        "probe_images": probe.images,
        "probe_list": probe.list_file,
        "probe_labels": probe.labels,
        "distractor_features": distractors.features,
        "distractor_images": distractors.images,
        "distractor_list": distractors.list_file,
        "file_ending": file_ending,
        "facescrub_noises": probe.noises,
        "megaface_noises": distractors.noises,
        "sizes": sizes,
        "max_rank": max_rank,
        "far": far,
        "far_reading": far_reading,
        "aggregation": fusion["aggregation"],
        "fusion_model_sha256": fusion["fusion_model_sha256"],
        "faiss": faiss.__version__,
    }
    return MegafaceRun(results, format_megaface(results, far_reading), config)
