"""Small-loss selection: the per-sample ArcFace loss, the split on planted losses, the writer."""

import json
import math

import numpy as np
import pytest

from robustface.clean.dirty import load_truth, make_dirty_synthface
from robustface.clean.smallloss import sample_losses, split_losses
from robustface.cli import main
from robustface.data.recordio import RecordIODataset
from synth_configs import TINY_DIRTY, train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arcface_loss_by_hand(x, y, w, k, s, m):
    """-log softmax of s * [cos(theta_y + m), cos(theta_j)] at y, one sample at a time."""
    x = x / np.linalg.norm(x)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = [max(float(w[c * k + j] @ x) for j in range(k)) for c in range(w.shape[0] // k)]
    logits = [s * math.cos(math.acos(c) + m) if i == y else s * c for i, c in enumerate(cos)]
    top = max(logits)
    return -(logits[y] - top - math.log(sum(math.exp(v - top) for v in logits)))


@pytest.mark.parametrize("k", [1, 3])
def test_losses_match_the_formula_written_out(k):
    rng = np.random.default_rng(k)
    c, d, n = 5, 8, 40
    w = rng.normal(size=(c * k, d))
    y = rng.integers(0, c, n)
    # samples near their own class's first centre: theta_y + m stays below pi (no fallback)
    x = w[y * k] / np.linalg.norm(w[y * k], axis=1, keepdims=True) + 0.3 * rng.normal(size=(n, d))
    got = sample_losses(x, y, w, k, scale=16.0, margin=0.5)
    want = [_arcface_loss_by_hand(x[i], y[i], w, k, 16.0, 0.5) for i in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="labels must be"):
        sample_losses(x, np.full(n, c), w, k)


def test_mixture_keeps_exactly_the_planted_low_losses():
    rng = np.random.default_rng(0)
    low = rng.normal(0.5, 0.1, 300)
    high = rng.normal(6.0, 0.5, 100)
    losses = np.concatenate([low, high])[order := rng.permutation(400)]
    split = split_losses(losses)
    assert split.method == "gmm"
    np.testing.assert_array_equal(split.keep, order < 300)
    assert split.info["weights"][0] == pytest.approx(0.75, abs=0.01)
    assert split.p_clean[split.keep].min() > 0.5 > split.p_clean[~split.keep].max()
    # the fixed fraction: the lowest 60%, ties broken by the lower index
    fixed = split_losses(losses, keep_fraction=0.6)
    assert fixed.keep.sum() == 240 and losses[fixed.keep].max() <= losses[~fixed.keep].min()
    ties = split_losses(np.array([1.0, 0.0, 1.0, 1.0]), keep_fraction=0.5)
    assert ties.keep.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="keep_fraction"):
        split_losses(losses, keep_fraction=0.0)
    with pytest.raises(ValueError, match="distinct values"):
        split_losses(np.ones(10))
    with pytest.warns(UserWarning, match="low-loss component holds only 25%"):
        split_losses(np.concatenate([low[:100], rng.normal(6.0, 0.5, 300)]))


def test_cli_writes_the_kept_set_like_the_loop(tmp_path, capsys):
    info = make_dirty_synthface(tmp_path / "dirty", TINY_DIRTY, workers=1, progress=False)
    data = info.train
    train_tiny(tmp_path / "run", data)
    out = tmp_path / "kept"
    args = ["clean", "small-loss", str(tmp_path / "run"), "--out", str(out), "--quiet"]
    assert main([*args, "--keep-fraction", "0.5"]) == 0
    assert "| closed" in capsys.readouterr().out
    source, kept = RecordIODataset(data), RecordIODataset(out)
    z = np.load(out / "losses.npz")
    origin = np.load(out / "origin.npy")
    # the kept records are the lowest-loss half, written with their own labels and bytes
    assert len(kept) == len(source) // 2 == int(z["keep"].sum())
    np.testing.assert_array_equal(np.sort(origin), np.flatnonzero(z["keep"]))
    assert z["loss"][z["keep"]].max() <= z["loss"][~z["keep"]].min()
    summary = json.loads((out / "cleaned.json").read_text())
    assert summary["loss"] == {"name": "arcface", "scale": 16.0, "margin": 0.5}
    mapping = np.loadtxt(out / "label_map.csv", delimiter=",", skiprows=1, dtype=int)[:, 1]
    np.testing.assert_array_equal(kept.labels, mapping[source.labels[origin]])
    for i in (0, len(kept) // 2, len(kept) - 1):
        np.testing.assert_array_equal(kept[i][0], source[int(origin[i])][0])
    truth, sub = load_truth(data), load_truth(out)
    np.testing.assert_array_equal(sub.kind, truth.kind[origin])
    kinds = summary["truth"]
    assert sum(v["kept"] for v in kinds.values()) == len(kept)
    assert kinds["closed"]["kept"] == int(np.sum(truth.kind[origin] == 1))
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(p.name for p in data.glob("*.bin"))
    # bad options are one-line errors before any work; the default (mixture) split; an
    # existing output needs --overwrite
    assert main([*args, "--overwrite", "--keep-fraction", "2"]) == 2
    assert "keep_fraction must be in (0, 1]" in capsys.readouterr().err
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert "gmm" in capsys.readouterr().out
