"""Model inversion: the BN prior against its formula, frozen models, determinism, recognition of
the inversions by an independent model, outputs and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robustface.cli import main
from robustface.config import load_config
from robustface.data.image import encode_image
from robustface.errors import ConfigError, DataFormatError
from robustface.fc import FullFC
from robustface.heads import build_head
from robustface.invert import (
    BNStatistics,
    ClassTargetLoss,
    EmbeddingTargetLoss,
    InversionDivergedError,
    InvertConfig,
    build_targets,
    invert,
    load_invertible,
    pixel_l2,
    run_inversion,
    total_variation,
)
from robustface.invert.config import AugmentConfig, LossConfig, OptimizerConfig, TargetConfig
from robustface.invert.targets import count_notice, select_pairs
from robustface.models import build_backbone
from robustface.train.checkpoint import classifier_weight
from robustface.utils.run import Checkpoint
from synth_configs import train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KW = {"input_size": 32, "width": 0.125, "embedding_size": 16}


def _tiny(seed: int = 0) -> nn.Module:
    """A random r18_tiny (32 px, 16-d) whose BN layers have random running statistics."""
    torch.manual_seed(seed)
    model = build_backbone("r18_tiny", **KW)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _invert(model, target_loss, keys, *, steps=4, seed=0, bn_weight=0.05, batch_size=4, jitter=2):
    return invert(
        model,
        target_loss,
        keys,
        32,
        batch_size=batch_size,
        loss=LossConfig(bn_weight=bn_weight, head_params={"scale": 16.0, "margin": 0.5}),
        optim=OptimizerConfig(steps=steps, lr=0.1, warmup_steps=1),
        augment=AugmentConfig(jitter=jitter, flip=jitter > 0),
        seed=seed,
        progress=False,
    )


def _class_loss(num_classes: int = 5, embedding_size: int = 16) -> ClassTargetLoss:
    torch.manual_seed(1)
    return ClassTargetLoss(
        FullFC(embedding_size, num_classes), build_head("arcface", scale=16.0, margin=0.5)
    )


# ------------------------------------------------------------------------------------ priors
def test_bn_term_matches_the_formula_written_out():
    torch.manual_seed(0)
    conv, bn2d = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    linear, bn1d = nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, eps=1e-3)
    for bn in (bn2d, bn1d):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    model = nn.Sequential(conv, bn2d, nn.ReLU(), nn.Flatten(), linear, bn1d).eval()
    x = torch.randn(6, 3, 8, 8)
    with BNStatistics(model, first_weight=10.0) as prior:
        model(x)
        got = prior.loss()
    # by hand: the squared norms of mean and standard-deviation gaps at each BN layer's input
    a = conv(x).detach().double()  # N x 4 x 6 x 6
    mu = a.mean(dim=(0, 2, 3))
    sd = torch.sqrt(((a - mu[None, :, None, None]) ** 2).mean(dim=(0, 2, 3)) + 1e-5)
    first = ((mu - bn2d.running_mean.double()) ** 2).sum() + (
        (sd - torch.sqrt(bn2d.running_var.double() + 1e-5)) ** 2
    ).sum()
    b = linear(torch.relu(bn2d(conv(x))).flatten(1)).detach().double()  # N x 5
    mu_b = b.mean(dim=0)
    sd_b = torch.sqrt(((b - mu_b) ** 2).mean(dim=0) + 1e-3)
    second = ((mu_b - bn1d.running_mean.double()) ** 2).sum() + (
        (sd_b - torch.sqrt(bn1d.running_var.double() + 1e-3)) ** 2
    ).sum()
    assert got.item() == pytest.approx((10.0 * first + second).item(), rel=1e-5)
    # the hooks are gone after the block
    assert all(not m._forward_hooks for m in model.modules())


def test_bn_hooks_cover_every_batchnorm_layer_of_a_backbone():
    model = _tiny()
    expected = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with BNStatistics(model) as prior:
        model(torch.randn(2, 3, 32, 32))
        assert len(prior._terms) == expected == 31


def test_total_variation_and_pixel_l2_by_hand():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5).sin()
    tv, l2 = [], []
    for image in x.numpy():
        dh = sum((image[c, h + 1, w] - image[c, h, w]) ** 2
                 for c in range(3) for h in range(3) for w in range(5))  # fmt: skip
        dw = sum((image[c, h, w + 1] - image[c, h, w]) ** 2
                 for c in range(3) for h in range(4) for w in range(4))  # fmt: skip
        tv.append(math.sqrt(dh) + math.sqrt(dw))
        l2.append(math.sqrt(float((image**2).sum())))
    assert total_variation(x).item() == pytest.approx(np.mean(tv))
    assert pixel_l2(x).item() == pytest.approx(np.mean(l2))


# ------------------------------------------------------------------------------ optimisation
def test_gradients_reach_only_the_pixels():
    model = _tiny()
    model.train()  # the caller's mode and flags come back after the inversion
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    assert any(flags) and not all(flags)  # IResNet's embedding BN scale is frozen by design
    target_loss = _class_loss()
    head_before = {k: v.clone() for k, v in target_loss.state_dict().items()}
    result = _invert(model, target_loss, torch.tensor([0, 1, 2, 3, 4]), steps=3)
    assert result.images.shape == (5, 3, 32, 32)
    assert result.images.min() >= -1 and result.images.max() <= 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and running statistics
    for key, value in target_loss.state_dict().items():
        assert torch.equal(value, head_before[key]), key
    params = [*model.parameters(), *target_loss.parameters()]
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.requires_grad for p in target_loss.parameters())
    assert set(result.history) == {"loss", "target", "bn", "tv", "l2"}
    assert len(result.history["loss"]) == 3 and result.history["bn"][0] > 0


def test_same_seed_same_images_other_seed_other_images():
    model = _tiny()
    target_loss = EmbeddingTargetLoss(torch.randn(3, 16), "cosine")
    keys = torch.arange(3)
    a = _invert(model, target_loss, keys, seed=5, batch_size=2)
    b = _invert(model, target_loss, keys, seed=5, batch_size=2)
    c = _invert(model, target_loss, keys, seed=6, batch_size=2)
    assert torch.equal(a.images, b.images) and a.history == b.history
    assert not torch.equal(a.images, c.images)


def test_the_optimisation_lowers_the_target_loss():
    model = _tiny()
    target_loss = EmbeddingTargetLoss(torch.randn(4, 16), "cosine")
    result = _invert(model, target_loss, torch.arange(4), steps=30, bn_weight=0.0, jitter=0)
    target = result.history["target"]
    assert np.mean(target[-5:]) < 0.5 * np.mean(target[:5])


# ----------------------------------------------------------------------------- the whole run
def _train(data: Path, out: Path, seed: int, epochs: int) -> Path:
    # the shared tiny run at the default learning rate (0.1), on a full FC
    extra = (f"seed={seed}", "fc.name=full", "optim.lr=0.1", f"train.epochs={epochs}")
    return train_tiny(out, data, *extra, "train.log_every=10")


@pytest.fixture(scope="module")
def tiny_runs(synth_train_dir, tmp_path_factory):
    """Two tiny runs on the 8-class SynthFace fixture, seeds 0 and 1 (10 epochs, ~3 s each)."""
    root = tmp_path_factory.mktemp("invert_runs")
    return [_train(synth_train_dir, root / f"seed{s}", s, 10) for s in (0, 1)]


def _cfg(out: Path, model: Path, *extra: str) -> InvertConfig:
    return load_config(
        None,
        [
            f"output_dir={out}",
            f"model={model}",
            "batch_size=8",
            "progress=false",
            "optim.steps=3",
            "loss.head_params={scale: 16.0, margin: 0.5}",
            *extra,
        ],
        cls=InvertConfig,
    )


@pytest.mark.slow
def test_inversions_are_recognised_as_their_class_by_an_independent_model(tiny_runs, tmp_path):
    model, independent = tiny_runs
    cfg = _cfg(tmp_path / "out", model, f"eval.model={independent}", "optim.steps=200")
    results = run_inversion(cfg)
    indep = results["scores"]["independent"]
    assert indep["chance_top1"] == 1 / 8
    assert indep["top1"] >= 0.5  # 4x chance; measured 5/8 to 8/8 over seeds
    assert indep["cosine"]["mean"] > 0.3
    assert results["scores"]["inverted"]["top1"] == 1.0
    out = tmp_path / "out"
    assert len(list((out / "images").glob("*.png"))) == 8
    for name in ("grid.png", "losses.png", "config.yaml", "results.json"):
        assert (out / name).is_file(), name


def test_run_writes_outputs_and_eval_rescores_with_another_model(tiny_runs, tmp_path, capsys):
    model, independent = tiny_runs
    args = ["invert", "run", "--quiet", "--set", f"output_dir={tmp_path / 'o'}"]
    args += ["--set", f"model={model}", "--set", "optim.steps=2", "--set", "target.classes=[3, 5]"]
    assert main(args) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [t["name"] for t in results["targets"]] == ["class 3", "class 5"]
    assert results["scores"]["independent"] is None and len(results["history"]["loss"]) == 2
    assert (tmp_path / "o" / "images" / "0001_class_5.png").is_file()
    assert main(["invert", "eval", str(tmp_path / "o"), "--model", str(independent)]) == 0
    scores = json.loads((tmp_path / "o" / "scores_seed1.json").read_text())
    assert scores["independent"]["chance_top1"] == 1 / 8
    assert "independent" in capsys.readouterr().out
    assert main(["invert", "eval", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err


def test_pairs_targets_score_verification_with_one_side_inverted(
    tiny_runs, synth_train_dir, tmp_path
):
    model, independent = tiny_runs
    cfg = _cfg(
        tmp_path / "p", model, "target.kind=pairs", f"target.path={synth_train_dir / 'lfw.bin'}",
        "target.count=20", f"eval.model={independent}",
    )  # fmt: skip
    scores = run_inversion(cfg)["scores"]
    for role in ("inverted", "independent"):
        ver = scores[role]["verification"]
        assert ver["pairs"] == 20
        assert 0 <= ver["inverted"]["accuracy_mean"] <= 1 and 0 <= ver["real"]["accuracy_mean"] <= 1
        assert len(scores[role]["cosine"]["per_target"]) == 20
    assert scores["inverted"]["bn_distance"] > 0 and scores["inverted"]["bn_distance_targets"] > 0
    assert "bn_distance" not in scores["independent"]  # the prior is the inverted model's


def test_select_pairs_is_balanced_over_folds_and_kinds():
    issame = np.tile([True, False], 100)  # 200 pairs, 20 per fold
    chosen = select_pairs(issame, 40)
    assert len(chosen) == 40 and issame[chosen].sum() == 20
    folds = np.array_split(np.arange(200), 10)
    assert all(len(np.intersect1d(chosen, f)) == 4 for f in folds)
    assert np.array_equal(select_pairs(issame, 0), np.arange(200))


def test_classifier_weight_joins_rank_shards_in_class_order(tmp_path):
    checkpoint = Checkpoint(tmp_path / "step_00000001")
    checkpoint.path.mkdir()
    full = torch.randn(7, 4)
    torch.save({"world_size": 2}, checkpoint.main_file)
    torch.save(
        {"fc": {"start": 4, "count": 3, "module": {"weight": full[4:]}}}, checkpoint.rank_file(0)
    )
    torch.save(
        {"fc": {"start": 0, "count": 4, "module": {"weight": full[:4]}}}, checkpoint.rank_file(1)
    )
    assert torch.equal(classifier_weight(checkpoint.path), full)


# --------------------------------------------------------------------------------- bad input
def test_model_without_batchnorm_is_refused_for_the_bn_prior():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 16))
    target_loss = EmbeddingTargetLoss(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"no BatchNorm layer.*loss.bn_weight=0"):
        _invert(model, target_loss, torch.arange(2))
    assert _invert(model, target_loss, torch.arange(2), bn_weight=0.0).images.shape[0] == 2


def test_class_out_of_range_and_embedding_of_the_wrong_size(tmp_path):
    model = _tiny()
    classifier = FullFC(16, 5)
    with pytest.raises(ValueError, match=r"target.classes: class 7 is out of range .* 5 classes"):
        build_targets(TargetConfig(classes=[1, 7]), LossConfig(), model, 32, classifier=classifier)
    np.save(tmp_path / "e.npy", np.zeros((3, 7), dtype=np.float32))
    cfg = TargetConfig(kind="embedding", path=str(tmp_path / "e.npy"))
    with pytest.raises(DataFormatError, match=r"e.npy: expected N x 16 embeddings .* \(3, 7\)"):
        build_targets(cfg, LossConfig(), model, 32)
    np.save(tmp_path / "e.npy", np.full((2, 16), np.nan, dtype=np.float32))
    with pytest.raises(DataFormatError, match="NaN"):
        build_targets(cfg, LossConfig(), model, 32)
    rows = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    np.save(tmp_path / "e.npy", rows)
    cfg.count = 2
    targets, loss = build_targets(cfg, LossConfig(open_set="l2"), model, 32)
    assert targets.keys.tolist() == [0, 1] and targets.images is None
    emb = torch.zeros(2, 16)
    expected = (torch.from_numpy(rows[[1, 0]]) ** 2).sum(dim=1)  # ||0 - t||^2
    torch.testing.assert_close(loss(emb, torch.tensor([1, 0])), expected)


def test_onnx_model_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"m.onnx: an ONNX model cannot be inverted"):
        load_invertible(tmp_path / "m.onnx")
    args = ["invert", "run", "--set", f"model={tmp_path / 'm.onnx'}", "--set", "target.kind=image"]
    args += ["--set", f"target.path={tmp_path}", "--set", f"output_dir={tmp_path / 'o'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be inverted" in err and len(err.splitlines()) == 1


def test_nan_stops_names_the_step_and_keeps_the_last_good_images(tmp_path, monkeypatch):
    model = build_backbone("r18_tiny", width=0.125, embedding_size=16)  # 56 px: r18_tiny's own
    torch.save(model.state_dict(), tmp_path / "m.pth")
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        (tmp_path / "faces").mkdir(exist_ok=True)
        (tmp_path / "faces" / f"f{i}.png").write_bytes(encode_image(image, "png"))
    import robustface.invert.inversion as inversion

    calls = {"n": 0}
    tv = inversion.total_variation

    def poisoned(x):
        calls["n"] += 1
        return tv(x) * (math.nan if calls["n"] == 5 else 1.0)  # batch 1 (of 2), its step 1

    monkeypatch.setattr(inversion, "total_variation", poisoned)
    cfg = _cfg(
        tmp_path / "o", tmp_path / "m.pth", "target.kind=image",
        f"target.path={tmp_path / 'faces'}", "batch_size=2",
    )  # fmt: skip
    with pytest.raises(InversionDivergedError, match=r"step 1 of batch 1: the loss is nan"):
        run_inversion(cfg)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["stopped"]["step"] == 1 and results["stopped"]["batch"] == 1
    assert len(list((tmp_path / "o" / "images").glob("*.png"))) == 3  # 2 done + 1 at step 0


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        bad = ["target.kind=embedding", "loss.bn_weight=-1", "optim.steps=0", "augment.jiter=2"]
        load_config(None, [*bad, "loss.head=boundaryface"], cls=InvertConfig)
    text = str(err.value)
    for expected in ("model: required", "target.path: required", "loss.bn_weight: must be >= 0",
                     "optim.steps: must be >= 1", "did you mean 'augment.jitter'",
                     "loss.head: 'boundaryface' depends on the training epoch"):  # fmt: skip
        assert expected in text
    for extra, expected in (
        ("loss.head=centerbiasface", "loss.head: 'centerbiasface' depends on per-class state"),
        ("loss.head=arcfce", "loss.head: unknown head 'arcfce'"),
        ("loss.head_params={scale: 16, margn: 0.5}", "loss.head_params: "),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(None, ["model=m.pth", extra], cls=InvertConfig)


def test_the_independent_model_must_not_be_the_inverted_one(tmp_path):
    model = tmp_path / "run"  # refused before anything is read
    with pytest.raises(ValueError, match=r"eval.model .* is the inverted model"):
        run_inversion(_cfg(tmp_path / "o", model, f"eval.model={tmp_path / '.' / 'run'}"))


# ------------------------------------------------------------------- model size, count, paths
def _faces(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        image = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        (folder / f"f{i}.png").write_bytes(encode_image(image, "png"))
    return folder


def test_input_size_of_a_pth_is_set_for_run_and_eval_and_the_count_used_is_told(tmp_path, capsys):
    for seed in (0, 1):  # 32 px r18_tiny weights: not its default 56, so not inferable
        torch.manual_seed(seed)
        model = build_backbone("r18_tiny", width=0.125, embedding_size=16, input_size=32)
        torch.save(model.state_dict(), tmp_path / f"m{seed}.pth")
    faces = _faces(tmp_path / "faces", 3)
    args = ["invert", "run", "--quiet", "--set", f"model={tmp_path / 'm0.pth'}"]
    args += ["--set", "target.kind=image", "--set", f"target.path={faces}"]
    args += ["--set", f"output_dir={tmp_path / 'o'}", "--set", "optim.steps=1"]
    assert main([*args, "--set", "target.count=5"]) == 2
    assert "--input-size" in capsys.readouterr().err  # load_backbone's advice
    assert main([*args, "--set", "target.count=5", "--set", "input_size=32"]) == 0
    err = capsys.readouterr().err
    assert "target.count=5: 3 targets used (only 3 image targets are available)" in err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["count"] == 3 and results["input_size"] == 32
    eval_args = ["invert", "eval", str(tmp_path / "o"), "--model", str(tmp_path / "m1.pth")]
    assert main(eval_args) == 2
    capsys.readouterr()
    assert main([*eval_args, "--input-size", "32"]) == 0
    assert json.loads((tmp_path / "o" / "scores_m1.pth.json").read_text())["independent"]
    copy = tmp_path / "copy_of_m0.pth"  # the inverted weights under another name
    copy.write_bytes((tmp_path / "m0.pth").read_bytes())
    capsys.readouterr()
    assert main([*eval_args[:-1], str(copy), "--input-size", "32"]) == 2
    assert "gives the inverted model's embeddings" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"eval.input_size: must be > 0"):
        load_config(None, ["model=m.pth", "eval.input_size=0"], cls=InvertConfig)


def test_count_notice_for_balanced_pairs():
    cfg = TargetConfig(kind="pairs", path="lfw.bin", count=7)
    assert count_notice(cfg, 20) == (
        "target.count=7: 20 targets used (pairs are balanced over the 10 folds and same / "
        "different: a multiple of 20, at least 20, at most the .bin's)"
    )
    assert count_notice(TargetConfig(kind="pairs", path="x", count=20), 20) is None
    assert count_notice(TargetConfig(count=0), 8) is None
    assert count_notice(TargetConfig(count=5000), 20).startswith("target.count=5000: 20 targets")


def test_missing_model_path_is_named_and_eval_help_says_class_needs_a_run(tmp_path, capsys):
    nope = tmp_path / "nope"
    args = ["invert", "run", "--set", f"model={nope}", "--set", f"output_dir={tmp_path / 'o'}"]
    assert main(args) == 2
    assert f"{nope}: no such run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["invert", "eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "class targets need a run directory" in help_text and "--input-size" in help_text


def test_embedding_target_shape_is_the_files_and_embed_output_is_raw(tmp_path):
    model = _tiny()
    np.save(tmp_path / "norms.npy", np.ones(300, dtype=np.float32))
    cfg = TargetConfig(kind="embedding", path=str(tmp_path / "norms.npy"))
    with pytest.raises(DataFormatError, match=r"norms.npy: expected N x 16 .* float32 \(300,\)$"):
        build_targets(cfg, LossConfig(), model, 32)
    # an `embed` output directory: unit rows times their norms are the targets
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(3, 16)).astype(np.float32)
    norms = np.linalg.norm(raw, axis=1).astype(np.float32)
    out = tmp_path / "emb"
    out.mkdir()
    np.save(out / "embeddings.npy", raw / norms[:, None])
    np.save(out / "norms.npy", norms)
    (out / "sources.tsv").write_text("path\na\nb\nc\n", encoding="utf-8")
    (out / "manifest.json").write_text("{}", encoding="utf-8")
    cfg = TargetConfig(kind="embedding", path=str(out))
    _, loss = build_targets(cfg, LossConfig(open_set="l2"), model, 32)
    expected = (torch.from_numpy(raw) ** 2).sum(dim=1)  # ||0 - t||^2 with t the raw embedding
    torch.testing.assert_close(loss(torch.zeros(3, 16), torch.arange(3)), expected)
