"""The cleaning loop: rounds end to end on a tiny dirty set, resume, emptied classes, configs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from robustface.clean import loop
from robustface.clean.dirty import TRUTH_KINDS, load_truth, make_dirty_synthface
from robustface.clean.evaluate import EXPECTED
from robustface.clean.loop import CleanConfig, clean_loop, remap_labels, write_cleaned
from robustface.clean.score import FLAGS
from robustface.cli import main
from robustface.config import ConfigError, load_config, to_dict
from robustface.data.recordio import RecordIODataset
from synth_configs import TINY_DIRTY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = [
    "base.data.batch_size=16",
    "base.data.num_workers=0",
    "base.data.val_targets=[]",
    "base.model.backbone=r18_tiny",
    "base.model.input_size=32",
    "base.model.width=0.125",
    "base.model.embedding_size=32",
    "base.head.params={scale: 16.0}",
    "base.optim.lr=0.05",
    "base.train.epochs=1",
    "base.train.tensorboard=false",
    "knn=5",
]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return make_dirty_synthface(root / "dirty", TINY_DIRTY, workers=1, progress=False).train


def _config(out, data, *extra):
    return load_config(None, [f"output_dir={out}", f"data={data}", *BASE, *extra], cls=CleanConfig)


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_loop_end_to_end_and_resume(dirty, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _config(out, dirty, "rounds=2", "min_change=0")
    # interrupt round 2 after its training: the rerun must not retrain round 1 or round 2
    calls = []
    real_score = loop.score_to_dir

    def crash_in_round_2(run_dir, *args, **kwargs):
        calls.append(str(run_dir))
        if "round_2" in str(run_dir):
            raise KeyboardInterrupt
        return real_score(run_dir, *args, **kwargs)

    monkeypatch.setattr(loop, "score_to_dir", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        clean_loop(cfg, progress=False)
    assert (out / "round_1" / "round.json").is_file()
    assert not (out / "round_2" / "round.json").exists()
    round_1 = _tree(out / "round_1")
    trained = (out / "round_2" / "train" / "train_results.json").read_bytes()
    monkeypatch.setattr(loop, "score_to_dir", real_score)
    summary = clean_loop(cfg, progress=False)
    assert _tree(out / "round_1") == round_1  # round 2 never touched round 1's set
    assert (out / "round_2" / "train" / "train_results.json").read_bytes() == trained
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # round 2 cleaned round 1's output, into its own directory
    r1, r2 = summary["rounds"]
    assert r2["input"] == r1["output"] and r2["input_samples"] == r1["samples"]
    assert r1["samples"] == 160 - r1["removed"]
    assert len(RecordIODataset(out / "round_2" / "data")) == r2["samples"]
    # the per-sample flags of the input set: the round each removed sample left in
    with open(out / "flags.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 160
    left = np.array([int(r["removed_in_round"]) for r in rows])
    assert (left == 1).sum() == r1["removed"] and (left == 2).sum() == r2["removed"]
    kept = np.load(out / "round_2" / "data" / "origin.npy")
    assert sorted(kept.tolist()) == np.flatnonzero(left == 0).tolist()
    # the truth follows the kept samples (by origin) with the new labels
    truth, final_truth = load_truth(dirty), load_truth(out / "round_2" / "data")
    np.testing.assert_array_equal(final_truth.kind, truth.kind[kept])
    final_labels = RecordIODataset(out / "round_2" / "data").labels
    np.testing.assert_array_equal(final_truth.label, final_labels)
    for name in ("report.md", "rounds.png", "rounds.json"):
        assert (out / name).is_file()
    assert "against the truth" in (out / "report.md").read_text()
    # rounds 1 and 2 together, against the original truth: the union of each round's flags
    assert "Rounds 1 to 2 together" in (out / "report.md").read_text()
    assert len(summary["cumulative"]) == 2
    flagged = np.zeros((160, len(FLAGS)), bool)
    origin = np.arange(160)
    for r in (1, 2):
        flagged[origin, np.load(out / f"round_{r}" / "score" / "scores.npz")["flag"]] = True
        origin = np.load(out / f"round_{r}" / "data" / "origin.npy")
    for name, expected in EXPECTED.items():
        is_kind = truth.kind == TRUTH_KINDS.index(name)
        hits = int(np.sum(is_kind & flagged[:, FLAGS.index(expected)]))
        assert summary["cumulative"][1][name]["flagged"] == flagged[:, FLAGS.index(expected)].sum()
        if is_kind.any():
            assert summary["cumulative"][1][name]["recall"] == pytest.approx(hits / is_kind.sum())
    assert summary["cumulative"][1]["removal"]["flagged"] == int((left > 0).sum())
    # a finished run is read back without retraining; another config is refused
    again = clean_loop(cfg, progress=False)
    assert again["rounds"] == summary["rounds"]
    with pytest.raises(ValueError, match="another config"):
        clean_loop(_config(out, dirty, "rounds=3"), progress=False)


def test_another_config_in_the_output_dir_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "run"
    loop._check_same_config(out, _config(out, "data", "rounds=2"))
    loop._check_same_config(out, _config(out, "data", "rounds=2"))  # the same config: resumes
    with pytest.raises(ValueError) as info:
        loop._check_same_config(out, _config(out, "data", "rounds=3", "knn=7"))
    assert str(info.value) == (
        f"{out} holds a cleaning run with another config ({out / 'clean_config.yaml'}: knn: run "
        "5, now 7; rounds: run 2, now 3); resume it with that config or choose another output_dir"
    )


def test_a_run_written_before_a_key_existed_or_with_another_dir_spelling_resumes(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    loop._check_same_config(Path("run"), _config("run", "data", "rounds=2"))
    file = tmp_path / "run" / loop.CONFIG_FILE
    saved = yaml.safe_load(file.read_text())
    default = to_dict(CleanConfig())
    dropped = next(k for k, v in saved.items() if k != "output_dir" and v == default[k])
    del saved[dropped]  # an older version's file: the key takes its default
    file.write_text(yaml.safe_dump(saved, sort_keys=False))
    loop._check_same_config(tmp_path / "run", _config(tmp_path / "run", "data", "rounds=2"))
    with pytest.raises(ValueError, match=r"clean_config\.yaml: rounds: run 2, now 3\)"):
        loop._check_same_config(Path("run"), _config("run", "data", "rounds=3"))


def test_emptied_class_is_removed_and_reported(dirty, tmp_path):
    dataset = RecordIODataset(dirty)
    labels = dataset.labels
    keep = labels != 2  # class 2 loses every sample
    summary = write_cleaned(
        dirty, tmp_path / "out", keep, labels.copy(), np.arange(len(labels)), {"round": 1}
    )
    assert summary["emptied_classes"] == [2] and summary["classes"] == 7
    rows = (tmp_path / "out" / "label_map.csv").read_text().splitlines()
    assert rows[0] == "old_label,new_label" and rows[3] == "2,-1" and rows[4] == "3,2"
    new = RecordIODataset(tmp_path / "out")
    assert new.num_classes == 7 and sorted(set(new.labels.tolist())) == list(range(7))
    origin = np.load(tmp_path / "out" / "origin.npy")
    _, mapping = remap_labels(labels[keep], 8)
    np.testing.assert_array_equal(new.labels, mapping[labels[origin]])
    assert json.loads((tmp_path / "out" / "cleaned.json").read_text())["emptied_classes"] == [2]
    with pytest.raises(ValueError, match="every sample"):
        write_cleaned(dirty, tmp_path / "none", np.zeros(len(labels), bool), labels,
                       np.arange(len(labels)), {})  # fmt: skip


def test_bad_configs_are_clear_errors(dirty, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"thresholds\.angle_own: an angle in \[0, 180\]"):
        _config(tmp_path / "o", dirty, "thresholds={angle_own: 200}")
    with pytest.raises(ConfigError, match=r"thresholds\.angel: unknown"):
        _config(tmp_path / "o", dirty, "thresholds={angel: 20}")
    with pytest.raises(ConfigError, match=r"thresholds\.skin_low: a share in \[0, 1\], got 2"):
        _config(tmp_path / "o", dirty, "thresholds={skin_low: 2}")
    with pytest.raises(ConfigError, match=r"thresholds\.colour_low \(5\) must be <= "):
        _config(tmp_path / "o", dirty, "thresholds={colour_low: 5, colour_high: 1}")
    with pytest.raises(ConfigError, match=r"knn_params\.nlist does not apply"):
        _config(tmp_path / "o", dirty, "knn_method=hnsw", "knn_params={nlist: 64}")
    with pytest.raises(ConfigError, match="rounds: must be >= 1"):
        _config(tmp_path / "o", dirty, "rounds=0")
    with pytest.raises(ConfigError, match="data: the training set"):
        load_config(None, [], cls=CleanConfig)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {dirty}\nmin_change: 2\n")
    assert main(["clean", "run", str(config)]) == 2
    assert "min_change: must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_relabel_keeps_confident_mislabels_and_merges_duplicates(tmp_path):
    code = {name: i for i, name in enumerate(loop.FLAGS)}
    flag = np.array([code[f] for f in ("clean", "mislabeled", "mislabeled", "open_set", "hard",
                                       "sketch", "clean")], np.int8)  # fmt: skip
    suggested = np.array([-1, 2, -1, -1, -1, -1, -1])
    labels = np.array([0, 0, 1, 1, 3, 3, 3])
    np.savez(tmp_path / "scores.npz", flag=flag, suggested=suggested)
    (tmp_path / "score.json").write_text(json.dumps({"merges": [[1, 3, 0.99]]}))
    cfg = CleanConfig(data="x", action="relabel")
    keep, new, counts = loop._clean_decisions(cfg, tmp_path, labels)
    # row 1 moves to class 2; row 2 (no suggestion), 3 and 5 leave; class 3 merges into 1
    assert keep.tolist() == [True, True, False, False, True, False, True]
    assert new[keep].tolist() == [0, 2, 1, 1]
    assert counts == {"removed": 3, "relabelled": 1, "merged": 2, "changed": 6, "change": 6 / 7}
    keep, new, counts = loop._clean_decisions(CleanConfig(data="x"), tmp_path, labels)
    assert keep.tolist() == [True, False, False, False, True, False, True]
    assert np.array_equal(new, labels) and counts["changed"] == 4
