"""Whole uint8 batches from the loader workers (BatchWriter): the same batches as the per-sample
path, the shared slots checked and cleaned up."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from loader_batches import flipped_planes
from robustface.data import loader as loader_module
from robustface.data.image import encode_image
from robustface.data.loader import BatchWriter, CarryUserErrors, collate, unwrap
from robustface.data.recordio import RecordIODataset, write_insightface_rec
from robustface.data.transforms import TrainTransform, normalize_images
from robustface.train import trainer as trainer_module
from robustface.train.sampler import ResumableSampler
from robustface.train.trainer import TrainSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """44 random 24x24 JPEGs of 11 classes."""
    out = tmp_path_factory.mktemp("small_rec")
    rng = np.random.default_rng(0)
    items = [(encode_image(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)), i // 4)
             for i in range(44)]  # fmt: skip
    write_insightface_rec(out, items, image_size=(24, 24))
    return out


def _slot_files() -> set[Path]:
    return set(Path("/dev/shm").glob("robustface-batches-*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_the_stacked_samples_over_epochs(small_rec, workers):
    # the trainer's loader (TrainSet.__getitems__ writing into BatchWriter slots, 4 per worker,
    # reused: 5 batches per worker and epoch) against the per-sample path, stacked here
    transform = TrainTransform(flip_p=0.5, blur=0.5, color_jitter=0.5, input_size=20,
                               normalize=False)  # fmt: skip
    trainset = TrainSet(RecordIODataset(small_rec), transform, seed=7)
    sampler = ResumableSampler(len(trainset), 4, seed=7)
    before = _slot_files()
    loader = torch.utils.data.DataLoader(
        CarryUserErrors(trainset), batch_size=4, sampler=sampler, num_workers=workers,
        drop_last=True, collate_fn=collate,  # new workers each epoch, as in the trainer
    )  # fmt: skip
    for epoch in range(2):
        trainset.epoch = epoch
        sampler.set_epoch(epoch, start=4 if epoch else 0)  # a resumed epoch too
        order = list(sampler)
        batches = [unwrap(b) for b in loader]
        assert len(batches) == len(order) // 4 == 11 - (epoch > 0)
        for k, (images, labels, flips) in enumerate(batches):
            samples = [trainset[i] for i in order[4 * k : 4 * k + 4]]
            assert images.dtype == torch.uint8 and images.shape == (4, 20, 20, 3)
            assert flips.dtype == torch.bool and flips.shape == (4,)
            stacked = torch.stack([image for image, _ in samples])
            assert np.array_equal(flipped_planes(images, flips), stacked.numpy())
            assert torch.equal(
                normalize_images(images, flips, channels_last=True), normalize_images(stacked)
            )
            assert labels.dtype == torch.int64
            assert labels.tolist() == [label for _, label in samples]
    assert any(f.any() and not f.all() for _, _, f in batches)  # flips of both kinds were met
    assert len({b[0].data_ptr() for b in batches}) == len(batches)  # each batch its own memory
    del loader
    assert _slot_files() <= before  # the slot files are gone once mapped (and at worker exit)


def test_a_slot_written_again_before_it_was_copied_out_raises(monkeypatch):
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # as in a worker
    writer = BatchWriter(slots=2)
    sent = []
    for value in range(3):
        writer.start(2, (3, 4, 5))[:] = value
        sent.append(pickle.dumps(writer.finish(np.array([value, value + 1]))))
    monkeypatch.undo()
    images, labels = pickle.loads(sent[2])  # the newest batch in slot 0 is intact
    assert torch.equal(images, torch.full((2, 3, 4, 5), 2, dtype=torch.uint8))
    assert labels.tolist() == [2, 3]
    images, _ = pickle.loads(sent[1])
    assert images.unique().tolist() == [1]
    with pytest.raises(RuntimeError, match="slot 0 again before the main process"):
        pickle.loads(sent[0])  # slot 0 was written again by batch 2


@pytest.mark.parametrize("in_worker", [False, True])
def test_extra_per_image_arrays_travel_with_the_batch(monkeypatch, in_worker):
    # the trainer's flips ride along with the labels, through a slot in a worker
    if in_worker:
        monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())
    writer = BatchWriter()
    writer.start(2, (4, 5, 3))[:] = 7
    batch = writer.finish([3, 1], np.array([True, False]))
    writer.start(2, (4, 5, 3))
    with pytest.raises(ValueError, match="a batch of 2 images needs 2 entries in each array"):
        writer.finish([3, 1], np.array([True]))
    monkeypatch.undo()
    batch = collate(batch)  # in a worker, then pickled to the main process
    images, labels, flips = pickle.loads(pickle.dumps(batch)) if in_worker else batch
    assert torch.equal(images, torch.full((2, 4, 5, 3), 7, dtype=torch.uint8))
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1]
    assert flips.dtype == torch.bool and flips.tolist() == [True, False]


def test_slot_files_a_worker_left_behind_are_removed(monkeypatch):
    # a worker terminated before the main process received a batch from it leaves its file;
    # the main process removes its workers' files when it exits (_remove_slot_files, at exit)
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # as in a worker
    BatchWriter().start(2, (3, 4, 5))  # never finished, never received
    monkeypatch.undo()
    left = [p for p in _slot_files() if p.name.startswith(f"robustface-batches-{os.getppid()}-")]
    assert len(left) == 1
    loader_module._remove_slot_files(os.getppid())  # the worker's main process: our parent here
    assert not left[0].exists()


def test_slot_files_are_named_after_the_process_that_made_the_writer(monkeypatch):
    # under forkserver or spawn a worker's parent is not the main process: the name comes from
    # the writer, made in the main process and pickled into the worker
    writer = pickle.loads(pickle.dumps(BatchWriter()))
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # as in a worker
    monkeypatch.setattr(loader_module.os, "getppid", lambda: 1)  # the forkserver, say
    writer.start(2, (3, 4, 5))
    monkeypatch.undo()
    path = Path(writer._state[2])
    assert path.name.startswith(f"robustface-batches-{os.getpid()}-")
    loader_module._remove_slot_files(os.getpid())
    assert not path.exists()


def test_a_worker_s_earlier_ring_is_released_when_it_moves_to_a_new_batch_size(monkeypatch):
    # a ragged last batch opens a new ring; the main process keeps one mapping per worker
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # as in a worker
    writer, sent = BatchWriter(), []
    for epoch in range(3):
        for count in (4, 4, 3):  # each epoch ends on a smaller batch
            writer.start(count, (3, 4, 5))[:] = epoch
            sent.append(pickle.dumps(writer.finish(np.arange(count))))
    monkeypatch.undo()
    for k, batch in enumerate(sent):
        images, _ = pickle.loads(batch)
        assert images.shape[0] == (3 if k % 3 == 2 else 4) and images.unique().tolist() == [k // 3]
        mine = [m for owner, m in loader_module._RECEIVED.values() if owner == os.getpid()]
        assert len(mine) == 1


def test_trainset_needs_uint8_transform(small_rec):
    with pytest.raises(ValueError, match="normalize=False"):
        TrainSet(RecordIODataset(small_rec), TrainTransform(), seed=0)


@pytest.mark.parametrize("flip_p", [0.0, 0.5, 1.0])
def test_batches_of_a_flip_alone_or_no_draw_equal_the_samples(small_rec, monkeypatch, flip_p):
    # flip_p=0 and no degradations: no per-sample draws at all; the flip alone: its one uniform
    # an image (keyed_first_uniforms), without generators (they cost a few µs an image)
    seeded = []
    for name in ("keyed_generators", "keyed_first_uniforms"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(
            trainer_module, name, lambda p, ks, f=real, n=name: seeded.append(n) or f(p, ks)
        )
    base = RecordIODataset(small_rec)
    trainset = TrainSet(base, TrainTransform(flip_p=flip_p, normalize=False), seed=3)
    trainset.epoch = 2
    order = [5, 0, 9, 17, 30, 31, 2, 43]
    images, labels, flips = collate(trainset.__getitems__(order))
    want = [np.random.default_rng([3, 2, i]).random() < flip_p for i in order]
    assert 0 < sum(want) < len(want) or flip_p in (0, 1)
    assert flips.tolist() == want
    assert np.array_equal(images.numpy(), np.stack([base[i][0] for i in order]))  # as decoded
    stacked = torch.stack([trainset[i][0] for i in order])
    assert np.array_equal(flipped_planes(images, flips), stacked.numpy())
    assert labels.tolist() == [i // 4 for i in order]
    assert seeded == ([] if flip_p == 0 else ["keyed_first_uniforms"])
