"""CenterBiasFace against its official update order written out in numpy (float64), state,
gradients, class-range shards (two threads) and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads_reference import arc_target, run_sharded, train_loss_falls
from robustface.errors import ParameterTypeError
from robustface.heads import ShardContext, build_head
from robustface.heads.centerbias import CenterBiasFaceHead, ema_rows


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


def test_centerbias_class_range_is_this_ranks_share_of_the_global_classes():
    head = CenterBiasFaceHead(7, 5, momentum=0.3, class_range=(3, 4)).double()
    assert head.num_classes == 7 and head.centers.shape == (4, 5)
    cos, labels, emb, weight = center_batch(0, classes=4)
    ref = CenterBiasRef(4, 5, a=0.3)
    out = head(cos, labels, embeddings=emb, weight=weight, shard=ShardContext(class_offset=3))
    want, _ = ref.step(cos.numpy(), labels.numpy(), emb.numpy(), weight.numpy())
    np.testing.assert_allclose(out.logits.numpy(), want, atol=1e-10)
    with pytest.raises(ValueError, match=r"class_offset.*\(3\), got 0"):
        head(cos, labels, embeddings=emb, weight=weight)
    for bad in [(5, 4), (0, 0), (-1, 2), (3,), "03"]:
        with pytest.raises(ValueError, match="class_range"):
            CenterBiasFaceHead(7, 5, class_range=bad)
    with pytest.raises(ParameterTypeError, match="class_range first must be an integer, got float"):
        CenterBiasFaceHead(7, 5, class_range=(1.0, 2))
