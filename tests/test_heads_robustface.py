"""RobustFace (published rule) and robustface_stable against their formulas written out in numpy
(float64), the official pair count, shards, state and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heads_reference import arc_target, random_batch, run_sharded, train_loss_falls
from robustface.heads import HEADS, build_head
from robustface.heads.robustface import RobustFaceHead, RobustFaceStableHead


class RobustRef:
    """RobustFace written out in numpy, one pair at a time (official update order)."""

    def __init__(self, s=64.0, m=0.5, m1=-0.15, t=0.2, gamma=2.0, mu=0.0, momentum=0.01):
        self.s, self.m, self.m1, self.t, self.gamma = s, m, m1, t, gamma
        self.mu, self.momentum, self.phi = mu, momentum, 0.0

    def noise(self, c):
        theta = math.acos(min(max(c, -1 + 1e-6), 1 - 1e-6))
        if self.m1 >= 0:
            return arc_target(c, self.m1)
        return math.cos(max(theta + self.m1, 0.0))

    def step(self, cos, labels, train=True):
        cos = np.asarray(cos, dtype=np.float64)
        labels = np.asarray(labels)
        if train:
            self.m1 = (1 - self.phi / (1 - self.mu)) * self.m1
        out = cos.copy()
        easy = pairs = 0
        hard_only = np.zeros_like(cos, dtype=bool)
        noisy = np.zeros_like(cos, dtype=bool)
        for i, y in enumerate(labels):
            tgt, nb = arc_target(cos[i, y], self.m), self.noise(cos[i, y])
            for j in range(cos.shape[1]):
                pairs += 1  # official: num_classes * batch pairs, the target column among them
                hard = cos[i, j] > tgt
                easy += not hard
                if j == y:
                    continue
                noisy[i, j] = cos[i, j] > nb
                hard_only[i, j] = hard and not noisy[i, j]
        if train:
            self.phi = self.momentum * easy / pairs + (1 - self.momentum) * self.phi
        factor = (1 - self.phi / (1 - self.mu)) ** self.gamma
        for i, y in enumerate(labels):
            for j in range(cos.shape[1]):
                if j == y:
                    out[i, j] = arc_target(cos[i, y], self.m)
                elif noisy[i, j]:
                    out[i, j] = max(factor * cos[i, j], 1e-30)
                elif hard_only[i, j]:
                    out[i, j] = (1 + self.t) * cos[i, j]
        return self.s * out


def official_easy_fraction(cos, labels, m=0.5):
    """The official ``losses.py`` count: ``mask_hard = logits > target`` over every column,
    ``easy_num = num_class * batch - mask_hard.sum()``, fraction ``easy_num / num_all``."""
    target = []
    for c in cos[np.arange(len(labels)), labels]:
        sin = math.sqrt(1.0 - c * c)
        target.append(c * math.cos(m) - sin * math.sin(m))  # ArcFace, rows above cos(pi - m)
    hard = cos > np.array(target)[:, None]
    return (cos.size - hard.sum()) / cos.size


@pytest.mark.parametrize("m", [0.5, 0.0])
def test_robustface_phi_counts_pairs_as_the_official_code(m):
    cos, labels = random_batch(11, rows=30, cols=6)
    cos[cos < -0.85] = -0.85  # keep targets above cos(pi - m): no ArcFace fallback
    head = RobustFaceHead(margin=m, momentum=1.0)  # phi = this batch's easy fraction
    head(cos, labels)
    want = official_easy_fraction(cos.numpy(), labels.numpy(), m)
    assert float(head.phi) == pytest.approx(want, abs=1e-15)


def test_robustface_registered_with_defaults():
    head = build_head("robustface")
    assert isinstance(head, RobustFaceHead) and HEADS.get("robustface") is RobustFaceHead
    assert (head.scale, head.margin, head.t, head.gamma) == (64.0, 0.5, 0.2, 2.0)
    assert float(head.m1) == pytest.approx(-0.15) and float(head.phi) == 0.0


@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_robustface_matches_reference_over_steps(mu):
    head = RobustFaceHead(noise_rate=mu, momentum=0.3).train()  # large momentum: visible phi
    ref = RobustRef(mu=mu, momentum=0.3)
    for seed in range(3):
        cos, labels = random_batch(seed)
        got = head(cos, labels).logits.numpy()
        want = ref.step(cos.numpy(), labels.numpy())
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        assert float(head.phi) == pytest.approx(ref.phi, abs=1e-12)
        assert float(head.m1) == pytest.approx(ref.m1, abs=1e-12)
    assert 0 < float(head.phi) < 1 and float(head.m1) != pytest.approx(-0.15)
    # all three kinds of pair occurred in the last batch
    assert head.last_easy > 0 and head.last_hard > 0 and head.last_noise > 0


@pytest.mark.parametrize(("t", "m1"), [(0.0, 0.0), (0.2, -0.1)])
def test_robustface_stable_is_the_published_rule_at_phi_one(t, m1):
    head = build_head("robustface_stable", t=t, m1=m1)
    assert isinstance(head, RobustFaceStableHead) and not list(head.buffers())
    ref = RobustRef(t=t, m1=m1)
    ref.phi = 1.0  # noise factor (1 - phi)^gamma = 0: noise negatives at the 1e-30 floor
    for seed in range(3):
        cos, labels = random_batch(seed)
        got = head(cos, labels).logits.numpy()
        np.testing.assert_allclose(got, ref.step(cos.numpy(), labels.numpy(), train=False),
                                   rtol=1e-10, atol=1e-10)  # fmt: skip
    assert head.last_noise > 0


def test_robustface_stable_shard_consistency_and_gradcheck():
    cos, labels = random_batch(7, rows=20, cols=9)
    single = build_head("robustface_stable", t=0.2)
    want = single(cos, labels).logits
    _, results = run_sharded(lambda r: build_head("robustface_stable", t=0.2), cos, labels, 1)
    joined = torch.cat([results[0][0].logits, results[1][0].logits], dim=1)
    torch.testing.assert_close(joined, want, rtol=1e-12, atol=1e-12)
    head = build_head("robustface_stable", scale=2.0, t=0.2, m1=-0.1)
    cos, labels = random_batch(3, rows=6, cols=5)
    cos = cos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: head(c, labels).logits, (cos,), eps=1e-7, atol=1e-6)


def test_robustface_stable_trains_and_checks_parameters():
    losses = train_loss_falls(build_head("robustface_stable", scale=16.0))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match=r"t \(hard-negative boost\)"):
        build_head("robustface_stable", t=-1.0)


def test_robustface_eval_does_not_update_and_uses_state():
    head = RobustFaceHead(momentum=0.3)
    cos, labels = random_batch(5)
    head(cos, labels)
    head.eval()
    phi, m1 = float(head.phi), float(head.m1)
    ref = RobustRef(momentum=0.3)
    ref.phi, ref.m1 = phi, m1
    got = head(cos, labels).logits.numpy()
    np.testing.assert_allclose(got, ref.step(cos.numpy(), labels.numpy(), train=False), atol=1e-10)
    assert (float(head.phi), float(head.m1)) == (phi, m1)


def test_robustface_state_dict_round_trip():
    head = RobustFaceHead(momentum=0.2)
    for seed in range(3):
        head(*random_batch(seed))
    state = head.state_dict()
    assert set(state) == {"phi", "m1"}
    other = RobustFaceHead(momentum=0.2)
    other.load_state_dict(state)
    cos, labels = random_batch(9)
    torch.testing.assert_close(head(cos, labels).logits, other(cos, labels).logits)
    torch.testing.assert_close(head.phi, other.phi)
    torch.testing.assert_close(head.m1, other.m1)


def test_robustface_gradcheck():
    head = RobustFaceHead(scale=2.0).eval()
    head.phi.fill_(0.4)
    cos, labels = random_batch(3, rows=6, cols=5)
    cos = cos.clone().requires_grad_(True)

    def fn(c):
        return head(c, labels).logits

    assert torch.autograd.gradcheck(fn, (cos,), eps=1e-7, atol=1e-6)


def test_robustface_does_not_modify_input():
    cos, labels = random_batch(4)
    before = cos.clone()
    RobustFaceHead()(cos, labels)
    assert torch.equal(cos, before)


def test_robustface_shard_consistency():
    cos, labels = random_batch(7, rows=20, cols=9)
    single = RobustFaceHead(momentum=0.3)
    outs = [single(cos, labels).logits for _ in range(2)]
    heads, results = run_sharded(lambda r: RobustFaceHead(momentum=0.3), cos, labels, steps=2)
    for step in range(2):
        joined = torch.cat([results[0][step].logits, results[1][step].logits], dim=1)
        torch.testing.assert_close(joined, outs[step], rtol=1e-12, atol=1e-12)
    for h in heads:
        torch.testing.assert_close(h.phi, single.phi)
        torch.testing.assert_close(h.m1, single.m1)


def test_robustface_trains():
    losses = train_loss_falls(RobustFaceHead(scale=16.0))
    assert losses[-1] < 0.5 * losses[0]


def test_robustface_collapse_documented():
    """The published rule: with many classes phi -> ~1 and m1 -> ~0 within a few hundred steps."""
    torch.manual_seed(1)
    head = RobustFaceHead()
    for _ in range(400):
        # realistic: nearly every pair is easy
        cos = torch.empty(32, 1000, dtype=torch.float64).uniform_(-0.3, 0.1)
        labels = torch.randint(0, 1000, (32,))
        cos[torch.arange(32), labels] = 0.6
        head(cos, labels)
    assert float(head.phi) > 0.95
    assert abs(float(head.m1)) < 1e-3


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"scale": 0.0}, ValueError),
        ({"margin": -0.1}, ValueError),
        ({"m1": 4.0}, ValueError),
        ({"t": -1.0}, ValueError),
        ({"noise_rate": 1.0}, ValueError),
        ({"momentum": 0.0}, ValueError),
        ({"gamma": "2"}, TypeError),
    ],
)
def test_robustface_bad_parameters(kwargs, err):
    with pytest.raises(err, match=next(iter(kwargs)) if "scale" not in kwargs else "scale"):
        RobustFaceHead(**kwargs)


def test_robustface_bad_inputs():
    head = RobustFaceHead()
    with pytest.raises(ValueError, match="cosine"):
        head(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        head(torch.zeros(3, 4), torch.tensor([0, 1, 9]))
