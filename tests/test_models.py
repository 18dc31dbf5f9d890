"""Backbones: registry conformance, arcface_torch / AdaFace checkpoint layouts, counts, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustface.errors import ParameterTypeError
from robustface.models import (
    BACKBONES,
    AdaFaceOutput,
    FaceBackbone,
    build_backbone,
    list_backbones,
    load_adaface_checkpoint,
    split_norm,
)
from robustface.models.meta import check_stages
from robustface.utils.registry import Registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small settings every factory accepts: fast on CPU, embedding size independent of width.
SMALL = {"input_size": 56, "width": 0.25, "embedding_size": 64}


def small(name: str, **kwargs) -> FaceBackbone:
    torch.manual_seed(0)
    return build_backbone(name, **{**SMALL, **kwargs})


def on_meta(name: str, **kwargs) -> FaceBackbone:
    """Build without allocating or initialising weights (shapes and counts only)."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- registry


def test_registry_register_get_names():
    reg: Registry[object] = Registry("widget")

    @reg.register()
    def alpha():
        return 1

    reg.register("beta_2")(len)
    assert reg.get("alpha") is alpha and reg.get("beta_2") is len
    assert "alpha" in reg and "gamma" not in reg and len(reg) == 2
    assert reg.names() == ["alpha", "beta_2"]
    assert reg.names("b*") == ["beta_2"]


def test_registry_duplicate_name_is_an_error():
    reg: Registry[object] = Registry("widget")
    reg.register("same")(1)
    with pytest.raises(ValueError, match="'same' is already registered"):
        reg.register("same")(2)
    assert reg.get("same") == 1


def test_registry_unknown_name_lists_close_matches_and_all_names():
    with pytest.raises(KeyError) as info:
        BACKBONES.get("r51")
    message = str(info.value)
    assert "did you mean" in message and "'r50'" in message
    assert message.split("did you mean")[1].split("?")[0].count("'") <= 6  # at most 3 matches
    for name in list_backbones():
        assert name in message.split("valid names:")[1]
    with pytest.raises(KeyError, match="valid names") as info:
        build_backbone("zzz")
    assert "did you mean" not in str(info.value)


def test_list_backbones_filters_and_sorts():
    assert list_backbones("r*") == ["r100", "r18", "r18_tiny", "r200", "r34", "r50"]
    assert list_backbones("ir_se_*") == ["ir_se_101", "ir_se_18", "ir_se_50"]
    assert {"mbf", "ir_18", "ir_50", "ir_101"} <= set(list_backbones())


# ---------------------------------------------------------------- conformance over the registry


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_forward_backward_and_state_dict_round_trip(name):
    model = small(name)
    x = torch.randn(2, 3, 56, 56)
    out = model(x)
    assert out.shape == (2, 64) and out.dtype == torch.float32
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)

    fresh = build_backbone(name, **SMALL)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        split = model.forward_head(model.forward_features(x))
        assert torch.equal(split, model(x))
    assert model.meta.input_size == 56 and model.meta.color_order in ("RGB", "BGR")


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_intermediates_match_forward(name):
    model = small(name)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        model(x)  # BN running stats: deep nets at init overflow in eval mode otherwise
    model.eval()
    names = model.feature_names()
    first, last_unit = names[0], [n for n, _ in model.trunk_units()][-1]
    with torch.no_grad():
        emb, maps = model.forward_intermediates(x, [last_unit, first])
        assert list(maps) == [last_unit, first]
        assert torch.isfinite(emb).all() and torch.equal(emb, model(x))
        assert torch.equal(maps[last_unit], model.forward_features(x))
    with pytest.raises(KeyError, match="unknown feature name 'nope'"):
        model.intermediates(x, ["nope"])


# ---------------------------------------------------------------- arcface_torch layout


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def arcface_r18_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of arcface_torch's iresnet18 state_dict, written from REFERENCE.md."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64)}
    keys["prelu.weight"] = (64,)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            cin = inplanes if block == 0 else planes
            keys.update(_bn(f"{p}.bn1", cin))
            keys[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes))
            keys[f"{p}.prelu.weight"] = (planes,)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn3", planes))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes))
        inplanes = planes
    keys.update(_bn("bn2", 512))
    keys["fc.weight"] = (512, 512 * 7 * 7)
    keys["fc.bias"] = (512,)
    keys.update(_bn("features", 512))
    return keys


def test_r18_state_dict_matches_arcface_torch_layout():
    expected = arcface_r18_layout()
    assert len(expected) == 187
    sd = on_meta("r18").state_dict()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_arcface_named_state_dict_loads_strictly_and_renamed_keys_fail():
    torch.manual_seed(1)
    ckpt = {
        k: torch.randint(0, 5, s) if k.endswith("num_batches_tracked") else torch.randn(s)
        for k, s in arcface_r18_layout().items()
    }
    model = build_backbone("r18")
    model.load_state_dict(ckpt, strict=True)
    assert torch.equal(model.fc.weight, ckpt["fc.weight"])
    assert torch.equal(model.layer3[0].downsample[0].weight, ckpt["layer3.0.downsample.0.weight"])

    renamed = dict(ckpt)
    renamed["layer1.0.shortcut.0.weight"] = renamed.pop("layer1.0.downsample.0.weight")
    with pytest.raises(RuntimeError, match=r"downsample\.0\.weight"):
        model.load_state_dict(renamed, strict=True)


@pytest.mark.parametrize(
    ("name", "millions", "keys"),
    [
        ("r18", 24.03, 187),
        ("r34", 34.14, 331),
        ("r50", 43.59, 475),
        ("r100", 65.16, 925),
        ("r200", 118.83, 1807),
    ],
)
def test_iresnet_parameter_and_key_counts(name, millions, keys):
    model = on_meta(name)
    assert round(n_params(model) / 1e6, 2) == millions
    assert len(model.state_dict()) == keys
    assert model.fc.in_features == 512 * 7 * 7


@pytest.mark.parametrize(("name", "millions"), [("ir_50", 43.6), ("ir_101", 65.2), ("mbf", 2.06)])
def test_published_parameter_counts(name, millions):
    assert abs(n_params(on_meta(name)) / 1e6 - millions) < 0.05


def test_features_bn_weight_is_frozen_at_one():
    model = small("r18")
    assert model.features.weight.requires_grad is False
    assert torch.equal(model.features.weight, torch.ones(64))
    model(torch.randn(2, 3, 56, 56)).sum().backward()
    assert model.features.weight.grad is None
    fresh = small("r18")
    fresh.load_state_dict(model.state_dict())
    assert fresh.features.weight.requires_grad is False


def test_input_size_and_width_set_fc_and_feature_map_shapes():
    model = build_backbone("r18", input_size=56, width=0.25)
    assert model.conv1.out_channels == 16 and model.layer4[1].conv2.out_channels == 128
    assert model.fc.in_features == 128 * 4 * 4 and model.fc.out_features == 512
    assert model.forward_features(torch.randn(2, 3, 56, 56)).shape == (2, 128, 4, 4)
    assert on_meta("r50", input_size=64, width=0.5).fc.in_features == 256 * 4 * 4
    assert on_meta("ir_50", input_size=56).output_layer[3].in_features == 512 * 4 * 4
    assert on_meta("mbf", input_size=56).features.layers[0].layers[0].kernel_size == (4, 4)
    assert on_meta("mbf").features.layers[0].layers[0].kernel_size == (7, 7)


def test_tiny_preset():
    model = on_meta("r18_tiny")
    assert (model.input_size, model.width, model.embedding_size) == (56, 0.25, 512)
    assert round(n_params(model) / 1e6, 2) == 1.75
    assert on_meta("r18_tiny", embedding_size=128).fc.out_features == 128


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"width": 0}, "width"), ({"input_size": 0}, "input_size"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        build_backbone("r18", **kwargs)


def test_argument_types_are_checked():
    with pytest.raises(ParameterTypeError, match="embedding_size must be an integer, got float"):
        build_backbone("r18", embedding_size=128.0)
    with pytest.raises(ParameterTypeError, match=r"blocks\[1\] must be an integer, got bool"):
        check_stages("blocks", (1, True, 1, 1))
    with pytest.raises(ValueError, match=r"blocks\[3\] must be >= 1, got 0"):
        check_stages("blocks", [1, 1, 1, 0])
    with pytest.raises(ValueError, match=r"blocks must be 4 positive ints, got \(1, 1\)"):
        check_stages("blocks", [1, 1])
    assert check_stages("units", [1, np.int64(2), 1, 1]) == (1, 2, 1, 1)
    assert on_meta("mbf", embedding_size=np.int64(64)).embedding_size == 64


# ---------------------------------------------------------------- mixed precision


def test_fp16_on_cpu_runs_trunk_in_bf16_and_head_in_fp32():
    ref = small("r18").eval()
    amp = small("r18", fp16=True).eval()
    amp.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        assert amp.forward_features(x).dtype == torch.bfloat16
        out = amp(x)
        assert out.dtype == torch.float32
        assert F.cosine_similarity(out, ref(x)).min() > 0.999
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ref(x).dtype == torch.float32  # fc/features stay fp32 under an outer autocast


# ---------------------------------------------------------------- AdaFace / CAFace layout


def test_ir_layout_matches_adaface_net():
    sd = on_meta("ir_50").state_dict()
    assert len(sd) == 467
    assert "body.0.shortcut_layer.0.weight" not in sd  # MaxPool2d(1, 2): 64 -> 64
    assert tuple(sd["body.3.shortcut_layer.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["body.0.res_layer.4.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["output_layer.3.weight"].shape) == (512, 25088)
    assert "output_layer.4.running_var" in sd and "output_layer.4.weight" not in sd
    assert list(sd)[:7] == [
        "input_layer.0.weight",
        *(f"input_layer.1.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
        "input_layer.1.num_batches_tracked",
        "input_layer.2.weight",
    ]
    se = on_meta("ir_se_50").state_dict()
    assert tuple(se["body.0.res_layer.se_block.fc1.weight"].shape) == (4, 64, 1, 1)
    assert tuple(se["body.0.res_layer.se_block.fc2.weight"].shape) == (64, 4, 1, 1)


def test_load_adaface_checkpoint_strips_prefix_and_is_strict():
    source = small("ir_18").eval()
    lightning = {
        "state_dict": {
            **{f"model.{k}": v for k, v in source.state_dict().items()},
            "head.kernel": torch.randn(64, 10),
        },
        "epoch": 3,
    }
    target = build_backbone("ir_18", **SMALL).eval()
    assert load_adaface_checkpoint(target, lightning) == ["head.kernel"]
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert load_adaface_checkpoint(target, source.state_dict()) == []

    del lightning["state_dict"]["model.body.1.res_layer.1.weight"]
    with pytest.raises(RuntimeError, match=r"body\.1\.res_layer\.1\.weight"):
        load_adaface_checkpoint(target, lightning)


def test_adaface_output_and_bgr_metadata():
    model = small("ir_18").eval()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        raw = model(x)
        unit, norm = AdaFaceOutput(model)(x)
    assert norm.shape == (3, 1)
    assert torch.allclose(unit.norm(dim=1), torch.ones(3))
    assert torch.allclose(unit * norm, raw, atol=1e-5)
    assert split_norm(torch.zeros(1, 4))[1].item() == pytest.approx(1e-5)

    assert model.meta.color_order == "BGR" and small("r18").meta.color_order == "RGB"
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[:, 0] = 255.0  # pure red
    assert model.meta.prepare(rgb)[0, :, 0, 0].tolist() == [-1.0, -1.0, 1.0]
    assert small("r18").meta.prepare(rgb)[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]


def test_caface_style_blocks_of_ir_101():
    model = on_meta("ir_101")
    maps = model.intermediates(torch.randn(2, 3, 112, 112, device="meta"), ["body.15", "body.45"])
    assert maps["body.15"].shape == (2, 128, 28, 28)
    assert maps["body.45"].shape == (2, 256, 14, 14)
    assert model.feature_aliases["stage2"] == "body.15"
    assert model.feature_aliases["stage3"] == "body.45"


def test_intermediates_stop_after_deepest_requested_block():
    model = small("r18").eval()
    calls = []
    model.layer4[0].register_forward_hook(lambda *_: calls.append("layer4"))
    maps = model.intermediates(torch.randn(2, 3, 56, 56), ["layer2", "stem"])
    assert [tuple(v.shape) for v in maps.values()] == [(2, 32, 14, 14), (2, 16, 56, 56)]
    assert calls == []
    model.forward_intermediates(torch.randn(2, 3, 56, 56), ["layer2"])
    assert calls == ["layer4"]


def test_unknown_factory_argument_is_named():
    # the presets forward **kwargs, so the model's own constructor names the bad argument
    with pytest.raises(TypeError, match="unexpected keyword argument 'embeding_size'"):
        build_backbone("r18", embeding_size=128)
