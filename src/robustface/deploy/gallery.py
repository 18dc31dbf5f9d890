"""A gallery of enrolled identities on disk, searched with faiss (1:N, open set).

**Enrolment.** An identity is enrolled from one or more raw embeddings (unit embedding times its
norm, see :mod:`robustface.fuse.base`), fused into one unit vector by an aggregator of
:data:`robustface.fuse.AGGREGATORS` (``mean`` by default, ``norm_weighted``; ``caface`` only when
the gallery is given per-image styles). Adding images to an enrolled identity fuses them with
the ones it has: the gallery keeps every enrolment embedding. An added image whose identity
already holds the same embedding (cosine >= :data:`DUPLICATE_COSINE`: the same image again, or its
mirror when embedded with flip) is *already enrolled*: :meth:`Gallery.add` refuses it, naming it,
unless ``skip_enrolled`` leaves such images out (and returns their count). Repeats within one
enrolment set are enrolled as given.

**Search.** Queries are compared by cosine similarity with the identities' fused vectors; the
top ``k`` identities come with their scores, and a query whose best score is below ``threshold``
is rejected as unknown (open set). The index is picked by gallery size (``index="auto"``): exact
``IndexFlatIP`` up to :data:`EXACT_MAX` identities, ``IndexIVFFlat`` above (``4 sqrt(n)`` lists,
``nprobe`` 64; recall@1 against exact search 1.000 at 100K and 0.984 at 1M, at 2.5x and 13.7x its
queries/s on 2 cores: docs/benchmarks.md); ``flat``, ``ivf`` (``nlist``, ``nprobe``) and ``hnsw``
(``hnsw_m``, ``ef_construction``, ``ef_search``) can be asked for. HNSW is not the default: on 2
CPU cores at 512-d it built 2-4x slower than IVF and searched only 1.1x faster than exact search.
An IVF index keeps its trained lists through ``add`` and ``remove`` while the gallery stays within
a factor 2 of the size they were trained at (the lists are refilled, not retrained); beyond that,
or when ``auto`` switches type, the index is built anew.

**On disk.** ``GALLERY/manifest.json`` (format, model fingerprint, embedding size, aggregator,
index, current version) names a version directory ``GALLERY/vN/`` holding ``names.txt``,
``vectors.npy`` (fused), ``features.npy`` + ``owners.npy`` (enrolment embeddings and their
identity), ``styles.npy`` (caface only) and ``index.faiss``. A change writes a new ``vN+1/``, then
replaces the manifest (an atomic rename), then removes ``vN/``: an interrupted write leaves the
gallery as it was. Writers hold ``GALLERY/.lock`` (``flock``); a second writer is refused. A
gallery opened with a model is refused when its fingerprint or embedding size differ.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from robustface.cluster.knn import ivf_nlist
from robustface.deploy.recognizer import l2_normalize
from robustface.errors import DataFormatError, RobustfaceError
from robustface.fuse import AGGREGATORS
from robustface.fuse.baselines import LinearAggregator
from robustface.utils.guards import check_choice, check_int
from robustface.utils.io import write_text_atomic

__all__ = [
    "DUPLICATE_COSINE",
    "EXACT_MAX",
    "Gallery",
    "GalleryBusyError",
    "IndexSpec",
    "SearchResult",
    "build_index",
]

FORMAT = "robustface-gallery/1"
MANIFEST = "manifest.json"
LOCK = ".lock"
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
EXACT_MAX = 100_000
"""``index="auto"`` searches exactly up to this many identities and uses IVF above."""
IVF_TRAIN_PER_LIST = 64
"""IVF k-means training points per list (a random sample; faiss warns below 39)."""
DUPLICATE_COSINE = 1 - 1e-5
"""Cosine at or above which an added embedding repeats one of its identity's enrolment embeddings:
the same image re-embedded by the same model differs only by float rounding (cosine 1 - 1e-7 or
closer, float16 storage included), two photographs are far below."""
_PAIR_CHUNK = 16384
"""(added, enrolled) embedding pairs compared at once by the already-enrolled check."""
_VERSION = re.compile(r"^v(\d+)$")


class GalleryBusyError(RobustfaceError):
    """Another process is writing the gallery."""


@dataclass
class IndexSpec:
    """Which faiss index to build and how to search it (unset: the defaults below)."""

    type: str = "auto"
    nlist: int | None = None  # IVF lists (default: 4 sqrt(n), capped by cluster.knn.ivf_nlist)
    nprobe: int = 64  # IVF lists searched
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 80
    ef_search: int = 128

    def __post_init__(self) -> None:
        check_choice("index type", self.type, INDEX_TYPES)
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            check_int(name, getattr(self, name), 1)

    def resolved(self, n: int) -> str:
        """The index type used for ``n`` identities."""
        if self.type != "auto":
            return self.type
        return "flat" if n <= EXACT_MAX else "ivf"


def build_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """A faiss inner-product index of unit ``vectors`` (row i has id i) as ``spec`` asks."""
    n, d = vectors.shape
    kind = spec.resolved(n)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        lists = ivf_nlist(n, spec.nlist or max(1, int(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        rows = np.arange(n)
        if n > IVF_TRAIN_PER_LIST * lists:
            rows = np.random.default_rng(0).choice(n, IVF_TRAIN_PER_LIST * lists, replace=False)
            rows = np.sort(rows)
        index.train(np.ascontiguousarray(vectors[rows]))
    else:
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    if n:
        index.add(np.ascontiguousarray(vectors))
    _set_search_params(index, spec)
    return index


def _set_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = spec.nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.ef_search


@dataclass
class SearchResult:
    """Top-k identities per query: ``names[q][r]`` and ``scores[q][r]`` (rank r, best first);
    ``accepted[q]`` is False for a query rejected as unknown (best score below the threshold)."""

    names: list[list[str]]
    scores: np.ndarray  # (Q, k) float32; -inf where the gallery has fewer than k identities
    accepted: np.ndarray  # (Q,) bool
    threshold: float | None = None

    def top1(self) -> list[str | None]:
        """The best identity of each query, or None where it was rejected."""
        return [n[0] if ok and n else None for n, ok in zip(self.names, self.accepted, strict=True)]


def _check_names(names: Sequence[str], what: str) -> list[str]:
    out = [str(n) for n in names]
    bad = [n for n in out if not n or n != n.strip() or any(c in n for c in "\t\r\n")]
    if bad:
        raise ValueError(
            f"{what}: identity names must be non-empty, without tabs, newlines or surrounding "
            f"blanks, got {bad[0]!r}"
        )
    return out


@dataclass
class _State:
    """One version of a gallery, in memory."""

    names: list[str]
    vectors: np.ndarray  # (n, d) float32 fused unit vectors
    features: np.ndarray  # (m, d) float32 raw enrolment embeddings
    owners: np.ndarray  # (m,) int64 identity row of each enrolment embedding
    styles: np.ndarray | None  # (m, ...) per-image styles (caface)
    index: faiss.Index | None = field(default=None, repr=False)


class Gallery:
    """An on-disk gallery (see the module docstring). Open one with :meth:`open`, make one with
    :meth:`create`; :meth:`add`, :meth:`remove` and :meth:`search` it."""

    def __init__(self, root: Path, manifest: dict[str, Any], state: _State) -> None:
        self.root = root
        self.manifest = manifest
        self._state = state

    # ---- reading ---------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, model: dict[str, Any] | None = None) -> Gallery:
        """Read the gallery at ``root``. With ``model`` (a :class:`ModelInfo` dict:
        ``path``, ``sha256``, ``embedding_size``) a gallery built by other weights, or for
        another embedding size, is refused naming both."""
        root = Path(root)
        manifest = cls._read_manifest(root)
        if model is not None:
            check_model(root, manifest, model)
        vdir = root / manifest["version"]
        try:
            names = (vdir / "names.txt").read_text(encoding="utf-8").split("\n")[:-1]
            state = _State(
                names,
                np.load(vdir / "vectors.npy"),
                np.load(vdir / "features.npy", mmap_mode="r"),
                np.load(vdir / "owners.npy"),
                np.load(vdir / "styles.npy") if (vdir / "styles.npy").is_file() else None,
                faiss.read_index(str(vdir / "index.faiss")),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataFormatError(vdir, f"unreadable gallery version: {exc}") from None
        if len(names) != state.vectors.shape[0] or state.index.ntotal != len(names):
            raise DataFormatError(vdir, "names, vectors and index disagree in length")
        _set_search_params(state.index, IndexSpec(**manifest["index"]))
        return cls(root, manifest, state)

    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any]:
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root}: no {MANIFEST}; not a gallery (build one first)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"not a gallery manifest ({exc})") from None
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            raise DataFormatError(path, f"format {fmt!r}, expected {FORMAT}")
        return manifest

    @property
    def names(self) -> list[str]:
        """Enrolled identities, in index order."""
        return list(self._state.names)

    @property
    def vectors(self) -> np.ndarray:
        """Fused unit vectors ``(n, d)``, one per identity (row order of :attr:`names`)."""
        return self._state.vectors

    @property
    def index_type(self) -> str:
        """The faiss index in use: ``flat``, ``ivf`` or ``hnsw``."""
        return str(self.manifest["index_type"])

    @property
    def ivf_lists(self) -> int | None:
        """The IVF index's list count (lowered for a small gallery), None for another index."""
        index = self._state.index
        return int(index.nlist) if isinstance(index, faiss.IndexIVF) else None

    def __len__(self) -> int:
        return len(self._state.names)

    def search(
        self,
        queries: np.ndarray,
        k: int = 5,
        threshold: float | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """The ``k`` best identities of each query embedding (``(Q, d)`` or ``(d,)``, normalised
        here). ``nprobe`` / ``ef_search`` override the stored search parameters."""
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        d = int(self.manifest["embedding_size"])
        if q.ndim != 2 or q.shape[1] != d:
            raise ValueError(f"queries must be (Q, {d}) embeddings, got shape {q.shape}")
        k = check_int("k", k, 1)
        if not len(self):
            raise ValueError(f"{self.root}: the gallery is empty")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = np.ascontiguousarray(q / np.where(norms == 0, 1, norms))
        spec = IndexSpec(**{**self.manifest["index"], "type": "auto"})
        spec.nprobe = nprobe or spec.nprobe
        spec.ef_search = ef_search or spec.ef_search
        _set_search_params(self._state.index, spec)
        scores, ids = self._state.index.search(q, min(k, len(self)))
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        names = [[self._state.names[i] for i in row if i >= 0] for row in ids]
        best = scores[:, 0]
        accepted = np.ones(len(q), bool) if threshold is None else best >= threshold
        return SearchResult(names, scores, accepted, threshold)

    # ---- writing ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | Path,
        model: dict[str, Any],
        names: Sequence[str],
        features: np.ndarray,
        *,
        styles: np.ndarray | None = None,
        aggregator: str = "mean",
        aggregator_params: dict[str, Any] | None = None,
        index: IndexSpec | None = None,
        overwrite: bool = False,
    ) -> Gallery:
        """Enrol ``features`` (raw ``(m, d)`` embeddings; ``names[i]`` is row i's identity) in a
        new gallery at ``root`` for ``model`` (a :class:`ModelInfo` dict)."""
        root = Path(root)
        if (root / MANIFEST).is_file() and not overwrite:
            raise FileExistsError(f"{root} is a gallery already; add to it, or pass --overwrite")
        if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a gallery: not writing into it")
        spec = index or IndexSpec()
        manifest = {
            "format": FORMAT,
            "model": {k: model[k] for k in ("path", "sha256", "embedding_size")},
            "embedding_size": int(model["embedding_size"]),
            "aggregator": aggregator,
            "aggregator_params": aggregator_params or {},
            "index": asdict(spec),
            "version": None,
        }
        gallery = cls(root, manifest, _empty_state(int(model["embedding_size"]), styles))
        root.mkdir(parents=True, exist_ok=True)
        with gallery._locked():
            gallery._write(gallery._with_added(names, features, styles), rebuild=True)
        return gallery

    def add(
        self,
        names: Sequence[str],
        features: np.ndarray,
        styles: np.ndarray | None = None,
        *,
        skip_enrolled: bool = False,
        sources: Sequence[str] | None = None,
    ) -> int:
        """Enrol more embeddings: new identities are appended, enrolled ones re-fused with all
        their embeddings. Images already enrolled under their identity (see the module
        docstring) raise ``ValueError`` naming them (``sources[i]``, else the row ``i``), or with
        ``skip_enrolled`` are left out; returns how many were left out."""
        names = _check_names(names, "names")
        with self._locked():
            self._reload_if_changed()
            again = self._enrolled_again(names, np.asarray(features, dtype=np.float32))
            if again.any() and not skip_enrolled:
                rows = np.flatnonzero(again)
                shown = ", ".join(
                    f"{sources[i] if sources is not None else f'row {i}'} ({names[i]})"
                    for i in rows[:5]
                )
                more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
                raise ValueError(
                    f"{self.root}: {len(rows)} of {len(names)} images are already enrolled under "
                    f"the same identity: {shown}{more}; pass --skip-enrolled (skip_enrolled=True) "
                    "to add only the others"
                )
            if names and again.all():
                return len(names)
            keep = np.flatnonzero(~again)
            names = [names[i] for i in keep]
            features = np.asarray(features)[keep]
            styles = None if styles is None else np.asarray(styles)[keep]
            state = self._with_added(names, features, styles)
            changed = set(names) & set(self._state.names)
            self._write(state, rebuild=bool(changed), appended=len(self._state.names))
        return int(again.sum())

    def _enrolled_again(self, names: list[str], features: np.ndarray) -> np.ndarray:
        """Which rows of ``features`` repeat an enrolment embedding of the same identity.

        Compares each added row with its own identity's enrolment rows only, pair by pair in
        chunks: time and memory grow with those pairs, not with added rows x gallery rows."""
        s = self._state
        row = {n: i for i, n in enumerate(s.names)}
        owners = np.array([row.get(n, -1) for n in names], dtype=np.int64)
        again = np.zeros(len(names), dtype=bool)
        shape = (len(names), s.vectors.shape[1])
        if features.shape != shape or not (owners >= 0).any():
            return again  # nothing enrolled to repeat (a shape error is _with_added's to name)
        order = np.argsort(s.owners, kind="stable")
        sorted_owners = s.owners[order]
        start = np.searchsorted(sorted_owners, owners, "left")
        count = np.where(owners >= 0, np.searchsorted(sorted_owners, owners, "right") - start, 0)
        pair_new = np.repeat(np.arange(len(names)), count)
        offset = np.repeat(start - (np.cumsum(count) - count), count)
        pair_held = order[np.arange(len(pair_new)) + offset]
        new = l2_normalize(features)
        best = np.full(len(names), -np.inf, dtype=np.float32)
        for lo in range(0, len(pair_new), _PAIR_CHUNK):
            a, b = pair_new[lo : lo + _PAIR_CHUNK], pair_held[lo : lo + _PAIR_CHUNK]
            cos = np.einsum("ij,ij->i", new[a], l2_normalize(np.asarray(s.features[b])))
            np.maximum.at(best, a, cos)
        return best >= DUPLICATE_COSINE

    def remove(self, names: Sequence[str]) -> None:
        """Remove identities (every one must be enrolled)."""
        names = _check_names(names, "remove")
        with self._locked():
            self._reload_if_changed()
            s = self._state
            row = {n: i for i, n in enumerate(s.names)}
            missing = [n for n in names if n not in row]
            if missing:
                raise ValueError(f"{self.root}: not enrolled: {', '.join(missing[:10])}")
            keep = np.ones(len(s.names), bool)
            keep[[row[n] for n in names]] = False
            new_row = np.cumsum(keep) - 1
            kept = keep[s.owners]
            state = _State(
                [n for n, k in zip(s.names, keep, strict=True) if k],
                s.vectors[keep],
                np.asarray(s.features[kept]),
                new_row[s.owners[kept]],
                None if s.styles is None else s.styles[kept],
            )
            self._write(state, rebuild=True)

    def _with_added(
        self, names: Sequence[str], features: np.ndarray, styles: np.ndarray | None
    ) -> _State:
        s = self._state
        names = _check_names(names, "names")
        feats = np.asarray(features, dtype=np.float32)
        d = int(self.manifest["embedding_size"])
        if feats.ndim != 2 or feats.shape[1] != d:
            raise ValueError(
                f"{self.root}: the gallery holds {d}-d embeddings, got shape {feats.shape} (a "
                "model with another embedding size?)"
            )
        if feats.shape[0] != len(names) or not names:
            raise ValueError(f"{len(names)} names for {feats.shape[0]} embeddings (need >= 1)")
        name = self.manifest["aggregator"]
        if AGGREGATORS.get(name).needs_styles and (
            styles is None or (s.styles is None and len(s.names))
        ):
            raise ValueError(
                f"the {name!r} aggregator needs per-image styles: build the gallery with "
                "styles (robustface.fuse.embed_with_styles), or use --aggregator mean / "
                "norm_weighted"
            )
        agg = self._aggregator()
        row = {n: i for i, n in enumerate(s.names)}
        new = [n for n in dict.fromkeys(names) if n not in row]
        all_names = s.names + new
        row.update({n: len(s.names) + j for j, n in enumerate(new)})
        owners = np.array([row[n] for n in names], dtype=np.int64)
        all_styles = None
        if agg.needs_styles:
            all_styles = np.asarray(styles, np.float32)
            if s.styles is not None:
                all_styles = np.concatenate([s.styles, all_styles])
        state = _State(
            all_names,
            np.concatenate([s.vectors, np.zeros((len(new), d), np.float32)]),
            np.concatenate([np.asarray(s.features), feats]),
            np.concatenate([s.owners, owners]),
            all_styles,
        )
        touched = np.unique(owners)
        state.vectors[touched] = self._fuse(agg, state, touched)
        return state

    def _aggregator(self) -> Any:
        return AGGREGATORS.build(self.manifest["aggregator"], **self.manifest["aggregator_params"])

    def _fuse(self, agg: Any, state: _State, identities: np.ndarray) -> np.ndarray:
        """Fused unit vectors of the ``identities`` rows from all their enrolment embeddings."""
        mine = np.isin(state.owners, identities)
        feats, owners = np.asarray(state.features[mine]), state.owners[mine]
        if isinstance(agg, LinearAggregator):  # one vectorised pass: the same sums as fuse()
            x, _ = agg.check(feats)
            slot = torch.from_numpy(np.searchsorted(identities, owners))
            sums = torch.zeros(len(identities), x.shape[1], dtype=torch.float64)
            sums.index_add_(0, slot, agg.terms(x).double())
            norms = sums.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                bad = state.names[int(identities[int((norms[:, 0] == 0).nonzero()[0])])]
                raise ValueError(f"identity {bad!r}: its embeddings cancel out (zero-norm sum)")
            return (sums / norms).float().numpy()
        styles = state.styles[mine] if state.styles is not None else None
        return np.stack(
            [
                agg.fuse(feats[owners == i], None if styles is None else styles[owners == i])
                .float()
                .numpy()
                for i in identities
            ]
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold ``GALLERY/.lock`` for writing, or refuse if another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise GalleryBusyError(
                    f"{self.root}: another process (pid {holder}) is writing this gallery "
                    f"(it holds {self.root / LOCK}); try again when it is done"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _reload_if_changed(self) -> None:
        current = self._read_manifest(self.root)
        if current.get("version") != self.manifest.get("version"):
            fresh = Gallery.open(self.root)
            self.manifest, self._state = fresh.manifest, fresh._state

    def _write(self, state: _State, *, rebuild: bool, appended: int = 0) -> None:
        """Write ``state`` as the next version (call with the lock held)."""
        spec = IndexSpec(**self.manifest["index"])
        n = len(state.names)
        kind = spec.resolved(n)
        old = self._state.index
        trained = int(self.manifest.get("index_trained_on") or 0)
        same = old is not None and kind == self.manifest.get("index_type")
        if same and kind == "ivf" and trained / 2 <= n <= 2 * trained:
            # keep the trained lists (k-means is most of an IVF build) while the gallery stays
            # within a factor 2 of the size they were trained at; refill or extend them
            state.index = faiss.clone_index(old)
            if rebuild:
                state.index.reset()
            state.index.add(np.ascontiguousarray(state.vectors[0 if rebuild else appended :]))
        elif rebuild or not same:
            state.index = build_index(state.vectors, IndexSpec(**{**asdict(spec), "type": kind}))
            trained = n
        else:  # only new identities, appended: add them to a copy of the index
            state.index = faiss.clone_index(old)
            state.index.add(np.ascontiguousarray(state.vectors[appended:]))
        # the version the manifest on disk names (an overwritten gallery's too) stays until the
        # new manifest replaces it
        on_disk = self.root / MANIFEST
        current = self._read_manifest(self.root)["version"] if on_disk.is_file() else None
        number = 1 + max(
            [int(m.group(1)) for m in map(_VERSION.match, self._versions()) if m] + [0]
        )
        version = f"v{number}"
        partial = self.root / f"{version}.partial"
        for stale in self._versions(also_partial=True):  # leftovers of interrupted writes
            if stale != current:
                shutil.rmtree(self.root / stale)
        partial.mkdir()
        (partial / "names.txt").write_text("".join(f"{n}\n" for n in state.names), "utf-8")
        np.save(partial / "vectors.npy", state.vectors)
        np.save(partial / "features.npy", np.asarray(state.features))
        np.save(partial / "owners.npy", state.owners)
        if state.styles is not None:
            np.save(partial / "styles.npy", state.styles)
        faiss.write_index(state.index, str(partial / "index.faiss"))
        os.replace(partial, self.root / version)
        manifest = {
            **self.manifest,
            "version": version,
            "index_type": kind,
            "index_trained_on": trained,
            "identities": len(state.names),
            "images": int(state.owners.size),
        }
        write_text_atomic(self.root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if current is not None and (self.root / current).exists():
            shutil.rmtree(self.root / current)
        self.manifest, self._state = manifest, state

    def _versions(self, also_partial: bool = False) -> list[str]:
        out = []
        for p in self.root.iterdir():
            name = p.name.removesuffix(".partial") if also_partial else p.name
            if p.is_dir() and _VERSION.match(name) and (also_partial or p.name == name):
                out.append(p.name)
        return out


def _empty_state(d: int, styles: np.ndarray | None) -> _State:
    return _State(
        [],
        np.zeros((0, d), np.float32),
        np.zeros((0, d), np.float32),
        np.zeros(0, np.int64),
        None if styles is None else np.zeros((0, *np.shape(styles)[1:]), np.float32),
    )


def check_model(root: Path, manifest: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse a gallery built by other weights or for another embedding size, naming both."""
    built = manifest["model"]
    if int(model["embedding_size"]) != int(manifest["embedding_size"]):
        raise ValueError(
            f"{root}: embedding-size mismatch: the gallery holds {manifest['embedding_size']}-d "
            f"embeddings of {built['path']}, the model {model['path']} gives "
            f"{model['embedding_size']}-d ones"
        )
    if model["sha256"] != built["sha256"]:
        raise ValueError(
            f"{root}: built with another model: {built['path']} (sha256 {built['sha256'][:12]}), "
            f"not {model['path']} (sha256 {model['sha256'][:12]}); build a gallery for this model"
        )
