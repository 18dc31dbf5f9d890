"""Style inputs from a backbone (robustface.fuse.styles) against hooks and a written-out formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustface.fuse.caface import STYLE_CHANNELS, CAFace, CAFaceAggregator
from robustface.fuse.styles import embed_with_styles, style_channels, styles_from_maps
from robustface.models import build_backbone
from robustface.models.loading import BGRInput


def manual_style(fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, 2): mean and unbiased std over H*W per channel, written out."""
    n, c, h, w = fmap.shape
    x = fmap.double().reshape(n, c, h * w)
    mean = x.sum(2) / (h * w)
    std = (((x - mean[..., None]) ** 2).sum(2) / (h * w - 1)).sqrt()
    return torch.stack([mean, std], dim=2).float()


def hooked_maps(backbone: nn.Module, module_names: list[str], run) -> list[torch.Tensor]:
    """Outputs of the named submodules captured while ``run()`` executes."""
    found: dict[str, torch.Tensor] = {}
    handles = [
        backbone.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: found.__setitem__(name, out.detach().clone())
        )
        for name in module_names
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [found[name] for name in module_names]


def test_r18_tiny_styles_and_features_match_hooks_and_model():
    torch.manual_seed(0)
    model = build_backbone("r18_tiny", embedding_size=32)
    images = torch.randn(5, 3, 56, 56)
    model.train()  # embed_with_styles must run in eval mode and restore the mode
    feats, styles = embed_with_styles(model, images, ("layer2", "layer3.1"), batch_size=2)
    assert model.training
    model.eval()
    blocks = [model.feature_aliases["layer2"], "layer3.1"]
    maps = hooked_maps(model, blocks, lambda: model(images))
    expected = torch.cat([manual_style(m) for m in maps], dim=1)
    assert styles.shape == (5, 32 + 64, 2)
    torch.testing.assert_close(styles, expected, rtol=1e-5, atol=1e-5)
    # features of the same batches as model(batch) (batch size changes the float rounding)
    with torch.no_grad():
        direct = torch.cat([model(images[i : i + 2]) for i in range(0, 5, 2)])
    torch.testing.assert_close(feats, direct, rtol=1e-6, atol=1e-6)
    assert style_channels(model, ("layer2", "layer3.1")) == 96


def test_bgr_wrapper_flips_the_input_as_the_model_does():
    torch.manual_seed(0)
    backbone = build_backbone("ir_18", input_size=56, width=0.25, embedding_size=32).eval()
    wrapped = BGRInput(backbone).eval()  # what load_backbone returns for AdaFace/CAFace weights
    images = torch.randn(3, 3, 56, 56)
    feats, styles = embed_with_styles(wrapped, images)
    blocks = [backbone.feature_aliases["stage2"], backbone.feature_aliases["stage3"]]
    maps = hooked_maps(backbone, blocks, lambda: backbone(images.flip(1)))
    expected = torch.cat([manual_style(m) for m in maps], dim=1)
    torch.testing.assert_close(styles, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, wrapped(images).detach(), rtol=1e-5, atol=1e-5)
    # the unflipped input gives other styles: the flip is not a no-op here
    _, unflipped = embed_with_styles(backbone, images)
    assert not torch.allclose(unflipped, styles, atol=1e-3)


def test_ir_101_styles_are_the_published_384_channels():
    with torch.device("meta"):
        model = build_backbone("ir_101")
    assert style_channels(model) == STYLE_CHANNELS == 384
    assert style_channels(model, ("body.15", "body.45")) == 384
    assert style_channels(BGRInput(model), ("stage2",)) == 128


def test_styles_from_maps_order_is_mean_then_std():
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # mean 3, unbiased std sqrt(14/3)
    out = styles_from_maps({"a": fmap})
    torch.testing.assert_close(out, torch.tensor([[[3.0, (14 / 3) ** 0.5]]]))
    with pytest.raises(ValueError, match="1x1"):
        styles_from_maps([torch.ones(2, 4, 1, 1)])


def test_bad_input_is_named():
    model = build_backbone("r18_tiny", embedding_size=32)
    images = torch.randn(2, 3, 56, 56)
    with pytest.raises(ValueError, match=r"blocks: unknown block name 'stage9'; valid: .*layer2"):
        embed_with_styles(model, images, ("layer2", "stage9"))
    with pytest.raises(ValueError, match="blocks: unknown"):
        style_channels(model, ("nope",))
    with pytest.raises(ValueError, match="blocks: MobileFaceNet has no default style blocks"):
        style_channels(build_backbone("mbf", input_size=56, embedding_size=32))
    with pytest.raises(ValueError, match="blocks: give at least one"):
        embed_with_styles(model, images, ())
    with pytest.raises(ValueError, match="model: styles need a robustface backbone"):
        embed_with_styles(nn.Linear(3, 3), images)
    with pytest.raises(ValueError, match="images must be N x 3 x H x W float"):
        embed_with_styles(model, torch.zeros(2, 56, 56, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images is empty"):
        embed_with_styles(model, images[:0])
    with pytest.raises(ValueError, match="batch_size"):
        embed_with_styles(model, images, batch_size=0)


def test_end_to_end_ir_18_styles_feed_caface():
    # IR-18 at full width has the IR-101 stage widths (128 + 256 = 384 channels): the published
    # CAFace layout, from a backbone small enough for the CPU
    torch.manual_seed(0)
    backbone = build_backbone("ir_18", embedding_size=512)
    model = BGRInput(backbone).eval()
    images = torch.randn(6, 3, 112, 112)
    feats, styles = embed_with_styles(model, images, batch_size=4)
    assert feats.shape == (6, 512) and styles.shape == (6, STYLE_CHANNELS, 2)
    assert torch.isfinite(styles).all() and (styles[..., 1] >= 0).all()
    fused = CAFaceAggregator(CAFace(), chunk_size=4).fuse(feats, styles)
    assert fused.shape == (512,)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)


def test_tiny_backbone_default_blocks_and_own_channel_count():
    model = build_backbone("r18_tiny", embedding_size=32)
    c = style_channels(model)  # IResNet default: layer2 + layer3
    _, styles = embed_with_styles(model, torch.randn(2, 3, 56, 56))
    assert c == style_channels(model, ("layer2.1", "layer3.1")) == 32 + 64 != STYLE_CHANNELS
    assert styles.shape == (2, c, 2)
    with pytest.raises(ValueError, match="styles: expected shape"):
        CAFaceAggregator(CAFace()).fuse(torch.randn(2, 512), styles)
    # a CAFace built for that channel count takes them (features stay 512-d, as published)
    small = CAFace(style_channels=c)
    # per style channel: cfc (2 values) and one column of the 64-unit Linear
    assert sum(p.numel() for p in small.parameters()) == 786_524 - (2 + 64) * (STYLE_CHANNELS - c)
    fused = CAFaceAggregator(small).fuse(torch.randn(2, 512), styles)
    torch.testing.assert_close(fused.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="style_channels must be >= 1"):
        CAFace(style_channels=0)
