"""Video-like SynthFace probe tracks: determinism, IJB layout, quality along a track."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from robustface.config import SynthConfig
from robustface.data.ijb import read_ijb_meta
from robustface.data.synth.builder import build_synthface
from robustface.data.synth.render import quality_score
from robustface.data.synth.tracks import (
    TRACKS_NAME,
    TrackConfig,
    build_tracks,
    check_disjoint,
    length_dir,
    read_tracks,
    track_nuisances,
)
from robustface.evaluate.ijb import read_ijb_1n_meta

TINY = TrackConfig(
    identities=3,
    first_identity=50,
    gallery_images=2,
    tracks_per_identity=1,
    lengths=(2, 6),
    image_size=64,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tracks(
        tmp_path_factory.mktemp("tracks") / "t", TINY, workers=1, progress=False
    ).path


def test_same_config_same_bytes_other_seed_other_frames(tiny, tmp_path):
    again = build_tracks(tmp_path / "again", TINY, workers=1, progress=False).path
    assert _files(again) == _files(tiny)
    other = build_tracks(
        tmp_path / "other", dataclasses.replace(TINY, seed=1), workers=1, progress=False
    ).path
    a, b = _files(tiny), _files(other)
    assert a.keys() == b.keys()
    assert a["loose_crop/10.jpg"] != b["loose_crop/10.jpg"]


@pytest.mark.slow
def test_byte_identical_for_any_worker_count(tiny, tmp_path):
    other = build_tracks(tmp_path / "w2", TINY, workers=2, progress=False).path
    assert _files(other) == _files(tiny)


def test_ijb_layout_per_length_and_prefixes(tiny):
    summary = read_tracks(tiny)
    tracks = summary["tracks"]
    assert [t["identity"] for t in tracks] == [50, 51, 52]
    assert summary["gallery"]["identity"] == [50, 51, 52]
    for length in TINY.lengths:
        root = length_dir(tiny, length)
        meta = read_ijb_meta(root, TRACKS_NAME)
        # galleries 1..3 (2 images, each its own media), then one template per track
        gallery_rows = meta.templates <= 3
        assert np.bincount(meta.templates[gallery_rows]).tolist() == [0, 2, 2, 2]
        assert len(np.unique(meta.medias[gallery_rows])) == 6
        for k, track in enumerate(tracks):
            rows = meta.templates == 4 + k
            # the set of length L is the first L frames of the track, as one media
            assert meta.images[rows].tolist() == track["frames"][:length]
            assert len(np.unique(meta.medias[rows])) == 1
        assert all(p.is_file() for p in meta.image_paths())
        # every gallery against every track, genuine when the identities agree
        assert sorted(map(tuple, meta.pairs.tolist())) == [
            (g, p) for g in (1, 2, 3) for p in (4, 5, 6)
        ]
        np.testing.assert_array_equal(meta.pair_labels, (meta.pairs[:, 1] - meta.pairs[:, 0] == 3))
        one_n = read_ijb_1n_meta(root, TRACKS_NAME)
        assert one_n.galleries["G1"][0].tolist() == [1, 3]
        assert one_n.galleries["G1"][1].tolist() == [50, 52]
        assert one_n.galleries["G2"][0].tolist() == [2]
        assert one_n.probe[0].tolist() == [4, 5, 6]
        assert one_n.probe[1].tolist() == [50, 51, 52]
        faceness = dict(zip(meta.images.tolist(), meta.faceness.tolist(), strict=True))
        for track in tracks:
            for name, q in zip(track["frames"][:length], track["quality"], strict=False):
                assert faceness[name] == pytest.approx(0.5 + 0.5 * q, abs=1e-4)


def test_quality_varies_smoothly_along_a_track():
    rng = np.random.default_rng(0)
    frames, bad = track_nuisances(rng, 2000, smoothness=8.0, bad_frame_rate=0.1)
    q = np.array([quality_score(n) for n in frames])
    good = q[~bad]
    # quality spans a wide range along one track...
    assert np.percentile(q, 90) > 3 * np.percentile(q, 10) and q.std() > 0.05
    # ...and drifts like a video: neighbouring good frames are much closer than random pairs
    both_good = ~bad[1:] & ~bad[:-1]
    step = np.abs(np.diff(q))[both_good].mean()
    random_pairs = np.abs(good[:, None] - good[None, :]).mean()
    assert step < 0.35 * random_pairs
    # spoilt frames: about the configured rate, each far worse than its neighbours' level
    assert 0.07 < bad.mean() < 0.13
    assert np.median(q[bad]) < 0.5 * np.median(good)
    yaw = np.array([n.yaw for n in frames])
    assert np.abs(np.diff(yaw)).mean() < 0.2 * yaw.std()
    occluded = np.array([n.occlusion != "none" for n in frames])
    assert 0.0 < occluded.mean() < 0.6
    assert np.sum(occluded[1:] != occluded[:-1]) < 0.1 * occluded.sum()  # events, not flicker


def test_recorded_quality_is_the_rendered_frames_quality(tiny):
    summary = read_tracks(tiny)
    track = summary["tracks"][1]
    rng = np.random.default_rng([TINY.seed, 21, track["identity"], 0])
    frames, bad = track_nuisances(rng, TINY.track_length)
    assert track["quality"] == [round(quality_score(n), 4) for n in frames]
    assert track["bad"] == bad.tolist()
    assert track["blur"] == [round(n.blur_sigma, 3) for n in frames]


def test_disjoint_from_the_training_identities(tmp_path):
    synth = SynthConfig(
        identities=4,
        images_per_identity=1,
        open_set_identities=0,
        test_identities=20,
        lfw_pairs=0,
        cfp_fp_pairs=0,
        lowq_pairs=0,
        ijb_identities=0,
    )
    path = build_synthface(tmp_path / "s", synth, workers=1, progress=False).path
    check_disjoint(dataclasses.replace(TINY, first_identity=24), path)
    check_disjoint(dataclasses.replace(TINY, first_identity=0, seed=5), path)  # other people
    with pytest.raises(ValueError, match=r"first_identity: .* overlap the test identities 4\.\.23"):
        check_disjoint(dataclasses.replace(TINY, first_identity=22), path)
    with pytest.raises(ValueError, match="overlap the train identities"):
        build_tracks(tmp_path / "t", dataclasses.replace(TINY, first_identity=0), synthface=path)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lengths": (6, 2)}, "lengths: need increasing"),
        ({"lengths": ()}, "lengths: need increasing"),
        ({"identities": 1}, "identities"),
        ({"bad_frame_rate": 1.5}, "bad_frame_rate"),
    ],
)
def test_bad_config_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_tracks(tmp_path / "t", dataclasses.replace(TINY, **change), progress=False)


def test_existing_directory_needs_overwrite(tiny, tmp_path):
    with pytest.raises(FileExistsError):
        build_tracks(tiny, TINY, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"tracks\.json"):
        build_tracks(tmp_path / "mine", TINY, overwrite=True, progress=False)
    assert json.loads((tiny / "tracks.json").read_text())["images"] == 3 * 2 + 3 * 6
