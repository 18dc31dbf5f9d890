"""Per-sample scores against brute force, thresholds without the truth, flags on planted cases,
precision/recall against hand counts."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from robustface.clean.dirty import Truth, load_truth, make_dirty_synthface
from robustface.clean.evaluate import evaluate_flags, evaluation_table
from robustface.clean.score import (
    FLAGS,
    Scores,
    Thresholds,
    choose_thresholds,
    compute_scores,
    flag_samples,
    gmm_crossing,
    knn_settings,
    merge_candidates,
    read_flags_csv,
    score_to_dir,
    split_candidates,
)
from robustface.cli import main
from robustface.config import load_config
from robustface.errors import DataFormatError
from robustface.train import Trainer
from synth_configs import TINY_DIRTY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3])
def test_scores_match_brute_force(k):
    rng = np.random.default_rng(k)
    n, c, d, knn = 60, 5, 8, 4
    emb = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    weight = rng.normal(size=(c * k, d)).astype(np.float32)
    norms = rng.uniform(1, 9, n)
    s = compute_scores(emb, labels, weight, k, norms=norms, knn=knn)
    e, w = _unit(emb.astype(np.float64)), _unit(weight.astype(np.float64))
    cos = e @ w.T  # (n, c*k)
    # dominant sub-centre: the one most of the class's samples are nearest to (ties: lowest)
    nearest = [int(np.argmax(cos[i, labels[i] * k : labels[i] * k + k])) for i in range(n)]
    for i in range(n):
        votes = [sum(1 for j in range(n) if labels[j] == labels[i] and nearest[j] == m)
                 for m in range(k)]  # fmt: skip
        dom = int(np.argmax(votes))
        own = cos[i, labels[i] * k + dom]
        others = [(max(cos[i, cc * k : cc * k + k]), cc) for cc in range(c) if cc != labels[i]]
        best, best_class = max(others, key=lambda t: (t[0], -t[1]))
        assert s.angle_own[i] == pytest.approx(np.degrees(np.arccos(own)), abs=1e-3)
        assert s.angle_other[i] == pytest.approx(np.degrees(np.arccos(best)), abs=1e-3)
        assert s.other_class[i] == best_class
        assert s.crfiqa[i] == pytest.approx(own / (best + 1.0), rel=1e-4)
        sims = e @ e[i]
        sims[i] = -np.inf
        nbrs = np.argsort(-sims, kind="stable")[:knn]
        assert s.knn_purity[i] == pytest.approx(np.mean(labels[nbrs] == labels[i]))
        counts = collections.Counter(labels[nbrs].tolist())
        top = max(counts.values())
        assert s.knn_label[i] == min(lab for lab, v in counts.items() if v == top)
        assert s.knn_share[i] == pytest.approx(top / knn)
    np.testing.assert_allclose(s.norm, norms, rtol=1e-6)
    np.testing.assert_allclose(s.margin, s.angle_other - s.angle_own)


def _clustered(n, c, d, seed=0):
    """Unit embeddings near ``c`` random centres, a tenth of the labels replaced at random."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(c, d)))
    truth = rng.integers(0, c, n)
    emb = (centres[truth] + 0.4 * rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
    labels = np.where(rng.random(n) < 0.1, rng.integers(0, c, n), truth)
    return emb, labels, centres.astype(np.float32)


def test_ivf_probing_every_list_matches_flat():
    emb, labels, centres = _clustered(1500, 12, 16)
    flat = compute_scores(emb, labels, centres, knn=8, knn_method="flat")
    ivf = compute_scores(emb, labels, centres, knn=8, knn_method="ivf",
                         knn_params={"nlist": 8, "nprobe": 8})  # fmt: skip
    auto = compute_scores(emb, labels, centres, knn=8)  # 1,500 < 200K: exact
    for other in (ivf, auto):
        np.testing.assert_array_equal(other.knn_purity, flat.knn_purity)
        np.testing.assert_array_equal(other.knn_label, flat.knn_label)
        np.testing.assert_array_equal(other.knn_share, flat.knn_share)
    assert 0.5 < flat.knn_purity.mean() < 0.95  # the planted noise shows
    # one probed list of 8 misses neighbours: the purity then differs somewhere
    one = compute_scores(emb, labels, centres, knn=8, knn_method="ivf",
                         knn_params={"nlist": 8, "nprobe": 1})  # fmt: skip
    assert not np.array_equal(one.knn_purity, flat.knn_purity)


def test_knn_settings_choice_and_errors():
    assert knn_settings(199_999) == ("flat", {})
    assert knn_settings(200_000, "auto", {"nprobe": 16, "hnsw_m": 8}) == ("ivf", {"nprobe": 16})
    assert knn_settings(10, "hnsw", {"ef_search": 64}) == ("hnsw", {"ef_search": 64})
    emb, labels, centres = _clustered(100, 4, 8)
    with pytest.raises(ValueError, match="knn_method must be one of"):
        compute_scores(emb, labels, centres, knn_method="kmeans")
    with pytest.raises(ValueError, match=r"knn_params\.nprobe"):
        compute_scores(emb, labels, centres, knn_method="ivf", knn_params={"nprobe": 0})
    with pytest.raises(ValueError, match=r"knn_params\.nprobe does not apply to knn_method 'flat'"):
        compute_scores(emb, labels, centres, knn_method="flat", knn_params={"nprobe": 4})
    with pytest.raises(ValueError, match="unknown parameter 'probes'"):
        compute_scores(emb, labels, centres, knn_params={"probes": 4})


def test_missing_neighbours_elect_no_label(monkeypatch):
    import robustface.cluster.knn as knn_module

    labels = np.array([0, 0, 1, 1])
    nbrs = np.array([[0, 1, -1], [1, -1, -1], [2, 0, 3], [3, -1, -1]])
    sims = np.where(nbrs >= 0, 1.0, -np.inf).astype(np.float32)
    monkeypatch.setattr(knn_module, "build_knn", lambda *a, **kw: knn_module.KnnGraph(nbrs, sims))
    emb = np.eye(4, dtype=np.float32)
    s = compute_scores(emb, labels, np.eye(4, dtype=np.float32)[:2], knn=2)
    assert s.knn_purity.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert s.knn_label.tolist() == [0, -1, 0, -1]  # ties go to the lower label
    assert s.knn_share.tolist() == [0.5, 0.0, 0.5, 0.0]


def test_gmm_crossing_finds_the_gap_and_refuses_one_mode():
    rng = np.random.default_rng(0)
    bulk, tail = rng.normal(30, 4, 900), rng.normal(80, 6, 100)
    t = gmm_crossing(np.concatenate([bulk, tail]))
    assert 40 < t < 65
    assert gmm_crossing(rng.normal(30, 4, 1000)) is None
    assert gmm_crossing(np.ones(50)) is None and gmm_crossing(np.arange(5.0)) is None


def _planted() -> tuple[Scores, Thresholds]:
    """One sample per rule, in FLAGS order, and thresholds that make each fire."""
    rows = {
        # (angle_own, angle_other, knn_label, knn_share, norm, stroke)
        "clean": (20, 70, 0, 0.9, 10, 2.0),
        "hard": (40, 70, 0, 0.9, 10, 2.0),
        "mislabeled": (80, 25, 3, 0.8, 10, 2.0),
        "open_set": (80, 70, 5, 0.3, 10, 2.0),
        "low_quality": (25, 70, 0, 0.9, 2, 2.0),
        "nonface": (100, 95, 4, 0.3, 10, 2.0),
        "sketch": (30, 60, 0, 0.9, 10, 4.5),
    }
    values = np.array(list(rows.values()), dtype=np.float64)
    n = len(rows)
    scores = Scores(
        label=np.zeros(n, np.int64),
        angle_own=values[:, 0].astype(np.float32),
        angle_other=values[:, 1].astype(np.float32),
        other_class=np.full(n, 3),
        knn_purity=np.zeros(n, np.float32),
        knn_label=values[:, 2].astype(np.int64),
        knn_share=values[:, 3].astype(np.float32),
        norm=values[:, 4].astype(np.float32),
        crfiqa=np.zeros(n, np.float32),
        stroke=values[:, 5].astype(np.float32),
    )
    t = Thresholds(angle_own=60, angle_hard=35, angle_member=30, angle_any=90, norm_low=5,
                   norm_floor=4, stroke=4.0, stroke_soft=3.0, knn_share=0.5)  # fmt: skip
    return scores, t


def test_each_flag_on_a_planted_case():
    scores, t = _planted()
    flags = flag_samples(scores, t)
    assert flags.names().tolist() == list(FLAGS)
    assert flags.suggested.tolist() == [-1, -1, 3, -1, -1, -1, -1]
    assert flags.removed.tolist() == [False, False, True, True, True, True, True]
    # an off-centre sample with a low norm is low quality, not open-set
    scores.norm[3] = 3
    assert flag_samples(scores, t).names()[3] == "low_quality"
    # the kNN majority alone names a mislabel when it is also the nearest other class
    scores.angle_other[2] = 70
    flags = flag_samples(scores, t)
    assert flags.names()[2] == "mislabeled" and flags.suggested[2] == 3
    scores.other_class[2] = 4
    assert flag_samples(scores, t).names()[2] == "open_set"


def test_thresholds_out_of_range_are_clear_errors():
    scores, _ = _planted()
    with pytest.raises(ValueError, match=r"thresholds\.angle_own"):
        choose_thresholds(scores, {"angle_own": 200})
    with pytest.raises(ValueError, match=r"angle_hard .* must be <= .*angle_own"):
        choose_thresholds(scores, {"angle_own": 30, "angle_hard": 50, "angle_member": 20})
    with pytest.raises(ValueError, match="unknown threshold 'angel_own'") as info:
        choose_thresholds(scores, {"angel_own": 30})
    assert str(info.value).endswith("norm_floor, stroke, stroke_soft, knn_share")
    with pytest.raises(ValueError, match=r"thresholds\.knn_share"):
        choose_thresholds(scores, {"knn_share": 1.5})


def test_merge_and_split_candidates_on_planted_classes():
    rng = np.random.default_rng(0)
    d, per, c_all = 16, 10, 30
    centres = _unit(rng.normal(size=(c_all, d)))
    centres[5] = centres[2]  # class 5 is class 2's person
    emb, labels = [], []
    for c in range(c_all):
        emb.append(centres[c] + 0.05 * rng.normal(size=(per, d)))
        labels += [c] * per
    # class 0 holds two people: half its samples sit around a far direction
    far = _unit(rng.normal(size=(1, d)))[0]
    emb[0][: per // 2] = far + 0.05 * rng.normal(size=(per // 2, d))
    emb, labels = _unit(np.concatenate(emb)).astype(np.float32), np.asarray(labels)
    merges, min_cos = merge_candidates(emb, labels, c_all)
    assert [(a, b) for a, b, _ in merges] == [(2, 5)] and 0.5 <= min_cos < 1
    splits = split_candidates(emb, labels, c_all)
    assert [c for c, _, _ in splits] == [0]
    assert splits[0][2] == pytest.approx(0.5)


def test_precision_recall_against_hand_counts():
    #         clean clean closed closed open lowq sketch nonface dup  clean(hard)
    kind = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 0], np.int8)
    flag_names = ["clean", "mislabeled", "mislabeled", "open_set", "open_set",
                  "clean", "sketch", "sketch", "hard", "hard"]  # fmt: skip
    flag = np.array([FLAGS.index(f) for f in flag_names], np.int8)
    suggested = np.array([-1, 4, 7, -1, -1, -1, -1, -1, -1, -1])
    truth = Truth(
        kind=kind,
        label=np.zeros(10, np.int64),
        true_label=np.array([0, 0, 7, 2, -1, 0, 0, -1, 1, 0]),
        identity=np.zeros(10, np.int64),
        quality=np.ones(10, np.float32),
        hard=np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool),
        duplicate_of=np.array([-1, -1, -1, -1, -1, -1, -1, -1, 1]),
    )
    r = evaluate_flags(flag, suggested, truth, merges=[(1, 8, 0.9), (2, 3, 0.8)])
    # closed: flagged mislabeled 2 (one clean, one closed) -> P 1/2; 2 closed, 1 found -> R 1/2
    assert (r["closed"]["precision"], r["closed"]["recall"]) == (0.5, 0.5)
    assert r["closed"]["removed"] == 1.0  # the other is removed as open_set
    # open: open_set flagged 2 (closed, open) -> P 1/2, R 1/1
    assert (r["open"]["precision"], r["open"]["recall"]) == (0.5, 1.0)
    assert (r["low_quality"]["recall"], r["low_quality"]["removed"]) == (0.0, 0.0)
    assert (r["sketch"]["precision"], r["sketch"]["recall"]) == (0.5, 1.0)
    assert (r["nonface"]["recall"], r["nonface"]["removed"]) == (0.0, 1.0)
    # removal: removed 6 (rows 1,2,3,4,6,7), noisy 6 (rows 2..7), both 5
    assert r["removal"]["precision"] == pytest.approx(5 / 6)
    assert r["removal"]["recall"] == pytest.approx(5 / 6)
    assert r["clean"]["kept"] == pytest.approx(2 / 3) and r["clean"]["hard_kept"] == 1.0
    assert r["suggested_class"] == {"detected": 1, "correct": 1.0}
    assert r["merge"] == {"pairs": 1, "proposed": 2, "precision": 0.5, "recall": 1.0}


# ----------------------------------------------------------------------------------- end to end
def _train(out: Path, data: Path, *extra: str) -> Path:
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "data.source=rec",
            f"data.path={data}",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.val_targets=[]",
            "model.backbone=r18_tiny",
            "model.input_size=32",
            "model.width=0.125",
            "model.embedding_size=32",
            "head.name=arcface",
            "head.params={scale: 16.0}",
            "optim.lr=0.05",
            "train.epochs=1",
            "train.progress=false",
            "train.tensorboard=false",
            *extra,
        ],
    )
    Trainer(cfg).fit()
    return out


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    info = make_dirty_synthface(root / "dirty", TINY_DIRTY, workers=1, progress=False)
    return _train(root / "run", info.train), info.train


@pytest.mark.slow
def test_flags_do_not_depend_on_the_truth(dirty_run, tmp_path, capsys):
    run, data = dirty_run
    first = score_to_dir(run, tmp_path / "a", knn=5, progress=False)
    assert "evaluation" in first and (tmp_path / "a" / "evaluation.md").is_file()
    # shuffle the truth list in place: the flags must not change, only their evaluation
    truth = load_truth(data)
    original = (data / "truth.npz").read_bytes()
    perm = np.random.default_rng(0).permutation(len(truth))
    try:
        truth.take(perm).save(data)
        second = score_to_dir(run, tmp_path / "b", knn=5, progress=False)
    finally:
        (data / "truth.npz").write_bytes(original)
    a = (tmp_path / "a" / "flags.csv").read_text()
    assert a == (tmp_path / "b" / "flags.csv").read_text()
    assert first["thresholds"] == second["thresholds"]
    flag, suggested = read_flags_csv(tmp_path / "a" / "flags.csv", len(truth))
    assert flag.tolist() == np.load(tmp_path / "a" / "scores.npz")["flag"].tolist()
    again = evaluate_flags(flag, suggested, truth, [tuple(m) for m in first["merges"]])
    saved = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(again, sort_keys=True)  # NaN-safe
    # the CLI: score, evaluate, bad thresholds and mismatched flags files
    assert main(["clean", "score", str(run), "--out", str(tmp_path / "c"), "--quiet",
                 "--knn", "5"]) == 0  # fmt: skip
    assert "| mislabeled" in capsys.readouterr().out
    assert main(["clean", "evaluate", str(tmp_path / "c"), "--truth", str(data)]) == 0
    assert "| closed" in capsys.readouterr().out
    args = ["clean", "score", str(run), "--out", str(tmp_path / "d"), "--quiet"]
    assert main([*args, "--threshold", "angle_own=200"]) == 2
    assert "thresholds.angle_own" in capsys.readouterr().err
    assert main([*args, "--knn-method", "flat", "--knn-param", "nprobe=4"]) == 2
    assert "knn_params.nprobe does not apply" in capsys.readouterr().err
    assert main([*args, "--knn-param", "nprobe=many"]) == 2
    assert "--knn-param nprobe: not an integer" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(a.splitlines()[:5]) + "\n")
    with pytest.raises(DataFormatError, match="has 4 rows but the set has 160"):
        read_flags_csv(short, len(truth))
    assert main(["clean", "evaluate", str(short), "--truth", str(data)]) == 2


def test_nothing_flagged_prints_n_a_not_nan():
    kind = np.array([0, 0, 1, 2], np.int8)
    truth = Truth(
        kind=kind,
        label=np.zeros(4, np.int64),
        true_label=np.array([0, 0, 1, -1]),
        identity=np.zeros(4, np.int64),
        quality=np.ones(4, np.float32),
        hard=np.zeros(4, bool),
        duplicate_of=np.full(4, -1),
    )
    flag = np.full(4, FLAGS.index("clean"), np.int8)
    table = evaluation_table(evaluate_flags(flag, np.full(4, -1), truth, merges=[]))
    assert "nan" not in table
    row = next(line for line in table.splitlines() if line.startswith("| closed "))
    assert [c.strip() for c in row.strip("|").split("|")][3:5] == ["n/a", "0.000"]
