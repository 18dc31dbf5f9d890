"""Threshold tuning (``tune_method``, ``run_methods(tune_on=...)``): every grid score against the
method called directly and scored by brute force, the pick applied to the test set, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from cluster_reference import pairwise_f, planted
from robustface.cluster.base import CLUSTERERS, SIM_GRID, Clusterer, cluster, tunable
from robustface.cluster.baselines import cc
from robustface.cluster.benchmark import run_methods, tune_method
from robustface.cluster.dataset import ClusterSet
from robustface.cluster.gcn_e import gcn_e_inputs, train_gcn_e
from robustface.cluster.gcn_v import save_gcn, train_gcn_v
from robustface.cluster.knn import knn_brute_force

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sets():
    """Train and test splits of the same 30 twin-paired identities, with exact k=20 graphs."""
    x, y, centres = planted(0)
    x_test, y_test, _ = planted(1, centres)
    train, test = ClusterSet("train", x, y), ClusterSet("test", x_test, y_test)
    return train, knn_brute_force(x, 20), test, knn_brute_force(x_test, 20)


@pytest.fixture(scope="module")
def models(sets, tmp_path_factory):
    """A small GCN-V and GCN-E trained on the train split, saved as checkpoints."""
    train, knn, _, _ = sets
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gcn_v = train_gcn_v(train.features, train.labels, knn, iters=40, hidden=32, show_progress=False)
    save_gcn(gcn_v, root / "gcn_v.pth")
    edge_feats, conf, edge_knn = gcn_e_inputs(gcn_v, train.features, knn, k=20, show_progress=False)
    gcn_e = train_gcn_e(edge_feats, conf, train.labels, edge_knn, epochs=1, hidden=16,
                        show_progress=False)  # fmt: skip
    save_gcn(gcn_e, root / "gcn_e.pth")
    return {"gcn_v": root / "gcn_v.pth", "gcn_e": root / "gcn_e.pth"}


def _params(method: str, models: dict) -> dict:
    return {
        "gcn_v": {"model": str(models["gcn_v"]), "use_gcn_features": False},
        "gcn_e": {
            "gcn_v_model": str(models["gcn_v"]),
            "gcn_e_model": str(models["gcn_e"]),
            "k_edge": 20,
        },
        "aro": {"show_progress": False},
        "chinese_whispers": {"show_progress": False},
        "infomap": {"k": None},
    }.get(method, {})


@pytest.mark.parametrize("method", tunable())
def test_every_grid_score_equals_the_method_called_directly(method, sets, models) -> None:
    """Whether the sweep runs the method per value or prepares once (GCN-V/E, ARO), each score
    is the brute-force pairwise F of the method called with that value, and the pick is the
    first best."""
    train, knn, _, _ = sets
    param = CLUSTERERS.get(method).tuned_param
    grid = CLUSTERERS.get(method).grid[::3]
    params = _params(method, models)
    result = tune_method(method, train, knn, params, grid=grid, show_progress=False)
    expected = [
        pairwise_f(train.labels, cluster(method, train.features, knn, **params, **{param: v}))
        for v in grid
    ]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-9)
    assert len(set(np.round(expected, 9))) > 1  # the value is used: scores move along the grid
    assert result.grid == list(grid) and result.param == param
    assert result.value == grid[int(np.argmax(expected))]
    assert result.set == "train" and result.metric == "pairwise_fscore"


def test_cc_threshold_matters_and_nmi_metric(sets) -> None:
    train, knn, _, _ = sets
    grid = [0.2, 0.5, 0.7, 0.9]
    result = tune_method("cc", train, knn, grid=grid, metric="nmi", show_progress=False)
    expected = [normalized_mutual_info_score(train.labels, cc(None, knn, min_sim=v)) for v in grid]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-9, atol=1e-12)
    assert max(expected) - min(expected) > 0.1  # the grid is not flat: the pick means something
    assert result.value == grid[int(np.argmax(expected))]


def test_run_methods_applies_the_train_pick_to_test(sets, tmp_path) -> None:
    train, knn, test, test_knn = sets
    grid = [0.3, 0.5, 0.6, 0.7, 0.8]
    results = run_methods(
        test,
        ["cc", "chinese_whispers", "dbscan"],
        tmp_path,
        knn=test_knn,
        params={"chinese_whispers": {"min_sim": 0.5}},
        tune_on=train,
        tune_knn=knn,
        tune_grids={"cc": grid, "dbscan": [-1.0, 0.3]},
        show_progress=False,
    )
    rows = {r.method: r for r in results}
    train_f = [pairwise_f(train.labels, cc(None, knn, min_sim=v)) for v in grid]
    picked = grid[int(np.argmax(train_f))]
    assert rows["cc"].params["min_sim"] == picked
    assert rows["cc"].metrics["pairwise_fscore"] == pytest.approx(
        pairwise_f(test.labels, cc(None, test_knn, min_sim=picked))
    )
    assert rows["cc"].extra["tuning"]["value"] == picked
    # a threshold given in params is kept, not tuned
    assert rows["chinese_whispers"].params["min_sim"] == 0.5
    assert "tuning" not in rows["chinese_whispers"].extra
    # a failing tuning is the method's error; the others still ran
    assert rows["dbscan"].metrics is None and "eps" in rows["dbscan"].error
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["tuning"]["set"] == "train" and doc["tuning"]["knn"]["source"] == "given"
    md = (tmp_path / "results.md").read_text()
    assert "## Thresholds picked on train" in md and "| cc " in md
    assert (tmp_path / "tuning.png").read_bytes()[:4] == b"\x89PNG"
    run_methods(test, ["cc"], tmp_path, knn=test_knn, show_progress=False)  # untuned, same dir
    assert not (tmp_path / "tuning.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["tuning"] is None


def test_a_pick_at_the_grid_edge_is_flagged(sets, tmp_path) -> None:
    train, knn, test, test_knn = sets
    run_methods(test, ["cc"], tmp_path, knn=test_knn, tune_on=train, tune_knn=knn,
                tune_grids={"cc": [0.95, 0.99]}, show_progress=False)  # fmt: skip
    assert "at the grid's edge" in (tmp_path / "results.md").read_text()


def test_tuning_errors(sets, tmp_path) -> None:
    train, knn, test, test_knn = sets
    common = {"knn": test_knn, "show_progress": False}
    with pytest.raises(ValueError, match="tune_grids given without tune_on"):
        run_methods(test, ["cc"], tmp_path, tune_grids={"cc": [0.5]}, **common)
    with pytest.raises(ValueError, match="no threshold to tune: kmeans"):
        run_methods(test, ["cc", "kmeans"], tmp_path, tune_on=train, tune_knn=knn,
                    tune_grids={"kmeans": [3]}, **common)  # fmt: skip
    with pytest.raises(ValueError, match="tune_metric must be one of"):
        run_methods(test, ["cc"], tmp_path, tune_on=train, tune_metric="f1", **common)
    unlabelled = ClusterSet("u", train.features, None)
    with pytest.raises(ValueError, match="'u' has no labels"):
        run_methods(test, ["cc"], tmp_path, tune_on=unlabelled, **common)
    with pytest.raises(ValueError, match="finite"):
        tune_method("cc", train, knn, grid=[0.5, float("nan")])
    with pytest.raises(ValueError, match="kmeans has no threshold to tune"):
        tune_method("kmeans", train, knn)
    with pytest.raises(ValueError, match="grid of 'min_sim' is empty"):

        class NoGrid(Clusterer):
            tuned_param = "min_sim"

            def __init__(self, *, min_sim: float = 0.5) -> None:
                self.min_sim = min_sim

    with pytest.raises(TypeError, match="'tau' is not a parameter"):

        class NoParam(Clusterer):
            tuned_param = "tau"
            grid = SIM_GRID

            def __init__(self, *, min_sim: float = 0.5) -> None:
                self.min_sim = min_sim


def test_tuned_run_whose_first_method_has_no_threshold(sets, tmp_path) -> None:
    """The results are written after every method: after k-means alone the tuning table has no
    rows yet (this crashed the default ``cluster benchmark --tune``, k-means first)."""
    train, knn, test, test_knn = sets
    grids = {"cc": [0.5, 0.7]}
    results = run_methods(test, ["kmeans", "cc"], tmp_path, knn=test_knn, tune_on=train,
                          tune_knn=knn, tune_grids=grids, show_progress=False)  # fmt: skip
    assert [r.metrics is not None for r in results] == [True, True]
    text = (tmp_path / "results.md").read_text()
    assert "| cc " in text.split("## Thresholds picked on train")[1]


def test_results_plot_labels_do_not_overlap(tmp_path, monkeypatch) -> None:
    """Methods with equal scores and times (cc = dbscan, gcn_d = gcn_ds, as tuned runs give)
    and near ones: every label is drawn, inside the figure, and no two labels overlap."""
    from matplotlib.text import Text

    from robustface.cluster import benchmark

    rows = [("kmeans", 0.8, 63.69), ("hac", 9.4, 71.99), ("dbscan", 0.004, 66.38),
            ("cc", 0.003, 66.38), ("aro", 1.4, 58.37), ("chinese_whispers", 0.2, 66.33),
            ("infomap", 1.2, 67.12), ("gcn_v", 1.1, 66.9), ("gcn_e", 12.0, 65.0),
            ("gcn_d", 9.0, 68.79), ("gcn_ds", 9.2, 68.79)]  # fmt: skip
    results = [benchmark.MethodResult(m, {}, t, {"pairwise_fscore": f / 100}) for m, t, f in rows]
    figures = []
    monkeypatch.setattr(benchmark, "save_figure", lambda fig, path: figures.append(fig))
    benchmark._plot(results, "crowded", tmp_path / "results.png")
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    labels = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}  # no line
    assert sorted(labels) == sorted(m for m, _, _ in rows)
    boxes = list(labels.items())
    for i, (name, box) in enumerate(boxes):
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), name
        for other, box2 in boxes[i + 1 :]:
            assert not box.overlaps(box2), f"labels {name} and {other} overlap"
