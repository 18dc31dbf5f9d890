"""Face clustering: kNN graphs, metrics, classic baselines, GCN-V/E and GCN-D/S.

Importing the package registers every method in :data:`CLUSTERERS` (``kmeans``, ``hac``,
``dbscan``, ``aro``, ``cc``, ``chinese_whispers``, ``infomap``, ``gcn_v``, ``gcn_e``, ``gcn_d``,
``gcn_ds``); each is a :class:`Clusterer` estimator, ``CLUSTERERS.get(name)(**params).fit(features,
knn).labels_``, with a function form ``fn(features, knn, **params) -> labels`` in its module.
"""

from robustface.cluster import baselines, gcn_ds, gcn_e, gcn_v  # noqa: F401 - registration
from robustface.cluster.base import CLUSTERERS, Clusterer
from robustface.cluster.dataset import ClusterSet, load_cluster_set, save_cluster_set
from robustface.cluster.knn import KnnGraph, build_knn, load_or_build_knn
from robustface.cluster.metrics import bcubed, evaluate_clustering, nmi, pairwise

__all__ = [
    "CLUSTERERS",
    "ClusterSet",
    "Clusterer",
    "KnnGraph",
    "bcubed",
    "build_knn",
    "evaluate_clustering",
    "load_cluster_set",
    "load_or_build_knn",
    "nmi",
    "pairwise",
    "save_cluster_set",
]
