"""robustface.deploy.gallery: fusion, search, persistence and the bad-input cases (foreign model,
embedding-size mismatch, concurrent writer, interrupted add)."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from robustface.deploy import gallery as gallery_mod
from robustface.deploy.gallery import Gallery, GalleryBusyError, IndexSpec

MODEL = {"path": "/models/a.pth", "sha256": "a" * 64, "embedding_size": 8}


def _data(n_ids: int = 6, per: int = 3, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, 8))
    names = [f"p{i}" for i in range(n_ids) for _ in range(per)]
    feats = np.repeat(centres, per, axis=0) + 0.3 * rng.normal(size=(n_ids * per, 8))
    return names, (feats * rng.uniform(5, 20, size=(len(names), 1))).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fusion_search_and_open_set_rejection(tmp_path):
    names, feats = _data()
    g = Gallery.create(tmp_path / "g", MODEL, names, feats)
    # mean: normalise(sum of unit features) per identity, written out
    expected = np.stack([_unit(_unit(feats[i * 3 : i * 3 + 3]).sum(0)) for i in range(6)])
    np.testing.assert_allclose(g.vectors, expected, rtol=1e-5, atol=1e-6)
    nw = Gallery.create(tmp_path / "nw", MODEL, names, feats, aggregator="norm_weighted")
    np.testing.assert_allclose(
        nw.vectors, np.stack([_unit(feats[i * 3 : i * 3 + 3].sum(0)) for i in range(6)]), rtol=1e-5
    )
    queries = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    result = g.search(queries * 3, k=3, threshold=0.5)
    sims = _unit(queries) @ expected.T  # brute force
    order = np.argsort(-sims, axis=1)[:, :3]
    assert result.names == [[f"p{j}" for j in row] for row in order]
    np.testing.assert_allclose(result.scores, np.take_along_axis(sims, order, 1), atol=1e-5)
    np.testing.assert_array_equal(result.accepted, sims.max(1) >= 0.5)
    assert result.top1() == [
        f"p{o[0]}" if s >= 0.5 else None for o, s in zip(order, sims.max(1), strict=True)
    ]
    assert g.search(queries[0], k=10).scores.shape == (1, 6)  # k capped at the gallery size
    # persisted: reopened with the same model, the same answers
    again = Gallery.open(tmp_path / "g", MODEL)
    assert again.search(queries, k=3).names == result.names and again.index_type == "flat"


def test_add_remove_and_approximate_indexes(tmp_path):
    names, feats = _data(n_ids=8)
    g = Gallery.create(tmp_path / "g", MODEL, names[:12], feats[:12])
    g.add(names[12:], feats[12:])  # new identities only: appended to the index
    g.add(["p0"], feats[12:13])  # more images of p0: re-fused
    expected_p0 = _unit(_unit(np.concatenate([feats[:3], feats[12:13]])).sum(0))
    np.testing.assert_allclose(g.vectors[0], expected_p0, rtol=1e-5, atol=1e-6)
    g.remove(["p1", "p5"])
    reopened = Gallery.open(tmp_path / "g")
    assert reopened.names == ["p0", "p2", "p3", "p4", "p6", "p7"]
    assert reopened.manifest["images"] == 25 - 6
    with pytest.raises(ValueError, match="not enrolled: p9"):
        reopened.remove(["p9"])
    assert sorted(os.listdir(tmp_path / "g")) == [".lock", "manifest.json", "v4"]
    flat = reopened.search(reopened.vectors, k=2)
    for kind in ("ivf", "hnsw"):
        approx = Gallery.create(
            tmp_path / kind, MODEL, names, feats, index=IndexSpec(type=kind, nlist=1)
        )
        assert approx.index_type == kind
        got = approx.search(Gallery.open(tmp_path / "g").vectors, k=1).names
        assert [r[0] for r in got] == [r[0] for r in flat.names]


def test_adding_an_enrolled_image_again_is_refused_or_skipped_never_duplicated(tmp_path):
    names, feats = _data(n_ids=3)
    g = Gallery.create(tmp_path / "g", MODEL, names, feats)
    before = (g.vectors.copy(), g.manifest["images"])
    # p1's second image re-embedded (float16 rounding, another norm) and a new image of p1
    again = (feats[4] * 1.001).astype(np.float16).astype(np.float32)
    fresh = feats[4] + 0.05 * np.linalg.norm(feats[4])  # cosine with feats[4] about 0.998
    fresh_cos = _unit(fresh) @ _unit(feats[4])
    assert fresh_cos < gallery_mod.DUPLICATE_COSINE <= _unit(again) @ _unit(feats[4])
    batch = np.stack([fresh, again, feats[0]])
    with pytest.raises(ValueError) as info:
        g.add(["p1", "p1", "p9"], batch, sources=["new.jpg", "b.jpg", "c.jpg"])
    assert str(info.value) == (
        f"{tmp_path / 'g'}: 1 of 3 images are already enrolled under the same identity: b.jpg "
        "(p1); pass --skip-enrolled (skip_enrolled=True) to add only the others"
    )
    np.testing.assert_array_equal(Gallery.open(tmp_path / "g").vectors, before[0])  # unchanged
    # skipped: the others enrolled (p0's image under the new identity p9 is not a repeat)
    assert g.add(["p1", "p1", "p9"], batch, skip_enrolled=True) == 1
    assert g.names == ["p0", "p1", "p2", "p9"] and g.manifest["images"] == before[1] + 2
    expected_p1 = _unit(_unit(np.concatenate([feats[3:6], fresh[None]])).sum(0))
    np.testing.assert_allclose(g.vectors[1], expected_p1, rtol=1e-5, atol=1e-6)
    # everything already there: nothing written, the count returned
    version = g.manifest["version"]
    assert g.add(["p0", "p0"], feats[:2], skip_enrolled=True) == 2
    assert Gallery.open(tmp_path / "g").manifest["version"] == version


def test_enrolled_check_matches_brute_force_over_many_identities(tmp_path):
    # raw (unnormalised, float16-stored) enrolment rows of 40 identities with 1 to 4 images; the
    # added rows: exact repeats (rescaled), near misses, unknown names, identities of varied sizes
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 5, size=40)
    names = [f"p{i}" for i, c in enumerate(counts) for _ in range(c)]
    feats = (rng.normal(size=(len(names), 8)) * rng.uniform(1, 30, (len(names), 1))).astype(
        np.float16
    )
    g = Gallery.create(tmp_path / "g", MODEL, names, feats.astype(np.float32))
    pick = rng.choice(len(names), 60)
    added = feats[pick].astype(np.float32) * rng.uniform(0.5, 2, (60, 1)).astype(np.float32)
    added[::3] += 0.01 * rng.normal(size=(20, 8)).astype(np.float32)  # near, not the same
    add_names = [names[i] for i in pick]
    add_names[1::7] = [f"new{j}" for j in range(len(add_names[1::7]))]  # not in the gallery
    brute = np.array(
        [
            any(
                _unit(feats[j].astype(np.float64)) @ _unit(added[i].astype(np.float64))
                >= gallery_mod.DUPLICATE_COSINE
                for j in range(len(names))
                if names[j] == add_names[i]
            )
            for i in range(60)
        ]
    )
    assert 10 < brute.sum() < 50  # both kinds present
    np.testing.assert_array_equal(g._enrolled_again(add_names, added), brute)


def test_adding_nothing_is_refused(tmp_path):
    names, feats = _data()
    g = Gallery.create(tmp_path / "g", MODEL, names, feats)
    with pytest.raises(ValueError, match="need >= 1"):
        g.add([], np.zeros((0, 8), np.float32))


def test_foreign_model_and_embedding_size_are_refused_naming_both(tmp_path):
    names, feats = _data()
    Gallery.create(tmp_path / "g", MODEL, names, feats)
    other = {"path": "/models/b.onnx", "sha256": "b" * 64, "embedding_size": 8}
    with pytest.raises(
        ValueError,
        match=r"built with another model: /models/a\.pth .*not "
        r"/models/b\.onnx",
    ):
        Gallery.open(tmp_path / "g", other)
    wide = {**other, "embedding_size": 16}
    with pytest.raises(ValueError, match=r"embedding-size mismatch: the gallery holds 8-d .*16-d"):
        Gallery.open(tmp_path / "g", wide)
    with pytest.raises(ValueError, match="holds 8-d embeddings, got shape"):
        Gallery.open(tmp_path / "g").add(["x"], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="'caface' aggregator needs per-image styles"):
        Gallery.create(
            tmp_path / "c",
            {**MODEL, "embedding_size": 512},
            ["a"],
            np.ones((1, 512), np.float32),
            aggregator="caface",
            aggregator_params={"model": tmp_path / "none.pt"},
        )


def test_concurrent_writer_is_refused(tmp_path):
    names, feats = _data()
    g = Gallery.create(tmp_path / "g", MODEL, names, feats)
    with open(tmp_path / "g" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer at work
        with pytest.raises(GalleryBusyError, match=r"another process .* is writing this gallery"):
            g.add(["new"], feats[:1])
    g.add(["new"], feats[:1])  # released: goes through
    assert "new" in Gallery.open(tmp_path / "g").names


def test_interrupted_add_leaves_the_gallery_readable_and_unchanged(tmp_path, monkeypatch):
    names, feats = _data()
    g = Gallery.create(tmp_path / "g", MODEL, names, feats)
    before = (tmp_path / "g" / "manifest.json").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process killed while writing the new version

    monkeypatch.setattr(gallery_mod.faiss, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        g.add(["new"], feats[:1])
    with pytest.raises(KeyboardInterrupt):  # an interrupted rebuild over it, too
        Gallery.create(tmp_path / "g", MODEL, ["x"], feats[:1], overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / "g" / "manifest.json").read_bytes() == before
    reopened = Gallery.open(tmp_path / "g", MODEL)
    assert reopened.names == [f"p{i}" for i in range(6)]
    np.testing.assert_array_equal(reopened.vectors, Gallery.open(tmp_path / "g").vectors)
    reopened.add(["new"], feats[:1])  # the leftover partial version is cleaned up
    assert Gallery.open(tmp_path / "g").names[-1] == "new"
    assert not [p for p in os.listdir(tmp_path / "g") if p.endswith(".partial")]


def test_caface_gallery_with_styles(tmp_path):
    import torch

    from robustface.fuse.caface import CAFace, CAFaceAggregator

    torch.manual_seed(0)
    ckpt = tmp_path / "caface.ckpt"
    state = {f"aggregator.{k}": v for k, v in CAFace().state_dict().items()}
    torch.save({"state_dict": state}, ckpt)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 512)).astype(np.float32)
    styles = rng.normal(size=(5, 384, 2)).astype(np.float32)
    model = {**MODEL, "embedding_size": 512}
    names = ["a", "a", "a", "b", "b"]
    g = Gallery.create(
        tmp_path / "g",
        model,
        names,
        feats,
        styles=styles,
        aggregator="caface",
        aggregator_params={"model": str(ckpt)},
    )
    agg = CAFaceAggregator(ckpt)
    for row, rows in ((0, slice(0, 3)), (1, slice(3, 5))):
        expected = agg.fuse(feats[rows], styles[rows]).numpy()
        np.testing.assert_allclose(g.vectors[row], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'caface' aggregator needs per-image styles"):
        g.add(["c"], feats[:1])
    g.add(["a"], feats[3:4], styles[3:4])  # re-fused with all of a's images and styles
    expected = agg.fuse(feats[[0, 1, 2, 3]], styles[[0, 1, 2, 3]]).numpy()
    np.testing.assert_allclose(
        Gallery.open(tmp_path / "g").vectors[0], expected, rtol=1e-5, atol=1e-6
    )


def test_cli_constants_agree_with_the_gallery():
    from robustface import cli_deploy

    assert cli_deploy._INDEX_TYPES == gallery_mod.INDEX_TYPES
    assert cli_deploy._EXACT_MAX == gallery_mod.EXACT_MAX


def test_ivf_keeps_its_trained_lists_within_a_factor_two(tmp_path):
    names, feats = _data(n_ids=120, per=1)
    g = Gallery.create(tmp_path / "g", MODEL, names, feats, index=IndexSpec(type="ivf", nlist=2))

    def centroids(gallery: Gallery) -> np.ndarray:
        quantizer = gallery_mod.faiss.downcast_index(gallery._state.index.quantizer)
        return gallery_mod.faiss.rev_swig_ptr(quantizer.get_xb(), 2 * 8).copy()

    before = centroids(g)
    g.remove([f"p{i}" for i in range(50)])  # 70 left: refilled, not retrained
    reopened = Gallery.open(tmp_path / "g")
    np.testing.assert_array_equal(centroids(reopened), before)
    exact = _unit(feats[50:]) @ reopened.vectors.T
    hits = reopened.search(feats[50:], k=1, nprobe=2).names
    assert [h[0] for h in hits] == [reopened.names[j] for j in exact.argmax(1)]
    reopened.remove([f"p{i}" for i in range(50, 90)])  # 30 left, below half of 120: retrained
    assert Gallery.open(tmp_path / "g").manifest["index_trained_on"] == 30
