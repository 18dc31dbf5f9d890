"""Loading a backbone for evaluation: run directories, bare files, AdaFace checkpoints, BGR."""

from __future__ import annotations

import pytest
import torch

from robustface.evaluate.loading import load_backbone
from robustface.models import build_backbone

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
    with pytest.raises(ValueError, match="needs --backbone"):
        load_backbone(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_backbone(tmp_path)
