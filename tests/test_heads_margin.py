"""Margin heads against their formulas written out in numpy (float64), plus the head contract."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from robustface.errors import ParameterTypeError
from robustface.fc import FullFC, SubCenterFC
from robustface.heads import (
    HEAD_CONTEXT,
    HEADS,
    LOCAL,
    CombinedMarginHead,
    HeadNeeds,
    HeadOutput,
    MarginHead,
    ShardContext,
    SoftmaxHead,
    build_head,
    combined_margin_target,
    head_needs,
    list_heads,
)
from robustface.heads.base import check_margin, check_scale


def reference_logits(cos, labels, scale, m1=1.0, m2=0.0, m3=0.0, easy_margin=False):
    """The combined margin, one target at a time, in plain numpy."""
    out = np.array(cos, dtype=np.float64, copy=True)
    theta_c = (math.pi - m2) / m1
    for i, y in enumerate(labels):
        if y < 0:
            continue
        c = out[i, y]
        theta = math.acos(c)
        if easy_margin and c <= 0:
            target = c
        elif theta <= theta_c:
            target = math.cos(m1 * theta + m2) - m3
        else:  # keep the margin's cosine cost at theta_c: continuous at theta_c
            target = c - (math.cos(theta_c) - math.cos(math.pi)) - m3
        out[i, y] = target
    return scale * out


def random_batch(seed, rows=64, cols=9, near_pi=16):
    """Cosines in (-1, 1), some targets near theta = pi, a quarter of the labels -1."""
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.999, 0.999, size=(rows, cols))
    labels = rng.integers(0, cols, size=rows)
    labels[rng.random(rows) < 0.25] = -1
    hit = np.nonzero(labels >= 0)[0][:near_pi]
    cos[hit, labels[hit]] = np.cos(rng.uniform(2.3, 3.1, size=hit.size))
    return torch.from_numpy(cos), torch.from_numpy(labels)


MARGINS = [
    pytest.param(1.0, 0.5, 0.0, False, id="arcface"),
    pytest.param(1.0, 0.0, 0.4, False, id="cosface"),
    pytest.param(1.35, 0.0, 0.0, False, id="sphereface"),
    pytest.param(1.0, 0.3, 0.2, False, id="cm1"),
    pytest.param(0.9, 0.4, 0.15, False, id="cm2-m1-below-1"),
    pytest.param(4.0, 0.0, 0.0, False, id="m1-4"),
    pytest.param(1.0, 0.5, 0.0, True, id="arcface-easy"),
    pytest.param(1.35, 0.2, 0.1, True, id="combined-easy"),
]


@pytest.mark.parametrize(("m1", "m2", "m3", "easy"), MARGINS)
def test_combined_head_matches_reference(m1, m2, m3, easy):
    cos, labels = random_batch(0)
    head = CombinedMarginHead(scale=30.0, m1=m1, m2=m2, m3=m3, easy_margin=easy)
    out = head(cos, labels)
    expected = reference_logits(cos.numpy(), labels.numpy(), 30.0, m1, m2, m3, easy)
    np.testing.assert_allclose(out.logits.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(out.labels, labels)
    assert out.extra_loss is None
    # the batch reaches the fallback region whenever the margin can pass pi
    rows = labels >= 0
    theta = torch.acos(cos[rows.nonzero().squeeze(1), labels[rows]])
    if (math.pi - m2) / m1 < 3.0:
        assert (theta > (math.pi - m2) / m1).any()


def test_fallback_is_continuous_and_decreasing():
    theta = torch.linspace(0.01, math.pi - 0.01, 20001, dtype=torch.float64)
    for m1, m2, m3 in [
        (1.0, 0.5, 0.0),
        (1.35, 0.0, 0.0),
        (1.0, 0.3, 0.2),
        (0.9, 0.4, 0.15),
        (4, 0, 0),
    ]:
        target = combined_margin_target(torch.cos(theta), m1, m2, m3)
        steps = target.diff()
        assert (steps < 0).all(), (m1, m2, m3)
        # continuity: no step bigger than the steepest slope allows (|d/dtheta| <= m1 + 1)
        assert steps.abs().max() <= (m1 + 1) * (theta[1] - theta[0]) * 1.01


def test_arcface_fallback_value_and_difference_from_insightface_constant():
    theta_c = math.pi - 0.5
    just_past = torch.tensor([math.cos(theta_c + 0.2)], dtype=torch.float64)
    target = combined_margin_target(just_past, 1.0, 0.5, 0.0)
    assert target.item() == pytest.approx(math.cos(theta_c + 0.2) - (1 - math.cos(0.5)))
    insightface = math.cos(theta_c + 0.2) - math.sin(math.pi - 0.5) * 0.5
    assert abs(target.item() - insightface) > 0.1  # theirs jumps at theta_c, ours does not


def test_softmax_head_is_scaled_cosine():
    cos, labels = random_batch(1)
    out = SoftmaxHead(scale=16.0)(cos, labels)
    np.testing.assert_allclose(out.logits.numpy(), 16.0 * cos.numpy(), rtol=1e-12)
    assert torch.equal(out.labels, labels)


def test_unit_margins_equal_softmax_head():
    cos, labels = random_batch(2)
    plain = CombinedMarginHead(scale=64.0, m1=1.0, m2=0.0, m3=0.0)(cos, labels).logits
    torch.testing.assert_close(plain, SoftmaxHead(64.0)(cos, labels).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "margins"),
    [("arcface", (1.0, 0.5, 0.0)), ("cosface", (1.0, 0.0, 0.4)), ("sphereface", (1.35, 0.0, 0.0))],
)
def test_presets_equal_combined_head(name, margins):
    cos, labels = random_batch(3)
    preset = build_head(name)
    m1, m2, m3 = margins
    combined = CombinedMarginHead(scale=64.0, m1=m1, m2=m2, m3=m3)
    torch.testing.assert_close(preset(cos, labels).logits, combined(cos, labels).logits)
    np.testing.assert_allclose(
        preset(cos, labels).logits.numpy(),
        reference_logits(cos.numpy(), labels.numpy(), 64.0, m1, m2, m3),
        rtol=1e-9,
        atol=1e-9,
    )


def test_m2_and_m3_both_take_effect():
    """arcface_torch's combined margin drops m2 whenever m3 > 0."""
    cos = torch.tensor([[0.6, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0])
    both = CombinedMarginHead(scale=1.0, m2=0.3, m3=0.2)(cos, labels).logits[0, 0].item()
    theta = math.acos(0.6)
    assert both == pytest.approx(math.cos(theta + 0.3) - 0.2)
    assert abs(both - (0.6 - 0.2)) > 0.1  # not CosFace alone
    assert abs(both - math.cos(theta + 0.3)) > 0.1  # not ArcFace alone


def test_label_minus_one_rows_get_no_margin_and_input_is_untouched():
    cos, labels = random_batch(4)
    labels[:10] = -1
    before = cos.clone()
    logits = build_head("arcface")(cos, labels).logits
    torch.testing.assert_close(logits[:10], 64.0 * cos[:10], rtol=0, atol=0)
    assert torch.equal(cos, before)


def _gradcheck_batch(m1, m2, seed):
    """Target cosines away from the kink at theta_c, from cos = 0 and from the clamp at +-1."""
    rng = np.random.default_rng(seed)
    theta_c = (math.pi - m2) / m1
    below = rng.uniform(0.05, theta_c - 0.05, size=40)
    below = below[np.abs(below - math.pi / 2) > 0.05][:8]
    theta = np.concatenate([below, rng.uniform(theta_c + 0.05, math.pi - 0.05, size=4)])
    cos = rng.uniform(-0.95, 0.95, size=(theta.size, 4))
    labels = rng.integers(0, 4, size=theta.size)
    cos[np.arange(theta.size), labels] = np.cos(theta)
    labels[0] = -1
    return torch.tensor(cos, requires_grad=True), torch.from_numpy(labels)


@pytest.mark.parametrize(("m1", "m2", "m3", "easy"), MARGINS)
def test_combined_head_equals_the_unfused_formula_in_values_and_gradients(m1, m2, m3, easy):
    """The one-buffer target path gives what index_put-then-scale gives, to the last bits."""
    cos, labels = random_batch(1)
    cos.requires_grad_()
    head = CombinedMarginHead(scale=30.0, m1=m1, m2=m2, m3=m3, easy_margin=easy)
    upstream = torch.randn(
        cos.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    logits = head(cos, labels).logits
    (grad,) = torch.autograd.grad(logits, cos, upstream, retain_graph=True)
    (grad_again,) = torch.autograd.grad(logits, cos, upstream)  # retained graph: same gradient
    plain_cos = cos.detach().clone().requires_grad_()
    rows = (labels >= 0).nonzero().squeeze(1)
    target = combined_margin_target(plain_cos[rows, labels[rows]], m1, m2, m3, easy_margin=easy)
    plain = torch.index_put(plain_cos, (rows, labels[rows]), target) * 30.0
    (plain_grad,) = torch.autograd.grad(plain, plain_cos, upstream)
    torch.testing.assert_close(logits, plain, rtol=1e-15, atol=1e-13)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-15, atol=1e-13)
    torch.testing.assert_close(grad_again, grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("m1", "m2", "m3", "easy"),
    [(1.0, 0.5, 0.0, False), (1.35, 0.3, 0.1, False), (1.0, 0.5, 0.0, True)],
)
def test_gradcheck_combined_head(m1, m2, m3, easy):
    cos, labels = _gradcheck_batch(m1, m2, seed=5)
    head = CombinedMarginHead(scale=2.0, m1=m1, m2=m2, m3=m3, easy_margin=easy)
    assert torch.autograd.gradcheck(lambda c: head(c, labels).logits, (cos,))


def test_gradient_carries_the_margin_derivative():
    """d logit / d cos_y = s * sin(theta + m) / sin(theta); arcface_torch's no_grad gives s."""
    scale, m = 64.0, 0.5
    head = build_head("arcface", scale=scale, margin=m)
    c0, h = 0.9, 1e-6
    labels = torch.tensor([0])

    def target_logit(c):
        return head(torch.tensor([[c, 0.0]], dtype=torch.float64), labels).logits[0, 0].item()

    finite_difference = (target_logit(c0 + h) - target_logit(c0 - h)) / (2 * h)
    cos = torch.tensor([[c0, 0.0]], dtype=torch.float64, requires_grad=True)
    head(cos, labels).logits[0, 0].backward()
    theta = math.acos(c0)
    analytic = scale * math.sin(theta + m) / math.sin(theta)
    assert cos.grad[0, 0].item() == pytest.approx(finite_difference, rel=1e-6)
    assert cos.grad[0, 0].item() == pytest.approx(analytic, rel=1e-9)
    assert abs(cos.grad[0, 0].item() - scale) > 0.2 * scale


def test_registry_lists_presets_and_rejects_unknown_names():
    assert {"arcface", "cosface", "sphereface", "softmax", "combined"} <= set(list_heads())
    assert list_heads("*face") == sorted(n for n in list_heads() if n.endswith("face"))
    with pytest.raises(KeyError, match="arcface"):
        build_head("arcfce")
    with pytest.raises(TypeError, match="margin"):
        build_head("arcface", m=0.5)
    head = build_head("combined", m1=1.35, m2=0.1, m3=0.05, scale=32)
    assert (head.scale, head.m1, head.m2, head.m3) == (32.0, 1.35, 0.1, 0.05)


# Heads that need constructor arguments or extra context beyond the common contract.
HEAD_NEEDS = {
    "centerbiasface": ({"num_classes": 5, "embedding_size": 8}, {"weight": torch.randn(5, 8)}),
}


@pytest.mark.parametrize("name", list_heads())
def test_every_registered_head_follows_the_contract(name):
    params, context = HEAD_NEEDS.get(name, ({}, {}))
    head = build_head(name, **params)
    assert isinstance(head, MarginHead)
    cos, labels = random_batch(6, rows=16, cols=5)
    cos = cos.float().requires_grad_()
    out = head(
        cos, labels, norms=torch.ones(16), embeddings=torch.randn(16, 8), step=0, epoch=0, **context
    )
    assert isinstance(out, HeadOutput)
    assert out.logits.shape == cos.shape and out.labels.shape == labels.shape
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(cos.grad).all()


def test_finite_gradient_at_cosine_one():
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    out = build_head("sphereface")(cos, torch.tensor([0, 0])).logits
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_input_validation():
    head = build_head("arcface")
    cos = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="one entry per cosine row"):
        head(cos, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\).*got 3"):
        head(cos, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="got -2"):
        head(cos, torch.tensor([0, 1, -2, -1]))
    with pytest.raises(TypeError, match="integer"):
        head(cos, torch.zeros(4))
    with pytest.raises(ValueError, match="B x C"):
        head(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        CombinedMarginHead(scale=0.0)
    with pytest.raises(ValueError, match="m1"):
        CombinedMarginHead(m1=0.0)
    with pytest.raises(ValueError, match=r"m2.*got 3\.2"):
        CombinedMarginHead(m2=3.2)
    with pytest.raises(ValueError, match="m2"):
        CombinedMarginHead(m2=-0.1)
    with pytest.raises(TypeError, match="m3"):
        CombinedMarginHead(m3="0.4")


def test_heads_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        HEADS.register("arcface")(SoftmaxHead)


def test_half_precision_cosines_keep_finite_gradients():
    for dtype in (torch.float16, torch.bfloat16):
        cos = torch.tensor([[1.0, 0.5], [-1.0, 0.2], [0.999, 0.0]], dtype=dtype, requires_grad=True)
        out = build_head("arcface")(cos, torch.tensor([0, 0, 0])).logits
        out.float().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all(), dtype


def test_local_shard_context():
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    reduced = LOCAL.all_reduce(value, "max")
    assert torch.equal(reduced, value.detach()) and reduced is not value
    assert not reduced.requires_grad
    with pytest.raises(ValueError, match="op must be one of"):
        LOCAL.all_reduce(value, "mean")
    assert torch.equal(LOCAL.column_classes(3), torch.tensor([0, 1, 2]))
    shard = ShardContext(rank=1, world_size=2, class_offset=6, num_classes=11)
    assert torch.equal(shard.column_classes(2), torch.tensor([6, 7]))
    sampled = ShardContext(class_offset=6, class_ids=torch.tensor([6, 9]))
    assert torch.equal(sampled.column_classes(2), torch.tensor([6, 9]))
    with pytest.raises(ValueError, match="num_columns"):
        sampled.column_classes(3)


def _built(name, num_classes=5, embedding_size=8):
    """``name`` built as the trainer builds it: the class layout only where the head declares it."""
    params = {}
    if head_needs(name).classes:
        params = {"num_classes": num_classes, "embedding_size": embedding_size}
    return build_head(name, **params)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_runs_on_the_context_it_declares(name):
    head = _built(name)
    assert set(head.needs.context) <= set(HEAD_CONTEXT)
    assert head_needs(name).classes == head.needs.classes
    torch.manual_seed(0)
    fc = FullFC(8, 5)
    out = fc(torch.randn(16, 8), torch.arange(16) % 5)
    twin = copy.deepcopy(head)  # stateful heads update their state on each call
    got = out.apply_head(head, step=0, epoch=0)
    want = twin(out.cosine, out.labels, norms=out.norms, embeddings=out.embeddings, step=0,
                epoch=0, weight=fc.weight, shard=out.shard)  # fmt: skip
    assert torch.equal(got.logits, want.logits) and torch.equal(got.labels, want.labels)


class _Recorder(MarginHead):
    needs = HeadNeeds(context=("weight", "epoch"))

    def forward(self, cosine, labels, *, shard=LOCAL, **context):
        self.seen = dict(context, shard=shard)
        return HeadOutput(logits=cosine, labels=labels)


def test_apply_head_passes_only_what_the_head_declares():
    fc = FullFC(4, 3)
    out = fc(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    head = _Recorder()
    out.apply_head(head, step=7, epoch=2)
    assert set(head.seen) == {"weight", "epoch", "shard"}
    assert head.seen["weight"] is fc.weight and head.seen["epoch"] == 2
    assert head.seen["shard"] is out.shard
    with pytest.raises(ValueError, match=r"needs \['epoch'\]"):
        out.apply_head(head, step=7)
    sub = SubCenterFC(4, 3, k=2)(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"needs \['weight'\]"):
        sub.apply_head(head, epoch=0)
    with pytest.raises(TypeError, match="progress"):
        out.apply_head(head, epoch=0, lr=0.1)
    with pytest.raises(ValueError, match=r"HeadNeeds\.context"):
        HeadNeeds(context=("weights",))


def _scraped(head):
    """The trainer's former log of a head: scalar buffers, then ``last_*`` numbers of vars()."""
    stats = {k: float(v) for k, v in head.named_buffers() if v.numel() == 1}
    for key, value in vars(head).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if key.startswith("last_") and isinstance(value, (int, float)):
            stats[key] = float(value)
    return stats


@pytest.mark.parametrize("name", list_heads())
def test_stats_are_the_scalar_state_and_last_step_counters(name):
    head = _built(name, num_classes=7)
    torch.manual_seed(1)
    out = FullFC(8, 7)(torch.randn(32, 8), torch.arange(32) % 7)
    assert head.stats() == _scraped(head)
    out.apply_head(head, step=0, epoch=50)
    stats = head.stats()
    assert stats == _scraped(head) and list(stats) == list(_scraped(head))
    assert all(isinstance(v, float) for v in stats.values())
    expected = {
        "curricularface": {"t"},
        "adaface": {"batch_mean", "batch_std"},
        "boundaryface": {"last_corrected"},
        "centerbiasface": {"t"},
        "robustface": {"phi", "m1", "last_easy", "last_hard", "last_noise"},
        "robustface_stable": {"last_noise"},
    }
    assert set(stats) == expected.get(name, set())


def test_head_guards_name_parameter_expectation_and_value():
    assert check_margin("m", 0.0) == 0.0 and check_scale(np.float32(2)) == 2.0
    with pytest.raises(ValueError, match=r"^m2 \(additive angular margin\) must be in \[0, pi\) "):
        CombinedMarginHead(m2=3.2)
    with pytest.raises(ParameterTypeError, match=r"^m1 \(angle factor\) must be a number, got str"):
        CombinedMarginHead(m1="1")
    with pytest.raises(ValueError, match=r"^m1 \(angle factor\) must be > 0, got 0\.0$"):
        CombinedMarginHead(m1=0)
    with pytest.raises(ValueError, match=r"^scale must be finite, got inf$"):
        check_scale(math.inf)
    with pytest.raises(ValueError, match=r"^scale must be > 0\.0, got -1\.0$"):
        check_scale(-1)
