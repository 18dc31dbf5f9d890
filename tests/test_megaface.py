"""MegaFace: faiss-based identification / verification against a brute-force numpy recomputation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from robustface.cli import main
from robustface.errors import DataFormatError, ParameterTypeError
from robustface.evaluate.megaface import (
    FeatureSource,
    ImageEmbedder,
    evaluate_megaface,
    format_megaface,
    load_feature_set,
    noise_mask,
    read_devkit_feature,
    read_devkit_list,
    read_noise_list,
    run_megaface,
    save_feature_cache,
    write_devkit_feature,
)

FAST = ["--sizes", "10", "50", "--far", "0.05", "--quiet"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(seed: int = 0, identities: int = 20, d: int = 16, distractors: int = 300):
    """Probes around identity centres (1..6 images each) and unrelated random distractors."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(identities), rng.integers(1, 7, identities))
    centres = rng.normal(size=(identities, d))
    probes = (centres[ids] + 0.9 * rng.normal(size=(ids.size, d))).astype(np.float32)
    return probes, ids, rng.normal(size=(distractors, d)).astype(np.float32)


def _brute_force(probes, ids, distractors, size, max_rank, far, probe_noisy, distractor_noisy):
    """The protocol spelled out with full score matrices and explicit loops."""
    p = _unit(probes)
    for i in np.flatnonzero(probe_noisy):
        clean = (ids == ids[i]) & ~probe_noisy
        centre = p[clean].astype(np.float64).sum(axis=0)
        p[i] = centre / np.linalg.norm(centre)
    scores = p @ _unit(distractors[:size]).T  # P x N
    scores[:, distractor_noisy[:size]] = -np.inf  # pushed away
    ranks, positives = [], []
    for a in range(len(ids)):
        for b in range(len(ids)):
            if a != b and ids[a] == ids[b]:
                s = float(p[a] @ p[b])
                ranks.append(1 + int(np.sum(scores[a] > s)))
                if a < b:
                    positives.append(s)
    ranks, positives = np.array(ranks), np.array(positives)
    cmc = [float(np.mean(ranks <= r)) for r in range(1, max_rank + 1)]
    negatives = np.sort(scores.ravel())[::-1]
    allowed = math.floor(far * negatives.size * (1 + 1e-12))
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    return cmc, float(np.mean(positives > threshold)), len(ranks)


@pytest.mark.parametrize("noise", [False, True])
def test_matches_brute_force(noise):
    probes, ids, distractors = _planted()
    rng = np.random.default_rng(1)
    probe_noisy = np.zeros(ids.size, bool)
    distractor_noisy = np.zeros(distractors.shape[0], bool)
    if noise:
        probe_noisy[[0, 7, 30]] = True
        distractor_noisy[rng.random(distractors.shape[0]) < 0.1] = True
    results = evaluate_megaface(
        probes,
        ids,
        distractors,
        sizes=(10, 50, 300, 5000),
        far=1e-2,
        probe_noisy=probe_noisy,
        distractor_noisy=distractor_noisy,
        batch_size=64,
    )
    assert sorted(results["sizes"]) == [10, 50, 300]  # 5000 capped to the 300 available
    for size, r in results["sizes"].items():
        cmc, tar, trials = _brute_force(
            probes, ids, distractors, size, 10, 1e-2, probe_noisy, distractor_noisy
        )
        assert results["num_trials"] == trials
        np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
        assert r["tar"] == pytest.approx(tar, abs=1e-12)
        assert r["far"] <= 1e-2
        assert r["noisy_distractors"] == int(distractor_noisy[:size].sum())
    assert 0.2 < results["sizes"][300]["rank1"] < 0.9  # neither trivial nor hopeless
    table = format_megaface(results)
    assert "Id rank-1 (%)" in table and "Ver TAR@FAR=0.01 (%)" in table


def test_perfect_separation_and_tiny_far():
    probes, ids, distractors = _planted(identities=5)
    probes = np.eye(16, dtype=np.float32)[ids] + 1e-3 * probes  # identities on the axes
    distractors = np.abs(distractors) * -1  # all far from every probe
    results = evaluate_megaface(probes, ids, distractors, sizes=(100,), far=1e-6)
    r = results["sizes"][100]
    assert r["cmc"] == [1.0] * 10 and r["tar_insightface"] == 1.0 and r["far"] == 0.0
    # P x 100 impostor pairs (P < 10,000) cannot measure FAR 1e-6
    assert r["tar"] is None and r["min_measurable_far"] == 1 / (ids.size * 100)


def test_tar_at_a_far_the_distractors_cannot_measure():
    probes, ids, distractors = _planted()
    n = ids.size
    far = 1 / (n * 20)  # measurable from 20 distractors on: P x 20 impostor pairs
    results = evaluate_megaface(probes, ids, distractors, sizes=(10, 19, 20, 50), far=far)
    no_noise = (np.zeros(n, bool), np.zeros(distractors.shape[0], bool))
    for size, r in results["sizes"].items():
        _, tar, _ = _brute_force(probes, ids, distractors, size, 10, far, *no_noise)
        assert r["tar_insightface"] == pytest.approx(tar, abs=1e-12)  # the devkit's number
        assert r["num_negatives"] == n * size and r["min_measurable_far"] == 1 / (n * size)
        assert r["tar"] == (pytest.approx(tar, abs=1e-12) if size >= 20 else None)
    table = format_megaface(results)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:6]]
    t = {s: f"{100 * r['tar_insightface']:.2f}" for s, r in results["sizes"].items()}
    assert [row[-1] for row in rows] == ["n/m", "n/m", t[20], t[50]]
    note = table.splitlines()[-1]
    assert note.startswith("n/m: not measurable (FAR ")
    assert f"x 19 distractors give {19 * n:,}" in note
    table = format_megaface(results, "insightface")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:6]]
    assert [row[-1] for row in rows] == [t[10] + "*", t[19] + "*", t[20], t[50]]
    assert table.splitlines()[-1].startswith("*: not measurable")


def test_bad_inputs():
    probes, ids, distractors = _planted()
    with pytest.raises(ValueError, match="probe_ids must have"):
        evaluate_megaface(probes, ids[:-1], distractors)
    with pytest.raises(ValueError, match="distractor_feats must be D x 16"):
        evaluate_megaface(probes, ids, distractors[:, :8])
    with pytest.raises(ValueError, match=r"far must be in \(0, 1\), got 0\.0"):
        evaluate_megaface(probes, ids, distractors, far=0.0)
    with pytest.raises(ParameterTypeError, match="max_rank must be an integer, got str '1'"):
        evaluate_megaface(probes, ids, distractors, max_rank="1")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluate_megaface(probes, ids, distractors, batch_size=0)
    with pytest.raises(ValueError, match="no probe identity has two"):
        evaluate_megaface(probes[:3], np.arange(3), distractors)
    bad = distractors.copy()
    bad[5] = 0.0
    with pytest.raises(ValueError, match="distractor_feats row 5"):
        evaluate_megaface(probes, ids, bad)
    only_noisy = ids == ids[0]
    with pytest.raises(ValueError, match="only noisy images"):
        evaluate_megaface(probes, ids, distractors, probe_noisy=only_noisy)


def test_devkit_files_noise_lists_and_caches(tmp_path):
    vec = np.arange(5, dtype=np.float32)
    write_devkit_feature(tmp_path / "a.jpg_algo.bin", vec)
    raw = (tmp_path / "a.jpg_algo.bin").read_bytes()
    assert np.frombuffer(raw[:16], "<i4").tolist() == [5, 1, 4, 5]  # rows, cols, size, CV_32FC1
    np.testing.assert_array_equal(read_devkit_feature(tmp_path / "a.jpg_algo.bin"), vec)
    (tmp_path / "short.bin").write_bytes(raw[:30])
    with pytest.raises(DataFormatError, match="header says 5 x 1"):
        read_devkit_feature(tmp_path / "short.bin")

    (tmp_path / "noises.txt").write_text("# comment\n0\t949/owner@N00/1_0.jpg\nAl_B_3.png\n\n")
    noises = read_noise_list(tmp_path / "noises.txt")
    assert noises == {"949/owner@N00/1_0.jpg", "Al_B_3.png"}
    paths = ["FlickrFinal2/949/owner@N00/1_0.jpg", "949/owner@N00/2_0.jpg"]
    assert noise_mask(paths, noises, 3).tolist() == [True, False]
    assert noise_mask(["Al_B/Al_B_3.png", "Al_B/Al_B_4.png"], noises, 1).tolist() == [True, False]

    feats = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    save_feature_cache(tmp_path / "c.npz", feats, paths=["x/1.png", "x/2.png"], labels=["x", "x"])
    loaded = load_feature_set(tmp_path / "c.npz")
    np.testing.assert_array_equal(loaded.features, feats)
    assert loaded.paths == ["x/1.png", "x/2.png"] and loaded.labels.tolist() == ["x", "x"]
    with pytest.raises(ValueError, match="paths must have 2 entries"):
        save_feature_cache(tmp_path / "d.npz", feats, paths=["x"])
    # an empty devkit list is named, not reported later as "IMAGES: no images to embed"
    (tmp_path / "empty.json").write_text('{"path": [], "id": []}')
    with pytest.raises(DataFormatError, match=r"empty\.json: its \"path\" list is empty"):
        read_devkit_list(tmp_path / "empty.json")


def test_cli_devkit_directories_and_cache(tmp_path, capsys):
    """The same numbers from devkit feature directories + JSON lists and from .npy/.npz files."""
    probes, ids, distractors = _planted(identities=6, distractors=50)
    probe_paths = [f"id{i}/id{i}_{k}.png" for k, i in enumerate(ids)]
    mf_paths = [f"{k % 3}/owner{k}/{k}_0.jpg" for k in range(len(distractors))]
    for root, rel, feats in (("fs", probe_paths, probes), ("mf", mf_paths, distractors)):
        for path, vec in zip(rel, feats, strict=True):
            write_devkit_feature(tmp_path / root / f"{path}_algo.bin", vec)
    (tmp_path / "fs.json").write_text(json.dumps({"path": probe_paths, "id": ids.tolist()}))
    (tmp_path / "mf.json").write_text(json.dumps({"path": mf_paths}))
    (tmp_path / "mf_noises.txt").write_text(f"{mf_paths[3]}\n{mf_paths[9]}\n")
    (tmp_path / "fs_noises.txt").write_text("id0_0.png\n")
    args = {
        "--probe-features": "fs",
        "--probe-list": "fs.json",
        "--distractor-features": "mf",
        "--distractor-list": "mf.json",
        "--facescrub-noises": "fs_noises.txt",
        "--megaface-noises": "mf_noises.txt",
        "--out": "run",
    }
    paths = [x for flag, name in args.items() for x in (flag, str(tmp_path / name))]
    code = main(["eval", "megaface", *paths, "--file-ending", "_algo.bin", *FAST])
    assert code == 0
    report = json.loads((tmp_path / "run" / "megaface.json").read_text())
    assert report["kind"] == "megaface" and report["model"] is None
    assert report["results"]["num_noisy_probes"] == 1
    assert report["results"]["sizes"]["50"]["noisy_distractors"] == 2
    assert (tmp_path / "run" / "megaface.md").is_file()
    assert (tmp_path / "run" / "megaface_cmc.png").stat().st_size > 0

    noisy = np.zeros(len(ids), bool)
    noisy[0] = True
    d_noisy = np.zeros(len(distractors), bool)
    d_noisy[[3, 9]] = True
    expected = evaluate_megaface(
        probes,
        ids,
        distractors,
        sizes=(10, 50),
        far=0.05,
        probe_noisy=noisy,
        distractor_noisy=d_noisy,
    )
    np.testing.assert_allclose(
        report["results"]["sizes"]["50"]["cmc"], expected["sizes"][50]["cmc"]
    )
    np.save(tmp_path / "d.npy", distractors)
    np.save(tmp_path / "l.npy", ids)
    save_feature_cache(tmp_path / "p.npz", probes)
    capsys.readouterr()
    probe, labels, dist = (str(tmp_path / name) for name in ("p.npz", "l.npy", "d.npy"))
    code = main(
        ["eval", "megaface", "--probe-features", probe, "--distractor-features", dist, *FAST]
    )
    assert code == 2
    assert "labels" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "megaface",
            "--probe-features",
            probe,
            "--probe-labels",
            labels,
            "--distractor-features",
            dist,
            "--sizes",
            "50",
            "--far",
            "0.05",
        ]
    )
    assert code == 0
    assert "| 50 " in capsys.readouterr().out


def test_noise_list_matching_nothing_is_an_error_and_labels_keep_spaces(tmp_path):
    paths = ["facescrub/Aaron Eckhart/a_1.png", "facescrub/Aaron Eckhart/a_2.png"]
    assert noise_mask(paths, {"a_2.png"}, 1).tolist() == [False, True]
    with pytest.raises(ValueError, match="none of the 1 noise-list entries"):
        noise_mask(paths, {"b_9.png"}, 1)
    from robustface.evaluate.megaface import _read_labels

    labels = tmp_path / "labels.txt"
    labels.write_text("Aaron Eckhart\nAaron Eckhart\n\nAdam Brody\n")
    assert _read_labels(labels).tolist() == ["Aaron Eckhart", "Aaron Eckhart", "Adam Brody"]


def test_feature_cache_remembers_its_model(tmp_path):
    feats = np.eye(2, dtype=np.float32)
    save_feature_cache(tmp_path / "c.npz", feats, labels=["a", "b"], model_sha256="a" * 64)
    assert load_feature_set(tmp_path / "c.npz", model_sha256="a" * 64).features.shape == (2, 2)
    with pytest.raises(ValueError, match="features of another model"):
        load_feature_set(tmp_path / "c.npz", model_sha256="b" * 64)


def test_run_megaface_from_python_equals_the_evaluation_on_arrays(tmp_path):
    probes, ids, distractors = _planted(identities=6, distractors=50)
    paths = [f"id{i}/id{i}_{k}.png" for k, i in enumerate(ids)]
    save_feature_cache(tmp_path / "p.npz", probes, paths=paths, labels=ids)
    np.save(tmp_path / "d.npy", distractors)
    (tmp_path / "noises.txt").write_text("id0_0.png\n")
    probe = FeatureSource(features=tmp_path / "p.npz", noises=tmp_path / "noises.txt")
    run = run_megaface(probe, FeatureSource(features=tmp_path / "d.npy"), sizes=[10, 50], far=0.05)
    noisy = np.zeros(len(ids), bool)
    noisy[0] = True
    expected = evaluate_megaface(
        probes, ids, distractors, sizes=(10, 50), far=0.05, probe_noisy=noisy
    )
    for size in (10, 50):
        np.testing.assert_allclose(
            run.results["sizes"][size]["cmc"], expected["sizes"][size]["cmc"]
        )
    assert run.table == format_megaface(expected)
    assert run.config["facescrub_noises"] == tmp_path / "noises.txt" and run.config["sizes"] == [
        10,
        50,
    ]
    with pytest.raises(
        ValueError, match="exactly one of --distractor-features and --distractor-images"
    ):
        run_megaface(probe, FeatureSource())
    # only what is missing is named
    images, listed = (
        FeatureSource(images=tmp_path),
        FeatureSource(images=tmp_path, list_file=tmp_path / "list.json"),
    )
    embedder = ImageEmbedder(model=torch.nn.Identity(), input_size=112)
    distractors = FeatureSource(features=tmp_path / "d.npy")
    for source, model, message in (
        (images, None, "needs a MODEL and --probe-list$"),
        (listed, None, "needs a MODEL$"),
        (images, embedder, "needs --probe-list$"),
    ):
        with pytest.raises(ValueError, match=f"^--probe-images {message}"):
            run_megaface(source, distractors, embedder=model)
