"""The low-quality fusion benchmark: embedding of a track directory, fusion, scores, weights,
the plot and a smoke run of the whole pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from benchmark_scripts import load_benchmark
from robustface.cli import main
from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.synth.tracks import TRACKS_NAME, TrackConfig, build_tracks, length_dir
from robustface.deploy.align import align_face
from robustface.evaluate.roc import tar_at_far
from robustface.fuse import AGGREGATORS, CAFace, CAFaceAggregator, style_channels
from robustface.fuse.benchmark import (
    embed_tracks,
    evaluate_fusion,
    frame_weights,
    quality_oracle,
    run_fusion_benchmark,
    spearman,
)
from robustface.fuse.plot import plot_track_fusion, track_plot_data
from robustface.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRACKS = TrackConfig(
    identities=4, first_identity=50, gallery_images=2, tracks_per_identity=2, lengths=(1, 3, 6)
)
SIZE = 32


@pytest.fixture(scope="module")
def tracks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracks") / "t"
    return build_tracks(out, TRACKS, workers=1, progress=False).path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone("r18_tiny", input_size=SIZE, width=0.125, embedding_size=512).eval()


@pytest.fixture(scope="module")
def caface(model) -> CAFaceAggregator:
    torch.manual_seed(1)
    return CAFaceAggregator(CAFace(style_channels=style_channels(model)), chunk_size=4)


@pytest.fixture(scope="module")
def feats(model, tracks):
    return embed_tracks(model, tracks, SIZE, batch_size=7)


def _direct_features(model, root: Path, names: list[str]) -> np.ndarray:
    """model(aligned crop) for each image, aligned one by one from the meta of the longest set."""
    meta = read_ijb_meta(length_dir(root, TRACKS.lengths[-1]), TRACKS_NAME)
    row = {n: i for i, n in enumerate(meta.images.tolist())}
    out = []
    for name in names:
        image = decode_image((root / "loose_crop" / name).read_bytes())
        crop = align_face(image, meta.landmarks[row[name]], SIZE)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            out.append(model(x)[0].numpy())
    return np.stack(out)


def test_embedded_rows_are_the_images_features(model, tracks, feats):
    summary = json.loads((tracks / "tracks.json").read_text())
    track = summary["tracks"][5]
    np.testing.assert_allclose(
        feats.features[feats.tracks[5]], _direct_features(model, tracks, track["frames"]), atol=2e-4
    )
    gallery = summary["gallery"]["images"][2]
    np.testing.assert_allclose(
        feats.features[feats.gallery[2]], _direct_features(model, tracks, gallery), atol=2e-4
    )
    assert feats.track_identity.tolist() == [50, 50, 51, 51, 52, 52, 53, 53]
    assert feats.quality[feats.tracks[5]].tolist() == pytest.approx(track["quality"])
    assert feats.styles.shape == (len(feats.features), style_channels(model), 2)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("method", ["mean", "norm_weighted", "quality_oracle"])
def test_scores_against_brute_force(feats, method):
    fusion = quality_oracle(feats) if method == "quality_oracle" else AGGREGATORS.build(method)
    results = evaluate_fusion(feats, fusion, fars=(0.05, 0.3, 0.01))
    gallery = _unit(np.stack([_unit(feats.features[r]).sum(0) for r in feats.gallery]))
    for length, result in results.items():
        x = feats.features[feats.tracks[:, :length]]
        q = feats.quality[feats.tracks[:, :length]][..., None] + 1e-4
        terms = {"mean": _unit(x), "norm_weighted": x, "quality_oracle": q * _unit(x)}[method]
        probe = _unit(terms.sum(1))
        scores = probe @ gallery.T  # (tracks, identities)
        same = feats.track_identity[:, None] == feats.gallery_identity[None, :]
        best = feats.gallery_identity[scores.argmax(1)]
        assert result["rank1"] == pytest.approx(np.mean(best == feats.track_identity))
        assert result["impostor_pairs"] == 8 * 3 and result["genuine_pairs"] == 8
        expected = tar_at_far(scores.ravel(), same.ravel(), (0.05, 0.3, 0.01))
        assert result["tar_at_far"] == pytest.approx(expected)
        assert result["tar_at_far"][0.01] is None  # 0.01 * 24 impostor pairs < 1


def test_frame_weights(feats, caface):
    rows = feats.tracks[3]
    x, s = feats.features[rows], feats.styles[rows]
    fused, w = frame_weights(AGGREGATORS.build("mean"), x, s)
    np.testing.assert_allclose(w, np.full(len(rows), 1 / len(rows)))
    np.testing.assert_allclose(fused, _unit(_unit(x).sum(0)), atol=1e-6)
    fused, w = frame_weights(AGGREGATORS.build("norm_weighted"), x, s)
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(w, norms / norms.sum(), rtol=1e-5)
    np.testing.assert_allclose(fused, _unit(x.sum(0)), atol=1e-6)
    fused, w = frame_weights(caface, x, s)
    assert w.shape == (len(rows),) and w.sum() == pytest.approx(1.0, abs=1e-5) and (w > 0).all()
    np.testing.assert_allclose(fused, caface.fuse(x, s).numpy(), atol=1e-6)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman(b, -b) == pytest.approx(-1.0)


def test_plot_values_and_png(model, tracks, caface, tmp_path):
    aggregators = {"mean": AGGREGATORS.build("mean"), "caface": caface}
    data = track_plot_data(model, SIZE, tracks, aggregators, track=5, length=5, thumbnails=3)
    summary = json.loads((tracks / "tracks.json").read_text())
    track = summary["tracks"][5]
    gallery = summary["gallery"]["images"][summary["gallery"]["identity"].index(52)]
    g = _unit(_unit(_direct_features(model, tracks, gallery)).sum(0))
    x = _direct_features(model, tracks, track["frames"][:5])
    np.testing.assert_allclose(data.cosine, _unit(x) @ g, atol=1e-4)
    np.testing.assert_allclose(data.weights["mean"], np.full(5, 0.2))
    assert data.fused_cosine["mean"] == pytest.approx(float(_unit(_unit(x).sum(0)) @ g), abs=1e-4)
    assert data.weights["caface"].sum() == pytest.approx(1.0, abs=1e-5)
    assert data.quality.tolist() == track["quality"][:5]
    assert data.identity == 52 and len(data.thumbnails) == 3
    out = tmp_path / "plot.png"
    plot_track_fusion(data, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_track_fusion(data, tmp_path / "q.png", x="quality")
    with pytest.raises(ValueError, match="x"):
        plot_track_fusion(data, tmp_path / "bad.png", x="time")
    with pytest.raises(ValueError, match="track"):
        track_plot_data(model, SIZE, tracks, aggregators, track=8)


def test_benchmark_smoke_run(tmp_path, capsys):
    script = load_benchmark("fusion_lowq")
    args = argparse.Namespace(
        out=str(tmp_path / "bench"),
        track_seeds=[0, 1],
        caface_seeds=[0],
        no_caface=False,
        caface_set=[],
        views=2,
        workers=1,
        smoke=True,
        quiet=True,
    )
    results = run_fusion_benchmark(script.config(args))
    runs = results["runs"]
    assert [(r["method"], r["track_seed"], r["fusion_seed"]) for r in runs] == [
        ("mean", 0, -1), ("norm_weighted", 0, -1), ("caface", 0, 0), ("quality_oracle", 0, -1),
        ("mean", 1, -1), ("norm_weighted", 1, -1), ("caface", 1, 0), ("quality_oracle", 1, -1),
    ]  # fmt: skip
    assert (tmp_path / "bench" / "caface_s0" / "caface.ckpt").is_file()
    for run in runs:
        assert list(run["lengths"]) == [1, 4, 8]
        for cell in run["lengths"].values():
            assert 0.0 <= cell["rank1"] <= 1.0 and cell["impostor_pairs"] == 12
    # one frame: the linear fusions give that frame's direction (CAFace weighs its channels)
    assert runs[0]["lengths"][1] == runs[1]["lengths"][1] == runs[3]["lengths"][1]
    ranks = [r["lengths"][8]["rank1"] for r in runs if r["method"] == "mean"]
    summary = results["summary"]
    assert summary["mean"]["lengths"][8]["rank1"]["mean"] == pytest.approx(np.mean(ranks))
    assert summary["mean"]["lengths"][8]["rank1"]["std"] == pytest.approx(np.std(ranks, ddof=1))
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["summary"]["norm_weighted-mean"]["8"]["n"] == 2
    assert saved["summary"]["caface-norm_weighted"]["8"]["n"] == 2
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| norm_weighted-mean (paired) " in table and "| caface " in table
    # finished stages are reused: the same numbers, and no new training
    trained = [
        tmp_path / "bench" / "backbone" / "backbone.pth",
        tmp_path / "bench" / "caface_s0" / "caface.ckpt",
        tmp_path / "bench" / "tracks_s1" / "tracks.json",
    ]
    stamps = [p.stat().st_mtime_ns for p in trained]
    again = run_fusion_benchmark(script.config(args))
    assert again["runs"] == runs and [p.stat().st_mtime_ns for p in trained] == stamps
    # the picture from the benchmark's output: its backbone, CAFace and first track directory
    bench = tmp_path / "bench"
    argv = ["fuse", "plot", str(bench / "backbone"), str(bench), "--out", str(tmp_path / "p.png")]
    assert main([*argv, "--fusion-model", str(bench / "caface_s0" / "caface.ckpt")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert f"track 0 of {bench / 'tracks_s0'} (8 frames" in printed and "caface " in printed
    assert main(argv) == 2
    assert "--fusion-model: the caface panel needs" in capsys.readouterr().err
    assert main([*argv[:3], str(tmp_path), *argv[4:], "--fusion", "mean"]) == 2
    assert "neither a track directory" in capsys.readouterr().err


def test_plot_names_a_fusion_model_of_another_dimension(model, tracks, tmp_path, capsys):
    weights = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), weights)
    narrow = tmp_path / "narrow.ckpt"
    state = CAFace(style_channels=style_channels(model), feature_dim=16).state_dict()
    torch.save({"state_dict": {f"aggregator.{k}": v for k, v in state.items()}}, narrow)
    argv = ["fuse", "plot", str(weights), str(tracks), "--out", str(tmp_path / "p.png")]
    argv += ["--input-size", str(SIZE), "--fusion-model", str(narrow)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"fusion_model {narrow}: the caface aggregator fuses 16-d features" in err
    assert "the backbone's embeddings are 512-d" in err


def test_plot_errors_name_the_options(model, tracks, tmp_path, capsys):
    """A bad --track or --length is named as the option."""
    weights = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), weights)
    argv = ["fuse", "plot", str(weights), str(tracks), "--out", str(tmp_path / "p.png")]
    argv += ["--input-size", str(SIZE), "--fusion", "mean"]
    count = len(json.loads((tracks / "tracks.json").read_text())["tracks"])
    for extra, message in (
        (["--track", "99"], f"--track must be >= 0 and <= {count - 1}, got 99"),
        (["--length", "0"], "--length must be >= 1, got 0"),
    ):
        assert main([*argv, *extra]) == 2
        assert capsys.readouterr().err.strip().endswith(f"error: {message}")
