"""CAFace training features (robustface.fuse.extract): values, augmentation, resume, staleness."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import robustface.fuse.extract as extract_module
from robustface.data.recordio import RecordIODataset
from robustface.data.transforms import EvalTransform, TrainTransform
from robustface.errors import DataFormatError
from robustface.fuse.extract import FusionFeatures, augment_views, extract_fusion_features
from robustface.fuse.styles import embed_with_styles
from robustface.models import build_backbone
from robustface.models.loading import load_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32  # model input size
OPTIONS = {"input_size": SIZE}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny IResNet (64-d features, 16 + 32 style channels) saved as a .pth."""
    torch.manual_seed(0)
    model = build_backbone("r18_tiny", embedding_size=64, input_size=SIZE, width=0.125)
    path = tmp_path_factory.mktemp("fuse_model") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extracted(tiny_model, synth_train_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuse_extract") / "feats"
    extract_fusion_features(
        tiny_model, synth_train_dir, out, views=3, batch_size=16, seed=5,
        progress=False, model_options=OPTIONS,
    )  # fmt: skip
    return out


def test_values_equal_embed_with_styles_on_the_same_views(extracted, tiny_model, synth_train_dir):
    data = FusionFeatures.open(extracted)
    dataset = RecordIODataset(synth_train_dir)
    model, size = load_backbone(tiny_model, **OPTIONS)
    assert size == SIZE
    assert isinstance(data.features, np.memmap) and data.features.dtype == np.float16
    assert data.features.shape == (64, 3, 64) and data.clean.shape == (64, 64)
    assert data.styles.shape == (64, 3, 16 + 32, 2)
    np.testing.assert_array_equal(data.labels, dataset.labels)
    assert data.meta["key"]["blocks"] == ["layer2", "layer3"] and data.num_classes == 8
    for i in (0, 17, 63):
        image, _ = dataset[i]
        views = augment_views(image, 3, np.random.default_rng([5, i]), SIZE)
        images = torch.cat([EvalTransform(SIZE)(image)[None], views])
        feats, styles = embed_with_styles(model, images, ("layer2", "layer3"))
        # stored in float16 from a batch of 16 images (float rounding differs slightly)
        torch.testing.assert_close(
            torch.from_numpy(data.clean[i].astype(np.float32)), feats[0], rtol=2e-3, atol=2e-3
        )
        torch.testing.assert_close(
            torch.from_numpy(data.features[i].astype(np.float32)), feats[1:], rtol=2e-3, atol=2e-3
        )
        torch.testing.assert_close(
            torch.from_numpy(data.styles[i].astype(np.float32)), styles[1:], rtol=2e-3, atol=2e-3
        )


def test_augmentation_is_one_strong_view_then_weak_views_of_it(synth_train_dir):
    image, _ = RecordIODataset(synth_train_dir)[3]
    views = augment_views(image, 4, np.random.default_rng(11), SIZE)
    # written out: jitter, then blur or down-up (even odds); each weak view is one op applied to
    # the strong view; every view resized and flipped with probability 1/2
    rng = np.random.default_rng(11)
    jitter, blur, down_up = (
        TrainTransform(flip_p=0.0, color_jitter=1.0),
        TrainTransform(flip_p=0.0, blur=1.0),
        TrainTransform(flip_p=0.0, resize_down_up=1.0),
    )
    strong = jitter.degrade(image, rng)
    strong = (blur if rng.random() < 0.5 else down_up).degrade(strong, rng)
    finish = TrainTransform(flip_p=0.5, input_size=SIZE)
    expected = [finish(strong, rng)]
    for _ in range(3):
        op = (jitter, blur, down_up)[int(rng.integers(3))]
        expected.append(finish(op.degrade(strong, rng), rng))
    assert views.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(views, torch.stack(expected), rtol=0, atol=0)
    assert not torch.equal(views[0], EvalTransform(SIZE)(image))  # augmented


def test_resume_after_an_interruption_writes_the_same_files(
    extracted, tiny_model, synth_train_dir, tmp_path, monkeypatch
):
    out = tmp_path / "feats"
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return embed_with_styles(*args, **kwargs)

    monkeypatch.setattr(extract_module, "embed_with_styles", interrupted)
    kwargs = dict(views=3, batch_size=16, seed=5, progress=False, model_options=OPTIONS)
    with pytest.raises(KeyboardInterrupt):
        extract_fusion_features(tiny_model, synth_train_dir, out, **kwargs)
    partial = tmp_path / "feats.partial"
    assert not out.exists()
    # the probe for the sizes, then one batch of 16 done
    assert json.loads((partial / "meta.json").read_text())["rows_done"] == 16
    with pytest.raises(DataFormatError, match="not finished"):
        FusionFeatures.open(out)
    monkeypatch.setattr(extract_module, "embed_with_styles", embed_with_styles)
    assert extract_fusion_features(tiny_model, synth_train_dir, out, **kwargs) == out
    assert not partial.exists()
    for name in ("features.npy", "styles.npy", "clean.npy", "labels.npy"):
        assert (out / name).read_bytes() == (extracted / name).read_bytes(), name
    # a finished directory of the same extraction is returned as it is
    before = (out / "meta.json").stat().st_mtime_ns
    assert extract_fusion_features(tiny_model, synth_train_dir, out, **kwargs) == out
    assert (out / "meta.json").stat().st_mtime_ns == before


def test_a_stale_directory_is_refused_naming_what_differs(
    extracted, tiny_model, synth_train_dir, tmp_path
):
    kwargs = dict(batch_size=16, seed=5, progress=False, model_options=OPTIONS)
    with pytest.raises(ValueError, match=r"other settings \(views: stored 3, now 4\)"):
        extract_fusion_features(tiny_model, synth_train_dir, extracted, views=4, **kwargs)
    other = tmp_path / "other.pth"
    state = torch.load(tiny_model, weights_only=True)
    state["fc.weight"] = state["fc.weight"] + 1
    torch.save(state, other)
    with pytest.raises(
        ValueError, match=r"holds features made with other settings \(model: stored"
    ):
        extract_fusion_features(other, synth_train_dir, extracted, views=3, **kwargs)
    with pytest.raises(
        ValueError, match=r"other settings \(blocks: stored .*; seed: stored 5, now 6\)"
    ):
        extract_fusion_features(
            tiny_model, synth_train_dir, extracted, views=3, **{**kwargs, "seed": 6},
            blocks=("layer3",),
        )  # fmt: skip
    # an unfinished directory of other features is refused too
    partial = tmp_path / "f.partial"
    shutil.copytree(extracted, partial)
    with pytest.raises(
        ValueError,
        match=r"f\.partial holds features made with other settings \(views: stored 3, now 2\)",
    ):
        extract_fusion_features(tiny_model, synth_train_dir, tmp_path / "f", views=2, **kwargs)
    # a directory that is not ours is not written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a fusion-feature directory"):
        extract_fusion_features(tiny_model, synth_train_dir, tmp_path / "mine", views=3, **kwargs)


def test_bad_input_is_named(extracted, tiny_model, synth_train_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model\.onnx is an ONNX model"):
        extract_fusion_features(tmp_path / "model.onnx", synth_train_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="views must be >= 1"):
        extract_fusion_features(tiny_model, synth_train_dir, tmp_path / "o", views=0)
    with pytest.raises(ValueError, match="blocks: unknown block name 'stage9'"):
        extract_fusion_features(
            tiny_model, synth_train_dir, tmp_path / "o", blocks=("stage9",), model_options=OPTIONS
        )
    bad = tmp_path / "bad"
    shutil.copytree(extracted, bad)
    np.save(bad / "features.npy", np.zeros((64, 3, 32), dtype=np.float16))
    with pytest.raises(DataFormatError, match=r"bad/features\.npy: expected float16 \(64, 3, 64\)"):
        FusionFeatures.open(bad)
    meta = json.loads((extracted / "meta.json").read_text())
    del meta["style_channels"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"meta\.json: missing keys \['style_channels'\]"):
        FusionFeatures.open(bad)
    with pytest.raises(FileNotFoundError, match="no such fusion-feature directory"):
        FusionFeatures.open(tmp_path / "nothing")
