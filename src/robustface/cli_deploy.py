"""``robustface embed | verify | gallery build|add|remove|search``: use a model (the command-line
layer over :mod:`robustface.deploy`; see docs/deploy.md, "Use a model").

Every command that embeds takes ``MODEL`` (a run directory, a ``.pth`` / AdaFace ``.ckpt`` or an
``.onnx``) and the model flags of ``eval``. Faces are aligned crops unless they come from an
IJB-style directory (aligned with its landmarks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from robustface.utils.table import counted

__all__ = ["add_deploy_parser"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# robustface.deploy.gallery's INDEX_TYPES and EXACT_MAX, written out so that building the parser
# imports neither faiss nor torch; a test checks that they agree
_INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
_EXACT_MAX = 100_000


def _recognizer(args: argparse.Namespace) -> Any:
    from robustface.cli import model_args
    from robustface.deploy.recognizer import Recognizer

    return Recognizer.from_pretrained(
        args.model,
        device=args.device,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        **model_args(args),
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    from robustface.cli import add_model_args

    p.add_argument("model", type=Path, help="run directory, .pth / .ckpt or .onnx model")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument(
        "--no-flip", action="store_true", help="embed the image alone (default: image + mirror)"
    )


def _add_threshold(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help=f"cosine-similarity threshold {what}")
    g.add_argument(
        "--far",
        type=float,
        help="use the threshold calibrated at this false-accept rate (on --calibration SET.bin, "
        "calibrated now and recorded with the model, or the recorded one)",
    )
    p.add_argument("--calibration", type=Path, help="verification .bin to calibrate --far on")


def _threshold(args: argparse.Namespace, rec: Any) -> tuple[float | None, str]:
    """``(threshold, how it was chosen)`` from ``--threshold`` or ``--far``/``--calibration``."""
    from robustface.deploy.verify import (
        calibrate,
        find_calibration,
        missing_calibration,
        record_calibration,
    )
    from robustface.utils.guards import check_real

    if args.calibration is not None and args.far is None:
        raise ValueError("--calibration needs --far (the false-accept rate to calibrate at)")
    if args.calibration is not None and not args.calibration.is_file():
        raise FileNotFoundError(f"{args.calibration}: no such file (--calibration)")
    if args.threshold is not None:
        # a cosine similarity: a threshold outside [-1, 1] accepts everything or nothing
        return check_real("--threshold", args.threshold, -1, 1), "--threshold"
    if args.far is None:
        return None, ""
    entry = find_calibration(rec, args.far, args.calibration)
    if entry is None:
        if args.calibration is None:
            raise FileNotFoundError(missing_calibration(rec, args.far))
        entry = calibrate(rec, args.calibration, args.far)
        path = record_calibration(rec, entry)
        print(f"calibrated on {args.calibration}, recorded in {path}", file=sys.stderr)
    how = (
        f"FAR {entry['far']:g} on {Path(entry['set']).name}: TAR {100 * entry['tar']:.2f}% at "
        f"FAR {entry['far_reached']:.3g} over {entry['impostor_pairs']} impostor pairs"
    )
    return float(entry["threshold"]), how


def _cmd_embed(args: argparse.Namespace) -> int:
    from robustface.deploy.embed import embed_to_dir, open_inputs

    rec = _recognizer(args)
    inputs = open_inputs(args.inputs)
    print(f"{counted(len(inputs), inputs.kind + ' input')} from {inputs.path}", file=sys.stderr)
    embed_to_dir(
        rec,
        inputs,
        args.out,
        dtype="float16" if args.fp16 else "float32",
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        log=lambda line: print(line, file=sys.stderr),
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    rec = _recognizer(args)
    threshold, how = _threshold(args, rec)
    score = rec.compare(str(args.a), str(args.b))
    if threshold is None:
        print(f"score {score:.4f} (no --threshold or --far: no decision)")
        return 0
    same = score >= threshold
    verdict = "same person" if same else "different people"
    sign = ">=" if same else "<"
    print(f"score {score:.4f} {sign} threshold {threshold:.4f} ({how}): {verdict}")
    return 0


def _enrolment(
    path: Path, rec: Any, show_progress: bool = True
) -> tuple[list[str], Any, list[str]]:
    """``(identity of each row, raw embeddings, image of each row)`` from a folder tree (one
    sub-folder per identity), a list of ``identity<TAB>path`` lines, or an ``embed`` output
    directory of a folder tree (identity: the first part of each path)."""
    import json

    import numpy as np

    from robustface.deploy.embed import MANIFEST, open_inputs, read_embeddings
    from robustface.errors import DataFormatError

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder, list file or embed output (ENROL)")
    if (path / MANIFEST).is_file():
        emb, norms, sources = read_embeddings(path)
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        built = manifest["model"]
        if built["sha256"] != rec.info.sha256:
            raise ValueError(
                f"{path}: embedded by {built['path']} (sha256 {built['sha256'][:12]}), not by "
                f"{rec.info.path} (sha256 {rec.info.sha256[:12]})"
            )
        if not sources or "path" not in sources[0] or any("/" not in s["path"] for s in sources):
            raise DataFormatError(path, "rows must come from a folder tree IDENTITY/IMAGE")
        names = [s["path"].split("/", 1)[0] for s in sources]
        images = [str(Path(manifest["input"]["path"]) / s["path"]) for s in sources]
        return names, np.asarray(emb, np.float32) * norms[:, None], images
    if path.is_dir():
        rows = [r[0] for r in open_inputs(path).rows]
        loose = [r for r in rows if "/" not in r]
        if loose:
            raise DataFormatError(path / loose[0], "not in an identity sub-folder")
        names, faces = [r.split("/", 1)[0] for r in rows], [str(path / r) for r in rows]
    else:
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                name, sep, image = line.partition("\t")
                if not sep:
                    raise DataFormatError(path, f"line {n}: expected IDENTITY<TAB>PATH")
                pairs.append((name.strip(), str(path.parent / image.strip())))
        if not pairs:
            raise DataFormatError(path, "lists no IDENTITY<TAB>PATH lines")
        names, faces = [p[0] for p in pairs], [p[1] for p in pairs]
    return names, rec.embed(faces, normalize=False, show_progress=show_progress), faces


def _index_spec(args: argparse.Namespace) -> Any:
    from robustface.deploy.gallery import IndexSpec

    given = {
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "hnsw_m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
    }
    return IndexSpec(type=args.index, **{k: v for k, v in given.items() if v is not None})


def _cmd_gallery_build(args: argparse.Namespace) -> int:
    from robustface.deploy.gallery import Gallery

    rec = _recognizer(args)
    names, feats, _ = _enrolment(args.enrol, rec, not args.quiet)
    g = Gallery.create(
        args.gallery,
        rec.info.to_dict(),
        names,
        feats,
        aggregator=args.aggregator,
        index=_index_spec(args),
        overwrite=args.overwrite,
    )
    lists = g.ivf_lists
    if args.nlist is not None and lists is not None and lists < args.nlist:
        print(
            f"--nlist {args.nlist} lowered to {lists} for {len(g)} identities (IVF k-means needs "
            "at least 39 per list)",
            file=sys.stderr,
        )
    print(f"{len(g)} identities from {len(names)} images, {g.index_type} index -> {args.gallery}")
    return 0


def _cmd_gallery_add(args: argparse.Namespace) -> int:
    from robustface.deploy.gallery import Gallery

    rec = _recognizer(args)
    g = Gallery.open(args.gallery, rec.info.to_dict())
    names, feats, images = _enrolment(args.enrol, rec, not args.quiet)
    before = len(g)
    skipped = g.add(names, feats, skip_enrolled=args.skip_enrolled, sources=images)
    added = counted(len(names) - skipped, "image")
    also = f" ({skipped} already enrolled, skipped)" if skipped else ""
    print(
        f"added {added}{also}, {counted(len(g) - before, 'new identity', 'new identities')}; "
        f"{len(g)} in all"
    )
    return 0


def _cmd_gallery_remove(args: argparse.Namespace) -> int:
    from robustface.deploy.gallery import Gallery

    g = Gallery.open(args.gallery)
    g.remove(args.names)
    print(f"removed {len(args.names)} identities; {len(g)} left")
    return 0


def _query_faces(queries: list[Path]) -> list[str]:
    from robustface.deploy.embed import open_inputs

    faces = []
    for q in queries:
        if q.is_file() and q.suffix.lower() in _IMAGE_SUFFIXES:
            faces.append(str(q))
            continue
        inputs = open_inputs(q)
        if inputs.kind not in ("folder", "list"):
            raise ValueError(f"{q}: search takes images, folders or lists, not a {inputs.kind}")
        base = inputs.path if inputs.kind == "folder" else inputs.path.parent
        faces += [str(base / r[0]) for r in inputs.rows]
    return faces


def _cmd_gallery_search(args: argparse.Namespace) -> int:
    from robustface.deploy.gallery import Gallery
    from robustface.utils.io import write_text_atomic

    rec = _recognizer(args)
    g = Gallery.open(args.gallery, rec.info.to_dict())
    threshold, how = _threshold(args, rec)
    faces = _query_faces(args.queries)
    result = g.search(
        rec.embed(faces, show_progress=not args.quiet),
        args.k,
        threshold,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
    )
    lines = ["query\trank\tidentity\tscore\taccepted"]
    for face, names, scores, ok in zip(
        faces, result.names, result.scores, result.accepted, strict=True
    ):
        lines += [
            f"{face}\t{r + 1}\t{n}\t{s:.6f}\t{int(bool(ok))}"
            for r, (n, s) in enumerate(zip(names, scores, strict=False))
        ]
    text = "\n".join(lines) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    if threshold is not None:
        print(
            f"{int((~result.accepted).sum())} of {counted(len(faces), 'query', 'queries')} "
            f"rejected as unknown at threshold {threshold:.4f} ({how})",
            file=sys.stderr,
        )
    return 0


def _add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index",
        choices=_INDEX_TYPES,
        default="auto",
        help=f"faiss index: auto = exact (flat) up to {_EXACT_MAX:,} identities, IVF above",
    )
    p.add_argument("--nlist", type=int, help="IVF lists (default: 4 sqrt(n))")
    p.add_argument("--hnsw-m", type=int, help="HNSW links per node (default: 32)")
    p.add_argument("--ef-construction", type=int, help="HNSW build breadth (default: 80)")


def _add_search_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nprobe", type=int, help="IVF lists searched (default: 64)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: 128)")


def add_deploy_parser(sub: Any) -> None:
    """Register ``embed``, ``verify`` and ``gallery`` on the ``robustface`` subparsers."""
    p = sub.add_parser("embed", help="embed a folder, list, .rec or IJB directory to .npy files")
    _add_model(p)
    p.add_argument(
        "inputs",
        type=Path,
        help="folder tree, list file (one path a line), .rec, or IJB-style directory",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--fp16", action="store_true", help="store embeddings as float16")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable inputs (listed in OUT/bad.tsv) instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("verify", help="compare two faces: score and same/different decision")
    _add_model(p)
    p.add_argument("a", type=Path, help="aligned face crop")
    p.add_argument("b", type=Path, help="aligned face crop")
    _add_threshold(p, "(accept when score >= T)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("gallery", help="enrol identities and search them (1:N, open set)")
    gsub = p.add_subparsers(dest="gallery_command", required=True, metavar="ACTION")
    enrol_help = (
        "folder tree IDENTITY/IMAGE, list of IDENTITY<TAB>PATH lines, or an `embed` output of a "
        "folder tree"
    )
    q = gsub.add_parser("build", help="create a gallery")
    _add_model(q)
    q.add_argument("gallery", type=Path, help="gallery directory")
    q.add_argument("enrol", type=Path, help=enrol_help)
    q.add_argument(
        "--aggregator",
        default="mean",
        choices=["mean", "norm_weighted", "caface"],
        help="fusion of an identity's images (caface needs styles: Python API only)",
    )
    _add_index_args(q)
    _add_search_params(q)
    q.add_argument("--overwrite", action="store_true", help="replace an existing gallery")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_gallery_build)

    q = gsub.add_parser("add", help="enrol more images (new identities or more of known ones)")
    _add_model(q)
    q.add_argument("gallery", type=Path, help="gallery directory")
    q.add_argument("enrol", type=Path, help=enrol_help)
    q.add_argument(
        "--skip-enrolled",
        action="store_true",
        help="leave out images already enrolled under the same identity, and count them (default: "
        "refuse the add, naming them)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_gallery_add)

    q = gsub.add_parser("remove", help="remove identities")
    q.add_argument("gallery", type=Path, help="gallery directory")
    q.add_argument("names", nargs="+", help="identities to remove")
    q.set_defaults(func=_cmd_gallery_remove)

    q = gsub.add_parser("search", help="top-k identities of query faces, with open-set rejection")
    _add_model(q)
    q.add_argument("gallery", type=Path, help="gallery directory")
    q.add_argument("queries", nargs="+", type=Path, help="images, folders or list files")
    q.add_argument("-k", "--k", type=int, default=5, help="identities per query")
    _add_threshold(q, "below which a query is rejected as unknown")
    _add_search_params(q)
    q.add_argument("--out", type=Path, help="write the results TSV here (default: stdout)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_gallery_search)
