"""1:1 verification with a threshold calibrated at a false-accept rate, recorded with the model.

**Score.** The cosine similarity of the two faces' embeddings (image + flip summed, then
normalised: the embeddings of ``eval verification``, whose squared distance is ``2 - 2 * score``).
A pair is accepted ("same person") when ``score >= threshold``.

**Calibration** (:func:`calibrate`). The pairs of a verification ``.bin`` are embedded as ``eval
verification`` embeds them and scored; the threshold is that of the ROC point with the highest
true-accept rate among those whose false-accept rate is at most ``far`` (the ``conservative``
reading of :class:`robustface.evaluate.roc.Roc`), over all pairs (no folds: the threshold is for
use, not for a cross-validated accuracy). A FAR below ``1 / impostor pairs`` is refused as not
measurable (:func:`robustface.evaluate.roc.far_measurable`).

**Record.** Calibrations are kept in ``calibration.json`` in a run directory, or in
``MODEL.calibration.json`` beside a ``.pth`` / ``.onnx``, with the model's fingerprint
(:func:`robustface.evaluate.report.model_fingerprint`) and each set's sha256. A record written for
other weights is never used: it is replaced by the next calibration.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from robustface.data.verification import load_bin_images
from robustface.deploy.recognizer import Recognizer, l2_normalize
from robustface.errors import DataFormatError
from robustface.evaluate.roc import Roc, far_measurable
from robustface.evaluate.verification import embed_pairs
from robustface.utils.guards import check_real
from robustface.utils.io import write_text_atomic

__all__ = [
    "calibrate",
    "calibration_file",
    "find_calibration",
    "missing_calibration",
    "pair_scores",
    "record_calibration",
]


def calibration_file(model_path: str | Path) -> Path:
    """Where the calibrations of a model are recorded (see the module docstring)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / "calibration.json"
    return model_path.with_name(model_path.name + ".calibration.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _scores(recognizer: Recognizer, images: np.ndarray) -> np.ndarray:
    """Cosine scores of the pairs (rows 2i, 2i+1) of ``images``, embedded as ``eval
    verification`` embeds them."""
    emb, _ = embed_pairs(
        images,
        recognizer.model,
        batch_size=recognizer.batch_size,
        flip=recognizer.info.flip,
        device=recognizer.device,
        input_size=recognizer.input_size,
    )
    unit = l2_normalize(emb).astype(np.float64)
    return np.sum(unit[0::2] * unit[1::2], axis=1)


def pair_scores(recognizer: Recognizer, bin_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, issame)`` of the pairs of a ``.bin``, embedded as ``eval verification`` does."""
    images, issame = load_bin_images(Path(bin_path))
    return _scores(recognizer, images), np.asarray(issame, dtype=bool)


def calibrate(recognizer: Recognizer, bin_path: str | Path, far: float) -> dict[str, Any]:
    """The threshold at false-accept rate ``far`` on the pairs of ``bin_path``, with what it
    gives there: ``threshold``, ``tar``, ``far_reached``, pair counts, the set's sha256. A FAR
    the set cannot measure is refused before anything is embedded."""
    check_real("far", far, 0, 1)
    bin_path = Path(bin_path)
    images, issame = load_bin_images(bin_path)
    issame = np.asarray(issame, dtype=bool)
    impostors = int(np.count_nonzero(~issame))
    if not far_measurable(far, impostors):
        least = f"FAR >= {1 / impostors:.3g} is" if impostors else "no FAR is"
        raise DataFormatError(
            bin_path,
            f"FAR {far:g} is not measurable with its {impostors} impostor pairs ({least}): "
            "choose a larger --far or a larger set",
        )
    roc = Roc.from_scores(_scores(recognizer, images), issame)
    point = int(roc.operating_points([far], mode="conservative")[0])
    threshold = float(roc.thresholds[point])
    if not np.isfinite(threshold):
        raise DataFormatError(
            bin_path, f"no threshold accepts at most a fraction {far:g} of its impostor pairs"
        )
    return {
        "set": str(bin_path.resolve()),
        "set_sha256": _sha256(bin_path),
        "far": float(far),
        "threshold": threshold,
        "tar": float(roc.tpr[point]),
        "far_reached": float(roc.fpr[point]),
        "genuine_pairs": roc.num_positives,
        "impostor_pairs": roc.num_negatives,
        "flip": recognizer.info.flip,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not a calibration record ({exc}); delete it") from None
    if not isinstance(record, dict) or not isinstance(record.get("entries"), list):
        raise DataFormatError(path, "not a calibration record (no entries); delete it")
    return record


def find_calibration(
    recognizer: Recognizer, far: float, bin_path: str | Path | None = None
) -> dict[str, Any] | None:
    """The recorded calibration of this model at ``far`` (on ``bin_path``, if given, and only if
    that file is unchanged), or None. A record written for other weights is ignored."""
    record = _read_record(calibration_file(recognizer.info.path))
    if record is None or record.get("model_sha256") != recognizer.info.sha256:
        return None
    set_sha = _sha256(Path(bin_path)) if bin_path is not None else None
    found = [
        e
        for e in record["entries"]
        if e.get("far") == float(far)
        and e.get("flip") == recognizer.info.flip
        and (set_sha is None or e.get("set_sha256") == set_sha)
    ]
    if len(found) > 1:
        sets = ", ".join(e["set"] for e in found)
        raise ValueError(
            f"calibrations at FAR {far:g} on several sets ({sets}): give --calibration"
        )
    return found[0] if found else None


def missing_calibration(recognizer: Recognizer, far: float) -> str:
    """Why :func:`find_calibration` found nothing at ``far`` (no set given), and what to do: a
    calibration made with the other flip setting is named, as it is not used."""
    path = calibration_file(recognizer.info.path)
    record = _read_record(path)
    flip = recognizer.info.flip
    other = (
        record is not None
        and record.get("model_sha256") == recognizer.info.sha256
        and any(
            e.get("far") == float(far) and e.get("flip") == (not flip) for e in record["entries"]
        )
    )
    if other:
        return (
            f"{path}: the calibration of {recognizer.info.path} at FAR {far:g} was made with "
            f"flip={str(not flip).lower()}, this run has flip={str(flip).lower()}: "
            f"{'give' if flip else 'drop'} --no-flip, or give --calibration SET.bin to calibrate "
            f"with flip={str(flip).lower()}"
        )
    return (
        f"no calibration of {recognizer.info.path} at FAR {far:g} in {path}: "
        "give --calibration SET.bin"
    )


def record_calibration(recognizer: Recognizer, entry: dict[str, Any]) -> Path:
    """Add ``entry`` to the model's record (replacing one for the same set, FAR and flip, and a
    whole record written for other weights); returns the file."""
    path = calibration_file(recognizer.info.path)
    record = _read_record(path)
    if record is None or record.get("model_sha256") != recognizer.info.sha256:
        record = {
            "model": recognizer.info.path,
            "model_sha256": recognizer.info.sha256,
            "entries": [],
        }
    same = ("set_sha256", "far", "flip")
    record["entries"] = [
        e for e in record["entries"] if any(e.get(k) != entry[k] for k in same)
    ] + [entry]
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path
