"""BoundaryFace against the paper's formulas and the official code written out row by row, shards
(two threads), gradients and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from heads_reference import arc_target, random_batch, run_sharded, train_loss_falls
from robustface.heads import build_head
from robustface.heads.boundaryface import BoundaryFaceHead


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
