"""``robustface cluster ...``: the command-line layer over :mod:`robustface.cluster` (kept out of
the package so that other commands start without importing faiss, sklearn and infomap).

Data sets are named as in learn-to-cluster: ``ROOT`` holds ``features/NAME.bin`` (or ``.npy``),
``labels/NAME.meta`` (or ``.npy``) and kNN caches in ``knns/NAME/``.

Parameters are overridden as in every other command, ``--set KEY=VALUE`` with values read as YAML
by :func:`robustface.config.parse_override`: ``--set METHOD.PARAM=VALUE`` for ``run`` and
``benchmark`` (checked against the method's estimator, every problem reported at once),
``--set PARAM=VALUE`` for ``simulate``. The older ``--param NAME=VALUE`` and ``--params JSON``
still work for one release and print a deprecation note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["add_cluster_parser"]

# the names registered in robustface.cluster.base.CLUSTERERS, written out so that the parser is
# built without importing the clusterers (torch, faiss); a test checks that they agree
_METHODS = "kmeans, hac, dbscan, aro, cc, chinese_whispers, infomap, gcn_v, gcn_e, gcn_d, gcn_ds"


def _key_values(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _deprecated(flag: str, instead: str) -> None:
    print(
        f"robustface cluster: {flag} is deprecated and goes in the next release; use {instead}",
        file=sys.stderr,
    )


def _simulation_params(args: argparse.Namespace) -> dict[str, Any]:
    """``simulate``'s ``--set NAME=VALUE`` (and the deprecated ``--param``) as a dict."""
    from robustface.config import parse_override

    if args.param:
        _deprecated("--param", "--set NAME=VALUE")
    params = _key_values(args.param, "--param")
    for item in args.set:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE (a simulator parameter)")
        params[parts[0]] = value
    return params


def _method_params(
    args: argparse.Namespace, methods: Sequence[str], old: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per method, its parameters from ``--set METHOD.PARAM=VALUE`` over ``old`` (those of the
    deprecated flags); every unknown method or parameter is reported in one error."""
    from robustface.cluster.base import check_params
    from robustface.config import parse_override

    params = {method: dict(values) for method, values in old.items()}
    problems = []
    for item in args.set:
        parts, value = parse_override(item)
        if len(parts) != 2:
            problems.append(f"--set {item!r}: expected METHOD.PARAM=VALUE, e.g. cc.min_sim=0.8")
            continue
        params.setdefault(parts[0], {})[parts[1]] = value
    for method, values in params.items():
        if method not in methods:
            problems.append(f"parameters given for {method!r}, which is not run")
            continue
        problems += [f"{method}: {p}" for p in check_params(method, values, require=False)]
    if problems:
        raise ValueError("bad method parameters:\n  " + "\n  ".join(problems))
    return {method: values for method, values in params.items() if values}


def _load(args: argparse.Namespace, name: str, require_labels: bool = False):
    from robustface.cluster.dataset import load_cluster_set

    return load_cluster_set(args.root, name, dim=args.dim, require_labels=require_labels)


def _knn(args: argparse.Namespace, data: Any) -> tuple[Any, dict[str, Any]]:
    """The set's kNN graph (cached under ``ROOT/knns/``) and how it was made."""
    from robustface.cluster.dataset import knn_file_method, knn_path
    from robustface.cluster.knn import load_or_build_knn

    path = knn_path(args.root, data.name, args.k, method=knn_file_method(args.knn_method))
    cached = path.is_file()
    t0 = time.perf_counter()
    graph = load_or_build_knn(
        path, data.features, k=args.k, method=args.knn_method, show_progress=not args.quiet
    )
    info = {
        "method": args.knn_method,
        "seconds": time.perf_counter() - t0,
        "source": f"read from {path}" if cached else f"built, cached in {path}",
    }
    return graph, info


def _cmd_simulate(args: argparse.Namespace) -> int:
    from robustface.cluster.simulate import write_benchmark

    meta = write_benchmark(
        args.out,
        scales=tuple(args.scales),
        train_identities=args.train_identities,
        test_identities=args.test_identities,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        **_simulation_params(args),
    )
    print(json.dumps(meta["sets"], indent=2))
    print(f"wrote {args.out}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from robustface.cli import model_args
    from robustface.cluster.dataset import ClusterSet, extract_synthface_features, save_cluster_set

    data = extract_synthface_features(
        args.model,
        args.synth,
        split=args.split,
        **model_args(args),
        batch_size=args.batch_size,
        device=args.device,
        show_progress=not args.quiet,
    )
    data = ClusterSet(args.name, data.features, data.labels)
    feats, labels = save_cluster_set(args.out, data)
    print(
        f"{data.num_samples} samples x {data.dim}, {data.num_classes} identities: {feats}, {labels}"
    )
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    data = _load(args, args.name)
    graph, info = _knn(args, data)
    print(f"kNN of {data.name}: {graph.num_samples} x k={graph.k}, {info['source']}")
    return 0


def _train(
    args: argparse.Namespace, data: Any, out: Path, kinds: list[str], gcn_v: Any
) -> dict[str, Path]:
    """``train_models`` on ``data`` with the training options of ``cluster train/benchmark``."""
    from robustface.cluster.training import train_models

    return train_models(
        data,
        out,
        kinds=kinds,
        knn=_knn(args, data)[0],
        gcn_v=gcn_v,
        gcn_e_features=args.gcn_e_features,
        k_edge=args.k_edge,
        iters=args.iters,
        **({} if args.gcn_v_batch is None else {"batch_size": args.gcn_v_batch or None}),
        optimizer=args.gcn_v_optimizer,
        lr=args.gcn_v_lr,
        epochs=args.epochs,
        device=args.device,
        seed=args.seed,
        show_progress=not args.quiet,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    data = _load(args, args.name, require_labels=True)
    paths = _train(args, data, args.out, args.kinds, args.gcn_v)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from robustface.cluster.base import CLUSTERERS, param_names
    from robustface.cluster.benchmark import method_params, run_methods
    from robustface.data.ltc import write_meta

    cls = CLUSTERERS.get(args.method)
    if args.param:
        _deprecated("--param", f"--set {args.method}.NAME=VALUE")
    old = {args.method: _key_values(args.param, "--param")}
    overrides = _method_params(args, [args.method], old).get(args.method, {})
    data = _load(args, args.name)
    models = _key_values(args.model, "--model")
    graph, info = _knn(args, data)
    if data.labels is not None:
        results = run_methods(
            data,
            [args.method],
            args.out,
            knn=graph,
            knn_info=info,
            models=models,
            params={args.method: overrides},
            device=args.device,
            show_progress=not args.quiet,
        )
        if results[0].error or results[0].skipped:
            raise ValueError(f"{args.method}: {results[0].error or results[0].skipped}")
        labels = np.load(Path(args.out) / "labels" / f"{args.method}.npy")
        print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    else:  # no ground truth: cluster and write the labels only
        params = method_params(
            args.method, None, models, overrides, device=args.device, knn_method=args.knn_method
        )
        if "show_progress" in param_names(cls):
            params.setdefault("show_progress", not args.quiet)
        labels = cls(**params).fit_predict(data.features, graph)
    write_meta(Path(args.out) / f"{data.name}_{args.method}.meta", np.asarray(labels))
    print(
        f"{len(np.unique(labels))} clusters -> {Path(args.out) / f'{data.name}_{args.method}.meta'}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from robustface.cluster.dataset import load_labels
    from robustface.cluster.metrics import evaluate_clustering

    metrics = evaluate_clustering(load_labels(args.gt), load_labels(args.pred))
    for key, value in metrics.items():
        print(f"{key:20s} {value:.4f}" if isinstance(value, float) else f"{key:20s} {value}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from robustface.cluster.base import CLUSTERERS
    from robustface.cluster.benchmark import BASELINES, LEARNED, run_methods
    from robustface.cluster.training import KINDS_FOR

    methods = list(args.methods or (*BASELINES, *LEARNED))
    for method in methods:  # every check before hours of training
        CLUSTERERS.get(method)
    if args.params is not None:
        _deprecated("--params", "--set METHOD.PARAM=VALUE")
    try:
        old = json.loads(args.params or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.values()):
        raise ValueError('--params must map method names to objects, e.g. {"cc": {"min_sim": 0.8}}')
    params = _method_params(args, methods, old)
    grids = _tune_grids(args.tune_grid)
    if grids and not args.tune:
        raise ValueError("--tune-grid needs --tune")
    test = _load(args, args.test, require_labels=True)
    models: dict[str, Any] = _key_values(args.model, "--model")
    needed = sorted({kind for m in methods for kind in KINDS_FOR.get(m, ())} - set(models))
    train = _load(args, args.train, require_labels=True) if needed or args.tune else None
    if needed:
        trained = _train(args, train, Path(args.out) / "models", needed, models.get("gcn_v"))
        models.update({kind: path for kind, path in trained.items() if kind not in models})
    graph, info = _knn(args, test)
    tune_knn, tune_info = _knn(args, train) if args.tune else (None, None)
    run_methods(
        test,
        methods,
        args.out,
        knn=graph,
        knn_info=info,
        models=models,
        params=params,
        tune_on=train if args.tune else None,
        tune_knn=tune_knn,
        tune_knn_info=tune_info,
        tune_grids=grids,
        tune_metric=args.tune_metric,
        device=args.device,
        show_progress=not args.quiet,
    )
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    return 0


def _tune_grids(items: Sequence[str]) -> dict[str, list[float]]:
    """``["cc=0.6,0.7"]`` -> ``{"cc": [0.6, 0.7]}``."""
    grids: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            grid = [float(v) for v in values.split(",")]
        except ValueError:
            grid = []
        if not sep or not method or not grid:
            raise ValueError(f"--tune-grid must look like METHOD=V1,V2,..., got {item!r}")
        grids[method] = grid
    return grids


def _data_args(p: argparse.ArgumentParser, name: bool = True) -> None:
    p.add_argument("root", type=Path, help="data root: features/, labels/, knns/")
    if name:
        p.add_argument("name", help="set name, e.g. part1_test")
    p.add_argument(
        "--dim",
        type=int,
        help="feature width of a .bin file (default: 256); a .npy's is read from the file (and "
        "checked against --dim when given)",
    )
    p.add_argument("--k", type=int, default=80, help="neighbours per sample (self included)")
    p.add_argument(
        "--knn-method", choices=["flat", "ivf", "hnsw"], default="flat", help="faiss index"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=None, help="GCN-V iterations (default: module's)")
    p.add_argument("--gcn-v-batch", type=int, default=None, metavar="ROWS",
                   help="GCN-V rows per step (default: module's, 1024; 0: the whole graph, "
                   "as published)")  # fmt: skip
    p.add_argument("--gcn-v-optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="GCN-V optimiser: AdamW with warm-up + cosine (default) or the "
                   "published SGD with steps")  # fmt: skip
    p.add_argument("--gcn-v-lr", type=float, default=None,
                   help="GCN-V learning rate (default: 1e-3 for AdamW, 0.1 for SGD)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="GCN-E/D/S epochs (default: module's)")
    p.add_argument("--gcn-e-features", choices=["gcn", "input"], default="gcn",
                   help="GCN-E edge features: GCN-V's hidden ones (published) or the input ones "
                   "(reuses the input kNN; cluster with use_gcn_features=false)")  # fmt: skip
    p.add_argument("--k-edge", type=int, default=160, help="GCN-E graph k (published 160)")
    p.add_argument("--device", default="cpu", help="torch device of the GCNs, e.g. cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed of the GCN training")


def add_cluster_parser(sub: Any) -> None:
    """Add ``cluster`` and its sub-commands to the top-level sub-parser action ``sub``."""
    from robustface.cli import add_model_args  # cli imports this module: import when called

    p = sub.add_parser("cluster", help="cluster face features: kNN, baselines, GCN-V/E, GCN-D/S")
    cs = p.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")

    q = cs.add_parser("simulate", help="write a simulated learn-to-cluster benchmark")
    q.add_argument("out", type=Path, help="data root to write features/, labels/ and meta.json")
    q.add_argument("--scales", type=int, nargs="+", default=[1], help="test sets: 1 3 5 7 9")
    q.add_argument(
        "--train-identities", type=int, default=8573, help="identities of the training set"
    )
    q.add_argument("--test-identities", type=int, default=8573, help="identities per scale unit")
    q.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="simulator parameter (SimulationParams), e.g. --set dim=64 (repeatable)",
    )
    q.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="deprecated alias of --set NAME=VALUE (goes in the next release)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_simulate)

    q = cs.add_parser("extract", help="embed a SynthFace split into a clustering set")
    q.add_argument("model", type=Path, help="run directory, backbone .pth or .onnx")
    q.add_argument("synth", type=Path, help="SynthFace directory")
    q.add_argument("--out", required=True, type=Path, help="data root to write features/labels")
    q.add_argument("--name", default="synthface_open_set", help="name of the written set")
    q.add_argument(
        "--split", choices=["open_set", "train"], default="open_set", help="SynthFace split"
    )
    add_model_args(q)
    q.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    q.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_extract)

    q = cs.add_parser("knn", help="build (or check) the cached kNN graph of a set")
    _data_args(q)
    q.set_defaults(func=_cmd_knn)

    q = cs.add_parser("train", help="train GCN-V / GCN-E / GCN-D / GCN-S on a labelled set")
    _data_args(q)
    q.add_argument("--out", required=True, type=Path, help="directory for the model files")
    kinds = ["gcn_v", "gcn_e", "gcn_d", "gcn_s"]
    q.add_argument("--kinds", nargs="+", default=kinds, choices=kinds, help="models to train")
    q.add_argument("--gcn-v", type=Path, help="trained GCN-V for GCN-E (instead of training one)")
    _train_args(q)
    q.set_defaults(func=_cmd_train)

    q = cs.add_parser("run", help="cluster a set with one method")
    q.add_argument("method", help=_METHODS)
    _data_args(q)
    q.add_argument(
        "--out",
        required=True,
        type=Path,
        help="directory for NAME_METHOD.meta (and, with ground truth, results.md/.json)",
    )
    q.add_argument("--device", default="cpu", help="device of the learned methods")
    q.add_argument("--model", action="append", default=[], metavar="KIND=PATH",
                   help="trained model: gcn_v=..., gcn_e=..., gcn_d=..., gcn_s=...")  # fmt: skip
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.PARAM=VALUE",
        help="method parameter, e.g. --set cc.min_sim=0.7 (repeatable)",
    )
    q.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="deprecated alias of --set METHOD.NAME=VALUE (goes in the next release)",
    )
    q.set_defaults(func=_cmd_run)

    q = cs.add_parser("eval", help="pairwise / BCubed P,R,F and NMI of predicted labels")
    q.add_argument("gt", type=Path, help="ground-truth labels (.meta or .npy)")
    q.add_argument("pred", type=Path, help="predicted labels (.meta or .npy)")
    q.set_defaults(func=_cmd_eval)

    q = cs.add_parser("benchmark", help="every method on a test set, one table (trains GCNs)")
    _data_args(q, name=False)
    q.add_argument("--train", default="part0_train", help="training set for the GCNs")
    q.add_argument("--test", default="part1_test", help="set to cluster and score")
    q.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"{_METHODS} (default: all)")  # fmt: skip
    q.add_argument("--model", action="append", default=[], metavar="KIND=PATH",
                   help="use this trained model instead of training one")  # fmt: skip
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.PARAM=VALUE",
        help="method parameter, e.g. --set cc.min_sim=0.8 (repeatable)",
    )
    q.add_argument("--params", metavar="JSON",
                   help="deprecated alias of --set: JSON overrides per method, e.g. "
                   '\'{"cc": {"min_sim": 0.8}}\' (goes in the next release)')  # fmt: skip
    q.add_argument("--tune", action="store_true",
                   help="pick each method's threshold on --train first (cc, chinese_whispers, "
                   "infomap, dbscan, aro, gcn_v, gcn_e)")  # fmt: skip
    q.add_argument("--tune-grid", action="append", default=[], metavar="METHOD=V1,V2,...",
                   help="a threshold grid instead of the default (repeatable)")  # fmt: skip
    q.add_argument("--tune-metric", default="pairwise_fscore",
                   choices=["pairwise_fscore", "bcubed_fscore", "nmi"],
                   help="metric maximised by --tune")  # fmt: skip
    q.add_argument(
        "--out", required=True, type=Path, help="directory for results.*, labels/ and models/"
    )
    _train_args(q)
    q.set_defaults(func=_cmd_benchmark)
