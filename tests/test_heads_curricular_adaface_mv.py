"""CurricularFace, AdaFace and MV-Softmax heads against numpy (float64) formulas written out here,
plus gradients, shard consistency (two shards simulated with threads), state and training."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from robustface.fc import FullFC, distributed_cross_entropy
from robustface.heads import LOCAL, ShardContext, build_head
from robustface.heads.adaface import AdaFaceHead
from robustface.heads.curricular import CurricularFaceHead
from robustface.heads.mv_softmax import MVSoftmaxHead, mv_arc

# ----------------------------------------------------------------------------- references


def arc_target(c, m):
    """cos(theta + m), continued beyond theta_c = pi - m by cos(theta) - (1 + cos(theta_c))."""
    theta = math.acos(c)
    if theta <= math.pi - m:
        return math.cos(theta + m)
    return c - (1.0 + math.cos(math.pi - m))


def curricular_ref(cos, labels, s, m, t):
    out = np.array(cos, dtype=np.float64, copy=True)
    for i, y in enumerate(labels):
        if y < 0:
            continue
        target = arc_target(cos[i, y], m)
        for j in range(cos.shape[1]):
            if j != y and cos[i, j] > target:
                out[i, j] = cos[i, j] * (t + cos[i, j])
        out[i, y] = target
    return s * out


def adaface_ref(cos, labels, norms, s, m, h, eps, mean, std):
    out = np.array(cos, dtype=np.float64, copy=True)
    for i, y in enumerate(labels):
        if y < 0:
            continue
        n = min(max(norms[i], 0.001), 100.0)
        z = min(max(h * (n - mean) / (std + eps), -1.0), 1.0)
        theta = min(max(math.acos(cos[i, y]) - m * z, eps), math.pi - eps)
        out[i, y] = math.cos(theta) - (m + m * z)
    return s * out


def mv_ref(cos, labels, s, m, t, variant):
    out = np.array(cos, dtype=np.float64, copy=True)
    for i, y in enumerate(labels):
        if y < 0:
            continue
        target = cos[i, y] - m if variant == "am" else arc_target(cos[i, y], m)
        for j in range(cos.shape[1]):
            if j != y and cos[i, j] > target:
                out[i, j] = (t + 1.0) * cos[i, j] + t
        out[i, y] = target
    return s * out


def random_batch(seed, rows=48, cols=9, near_pi=10):
    """Cosines in (-1, 1), some targets near theta = pi, a quarter of the labels -1, norms."""
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.999, 0.999, size=(rows, cols))
    labels = rng.integers(0, cols, size=rows)
    labels[rng.random(rows) < 0.25] = -1
    hit = np.nonzero(labels >= 0)[0][:near_pi]
    cos[hit, labels[hit]] = np.cos(rng.uniform(2.3, 3.1, size=hit.size))
    norms = rng.uniform(5.0, 40.0, size=rows)
    norms[:3] = [1e-5, 150.0, 0.5]  # beyond the clip range
    return cos, labels, norms


def as_torch(cos, labels, norms):
    return torch.from_numpy(cos), torch.from_numpy(labels), torch.from_numpy(norms)


def valid_norms(labels, norms):
    return np.clip(norms[labels >= 0], 0.001, 100.0)


# ----------------------------------------------------------------------------- (a) formulas


def test_curricular_formula_and_ema_two_steps():
    head = CurricularFaceHead().double().train()
    t = 0.0
    for seed in (1, 2):
        cos, labels, norms = random_batch(seed)
        before = torch.from_numpy(cos.copy())
        c, y, n = as_torch(cos, labels, norms)
        out = head(c, y, norms=n)
        t = 0.01 * cos[labels >= 0, labels[labels >= 0]].mean() + 0.99 * t  # update, then use
        np.testing.assert_allclose(
            out.logits.numpy(), curricular_ref(cos, labels, 64, 0.5, t), rtol=1e-12, atol=1e-12
        )
        assert torch.equal(out.labels, y) and torch.equal(c, before)
        assert head.t.item() == pytest.approx(t, rel=1e-12)
    assert t != 0.0
    # eval: uses t, does not update it
    head.eval()
    cos, labels, norms = random_batch(3)
    out = head(*as_torch(cos, labels, norms)[:2])
    assert head.t.item() == pytest.approx(t, rel=1e-12)
    np.testing.assert_allclose(
        out.logits.numpy(), curricular_ref(cos, labels, 64, 0.5, t), rtol=1e-12, atol=1e-12
    )


def test_curricular_modulation_visible_with_large_t():
    head = CurricularFaceHead(scale=10.0, margin=0.3).double().eval()
    head.t.fill_(0.7)
    cos, labels, _ = random_batch(4)
    out = head(torch.from_numpy(cos), torch.from_numpy(labels))
    ref = curricular_ref(cos, labels, 10.0, 0.3, 0.7)
    np.testing.assert_allclose(out.logits.numpy(), ref, rtol=1e-12, atol=1e-12)
    # some negatives really were modulated (the test can see a wrong mask)
    changed = ~np.isclose(ref, 10.0 * cos)
    changed[np.arange(len(labels)), np.maximum(labels, 0)] = False
    assert changed.sum() > 5


def test_adaface_formula_and_ema_two_steps():
    head = AdaFaceHead().double().train()
    mean, std = 20.0, 100.0
    for seed in (5, 6):
        cos, labels, norms = random_batch(seed)
        c, y, n = as_torch(cos, labels, norms)
        before = (c.clone(), n.clone())
        out = head(c, y, norms=n)
        sel = valid_norms(labels, norms)
        mean = 0.01 * sel.mean() + 0.99 * mean  # update first, then z uses the new values
        std = 0.01 * sel.std(ddof=1) + 0.99 * std
        ref = adaface_ref(cos, labels, norms, 64, 0.4, 0.333, 1e-3, mean, std)
        np.testing.assert_allclose(out.logits.numpy(), ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(c, before[0]) and torch.equal(n, before[1])
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-12)
    assert head.batch_std.item() == pytest.approx(std, rel=1e-12)
    head.eval()
    cos, labels, norms = random_batch(7)
    out = head(*as_torch(cos, labels, norms)[:2], norms=torch.from_numpy(norms))
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-12)
    ref = adaface_ref(cos, labels, norms, 64, 0.4, 0.333, 1e-3, mean, std)
    np.testing.assert_allclose(out.logits.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_adaface_clipped_z_and_angles():
    """Small std: z saturates at +-1 and the angle clip at pi - eps is reached."""
    head = AdaFaceHead(scale=30.0, margin=0.5, h=1.0).double().eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(2.0)
    cos, labels, norms = random_batch(8)
    cos[0, 0], labels[0], norms[0] = math.cos(math.pi - 1e-4), 0, 1.0  # z = -1: theta + m > pi
    out = head(torch.from_numpy(cos), torch.from_numpy(labels), norms=torch.from_numpy(norms))
    ref = adaface_ref(cos, labels, norms, 30.0, 0.5, 1.0, 1e-3, 20.0, 2.0)
    np.testing.assert_allclose(out.logits.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert ref[0, 0] == pytest.approx(30.0 * (math.cos(math.pi - 1e-3) - 0.0))


@pytest.mark.parametrize("variant,m", [("am", 0.35), ("arc", 0.5)])
def test_mv_formula(variant, m):
    head = MVSoftmaxHead(margin=m, variant=variant).double()
    for seed in (9, 10):
        cos, labels, _ = random_batch(seed)
        c = torch.from_numpy(cos)
        out = head(c, torch.from_numpy(labels))
        ref = mv_ref(cos, labels, 32.0, m, 0.2, variant)
        np.testing.assert_allclose(out.logits.numpy(), ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(c, torch.from_numpy(cos))
    changed = ~np.isclose(ref, 32.0 * cos)
    changed[np.arange(len(labels)), np.maximum(labels, 0)] = False
    assert changed.sum() > 5


def test_registry_and_presets():
    assert isinstance(build_head("curricularface"), CurricularFaceHead)
    ada = build_head("adaface", scale=32.0)
    assert isinstance(ada, AdaFaceHead) and ada.scale == 32.0 and ada.margin == 0.4
    mv = build_head("mv_softmax")
    assert (mv.scale, mv.margin, mv.t, mv.variant) == (32.0, 0.35, 0.2, "am")
    arc = build_head("mv_arc")
    assert isinstance(arc, MVSoftmaxHead) and arc.variant == "arc" and arc.margin == 0.5
    assert mv_arc(margin=0.4).margin == 0.4
    cf = build_head("curricularface")
    assert (cf.scale, cf.margin, cf.momentum) == (64.0, 0.5, 0.01)


# ----------------------------------------------------------------------------- (b) gradients


def _gradcheck_head(head, cos, labels, norms=None):
    c = torch.from_numpy(cos).requires_grad_(True)
    y = torch.from_numpy(labels)
    n = None if norms is None else torch.from_numpy(norms)
    assert torch.autograd.gradcheck(lambda x: head(x, y, norms=n).logits, (c,), eps=1e-6, atol=1e-5)


def small_batch(seed):
    cos, labels, norms = random_batch(seed, rows=8, cols=5, near_pi=2)
    return np.clip(cos, -0.98, 0.98), labels, norms


def test_gradcheck_curricular():
    head = CurricularFaceHead(scale=4.0).double().eval()
    head.t.fill_(0.4)
    _gradcheck_head(head, *small_batch(11)[:2])


def test_gradcheck_adaface():
    head = AdaFaceHead(scale=4.0).double().eval()
    head.batch_std.fill_(5.0)
    _gradcheck_head(head, *small_batch(12))


@pytest.mark.parametrize("variant", ["am", "arc"])
def test_gradcheck_mv(variant):
    _gradcheck_head(MVSoftmaxHead(scale=4.0, variant=variant).double(), *small_batch(13)[:2])


def test_curricular_gradient_includes_margin():
    """d target / d cos = sin(theta + m) / sin(theta): the margin's derivative is not dropped."""
    head = CurricularFaceHead(scale=1.0).double().eval()
    c = torch.tensor([[0.3, -0.5]], dtype=torch.float64, requires_grad=True)
    head(c, torch.tensor([0])).logits[0, 0].backward()
    theta = math.acos(0.3)
    assert c.grad[0, 0].item() == pytest.approx(math.sin(theta + 0.5) / math.sin(theta), rel=1e-9)


# ----------------------------------------------------------------------------- (c) shards


class Exchange:
    """What two threads standing in for two ranks share: one slot each and a barrier."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)
        self.slots: list[Any] = [None, None]
        self.calls = 0


@dataclasses.dataclass(frozen=True, eq=False)
class ThreadShard(ShardContext):
    """A shard whose all_reduce combines, across two threads, what each passes (sum or max)."""

    exchange: Any = None

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ex = self.exchange
        ex.slots[self.rank] = tensor.detach().clone()
        ex.barrier.wait()
        a, b = ex.slots
        out = a + b if op == "sum" else torch.maximum(a, b)
        if self.rank == 0:
            ex.calls += 1
        ex.barrier.wait()  # both have read before either writes again
        return out


HEAD_FACTORIES = [
    pytest.param(lambda: CurricularFaceHead(), id="curricularface"),
    pytest.param(lambda: AdaFaceHead(), id="adaface"),
    pytest.param(lambda: MVSoftmaxHead(), id="mv_softmax"),
    pytest.param(lambda: mv_arc(), id="mv_arc"),
]


@pytest.mark.parametrize("factory", HEAD_FACTORIES)
def test_two_shards_match_one(factory):
    """Classes split in two column blocks (labels -1 where not local): same logits, same state."""
    single = factory().double().train()
    shards = [copy.deepcopy(single), copy.deepcopy(single)]
    split, num_classes = 4, 9
    exchange = Exchange()
    contexts = [
        ThreadShard(
            rank=r,
            world_size=2,
            class_offset=(0, split)[r],
            num_classes=num_classes,
            exchange=exchange,
        )
        for r in range(2)
    ]
    for seed in (14, 15):
        cos, labels, norms = as_torch(*random_batch(seed, cols=num_classes))
        full = single(cos, labels, norms=norms).logits
        blocks = [cos[:, :split], cos[:, split:]]
        local_labels = [
            torch.where((labels >= 0) & (labels < split), labels, -1),
            torch.where(labels >= split, labels - split, -1),
        ]
        with ThreadPoolExecutor(2) as pool:
            outs = list(
                pool.map(
                    lambda r, b=blocks, y=local_labels, n=norms: shards[r](
                        b[r], y[r], norms=n, shard=contexts[r]
                    ),
                    range(2),
                )
            )
        torch.testing.assert_close(
            torch.cat([o.logits for o in outs], 1), full, rtol=1e-12, atol=1e-12
        )
        for r in range(2):
            assert torch.equal(outs[r].labels, local_labels[r])
            for (name, a), (_, b) in zip(
                single.named_buffers(), shards[r].named_buffers(), strict=True
            ):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    assert exchange.calls > 0  # every head needs the other shard (targets or statistics)


def test_shard_without_targets_still_joins_the_reduction():
    """A shard owning none of the batch's targets still updates its state like the others."""
    head = CurricularFaceHead().double().train()
    exchange = Exchange()
    ctx = [ThreadShard(rank=r, world_size=2, exchange=exchange) for r in range(2)]
    cos = torch.full((3, 2), 0.25, dtype=torch.float64)
    labels = [torch.tensor([0, 1, 0]), torch.tensor([-1, -1, -1])]
    heads = [copy.deepcopy(head), copy.deepcopy(head)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: heads[r](cos, labels[r], shard=ctx[r]), range(2)))
    assert heads[0].t.item() == heads[1].t.item() == pytest.approx(0.01 * 0.25)


# ----------------------------------------------------------------------------- (d) state


def test_state_in_buffers_and_round_trip():
    cos, labels, norms = as_torch(*random_batch(16))
    for head, names in (
        (CurricularFaceHead().double(), {"t"}),
        (AdaFaceHead().double(), {"batch_mean", "batch_std"}),
        (MVSoftmaxHead(), set()),
    ):
        assert set(head.state_dict()) == names
        head.train()
        head(cos, labels, norms=norms)
        head(cos, labels, norms=norms)
        fresh = type(head)().double()
        fresh.load_state_dict(head.state_dict())
        for name in names:
            assert torch.equal(fresh.get_buffer(name), head.get_buffer(name))
            assert not torch.equal(fresh.get_buffer(name), type(head)().double().get_buffer(name))
        head.eval()
        fresh.eval()
        torch.testing.assert_close(
            fresh(cos, labels, norms=norms).logits, head(cos, labels, norms=norms).logits
        )


def test_no_targets_leaves_state_alone():
    cos = torch.zeros(4, 3)
    labels = torch.full((4,), -1)
    for head in (CurricularFaceHead(), AdaFaceHead()):
        state = {k: v.clone() for k, v in head.state_dict().items()}
        out = head.train()(cos, labels, norms=torch.ones(4))
        torch.testing.assert_close(out.logits, cos * head.scale)
        for k, v in head.state_dict().items():
            assert torch.equal(v, state[k]) and torch.isfinite(v).all()


# ----------------------------------------------------------------------------- (e) training


@pytest.mark.parametrize("factory", HEAD_FACTORIES)
def test_it_trains(factory):
    torch.manual_seed(0)
    head = factory().train()
    centers = torch.randn(8, 16)
    labels = torch.arange(8).repeat(8)
    embeddings = 20.0 * torch.nn.functional.normalize(centers[labels] + 0.5 * torch.randn(64, 16))
    fc = FullFC(16, 8)
    optimizer = torch.optim.SGD(fc.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(30):
        out = fc(embeddings, labels)
        head_out = head(
            out.cosine, out.labels, norms=out.norms, embeddings=out.embeddings, shard=out.shard
        )
        loss = distributed_cross_entropy(head_out.logits, head_out.labels, out.shard).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- (f) errors


def test_bad_parameters():
    with pytest.raises(ValueError, match="margin"):
        CurricularFaceHead(margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        CurricularFaceHead(margin=math.pi)
    with pytest.raises(ValueError, match="momentum"):
        CurricularFaceHead(momentum=0.0)
    with pytest.raises(ValueError, match="scale"):
        CurricularFaceHead(scale=0.0)
    with pytest.raises(TypeError, match="margin"):
        AdaFaceHead(margin="0.4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        AdaFaceHead(margin=-0.4)
    with pytest.raises(ValueError, match="h "):
        AdaFaceHead(h=0.0)
    with pytest.raises(ValueError, match="t_alpha"):
        AdaFaceHead(t_alpha=1.5)
    with pytest.raises(ValueError, match="eps"):
        AdaFaceHead(eps=0.0)
    with pytest.raises(ValueError, match="margin"):
        MVSoftmaxHead(margin=-0.35)
    with pytest.raises(ValueError, match="margin"):
        MVSoftmaxHead(margin=4.0, variant="arc")
    with pytest.raises(ValueError, match="variant"):
        MVSoftmaxHead(variant="cos")
    with pytest.raises(ValueError, match="t "):
        MVSoftmaxHead(t=-0.1)
    with pytest.raises(ValueError, match="nan"):
        MVSoftmaxHead(margin=float("nan"))


def test_bad_inputs():
    cos, labels = torch.zeros(4, 3), torch.tensor([0, 1, 2, -1])
    with pytest.raises(ValueError, match=r"norms.*None"):
        AdaFaceHead()(cos, labels)
    with pytest.raises(ValueError, match="norms"):
        AdaFaceHead()(cos, labels, norms=torch.ones(3))
    with pytest.raises(ValueError, match="norms"):
        AdaFaceHead()(cos, labels, norms=torch.ones(4, dtype=torch.long))
    for head in (CurricularFaceHead(), AdaFaceHead(), MVSoftmaxHead()):
        with pytest.raises(ValueError, match="labels"):
            head(cos, torch.tensor([0, 1, 3, -1]), norms=torch.ones(4))
        with pytest.raises(ValueError, match="cosine"):
            head(cos[0], labels, norms=torch.ones(4))
    assert LOCAL.world_size == 1
