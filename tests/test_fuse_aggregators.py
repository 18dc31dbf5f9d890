"""The fusion aggregator interface and its baselines (robustface.fuse.base / .baselines)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustface.evaluate.ijb import group_templates, template_features
from robustface.fuse.base import AGGREGATORS, Aggregator, FusionMemory
from robustface.fuse.baselines import MeanAggregator, NormWeightedAggregator
from robustface.utils.registry import UnknownNameError


def raw_features(n: int = 300, d: int = 16, seed: int = 0) -> np.ndarray:
    """Raw features with very different norms (so the two baselines disagree)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n, d)) + 0.5
    return (directions * rng.uniform(0.05, 40.0, size=(n, 1))).astype(np.float32)


def formula(features: np.ndarray, name: str) -> np.ndarray:
    f = features.astype(np.float64)
    norms = np.sqrt((f**2).sum(axis=1))
    units = f / norms[:, None]
    if name == "mean":
        fused = units.sum(axis=0) / len(f)
    else:  # norm-weighted average of the unit features
        fused = (norms[:, None] * units).sum(axis=0) / norms.sum()
    return fused / np.sqrt((fused**2).sum())


@pytest.mark.parametrize("name", ["mean", "norm_weighted"])
def test_fuse_matches_formula(name):
    feats = raw_features()
    got = AGGREGATORS.build(name).fuse(feats)
    assert got.shape == (16,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), formula(feats, name), atol=1e-6)
    other = formula(feats, "norm_weighted" if name == "mean" else "mean")
    assert np.abs(got.numpy() - other).max() > 1e-2  # the formulas are told apart


@pytest.mark.parametrize("name", ["mean", "norm_weighted"])
def test_memory_over_shuffled_chunks_equals_whole_set(name):
    rng = np.random.default_rng(1)
    feats = raw_features(n=1000, d=32, seed=2)
    aggregator = AGGREGATORS.build(name, dim=32)
    whole = aggregator.fuse(torch.from_numpy(feats))
    for _ in range(5):
        cuts = np.sort(rng.choice(np.arange(1, 1000), size=rng.integers(1, 40), replace=False))
        chunks = np.split(feats[rng.permutation(1000)], cuts)
        memory = aggregator.memory()
        for i in rng.permutation(len(chunks)):
            memory.update(chunks[i])
        assert memory.count == 1000
        np.testing.assert_allclose(memory.result().numpy(), whole.numpy(), atol=1e-6)
    np.testing.assert_allclose(whole.numpy(), formula(feats, name), atol=1e-6)


@pytest.mark.parametrize("name", ["mean", "norm_weighted"])
def test_ijb_template_pooling_uses_the_same_aggregation(name):
    feats = raw_features(n=50, d=8, seed=3)
    one = np.zeros(50, np.int64)
    pooled = template_features(feats, np.ones(50, np.float32), group_templates(one, one), name)
    np.testing.assert_allclose(pooled[0], AGGREGATORS.build(name).fuse(feats).numpy(), atol=1e-6)


def test_registry_names():
    assert AGGREGATORS.get("mean") is MeanAggregator
    assert AGGREGATORS.get("norm_weighted") is NormWeightedAggregator
    assert {"mean", "norm_weighted"} <= set(AGGREGATORS.names())
    assert AGGREGATORS.build("mean", dim=8).dim == 8
    with pytest.raises(UnknownNameError, match=r"unknown aggregator 'mena'.*'mean'"):
        AGGREGATORS.get("mena")
    with pytest.raises(ValueError, match="dim must be >= 1"):
        AGGREGATORS.build("mean", dim=0)


class _StyledMemory(FusionMemory):
    def _update(self, features, styles):
        self.last_styles = styles

    def result(self):
        self._check_not_empty()
        return torch.zeros(self.dim)


class _Styled(Aggregator):
    """A stand-in for an aggregator that needs styles (CAFace)."""

    name = "styled"
    needs_styles = True

    def memory(self):
        return _StyledMemory(self)


FIVE = raw_features(n=5, d=4)


def _with(row: int, value: float) -> np.ndarray:
    feats = FIVE.copy()
    feats[row] = value
    return feats


@pytest.mark.parametrize(
    ("aggregator", "features", "styles", "message"),
    [
        (
            MeanAggregator(dim=8),
            FIVE,
            None,
            "features must have dimension 8, got 4",
        ),
        (
            MeanAggregator(),
            FIVE[0],
            None,
            r"2-D \(N, d\) array, got shape \(4,\)",
        ),
        (MeanAggregator(), np.zeros((0, 4), np.float32), None, "features: empty set"),
        (NormWeightedAggregator(), _with(2, np.nan), None, "features row 2 has NaN"),
        (NormWeightedAggregator(), _with(3, np.inf), None, "features row 3 has NaN or infinite"),
        (MeanAggregator(), _with(1, 0.0), None, "features row 1 has zero norm"),
        (_Styled(), FIVE, None, "styles are required by the 'styled' aggregator"),
        (_Styled(), FIVE, np.ones((4, 3, 2)), r"one row per feature \(5\)"),
        (_Styled(), FIVE, np.full((5, 2), np.nan), "styles have NaN"),
    ],
)
def test_bad_inputs_name_the_parameter(aggregator, features, styles, message):
    with pytest.raises(ValueError, match=message):
        aggregator.fuse(features, styles)


def test_memory_bad_inputs():
    memory = NormWeightedAggregator().memory()
    with pytest.raises(ValueError, match="'norm_weighted' fusion memory is empty"):
        memory.result()
    memory.update(raw_features(n=3, d=4))
    with pytest.raises(ValueError, match="features must have dimension 4, got 6"):
        memory.update(raw_features(n=3, d=6))
    feats = raw_features(n=2, d=4)
    with pytest.raises(ValueError, match="cancel out"):
        NormWeightedAggregator().fuse(np.concatenate([feats[:1], -feats[:1]]))


def test_styles_reach_the_memory_and_are_ignored_where_not_needed():
    feats, styles = raw_features(n=5, d=4), np.ones((5, 3, 2))
    memory = _Styled().memory()
    memory.update(feats, styles)
    assert memory.last_styles.shape == (5, 3, 2) and memory.dim == 4
    np.testing.assert_allclose(
        MeanAggregator().fuse(feats, styles).numpy(), formula(feats, "mean"), atol=1e-6
    )
