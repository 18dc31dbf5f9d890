"""Shared fixtures: a tiny SynthFace set, built once per test session, and one torch thread."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from robustface.config import SynthConfig
from robustface.data.synth.builder import build_synthface

TRAIN_SYNTH = SynthConfig(
    identities=8,
    images_per_identity=8,
    open_set_identities=0,
    test_identities=20,
    lfw_pairs=40,
    cfp_fp_pairs=20,
    lowq_pairs=0,
    ijb_identities=0,
)


@pytest.fixture(scope="session")
def synth_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-image, 8-class SynthFace set with lfw.bin (40 pairs) and cfp_fp.bin (20 pairs)."""
    out = tmp_path_factory.mktemp("synth_train") / "synthface"
    build_synthface(out, TRAIN_SYNTH, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests and fixtures (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): tiny tensors gain nothing from intra-op threads and lose a lot on a
    busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_between_modules() -> Iterator[None]:
    """Free each module's cyclic garbage in this process before the next module runs.

    Otherwise an onnxruntime session left in a reference cycle (say by a failed assertion's
    traceback in tests/test_onnx.py) may be collected inside a DataLoader worker forked by a later
    module, where its destructor waits forever on a lock held by a thread that was not forked."""
    yield
    gc.collect()
