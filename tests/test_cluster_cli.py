"""``robustface cluster ...`` end to end on a tiny simulated benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster_reference import pairwise_f as brute_pairwise_f
from robustface.cli import main
from robustface.data.ltc import read_meta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "bench"
    args = ["cluster", "simulate", str(root), "--train-identities", "25", "--test-identities"]
    args += ["20", "--set", "mean_size=12", "--param", "max_size=40", "--quiet"]
    assert main(args) == 0
    return root


def test_simulate_knn_run_eval(bench, tmp_path, capsys):
    assert (bench / "features" / "part1_test.bin").is_file()
    assert main(["cluster", "knn", str(bench), "part1_test", "--k", "10", "--quiet"]) == 0
    assert (bench / "knns" / "part1_test" / "faiss_k_10.npz").is_file()  # learn-to-cluster name
    out = tmp_path / "cc"
    args = ["cluster", "run", "cc", str(bench), "part1_test", "--k", "10", "--out", str(out)]
    assert main([*args, "--set", "cc.min_sim=0.6", "--quiet"]) == 0
    printed, err = capsys.readouterr()
    assert "| cc " in printed and "deprecated" not in err
    pred = read_meta(out / "part1_test_cc.meta")
    gt = read_meta(bench / "labels" / "part1_test.meta")
    result = json.loads((out / "results.json").read_text())["methods"][0]
    assert result["params"] == {"min_sim": 0.6}
    assert result["metrics"]["pairwise_fscore"] == pytest.approx(brute_pairwise_f(gt, pred))
    assert main(["cluster", "eval", str(bench / "labels" / "part1_test.meta"),
                 str(out / "part1_test_cc.meta")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"pairwise_fscore      {brute_pairwise_f(gt, pred):.4f}" in printed


def test_eval_names_a_missing_file(tmp_path, capsys):
    gt = tmp_path / "gt.meta"
    gt.write_text("0\n1\n")
    assert main(["cluster", "eval", "/nope", str(gt)]) == 2
    assert capsys.readouterr().err.strip().endswith("label file not found: /nope")
    assert main(["cluster", "eval", str(gt), str(tmp_path / "pred.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"label file not found: {tmp_path}/pred.txt")


def test_run_without_labels_needs_num_clusters(bench, tmp_path, capsys):
    unlabelled = tmp_path / "u"
    (unlabelled / "features").mkdir(parents=True)
    (unlabelled / "features" / "x.bin").write_bytes(
        (bench / "features" / "part1_test.bin").read_bytes()
    )
    args = ["cluster", "run", "kmeans", str(unlabelled), "x", "--out", str(tmp_path / "o")]
    assert main([*args, "--quiet", "--k", "5"]) == 2
    assert "num_clusters" in capsys.readouterr().err
    assert main([*args, "--quiet", "--k", "5", "--param", "num_clusters=20"]) == 0
    pred = read_meta(tmp_path / "o" / "x_kmeans.meta")
    assert len(np.unique(pred)) == 20


def test_benchmark_trains_and_tabulates(bench, tmp_path, capsys):
    out = tmp_path / "bench_out"
    args = ["cluster", "benchmark", str(bench), "--k", "10", "--out", str(out), "--quiet"]
    args += ["--methods", "cc", "infomap", "gcn_v", "dbscan", "--iters", "30"]
    args += ["--params", '{"dbscan": {"eps": -1}, "infomap": {"k": null}}']
    assert main(args) == 0
    table = capsys.readouterr().out
    assert (out / "models" / "gcn_v.pth").is_file()
    assert not (out / "models" / "gcn_d.pth").exists()  # only what the methods need
    doc = json.loads((out / "results.json").read_text())
    rows = {m["method"]: m for m in doc["methods"]}
    assert list(rows) == ["cc", "infomap", "gcn_v", "dbscan"]
    assert rows["dbscan"]["metrics"] is None and "eps" in rows["dbscan"]["error"]
    assert "failed: ValueError" in table  # the failure is in the table, the others still ran
    gt = read_meta(bench / "labels" / "part1_test.meta")
    for method in ("cc", "infomap", "gcn_v"):
        pred = np.load(out / "labels" / f"{method}.npy")
        assert rows[method]["metrics"]["pairwise_fscore"] == pytest.approx(
            brute_pairwise_f(gt, pred)
        )
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().startswith("method,seconds,error,skipped")
    # unknown methods fail before any work
    assert main([*args[:8], "--methods", "kmeanz"]) == 2
    assert "unknown clusterer 'kmeanz'" in capsys.readouterr().err


@pytest.mark.slow
def test_given_models_are_used_and_gcn_e_trains_on_them(bench, tmp_path, capsys):
    models = tmp_path / "models"
    base = [str(bench), "part0_train", "--k", "10", "--quiet", "--out", str(models)]
    assert main(["cluster", "train", *base, "--kinds", "gcn_e", "--epochs", "1"]) == 2
    assert "needs a GCN-V" in capsys.readouterr().err
    assert main(["cluster", "train", *base, "--kinds", "gcn_v", "--iters", "5"]) == 0
    meta = torch.load(models / "gcn_v.pth", weights_only=True)["meta"]
    assert (meta["optimizer"], meta["lr"], meta["batch_size"]) == ("adamw", 1e-3, 1024)
    sgd = [*base, "--kinds", "gcn_v", "--iters", "3", "--out", str(tmp_path / "sgd")]
    sgd += ["--gcn-v-optimizer", "sgd", "--gcn-v-lr", "0.05", "--gcn-v-batch", "0"]
    assert main(["cluster", "train", *sgd]) == 0
    meta = torch.load(tmp_path / "sgd" / "gcn_v.pth", weights_only=True)["meta"]
    assert (meta["optimizer"], meta["lr"], meta["batch_size"]) == ("sgd", 0.05, None)
    mine = tmp_path / "mine_gcn_v.pth"
    (models / "gcn_v.pth").rename(mine)
    args = ["cluster", "train", *base, "--kinds", "gcn_e", "--epochs", "1", "--gcn-v", str(mine)]
    assert main(args) == 0
    gcn_e = torch.load(models / "gcn_e.pth", weights_only=True)
    assert gcn_e["meta"]["gcn_v"] == str(mine)
    assert gcn_e["meta"]["use_gcn_features"] and gcn_e["meta"]["k"] == 160
    args = [*args, "--gcn-e-features", "input", "--k-edge", "8", "--out", str(tmp_path / "in")]
    assert main(args) == 0
    meta = torch.load(tmp_path / "in" / "gcn_e.pth", weights_only=True)["meta"]
    assert not meta["use_gcn_features"] and meta["k"] == 8
    assert not (models / "gcn_v.pth").exists()  # nothing trained behind the user's back

    out = tmp_path / "b"
    assert main(["cluster", "knn", str(bench), "part1_test", "--k", "10", "--quiet"]) == 0
    args = ["cluster", "benchmark", str(bench), "--k", "10", "--out", str(out), "--quiet"]
    args += ["--methods", "gcn_v", "gcn_e", "--model", f"gcn_v={mine}", "--epochs", "1"]
    assert main(args) == 0
    capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    rows = {m["method"]: m for m in doc["methods"]}
    assert rows["gcn_v"]["params"]["model"] == str(mine)
    assert rows["gcn_e"]["params"]["gcn_v_model"] == str(mine)
    assert rows["gcn_e"]["params"]["gcn_e_model"] == str(out / "models" / "gcn_e.pth")
    assert not (out / "models" / "gcn_v.pth").exists()
    assert doc["knn"]["source"].startswith("read from")  # the kNN built above


def test_knn_time_is_reported_when_built(bench, tmp_path, capsys):
    out = tmp_path / "k"
    args = ["cluster", "benchmark", str(bench), "--k", "7", "--out", str(out), "--quiet"]
    assert main([*args, "--methods", "cc", "--params", "{bad"]) == 2
    assert "--params is not valid JSON" in capsys.readouterr().err
    assert main([*args, "--methods", "cc"]) == 0
    capsys.readouterr()
    knn = json.loads((out / "results.json").read_text())["knn"]
    assert knn["source"].startswith("built") and knn["seconds"] > 0 and knn["k"] == 7


def test_benchmark_tunes_thresholds_on_train(bench, tmp_path, capsys):
    from robustface.cluster.baselines import cc
    from robustface.cluster.knn import KnnGraph

    out = tmp_path / "t"
    args = ["cluster", "benchmark", str(bench), "--k", "10", "--out", str(out), "--quiet"]
    args += ["--methods", "cc", "kmeans"]
    assert main([*args, "--tune-grid", "cc=0.5,0.7"]) == 2
    assert "--tune-grid needs --tune" in capsys.readouterr().err
    assert main([*args, "--tune", "--tune-grid", "cc=0.5,x"]) == 2
    assert "METHOD=V1,V2" in capsys.readouterr().err
    assert main([*args, "--tune", "--tune-grid", "cc=0.5,0.6,0.7,0.8"]) == 0
    assert "Thresholds picked on part0_train" in capsys.readouterr().out
    rows = {m["method"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    tuning = rows["cc"]["extra"]["tuning"]
    gt = read_meta(bench / "labels" / "part0_train.meta")
    knn = KnnGraph.load(bench / "knns" / "part0_train" / "faiss_k_10.npz")
    expected = [brute_pairwise_f(gt, cc(None, knn, min_sim=v)) for v in (0.5, 0.6, 0.7, 0.8)]
    np.testing.assert_allclose(tuning["scores"], expected, rtol=1e-9)
    picked = (0.5, 0.6, 0.7, 0.8)[int(np.argmax(expected))]
    assert rows["cc"]["params"]["min_sim"] == tuning["value"] == picked
    assert "tuning" not in rows["kmeans"]["extra"]  # k-means has no threshold: not tuned


def test_set_is_the_override_syntax_and_old_flags_are_aliases(bench, tmp_path, capsys):
    def results(out):
        doc = json.loads((out / "results.json").read_text())
        return {m["method"]: (m["params"], m["metrics"]) for m in doc["methods"]}

    run = ["cluster", "run", "cc", str(bench), "part1_test", "--k", "10", "--quiet", "--out"]
    assert main([*run, str(tmp_path / "new"), "--set", "cc.min_sim=0.6"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*run, str(tmp_path / "old"), "--param", "min_sim=0.6"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--param is deprecated" in err and "--set cc.NAME=VALUE" in err
    assert results(tmp_path / "new") == results(tmp_path / "old")

    bench_args = ["cluster", "benchmark", str(bench), "--k", "10", "--quiet"]
    bench_args += ["--methods", "cc", "infomap", "--out"]
    new = ["--set", "infomap.k=null", "--set", "infomap.min_sim=0.5", "--set", "cc.min_sim=0.8"]
    assert main([*bench_args, str(tmp_path / "bnew"), *new]) == 0
    assert "deprecated" not in capsys.readouterr().err
    old = ["--params", '{"infomap": {"k": null, "min_sim": 0.5}, "cc": {"min_sim": 0.8}}']
    assert main([*bench_args, str(tmp_path / "bold"), *old]) == 0
    assert "--params is deprecated" in capsys.readouterr().err
    assert results(tmp_path / "bnew") == results(tmp_path / "bold")
    assert results(tmp_path / "bnew")["infomap"][0] == {"k": None, "min_sim": 0.5}

    # every problem at once, before any work
    bad = ["--set", "cc.min_simm=0.5", "--set", "kmeans.num_clusters=3", "--set", "k=3"]
    assert main([*bench_args, str(tmp_path / "bad"), *bad]) == 2
    err = capsys.readouterr().err
    assert "cc: unknown parameter 'min_simm' (did you mean 'min_sim'?)" in err
    assert "parameters given for 'kmeans', which is not run" in err
    assert "--set 'k=3': expected METHOD.PARAM=VALUE" in err
    assert not (tmp_path / "bad").exists()
    assert main([*run, str(tmp_path / "bad"), "--set", "infomap.k=3"]) == 2
    assert "parameters given for 'infomap', which is not run" in capsys.readouterr().err
    # a value of the wrong type is the user's error: one line, no traceback
    assert main([*run, str(tmp_path / "bad"), "--set", "cc.min_sim=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min_sim must be a number, got str 'abc'" in err


def test_method_names_in_the_help_are_the_registered_clusterers(capsys):
    """``run METHOD`` and ``benchmark --methods`` list every registered clusterer (the parser
    names them without importing robustface.cluster)."""
    import robustface.cluster  # noqa: F401  (registers every clusterer)
    from robustface.cli_cluster import _METHODS
    from robustface.cluster.base import CLUSTERERS

    assert sorted(_METHODS.split(", ")) == sorted(CLUSTERERS.names())
    for command in ("run", "benchmark"):
        with pytest.raises(SystemExit):
            main(["cluster", command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert _METHODS in text, command


def test_npy_features_need_no_dim(tmp_path, capsys):
    """A .npy (e.g. ``robustface embed``'s embeddings.npy) gives its own width: no --dim needed,
    and a --dim that contradicts it is an error naming the file."""
    (tmp_path / "features").mkdir()
    feats = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    np.save(tmp_path / "features" / "mine.npy", feats)
    assert main(["cluster", "knn", str(tmp_path), "mine", "--k", "3", "--quiet"]) == 0
    assert "12 x k=3" in capsys.readouterr().out
    assert main(["cluster", "knn", str(tmp_path), "mine", "--k", "3", "--dim", "4"]) == 2
    assert "mine.npy: rows have 5 values, expected dim=4" in capsys.readouterr().err


def test_a_learned_method_without_its_model_says_how_to_give_it(bench, tmp_path, capsys):
    args = ["cluster", "run", "gcn_v", str(bench), "part1_test", "--k", "10", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs a trained gcn_v model" in err
    assert "--model gcn_v=FILE, written by 'robustface cluster train'" in err
