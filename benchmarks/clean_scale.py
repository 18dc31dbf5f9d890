"""Time and memory of the cleaning scoring pass at MS1M-like scale, stage by stage.

Run: ``.venv/bin/python benchmarks/clean_scale.py [--sizes 100000,1000000] [--dim 256]
[--per-class 68] [--knn 10] [--methods flat,ivf] [--nprobe 16] [--backbones r18_tiny,r50]``,
or on real images: ``... clean_scale.py --run RUN --data TRAIN_DIR --out SCORE_DIR
[--workers 1] [--methods ivf] [--nprobe 16]``.

Simulated features: ``N / per_class`` classes (MS1M: 5.8M images of 85K identities, 68 per
class), each a random unit centre; a sample is its class centre plus Gaussian noise of
``1/sqrt(d)`` per dimension (cosine to its centre near 0.7 at any d), normalised as the scorer's
embeddings are; 10% of the labels are replaced by a random class (planted label noise). The
classifier's centres are the true centres plus a little noise. Each size runs in a fresh child
process; each stage of :func:`robustface.clean.score.compute_scores` (the centre angles: own
dominant sub-centre and the nearest other centre, chunked; the kNN purity, one run per
``--methods`` entry, ``auto`` as the scorer would choose; thresholds; flags; the identity-level
merge and split candidates on the kept samples) is timed, and its peak memory is the process's
peak RSS during the stage (``VmHWM``, reset before each stage through ``/proc/self/clear_refs``)
less the RSS when it started. The kNN runs are checked against the exact neighbours of
``--queries`` random rows (recall@k and the share of those rows whose purity equals the exact
one).

Real images (``--run``): :func:`robustface.clean.score.score_to_dir` over the whole set, every
stage timed by a :class:`~robustface.clean.score.StageTimer` that also records the peak RSS as
above (the loader workers' own peak is ``children_peak_gib``, over all finished children) and
the CPU seconds (this process and its finished children: a paused or crowded run shows as wall
time without CPU time).

``--backbones``: images/s of the scoring forward pass (eval mode, no gradient, batch
``--batch``, random images at each backbone's input size) on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustface.utils.table import markdown_table

MS1M_IMAGES = 5_822_653
MS1M_CLASSES = 85_742


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; returns that RSS (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def staged(name: str, out: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run ``fn``; record its seconds and peak RSS (GiB) above the RSS at its start in ``out``."""
    start_kib = _reset_peak()
    tic = time.perf_counter()
    result = fn()
    out[name] = {
        "seconds": round(time.perf_counter() - tic, 2),
        "peak_extra_gib": round((_status_kib("VmHWM") - start_kib) / 2**20, 3),
        "peak_gib": round(_status_kib("VmHWM") / 2**20, 3),
    }
    return result


def simulate(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(embeddings N x d float32, labels with 10% noise, true labels, centres C x d)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, classes, n)
    emb = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        stop = min(start + (1 << 16), n)
        emb[start:stop] = centres[truth[start:stop]]
        emb[start:stop] += rng.standard_normal((stop - start, dim), dtype=np.float32) / dim**0.5
        emb[start:stop] /= np.linalg.norm(emb[start:stop], axis=1, keepdims=True)
    noisy = rng.random(n) < 0.1
    labels = np.where(noisy, rng.integers(0, classes, n), truth)
    weight = centres + 0.1 * rng.standard_normal(centres.shape, dtype=np.float32) / dim**0.5
    return emb, labels, truth, weight


def child_scale(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """One size: every stage of the scoring pass, measured in this process."""
    import faiss

    from cluster_knn import exact_rows
    from robustface.clean.score import (
        Scores,
        _centre_cosines,
        _knn_votes,
        choose_thresholds,
        flag_samples,
        knn_settings,
        merge_candidates,
        split_candidates,
    )
    from robustface.cluster.knn import ivf_nlist

    faiss.omp_set_num_threads(args.threads)
    classes = max(2, n // args.per_class)
    out: dict[str, Any] = {"n": n, "classes": classes, "dim": args.dim, "stages": {}}
    stages = out["stages"]
    emb, labels, _, weight = staged(
        "simulate", stages, lambda: simulate(n, args.dim, classes, args.seed)
    )
    cos_own, cos_other, other = staged(
        "centre angles", stages, lambda: _centre_cosines(emb, labels, weight, 1)
    )
    rng = np.random.default_rng(1)
    queries = np.sort(rng.choice(n, min(args.queries, n), replace=False))
    exact = exact_rows(emb, queries, args.knn + 1)
    exact_purity = (labels[exact.nbrs[:, 1:]] == labels[queries, None]).mean(axis=1)
    knn_out: dict[str, Any] = {}
    runs = []
    for method in args.methods.split(","):
        params = {"nprobe": args.nprobe} if args.nprobe and method != "flat" else {}
        chosen, options = knn_settings(n, method, params)
        if (chosen, options) in runs:  # auto chose a method already measured
            continue
        runs.append((chosen, options))
        name = f"kNN {method}" + (f" ({chosen})" if method == "auto" else "")
        purity, major, share = staged(
            name, stages, lambda m=method, p=params: _knn_votes(emb, labels, args.knn, False, m, p)
        )
        ivf = chosen == "ivf"
        knn_out[name] = {
            "method": chosen,
            "nlist": ivf_nlist(n, options.get("nlist")) if ivf else None,
            "nprobe": (options.get("nprobe") or min(128, ivf_nlist(n))) if ivf else None,
            "purity_equal": round(float(np.mean(purity[queries] == exact_purity)), 4),
            "purity_mae": round(float(np.mean(np.abs(purity[queries] - exact_purity))), 4),
        }
    out["knn"] = knn_out
    norms = rng.lognormal(3.0, 0.2, n).astype(np.float32)
    stroke = rng.normal(2.0, 0.3, n).astype(np.float32)
    scores = Scores(
        label=labels,
        angle_own=np.degrees(np.arccos(np.clip(cos_own, -1, 1))).astype(np.float32),
        angle_other=np.degrees(np.arccos(cos_other)).astype(np.float32),
        other_class=other,
        knn_purity=purity.astype(np.float32),  # the last method's
        knn_label=major,
        knn_share=share.astype(np.float32),
        norm=norms,
        crfiqa=(cos_own / (cos_other + 1.0 + 1e-9)).astype(np.float32),
        stroke=stroke,
    )
    thresholds = staged("thresholds", stages, lambda: choose_thresholds(scores))
    flags = staged("flags", stages, lambda: flag_samples(scores, thresholds))
    kept = ~flags.removed
    merges, _ = staged("merge candidates", stages,
                       lambda: merge_candidates(emb, labels, classes, rows=kept))  # fmt: skip
    splits = staged("split candidates", stages,
                    lambda: split_candidates(emb, labels, classes, rows=kept))  # fmt: skip
    out["merges"], out["splits"] = len(merges), len(splits)
    out["removed_share"] = round(float(flags.removed.mean()), 4)
    out["peak_rss_gib"] = round(_status_kib("VmHWM") / 2**20, 3)
    return out


def run_images(args: argparse.Namespace) -> dict[str, Any]:
    """The whole scoring pass over a real training set, every stage timed with its peak RSS."""
    import faiss
    import torch

    from robustface.clean.score import StageTimer, knn_settings, score_to_dir
    from robustface.data.recordio import RecordIODataset

    class PeakTimer(StageTimer):
        """A StageTimer that also records the stage's peak RSS above its start (GiB) and the CPU
        seconds of the loader workers alone (finished children)."""

        def start(self) -> Any:
            return super().start(), _reset_peak(), sum(os.times()[2:4])

        def stop(self, started: Any) -> dict[str, float]:
            times, start_kib, children_cpu = started
            peak = _status_kib("VmHWM")
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            return {**super().stop(times),
                    "workers_cpu_seconds": round(sum(os.times()[2:4]) - children_cpu, 2),
                    "peak_extra_gib": round((peak - start_kib) / 2**20, 3),
                    "peak_gib": round(peak / 2**20, 3),
                    "children_peak_gib": round(children / 2**20, 3)}  # fmt: skip

    torch.set_num_threads(max(1, args.threads - args.workers))
    faiss.omp_set_num_threads(args.threads)
    n = len(RecordIODataset(args.data))
    method = args.methods.split(",")[0]
    params = {"nprobe": args.nprobe} if args.nprobe and method != "flat" else {}
    chosen, options = knn_settings(n, method, params)
    timer = PeakTimer()
    load_before = os.getloadavg()
    summary = score_to_dir(args.run, args.out, data=args.data, knn=args.knn, knn_method=method,
                           knn_params=params, batch_size=args.batch_size,
                           num_workers=args.workers, overwrite=True, progress=True,
                           timer=timer)  # fmt: skip
    embedding = next(v for k, v in timer.stages.items() if k.startswith("embedding"))
    return {
        "samples": n,
        "run": str(args.run),
        "data": str(args.data),
        "knn": {"method": chosen, **options},
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": args.threads,
        "images_per_s": round(n / embedding["seconds"], 1),
        "images_per_cpu_s": round(n / embedding["cpu_seconds"], 1),
        "stages": timer.stages,
        "flags": summary["flags"],
        "merges": len(summary["merges"]),
        "splits": len(summary["splits"]),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def child_forward(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Images/s of one backbone's eval-mode forward pass on ``--threads`` CPU threads."""
    import torch

    from robustface.models import build_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    size = int(model.meta.input_size)
    x = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up
        tic = time.perf_counter()
        for _ in range(args.iters):
            model(x)
        seconds = (time.perf_counter() - tic) / args.iters
    rate = args.batch / seconds
    return {"model": name, "input": size, "batch": args.batch, "images_per_s": round(rate, 2),
            "hours_5_8m": round(MS1M_IMAGES / rate / 3600, 1)}  # fmt: skip


def _child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated N")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--per-class", type=int, default=68, help="samples per class (MS1M: 68)")
    p.add_argument("--knn", type=int, default=10)
    p.add_argument("--methods", default="auto,ivf", help="kNN methods of the purity (per size)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed (0: build_knn's)")
    p.add_argument("--queries", type=int, default=1000, help="rows checked against exact kNN")
    p.add_argument("--backbones", default="r18_tiny,r50", help="forward-pass models ('' none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--run", type=Path, help="real images: the run whose model scores --data")
    p.add_argument("--data", type=Path, help="real images: the training set to score")
    p.add_argument("--out", type=Path, help="real images: the score output directory")
    p.add_argument("--workers", type=int, default=1, help="real images: loader processes")
    p.add_argument("--batch-size", type=int, default=256, help="real images: forward batch")
    p.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-backbone", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run is not None:
        if args.data is None or args.out is None:
            raise SystemExit("--run needs --data and --out")
        res = run_images(args)
        keys = ["seconds", "cpu_seconds", "workers_cpu_seconds", "peak_extra_gib", "peak_gib",
                "children_peak_gib"]  # fmt: skip
        rows = [[stage, *(v[k] for k in keys)] for stage, v in res["stages"].items()]
        print(markdown_table(["stage", *keys], rows))
        print(json.dumps({k: v for k, v in res.items() if k != "stages"}, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if args.child_size is not None:
        print(json.dumps(child_scale(args, args.child_size)))
        return 0
    if args.child_backbone is not None:
        print(json.dumps(child_forward(args, args.child_backbone)))
        return 0
    sizes = [_child(args, ["--child-size", s]) for s in args.sizes.split(",") if s]
    rows = []
    for res in sizes:
        for stage, v in res["stages"].items():
            rows.append([f"{res['n']:,}", f"{res['classes']:,}", res["dim"], stage, v["seconds"],
                         v["peak_extra_gib"], v["peak_gib"]])  # fmt: skip
    print(markdown_table(["N", "classes", "d", "stage", "s", "peak above start (GiB)",
                          "process peak (GiB)"], rows))  # fmt: skip
    rows = [[f"{res['n']:,}", name, v["nlist"], v["nprobe"], v["purity_equal"], v["purity_mae"]]
            for res in sizes for name, v in res["knn"].items()]  # fmt: skip
    print()
    print(markdown_table(["N", "kNN", "nlist", "nprobe", "purity = exact", "purity MAE"], rows))
    forward = [_child(args, ["--child-backbone", b]) for b in args.backbones.split(",") if b]
    if forward:
        print()
        print(markdown_table(["model", "input", "batch", "images/s", "hours for 5.8M"],
                             [list(f.values()) for f in forward]))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "forward": forward}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
