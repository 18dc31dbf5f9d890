"""Train/eval transforms: normalisation, flip, augmentations, parameter checks, seeding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from robustface.data.transforms import (
    EvalTransform,
    TrainTransform,
    _color_jitter,
    _flipped_planes_torch,
    normalize_images,
    to_tensor_normalized,
)
from robustface.errors import ParameterTypeError


def random_image(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference(image: np.ndarray) -> np.ndarray:
    """The normalisation written out: channels first, (x / 255 - 0.5) / 0.5, in float64."""
    return (image.astype(np.float64).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def test_to_tensor_normalized_matches_formula():
    image = random_image()
    out = to_tensor_normalized(image)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (3, 12, 10) and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), reference(image), rtol=0, atol=1e-6)
    assert out[:, 0, 0].tolist() == pytest.approx(reference(image)[:, 0, 0].tolist(), abs=1e-6)
    extremes = to_tensor_normalized(np.array([[[0, 255, 128]]], dtype=np.uint8)).flatten()
    np.testing.assert_allclose(extremes.numpy(), [-1.0, 1.0, 1 / 255], atol=1e-6)


def test_to_tensor_normalized_batch_and_strided_input():
    batch = np.stack([random_image(seed=s) for s in range(4)])
    out = to_tensor_normalized(batch)
    assert out.shape == (4, 3, 12, 10)
    np.testing.assert_allclose(out.numpy(), np.stack([reference(b) for b in batch]), atol=1e-6)
    view = batch[0][:, ::-1]  # non-contiguous input
    np.testing.assert_allclose(to_tensor_normalized(view).numpy(), reference(view), atol=1e-6)


def test_to_tensor_normalized_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_normalized(random_image().astype(np.float32))
    with pytest.raises(ValueError, match="3 RGB channels"):
        to_tensor_normalized(np.zeros((4, 4, 4), np.uint8))


def test_eval_transform_is_the_formula_and_resizes():
    image = random_image(112, 112)
    np.testing.assert_allclose(EvalTransform()(image).numpy(), reference(image), atol=1e-6)
    assert EvalTransform(input_size=56)(image).shape == (3, 56, 56)


def test_flip_always_and_never():
    image = random_image()
    flipped = TrainTransform(flip_p=1.0, seed=0)(image)
    np.testing.assert_allclose(flipped.numpy(), reference(image[:, ::-1]), atol=1e-6)
    kept = TrainTransform(flip_p=0.0, seed=0)(image)
    np.testing.assert_allclose(kept.numpy(), reference(image), atol=1e-6)


def test_default_flips_about_half_and_changes_nothing_else():
    image = random_image()
    transform = TrainTransform(seed=1)
    plain, mirrored = reference(image), reference(image[:, ::-1])
    flips = 0
    for _ in range(400):
        out = transform(image).numpy()
        is_flip = np.allclose(out, mirrored, atol=1e-6)
        assert is_flip or np.allclose(out, plain, atol=1e-6)
        flips += is_flip
    assert 150 < flips < 250


def test_same_seed_same_augmentations():
    image = random_image(32, 32)
    kwargs = dict(resize_down_up=0.5, blur=0.5, color_jitter=0.5, grayscale=0.5)
    a, b = TrainTransform(seed=7, **kwargs), TrainTransform(seed=7, **kwargs)
    c = TrainTransform(seed=8, **kwargs)
    outs_a = [a(image) for _ in range(20)]
    outs_b = [b(image) for _ in range(20)]
    outs_c = [c(image) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c, strict=True))


@pytest.mark.parametrize("name", ["resize_down_up", "blur", "color_jitter", "grayscale"])
def test_each_augmentation_changes_the_image_in_range(name):
    image = random_image(32, 32)
    out = TrainTransform(flip_p=0.0, seed=3, **{name: 1.0})(image)
    assert out.shape == (3, 32, 32)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert not np.allclose(out.numpy(), reference(image), atol=1e-6)
    if name == "grayscale":
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_input_size_resizes_only_when_needed():
    image = random_image(64, 64)
    assert TrainTransform(input_size=56, seed=0)(image).shape == (3, 56, 56)
    same = TrainTransform(flip_p=0.0, input_size=64)(image)
    np.testing.assert_allclose(same.numpy(), reference(image), atol=1e-6)


def test_color_jitter_factors():
    image = random_image(8, 8)
    np.testing.assert_array_equal(_color_jitter(image, np.array([1.0, 1.0, 1.0])), image)
    brighter = _color_jitter(image, np.array([1.3, 1.0, 1.0]))
    np.testing.assert_array_equal(brighter, np.clip(np.rint(image * np.float32(1.3)), 0, 255))
    gray = _color_jitter(image, np.array([1.0, 1.0, 0.0])).astype(np.int16)
    luma = np.rint(image @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(gray - luma[..., None]).max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"flip_p": 1.5}, ValueError, r"flip_p must be in \[0, 1\], got 1.5"),
        ({"blur": -0.1}, ValueError, r"blur must be in \[0, 1\], got -0.1"),
        ({"color_jitter": "high"}, ParameterTypeError, "color_jitter .* got str 'high'"),
        ({"grayscale": 2}, ValueError, "grayscale .* got 2"),
        ({"resize_down_up": True}, ParameterTypeError, "resize_down_up .* got bool True"),
        ({"input_size": 0}, ValueError, "input_size must be >= 1, got 0"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"seed": 1.0}, ParameterTypeError, r"seed must be an integer, got float 1\.0"),
    ],
)
def test_parameter_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        TrainTransform(**kwargs)


def test_eval_transform_validation():
    with pytest.raises(ParameterTypeError, match=r"input_size must be an integer, got float 3.5"):
        EvalTransform(input_size=3.5)


def test_pickle_drops_generator():
    transform = TrainTransform(seed=5)
    transform(random_image())
    clone = pickle.loads(pickle.dumps(transform))
    assert clone._rng is None and clone.seed == 5 and clone.flip_p == 0.5


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, image: np.ndarray, transform: TrainTransform) -> None:
        self.image, self.transform = image, transform

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.image)


def _flip_pattern(seed: int) -> list[bool]:
    image = random_image()
    ds = _SameImage(image, TrainTransform())
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, num_workers=2, generator=torch.Generator().manual_seed(seed)
    )
    plain = torch.from_numpy(reference(image).astype(np.float32))
    return [not torch.allclose(x, plain, atol=1e-6) for batch in loader for x in batch]


def test_worker_seeding_is_reproducible():
    first, second, other = _flip_pattern(11), _flip_pattern(11), _flip_pattern(12)
    assert first == second
    assert first != other
    # Workers 0 and 1 serve alternate batches; their flip streams must differ.
    assert first[0:8] != first[8:16]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"resize_down_up": 0.5, "blur": 0.5, "color_jitter": 0.5, "grayscale": 0.5}],
)
def test_uint8_batches_normalised_on_the_device_equal_the_float_transform(kwargs):
    # what the trainer does (workers send uint8, normalize_images on the device) against
    # TrainTransform's float output, sample by sample with the trainer's per-sample generators
    images = [random_image(40, 40) for _ in range(6)]
    floats = TrainTransform(input_size=32, **kwargs)
    uint8 = TrainTransform(input_size=32, normalize=False, **kwargs)
    for epoch in range(3):
        want = torch.stack(
            [floats(x, rng=np.random.default_rng([9, epoch, i])) for i, x in enumerate(images)]
        )
        sent = torch.stack(
            [uint8(x, rng=np.random.default_rng([9, epoch, i])) for i, x in enumerate(images)]
        )
        assert sent.dtype == torch.uint8 and sent.shape == (6, 3, 32, 32)
        got = normalize_images(sent)
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="expected uint8 images"):
        normalize_images(want)


def test_channels_last_batches_with_their_flips_normalise_as_the_flipped_images():
    # the trainer's loader sends NxHxWx3 images and the flips still to do; the device result
    # must equal the per-image float path on the flipped images (numpy's flip, not torch's)
    raw = [random_image(6, 5, seed=s) for s in range(4)]
    flips = [True, False, True, False]
    want = torch.stack(
        [to_tensor_normalized(np.ascontiguousarray(im[:, ::-1]) if f else im)
         for im, f in zip(raw, flips, strict=True)]
    )  # fmt: skip
    images = torch.from_numpy(np.stack(raw))
    got = normalize_images(images, torch.tensor(flips), channels_last=True)
    assert got.shape == (4, 3, 6, 5) and got.is_contiguous() and torch.equal(got, want)
    assert torch.equal(normalize_images(images, channels_last=True)[1], want[1])  # no flips
    planes = images.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(normalize_images(planes, torch.tensor(flips)), want)  # 3xHxW input too
    # the torch ops a GPU runs (the CPU takes OpenCV's path) give the same planes
    on_device = _flipped_planes_torch(images, torch.tensor(flips), channels_last=True)
    assert on_device.is_contiguous() and torch.equal(normalize_images(on_device), want)
    with pytest.raises(ValueError, match="flip must be a bool tensor of 4"):
        normalize_images(images, torch.tensor([1, 0, 1, 0]), channels_last=True)
    with pytest.raises(ValueError, match="flip must be a bool tensor of 4"):
        normalize_images(images, torch.tensor(flips[:3]), channels_last=True)
    with pytest.raises(ValueError, match="NxHxWx3"):
        normalize_images(planes, channels_last=True)


@pytest.mark.parametrize("count", [1, 3])
def test_strided_channels_last_views_normalise_as_their_copies(count):
    # OpenCV's CPU path reads numpy views of the tensor image by image: a channels-last view of
    # planes, a crop in width, every other image of a batch give what their contiguous copies give
    batch = torch.from_numpy(np.stack([random_image(6, 9, seed=s) for s in range(2 * count)]))
    flips = torch.tensor([True, False, True][:count])
    views = [batch[::2], batch[:count, :, 1:8], batch[:count].permute(0, 3, 1, 2).contiguous()]
    views[2] = views[2].permute(0, 2, 3, 1)
    for view in views:
        assert not view.is_contiguous() or count == 1  # one image: every other is contiguous
        want = normalize_images(view.contiguous(), flips, channels_last=True)
        assert torch.equal(normalize_images(view, flips, channels_last=True), want)
        torch_ops = _flipped_planes_torch(view, flips, channels_last=True)
        assert torch.equal(normalize_images(torch_ops), want)


def test_flips_need_a_batch_and_a_bool_tensor_and_images_a_uint8_tensor():
    # a flip per image of an N-image batch: a single 3xHxW image's "flips" would mirror its
    # channels one by one
    image = torch.from_numpy(random_image(4, 5)).permute(2, 0, 1).contiguous()
    with pytest.raises(ValueError, match=r"flip needs a batch of images \(Nx3xHxW"):
        normalize_images(image, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="flip needs a batch"):
        normalize_images(image[None, None], torch.tensor([True]))
    batch = image[None].expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="flip must be a bool tensor of 2, got list"):
        normalize_images(batch, [True, False])
    with pytest.raises(ValueError, match="expected uint8 images in a torch tensor, got ndarray"):
        normalize_images(batch.numpy())


def test_augment_unflipped_is_augment_before_its_flip():
    image = random_image(16, 16)
    transform = TrainTransform(flip_p=0.5, blur=0.5, color_jitter=0.5, input_size=12)
    seen = set()
    for i in range(12):
        before, flip = transform.augment_unflipped(image, rng=np.random.default_rng([4, i]))
        after = transform.augment(image, rng=np.random.default_rng([4, i]))
        assert np.array_equal(after, before[:, ::-1] if flip else before)
        seen.add(flip)
    assert seen == {True, False}
    assert TrainTransform(flip_p=0).augment_unflipped(image)[1] is False


def test_random_steps_name_the_steps_that_draw():
    # the trainer draws nothing for (), only the flip's uniform for ("flip",)
    assert TrainTransform().random_steps == ("flip",)
    assert TrainTransform(flip_p=0).random_steps == ()
    assert TrainTransform(flip_p=0, input_size=20).random_steps == ()
    steps = TrainTransform(flip_p=0.5, blur=0.3, grayscale=0.1).random_steps
    assert steps == ("blur", "grayscale", "flip")  # the order in which augment draws
    all_on = TrainTransform(resize_down_up=0.1, blur=0.1, color_jitter=0.1, grayscale=0.1)
    assert all_on.random_steps == ("resize_down_up", "blur", "color_jitter", "grayscale", "flip")
