"""A parametric simulator of face-embedding clusters, and a learn-to-cluster-style benchmark.

Each identity ``i`` of a split draws everything from its own seeded streams
(``np.random.default_rng([seed, split, i, stream])``), so the output does not depend on how the
identities are chunked, and a larger test set starts with exactly the identities (and samples) of
a smaller one. The model, per identity:

* size: a log-normal draw (``size_sigma``) clipped to ``[min_size, max_size]`` and rounded, with
  the log-mean solved so the clipped mean is ``mean_size`` (heavy tail: many small identities,
  few very large ones, as in MS1M);
* centre: a random unit direction mixed with one of ``num_groups`` shared "demographic" group
  directions, so identities of one group have centre cosine ``group_cos`` and others about 0;
  with probability ``sibling_rate`` the identity is a look-alike of an earlier one (its root, if
  that one is itself a sibling), with centre cosine uniform in ``sibling_cos``;
* sub-clusters (pose, age): ``1 + Poisson(mode_rate)`` mode centres at cosine ``mode_cos`` from
  the identity centre (the centre itself for a single mode), each sample in one of them;
* spread: an isotropic noise variance set so two clean samples of one mode have cosine about
  ``within_cos`` (drawn uniformly per identity), scaled per sample by a log-normal factor
  (``sample_sigma``), plus noise of variance ``nuisance_var`` in a shared
  ``nuisance_dim``-dimensional subspace (pose, light: shared by all identities, so it makes
  samples of different people alike);
* low-quality samples (``lowq_rate``): ``lowq_noise`` times the noise variance, pulled by
  ``lowq_pull`` towards one of ``lowq_modes`` shared directions (blurred or occluded faces of
  different people embed alike);
* outliers (``outlier_rate``): labelled with the identity but drawn around a fresh random
  direction, like web-crawl noise (a picture of someone else).

Samples are unit float32 rows. The defaults were calibrated so that connected components of a
thresholded kNN graph and k-means both stay well short of perfect; see ``CALIBRATION``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import ndtr
from tqdm import tqdm

import robustface
from robustface.cluster.dataset import ClusterSet, feature_path, label_path
from robustface.utils.guards import check_choice, check_int
from robustface.utils.io import atomic_directory, atomic_path, check_output_dir, write_text_atomic

__all__ = [
    "CALIBRATION",
    "PUBLISHED_SCALES",
    "SimulationParams",
    "simulate_features",
    "write_benchmark",
    "write_simulated",
]

Split = Literal["train", "test"]
SPLIT_STREAMS: dict[str, int] = {"train": 1, "test": 2}
PUBLISHED_SCALES: dict[int, str] = {1: "584K", 3: "1.74M", 5: "2.89M", 7: "4.05M", 9: "5.21M"}
"""The published learn-to-cluster MS1M test sets ``part<s>_test``: s -> their sample count."""
_GLOBAL, _IDENTITY, _SAMPLES = 0, 0, 1

CALIBRATION = """\
Measured with the default parameters, seed 0 (test split):
* part1_test-sized (8,573 identities, 572,685 samples): k=80 neighbour precision (self
  excluded, exact search, 1,000 random queries) 0.73, where identity sizes alone cap it at 0.83;
  top-10 precision 0.96; connected components of the k=80 graph (faiss IVF, nlist 4096,
  nprobe 8, recall@80 0.80) at the best threshold (0.625 on a 0.025 grid): pairwise F 0.66
  (P 0.93, R 0.51), BCubed F 0.63.
* 1,000 identities (70,827 samples, exact kNN): within-identity cosine mean 0.48 (10/50/90%:
  0.22 / 0.43 / 0.79), between identities mean 0.006, std 0.073, 99.99% quantile 0.42; identity
  sizes median 41, max 1000; k=80 precision 0.78; connected components best pairwise F 0.75 at
  0.60; spherical k-means with the true K (faiss, 20 iterations): pairwise F 0.60, BCubed F 0.70.
Chosen targets (our judgement, not published statistics): a good share of the k=80 neighbours
wrong beyond what the identity sizes force, edges above ~0.6 nearly all right, and simple
linkage and k-means well behind the published learned methods (GCN-V+E 87.9, Infomap 94.0
pairwise F on the real part1_test)."""


@dataclass(frozen=True)
class SimulationParams:
    """Parameters of the simulator (see the module docstring for the model)."""

    dim: int = 256
    mean_size: float = 68.0
    size_sigma: float = 1.0
    min_size: int = 2
    max_size: int = 1000
    num_groups: int = 16
    group_cos: float = 0.3
    sibling_rate: float = 0.15
    sibling_cos: tuple[float, float] = (0.5, 0.7)
    within_cos: tuple[float, float] = (0.5, 0.85)
    mode_rate: float = 1.5
    mode_cos: float = 0.7
    sample_sigma: float = 0.4
    nuisance_dim: int = 16
    nuisance_var: float = 0.15
    lowq_rate: float = 0.12
    lowq_noise: float = 2.0
    lowq_pull: float = 0.8
    lowq_modes: int = 4
    outlier_rate: float = 0.02

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                problems.append(f"{name} must be {rule}, got {getattr(self, name)!r}")

        need(self.dim >= 2, "dim", ">= 2")
        need(1 <= self.min_size <= self.max_size, "min_size", "in [1, max_size]")
        need(self.min_size < self.mean_size < self.max_size, "mean_size", "in (min_size, max_size)")
        need(self.size_sigma > 0, "size_sigma", "> 0")
        need(self.num_groups >= 1, "num_groups", ">= 1")
        need(0 <= self.group_cos < 1, "group_cos", "in [0, 1)")
        need(0 <= self.sibling_rate <= 1, "sibling_rate", "in [0, 1]")
        need(
            -1 < self.sibling_cos[0] <= self.sibling_cos[1] < 1,
            "sibling_cos",
            "(lo, hi) in (-1, 1)",
        )
        need(0 < self.within_cos[0] <= self.within_cos[1] < 1, "within_cos", "(lo, hi) in (0, 1)")
        need(self.mode_rate >= 0, "mode_rate", ">= 0")
        need(0 < self.mode_cos <= 1, "mode_cos", "in (0, 1]")
        need(self.sample_sigma >= 0, "sample_sigma", ">= 0")
        need(0 <= self.nuisance_dim <= self.dim, "nuisance_dim", "in [0, dim]")
        need(self.nuisance_var >= 0, "nuisance_var", ">= 0")
        if 0 < self.within_cos[1] < 1 and self.nuisance_var > 1 / self.within_cos[1] - 1:
            problems.append(
                f"nuisance_var must be <= 1 / within_cos[1] - 1 = {1 / self.within_cos[1] - 1:.4g} "
                f"(samples cannot be closer than their shared nuisance allows), got "
                f"{self.nuisance_var!r}"
            )
        need(self.lowq_noise >= 1, "lowq_noise", ">= 1")
        need(self.lowq_pull >= 0, "lowq_pull", ">= 0")
        need(self.lowq_modes >= 1, "lowq_modes", ">= 1")
        need(0 <= self.lowq_rate <= 1, "lowq_rate", "in [0, 1]")
        need(0 <= self.outlier_rate <= 1 - self.lowq_rate, "outlier_rate", "in [0, 1 - lowq_rate]")
        if problems:
            raise ValueError("invalid SimulationParams: " + "; ".join(problems))

    def size_log_mean(self) -> float:
        """The log-normal ``mu`` whose clipped draws average ``mean_size`` (bisection)."""
        lo = np.log(self.min_size) - 10 * self.size_sigma
        hi = np.log(self.max_size) + 10 * self.size_sigma
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._clipped_mean(mid) < self.mean_size else (lo, mid)
        return (lo + hi) / 2

    def _clipped_mean(self, mu: float) -> float:
        """``E[clip(X, min_size, max_size)]`` for ``X ~ LogNormal(mu, size_sigma)``."""
        s, a, b = self.size_sigma, np.log(self.min_size), np.log(self.max_size)
        below, above = ndtr((a - mu) / s), 1 - ndtr((b - mu) / s)
        middle = np.exp(mu + s * s / 2) * (ndtr((b - mu - s * s) / s) - ndtr((a - mu - s * s) / s))
        return float(self.min_size * below + self.max_size * above + middle)


@dataclass
class _Identity:
    size: int
    centre: np.ndarray  # float32 (dim,), unit
    noise_var: float  # isotropic noise variance of a clean sample


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Simulator:
    """Identity-by-identity generation for one split."""

    def __init__(self, params: SimulationParams, seed: int, split: str) -> None:
        check_choice("split", split, SPLIT_STREAMS)
        self.p, self.seed, self.stream = params, seed, SPLIT_STREAMS[split]
        self.log_mean = params.size_log_mean()
        p, rng = params, np.random.default_rng([seed, _GLOBAL])
        self.groups = _unit(rng.standard_normal((p.num_groups, p.dim)))
        basis = np.linalg.qr(rng.standard_normal((p.dim, max(p.nuisance_dim, 1))))[0]
        self.nuisance = basis.T[: p.nuisance_dim].astype(np.float32)
        self.lowq_dirs = _unit(rng.standard_normal((p.lowq_modes, p.dim))).astype(np.float32)

    def _draw(self, i: int) -> dict[str, Any]:
        """Identity ``i``'s own draws, in a fixed order whatever is used."""
        p = self.p
        rng = np.random.default_rng([self.seed, self.stream, i, _IDENTITY])
        size = rng.lognormal(self.log_mean, p.size_sigma)
        return {
            "size": int(np.clip(np.rint(size), p.min_size, p.max_size)),
            "group": int(rng.integers(p.num_groups)),
            "direction": _unit(rng.standard_normal(p.dim)),
            "within": float(rng.uniform(*p.within_cos)),
            "sibling": i > 0 and bool(rng.random() < p.sibling_rate),
            "parent": int(rng.integers(max(i, 1))),
            "sibling_cos": float(rng.uniform(*p.sibling_cos)),
        }

    def _root_centre(self, draw: dict[str, Any]) -> np.ndarray:
        g = self.p.group_cos
        return _unit(np.sqrt(g) * self.groups[draw["group"]] + np.sqrt(1 - g) * draw["direction"])

    def identity(self, i: int) -> _Identity:
        """Size, centre and noise of identity ``i``."""
        draw = self._draw(i)
        if draw["sibling"]:
            root = self._draw(draw["parent"])
            while root["sibling"]:
                root = self._draw(root["parent"])
            anchor = self._root_centre(root)
            own = _unit(draw["direction"] - (draw["direction"] @ anchor) * anchor)
            c = draw["sibling_cos"]
            centre = c * anchor + np.sqrt(1 - c * c) * own
        else:
            centre = self._root_centre(draw)
        noise_var = 1 / draw["within"] - 1 - self.p.nuisance_var
        return _Identity(draw["size"], centre.astype(np.float32), noise_var)

    def _modes(self, rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
        """Sub-cluster centres of an identity (pose, age...): the centre itself when there is one,
        else ``1 + Poisson(mode_rate)`` directions at cosine ``mode_cos`` from it."""
        p = self.p
        count = min(1 + int(rng.poisson(p.mode_rate)), n)
        if count == 1:
            return centre[None, :]
        offsets = rng.standard_normal((count, p.dim))
        offsets = _unit(offsets - np.outer(offsets @ centre, centre))
        c = p.mode_cos
        return (c * centre + np.sqrt(1 - c * c) * offsets).astype(np.float32)

    def samples(self, i: int, ident: _Identity) -> np.ndarray:
        """The ``(size, dim)`` unit float32 features of identity ``i``."""
        p, n = self.p, ident.size
        rng = np.random.default_rng([self.seed, self.stream, i, _SAMPLES])
        centres = self._modes(rng, ident.centre, n)
        assign = rng.integers(len(centres), size=n) if len(centres) > 1 else np.zeros(n, int)
        u = rng.random(n)
        outlier = u < p.outlier_rate
        lowq = ~outlier & (u < p.outlier_rate + p.lowq_rate)
        scale = np.exp(p.sample_sigma * rng.standard_normal(n) - p.sample_sigma**2)
        scale *= np.sqrt(ident.noise_var / p.dim) * np.where(lowq, np.sqrt(p.lowq_noise), 1.0)
        x = rng.standard_normal((n, p.dim), dtype=np.float32)
        x *= scale.astype(np.float32)[:, None]
        if p.nuisance_dim:
            eta = rng.standard_normal((n, p.nuisance_dim), dtype=np.float32)
            eta *= np.float32(np.sqrt(p.nuisance_var / p.nuisance_dim))
            x += np.einsum("nm,md->nd", eta, self.nuisance)  # no BLAS threads for small products
        x += centres[assign]
        lowq_dir = rng.integers(p.lowq_modes, size=n)
        x[lowq] += np.float32(p.lowq_pull) * self.lowq_dirs[lowq_dir[lowq]]
        if outlier.any():
            stranger = _unit(rng.standard_normal((int(outlier.sum()), p.dim), dtype=np.float32))
            x[outlier] += stranger - centres[assign[outlier]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(
        self, num_identities: int, chunk_identities: int, show_progress: bool, desc: str
    ) -> Iterator[tuple[int, list[int], np.ndarray]]:
        """``(first identity, sizes, features)`` for consecutive chunks of identities."""
        check_int("chunk_identities", chunk_identities, 1)
        with tqdm(total=num_identities, desc=desc, unit="id", disable=not show_progress) as bar:
            for start in range(0, num_identities, chunk_identities):
                stop = min(start + chunk_identities, num_identities)
                idents = [self.identity(i) for i in range(start, stop)]
                feats = [
                    self.samples(i, d) for i, d in zip(range(start, stop), idents, strict=True)
                ]
                yield start, [d.size for d in idents], np.concatenate(feats)
                bar.update(stop - start)


def simulate_features(
    num_identities: int,
    *,
    seed: int = 0,
    split: Split = "test",
    name: str | None = None,
    show_progress: bool = False,
    **params: Any,
) -> ClusterSet:
    """Simulate ``num_identities`` identities in memory: unit features and labels ``0..C-1``.

    ``params`` are :class:`SimulationParams` fields (``dim=256``, ``mean_size=68``, ...).
    ``split`` picks the identity stream: ``train`` and ``test`` identities are disjoint draws.
    Deterministic for a seed; identical to what :func:`write_simulated` streams to disk.
    """
    num_identities = check_int("num_identities", num_identities, 1)
    sim = _Simulator(SimulationParams(**params), seed, split)
    sizes = np.array([sim.identity(i).size for i in range(num_identities)], dtype=np.int64)
    feats = np.empty((int(sizes.sum()), sim.p.dim), dtype=np.float32)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for start, _, chunk in sim.chunks(num_identities, 1000, show_progress, "simulating"):
        feats[offsets[start] : offsets[start] + len(chunk)] = chunk
    labels = np.repeat(np.arange(num_identities, dtype=np.int64), sizes)
    return ClusterSet(name or f"simulated_{split}_{num_identities}", feats, labels)


def _write_split(
    root: Path,
    outputs: dict[str, int],
    sim: _Simulator,
    chunk_identities: int,
    show_progress: bool,
) -> dict[str, int]:
    """Stream the first ``outputs[name]`` identities of ``sim`` to each ``name``'s ``.bin`` and
    ``.meta`` in one pass (nested sets share the generation); returns the sample counts."""
    counts = dict.fromkeys(outputs, 0)
    with contextlib.ExitStack() as stack:
        files = {}
        for name in outputs:
            bin_tmp = stack.enter_context(atomic_path(feature_path(root, name)))
            meta_tmp = stack.enter_context(atomic_path(label_path(root, name)))
            files[name] = (
                stack.enter_context(open(bin_tmp, "wb")),
                stack.enter_context(open(meta_tmp, "w", encoding="utf-8")),
            )
        desc = f"simulating {', '.join(outputs)}"
        total = max(outputs.values())
        for start, sizes, feats in sim.chunks(total, chunk_identities, show_progress, desc):
            for name, limit in outputs.items():
                keep = sizes[: max(0, limit - start)]
                if not keep:
                    continue
                rows = sum(keep)
                bin_file, meta_file = files[name]
                bin_file.write(np.ascontiguousarray(feats[:rows], dtype="<f4").tobytes())
                meta_file.write("".join(f"{start + j}\n" * n for j, n in enumerate(keep)))
                counts[name] += rows
    return counts  # the stack closed each file, then renamed it into place


def write_simulated(
    root: str | Path,
    name: str,
    num_identities: int,
    *,
    seed: int = 0,
    split: Split = "test",
    chunk_identities: int = 1000,
    show_progress: bool = True,
    **params: Any,
) -> int:
    """Stream a simulated set to ``root/features/<name>.bin`` and ``root/labels/<name>.meta``
    (each file atomic), ``chunk_identities`` identities at a time; returns the sample count.

    Memory is one chunk (about ``chunk_identities * mean_size * dim * 4`` bytes), so millions of
    samples can be written. The files equal :func:`simulate_features` with the same arguments.
    """
    num_identities = check_int("num_identities", num_identities, 1)
    sim = _Simulator(SimulationParams(**params), seed, split)
    return _write_split(Path(root), {name: num_identities}, sim, chunk_identities, show_progress)[
        name
    ]


README = """\
Simulated face-clustering benchmark (robustface.cluster.simulate), learn-to-cluster layout:

  features/<name>.bin   raw float32, N x {dim}, unit rows
  labels/<name>.meta    one identity label per line (0..C-1)

part0_train holds {train_identities} training identities; part<s>_test holds s x {test_identities}
test identities, disjoint from the training ones. Test sets are nested: part3_test starts with
exactly the samples of part1_test, and so on (the published sets' sizes, 584K / 1.74M / 2.89M /
4.05M / 5.21M, are consistent with unions of parts 1..s of MS1M). Build kNN graphs with
robustface.cluster.knn.build_knn and save them to knns/<name>/faiss_k_80.npz.

The generator, its parameters and the seed are in meta.json; the same call reproduces every
byte. Statistics measured with the default parameters (meta.json says which were used here):

{calibration}
"""


def write_benchmark(
    root: str | Path,
    *,
    scales: tuple[int, ...] = (1,),
    train_identities: int = 8573,
    test_identities: int = 8573,
    seed: int = 0,
    chunk_identities: int = 1000,
    overwrite: bool = False,
    show_progress: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Write a simulated benchmark directory named like learn-to-cluster's MS1M one.

    ``part0_train`` (``train_identities``, default 8,573 as published) and one test set
    ``part<s>_test`` of ``s * test_identities`` identities per ``s`` in ``scales``, chosen from the
    published 1, 3, 5, 7, 9 (584K ... 5.21M samples at the default 8,573 identities of mean size
    68). ``root`` appears whole or not at all; an existing ``root`` is replaced only with
    ``overwrite`` and when it holds our ``meta.json``. Returns what ``meta.json`` records.
    """
    train_identities = check_int("train_identities", train_identities, 1)
    test_identities = check_int("test_identities", test_identities, 1)
    if not scales or len(set(scales)) != len(scales) or not set(scales) <= set(PUBLISHED_SCALES):
        raise ValueError(
            f"scales must be distinct values from {sorted(PUBLISHED_SCALES)} (the published "
            f"part<s>_test sets), got {scales!r}"
        )
    sim_params = SimulationParams(**params)
    check_output_dir(root, overwrite=overwrite, marker="meta.json")
    tests = {f"part{s}_test": s * test_identities for s in sorted(scales)}
    with atomic_directory(root) as partial:
        train_sim = _Simulator(sim_params, seed, "train")
        counts = _write_split(
            partial, {"part0_train": train_identities}, train_sim, chunk_identities, show_progress
        )
        test_sim = _Simulator(sim_params, seed, "test")
        counts.update(_write_split(partial, tests, test_sim, chunk_identities, show_progress))
        identities = {"part0_train": train_identities, **tests}
        meta: dict[str, Any] = {
            "generator": "robustface.cluster.simulate.write_benchmark",
            "robustface": robustface.__version__,
            "seed": seed,
            "params": dataclasses.asdict(sim_params),
            "sets": {
                name: {
                    "split": "train" if name == "part0_train" else "test",
                    "identities": identities[name],
                    "samples": counts[name],
                }
                for name in identities
            },
        }
        text = json.dumps(meta, indent=2) + "\n"
        write_text_atomic(partial / "meta.json", text)
        readme = README.format(
            dim=sim_params.dim,
            train_identities=train_identities,
            test_identities=test_identities,
            calibration=CALIBRATION,
        )
        write_text_atomic(partial / "README", readme)
    return json.loads(text)
