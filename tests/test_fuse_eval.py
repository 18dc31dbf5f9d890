"""Fusion aggregators in the evaluations: ``eval ijb --aggregation caface`` and MegaFace's views."""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustface.cli import main
from robustface.data.ijb import read_ijb_meta
from robustface.data.image import decode_image
from robustface.data.synth.builder import build_synthface
from robustface.deploy import align_face
from robustface.evaluate.ijb import (
    IJBSettings,
    embed_ijb,
    fused_template_features,
    group_templates,
    score_ijb,
)
from robustface.evaluate.roc import FARS, Roc
from robustface.fuse import AGGREGATORS, CAFace, CAFaceAggregator, embed_with_styles
from robustface.models import build_backbone
from robustface.models.loading import load_backbone
from synth_configs import IJB_SYNTH

TINY_CHANNELS = 96  # r18_tiny: layer2 (32) + layer3 (64)


def _caface(channels: int = TINY_CHANNELS, seed: int = 0) -> CAFace:
    """A CAFace in eval mode with every parameter and BN statistic moved off its init."""
    torch.manual_seed(seed)
    model = CAFace(style_channels=channels)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.3 if p.ndim < 2 else 1.0 / math.sqrt(p.shape[-1])
            p.add_(torch.randn_like(p) * scale)
        model.style_maker.bn.running_mean.normal_()
        model.style_maker.bn.running_var.uniform_(0.5, 2.0)
        model.norm_emb.norm_bn.running_mean.fill_(3.0)
        model.norm_emb.norm_bn.running_var.fill_(1.0)
    return model.eval()


def _save(model: CAFace, path: Path) -> Path:
    """A checkpoint with the released layout: ``state_dict`` of ``aggregator.*`` keys."""
    state = {f"aggregator.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": "ir_101"}}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:

    root = tmp_path_factory.mktemp("fuse_ijb")
    synth = build_synthface(root / "synth", IJB_SYNTH, workers=1, progress=False)
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(build_backbone("r18_tiny").state_dict(), weights)
    ijb_dir = synth.path / "IJBS"
    # the protocol by hand: aligned crops, both views embedded with their styles
    meta = read_ijb_meta(ijb_dir, "IJBS")
    model, size = load_backbone(weights, backbone="r18_tiny")
    crops = np.stack(
        [
            align_face(decode_image(p.read_bytes()), lm, size)
            for p, lm in zip(meta.image_paths(), meta.landmarks, strict=True)
        ]
    )
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    views = [embed_with_styles(model, v, batch_size=7) for v in (x, x.flip(3))]
    return {
        "ijb_dir": ijb_dir,
        "weights": weights,
        "ckpt": _save(_caface(), root / "caface.ckpt"),
        "meta": meta,
        "feats": torch.stack([f for f, _ in views], 1),  # (N, 2, 512)
        "styles": torch.stack([s for _, s in views], 1),  # (N, 2, 96, 2)
    }


def _by_hand(
    setup: dict, chunk_size: int | None = None, flip: bool = False
) -> dict[int, np.ndarray]:
    """Template id -> the aggregator called by hand on the template's images (and mirrors)."""
    agg = CAFaceAggregator(_caface(), chunk_size=chunk_size)
    meta, views = setup["meta"], 2 if flip else 1
    out = {}
    for t in np.unique(meta.templates).tolist():
        rows = np.flatnonzero(meta.templates == t)
        f = setup["feats"][rows, :views].reshape(-1, 512)  # image 0, its mirror, image 1, ...
        s = setup["styles"][rows, :views].reshape(-1, TINY_CHANNELS, 2)
        out[t] = agg.fuse(f, s).numpy()
    return out


def _pair_scores(meta, templates: dict[int, np.ndarray]) -> np.ndarray:
    return np.array([templates[a] @ templates[b] for a, b in meta.pairs.tolist()])


@pytest.mark.slow
def test_ijb_caface_from_the_cli(setup, tmp_path, capsys):
    ijb_dir, weights, ckpt, meta = setup["ijb_dir"], setup["weights"], setup["ckpt"], setup["meta"]
    out = tmp_path / "out"
    base = ["eval", "ijb", str(weights), "--backbone", "r18_tiny", "--data", str(ijb_dir)]
    base += ["--name", "IJBS", "--quiet", "--batch-size", "5", "--workers", "1", "--out", str(out)]
    caface = [*base, "--aggregation", "caface", "--fusion-model", str(ckpt)]
    assert main(caface) == 0
    printed = capsys.readouterr().out
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "Templates: `caface` fusion of all images of a template (media ignored)" in printed
    assert f"sha256 `{sha[:16]}`, chunks of the whole template, no flip" in printed
    report = json.loads((out / "ijbs_caface.json").read_text())
    config = report["config"]
    assert config["aggregation"] == "caface" and config["fusion_model"]["sha256"] == sha
    assert config["flip"] is False and config["faceness"] is False  # upstream's IJB protocol
    assert config["style_blocks"] == ["layer2", "layer3"] and config["fusion_chunk_size"] is None

    # the numbers: cosine scores of templates fused by hand, read at every FAR
    scores = _pair_scores(meta, _by_hand(setup))
    roc = Roc.from_scores(scores, meta.pair_labels.astype(bool))
    want = dict(zip(FARS, roc.tpr[roc.operating_points(FARS, "closest")].tolist(), strict=True))
    ver = report["results"]["verification"]
    assert ver["tar_at_far_insightface"] == {f"{f:g}": pytest.approx(want[f]) for f in FARS}
    nw = _pair_scores(meta, {t: v / np.linalg.norm(v) for t, v in _norm_weighted(setup).items()})
    assert np.abs(nw - scores).max() > 1e-3  # CAFace is not the norm-weighted mean here

    # styles are cached beside the embeddings, keyed by the blocks, and reused
    cache = Path(report["results"]["embedding_cache"]["path"])
    styles_file = cache.with_name(cache.name.replace("_embeddings.npy", "_styles.npy"))
    assert np.load(styles_file).shape == (meta.images.size, 1, TINY_CHANNELS, 2)
    key = json.loads(cache.with_suffix(".json").read_text())
    assert key["styles"] == {"blocks": ["layer2", "layer3"]} and key["flip"] is False
    assert main(caface) == 0
    capsys.readouterr()
    again = json.loads((out / "ijbs_caface.json").read_text())["results"]
    assert again["embedding_cache"]["reused"] is True
    assert again["verification"] == report["results"]["verification"]
    # a stale key (other blocks recorded) is refused; a missing styles file is recomputed
    key["styles"]["blocks"] = ["layer1", "layer3"]
    cache.with_suffix(".json").write_text(json.dumps(key))
    assert main(caface) == 2
    assert "records other styles than this run's" in capsys.readouterr().err
    key["styles"]["blocks"] = ["layer2", "layer3"]
    cache.with_suffix(".json").write_text(json.dumps(key))
    styles_file.unlink()
    assert main(caface) == 0
    capsys.readouterr()
    assert (
        json.loads((out / "ijbs_caface.json").read_text())["results"]["embedding_cache"]["reused"]
        is False
    )
    # the default mean/norm_weighted runs do not see the styles cache
    assert main(base) == 0
    capsys.readouterr()
    default = json.loads((out / "ijbs.json").read_text())
    assert default["config"]["fusion_model"] is None and default["config"]["flip"] is True
    # each aggregation its own report: the caface one is still there
    assert json.loads((out / "ijbs_caface.json").read_text())["config"]["aggregation"] == "caface"
    assert (out / "ijbs_caface.md").is_file() and (out / "ijbs_caface_roc.png").is_file()
    assert default["results"]["embedding_cache"]["reused"] is False


def _norm_weighted(setup: dict) -> dict[int, np.ndarray]:
    meta = setup["meta"]
    feats = setup["feats"][:, 0].numpy()
    return {t: feats[meta.templates == t].sum(0) for t in np.unique(meta.templates).tolist()}


@pytest.mark.slow
def test_ijb_caface_bad_options_are_one_line_errors(setup, tmp_path, capsys):
    ijb_dir, weights, ckpt = setup["ijb_dir"], setup["weights"], setup["ckpt"]
    base = ["eval", "ijb", str(weights), "--backbone", "r18_tiny", "--data", str(ijb_dir)]
    base += ["--name", "IJBS", "--quiet", "--workers", "1", "--out", str(tmp_path)]
    published = _save(_caface(channels=384), tmp_path / "published.ckpt")
    narrow = _save(CAFace(style_channels=TINY_CHANNELS, feature_dim=16), tmp_path / "n.ckpt")
    cases = [
        (
            ["--aggregation", "caface", "--fusion-model", str(narrow)],
            f"fusion_model {narrow}: the caface aggregator fuses 16-d features, the backbone's "
            "embeddings are 512-d",
        ),
        (["--aggregation", "caface"], "fusion_model: the 'caface' aggregation needs a CAFace"),
        (["--fusion-model", str(ckpt)], "fusion_model: only the caface aggregation takes"),
        (["--aggregation", "mean", "--fusion-chunk-size", "4"], "fusion_chunk_size: only the"),
        (
            ["--aggregation", "caface", "--fusion-model", str(ckpt), "--faceness"],
            "faceness: the 'caface' aggregation takes no per-image weights",
        ),
        (
            ["--aggregation", "caface", "--fusion-model", str(published)],
            f"fusion_model {published}: the CAFace checkpoint takes 384 style channels, the "
            "backbone's style blocks layer2, layer3 gives 96",
        ),
        (
            ["--aggregation", "caface", "--fusion-model", str(ckpt), "--style-blocks", "layer3"],
            "takes 96 style channels, the backbone's style blocks layer3 gives 64",
        ),
        (
            ["--aggregation", "caface", "--fusion-model", str(ckpt), "--style-blocks", "body.9"],
            "blocks: unknown block name 'body.9'",
        ),
        (["--aggregation", "max"], "unknown template aggregator 'max'; valid names: caface, mean"),
        (
            ["--aggregation", "caface", "--fusion-model", str(weights)],
            f"{weights}: not a CAFace checkpoint",
        ),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "cache").exists()  # refused before any embedding


def test_ijb_fused_templates_equal_the_aggregator_by_hand(setup):
    """Python steps: flip frames and chunked fusion, template by template; NaN names the file."""
    meta, weights = setup["meta"], setup["weights"]
    model, size = load_backbone(weights, backbone="r18_tiny")
    settings = IJBSettings(
        aggregation="caface", fusion_model=setup["ckpt"], flip=True, batch_size=5, workers=1
    )
    assert settings.faceness is False
    embedded = embed_ijb(model, meta, settings, input_size=size, show_progress=False)
    assert embedded.styles.shape == (meta.images.size, 2, TINY_CHANNELS, 2)
    # other batch sizes than the setup's: oneDNN may sum in another order (2 threads, AVX-512),
    # so float32 rounding of the untrained model's large features (up to ~1,500), not 1e-5
    for got, want in ((embedded.embeddings, setup["feats"]), (embedded.styles, setup["styles"])):
        atol = 1e-6 * want.abs().max().item()
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=atol)
    groups = group_templates(meta.templates, meta.medias)
    for chunk in (None, 3):
        agg = CAFaceAggregator(_caface(), chunk_size=chunk)
        got = fused_template_features(embedded.embeddings, embedded.styles, groups, agg)
        want = _by_hand(setup, chunk_size=chunk, flip=True)
        np.testing.assert_allclose(
            got, np.stack([want[t] for t in groups.template_ids.tolist()]), rtol=0, atol=1e-6
        )
    assert (
        np.abs(
            got
            - fused_template_features(
                embedded.embeddings, embedded.styles, groups, CAFaceAggregator(_caface())
            )
        ).max()
        > 1e-4
    )  # chunking changes CAFace, so the loop above has teeth
    scores = score_ijb(embedded, meta, settings)
    assert scores.templates == groups.template_ids.size
    bad = np.array(embedded.embeddings)
    bad[3, 1, 0] = np.nan
    with pytest.raises(
        ValueError, match=rf"^cache.npy: template {meta.templates[3]}: features row"
    ):
        fused_template_features(bad, embedded.styles, groups, agg, source="cache.npy")
    with pytest.raises(ValueError, match="styles: the caface aggregator needs"):
        fused_template_features(embedded.embeddings, None, groups, agg)
    wide = np.concatenate([embedded.embeddings, embedded.embeddings], axis=2)
    with pytest.raises(ValueError, match="features must have dimension 512, got 1024"):
        fused_template_features(wide, embedded.styles, groups, agg)


# ---------------------------------------------------------------------- constant memory in T


def test_sequential_fusion_keeps_nothing_per_frame(monkeypatch):
    """fuse_sequential without frame weights holds no finished chunk's tensors, and a fusion
    memory's state has the same size after 10 or 1,000 frames."""
    model = _caface(channels=8)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 200, 512, generator=g) * 5
    s = torch.randn(1, 200, 8, 2, generator=g)
    alive: list[int] = []
    refs: list[weakref.ref] = []
    forward = CAFace.forward

    def spy(self, *args, **kwargs):
        alive.append(sum(r() is not None for r in refs))
        out = forward(self, *args, **kwargs)
        refs.append(weakref.ref(out.assign))
        return out

    monkeypatch.setattr(CAFace, "forward", spy)
    with torch.inference_mode():
        fused, frames = model.fuse_sequential(f, s, 10, frame_weights=False)
    # at most the previous chunk's output is alive while a chunk runs (was: all earlier chunks')
    assert frames is None and len(alive) == 20 and max(alive) <= 1
    monkeypatch.setattr(CAFace, "forward", forward)
    # the value checks look at one chunk at a time (was: isfinite of the whole set)
    checked: list[int] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: checked.append(x.numel()) or isfinite(x))
    with torch.inference_mode():
        model.fuse_sequential(f, s, 10, frame_weights=False)
    assert checked and max(checked) == 10 * 512  # one chunk of features (the set: 200 x 512)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    with torch.inference_mode():
        want, frames = model.fuse_sequential(f, s, 10)
    torch.testing.assert_close(fused, want, rtol=0, atol=0)
    assert frames.shape == (1, 200)

    agg = CAFaceAggregator(model)
    sizes = []
    for chunks in (1, 100):
        memory = agg.memory()
        for _ in range(chunks):
            memory.update(f[0, :10], s[0, :10])
        tensors = [memory.fused, *vars(memory.state).values()]
        sizes.append(sum(t.numel() for t in tensors))
    assert sizes[0] == sizes[1]


def test_fuse_sets_batches_like_fuse():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(5, 6, 512, generator=g) * 4
    s = torch.randn(5, 6, 8, 2, generator=g)
    for agg in (
        CAFaceAggregator(_caface(channels=8), chunk_size=None),
        CAFaceAggregator(_caface(channels=8), chunk_size=4),
        AGGREGATORS.build("mean"),
    ):
        want = torch.stack([agg.fuse(f[b], s[b]) for b in range(5)])
        torch.testing.assert_close(agg.fuse_sets(f, s), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="styles are required"):
        CAFaceAggregator(_caface(channels=8)).fuse_sets(f)


# ---------------------------------------------------------------------- MegaFace: the two views


def _megaface_dirs(tmp_path: Path) -> tuple[list[str], np.ndarray, list[str], dict]:
    """Random 56-px 'aligned' images: 3 probe identities x 2 images, 5 distractors."""
    import cv2

    rng = np.random.default_rng(0)
    probe_paths = [f"id{i}/id{i}_{k}.png" for i in range(3) for k in range(2)]
    ids = np.repeat(np.arange(3), 2)
    mf_paths = [f"0/owner{k}/{k}_0.png" for k in range(5)]
    images = {}
    for root, rel in (("fs", probe_paths), ("mf", mf_paths)):
        for path in rel:
            image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            file = tmp_path / root / path
            file.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(file), image[:, :, ::-1])  # stored BGR, decoded RGB
            images[(root, path)] = image
    (tmp_path / "fs.json").write_text(json.dumps({"path": probe_paths, "id": ids.tolist()}))
    (tmp_path / "mf.json").write_text(json.dumps({"path": mf_paths}))
    return probe_paths, ids, mf_paths, images


@pytest.mark.slow
def test_megaface_fuses_each_image_with_its_mirror(tmp_path, capsys):
    from robustface.evaluate.megaface import evaluate_megaface, fuse_flip_views

    probe_paths, ids, mf_paths, images = _megaface_dirs(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save(build_backbone("r18_tiny").state_dict(), weights)
    ckpt = _save(_caface(seed=3), tmp_path / "caface.ckpt")
    model, _ = load_backbone(weights, backbone="r18_tiny")

    def by_hand(root: str, paths: list[str], how: str) -> np.ndarray:
        batch = np.stack([images[(root, p)] for p in paths])
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        (f0, s0), (f1, s1) = (embed_with_styles(model, v) for v in (x, x.flip(3)))
        if how == "mean":
            return F.normalize(F.normalize(f0, dim=1) + F.normalize(f1, dim=1), dim=1).numpy()
        agg = CAFaceAggregator(_caface(seed=3), chunk_size=None)
        return np.stack(
            [
                agg.fuse(torch.stack([f0[i], f1[i]]), torch.stack([s0[i], s1[i]])).numpy()
                for i in range(len(paths))
            ]
        )

    flags = ["eval", "megaface", str(weights), "--backbone", "r18_tiny", "--quiet"]
    flags += ["--sizes", "5", "--far", "0.1", "--max-rank", "3"]
    for name in ("fs", "mf"):
        role = "probe" if name == "fs" else "distractor"
        flags += [f"--{role}-images", str(tmp_path / name), f"--{role}-list"]
        flags += [str(tmp_path / f"{name}.json")]
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*flags, "--aggregation", "caface", "--fusion-model", str(ckpt)]
    assert main([*args, "--out", str(out), "--cache", str(cache)]) == 0
    capsys.readouterr()
    probes, distractors = by_hand("fs", probe_paths, "caface"), by_hand("mf", mf_paths, "caface")
    with np.load(cache / "probe.npz") as npz:
        np.testing.assert_allclose(npz["features"], probes, rtol=0, atol=2e-6)
        assert json.loads(str(npz["fusion"])) == {
            "aggregation": "caface",
            "fusion_model_sha256": sha,
        }
    with np.load(cache / "distractor.npz") as npz:
        np.testing.assert_allclose(npz["features"], distractors, rtol=0, atol=2e-6)
    report = json.loads((out / "megaface.json").read_text())
    assert report["config"]["aggregation"] == "caface"
    assert report["config"]["fusion_model_sha256"] == sha
    want = evaluate_megaface(probes, ids, distractors, sizes=(5,), max_rank=3, far=0.1)
    got = report["results"]["sizes"]["5"]
    assert got["cmc"] == pytest.approx(want["sizes"][5]["cmc"])
    assert got["tar_insightface"] == pytest.approx(want["sizes"][5]["tar_insightface"])
    # mean, from Python: the two unit features averaged
    batch = np.stack([images[("fs", p)] for p in probe_paths])
    mean = fuse_flip_views(model, batch, AGGREGATORS.build("mean"), input_size=56, batch_size=4)
    np.testing.assert_allclose(mean, by_hand("fs", probe_paths, "mean"), rtol=0, atol=2e-6)

    # the cache is reused with the same fusion only; a fusion model needs caface
    cached = ["eval", "megaface", "--probe-features", str(cache / "probe.npz")]
    cached += ["--distractor-features", str(cache / "distractor.npz")]
    cached += ["--sizes", "5", "--far", "0.1", "--max-rank", "3", "--quiet"]
    assert main([*cached, "--aggregation", "caface", "--fusion-model", str(ckpt)]) == 0
    assert "| 5 " in capsys.readouterr().out
    for extra, message in (
        ([], "probe.npz: features whose image and mirror were fused with 'caface' (model "),
        (["--aggregation", "mean"], "fused with 'caface' (model"),
        (["--aggregation", "caface"], "fusion_model: the 'caface' aggregation needs"),
        (["--fusion-model", str(ckpt)], "fusion_model: only the caface aggregation"),
    ):
        assert main([*cached, *extra]) == 2
        assert message in capsys.readouterr().err


def test_settings_defaults_follow_the_aggregation(tmp_path):
    from robustface.fuse.build import check_fusion_model

    plain = IJBSettings()
    assert (plain.flip, plain.faceness, plain.needs_styles) == (True, True, False)
    caface = IJBSettings(aggregation="caface", fusion_model="x.ckpt", fusion_chunk_size=64)
    assert (caface.flip, caface.faceness, caface.needs_styles) == (False, False, True)
    assert IJBSettings(aggregation="caface", fusion_model="x.ckpt", flip=True).flip is True
    with pytest.raises(ValueError, match="style_blocks: the 'mean' aggregation uses no styles"):
        IJBSettings(aggregation="mean", style_blocks=("layer2",))
    with pytest.raises(ValueError, match="fusion_chunk_size must be"):
        IJBSettings(aggregation="caface", fusion_model="x.ckpt", fusion_chunk_size=0)
    agg = CAFaceAggregator(_caface(channels=8))
    with pytest.raises(ValueError, match="model: styles need a robustface backbone"):
        check_fusion_model(agg, torch.nn.Linear(3, 512), 4)


def test_value_checks_work_in_blocks_and_name_the_frame(monkeypatch):
    """Long sets are checked block by block (no temporary of the set's size); the errors still
    name the first bad row or frame of the whole set."""
    import robustface.fuse.base as base

    monkeypatch.setattr(base, "_CHECK_ROWS", 3)
    agg = CAFaceAggregator(_caface(channels=8), chunk_size=4)
    g = torch.Generator().manual_seed(2)
    f, s = torch.randn(12, 512, generator=g), torch.randn(12, 8, 2, generator=g)
    for row, what, message in (
        (7, "nan", "features row 7 has NaN"),
        (5, "zero", "features row 5 has zero norm"),
        (8, "style", r"styles have NaN or infinite values \(row 8\)"),
    ):
        bad_f, bad_s = f.clone(), s.clone()
        if what == "nan":
            bad_f[row, 3] = float("nan")
        elif what == "zero":
            bad_f[row] = 0
        else:
            bad_s[row, 1, 0] = float("inf")
        with pytest.raises(ValueError, match=message):
            agg.fuse(bad_f, bad_s)
    zero = f.clone()[None]
    zero[0, 9] = 0
    with pytest.raises(ValueError, match="features: set 0, image 9 has a zero-norm feature"):
        _caface(channels=8).fuse_sequential(zero, s[None], 4)
