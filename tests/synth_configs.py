"""Small SynthFace configurations shared by several test modules (each builds its own copy)."""

from robustface.config import SynthConfig

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
