"""Sub-center ArcFace's drop step: decisions against brute force, a planted toy, end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robustface.clean import (
    dominant_subcenter,
    drop_decisions,
    subcenter_assignments,
    subcenter_drop,
)
from robustface.cli import main
from robustface.data.recordio import RecordIODataset, unpack_record, write_flat_rec
from robustface.data.subset import dataset_keys
from robustface.errors import ParameterTypeError
from synth_configs import train_tiny


# --------------------------------------------------------------------------- brute force
def _brute_force(emb, labels, weight, k, threshold):
    """Per-sample loops in plain Python floats: (keep, angle, dominant, nearest)."""
    num_classes = weight.shape[0] // k
    nearest, cosines = [], []
    for x, y in zip(emb, labels, strict=True):
        x = x / np.linalg.norm(x)
        cos = []
        for i in range(k):
            w = weight[y * k + i]
            cos.append(float(np.dot(x, w / np.linalg.norm(w))))
        nearest.append(cos.index(max(cos)))  # first maximum
        cosines.append(cos)
    dominant = []
    for c in range(num_classes):
        counts = [sum(1 for n, y in zip(nearest, labels, strict=True) if y == c and n == i)
                  for i in range(k)]  # fmt: skip
        dominant.append(counts.index(max(counts)))
    angle = [math.degrees(math.acos(max(-1.0, min(1.0, cos[dominant[y]]))))
             for cos, y in zip(cosines, labels, strict=True)]  # fmt: skip
    keep = [a < threshold for a in angle]
    return np.array(keep), np.array(angle), np.array(dominant), np.array(nearest)


def test_dominant_subcenter_matches_loop_with_ties_and_empty_classes():
    rng = np.random.default_rng(0)
    k, num_classes = 3, 40
    labels = rng.integers(0, num_classes - 5, 150)  # the last 5 classes are empty
    nearest = rng.integers(0, k, 150)
    got = dominant_subcenter(nearest, labels, num_classes, k)
    for c in range(num_classes):
        counts = [int(np.sum((labels == c) & (nearest == i))) for i in range(k)]
        assert got[c] == counts.index(max(counts)), (c, counts)
    ties = dominant_subcenter(np.array([2, 1, 1, 2, 0]), np.array([0, 0, 0, 0, 1]), 3, 3)
    assert ties.tolist() == [1, 0, 0]  # class 0 ties 1 vs 2 -> 1; class 2 is empty -> 0


def test_drop_decisions_match_brute_force():
    rng = np.random.default_rng(1)
    k, num_classes, d = 3, 7, 6
    weight = rng.normal(size=(num_classes * k, d))
    weight[4 * k + 2] = weight[4 * k + 1]  # class 4: sub-centers 1 and 2 identical -> ties
    labels = rng.choice([0, 1, 2, 3, 4, 6], size=200)  # class 5 has no samples
    emb = rng.normal(size=(200, d)) * rng.uniform(0.5, 3.0, size=(200, 1))
    result = drop_decisions(emb, labels, weight, k, threshold_deg=80.0)
    keep, angle, dominant, nearest = _brute_force(emb, labels, weight, k, 80.0)
    np.testing.assert_allclose(result.angle_deg, angle, atol=1e-9)
    np.testing.assert_array_equal(result.nearest, nearest)
    np.testing.assert_array_equal(result.dominant, dominant)
    np.testing.assert_array_equal(result.keep, keep)
    assert 0 < keep.sum() < keep.size and dominant[5] == 0
    assert not np.any(result.nearest[labels == 4] == 2)  # ties go to the lower sub-center
    # strict inequality at the boundary
    i = int(np.argmax(result.keep))
    at = drop_decisions(emb, labels, weight, k, threshold_deg=float(result.angle_deg[i]))
    above = np.nextafter(result.angle_deg[i], 180.0)
    assert not at.keep[i] and drop_decisions(emb, labels, weight, k, float(above)).keep[i]
    # torch / float32 inputs and chunking give the same assignments
    near32, cos32 = subcenter_assignments(
        torch.from_numpy(emb).float(),
        torch.from_numpy(labels),
        torch.from_numpy(weight).float(),
        k,
        chunk=7,
    )
    assert cos32.dtype == np.float32
    np.testing.assert_array_equal(near32[labels != 4], nearest[labels != 4])
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 7\)"):
        drop_decisions(emb, np.full(200, 7), weight, k)
    with pytest.raises(ValueError, match="weight must be"):
        drop_decisions(emb, labels, weight[:-1], k)
    with pytest.raises(ParameterTypeError, match=r"k \(sub-centers per class\) must be an integer"):
        drop_decisions(emb, labels, weight, float(k))
    assert drop_decisions(emb, labels, weight, np.int64(k)).keep.shape == (200,)  # numpy ok
    with pytest.raises(ValueError, match=r"threshold_deg must be in \(0, 180\], got 0\.0"):
        drop_decisions(emb, labels, weight, k, threshold_deg=0.0)


def _toward(a: int, b: int, degrees: float, d: int = 4) -> np.ndarray:
    """Unit vector e_a rotated by ``degrees`` toward e_b."""
    v = np.zeros(d)
    v[a] += math.cos(math.radians(degrees))
    v[b] += math.sin(math.radians(degrees))
    return v


def test_planted_toy_exact_decisions():
    e = np.eye(4)
    weight = np.stack([
        e[0], _toward(0, 2, 40), e[3],      # class 0: dominant 0, a near one at 40 deg, a far one
        -e[0], e[1], e[2],                  # class 1: dominant 1
        e[2], e[3], -e[1],                  # class 2: no samples
    ])  # fmt: skip
    samples = [
        (_toward(0, 2, 10), 0),
        (_toward(0, 1, 10), 0),
        (e[0], 0),  # clean, near sub-center 0
        (_toward(0, 2, 40), 0),  # clean, nearest to sub-center 1, 40 deg from the dominant
        (_toward(1, 3, 20), 0),  # closed-set noise: really class 1
        (_toward(3, 2, 5), 0),  # open-set noise near the far sub-center
        (e[1], 1),
        (_toward(1, 3, 30), 1),
        (_toward(1, 3, 74), 1),  # clean
        (_toward(1, 3, 76), 1),  # just beyond 75 deg
        (e[0], 1),  # class 0 image labelled 1; ties between sub-centers 1 and 2 -> 1
    ]
    emb = np.stack([s for s, _ in samples]) * 7.0
    labels = np.array([y for _, y in samples])
    r = drop_decisions(emb, labels, weight, 3)
    assert r.keep.tolist() == [True] * 4 + [False] * 2 + [True] * 3 + [False] * 2
    assert r.nearest.tolist() == [0, 0, 0, 1, 2, 2, 1, 1, 1, 1, 1]
    assert r.dominant.tolist() == [0, 1, 0]
    expected = [10, 10, 0, 40, 90, 90, 0, 30, 74, 76, 90]
    np.testing.assert_allclose(r.angle_deg, expected, atol=1e-6)


# ----------------------------------------------------------------------------------- end to end
def _train(out: Path, data: Path, fc: str, *extra: str) -> Path:
    return train_tiny(out, data, "data.batch_size=8", f"fc.name={fc}", "fc.k=3", *extra)


@pytest.fixture(scope="module")
def noisy_run(synth_train_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the training set with a hand-written noise.npz, and a sub-center run on it."""
    root = tmp_path_factory.mktemp("clean")
    data = root / "data"
    shutil.copytree(synth_train_dir, data)
    # rewrite as a flat .rec in shuffled order, so the cleaned set (grouped by class) reorders it
    source = RecordIODataset(synth_train_dir)
    keys = dataset_keys(source)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(source))
    items = [unpack_record(source.reader.read(int(keys[i])))[::-1] for i in shuffled]
    write_flat_rec(data / "train.rec", [(payload, h.label) for payload, h in items])
    labels = RecordIODataset(data).labels
    np.testing.assert_array_equal(labels, source.labels[shuffled])
    kind = rng.choice(np.array([0, 0, 0, 1, 2], dtype=np.int8), size=labels.size)
    np.savez(
        data / "noise.npz",
        kind=kind,
        label=labels,
        original_label=np.where(kind == 1, (labels + 1) % 8, np.where(kind == 2, -1, labels)),
        source=(kind == 2).astype(np.int64),
        source_index=np.arange(labels.size),
        quality=rng.random(labels.size).astype(np.float32),
    )
    return _train(root / "run", data, "subcenter"), data


def _check_output(out: Path, data: Path, threshold: float) -> dict:
    """Every invariant of a drop output directory; returns drop.json."""
    z = np.load(out / "drop.npz")
    keep, labels, angle = z["keep"], z["labels"], z["angle_deg"]
    kept = np.load(out / "kept.npy")
    np.testing.assert_array_equal(kept, np.flatnonzero(keep))
    np.testing.assert_array_equal(keep & ~z["rescued"], angle < threshold)
    for c in range(8):  # a class with nothing below the threshold keeps its closest sample
        mine = np.flatnonzero(labels == c)
        if not np.any(angle[mine] < threshold):
            assert kept[np.isin(kept, mine)].tolist() == [mine[np.argmin(angle[mine])]]
    src, dst = RecordIODataset(data), RecordIODataset(out)
    assert len(dst) == kept.size and dst.num_classes == 8
    assert set(dst.labels.tolist()) == set(range(8))
    new = z["new_index"]
    assert sorted(new[kept].tolist()) == list(range(kept.size)) and np.all(new[~keep] == -1)
    src_keys, dst_keys = dataset_keys(src), dataset_keys(dst)
    for j in kept:
        a = unpack_record(src.reader.read(int(src_keys[j])))
        b = unpack_record(dst.reader.read(int(dst_keys[new[j]])))
        assert a[1] == b[1] and b[0].label == labels[j]
    noise_in, noise_out = np.load(data / "noise.npz"), np.load(out / "noise.npz")
    assert sorted(noise_out.files) == sorted(noise_in.files)
    for name in noise_in.files:
        np.testing.assert_array_equal(noise_out[name][new[kept]], noise_in[name][kept])
    np.testing.assert_array_equal(noise_out["label"], dst.labels)
    report = json.loads((out / "drop.json").read_text())
    kind, dropped = noise_in["kind"], ~keep
    tp = np.sum(dropped & (kind != 0))
    precision = tp / max(dropped.sum(), 1)
    recall = tp / np.sum(kind != 0)
    assert report["scores"]["noisy"]["precision"] == pytest.approx(precision)
    assert report["scores"]["noisy"]["recall"] == pytest.approx(recall)
    closed_recall = np.sum(dropped & (kind == 1)) / np.sum(kind == 1)
    assert report["scores"]["closed"]["recall"] == pytest.approx(closed_recall)
    closed_precision = np.sum(dropped & (kind == 1)) / max(np.sum(dropped & (kind <= 1)), 1)
    assert report["scores"]["closed"]["precision"] == pytest.approx(closed_precision)
    assert report["counts"]["open"]["dropped"] == np.sum(dropped & (kind == 2))
    assert report["counts"]["all"]["kept"] == kept.size
    for name in ("lfw.bin", "cfp_fp.bin", "verification.json", "drop_angles.png"):
        assert (out / name).is_file(), name
    return report


@pytest.mark.slow
def test_subcenter_drop_end_to_end(noisy_run, tmp_path, capsys):
    run, data = noisy_run
    out = tmp_path / "clean"
    report = subcenter_drop(run, out, progress=False)  # data: the run's own
    assert report.total == 64 and report.kept + report.dropped == 64
    summary = _check_output(out, data, 75.0)
    assert summary["data"] == str(data / "train.rec") and summary["threshold_deg"] == 75.0
    assert report.scores == summary["scores"] and report.counts == summary["counts"]
    assert not out.with_name("clean.partial").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        subcenter_drop(run, out, progress=False)
    # a threshold in the middle of the angles: some kept, some dropped, through the CLI
    median = float(np.median(np.load(out / "drop.npz")["angle_deg"]))
    args = ["clean", "subcenter-drop", str(run), "--out", str(out), "--quiet", "--overwrite"]
    assert main([*args, "--threshold", str(median), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "| closed" in printed and f"-> {out}" in printed
    summary = _check_output(out, data, median)
    assert 0 < summary["counts"]["all"]["dropped"] < 64


def test_subcenter_drop_refuses_other_classifiers(synth_train_dir, tmp_path, capsys):
    run = _train(tmp_path / "run", synth_train_dir, "full", "train.max_steps=1")
    with pytest.raises(ValueError, match=r"fc.name='full'.*fc.name: subcenter"):
        subcenter_drop(run, tmp_path / "out", progress=False)
    assert main(["clean", "subcenter-drop", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "fc.name='full'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
