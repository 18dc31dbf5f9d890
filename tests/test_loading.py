"""Loading a backbone for evaluation: run directories, bare files, AdaFace checkpoints, BGR."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from robustface.config import load_config, to_dict
from robustface.errors import DataFormatError
from robustface.models import build_backbone
from robustface.models.loading import infer_architecture, load_backbone, weights_file
from robustface.utils.run import RunDir

KW = {"input_size": 32, "width": 0.125, "embedding_size": 16}


def test_bare_iresnet_file_is_rgb(tmp_path):
    model = build_backbone("r18", **KW).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    loaded, size = load_backbone(tmp_path / "backbone.pth", backbone="r18", **KW)
    x = torch.randn(2, 3, 32, 32)
    assert size == 32
    torch.testing.assert_close(loaded(x), model(x))


def test_adaface_checkpoint_is_loaded_and_fed_bgr(tmp_path):
    model = build_backbone("ir_18", dropout=0.0, **KW).eval()
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    state["state_dict"]["head.kernel"] = torch.zeros(16, 3)
    torch.save(state, tmp_path / "adaface.ckpt")
    loaded, _ = load_backbone(tmp_path / "adaface.ckpt", backbone="ir_18", **KW)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x.flip(1)))  # RGB in, BGR to the weights
    as_rgb, _ = load_backbone(tmp_path / "adaface.ckpt", backbone="ir_18", color_order="RGB", **KW)
    torch.testing.assert_close(as_rgb(x), model(x))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_backbone(tmp_path / "nope.pth", backbone="r18")
    torch.save({}, tmp_path / "x.pth")
    with pytest.raises(DataFormatError, match=r"x\.pth: an empty state dict"):
        load_backbone(tmp_path / "x.pth")
    torch.save({"conv.weight": torch.zeros(2, 3)}, tmp_path / "x.pth")
    with pytest.raises(DataFormatError, match=r"cannot tell the architecture .* set --backbone"):
        load_backbone(tmp_path / "x.pth")
    with pytest.raises(DataFormatError, match=r"does not fit r18 .*Missing key"):
        load_backbone(tmp_path / "x.pth", backbone="r18")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_backbone(tmp_path)


def demo_like(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """The demo's backbone (r18_tiny with a 128-d embedding) saved as a bare state dict."""
    torch.manual_seed(0)
    model = build_backbone("r18_tiny", embedding_size=128).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    return model, tmp_path / "backbone.pth"


@pytest.mark.slow
def test_architecture_is_read_from_the_weights(tmp_path):
    model, path = demo_like(tmp_path)
    state = torch.load(path, weights_only=True)
    arch = infer_architecture(state)
    assert (arch.family, arch.names) == ("IResNet", ("r18", "r18_tiny"))
    # conv1 out channels 16 = 64 x width; fc: 128 rows, 128 channels x 4 x 4 columns
    assert (arch.width, arch.embedding_size, arch.final_side) == (16 / 64, 128, 4)
    assert arch.input_range() == (49, 64)
    x = torch.randn(2, 3, 56, 56)
    for flags in ({}, {"backbone": "r18_tiny"}, {"backbone": "r18", "input_size": 56}):
        loaded, size = load_backbone(path, **flags)
        assert size == 56, flags
        torch.testing.assert_close(loaded(x), model(x))
    # a file from PyTorch < 0.4.1 has no BatchNorm num_batches_tracked
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    torch.testing.assert_close(load_backbone(tmp_path / "old.pth")[0](x), model(x))
    # IR and MobileFaceNet too: blocks per stage from the keys, sizes from the shapes
    for name, kw in (("ir_se_50", {"width": 0.125}), ("mbf_large", {"width": 0.25})):
        other = build_backbone(name, embedding_size=32, input_size=64, **kw).eval()
        torch.save(other.state_dict(), tmp_path / f"{name}.pth")
        arch = infer_architecture(other.state_dict())
        assert (arch.names, arch.width, arch.embedding_size) == ((name,), kw["width"], 32)
        assert arch.final_side == 4
        loaded, size = load_backbone(tmp_path / f"{name}.pth", input_size=64, color_order="RGB")
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(loaded(x), other(x))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"width": 0.5}, "--width 0.5 does not fit its weights (--width 0.25): leave it out"),
        ({"embedding_size": 512}, "--embedding-size 512 does not fit its weights"),
        ({"backbone": "r50"}, "holds weights of r18 / r18_tiny, not r50: set --backbone r18"),
        ({"backbone": "ir_18"}, "not ir_18"),
        (
            {"backbone": "r18"},
            "4x4 final feature map (input size 49 to 64), r18's default input size 112 does not",
        ),
        ({"input_size": 112}, "--input-size 112 gives a 7x7 final feature map"),
    ],
)
def test_flags_that_contradict_the_weights(tmp_path, flags, message):
    _, path = demo_like(tmp_path)
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        load_backbone(path, **flags)
    assert str(info.value).startswith(str(path))


def test_weights_file_is_the_file_load_backbone_reads(tmp_path):
    """A run's best backbone if present, else its last; a file is itself."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in KW.items()] + ["model.backbone=r18"])
    run = RunDir.create(tmp_path / "run", cfg, seed=0)
    last, best = build_backbone("r18", **KW).eval(), build_backbone("r18", **KW).eval()
    with pytest.raises(FileNotFoundError, match=re.escape("no best_backbone.pth or backbone.pth")):
        weights_file(run.path)
    torch.save(last.state_dict(), run.backbone_file)
    assert weights_file(run.path) == run.backbone_file
    torch.save(best.state_dict(), run.best_backbone_file)
    assert weights_file(run.path) == run.best_backbone_file
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_backbone(run.path)[0](x), best(x))
    assert weights_file(run.backbone_file) == run.backbone_file
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        weights_file(tmp_path / "missing.pth")


def test_training_checkpoints_and_ddp_prefixed_files_load(tmp_path):
    """A step's main.pt (its config names the architecture, so no flag is needed) and a state
    dict saved from a DistributedDataParallel wrapper (``module.`` keys) give the backbone's
    outputs; a run stopped before backbone.pth names its last checkpoint."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in KW.items()] + ["model.backbone=r18"])
    run = RunDir.create(tmp_path / "run", cfg, seed=0)
    model = build_backbone("r18", **KW).eval()
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    main_state = {"backbone": model.state_dict(), "config": to_dict(cfg), "progress": {}}
    torch.save(main_state, step / "main.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_backbone(step / "main.pt")[0](x), model(x))
    with pytest.raises(FileNotFoundError, match=re.escape(f"last checkpoint is {step}/main.pt")):
        load_backbone(run.path)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    torch.testing.assert_close(load_backbone(tmp_path / "ddp.pth", **KW)[0](x), model(x))
