"""The clustering estimator contract (``Clusterer``): parameters stored and checked by name,
``fit`` / ``fit_predict`` / ``labels_``, ``relink`` from the cached work, the function forms, a
new method added by one class, and the shared GCN training settings."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from cluster_reference import planted
from robustface.cluster.base import (
    CLUSTERERS,
    SIM_GRID,
    Clusterer,
    check_params,
    cluster,
    param_names,
    tunable,
)
from robustface.cluster.baselines import ARO, ConnectedComponents, aro_distances, cc, hac
from robustface.cluster.benchmark import run_methods, tune_method
from robustface.cluster.dataset import ClusterSet
from robustface.cluster.gcn_ds import train_gcn_d
from robustface.cluster.gcn_v import GCNVClustering, confidence_link, predict_gcn_v, train_gcn_v
from robustface.cluster.graph import components, knn_edges
from robustface.cluster.knn import knn_brute_force
from robustface.cluster.proposals import ProposalSetting, generate_proposals
from robustface.cluster.train_settings import GCN_DS_TRAINING, TrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = [ProposalSetting(k=10, th=th, min_size=2, max_size=40) for th in (0.5, 0.7)]


@pytest.fixture(scope="module")
def data():
    x, y, _ = planted(0)
    return x, y, knn_brute_force(x, 15)


def test_init_stores_parameters_only_and_fit_sets_labels(data) -> None:
    x, _, graph = data
    est = ConnectedComponents(min_sim=0.6)
    assert est.get_params() == {"min_sim": 0.6}
    assert not hasattr(est, "labels_") and not hasattr(est, "state_")
    assert est.fit(x, graph) is est
    # connected components written out independently
    src, dst, _ = knn_edges(graph, min_sim=0.6)
    np.testing.assert_array_equal(est.labels_, components(len(x), src, dst))
    np.testing.assert_array_equal(
        ConnectedComponents(min_sim=0.6).fit_predict(x, graph), est.labels_
    )
    np.testing.assert_array_equal(cc(x, graph, min_sim=0.6), est.labels_)  # the function form
    assert repr(est) == "ConnectedComponents(min_sim=0.6)"


def test_every_method_is_an_estimator_with_a_function_form() -> None:
    import robustface.cluster.baselines as baselines
    import robustface.cluster.gcn_ds as gcn_ds
    import robustface.cluster.gcn_e as gcn_e
    import robustface.cluster.gcn_v as gcn_v

    functions = {
        "kmeans": baselines.kmeans, "hac": baselines.hac, "dbscan": baselines.dbscan,
        "aro": baselines.aro, "cc": baselines.cc, "chinese_whispers": baselines.chinese_whispers,
        "infomap": baselines.infomap_clustering, "gcn_v": gcn_v.gcn_v_cluster,
        "gcn_e": gcn_e.gcn_e_cluster, "gcn_d": gcn_ds.gcn_d_cluster,
        "gcn_ds": gcn_ds.gcn_ds_cluster,
    }  # fmt: skip
    assert sorted(functions) == CLUSTERERS.names()
    for name, fn in functions.items():
        cls = CLUSTERERS.get(name)
        assert issubclass(cls, Clusterer)
        signature = inspect.signature(fn)
        assert list(signature.parameters)[:2] == ["features", "knn"]
        assert list(signature.parameters)[2:] == param_names(cls), name
        est = cls(**{p: f"v{i}" for i, p in enumerate(param_names(cls))})  # stores, checks nothing
        assert est.get_params() == {p: f"v{i}" for i, p in enumerate(param_names(cls))}
    assert tunable() == ["aro", "cc", "chinese_whispers", "dbscan", "gcn_e", "gcn_v", "infomap"]


def test_parameter_errors_name_the_parameter_and_the_choices(data) -> None:
    x, _, graph = data
    with pytest.raises(ValueError, match=r"unknown parameter 'min_simm' \(did you mean 'min_sim'"):
        ConnectedComponents().set_params(min_simm=0.5)
    problems = check_params("gcn_v", {"taus": 0.5, "devise": "cpu"})
    assert problems == [
        "unknown parameter 'taus' (did you mean 'tau'?); its parameters are model, tau, "
        "use_gcn_features, k, knn_method, device, batch_size, show_progress",
        "unknown parameter 'devise' (did you mean 'device'?); its parameters are model, tau, "
        "use_gcn_features, k, knn_method, device, batch_size, show_progress",
        "parameter 'model' is required",
    ]
    assert check_params("gcn_v", {"tau": 0.5}, require=False) == []
    # ranges are checked at fit, with the parameter, the allowed range and the value
    with pytest.raises(ValueError, match=r"min_sim must be in \[-1.0, 1.0\], got 1.5"):
        ConnectedComponents(min_sim=1.5).fit(x, graph)
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_simm'"):
        ConnectedComponents(min_simm=0.5)


def test_relink_reuses_the_cached_work(data, monkeypatch) -> None:
    x, _, graph = data
    calls = []
    real = aro_distances

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("robustface.cluster.baselines.aro_distances", counted)
    est = ARO(threshold=0.4, show_progress=False).fit(None, graph)
    for value in (0.2, 1.0, 1.5):
        np.testing.assert_array_equal(
            est.relink(value), ARO(threshold=value, show_progress=False).fit_predict(None, graph)
        )
        assert est.threshold == value
        np.testing.assert_array_equal(est.labels_, est.relink(value))
    assert len(calls) == 1 + 3  # once for est, once per fresh estimator: never in relink
    with pytest.raises(RuntimeError, match="not fitted"):
        ARO().relink(0.5)
    with pytest.raises(TypeError, match="no threshold"):
        CLUSTERERS.get("kmeans")(num_clusters=3).fit(x, None).relink(0.5)


def test_gcn_v_relink_links_the_same_confidence(data) -> None:
    x, y, graph = data
    torch.manual_seed(0)
    model = train_gcn_v(x, y, graph, iters=20, hidden=16, show_progress=False)
    est = GCNVClustering(model=model, use_gcn_features=False, show_progress=False).fit(x, graph)
    conf, _ = predict_gcn_v(model, x, graph, show_progress=False)
    np.testing.assert_array_equal(est.labels_, confidence_link(graph, conf, 0.65))  # tau_0
    for tau in (0.3, 0.7):
        np.testing.assert_array_equal(est.relink(tau), confidence_link(graph, conf, tau))


def test_a_new_method_is_one_class(data, tmp_path, monkeypatch) -> None:
    """Registered, it runs through the benchmark, is tuned by relink and skipped above its
    max_samples, with nothing else to change."""
    x, y, graph = data
    prepared = []

    class Halves(Clusterer):
        """Two clusters split at a cut of the first feature."""

        tuned_param = "cut"
        grid = (-0.5, 0.0, 0.5)

        def __init__(self, *, cut: float = 0.0) -> None:
            self.cut = cut

        def _prepare(self, features, knn):
            prepared.append(1)
            return features[:, 0]

        def _finish(self, state):
            return (state > self.cut).astype(np.int64)

    monkeypatch.setitem(CLUSTERERS._items, "halves", Halves)
    assert "halves" in tunable()
    data_set = ClusterSet("s", x, y)
    result = tune_method("halves", data_set, graph, show_progress=False)
    assert result.grid == [-0.5, 0.0, 0.5] and len(prepared) == 1
    rows = run_methods(data_set, ["halves"], tmp_path, knn=graph, tune_on=data_set,
                       tune_knn=graph, show_progress=False)  # fmt: skip
    np.testing.assert_array_equal(
        np.load(tmp_path / "labels" / "halves.npy"), (x[:, 0] > result.value).astype(np.int64)
    )
    assert rows[0].params == {"cut": result.value}
    monkeypatch.setattr(Halves, "max_samples", 10, raising=False)
    monkeypatch.setattr(Halves, "max_samples_reason", "too slow", raising=False)
    (row,) = run_methods(data_set, ["halves"], tmp_path, knn=graph, show_progress=False)
    assert row.skipped == "skipped: N > 10 (too slow)"
    with pytest.raises(ValueError, match="halves: unknown parameter 'cutt'"):
        run_methods(data_set, ["halves"], tmp_path, knn=graph, params={"halves": {"cutt": 1}})


def test_bad_class_attributes_fail_at_definition() -> None:
    with pytest.raises(ValueError, match="grid of 'min_sim' is empty"):

        class NoGrid(Clusterer):
            tuned_param = "min_sim"

            def __init__(self, *, min_sim: float = 0.5) -> None:
                self.min_sim = min_sim

    with pytest.raises(TypeError, match="'num_clusters' is not a parameter"):

        class NoCount(Clusterer):
            true_count = "num_clusters"
            grid = SIM_GRID


def test_run_methods_reports_every_parameter_problem_at_once(data, tmp_path) -> None:
    x, y, graph = data
    params = {"cc": {"min_sims": 0.5}, "hac": {"num_cluster": 3, "linkages": "single"}}
    with pytest.raises(ValueError) as err:
        run_methods(ClusterSet("s", x, y), ["cc", "hac"], tmp_path, knn=graph, params=params)
    message = str(err.value)
    for name in ("cc: unknown parameter 'min_sims'", "hac: unknown parameter 'num_cluster'",
                 "hac: unknown parameter 'linkages'"):  # fmt: skip
        assert name in message
    assert not (tmp_path / "results.md").exists()  # nothing run


def test_hac_function_and_estimator_agree(data) -> None:
    _, y, graph = data
    count = len(np.unique(y))
    np.testing.assert_array_equal(
        hac(None, graph, num_clusters=count, show_progress=False),
        cluster("hac", None, graph, num_clusters=count, show_progress=False),
    )


def test_train_settings_shared_and_checked(data) -> None:
    x, y, graph = data
    with pytest.raises(TypeError, match=r"unknown training setting\(s\) epoch; the settings are"):
        GCN_DS_TRAINING.replace(epoch=3)
    props = generate_proposals(graph, SETTINGS, x, show_progress=False)
    by_keyword, _ = train_gcn_d(x, graph, props, y, epochs=1, show_progress=False)
    by_settings, _ = train_gcn_d(
        x, graph, props, y, GCN_DS_TRAINING.replace(epochs=1, show_progress=False)
    )
    for a, b in zip(by_keyword.parameters(), by_settings.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="GCN-D trains for epochs, not iters"):
        train_gcn_d(x, graph, props, y, iters=5, show_progress=False)
    with pytest.raises(ValueError, match="GCN-D trains with optimizer='sgd', got 'adamw'"):
        train_gcn_d(x, graph, props, y, optimizer="adamw", show_progress=False)
    with pytest.raises(ValueError, match="GCN-V trains for iters, not epochs"):
        train_gcn_v(x, y, graph, epochs=2, show_progress=False)
    with pytest.raises(TypeError, match="settings must be a TrainSettings"):
        train_gcn_v(x, y, graph, {"iters": 2})
    assert TrainSettings().optimizer == "sgd"
