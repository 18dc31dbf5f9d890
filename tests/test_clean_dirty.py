"""The dirty SynthFace set: exact proportions and a truth list that matches the written records."""

import json
import math

import numpy as np
import pytest

from robustface.clean.dirty import (
    DIRTY_PRESETS,
    HARD_QUALITY,
    TRUTH_KINDS,
    DirtySpec,
    load_truth,
    make_dirty_synthface,
)
from robustface.config import SynthConfig
from robustface.data.noise import load_noise_list, plan_label_noise
from robustface.data.recordio import IndexedRecordReader, RecordIODataset, unpack_record
from robustface.data.synth import builder

SMALL = SynthConfig(
    identities=12,
    images_per_identity=10,
    open_set_identities=5,
    open_set_images_per_identity=4,
    test_identities=20,
    lfw_pairs=20,
    cfp_fp_pairs=20,
    lowq_pairs=20,
    ijb_identities=0,
    image_size=48,
)
SPEC = DirtySpec(closed=0.2, open=0.1, low_quality=0.05, sketch=0.1, nonface=0.05, duplicate=0.25)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    out = tmp_path_factory.mktemp("dirty") / "d"
    return make_dirty_synthface(out, SMALL, SPEC, workers=1, progress=False)


def _records(path):
    """(header, image bytes) of the image records (keys 1..N; identity records follow them)."""
    reader = IndexedRecordReader(path)
    return [unpack_record(reader.read(k)) for k in range(1, len(RecordIODataset(path)) + 1)]


def test_proportions_are_exact(dirty):
    n, c, per = 120, 12, 10
    manifest = json.loads((dirty.source / "manifest.json").read_text())["samples"]
    kinds = np.asarray(manifest["kind"])
    # image kinds: round(N * fraction) over the whole set
    assert (kinds == "sketch").sum() == round(n * 0.1) == 12
    assert (kinds == "nonface").sum() == round(n * 0.05) == 6
    assert (kinds == "low_quality").sum() == round(n * 0.05) == 6
    # label noise: floor(n_c * rate) per class, among the class's plain faces
    faces = np.bincount(np.repeat(np.arange(c), per)[kinds == "face"], minlength=c)
    want_open = np.minimum(math.floor(per * 0.1), faces)
    want_closed = np.minimum(want_open + math.floor(per * 0.2), faces) - want_open
    counts = dirty.truth.counts()
    assert counts["sketch"] == 12 and counts["nonface"] == 6 and counts["low_quality"] == 6
    assert counts["open"] == want_open.sum()
    # a flip onto the other label of one's own person is not a mislabel (counted as such)
    plan = load_noise_list(dirty.train)
    assert (plan.kind == 1).sum() == want_closed.sum()
    assert counts["closed"] <= want_closed.sum()
    # duplicate classes: round(C * 0.25) = 3, each the person of another class
    dup = dirty.truth.duplicate_of
    assert (dup >= 0).sum() == 3 and set(np.flatnonzero(dup >= 0)) == {9, 10, 11}
    assert all(0 <= o < 9 for o in dup[dup >= 0])
    assert sum(counts[k] for k in TRUTH_KINDS) == n


def test_truth_matches_the_records(dirty):
    truth = load_truth(dirty.train)
    plan = load_noise_list(dirty.train)
    manifest = json.loads((dirty.source / "manifest.json").read_text())["samples"]
    src_records = _records(dirty.source / "train.rec")
    open_records = _records(dirty.source / "open_set" / "open_set.rec")
    written = _records(dirty.train / "train.rec")
    labels = RecordIODataset(dirty.train).labels
    assert np.array_equal(truth.label, labels)
    for i, (_header, image) in enumerate(written):
        kind = TRUTH_KINDS[truth.kind[i]]
        if kind == "open":
            assert image == open_records[plan.source_index[i]][1]
            assert truth.true_label[i] == -1
            continue
        s = plan.source_index[i]
        assert image == src_records[s][1]
        source_label = manifest["label"][s]
        person = truth.duplicate_of[source_label]
        person = source_label if person < 0 else person
        if kind in ("sketch", "nonface", "low_quality"):
            assert manifest["kind"][s] == kind and labels[i] == source_label
        else:
            assert manifest["kind"][s] == "face"
        canon = truth.duplicate_of[labels[i]]
        canon = labels[i] if canon < 0 else canon
        if kind == "closed":
            assert person != canon
        if kind in ("clean", "duplicate"):
            assert canon == person  # the label names the person shown (either of its labels)
            assert (kind == "duplicate") == (truth.duplicate_of[labels[i]] >= 0)
        assert truth.true_label[i] == (-1 if kind == "nonface" else person)
    assert np.array_equal(truth.hard, (truth.kind == 0) & (truth.quality < HARD_QUALITY))
    csv_rows = (dirty.train / "truth.csv").read_text().splitlines()
    assert len(csv_rows) == 121 and csv_rows[0].startswith("index,kind,label")


def test_duplicate_class_shows_its_original_person_in_other_images(dirty):
    manifest = json.loads((dirty.source / "manifest.json").read_text())["samples"]
    identity, label = np.asarray(manifest["identity"]), np.asarray(manifest["label"])
    records = _records(dirty.source / "train.rec")
    for dup, orig in enumerate(dirty.truth.duplicate_of):
        if orig < 0:
            continue
        assert set(identity[label == dup]) == set(identity[label == orig])
        a = {records[i][1] for i in np.flatnonzero(label == dup)}
        b = {records[i][1] for i in np.flatnonzero(label == orig)}
        assert not a & b


def test_label_noise_stays_on_eligible_samples():
    labels = np.repeat(np.arange(5), 10)
    eligible = np.ones(50, bool)
    eligible[[0, 1, 2, 3, 4, 5, 6, 7, 12]] = False  # class 0 keeps only 2 eligible samples
    plan = plan_label_noise(labels, 0.3, 0.1, open_pool=100, seed=1, eligible=eligible)
    assert not np.any(plan.kind[~eligible])
    noisy = np.bincount(labels[plan.kind > 0], minlength=5)
    assert noisy.tolist() == [2, 4, 4, 4, 4]
    same = plan_label_noise(labels, 0.3, 0.1, open_pool=100, seed=1)
    every = plan_label_noise(labels, 0.3, 0.1, open_pool=100, seed=1, eligible=np.ones(50, bool))
    assert np.array_equal(same.kind, every.kind) and np.array_equal(same.label, every.label)


def test_train_kinds_are_exact_counts():
    cfg = SynthConfig(sketch_fraction=0.1, nonface_fraction=0.2, lowq_fraction=0.3)
    kinds = builder._train_kinds(cfg, 1000)
    assert np.bincount(kinds, minlength=4).tolist() == [400, 100, 200, 300]


def test_presets_and_bad_specs():
    seed = DIRTY_PRESETS["MS1MCON-0.20"]
    assert (seed.closed, seed.open, seed.sketch, seed.duplicate) == (0.15, 0.05, 0, 0)
    with pytest.raises(ValueError, match="closed"):
        DirtySpec(closed=1.5)
    with pytest.raises(ValueError, match="duplicate"):
        DirtySpec(duplicate=0.6)
    with pytest.raises(ValueError, match="unknown dirty preset"):
        make_dirty_synthface("unused", SMALL, "nope")
    assert "duplicate_fraction" in " ".join(SynthConfig(duplicate_fraction=0.7).check())


def test_a_noise_list_is_read_as_the_truth_of_its_three_kinds(tmp_path, capsys):
    """``robustface noise``'s list as a cleaning truth (``clean evaluate --truth``, and beside a
    scored set): its kinds, true labels and hard clean samples; nothing else is known."""
    from robustface.clean.dirty import Truth
    from robustface.clean.evaluate import evaluate_flags, evaluation_table
    from robustface.cli import main
    from robustface.data.noise import NoisePlan, save_noise_list

    save_noise_list(
        NoisePlan(kind=[0, 1, 2, 0, 0, 1], label=[0, 0, 1, 1, 2, 2],
                  original_label=[0, 1, -1, 1, 2, 0], source=[0, 0, 1, 0, 0, 0],
                  source_index=[0, 1, 0, 3, 4, 5], quality=[0.5, 0.9, 0.3, 0.01, 0.8, 0.2]),
        tmp_path / "noise.npz",
    )  # fmt: skip
    want = Truth(
        kind=np.array([0, 1, 2, 0, 0, 1]),  # TRUTH_KINDS codes: clean, closed, open
        label=np.array([0, 0, 1, 1, 2, 2]),
        true_label=np.array([0, 1, -1, 1, 2, 0]),
        identity=np.full(6, -1),
        quality=np.array([0.5, 0.9, 0.3, 0.01, 0.8, 0.2], np.float32),
        hard=np.array([False, False, False, True, False, False]),  # clean, quality < 0.02
        duplicate_of=np.full(3, -1),
    )
    assert TRUTH_KINDS[:3] == ("clean", "closed", "open") and HARD_QUALITY == 0.02
    for path in (tmp_path, tmp_path / "noise.npz"):  # the directory or the file
        got = load_truth(path)
        for name in ("kind", "label", "true_label", "identity", "quality", "hard", "duplicate_of"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    flags = ["clean", "mislabeled", "mislabeled", "hard", "open_set", "clean"]
    rows = [f"{i},0,{f},,-1" for i, f in enumerate(flags)]
    (tmp_path / "flags.csv").write_text("index,label,flag,reason,suggested\n" + "\n".join(rows))
    assert main(["clean", "evaluate", str(tmp_path / "flags.csv"), "--truth", str(tmp_path)]) == 0
    code = np.array([["clean", "hard", "mislabeled", "open_set"].index(f) for f in flags])
    result = evaluate_flags(code, np.full(6, -1), want)
    assert capsys.readouterr().out == evaluation_table(result) + "\n"
    # by hand: closed {1, 5}, flagged mislabeled {1, 2}; noisy {1, 2, 5}, removed {1, 2, 4}
    assert (result["closed"]["precision"], result["closed"]["recall"]) == (0.5, 0.5)
    assert result["removal"]["precision"] == result["removal"]["recall"] == 2 / 3
    assert result["clean"]["kept"] == 2 / 3 and result["clean"]["hard_kept"] == 1.0
