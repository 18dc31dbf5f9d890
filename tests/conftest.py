"""Shared fixtures: a tiny SynthFace set, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

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
