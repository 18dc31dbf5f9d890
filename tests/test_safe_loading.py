"""Opening an untrusted file runs nothing: crafted .bin sets, model files, training checkpoints
and GCN files are refused with an error naming the file (and, for PyTorch files, the opt-in)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from robustface.cli import main
from robustface.cluster.gcn_v import load_gcn_v
from robustface.errors import DataFormatError
from robustface.models import build_backbone
from robustface.models.loading import load_backbone
from robustface.train import checkpoint as ckpt

REFUSED = "refused to unpickle posix.system"


class RunsCommand:
    """Unpickles to ``os.system(command)``: a crafted file that runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def crafted_pth(path: Path, marker: Path) -> Path:
    """A state dict file whose unpickling would create ``marker``."""
    torch.save({"conv1.weight": torch.zeros(1), "x": RunsCommand(f"touch {marker}")}, path)
    return path


def test_model_files_are_read_weights_only(tmp_path):
    marker = tmp_path / "ran"
    evil = crafted_pth(tmp_path / "evil.pth", marker)
    pattern = re.escape(f"{evil}: {REFUSED}") + r".*--unsafe-legacy-load"
    with pytest.raises(DataFormatError, match=pattern):
        load_backbone(evil, backbone="r18")
    # the same for each other reader of PyTorch files
    (tmp_path / "step" / "rank0.pt").parent.mkdir()
    crafted_pth(tmp_path / "step" / "main.pt", marker)
    crafted_pth(tmp_path / "step" / "rank0.pt", marker)
    with pytest.raises(DataFormatError, match=re.escape(f"main.pt: {REFUSED}")):
        ckpt.load_main(tmp_path / "step")
    with pytest.raises(DataFormatError, match=re.escape(f"rank0.pt: {REFUSED}")):
        ckpt.load_rank_states(tmp_path / "step", 1)
    with pytest.raises(DataFormatError, match=re.escape(f"evil.pth: {REFUSED}")):
        load_gcn_v(evil)
    assert not marker.exists()


def test_cli_refuses_crafted_files_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = crafted_pth(tmp_path / "evil.pth", marker)
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(evil), "--out", str(out), "--backbone", "r18"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and REFUSED in err and "--unsafe-legacy-load" in err
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([RunsCommand(f"touch {marker}")], [True])))
    # inspect lists the refusal as the set's one problem (exit 1), with no traceback
    assert main(["inspect", str(tmp_path / "evil.bin")]) == 1
    shown = capsys.readouterr()
    assert "1 problem(s) found" in shown.out and f"evil.bin: {REFUSED}" in shown.out
    assert "Traceback" not in shown.out + shown.err
    assert not marker.exists() and not out.exists()


def test_legacy_checkpoint_needs_the_explicit_opt_in(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_backbone("r18_tiny", embedding_size=32).eval()
    legacy = tmp_path / "legacy.pth"
    # a training script's checkpoint: the state dict beside a numpy scalar
    torch.save({"state_dict": model.state_dict(), "epoch": np.int64(3)}, legacy)
    with pytest.raises(DataFormatError, match=r"refused to unpickle numpy\..*scalar"):
        load_backbone(legacy)
    loaded, _ = load_backbone(legacy, unsafe_legacy_load=True)
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(loaded(x), model(x))
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(legacy), "--out", str(out), "--no-check"]) == 2
    assert main(["export", "onnx", str(legacy), "--out", str(out), "--no-check",
                 "--unsafe-legacy-load"]) == 0  # fmt: skip
    assert out.is_file()
