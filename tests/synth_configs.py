"""Small SynthFace configurations and a tiny training run shared by several test modules (each
builds its own copy)."""

from pathlib import Path

from robustface.config import Config, SynthConfig, load_config
from robustface.train import Trainer

# 2 training identities and a 4-identity IJB-style set: enough for IJB evaluations end to end
IJB_SYNTH = SynthConfig(
    identities=2,
    images_per_identity=1,
    open_set_identities=0,
    test_identities=20,
    lfw_pairs=0,
    cfp_fp_pairs=0,
    lowq_pairs=0,
    ijb_identities=4,
    ijb_templates_per_identity=3,
    ijb_max_media_per_template=2,
    ijb_max_images_per_media=2,
    ijb_impostor_ratio=3,
)

# 8 training identities at 48 px with an open-set source: the base of the dirty cleaning sets
TINY_DIRTY = SynthConfig(
    identities=8,
    images_per_identity=20,
    open_set_identities=4,
    open_set_images_per_identity=4,
    test_identities=20,
    lfw_pairs=20,
    cfp_fp_pairs=20,
    lowq_pairs=20,
    ijb_identities=0,
    image_size=48,
)


def tiny_train_config(out: Path, data: Path, *extra: str) -> Config:
    """The tiny training config (r18 at 32 px, 32-d, ArcFace s = 16, one epoch, batches of 16, no
    validation) on the ``.rec`` set ``data`` into ``out``; ``extra`` overrides (later ones win)."""
    return load_config(
        None,
        [
            f"output_dir={out}",
            "data.source=rec",
            f"data.path={data}",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.val_targets=[]",
            "model.backbone=r18_tiny",
            "model.input_size=32",
            "model.width=0.125",
            "model.embedding_size=32",
            "head.name=arcface",
            "head.params={scale: 16.0}",
            "optim.lr=0.05",
            "train.epochs=1",
            "train.progress=false",
            "train.tensorboard=false",
            *extra,
        ],
    )


def train_tiny(out: Path, data: Path, *extra: str) -> Path:
    """:func:`tiny_train_config` trained: the run directory ``out``."""
    Trainer(tiny_train_config(out, data, *extra)).fit()
    return out
