"""Face clustering: kNN graphs, metrics, classic baselines, GCN-V/E and GCN-D/S."""
