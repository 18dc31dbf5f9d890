"""CAFace training (robustface.fuse.training) against the loss and AdamW written out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robustface.cli import main
from robustface.errors import ConfigError, DataFormatError
from robustface.fuse.caface import CAFace, CAFaceAggregator, load_caface_checkpoint
from robustface.fuse.extract import FusionFeatures
from robustface.fuse.training import (
    FuseTrainConfig,
    build_sets,
    caface_loss,
    load_fuse_config,
    train_caface,
)
from robustface.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM, CHANNELS = 64, 48  # r18_tiny at width 1/8: 16 + 32 style channels


@pytest.fixture(scope="module")
def features(synth_train_dir, tmp_path_factory):
    """Fusion features of the tiny SynthFace set (64 images, 8 classes, 4 views), made with the
    command line."""
    root = tmp_path_factory.mktemp("fuse_train")
    torch.manual_seed(0)
    model = build_backbone("r18_tiny", embedding_size=DIM, input_size=32, width=0.125)
    torch.save(model.state_dict(), root / "tiny.pth")
    argv = ["fuse", "extract", str(root / "tiny.pth"), str(synth_train_dir)]
    argv += ["--out", str(root / "feats"), "--views", "4", "--input-size", "32", "--quiet"]
    assert main(argv) == 0
    return root / "feats"


def tiny_config(features, out, **train) -> dict:
    return {
        "features": str(features),
        "output_dir": str(out),
        "seed": 3,
        "sets": {"size": 8, "max_sources": 2},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 1, "progress": False, **train},
    }


def cos_loss(x, y):
    """mean(1 - cos) with upstream's x / (|x| + 1e-5)."""
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    y = y / (y.norm(dim=-1, keepdim=True) + 1e-5)
    return (1 - (x * y).sum(-1)).mean()


def reference_loss(model, f, s, centers, upstream=False):
    """The published loss written out for sets of T = 8 (halves of 4: prefixes 2 and 4)."""
    h1, h2 = (f[:, :4], s[:, :4]), (f[:, 4:], s[:, 4:])
    p1_2 = cos_loss(model(h1[0][:, :2], h1[1][:, :2]).fused, centers)
    p2_2 = cos_loss(model(h2[0][:, :2], h2[1][:, :2]).fused, centers)
    p1_4 = cos_loss(model(*h1).fused, centers)
    p2_4 = cos_loss(model(*h2).fused, centers)
    memory_fused = model(*h2, memory=model(*h1).memory).fused
    all_fused = model(f, s).fused
    center = (
        (p1_2 + p1_4) / 2
        + (p2_2 + p2_4) / 2
        + cos_loss(memory_fused, centers)
        + cos_loss(all_fused, centers)
    ) / 4
    memory = cos_loss(memory_fused, all_fused) / (f.shape[0] if upstream else 1)
    return center, memory


def test_loss_matches_the_formula_written_out():
    torch.manual_seed(0)
    model = CAFace(CHANNELS, DIM).train()
    f = torch.randn(3, 8, DIM) * 5
    s = torch.randn(3, 8, CHANNELS, 2)
    centers = torch.nn.functional.normalize(torch.randn(3, DIM), dim=1)
    for upstream in (False, True):
        torch.manual_seed(1)  # drop path draws: the same calls in the same order
        ours = caface_loss(model, f, s, centers, memory_scale="upstream" if upstream else "mean")
        torch.manual_seed(1)
        center, memory = reference_loss(model, f, s, centers, upstream)
        torch.testing.assert_close(ours["center"], center, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours["memory"], memory, rtol=1e-6, atol=1e-9)
    assert ours["memory"] > 0  # the memory path is not the whole-set fusion
    # gradients reach the memory term through both sides (no detach)
    ours["memory"].backward()
    assert model.fusion_net.clustering_layer.group_token.grad.abs().sum() > 0


def test_sets_follow_the_published_sampler():
    labels = np.repeat(np.arange(5), 7)
    anchors = np.array([0, 9, 34, 20])
    rows, views = build_sets(labels, anchors, views=16, size=32, max_sources=3, seed=1, epoch=2)
    again = build_sets(labels, anchors, views=16, size=32, max_sources=3, seed=1, epoch=2)
    assert np.array_equal(rows, again[0]) and np.array_equal(views, again[1])
    assert rows.shape == views.shape == (4, 32) and views.min() >= 0 and views.max() < 16
    for b, anchor in enumerate(anchors):
        assert (labels[rows[b]] == labels[anchor]).all()  # one identity per set
        for half in (rows[b, :16], rows[b, 16:]):
            runs = np.flatnonzero(np.diff(half)) + 1  # where the source image changes
            lengths = np.diff(np.concatenate(([0], runs, [16])))
            assert len(lengths) <= 3 and lengths[-1] >= 2  # 1-3 sources, cuts in 1..14
    other = build_sets(labels, anchors, views=16, size=32, max_sources=3, seed=1, epoch=3)
    assert not np.array_equal(rows, other[0])


def test_one_step_is_adamw_on_the_loss_and_the_checkpoint_loads(features, tmp_path, capsys):
    config = tmp_path / "c.yaml"  # through the command line, with an override
    config.write_text(json.dumps(tiny_config(features, tmp_path / "unused")))
    argv = ["fuse", "train", str(config), "--set", "train.max_steps=1"]
    (tmp_path / "run").mkdir()  # rows of a run stopped before its first checkpoint are dropped
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 7, "loss": 9.0}\n')
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    path = tmp_path / "run" / "caface.ckpt"
    assert f"trained CAFace: {path}" in capsys.readouterr().out
    data = FusionFeatures.open(features)
    # centres written out: normalised mean of the unit clean features per class
    clean = torch.from_numpy(data.clean.astype(np.float64))
    unit = clean / clean.norm(dim=1, keepdim=True)
    centers = torch.stack([unit[data.labels == c].mean(0) for c in range(8)])
    centers = (centers / centers.norm(dim=1, keepdim=True)).float()
    # the first batch: anchors in the epoch-0 order of the seed
    anchors = np.random.default_rng([3, 0]).permutation(64)[:16]
    rows, views = build_sets(data.labels, anchors, 4, 8, 2, seed=3, epoch=0)
    f = torch.from_numpy(data.features[rows, views].astype(np.float32))
    s = torch.from_numpy(data.styles[rows, views].astype(np.float32))
    torch.manual_seed(3)
    model = CAFace(CHANNELS, DIM).train()
    before = {k: v.clone() for k, v in model.named_parameters()}
    center, memory = reference_loss(model, f, s, centers[torch.from_numpy(data.labels[anchors])])
    (center + memory).backward()
    ckpt = load_caface_checkpoint(path)
    trained = dict(ckpt.aggregator.named_parameters())
    lr, wd, eps = 1e-3, 5e-4, 1e-8
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        # AdamW's first step: m_hat = g, v_hat = g^2
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(trained[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ckpt.centers, centers, rtol=1e-5, atol=1e-6)
    assert ckpt.hyper_parameters["style_channels"] == CHANNELS
    assert ckpt.hyper_parameters["feature_dim"] == DIM
    # the trained model fuses through the aggregator interface
    agg = CAFaceAggregator(path, chunk_size=3)
    fused = agg.fuse(data.features[0].astype(np.float32), data.styles[0].astype(np.float32))
    assert fused.shape == (DIM,)
    torch.testing.assert_close(fused.norm(), torch.tensor(1.0))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    assert row["loss"] == pytest.approx((center + memory).item(), rel=1e-5)


@pytest.mark.slow
def test_resume_gives_the_same_weights_and_training_lowers_the_loss(features, tmp_path):
    full = train_caface(tiny_config(features, tmp_path / "full", checkpoint_every=3))
    cut = tmp_path / "cut"
    # stopped in the middle of the first epoch (4 steps): resumed from the checkpoint of step 3
    train_caface(tiny_config(features, cut, checkpoint_every=3, max_steps=3))
    resumed = train_caface(tiny_config(features, cut, checkpoint_every=3, resume="auto"))
    a = torch.load(full, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (cut / "metrics.jsonl").read_text() == rows
    # training lowers the loss of sets it has not seen (another epoch's draw), in eval mode
    data = FusionFeatures.open(features)
    rows, views = build_sets(data.labels, np.arange(64), 4, 8, 2, seed=7, epoch=100)
    f = torch.from_numpy(data.features[rows, views].astype(np.float32))
    s = torch.from_numpy(data.styles[rows, views].astype(np.float32))
    centers = load_caface_checkpoint(full).centers[torch.from_numpy(np.array(data.labels))]
    torch.manual_seed(3)
    initial = CAFace(CHANNELS, DIM).eval()
    trained = load_caface_checkpoint(full).aggregator
    with torch.no_grad():
        before = sum(caface_loss(initial, f, s, centers).values())
        after = sum(caface_loss(trained, f, s, centers).values())
    assert after < 0.9 * before
    assert (tmp_path / "full" / "training.png").stat().st_size > 1000


def test_bad_input_is_named(features, tmp_path):
    nan = tmp_path / "nan"
    shutil.copytree(features, nan)
    values = np.load(nan / "features.npy")
    values[9, 2, 5] = np.nan
    np.save(nan / "features.npy", values)
    with pytest.raises(DataFormatError, match=r"nan/features\.npy \[record 9\]: NaN"):
        train_caface(tiny_config(nan, tmp_path / "r1"))
    styles = np.load(features / "styles.npy")
    styles[40, 0, 0, 1] = np.inf
    shutil.copy(features / "features.npy", nan / "features.npy")
    np.save(nan / "styles.npy", styles)
    with pytest.raises(DataFormatError, match=r"styles\.npy \[record 40\]: NaN or infinite"):
        train_caface(tiny_config(nan, tmp_path / "r2"))
    with pytest.raises(ConfigError, match=r"sets\.size: must be even and >= 4, got 7"):
        train_caface({**tiny_config(features, tmp_path / "r3"), "sets": {"size": 7}})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch' \(did you mean"):
        load_fuse_config(FuseTrainConfig(features="x"), ["train.epoch=3"])
    with pytest.raises(ConfigError, match="features: give the extracted feature directory"):
        load_fuse_config({})
    # a run directory with checkpoints is not overwritten, and is resumed only on its features
    train_caface(tiny_config(features, tmp_path / "r4", max_steps=1))
    with pytest.raises(FileExistsError, match=r"\(train\.max_steps: run 1, now 2\); set train"):
        train_caface(tiny_config(features, tmp_path / "r4", max_steps=2))
    other = tmp_path / "other"
    shutil.copytree(features, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["key"]["seed"] = 99
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checkpoint of a run on other features"):
        train_caface(tiny_config(other, tmp_path / "r4", resume="auto"))


def test_checkpoint_of_another_size_with_missing_keys_is_named(tmp_path):
    state = {f"aggregator.{k}": v for k, v in CAFace(CHANNELS, DIM).state_dict().items()}
    del state["aggregator.style_maker.linear.bias"]
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": state}, path)
    match = r"small\.ckpt.*missing \['style_maker\.linear\.bias'\]"
    with pytest.raises(DataFormatError, match=match):
        load_caface_checkpoint(path)


def test_cli_refuses_an_onnx_model_in_one_line(tmp_path, capsys):
    assert main(["fuse", "extract", "m.onnx", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["caface_published", "caface_synthface"])
def test_shipped_configs_load(name):
    path = Path(__file__).resolve().parents[1] / "configs" / "fuse" / f"{name}.yaml"
    cfg = load_fuse_config(path, ["features=feats"])
    assert cfg.sets.size == 32 and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4
    if name == "caface_published":
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.milestones) == (10, 512, [6, 9])
        assert cfg.sets.per_epoch is None and cfg.loss.memory_scale == "mean"


def test_caface_of_another_feature_dim_differs_only_in_the_last_linear():
    published, small = CAFace().state_dict(), CAFace(CHANNELS, DIM).state_dict()
    differ = sorted(k for k in published if published[k].shape != small[k].shape)
    assert differ == [
        "fusion_net.conf_mlp.2.fc2.bias",
        "fusion_net.conf_mlp.2.fc2.weight",
        "style_maker.cfc",
        "style_maker.cfcs.0",
        "style_maker.linear.weight",
    ]
    count = sum(p.numel() for p in CAFace(CHANNELS, DIM).parameters())
    assert count == 786_524 - (2 + 64) * (384 - CHANNELS) - (256 + 1) * (512 - DIM)
    with pytest.raises(ValueError, match=r"features: expected shape \(sets, images, 64\)"):
        CAFace(CHANNELS, DIM)(torch.randn(1, 3, 512), torch.randn(1, 3, CHANNELS, 2))


def test_a_run_shorter_than_log_every_logs_its_last_step(features, tmp_path):
    out = tmp_path / "short"
    train_caface(tiny_config(features, out, max_steps=2, log_every=10))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "event" not in r] == [2]
    assert (out / "training.png").stat().st_size > 0


def test_each_step_is_logged_once_and_a_finished_run_is_complete(features, tmp_path, capsys):
    out = tmp_path / "epoch"  # one epoch of 4 steps, shorter than log_every
    final = train_caface(tiny_config(features, out, epochs=1, log_every=10))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4] and rows[0]["event"] == "epoch_end"
    capsys.readouterr()
    stamp = final.stat().st_mtime_ns
    assert train_caface(tiny_config(features, out, epochs=1, log_every=10, progress=True)) == final
    assert f"{out} is already complete" in capsys.readouterr().out
    assert final.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match=r"another config \(train\.epochs: run 1, now 2\)"):
        train_caface(tiny_config(features, out, epochs=2, log_every=10))


def test_the_set_example_of_fuse_train_help_is_a_key_of_its_config():
    import re

    from robustface.cli import build_parser

    fuse = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    train = fuse.choices["fuse"]._actions[-1].choices["train"]
    text = next(a.help for a in train._actions if a.dest == "overrides")
    example = re.search(r"--set (\S+)", text).group(1)
    path = Path(__file__).resolve().parents[1] / "configs" / "fuse" / "caface_synthface.yaml"
    load_fuse_config(path, ["features=feats", example])  # no unknown key


def test_fuse_train_refusals_name_its_out_option(features, tmp_path, capsys):
    """`fuse train` has --out, not output_dir: its refusals and notes name --out (the Python
    API keeps output_dir)."""
    import yaml

    config = tmp_path / "fuse.yaml"
    config.write_text(yaml.safe_dump(tiny_config(features, tmp_path / "unused", max_steps=1)))
    argv = ["fuse", "train", str(config), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0  # the same run again: complete
    out = capsys.readouterr().out
    assert "Use another --out," in out and "output_dir" not in out
    assert main([*argv, "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "choose another --out" in err and "output_dir" not in err
    with pytest.raises(FileExistsError, match="choose another output_dir"):
        train_caface(tiny_config(features, tmp_path / "run", max_steps=2))
