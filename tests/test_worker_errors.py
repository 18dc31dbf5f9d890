"""A bad record met by a DataLoader worker is reported like one met without workers: one line."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robustface.cli import main
from robustface.data.image import encode_image
from robustface.data.loader import CarryUserErrors, collate, unwrap
from robustface.data.recordio import RecordIODataset, write_insightface_rec
from robustface.errors import DataFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bad_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images of 2 classes (keys 1..16) whose record 10 has a broken magic number."""
    out = tmp_path_factory.mktemp("bad_rec")
    rng = np.random.default_rng(0)
    items = [(encode_image(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), i // 8)
             for i in range(16)]  # fmt: skip
    rec = write_insightface_rec(out, items, image_size=(32, 32))
    idx = dict(line.split("\t") for line in rec.with_suffix(".idx").read_text().splitlines())
    with open(rec, "r+b") as f:
        f.seek(int(idx["10"]))
        f.write(struct.pack("<I", 0))
    return out


def _config(tmp_path: Path, data: Path, workers: int) -> Path:
    config = tmp_path / f"train{workers}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / f"run{workers}"),
                "data": {"source": "rec", "path": str(data), "batch_size": 4,
                         "num_workers": workers, "val_targets": []},
                "model": {"backbone": "r18_tiny", "input_size": 32, "width": 0.125,
                          "embedding_size": 16},
                "fc": {"name": "full"},
                "train": {"epochs": 1, "progress": False, "tensorboard": False},
            }
        )
    )  # fmt: skip
    return config


def test_worker_error_is_the_same_one_line_as_without_workers(bad_rec, tmp_path, capsys):
    errors = {}
    for workers in (0, 1):
        assert main(["train", str(_config(tmp_path, bad_rec, workers))]) == 2
        captured = capsys.readouterr()
        errors[workers] = captured.err
    expected = f"robustface train: error: {bad_rec / 'train.rec'} [record 10]: bad magic 0x00000000"
    assert errors[0].startswith(expected)
    assert errors[1] == errors[0]
    assert errors[1].count("\n") == 1  # one line, no traceback


@pytest.mark.slow
def test_any_dataset_carries_the_original_error_out_of_a_worker(bad_rec):
    ds = RecordIODataset(bad_rec)  # no __getitems__ of its own
    loader = torch.utils.data.DataLoader(
        CarryUserErrors(ds), batch_size=4, num_workers=1, collate_fn=collate
    )
    batches = [unwrap(b) if i < 2 else b for i, b in enumerate(loader)]
    assert batches[0][0].shape == (4, 32, 32, 3)  # keys 1..4 and 5..8 are fine
    with pytest.raises(DataFormatError) as exc:
        unwrap(batches[2])  # keys 9..12
    assert (exc.value.path, exc.value.key) == (str(bad_rec / "train.rec"), 10)


def test_our_bugs_in_a_worker_keep_the_worker_traceback(bad_rec, tmp_path, monkeypatch):
    def bug(self, index):
        raise ZeroDivisionError("a bug in robustface")

    monkeypatch.setattr(RecordIODataset, "__getitem__", bug)  # forked workers inherit it
    with pytest.raises(
        ZeroDivisionError, match="Caught ZeroDivisionError in DataLoader worker"
    ) as exc:
        main(["train", str(_config(tmp_path, bad_rec, 1))])
    assert "Original Traceback" in str(exc.value) and "in bug" in str(exc.value)


def test_data_format_error_pickles_with_its_message_and_fields():
    error = DataFormatError("/data/train.rec", "bad magic", 50)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is DataFormatError
    assert str(copy) == "/data/train.rec [record 50]: bad magic"
    assert (copy.path, copy.key) == ("/data/train.rec", 50)


@pytest.mark.parametrize("workers", [0, 1])
def test_cleaning_embeddings_report_a_bad_record_as_without_workers(bad_rec, workers):
    from robustface.clean.subcenter import embed_dataset
    from robustface.models import build_backbone

    model = build_backbone("r18_tiny", embedding_size=8, width=0.125, input_size=32)
    with pytest.raises(DataFormatError) as exc:
        embed_dataset(model, RecordIODataset(bad_rec), input_size=32, batch_size=4,
                      num_workers=workers, progress=False)  # fmt: skip
    assert (exc.value.path, exc.value.key) == (str(bad_rec / "train.rec"), 10)
