"""Robust margin heads against their formulas written out in numpy (float64), shards, training."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from robustface.fc import FullFC
from robustface.fc.loss import distributed_cross_entropy
from robustface.heads import HEADS, ShardContext, build_head
from robustface.heads.boundaryface import BoundaryFaceHead
from robustface.heads.centerbias import CenterBiasFaceHead, ema_rows
from robustface.heads.robustface import RobustFaceHead, RobustFaceStableHead

# ----------------------------------------------------------------------------- helpers


def arc_target(c: float, m: float) -> float:
    """cos(theta + m) with the continuous fallback beyond theta_c = pi - m."""
    theta = math.acos(min(max(c, -1 + 1e-6), 1 - 1e-6))
    if theta <= math.pi - m:
        return math.cos(theta + m)
    return c - (1.0 + math.cos(math.pi - m))


def random_batch(seed, rows=24, cols=7, drop=0.0):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.95, 0.95, size=(rows, cols))
    labels = rng.integers(0, cols, size=rows)
    labels[rng.random(rows) < drop] = -1
    # some targets close to their label so that easy, hard and noise pairs all occur
    near = rng.random(rows) < 0.5
    cos[near, labels[near]] = rng.uniform(0.3, 0.9, size=int(near.sum()))
    return torch.from_numpy(cos), torch.from_numpy(labels)


class _Hub:
    """Lets two threads (one per fake rank) all-reduce real tensors with each other."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=20)

    def reduce(self, rank: int, tensor: Tensor, op: str) -> Tensor:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        stacked = torch.stack([s for s in self.slots if s is not None])
        out = stacked.sum(0) if op == "sum" else stacked.max(0).values
        self.barrier.wait()
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class ThreadShard(ShardContext):
    """A ShardContext whose all_reduce combines the threads' local values through a hub."""

    hub: Any = None

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        assert op in ("sum", "max")
        return self.hub.reduce(self.rank, tensor, op)


def run_sharded(make_head, cosine, labels, steps=2, split=4, context=None, per_shard=None):
    """Run ``steps`` forwards on two column shards in two threads; returns heads and outputs."""
    num = cosine.size(1)
    hub = _Hub(2)
    bounds = [(0, split), (split, num)]
    heads = [make_head(r) for r in range(2)]
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(rank):
        try:
            lo, hi = bounds[rank]
            shard = ThreadShard(rank=rank, world_size=2, class_offset=lo, num_classes=num, hub=hub)
            local = torch.where((labels >= lo) & (labels < hi), labels - lo, -1)
            outs = []
            for _ in range(steps):
                extra = per_shard(rank, lo, hi) if per_shard else {}
                outs.append(
                    heads[rank](cosine[:, lo:hi], local, shard=shard, **(context or {}), **extra)
                )
            results[rank] = outs
        except BaseException as err:  # pragma: no cover - surfaced below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return heads, results


def train_loss_falls(head, steps=30, **context):
    torch.manual_seed(0)
    emb = torch.randn(32, 16) + 2.0 * torch.randn(8, 16).repeat_interleave(4, 0)
    labels = torch.arange(8).repeat_interleave(4)
    fc = FullFC(16, 8)
    opt = torch.optim.SGD(list(fc.parameters()) + list(head.parameters()), lr=1.0)
    losses = []
    for _ in range(steps):
        out = fc(emb, labels)
        kw = dict(context)
        if "weight" in kw:
            kw["weight"] = fc.weight
        hout = head(out.cosine, out.labels, norms=out.norms, embeddings=out.embeddings, **kw)
        loss = distributed_cross_entropy(hout.logits, hout.labels, out.shard)
        if hout.extra_loss is not None:
            loss = loss + hout.extra_loss
        loss = loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------- RobustFace


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


# ----------------------------------------------------------------------------- BoundaryFace


def boundary_reference(cos, labels, s=32.0, m=0.5, lam=math.pi, corrected=True):
    """BoundaryFace in numpy: corrected labels, ArcFace logits for them, boundary term."""
    cos = np.asarray(cos, dtype=np.float64)
    out, new, extra = cos.copy(), np.array(labels).copy(), np.zeros(len(labels))
    for i, y in enumerate(labels):
        if corrected:
            cand = [(cos[i, j], -j) for j in range(cos.shape[1]) if j != y]
            _, neg_j = max(cand)
            j_star = -neg_j
            if arc_target(cos[i, j_star], m) > cos[i, y]:
                new[i] = j_star
            yy = new[i]
            rest = max(cos[i, j] for j in range(cos.shape[1]) if j != yy)
            extra[i] = lam * max(0.0, rest - arc_target(cos[i, yy], m))
        out[i, new[i]] = arc_target(cos[i, new[i]], m)
    return s * out, new, extra


def official_phi(c: Tensor, m: float) -> Tensor:
    """The official ``phi``: ArcFace's ``cos(theta + m)`` with its ``cos - m sin(m)`` fallback."""
    phi = c * math.cos(m) - torch.sqrt(1.0 - c * c) * math.sin(m)
    return torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)


def boundary_official(cos, labels, m=0.5, lam=math.pi):
    """The official ``head/boundaryMargin.py`` after ``epoch_start``, one row at a time, in torch
    (for its gradient): each row is masked with its one-hot label, so the masked columns' zeros
    take part in both maxima. Returns the corrected labels and the per-row boundary term."""
    new, extra = labels.clone(), []
    for i in range(cos.size(0)):
        one_hot = torch.zeros(cos.size(1), dtype=cos.dtype)
        one_hot[labels[i]] = 1.0
        right2 = one_hot * cos[i].detach()
        left2 = (1.0 - one_hot) * official_phi(cos[i].detach(), m)
        if left2.max() - right2.max() > 0:
            new[i] = int(left2.argmax())  # torch.max: the first maximal column
            one_hot = torch.zeros(cos.size(1), dtype=cos.dtype)
            one_hot[new[i]] = 1.0
        right = one_hot * official_phi(cos[i], m)
        left = (1.0 - one_hot) * cos[i]
        extra.append(lam * torch.relu(left.max() - right.max()))
    return new, torch.stack(extra)


def hard_batch():
    """Rows where the two formulas part: every label 0, phi = cos(theta + 0.5)."""
    cos = torch.tensor(
        [
            [-0.60, 0.10, -0.20, -0.40, -0.30, -0.50],  # phi(0.10) = -0.39 > -0.60: paper relabels
            [-0.20, 0.05, -0.10, 0.02, -0.30, -0.40],  # phi_y < 0 < max negative
            [-0.50, -0.30, -0.40, -0.45, -0.60, -0.70],  # every cosine < 0
            [-0.90, -0.10, 0.30, -0.20, -0.50, 0.00],  # target beyond pi - m: paper relabels
            [0.40, 0.20, -0.10, 0.35, 0.10, -0.20],  # phi_y < 0 < max negative
            [0.10, 0.85, 0.20, -0.10, 0.00, 0.30],  # phi(0.85) = 0.49: both relabel to 1
            [0.80, 0.50, 0.10, -0.20, 0.30, -0.40],  # phi_y = 0.41 > 0: the same term
            [0.05, -0.20, 0.60, 0.10, -0.30, 0.20],  # phi(0.60) = 0.14 > 0.05: both relabel
        ],
        dtype=torch.float64,
    )
    return cos, torch.zeros(8, dtype=torch.long)


def boundary_batch(seed, rows=20, cols=9):
    cos, labels = random_batch(seed, rows=rows, cols=cols)
    idx = torch.arange(0, rows, 3)  # every third row: a negative far above the target
    cos[idx, labels[idx]] = 0.1
    cos[idx, (labels[idx] + 1) % cols] = 0.9
    return cos, labels


def test_boundaryface_registered_and_plain_arcface_before_start():
    head = build_head("boundaryface")
    assert isinstance(head, BoundaryFaceHead)
    assert (head.scale, head.margin, head.epoch_start, head.lam) == (32.0, 0.5, 10, math.pi)
    assert (
        head.formula == "official"
        and build_head("boundaryface", formula="paper").formula == "paper"
    )
    cos, labels = boundary_batch(0)
    out = head(cos, labels, epoch=9)
    want, _, _ = boundary_reference(cos.numpy(), labels.numpy(), corrected=False)
    np.testing.assert_allclose(out.logits.numpy(), want, atol=1e-10)
    assert torch.equal(out.labels, labels) and out.extra_loss is None
    assert head.last_corrected == 0


@pytest.mark.parametrize("batch", ["random0", "random1", "spread", "hard"])
def test_boundaryface_default_is_the_official_code(batch):
    if batch == "hard":
        cos, labels = hard_batch()
    elif batch == "spread":  # cosines over [-0.95, 0.95], no target pulled near its class
        cos = torch.from_numpy(np.random.default_rng(5).uniform(-0.95, 0.95, (30, 7)))
        labels = torch.from_numpy(np.random.default_rng(6).integers(0, 7, 30))
    else:
        cos, labels = boundary_batch(int(batch[-1]))
    head = BoundaryFaceHead()
    leaf = cos.clone().requires_grad_(True)
    out = head(leaf, labels, epoch=10)
    ref = cos.clone().requires_grad_(True)
    new, extra = boundary_official(ref, labels)
    np.testing.assert_array_equal(out.labels.numpy(), new.numpy())
    torch.testing.assert_close(out.extra_loss, extra, rtol=0, atol=1e-12)
    logits, _, _ = boundary_reference(cos.numpy(), new.numpy(), corrected=False)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, atol=1e-10)
    assert head.last_corrected == int((new != labels).sum())
    out.extra_loss.sum().backward()
    extra.sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=0, atol=1e-12)
    assert (extra > 0).any()


def test_boundaryface_official_and_paper_part_on_a_hard_batch():
    cos, labels = hard_batch()
    official = BoundaryFaceHead()(cos, labels, epoch=10)
    paper = BoundaryFaceHead(formula="paper")(cos, labels, epoch=10)
    assert official.labels.tolist() == [0, 0, 0, 0, 0, 1, 0, 2]
    assert paper.labels.tolist() == [1, 0, 0, 2, 0, 1, 0, 2]
    logits, new, want = boundary_reference(cos.numpy(), labels.numpy())
    np.testing.assert_array_equal(paper.labels.numpy(), new)
    np.testing.assert_allclose(paper.logits.numpy(), logits, atol=1e-10)
    np.testing.assert_allclose(paper.extra_loss.numpy(), want, atol=1e-12)
    # mean boundary term (lam = pi): 0.370 official against 0.869 paper on this batch
    assert float(official.extra_loss.mean()) == pytest.approx(0.3702, abs=1e-4)
    assert float(paper.extra_loss.mean()) == pytest.approx(0.8692, abs=1e-4)


def test_boundaryface_paper_formula_matches_reference_after_start():
    head = BoundaryFaceHead(formula="paper")
    for seed in range(2):
        cos, labels = boundary_batch(seed)
        out = head(cos, labels, epoch=10)
        logits, new, extra = boundary_reference(cos.numpy(), labels.numpy())
        np.testing.assert_allclose(out.logits.numpy(), logits, atol=1e-10)
        np.testing.assert_array_equal(out.labels.numpy(), new)
        np.testing.assert_allclose(out.extra_loss.numpy(), extra, atol=1e-10)
        assert head.last_corrected == int((new != labels.numpy()).sum()) >= 7
        assert (extra > 0).any()


@pytest.mark.parametrize("formula", ["official", "paper"])
def test_boundaryface_gradcheck(formula):
    head = BoundaryFaceHead(scale=2.0, formula=formula)
    cos, labels = boundary_batch(1, rows=6, cols=5)
    cos = cos.clone().requires_grad_(True)

    def fn(c):
        out = head(c, labels, epoch=10)
        return out.logits, out.extra_loss

    assert torch.autograd.gradcheck(fn, (cos,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("formula", ["official", "paper"])
@pytest.mark.parametrize("batch", ["random", "hard"])
def test_boundaryface_shard_consistency_values_and_gradients(formula, batch):
    cos, labels = boundary_batch(3, rows=21, cols=9) if batch == "random" else hard_batch()
    single = BoundaryFaceHead(formula=formula)
    leaf = cos.clone().requires_grad_(True)
    ref = single(leaf, labels, epoch=11)
    (ref.logits.sum() * 0.1 + ref.extra_loss.sum()).backward()
    sharded = cos.clone().requires_grad_(True)
    heads, results = run_sharded(
        lambda r: BoundaryFaceHead(formula=formula), sharded, labels, steps=1, context={"epoch": 11}
    )
    r0, r1 = results[0][0], results[1][0]
    torch.testing.assert_close(torch.cat([r0.logits, r1.logits], 1), ref.logits)
    joined = torch.where(r0.labels >= 0, r0.labels, torch.where(r1.labels >= 0, r1.labels + 4, -1))
    assert torch.equal(joined, ref.labels)
    assert torch.equal(
        (r0.labels >= 0) ^ (r1.labels >= 0), torch.ones(len(labels), dtype=torch.bool)
    )
    torch.testing.assert_close(r0.extra_loss, ref.extra_loss)
    torch.testing.assert_close(r1.extra_loss, ref.extra_loss)
    assert heads[0].last_corrected == heads[1].last_corrected == single.last_corrected > 0
    # every rank backpropagates the same reduced loss; together they give the full gradient
    for r in (r0, r1):
        (r.logits.sum() * 0.1 + r.extra_loss.sum()).backward()
    torch.testing.assert_close(sharded.grad, leaf.grad)


def test_boundaryface_tie_goes_to_lowest_global_class_on_shards():
    cos = torch.full((1, 6), -0.5, dtype=torch.float64)
    labels = torch.tensor([0])
    cos[0, 0] = 0.0
    cos[0, 2] = cos[0, 4] = 0.9  # equal maxima on both shards: class 2 (rank 0) wins
    _, results = run_sharded(
        lambda r: BoundaryFaceHead(), cos, labels, steps=1, split=3, context={"epoch": 20}
    )
    assert results[0][0].labels.tolist() == [2] and results[1][0].labels.tolist() == [-1]


def test_boundaryface_trains():
    losses = train_loss_falls(BoundaryFaceHead(scale=16.0, epoch_start=0), epoch=0)
    assert losses[-1] < 0.5 * losses[0]


def test_boundaryface_bad_inputs():
    head = BoundaryFaceHead()
    cos, labels = boundary_batch(0)
    with pytest.raises(ValueError, match="epoch"):
        head(cos, labels)
    with pytest.raises(ValueError, match="epoch"):
        head(cos, labels, epoch=-1)
    with pytest.raises(ValueError, match="margin"):
        BoundaryFaceHead(margin=4.0)
    with pytest.raises(ValueError, match="lam"):
        BoundaryFaceHead(lam=-1.0)
    with pytest.raises(ValueError, match="epoch_start"):
        BoundaryFaceHead(epoch_start=-2)
    with pytest.raises(ValueError, match="formula must be one of"):
        BoundaryFaceHead(formula="Official")
    before = cos.clone()
    head(cos, labels, epoch=12)
    assert torch.equal(cos, before)


# ----------------------------------------------------------------------------- CenterBiasFace


class CenterBiasRef:
    """CenterBiasFace in numpy, one sample at a time (official order: centres, t, margins)."""

    def __init__(self, k, d, s=64.0, m=0.4, mm=0.2, a=0.01):
        self.C, self.t = np.zeros((k, d)), 0.0
        self.s, self.m, self.mm, self.a = s, m, mm, a

    def step(self, cos, labels, emb, weight, train=True):
        cos, emb, weight = (np.asarray(x, dtype=np.float64) for x in (cos, emb, weight))
        if train:
            for i, y in enumerate(labels):
                self.C[y] = self.a * emb[i] + (1 - self.a) * self.C[y]
            self.t = (
                self.a * np.mean([cos[i, y] for i, y in enumerate(labels)]) + (1 - self.a) * self.t
            )
        h = np.empty(len(self.C))
        for j in range(len(self.C)):
            cn = np.linalg.norm(self.C[j])
            c = 0.0 if cn == 0 else weight[j] @ self.C[j] / (np.linalg.norm(weight[j]) * cn)
            h[j] = 1 - c
        span = h.max() - h.min()
        n = (h - h.min()) / span if span > 0 else np.zeros_like(h)
        margins = np.clip(self.m + n * self.t * self.mm, self.m, self.m + self.mm)
        out = cos.copy()
        for i, y in enumerate(labels):
            out[i, y] = arc_target(cos[i, y], margins[y])
        return self.s * out, margins


def center_batch(seed, rows=16, classes=6, d=5):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = torch.randn(classes, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes - 1, (rows,), generator=g)  # last class never seen
    labels[:4] = 2  # repeated labels
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    # targets well above zero so that t (and with it the margin spread) grows quickly
    cos[torch.arange(rows), labels] = torch.rand(rows, generator=g, dtype=torch.float64) * 0.4 + 0.5
    return cos, labels, emb, weight


def test_ema_rows_closed_form_equals_sequential():
    g = torch.Generator().manual_seed(0)
    state = torch.randn(5, 3, generator=g, dtype=torch.float64)
    rows = torch.tensor([1, 3, 1, 1, 0, 3])
    vals = torch.randn(6, 3, generator=g, dtype=torch.float64)
    want = state.clone()
    for r, v in zip(rows.tolist(), vals, strict=True):
        want[r] = 0.3 * v + 0.7 * want[r]
    torch.testing.assert_close(ema_rows(state, rows, vals, 0.3), want)


def test_centerbias_matches_reference_over_steps():
    head = build_head("centerbiasface", num_classes=6, embedding_size=5, momentum=0.3).double()
    assert isinstance(head, CenterBiasFaceHead)
    ref = CenterBiasRef(6, 5, a=0.3)
    for seed in range(3):
        cos, labels, emb, weight = center_batch(seed)
        out = head(cos, labels, embeddings=emb, weight=weight)
        want, margins = ref.step(cos.numpy(), labels.numpy(), emb.numpy(), weight.numpy())
        np.testing.assert_allclose(out.logits.numpy(), want, atol=1e-10)
        np.testing.assert_allclose(head.centers.numpy(), ref.C, atol=1e-12)
        assert float(head.t) == pytest.approx(ref.t, abs=1e-12)
        np.testing.assert_allclose(head.last_margins.numpy(), margins, atol=1e-12)
    assert len(set(np.round(margins, 6))) > 2  # margins really differ per class


def test_centerbias_eval_and_state_dict():
    head = CenterBiasFaceHead(6, 5, momentum=0.3).double()
    cos, labels, emb, weight = center_batch(1)
    head(cos, labels, embeddings=emb, weight=weight)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    assert set(state) == {"centers", "t"}
    head.eval()
    first = head(cos, labels, embeddings=emb, weight=weight).logits
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k])
    other = CenterBiasFaceHead(6, 5, momentum=0.3).double().eval()
    other.load_state_dict(state)
    torch.testing.assert_close(other(cos, labels, embeddings=emb, weight=weight).logits, first)


def test_centerbias_gradcheck():
    head = CenterBiasFaceHead(6, 5, scale=2.0, momentum=0.5).double()
    cos, labels, emb, weight = center_batch(2)
    head(cos, labels, embeddings=emb, weight=weight)
    head.eval()
    leaf = cos[:6].clone().requires_grad_(True)

    def fn(c):
        return head(c, labels[:6], embeddings=emb[:6], weight=weight).logits

    assert torch.autograd.gradcheck(fn, (leaf,), eps=1e-7, atol=1e-6)


def test_centerbias_shard_consistency():
    cos, labels, emb, weight = center_batch(4, rows=20, classes=7)
    single = CenterBiasFaceHead(7, 5, momentum=0.3).double()
    outs = [single(cos, labels, embeddings=emb, weight=weight).logits for _ in range(2)]
    ranges = {0: (0, 3), 1: (3, 4)}  # (first, count) of each rank's classes
    heads, results = run_sharded(
        lambda r: CenterBiasFaceHead(7, 5, momentum=0.3, class_range=ranges[r]).double(),
        cos,
        labels,
        steps=2,
        split=3,
        per_shard=lambda r, lo, hi: {"embeddings": emb, "weight": weight[lo:hi]},
    )
    for step in range(2):
        joined = torch.cat([results[0][step].logits, results[1][step].logits], 1)
        torch.testing.assert_close(joined, outs[step])
    torch.testing.assert_close(torch.cat([h.centers for h in heads]), single.centers)
    for h in heads:
        torch.testing.assert_close(h.t, single.t)


def test_centerbias_trains():
    losses = train_loss_falls(CenterBiasFaceHead(8, 16, scale=16.0), weight=True)
    assert losses[-1] < 0.5 * losses[0]


def test_centerbias_bad_inputs():
    head = CenterBiasFaceHead(6, 5).double()
    cos, labels, emb, weight = center_batch(0)
    with pytest.raises(ValueError, match="weight"):
        head(cos, labels, embeddings=emb)
    with pytest.raises(ValueError, match="weight"):
        head(cos, labels, embeddings=emb, weight=weight[:3])
    with pytest.raises(ValueError, match="embeddings"):
        head(cos, labels, weight=weight)
    with pytest.raises(ValueError, match="num_classes"):
        CenterBiasFaceHead(0, 5)
    with pytest.raises(ValueError, match="margin"):
        CenterBiasFaceHead(6, 5, margin=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        CenterBiasFaceHead(6, 5, momentum=0.0)
    before = cos.clone()
    head(cos, labels, embeddings=emb, weight=weight)
    assert torch.equal(cos, before)
