"""Angle probes: cosines, separation metrics, probe selection, centre statistics, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustface.data.transforms import resize_to, to_tensor_normalized
from robustface.train.analysis import (
    GROUP_KEYS,
    AngleProbe,
    ProbeRecord,
    angle_axis_range,
    angle_summary,
    center_stats,
    histogram_overlap,
    mann_whitney_auc,
    plot_angle_distributions,
    plot_center_drift,
    plot_run_angles,
    probe_cosines,
    probe_groups,
    select_probe,
    stages_by_step,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _linear(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(in_dim, out_dim))).float()


def _cosine_fn(weight: np.ndarray):
    w = F.normalize(torch.from_numpy(weight).float(), dim=1)
    return lambda emb: emb @ w.T


def _rotation(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([math.cos(t), math.sin(t)])


def test_probe_cosines_match_a_float64_loop():
    rng = np.random.default_rng(0)
    n, d_in, d, c = 7, 10, 5, 4
    images = torch.from_numpy(rng.normal(size=(n, d_in))).float()
    proj = _linear(d_in, d, 1)
    weight = rng.normal(size=(c, d))
    labels = np.array([0, 1, 2, 3, 0, 1, 2])
    true = np.array([0, 3, -1, 3, 2, -1, 2])
    rec = probe_cosines(
        lambda x: x @ proj, _cosine_fn(weight), images, labels, true_labels=true, batch_size=3
    )
    emb = images.double().numpy() @ proj.double().numpy()
    for i in range(n):
        e = emb[i] / np.linalg.norm(emb[i])
        cos = [float(e @ (weight[k] / np.linalg.norm(weight[k]))) for k in range(c)]
        others = [k for k in range(c) if k != labels[i]]
        best = max(others, key=lambda k: cos[k])
        assert rec.cos_label[i] == pytest.approx(cos[labels[i]], abs=1e-5)
        assert rec.max_neg[i] == pytest.approx(cos[best], abs=1e-5)
        assert rec.neg_class[i] == best
        if true[i] >= 0:
            assert rec.cos_true[i] == pytest.approx(cos[true[i]], abs=1e-5)
        else:
            assert math.isnan(rec.cos_true[i])
        np.testing.assert_allclose(rec.embeddings[i], e, atol=1e-6)
    assert rec.embeddings.dtype == np.float32


def test_histogram_overlap_identical_disjoint_and_by_hand():
    a = np.random.default_rng(0).uniform(0, 180, size=200)
    assert histogram_overlap(a, a) == pytest.approx(1.0)
    assert histogram_overlap(np.linspace(10, 19.9, 30), np.linspace(100, 109.9, 7)) == 0.0
    # bins [0,1): 1/2 vs 0, [1,2): 1/4 vs 1/2, [2,3): 1/4 vs 1/2 -> 0 + 1/4 + 1/4
    assert histogram_overlap(np.array([0.5, 0.5, 1.5, 2.5]), np.array([1.2, 2.7])) == 0.5


def test_auc_matches_a_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 6, size=37), rng.integers(0, 6, size=23)
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert mann_whitney_auc(pos, neg) == pytest.approx(expected)
    assert mann_whitney_auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == 0.875
    assert mann_whitney_auc(np.array([5.0]), np.array([1.0, 2.0])) == 1.0


def test_select_probe_stratifies_and_redistributes():
    groups = np.repeat([0, 1, 2, 3], [100, 3, 50, 10])
    idx = select_probe(groups, 40, seed=0)
    assert len(idx) == 40 and np.all(np.diff(idx) > 0)
    # closed (3) taken whole; 37 left over 3 groups: lowq 10 (whole), then 27 -> open 14, clean 13
    assert np.bincount(groups[idx], minlength=4).tolist() == [13, 3, 14, 10]
    np.testing.assert_array_equal(idx, select_probe(groups, 40, seed=0))
    assert not np.array_equal(idx, select_probe(groups, 40, seed=1))
    # equal shares when every group is large; an empty group takes no share
    big = np.repeat([0, 2, 3], [50, 50, 50])
    assert sorted(np.bincount(big[select_probe(big, 30, seed=2)]).tolist()) == [0, 10, 10, 10]
    np.testing.assert_array_equal(select_probe(groups, 10_000, seed=0), np.arange(len(groups)))


def test_probe_groups_marks_the_worst_clean_quality():
    kind = np.array([0, 0, 1, 0, 0, 2, 0, 0, 0, 0])
    quality = np.array([0.9, 0.2, 0.0, 0.8, 0.1, 0.05, 0.7, 0.6, 0.95, 0.5])
    groups = probe_groups(kind, quality, low_quality_fraction=0.25)  # 8 clean -> 2 worst
    assert groups.tolist() == [0, 3, 1, 0, 3, 2, 0, 0, 0, 0]
    assert probe_groups(kind, None).tolist() == kind.tolist()
    with pytest.raises(ValueError):
        probe_groups(np.array([0, 4]), None)


def test_center_stats_by_hand_on_two_classes_in_2d():
    previous = np.stack([_rotation(0), _rotation(90)])
    weight = np.stack([_rotation(30), _rotation(100)]) * np.array([[2.0], [0.5]])  # norms ignored
    # class 0: clean at 0 deg (mean direction 0), noisy at 90 deg; class 1: clean at 80 and 100
    emb = np.stack([_rotation(a) for a in (-10, 10, 90, 80, 100)]).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    groups = np.array([0, 0, 2, 0, 0])
    rec = ProbeRecord(0, *(np.zeros(5),) * 4, embeddings=emb)
    stats = center_stats(weight, rec, labels, groups, previous)
    assert stats["drift_deg_mean"] == pytest.approx((30 + 10) / 2)
    assert stats["center_to_clean_mean_deg"] == pytest.approx((30 + 10) / 2)
    # class 0 only: clean-to-noisy 90 deg, centre-to-noisy 60 deg -> pulled 30 deg
    assert stats["center_to_noisy_pull_deg"] == pytest.approx(30.0)
    assert "drift_deg_mean" not in center_stats(weight, rec, labels, groups)


def _separated_record(groups: np.ndarray, step: int = 0) -> ProbeRecord:
    angles = np.where(groups == 0, 20.0, 70.0) + np.arange(len(groups)) % 7
    cos = np.cos(np.radians(angles))
    return ProbeRecord(step, cos, cos - 0.1, np.zeros(len(groups), np.int64), cos)


def test_angle_summary_keys_and_values():
    groups = np.array([0] * 10 + [1] * 5 + [2] * 4)
    rec = _separated_record(groups)
    summary = angle_summary(rec, groups)
    assert summary["auc_closed"] == 1.0 and summary["auc_open"] == 1.0
    assert summary["overlap_closed"] == 0.0 and summary["overlap_open"] == 0.0
    assert summary["clean_count"] == 10 and summary["open_count"] == 4
    assert summary["clean_angle_mean"] == pytest.approx(rec.angle_label[:10].mean())
    assert summary["closed_angle_median"] == pytest.approx(np.median(rec.angle_label[10:15]))
    assert summary["clean_neg_closer_frac"] == 0.0
    assert not any(k.startswith("lowq") for k in summary)


def test_plots_write_non_empty_pngs(tmp_path):
    groups = np.array([0] * 10 + [1] * 5 + [2] * 4 + [3] * 3)
    records = [_separated_record(groups, step) for step in (0, 50)]
    plot_angle_distributions(records, groups, tmp_path / "angles.png", title="toy")
    plot_center_drift(
        [0, 50],
        [{"center_to_clean_mean_deg": 9.0}, {"drift_deg_mean": 2.0}],
        tmp_path / "drift.png",
    )
    for name in ("angles.png", "drift.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_angle_probe_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    n, size, d, c = 24, 8, 6, 5
    images = rng.integers(0, 256, size=(n, 10, 10, 3), dtype=np.uint8)
    labels = np.arange(n) % 4  # class 4 is never probed
    groups = np.array([0, 1, 2, 3] * 6)
    true = np.where(groups == 2, -1, np.where(groups == 1, (labels + 1) % 4, labels))
    probe = AngleProbe(
        images,
        labels,
        groups,
        true_labels=true,
        indices=np.arange(n) * 3,
        input_size=size,
        batch_size=10,
    )
    proj = _linear(3 * size * size, d, 4)

    def embed(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
        return x.flatten(1) @ proj

    w0 = rng.normal(size=(c, d))
    w1 = w0.copy()
    w1[0] = w0[0] + 0.3 * rng.normal(size=d)
    first = probe.record(10, embed, _cosine_fn(w0), w0)
    second = probe.record(20, embed, _cosine_fn(w1), w1)
    assert "probe_drift_deg_mean" not in first and "probe_auc_open" in first
    u0, u1 = (
        w0[:4] / np.linalg.norm(w0[:4], axis=1)[:, None],
        w1[:4] / np.linalg.norm(w1[:4], axis=1)[:, None],
    )
    drift = np.degrees(np.arccos(np.clip((u0 * u1).sum(1), -1, 1))).mean()  # probed classes only
    assert second["probe_drift_deg_mean"] == pytest.approx(drift, abs=1e-4)
    assert all(r.embeddings is None for r in probe.records)

    final = probe.save(tmp_path)
    out = tmp_path / "analysis"
    with np.load(out / "angles.npz") as z:
        assert z["step"].tolist() == [10, 20]
        assert z["cos_label"].shape == z["max_neg"].shape == z["cos_true"].shape == (2, n)
        np.testing.assert_array_equal(z["indices"], np.arange(n) * 3)
        np.testing.assert_array_equal(z["groups"], groups)
        np.testing.assert_array_equal(np.isnan(z["cos_true"][1]), groups == 2)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["stages"]] == [10, 20]
    assert summary["groups"]["open-set noise"] == 6
    assert final["step"] == 20 and final["drift_deg_mean"] == second["probe_drift_deg_mean"]
    for name in ("angles.png", "center_drift.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert {f"{k}_angle_mean" for k in GROUP_KEYS} <= set(final)


def test_sub_center_probe_uses_each_class_dominant_sub_center_and_state_round_trips():
    rng = np.random.default_rng(5)
    n, size, d, c, k = 24, 8, 6, 4, 3
    images = rng.integers(0, 256, size=(n, 10, 10, 3), dtype=np.uint8)
    labels, groups = np.arange(n) % c, np.zeros(n, dtype=np.int64)
    proj = _linear(3 * size * size, d, 4)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ proj

    def make() -> AngleProbe:
        return AngleProbe(images, labels, groups, input_size=size, batch_size=10)

    subs = [rng.normal(size=(c * k, d)) for _ in range(2)]
    sub_probe, hand_probe = make(), make()
    for step, w in enumerate(subs):
        # by hand: each sample's nearest sub-center of its class, then the class's majority
        emb = np.stack([embed(to_tensor_normalized(resize_to(im, size)[None]))[0].numpy()
                        for im in images]).astype(np.float64)  # fmt: skip
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        own = w.reshape(c, k, d)[labels]
        own = own / np.linalg.norm(own, axis=2, keepdims=True)
        nearest = np.einsum("nkd,nd->nk", own, emb).argmax(1)
        dominant = [np.bincount(nearest[labels == cls], minlength=k).argmax() for cls in range(c)]
        hand = w.reshape(c, k, d)[np.arange(c), dominant]
        pooled = w.reshape(c, k, d)

        def sub_cos(e: torch.Tensor, pooled=pooled) -> torch.Tensor:
            unit = pooled / np.linalg.norm(pooled, axis=2, keepdims=True)
            cos = torch.einsum("nd,ckd->nck", e.double(), torch.from_numpy(unit))
            return cos.amax(2)

        got = sub_probe.record(step, embed, sub_cos, w, k=k)
        want = hand_probe.record(step, embed, sub_cos, hand)
        for key in ("probe_center_to_clean_mean_deg", "probe_drift_deg_mean"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-4)
    assert "probe_drift_deg_mean" in got
    restored = make()
    restored.load_state_dict(sub_probe.state_dict())
    assert restored.summaries == sub_probe.summaries and len(restored.records) == 2
    w = subs[0]
    assert restored.record(5, embed, sub_cos, w, k=k) == sub_probe.record(5, embed, sub_cos, w, k=k)


def _captured_figures(monkeypatch) -> list:
    """Figures the analysis module saves, kept open for inspection."""
    import robustface.train.analysis as analysis

    figures: list = []
    original = analysis.save_figure

    def keep(fig, path):
        figures.append(fig)
        original(fig, path)

    monkeypatch.setattr(analysis, "save_figure", keep)
    return figures


def test_stages_are_spread_by_step_not_by_index():
    steps = [10, 20, 30, 40, 50, 60, 70, 80, 90, 200]
    # evenly spaced steps 10, 73.3, 136.7, 200: nearest stages 10, 70, 90 (46.7 away; 200 is
    # 63.3 away), 200; spreading by index would give 10, 40, 70, 200
    assert stages_by_step(steps, 4).tolist() == [0, 6, 8, 9]
    assert stages_by_step([0, 50, 100, 150, 200, 250, 300], 4).tolist() == [0, 2, 4, 6]
    assert stages_by_step([5, 300], 4).tolist() == [0, 1]  # each stage at most once
    assert stages_by_step([7], 4).tolist() == [0]


def test_angle_axis_fits_the_data_with_a_margin(monkeypatch, tmp_path):
    # range 70..110 (40 degrees): 10% = 4 degrees each side
    assert angle_axis_range([np.array([70.0, 90.0]), np.array([110.0, np.nan])]) == (66.0, 114.0)
    assert angle_axis_range([np.array([89.5, 90.5])]) == (87.0, 93.0)  # at least 2 degrees
    assert angle_axis_range([np.array([1.0, 179.0])]) == (0.0, 180.0)  # within [0, 180]
    assert angle_axis_range([np.array([np.nan])]) == (0.0, 180.0)
    figures = _captured_figures(monkeypatch)
    groups = np.array([0] * 6 + [1] * 4)
    cos = np.cos(np.radians(np.linspace(70.0, 110.0, 10))).astype(np.float32)
    record = ProbeRecord(0, cos, cos[::-1].copy(), np.zeros(10, np.int64), cos)
    plot_angle_distributions([record], groups, tmp_path / "angles.png")
    lo, hi = figures[0].axes[0].get_xlim()  # float32 cosines: 70 and 110 up to rounding
    assert lo == pytest.approx(66.0, abs=1.0) and hi == pytest.approx(114.0, abs=1.0)


def test_run_comparison_plots_each_loss_on_its_own_axis(monkeypatch, tmp_path):
    runs = {}
    for name, scale in (("arcface", 20.0), ("robust", 2.0)):
        run = tmp_path / name
        (run / "analysis").mkdir(parents=True)
        rows = [{"step": s, "loss": scale / s} for s in (1, 2, 3)] + [{"step": 3, "probe_x": 1.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cos = np.cos(np.radians([[80.0, 85.0, 100.0]]))
        np.savez(run / "analysis" / "angles.npz", cos_label=cos, groups=np.array([0, 0, 1]),
                 step=np.array([3]))  # fmt: skip
        runs[name] = run
    figures = _captured_figures(monkeypatch)
    plot_run_angles(runs, tmp_path / "demo.png", "toy")
    axes = figures[0].axes
    assert len(axes) == 4  # a loss axis and an angle axis per run
    for col, scale in enumerate((20.0, 2.0)):
        (line,) = axes[col].get_lines()  # one loss per axis
        np.testing.assert_allclose(line.get_ydata(), [scale, scale / 2, scale / 3])
        assert axes[col].get_ylim()[1] < 1.2 * scale
    # angles 80..100 in both runs: one axis, 2 degrees of margin (10% of 20) each side
    assert axes[2].get_xlim() == axes[3].get_xlim()
    np.testing.assert_allclose(axes[2].get_xlim(), (78.0, 102.0), atol=1.0)
    assert (tmp_path / "demo.png").read_bytes().startswith(PNG_MAGIC)
