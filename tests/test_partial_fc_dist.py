"""Partial FC over 2 gloo processes against one process holding the whole classifier.

One spawn serves the module: each rank runs every check, saves what it saw, and the tests compare
it with a single-process FullFC + the same head + ``F.cross_entropy`` on the concatenated batch.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from robustface.fc import FullFC, PartialFC, distributed_cross_entropy
from robustface.heads import build_head

pytestmark = pytest.mark.slow  # the module fixture starts the rank processes (about 18 s)

WORLD_SIZE = 2
NUM_CLASSES, DIM = 11, 6  # shards of 6 and 5 classes
BATCH_SIZES = (5, 3)  # uneven local batches
TIMEOUT_S = 120


def make_data():
    """The global batch and weight every rank and the reference start from."""
    g = torch.Generator().manual_seed(1234)
    embeddings = torch.randn(sum(BATCH_SIZES), DIM, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 10, 5, 6, 6, 2, 9, 5])  # both shards have positives
    weight = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64)
    return embeddings, labels, weight


def local_slice(rank):
    start = sum(BATCH_SIZES[:rank])
    return slice(start, start + BATCH_SIZES[rank])


def check_model_parallel(rank):
    embeddings, labels, weight = make_data()
    local = embeddings[local_slice(rank)].clone().requires_grad_()
    pfc = PartialFC(DIM, NUM_CLASSES, sample_rate=1.0, dtype=torch.float64)
    pfc.load_full_weight(weight)
    out = pfc(local, labels[local_slice(rank)])
    head_out = build_head("arcface")(out.cosine, out.labels, norms=out.norms, shard=out.shard)
    loss = distributed_cross_entropy(head_out.logits, head_out.labels, out.shard)
    loss.mean().backward()
    return {
        "loss": loss.detach(),
        "embedding_grad": local.grad,
        "weight_grad": pfc.weight.grad,
        "class_start": pfc.class_start,
        "local_labels": out.labels,
        "norms": out.norms.detach(),
        "full_weight": pfc.gather_full_weight(),
    }


def check_sampling(rank):
    g = torch.Generator().manual_seed(rank)
    num_classes = 40  # 20 per rank, 10 sampled
    labels = torch.tensor([[1, 3, 3, 22, 25, 39], [19, 0, 30, 31, 22, 7]][rank])
    pfc = PartialFC(DIM, num_classes, sample_rate=0.5, dtype=torch.float64)
    emb = torch.randn(6, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    seen = []
    for _ in range(3):
        out = pfc(emb, labels)
        seen.append((out.shard.class_ids.clone(), out.labels.clone()))
    loss = distributed_cross_entropy(
        build_head("cosface")(out.cosine, out.labels).logits, out.labels, out.shard
    )
    loss.mean().backward()
    touched = (pfc.weight.grad.abs().sum(dim=1) > 0).nonzero().squeeze(1) + pfc.class_start
    return {"seen": seen, "touched": touched, "class_start": pfc.class_start, "loss": loss.detach()}


def check_all_reduce(rank):
    shard = PartialFC(DIM, NUM_CLASSES)(torch.randn(2, DIM), torch.tensor([0, 7])).shard
    value = torch.tensor([rank + 1.0, 10.0 * (rank + 1), -float(rank)])
    return {
        "sum": shard.all_reduce(value, "sum"),
        "max": shard.all_reduce(value, "max"),
        "input_after": value,
        "rank": shard.rank,
        "world_size": shard.world_size,
        "class_offset": shard.class_offset,
        "num_classes": shard.num_classes,
    }


def check_missing_label(rank):
    shard = PartialFC(DIM, NUM_CLASSES)(torch.randn(1, DIM), torch.tensor([0])).shard
    errors = []
    for labels in ([[0, -1], [-1, -1]], [[1, -1], [-1, 2]], [[1, -1], [2, 0]]):
        try:
            distributed_cross_entropy(torch.randn(2, 3), torch.tensor(labels[rank]), shard)
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return errors


def check_default_init(rank):
    torch.manual_seed(0)  # every rank seeded alike, as DDP set-ups usually do
    pfc = PartialFC(DIM, NUM_CLASSES)
    return {"first_row": pfc.weight.detach()[0].clone()}


CHECKS = {
    "model_parallel": check_model_parallel,
    "sampling": check_sampling,
    "all_reduce": check_all_reduce,
    "missing_label": check_missing_label,
    "default_init": check_default_init,
}


def worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                results[name] = check(rank)
            except Exception:
                results[name] = RuntimeError(f"rank {rank}: {traceback.format_exc()}")
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per-rank results of every check, from one 2-process run."""
    out_dir = tmp_path_factory.mktemp("pfc_dist")
    context = mp.start_processes(
        worker,
        args=(free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def result(ranks, rank, name):
    value = ranks[rank][name]
    if isinstance(value, Exception):
        raise value
    return value


def test_model_parallel_equals_single_process_full_fc(ranks):
    embeddings, labels, weight = make_data()
    emb = embeddings.clone().requires_grad_()
    full = FullFC(DIM, NUM_CLASSES, dtype=torch.float64)
    full.load_state_dict({"weight": weight})
    out = full(emb, labels)
    logits = build_head("arcface")(out.cosine, out.labels).logits
    loss = F.cross_entropy(logits, labels, reduction="none")
    loss.mean().backward()
    for rank in range(WORLD_SIZE):
        got = result(ranks, rank, "model_parallel")
        start, count = PartialFC.shard_bounds(NUM_CLASSES, rank, WORLD_SIZE)
        assert got["class_start"] == start
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            got["embedding_grad"], emb.grad[local_slice(rank)], rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(
            got["weight_grad"], full.weight.grad[start : start + count], rtol=1e-9, atol=1e-12
        )
        in_shard = (labels >= start) & (labels < start + count)
        torch.testing.assert_close(got["local_labels"], torch.where(in_shard, labels - start, -1))
        torch.testing.assert_close(got["norms"], embeddings.norm(dim=1))
    torch.testing.assert_close(result(ranks, 0, "model_parallel")["full_weight"], weight)
    assert result(ranks, 1, "model_parallel")["full_weight"] is None


def test_sampling_keeps_positives_on_every_rank(ranks):
    all_labels = torch.tensor([[1, 3, 3, 22, 25, 39], [19, 0, 30, 31, 22, 7]]).flatten()
    for rank in range(WORLD_SIZE):
        got = result(ranks, rank, "sampling")
        start = got["class_start"]
        positives = {c for c in all_labels.tolist() if start <= c < start + 20}
        assert len(positives) >= 4
        for class_ids, local_labels in got["seen"]:
            assert class_ids.numel() == 10
            assert torch.equal(class_ids, torch.unique(class_ids))
            assert positives <= set(class_ids.tolist())
            mine = local_labels != -1
            assert torch.equal(class_ids[local_labels[mine]], all_labels[mine])
            assert set(all_labels[~mine].tolist()).isdisjoint(range(start, start + 20))
        assert set(got["touched"].tolist()) == set(got["seen"][-1][0].tolist())
    torch.testing.assert_close(
        result(ranks, 0, "sampling")["loss"], result(ranks, 1, "sampling")["loss"]
    )


def test_shard_context_all_reduce(ranks):
    for rank in range(WORLD_SIZE):
        got = result(ranks, rank, "all_reduce")
        torch.testing.assert_close(got["sum"], torch.tensor([3.0, 30.0, -1.0]))
        torch.testing.assert_close(got["max"], torch.tensor([2.0, 20.0, 0.0]))
        torch.testing.assert_close(
            got["input_after"], torch.tensor([rank + 1.0, 10.0 * (rank + 1), -float(rank)])
        )
        assert (got["rank"], got["world_size"], got["num_classes"]) == (
            rank,
            WORLD_SIZE,
            NUM_CLASSES,
        )
        assert got["class_offset"] == PartialFC.shard_bounds(NUM_CLASSES, rank, WORLD_SIZE)[0]


def test_class_missing_on_every_rank_is_an_error_on_every_rank(ranks):
    for rank in range(WORLD_SIZE):
        nowhere, fine, twice = result(ranks, rank, "missing_label")
        assert nowhere is not None and "row 1 has its label on 0 of 2" in nowhere
        assert fine is None
        assert twice is not None and "row 0 has its label on 2 of 2" in twice


def test_default_init_differs_between_shards(ranks):
    first = [result(ranks, r, "default_init")["first_row"] for r in range(WORLD_SIZE)]
    assert not torch.equal(first[0], first[1])
    assert 0.001 < first[0].std().item() < 0.05
