"""Train the learned clusterers (GCN-V, GCN-E, GCN-D, GCN-S) on a labelled set, in one call.

Each model is trained with its module's published defaults (see :mod:`~robustface.cluster.gcn_v`,
:mod:`~robustface.cluster.gcn_e`, :mod:`~robustface.cluster.gcn_ds`) and written to
``out_dir/{kind}.pth``. GCN-E learns on GCN-V's outputs for the same set (its confidence and
hidden features, as learn-to-cluster's ``cfg_train_gcne_ms1m``), so asking for ``gcn_e`` trains or
reuses ``gcn_v`` first; GCN-D and GCN-S learn on the set's super-vertex proposals (preset
``train_8``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from robustface.cluster.base import CLUSTERERS
from robustface.cluster.dataset import ClusterSet
from robustface.cluster.gcn_ds import train_gcn_d, train_gcn_s
from robustface.cluster.gcn_e import K_EDGE, gcn_e_inputs, train_gcn_e
from robustface.cluster.gcn_v import gcn_v_lr, load_gcn_v, save_gcn, train_gcn_v
from robustface.cluster.knn import KnnGraph
from robustface.cluster.proposals import generate_proposals
from robustface.cluster.train_settings import (
    GCN_DS_TRAINING,
    GCN_E_TRAINING,
    GCN_V_TRAINING,
    Optimizer,
)

__all__ = ["KINDS", "KINDS_FOR", "MODEL_PARAMS", "train_models"]

KINDS: tuple[str, ...] = ("gcn_v", "gcn_e", "gcn_d", "gcn_s")
MODEL_PARAMS: dict[str, dict[str, str]] = {
    name: dict(CLUSTERERS.get(name).models) for name in CLUSTERERS if CLUSTERERS.get(name).models
}
"""Per learned clusterer: its keyword argument for each trained model it needs (its
estimator's ``models``)."""
KINDS_FOR: dict[str, tuple[str, ...]] = {m: tuple(p.values()) for m, p in MODEL_PARAMS.items()}
"""The models each learned clusterer needs."""


def train_models(
    data: ClusterSet,
    out_dir: str | Path,
    *,
    kinds: Sequence[str] = KINDS,
    knn: KnnGraph,
    iters: int | None = None,
    batch_size: int | None = GCN_V_TRAINING.batch_size,
    optimizer: Optimizer = "adamw",
    lr: float | None = None,
    epochs: int | None = None,
    proposals: str = "train_8",
    gcn_v: str | Path | None = None,
    gcn_e_features: Literal["gcn", "input"] = "gcn",
    k_edge: int = K_EDGE,
    device: str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Path]:
    """Train ``kinds`` on ``data`` (labels required) with its kNN graph ``knn``.

    Each model trains with its :mod:`~robustface.cluster.train_settings` defaults, changed here
    by: ``iters`` GCN-V's iteration count (None: the default), ``batch_size`` its rows per
    step (None: the whole graph), ``optimizer`` and ``lr`` its optimiser (see
    :func:`~robustface.cluster.gcn_v.train_gcn_v`; ``lr`` None: the optimiser's default),
    ``epochs`` the epochs of GCN-E, GCN-D and GCN-S (None: the defaults), and ``device``,
    ``seed``, ``show_progress`` for all.
    GCN-E learns on the outputs of ``gcn_v`` when given (a trained GCN-V file), else of the GCN-V
    trained here, which ``kinds`` must then include; its edge features are GCN-V's hidden ones
    (``gcn_e_features="gcn"``, published) or the input features (``"input"``: the input kNN is
    then reused), on a ``k_edge``-NN graph. Cluster with the same choice
    (``gcn_e_cluster(use_gcn_features=..., k_edge=...)``); both are saved in the model's meta.
    Returns ``{kind: model file}`` for the models trained here.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown model kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if data.labels is None:
        raise ValueError(f"set {data.name!r} has no labels: the GCNs learn from identities")
    if knn.num_samples != data.num_samples:
        raise ValueError(f"knn has {knn.num_samples} rows but {data.name!r} has {data.num_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    common = {"device": device, "seed": seed, "show_progress": show_progress}
    epoch_kw = {} if epochs is None else {"epochs": epochs}
    v_settings = GCN_V_TRAINING.replace(
        batch_size=batch_size, optimizer=optimizer, lr=lr, **common,
        **({} if iters is None else {"iters": iters}),
    )  # fmt: skip
    e_settings = GCN_E_TRAINING.replace(**epoch_kw, **common)
    ds_settings = GCN_DS_TRAINING.replace(**epoch_kw, **common)
    meta = {"trained_on": data.name, "samples": data.num_samples, "k": knn.k}
    if "gcn_e" in kinds and gcn_v is None and "gcn_v" not in kinds:
        raise ValueError("training gcn_e needs a GCN-V: add gcn_v to kinds or pass gcn_v=FILE")
    if "gcn_v" in kinds:
        model = train_gcn_v(data.features, data.labels, knn, v_settings)
        v_meta = {
            **meta, "iters": len(model.loss_history), "batch_size": batch_size,
            "optimizer": optimizer, "lr": gcn_v_lr(v_settings),
        }  # fmt: skip
        save_gcn(model, out_dir / "gcn_v.pth", v_meta)
        paths["gcn_v"] = out_dir / "gcn_v.pth"
    if "gcn_e" in kinds:
        source = paths.get("gcn_v", gcn_v)
        if gcn_e_features not in ("gcn", "input"):
            raise ValueError(f"gcn_e_features must be 'gcn' or 'input', got {gcn_e_features!r}")
        use_gcn = gcn_e_features == "gcn"
        edge_feats, conf, edge_knn = gcn_e_inputs(
            load_gcn_v(source, device), data.features, knn, use_gcn_features=use_gcn, k=k_edge,
            device=device, show_progress=show_progress,
        )  # fmt: skip
        e_meta = {**meta, "k": edge_knn.k, "gcn_v": str(source), "use_gcn_features": use_gcn}
        model = train_gcn_e(edge_feats, conf, data.labels, edge_knn, e_settings)
        save_gcn(model, out_dir / "gcn_e.pth", e_meta)
        paths["gcn_e"] = out_dir / "gcn_e.pth"
    if "gcn_d" in kinds or "gcn_s" in kinds:
        props = generate_proposals(knn, proposals, data.features, show_progress=show_progress)
        for kind, train in (("gcn_d", train_gcn_d), ("gcn_s", train_gcn_s)):
            if kind in kinds:
                model, _ = train(data.features, knn, props, data.labels, ds_settings)
                model.save(out_dir / f"{kind}.pth", {**meta, "proposals": proposals})
                paths[kind] = out_dir / f"{kind}.pth"
    return paths
