"""SynthFace identities: seeded parameter vectors, with some near-duplicate "siblings".

An identity is a vector of ``len(PARAM_NAMES)`` genes, each in ``[0, 1]``; the renderer maps genes
to geometry and colour (``render.py``). The genes and sibling coin of identity ``i`` of a benchmark
come from ``np.random.default_rng([seed, i])`` (a sibling also starts from its predecessor's
genes), so disjoint id ranges give disjoint identities that do not depend on the range's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robustface.utils.guards import check_int, check_real

PARAM_NAMES: tuple[str, ...] = (
    # face shape
    "head_width", "head_height", "head_depth", "cheek_width", "jaw_width", "chin_width",
    "chin_protrusion", "eye_height",
    # eyes
    "eye_spacing", "eye_width", "eye_opening", "eye_shape", "eye_tilt", "iris_size",
    "iris_colour", "iris_shade",
    # brows
    "brow_thickness", "brow_arch", "brow_angle", "brow_length", "brow_height", "brow_darkness",
    # nose
    "nose_length", "nose_width", "nose_protrusion", "nose_tip", "nose_bridge",
    # mouth
    "mouth_width", "mouth_height", "upper_lip", "lower_lip", "lip_colour", "mouth_curvature",
    # ears
    "ear_size", "ear_flare", "ear_height",
    # colour
    "skin_tone", "skin_hue", "hair_colour", "hair_shade",
    # hair
    "hair_style", "hairline", "hair_volume", "hair_part",
    # facial hair
    "facial_hair", "beard_density",
    # texture
    "texture_seed", "age", "freckles", "moles",
)  # fmt: skip
"""Names of the genes of ``Identity.params``, in order."""

PARAM_INDEX: dict[str, int] = {name: i for i, name in enumerate(PARAM_NAMES)}

_INHERITED = ("iris_colour", "hair_colour", "hair_style", "facial_hair")
"""Categorical genes a sibling shares with its original."""

_FRESH = ("texture_seed",)
"""Genes a sibling draws anew (moles and freckles differ between siblings)."""

SIBLING_SIGMA = 0.15
"""Standard deviation of a sibling's perturbation of each continuous gene."""


@dataclass(frozen=True, eq=False)
class Identity:
    """One synthetic person: global ``id``, genes ``params`` (float32 in [0, 1]) and kinship.

    ``sibling_of`` is the id of the identity this one was perturbed from, or ``None``.
    """

    id: int
    params: np.ndarray
    sibling_of: int | None = None

    def __post_init__(self) -> None:
        params = np.array(self.params, dtype=np.float32)
        if params.shape != (len(PARAM_NAMES),):
            raise ValueError(f"params must have shape ({len(PARAM_NAMES)},), got {params.shape}")
        params.setflags(write=False)
        object.__setattr__(self, "params", params)

    def param(self, name: str) -> float:
        """The gene called ``name`` (one of ``PARAM_NAMES``)."""
        if name not in PARAM_INDEX:
            raise KeyError(f"unknown identity parameter {name!r}; valid: {', '.join(PARAM_NAMES)}")
        return float(self.params[PARAM_INDEX[name]])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return (
            self.id == other.id
            and self.sibling_of == other.sibling_of
            and np.array_equal(self.params, other.params)
        )

    def __hash__(self) -> int:
        return hash((self.id, self.sibling_of, self.params.tobytes()))


def _draws(seed: int, identity: int, sibling_rate: float) -> tuple[np.ndarray, bool, np.ndarray]:
    """Own genes, the sibling coin and the sibling perturbation of one id."""
    rng = np.random.default_rng([seed, identity])
    genes = rng.random(len(PARAM_NAMES))
    coin = bool(rng.random() < sibling_rate)
    noise = rng.standard_normal(len(PARAM_NAMES))
    return genes, coin, noise


def _perturb(genes: np.ndarray, own: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A sibling's genes: ``genes`` moved by ``SIBLING_SIGMA * noise``, reflected into [0, 1]."""
    out = genes + SIBLING_SIGMA * noise
    out = np.abs(out)
    out = 1.0 - np.abs(1.0 - out)
    for name in _INHERITED:
        out[PARAM_INDEX[name]] = genes[PARAM_INDEX[name]]
    for name in _FRESH:
        out[PARAM_INDEX[name]] = own[PARAM_INDEX[name]]
    return out


def make_identities(seed: int, start: int, count: int, sibling_rate: float = 0.1) -> list[Identity]:
    """Identities ``start .. start + count - 1`` of benchmark ``seed``.

    Each id ``i`` has its own genes and a sibling coin (true with probability ``sibling_rate``)
    from ``default_rng([seed, i])``. If the coin is true and ``i > start``, identity ``i`` is a
    sibling of ``i - 1``: the genes of ``i - 1`` plus a small perturbation (categorical genes such
    as hair style are shared; the texture seed is its own). Chains of siblings follow the rule
    recursively, and never reach across ``start``: with the same ``start``, a longer range extends
    a shorter one, and a non-sibling identity is the same in every range that contains it.
    """
    count, start = check_int("count", count, 0), check_int("start", start, 0)
    sibling_rate = check_real("sibling_rate", sibling_rate, 0, 1)
    out: list[Identity] = []
    genes = np.zeros(len(PARAM_NAMES))
    for i in range(start, start + count):
        own, coin, noise = _draws(seed, i, sibling_rate)
        sibling = coin and i > start
        genes = _perturb(genes, own, noise) if sibling else own
        out.append(Identity(i, genes.astype(np.float32), i - 1 if sibling else None))
    return out
