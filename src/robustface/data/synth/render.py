"""SynthFace renderer: a procedural 3D face drawn under pose, expression, light and degradation.

Coordinates. A face is built in "model units" (pixels of a frontal 112 px crop) with the origin at
the head centre, ``x`` to image right, ``y`` down and ``z`` towards the camera. The head is a stack
of horizontal elliptic rings (cranium, cheeks, jaw, chin); eyes, brows, mouth, moles and wrinkles
lie on that surface, the nose and ears stick out of it. A pose rotates the model about a pivot
behind the face (yaw > 0 turns the nose towards image right, pitch > 0 tilts the face up, roll > 0
turns it clockwise), a weak-perspective camera projects it, and an identity-specific similarity
puts the 5 landmarks of the neutral frontal face onto the ArcFace 112x112 template. Polygons are
drawn back to front with back-face culling, a Lambert map of the head ellipsoid (with soft eye
sockets and cheeks) lights the image, and blur, low resolution and sensor noise degrade it. JPEG
compression is left to the caller (``nuisance.jpeg_quality``).

Every image is a pure function of (identity, nuisance, size): no global random state is used.
"""

from __future__ import annotations

import functools
import math
import random
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from robustface.data.image import ARCFACE_TEMPLATE
from robustface.data.synth.identity import PARAM_INDEX, Identity
from robustface.utils.guards import check_choice, check_int, check_real

PROFILES = ("train", "frontal", "profile", "low_quality", "clean")
OCCLUSIONS = ("none", "glasses", "sunglasses", "mask", "bar", "hand")
SKETCH_STYLES = ("pencil", "cartoon", "lines")
HAIR_STYLES = ("bald", "buzz", "short", "fringe", "side_part", "long", "curly")
FACIAL_HAIR = ("none", "stubble", "moustache", "goatee", "beard")

_SHIFT = 4  # sub-pixel bits of every cv2 drawing call
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA
_L8 = cv2.LINE_8  # for small or low-contrast polygons, where anti-aliasing does not show
_CENTRE = ARCFACE_TEMPLATE.astype(np.float64).mean(axis=0)  # scale centre of the aligned crop
_PIVOT_DEPTH = 0.75  # pose pivot depth, as a fraction of the mean landmark depth
_SHADE_CELLS = 16  # resolution of the lighting map before it is resized to the image

# Ring heights (fraction of the head half-height) of the head surface, top to chin.
_RING_T = np.array([-1.0, -0.85, -0.6, -0.3, 0.0, 0.2, 0.45, 0.58, 0.7, 0.8, 0.88, 0.95, 1.0])
_CROWN = np.sqrt(1.0 - _RING_T[:5] ** 2)
_RING_PHI = np.linspace(-np.pi, np.pi, 16, endpoint=False)
_RING_STEPS = 200  # ring lookup table: 200 steps per head half-height
_RING_TABLE_T = np.arange(-_RING_STEPS, int(1.3 * _RING_STEPS) + 1) / _RING_STEPS

_SKIN = np.array(
    [[246, 218, 200], [234, 194, 166], [214, 168, 134], [188, 136, 100], [150, 100, 70],
     [112, 74, 52], [78, 52, 40]],
    dtype=np.float64,
)  # fmt: skip
# black, dark brown, brown, light brown, blond, auburn, grey, white
_HAIR = np.array(
    [[28, 24, 24], [58, 40, 30], [98, 66, 42], [140, 104, 68], [196, 164, 112], [150, 72, 38],
     [135, 132, 128], [212, 210, 204]],
    dtype=np.float64,
)  # fmt: skip
_HAIR_P = np.cumsum([0.3, 0.25, 0.14, 0.08, 0.08, 0.05, 0.07, 0.03])
_IRIS = np.array(
    [[70, 44, 28], [40, 28, 22], [110, 82, 44], [78, 108, 64], [74, 112, 158], [112, 122, 132]],
    dtype=np.float64,
)  # brown, dark, hazel, green, blue, grey
_IRIS_P = np.cumsum([0.38, 0.2, 0.12, 0.1, 0.13, 0.07])
_STYLE_P = np.cumsum([0.07, 0.11, 0.22, 0.13, 0.16, 0.19, 0.12])
_BEARD_P = np.cumsum([0.58, 0.14, 0.08, 0.08, 0.12])

# Normalised ear outline (w: back from the attachment, h: up) and its inner helix line.
_EAR = np.array(
    [[0.0, 0.5], [0.35, 0.62], [0.75, 0.52], [0.97, 0.2], [0.92, -0.15], [0.72, -0.42],
     [0.45, -0.62], [0.22, -0.55], [0.08, -0.3], [0.0, 0.0]]
)  # fmt: skip
_EAR_INNER = np.array([[0.22, 0.3], [0.55, 0.4], [0.74, 0.12], [0.62, -0.2], [0.4, -0.32]])

_LID_X = np.linspace(-1.0, 1.0, 7)  # inner to outer eye corner
_MOUTH_X = np.linspace(-1.0, 1.0, 9)  # left to right mouth corner
_BROW_T = np.linspace(0.0, 1.0, 7)  # inner to outer end of a brow
_C10 = np.linspace(0.0, 2.0 * np.pi, 10, endpoint=False)
_C8 = np.linspace(0.0, 2.0 * np.pi, 8, endpoint=False)
_HEX = np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], axis=1)
_SCLERA = (226.0, 220.0, 212.0)
_PUPIL = (14.0, 12.0, 12.0)
_LASH = (30.0, 22.0, 20.0)
_MOUTH_IN = (60.0, 20.0, 24.0)
_TEETH = (226.0, 220.0, 205.0)
_NOSE_ALBEDO = (0.93, 0.93, 1.0, 0.85)  # left side, right side, bridge and tip, underside
_NOSE_FACES = tuple(
    np.array(f) for f in ((8, 0, 2, 4, 5), (1, 9, 6, 4, 3), (0, 1, 3, 4, 2), (5, 4, 6, 7))
)
# Rows of _Model.normals: eyes (2), head sides -x/+x (2), nose faces (4), face below the nose,
# shading blobs (6), moles.
_N_SIDES, _N_NOSE, _N_FACE, _N_BLOBS, _N_MOLES = 2, 4, 8, 9, 15
# Soft shading blobs: eye sockets, under the nose, under the lower lip, cheekbones.
_BLOB_GAIN = np.array([-0.16, -0.16, -0.14, -0.1, 0.07, 0.07])
_BLOB_SIGMA = np.array([6.5, 6.5, 4.0, 4.5, 8.0, 8.0])
_RAMP = np.arange(256) / 255.0
_LEVELS_U8 = np.arange(256, dtype=np.uint8)
_CURL_THETA = np.linspace(-np.pi, np.pi, 72, endpoint=False)
# Identity-independent parts of the model, computed once (the model building used to recompute
# them for each identity, with the same operations).
_MOUTH_XS2 = _MOUTH_X**2
_MOUTH_BOW = np.sqrt(1.0 - _MOUTH_XS2) * (1.0 - 0.3 * np.exp(-((_MOUTH_X / 0.2) ** 2)))
_MOUTH_GAP = (1.0 - _MOUTH_XS2) ** 0.8  # mouth opening profile
_MOUTH_LOWER = (1.0 - _MOUTH_XS2) ** 0.6  # lower lip profile
_MOUTH_OUT = 1.8 * (1.0 - _MOUTH_XS2)  # lips' and teeth's height above the head surface
_MOUTH_OUT_ALL = np.concatenate([_MOUTH_OUT] * 4 + [_MOUTH_OUT[1:-1] - 0.5])
_BROW_RAISE = -3.0 * (1.0 - 0.4 * np.tile(np.concatenate([_BROW_T, _BROW_T[::-1]]), 2))
_HAIRLINE_PHI = np.linspace(-1.35, 1.35, 11)
_HAIRLINE_BEND = (np.abs(_HAIRLINE_PHI) / 1.35) ** 2.5
_SIDE_Y = np.tile(np.array([-10.0, 6.0, 20.0]), 2)
_SIDE_PHI = {side_phi: np.repeat([-side_phi, side_phi], 3) for side_phi in (1.2, 1.75)}
_ALA_T = np.linspace(-1.2, 1.4, 5)
_FRINGE_X = np.linspace(-1.0, 1.0, 11)
_PART_K = np.linspace(0.0, 1.0, 8)
_STRAND_PHI = np.linspace(-1.1, 1.1, 6)
_NECK_PHI = np.linspace(0.0, 2.0 * np.pi, 6, endpoint=False)
_NECK_SIN, _NECK_COS = np.sin(_NECK_PHI), np.cos(_NECK_PHI)
_MASK_X = np.linspace(-0.96, 0.96, 9)


def _lerp(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


def _pick(cump: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(cump, u * cump[-1], side="right")), len(cump) - 1)


def _unit(v: np.ndarray) -> np.ndarray:
    # np.linalg.norm(v, axis=-1, keepdims=True) computes this sum the same way, with more overhead
    return v / np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))


def _homogeneous(p: np.ndarray) -> np.ndarray:
    """``p`` (..., 3) with a fourth coordinate 1, so that one matrix product also translates."""
    out = np.empty((*p.shape[:-1], 4))
    out[..., :3] = p
    out[..., 3] = 1.0
    return out


def _broadcast_shape(a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    """The shape of ``a`` and ``b`` broadcast together (usually their common shape)."""
    return a.shape if a.shape == b.shape else np.broadcast_shapes(a.shape, b.shape)


def _tup(c: np.ndarray) -> tuple[float, float, float]:
    """An RGB colour as the tuple of floats in [0, 255] that cv2 drawing calls take."""
    r, g, b = c.tolist()
    return (min(255.0, max(0.0, r)), min(255.0, max(0.0, g)), min(255.0, max(0.0, b)))


# --------------------------------------------------------------------------------------------------
# Nuisance
# --------------------------------------------------------------------------------------------------


@dataclass
class Nuisance:
    """Everything about one sample that is not identity. Angles in radians, pixels at 112 px.

    ``light_azimuth`` > 0 lights from image right, ``light_elevation`` > 0 from above; the light
    adds ``light_strength * max(0, n . l)`` to ``ambient``. ``color_gains`` multiply R, G, B;
    ``brightness`` (fraction of 255), ``contrast`` and ``gamma`` act after lighting. ``blur_sigma``
    and ``noise_sigma`` are in pixels and grey levels; ``lowres_factor`` > 1 keeps only the detail
    of a ``size / lowres_factor`` image. ``occlusion`` is one of ``OCCLUSIONS`` and
    ``occlusion_params`` four numbers in [0, 1] (placement, size, angle/style, colour).
    ``seed`` drives the per-sample sensor noise and background clutter.
    """

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    smile: float = 0.0
    mouth_open: float = 0.0
    eye_closure: float = 0.0
    brow_raise: float = 0.0
    light_azimuth: float = 0.0
    light_elevation: float = 0.3
    light_strength: float = 0.35
    ambient: float = 0.75
    color_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    lowres_factor: float = 1.0
    occlusion: str = "none"
    occlusion_params: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.5)
    jpeg_quality: int = 95
    seed: int = 0


_OCC_PROBS = {  # occlusion kind probabilities per profile (before difficulty)
    "train": (0.07, 0.04, 0.05, 0.03, 0.03),
    "frontal": (0.06, 0.0, 0.0, 0.0, 0.0),
    "profile": (0.06, 0.0, 0.0, 0.0, 0.0),
    "low_quality": (0.1, 0.12, 0.15, 0.1, 0.1),
}


def sample_nuisance(
    rng: np.random.Generator, profile: str = "train", difficulty: float = 1.0
) -> Nuisance:
    """Draw the nuisance of one sample from ``profile`` (one of ``PROFILES``).

    ``train`` is a broad mixture (mostly moderate; some large poses, blur, low resolution and
    occlusion), ``frontal`` is mild and LFW-like (|yaw| < 20 deg), ``profile`` has |yaw| in
    60..85 deg on either side, ``low_quality`` has heavy blur, noise, low resolution, occlusion and
    strong light, ``clean`` is frontal, neutral and undegraded. ``difficulty`` (>= 0) scales every
    magnitude (pose, expression, light, colour cast, blur, noise, resolution loss, JPEG loss and
    occlusion rate); ``profile``'s own yaw range and the ``clean`` profile are not scaled.
    """
    check_choice("profile", profile, PROFILES)
    difficulty = check_real("difficulty", difficulty, 0)
    u = rng.random(26).tolist()
    z = rng.standard_normal(12).tolist()
    occ = tuple(rng.random(4).tolist())
    seed = int(rng.integers(1 << 31))
    if profile == "clean":
        return Nuisance(occlusion_params=occ, seed=seed)
    d = difficulty
    deg = math.pi / 180.0
    if profile == "train":
        if u[0] < 0.68:
            yaw = max(-40.0, min(40.0, 15.0 * z[0]))
        elif u[0] < 0.9:
            yaw = math.copysign(20.0 + 40.0 * u[1], z[0])
        else:
            yaw = math.copysign(55.0 + 30.0 * u[1], z[0])
        pitch, roll = 9.0 * z[1], 5.0 * z[2]
    elif profile == "profile":
        yaw = math.copysign(60.0 + 25.0 * u[1], z[0])  # near-profile, as CFP-FP's profiles
        pitch, roll = 5.0 * z[1], 3.0 * z[2]
    elif profile == "frontal":
        yaw, pitch, roll = 7.0 * z[0], 5.0 * z[1], 3.0 * z[2]
        yaw = max(-18.0, min(18.0, yaw))
    else:  # low_quality
        yaw, pitch, roll = 22.0 * z[0], 12.0 * z[1], 7.0 * z[2]
    yaw = max(-85.0, min(85.0, yaw if profile == "profile" else yaw * d))
    pitch = max(-40.0, min(40.0, pitch * d))
    roll = max(-30.0, min(30.0, roll * d))
    scale = math.exp(0.05 * d * z[3])
    shift = (1.5 * d * z[4], 1.5 * d * z[5])
    smile = u[2] * d if u[3] < 0.45 else 0.0
    mouth_open = u[4] * d if u[5] < 0.2 else 0.0
    eye_closure = (0.5 + 0.5 * u[6] if u[7] < 0.08 else 0.15 * u[6]) * d
    brow_raise = u[8] * d if u[9] < 0.2 else 0.0
    hard_light = profile == "low_quality" or (profile == "train" and u[10] < 0.15)
    azimuth = (u[11] * 2.0 - 1.0) * (1.4 if hard_light else 0.9)
    elevation = 0.1 + 0.6 * u[12]
    if hard_light:
        strength, ambient = 0.7 + 0.3 * u[13], 0.15 + 0.25 * u[14]
    else:
        strength, ambient = 0.2 + 0.35 * u[13], 0.55 + 0.3 * u[14]
    strength, ambient = 0.35 + (strength - 0.35) * d, 0.75 + (ambient - 0.75) * d
    cast = (0.15 if hard_light else (0.08 if profile == "train" else 0.05)) * d
    gains = (math.exp(cast * z[6]), math.exp(cast * z[7]), math.exp(cast * z[8]))
    exposed = u[25] < 0.5  # brightness and contrast change in half the samples
    brightness = 0.07 * d * z[9] if exposed else 0.0
    contrast = math.exp(0.15 * d * z[10]) if exposed else 1.0
    gamma = math.exp(0.25 * d * z[11]) if u[24] < 0.3 else 1.0
    lq = profile == "low_quality"
    if lq:
        blur = 1.2 + 2.0 * u[15]
        noise = 6.0 + 12.0 * u[16]
        lowres = 2.5 + 3.0 * u[17]
        jpeg = 15.0 + 30.0 * u[18]
    elif profile == "train":
        blur = 0.4 + 1.1 * u[15] if u[19] < 0.3 else (1.5 + 1.5 * u[15] if u[19] < 0.4 else 0.0)
        noise = 1.0 + 6.0 * u[16] if u[20] < 0.4 else (7.0 + 10.0 * u[16] if u[20] < 0.5 else 0.0)
        lowres = 1.5 + 1.5 * u[17] if u[21] < 0.12 else (3.0 + 2.5 * u[17] if u[21] < 0.17 else 1.0)
        jpeg = 40.0 + 55.0 * u[18] if u[22] < 0.9 else 15.0 + 25.0 * u[18]
    else:
        blur = 0.3 + 0.7 * u[15] if u[19] < 0.25 else 0.0
        noise = 1.0 + 3.0 * u[16] if u[20] < 0.3 else 0.0
        lowres = 1.0
        jpeg = 70.0 + 25.0 * u[18]
    probs = np.array(_OCC_PROBS[profile]) * d
    cum = np.cumsum(probs).tolist()
    occlusion = "none"
    for kind, c in zip(OCCLUSIONS[1:], cum, strict=True):
        if u[23] < c:
            occlusion = kind
            break
    return Nuisance(
        yaw=yaw * deg,
        pitch=pitch * deg,
        roll=roll * deg,
        scale=scale,
        shift=shift,
        smile=min(smile, 1.0),
        mouth_open=min(mouth_open, 1.0),
        eye_closure=min(eye_closure, 1.0),
        brow_raise=min(brow_raise, 1.0),
        light_azimuth=azimuth,
        light_elevation=elevation,
        light_strength=max(0.0, strength),
        ambient=min(1.0, max(0.05, ambient)),
        color_gains=gains,
        brightness=brightness,
        contrast=contrast,
        gamma=gamma,
        blur_sigma=blur * d,
        noise_sigma=noise * d,
        lowres_factor=1.0 + (lowres - 1.0) * d,
        occlusion=occlusion,
        occlusion_params=occ,
        jpeg_quality=round(min(100.0, max(5.0, 100.0 - (100.0 - jpeg) * d))),
        seed=seed,
    )


_OCC_QUALITY = {
    "none": 1.0,
    "glasses": 0.92,
    "sunglasses": 0.6,
    "mask": 0.55,
    "bar": 0.7,
    "hand": 0.7,
}


def quality_score(n: Nuisance) -> float:
    """Ground-truth quality in [0, 1] (1 = clean): a product of per-nuisance factors.

    ``exp(-(yaw/1.0)^2 - (pitch/0.6)^2 - (roll/1.2)^2)`` (radians) for pose,
    ``1/(1 + (blur/1.5)^2)``, ``1/(1 + (noise/12)^2)``, ``1/(1 + ((lowres - 1)/2)^2)``,
    an occlusion factor (glasses 0.92, sunglasses 0.6, mask 0.55, bar 0.7, hand 0.7),
    ``exp(-(side/0.6)^2 - (exposure/0.8)^2)`` for light (``side = |sin az| * strength /
    (ambient + strength)``, ``exposure`` = summed |log| of contrast, gamma and the colour gains
    plus 2 |brightness|), ``clip((jpeg - 10)/50, 0.2, 1)`` for compression and
    ``1 - 0.15 eye_closure - 0.1 mouth_open`` for expression.
    """
    pose = math.exp(-((n.yaw / 1.0) ** 2) - (n.pitch / 0.6) ** 2 - (n.roll / 1.2) ** 2)
    blur = 1.0 / (1.0 + (n.blur_sigma / 1.5) ** 2)
    noise = 1.0 / (1.0 + (n.noise_sigma / 12.0) ** 2)
    lowres = 1.0 / (1.0 + ((max(n.lowres_factor, 1.0) - 1.0) / 2.0) ** 2)
    side = abs(math.sin(n.light_azimuth)) * n.light_strength / (n.ambient + n.light_strength)
    gr, gg, gb = n.color_gains
    exposure = abs(math.log(n.contrast)) + abs(math.log(n.gamma)) + 2.0 * abs(n.brightness)
    exposure += abs(math.log(gr)) + abs(math.log(gg)) + abs(math.log(gb))
    light = math.exp(-((side / 0.6) ** 2) - (exposure / 0.8) ** 2)
    jpeg = min(1.0, max(0.2, (n.jpeg_quality - 10.0) / 50.0))
    expression = 1.0 - 0.15 * n.eye_closure - 0.1 * n.mouth_open
    q = pose * blur * noise * lowres * _OCC_QUALITY[n.occlusion] * light * jpeg * expression
    return float(min(1.0, max(0.0, q)))


# --------------------------------------------------------------------------------------------------
# Identity -> 3D model
# --------------------------------------------------------------------------------------------------


class _Model:
    """One identity's geometry and colours, built once and cached.

    ``static`` holds every expression-independent 3D point; attributes named ``s_*`` are slices
    into it. Brows and mouth are ``dyn0`` plus smile / open / raise bases, eyes are rebuilt per
    sample from lid heights; all points are homogeneous (a fourth coordinate 1, 0 in the bases).
    ``normals`` feed back-face culling and the nose shading; their rows are laid out as the
    ``_N_*`` constants say.
    """


class _HeadShape:
    """The head's proportions and its surface: a stack of horizontal elliptic rings.

    ``half_width``, ``half_height`` and ``depth`` are the head's radii (``_Model.a``, ``b`` and the
    depth scale), ``eye_y``, ``nose_length`` and ``mouth_y`` place the features; ``jaw`` is the
    jaw width as a fraction of ``half_width``.
    """

    def __init__(self, genes: dict[str, float]) -> None:
        half_width = _lerp(37.0, 47.0, genes["head_width"])
        depth = _lerp(46.0, 55.0, genes["head_depth"])
        eye_y = _lerp(-3.0, 4.0, genes["eye_height"])
        nose_length = _lerp(16.0, 24.0, genes["nose_length"])
        mouth_y = eye_y + nose_length + _lerp(14.0, 21.0, genes["mouth_height"])
        half_height = max(_lerp(54.0, 66.0, genes["head_height"]), mouth_y + 13.0)
        cheek = _lerp(0.86, 1.02, genes["cheek_width"])
        jaw = _lerp(0.6, 0.93, genes["jaw_width"])
        chin = _lerp(0.15, 0.48, genes["chin_width"])
        chin_protrusion = _lerp(-0.06, 0.08, genes["chin_protrusion"])
        # width, front depth and back depth of the rings at _RING_T, as fractions of the
        # half-width, depth and depth
        jaw_mid = 0.5 * (cheek + jaw) + 0.03
        low = [
            cheek,
            jaw_mid,
            0.5 * (jaw_mid + jaw),
            jaw,
            0.5 * (jaw + chin) + 0.04,
            0.45 * jaw + 0.55 * chin,
        ]
        width_profile = np.concatenate([_CROWN, low, [0.2 * jaw + 0.8 * chin, chin]])
        front_profile = np.concatenate(
            [
                _CROWN * 0.93,
                [0.93, 0.9, 0.88, 0.86, 0.83],
                np.array([0.8, 0.76, 0.7]) + chin_protrusion,
            ]
        )
        back_profile = np.concatenate(
            [_CROWN * 1.05, [0.9, 0.55, 0.4, 0.25, 0.0, -0.25, -0.38, -0.45]]
        )
        # half-width, depth centre and half-depth of the ring at each height of _RING_TABLE_T
        front = depth * np.interp(_RING_TABLE_T, _RING_T, front_profile)
        back = depth * np.interp(_RING_TABLE_T, _RING_T, back_profile)
        half_widths = half_width * np.interp(_RING_TABLE_T, _RING_T, width_profile)
        self._table = np.stack([half_widths, 0.5 * (front - back), 0.5 * (front + back)], 1)
        self._inv_half_height = 1.0 / half_height
        self.half_width, self.half_height, self.depth = half_width, half_height, depth
        self.eye_y, self.nose_length, self.mouth_y, self.jaw = eye_y, nose_length, mouth_y, jaw

    def ring(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Half-width, depth centre and half-depth of the head's horizontal ring at height ``y``."""
        row = np.rint((np.asarray(y) * self._inv_half_height + 1.0) * _RING_STEPS)
        ring = self._table.take(row.astype(np.intp), axis=0, mode="clip")  # clip: nearest row
        return ring[..., 0], ring[..., 1], ring[..., 2]

    def front(self, x: np.ndarray, y: np.ndarray, out: float | np.ndarray = 0.0) -> np.ndarray:
        """Points on the front of the head at (x, y), pushed ``out`` towards the camera."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        half_width, centre, half_depth = self.ring(y)  # elementwise: broadcast below
        across = np.minimum(np.abs(x) / np.maximum(half_width, 1e-3), 1.0)
        points = np.empty((*_broadcast_shape(x, y), 3))
        points[..., 0], points[..., 1] = x, y
        points[..., 2] = centre + half_depth * np.sqrt(1.0 - across * across) + out
        return points

    def around(self, phi: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Points of the rings at heights ``y`` and angles ``phi`` (0 = front), scaled."""
        phi, y = np.asarray(phi, np.float64), np.asarray(y, np.float64)
        half_width, centre, half_depth = self.ring(y)  # elementwise: broadcast below
        points = np.empty((*_broadcast_shape(phi, y), 3))
        points[..., 0], points[..., 1], points[..., 2] = (
            half_width * np.sin(phi) * scale,
            y,
            (centre + half_depth * np.cos(phi)) * scale,
        )
        return points

    def normal(self, points: np.ndarray) -> np.ndarray:
        """Approximate outward unit normals of the head surface at ``points``."""
        half_width, centre, half_depth = self.ring(points[..., 1])
        n = [
            points[..., 0] / np.maximum(half_width, 1e-3) ** 2,
            0.6 * points[..., 1] / self.half_height**2,
            (points[..., 2] - centre) / half_depth**2,
        ]
        return _unit(np.stack(n, axis=-1))


class _PointStack:
    """The model's static points, added part by part; each part gets its slice of the rows."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._count = 0

    def add(self, points: np.ndarray) -> slice:
        points = np.asarray(points, np.float64).reshape(-1, 3)
        self._parts.append(points)
        self._count += len(points)
        return slice(self._count - len(points), self._count)

    def homogeneous(self) -> np.ndarray:
        return _homogeneous(np.concatenate(self._parts))


class _Hair(typing.NamedTuple):
    style: str  # one of HAIR_STYLES
    volume: float  # scale of the hair-covered crown rings
    hairline_y: float


class _Nose(typing.NamedTuple):
    points: np.ndarray  # root l/r, mid l/r, tip, ala l/r, subnasale, junction with the cheek l/r
    normals: list[np.ndarray]  # one per _NOSE_FACES
    width: float
    tip_y: float


class _Eyes(typing.NamedTuple):
    centres: np.ndarray  # (2, 3), image-left eye first
    normals: np.ndarray  # (2, 3)
    spacing: float
    width: float


@dataclass(frozen=True)
class _MouthShape:
    width: float
    upper_lip: float
    lower_lip: float
    curvature: float

    def points(self, head: _HeadShape, smile: float, opened: float) -> np.ndarray:
        """Rows top lip (9), lip line (9), lower lip line (9), bottom lip (9), teeth (7)."""
        x = _MOUTH_X * self.width / 2 * (1.0 + 0.12 * smile)
        line = head.mouth_y - smile * 1.0 - (self.curvature + 3.5 * smile) * _MOUTH_XS2
        top = line - self.upper_lip * (1.0 - 0.3 * smile) * _MOUTH_BOW
        gap = opened * 9.0 * _MOUTH_GAP
        bottom = line + gap + self.lower_lip * (1.0 - 0.2 * smile) * _MOUTH_LOWER
        teeth = line[1:-1] + np.minimum(gap[1:-1], 2.5 + 0.5 * self.upper_lip)
        xx = np.concatenate([x, x, x, x, x[1:-1]])
        yy = np.concatenate([top, line, line + gap, bottom, teeth])
        return head.front(xx, yy, _MOUTH_OUT_ALL)


def _set_colours(m: _Model, genes: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Set the skin, hair, lip, brow, iris... colours; returns the skin and hair RGB."""
    tone = genes["skin_tone"] * (len(_SKIN) - 1)
    i0 = min(int(tone), len(_SKIN) - 2)
    skin = _SKIN[i0] + (_SKIN[i0 + 1] - _SKIN[i0]) * (tone - i0)
    skin = skin + (genes["skin_hue"] - 0.5) * np.array([14.0, 0.0, -14.0])
    hair = np.clip(
        _HAIR[_pick(_HAIR_P, genes["hair_colour"])] * _lerp(0.8, 1.2, genes["hair_shade"]), 10, 235
    )
    brow = hair + (np.array([35.0, 28.0, 24.0]) - hair) * _lerp(0.2, 0.85, genes["brow_darkness"])
    iris_kind = _pick(_IRIS_P, genes["iris_colour"])
    if iris_kind >= 3 and genes["skin_tone"] > 0.45 and (genes["iris_colour"] * 7.0) % 1.0 > 0.25:
        iris_kind = 0  # light irises are rare with dark skin
    lip_shade = _lerp(0.82, 1.0, genes["lip_colour"])
    lip = skin * np.array([0.93, 0.66, 0.66]) * lip_shade + np.array([18.0, 4.0, 8.0])
    m.c_skin, m.c_hair, m.c_lip = _tup(skin), _tup(hair), _tup(lip * 0.93)
    m.c_brow = _tup(skin + (brow - skin) * _lerp(0.7, 0.95, genes["brow_thickness"]))
    m.c_iris = _tup(_IRIS[iris_kind] * _lerp(0.75, 1.2, genes["iris_shade"]))
    m.c_crease, m.c_mouth_line = _tup(skin * 0.72), _tup(lip * 0.55)
    m.c_ear, m.c_ear_in = _tup(skin * [0.96, 0.88, 0.86]), _tup(skin * [0.72, 0.66, 0.64])
    m.c_nostril, m.c_alae, m.c_neck = _tup(skin * 0.35), _tup(skin * 0.72), _tup(skin * 0.8)
    m.c_back = _tup(hair * 0.85)
    m.c_strand = _tup(hair + 30.0 if hair.mean() < 70 else hair * 0.72)
    return skin, hair


def _add_head_and_skin(
    m: _Model,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
    skin: np.ndarray,
    hair: np.ndarray,
) -> _Hair:
    """The head silhouette (hair-covered crown swollen by the hair volume) and the outline of
    the skin region below the hairline."""
    style = HAIR_STYLES[_pick(_STYLE_P, genes["hair_style"])]
    m.style = style
    outline = head.around(_RING_PHI[None, :], head.half_height * _RING_T[1:, None])
    volume = 1.0 if style in ("bald", "buzz") else _lerp(1.03, 1.1, genes["hair_volume"])
    volume += 0.08 if style == "curly" else 0.0
    if style != "bald":
        outline[:5] *= volume
        outline[:5, :, 1] -= (volume - 1.0) * 6.0
        nape = head.around(
            _RING_PHI[[0, 1, 2, 14, 15]], np.full(5, 0.45 * head.half_height), volume
        )
        outline = np.concatenate([outline.reshape(-1, 3), nape])
    m.s_head = points.add(outline)
    cap = skin if style == "bald" else (0.45 * skin + 0.55 * hair if style == "buzz" else hair)
    m.c_cap = _tup(cap)

    eye_y = head.eye_y
    hairline_y = eye_y - _lerp(30.0, 42.0, genes["hairline"])
    m.s_skin = None
    if style != "bald":
        hairline = head.around(
            _HAIRLINE_PHI, hairline_y + (eye_y - 12.0 - hairline_y) * _HAIRLINE_BEND
        )
        side = head.around(_SIDE_PHI[1.2 if style == "long" else 1.75], eye_y + _SIDE_Y)
        phi = _RING_PHI[::2] if style != "long" else _RING_PHI[np.abs(_RING_PHI) <= 1.3]
        lower = head.around(phi[None, :], head.half_height * _RING_T[6:, None])
        m.s_skin = points.add(np.concatenate([hairline, side, lower.reshape(-1, 3)]))
    return _Hair(style, volume, hairline_y)


def _add_ears(
    m: _Model, genes: dict[str, float], head: _HeadShape, points: _PointStack, style: str
) -> None:
    """Outer and inner outline of both ears (hidden under long hair)."""
    height = 27.0 * _lerp(0.85, 1.2, genes["ear_size"])
    flare = _lerp(0.35, 0.85, genes["ear_flare"])
    ear_y = head.eye_y + _lerp(5.0, 10.0, genes["ear_height"])
    ring_half_width, ring_centre, _ = head.ring(ear_y)
    m.s_ears, m.s_ears_in = [], []
    for side in (-1.0, 1.0):
        base = np.array(
            [side * float(ring_half_width) * 0.95, ear_y, float(ring_centre) - 0.06 * head.depth]
        )
        e_out = np.array([side * math.sin(flare), 0.0, -math.cos(flare)]) * (0.55 * height)
        e_up = np.array([0.0, -height, 0.0])
        m.s_ears.append(points.add(base + _EAR[:, :1] * e_out + _EAR[:, 1:] * e_up))
        m.s_ears_in.append(points.add(base + _EAR_INNER[:, :1] * e_out + _EAR_INNER[:, 1:] * e_up))
    m.show_ears = style != "long"


def _add_nose(m: _Model, genes: dict[str, float], head: _HeadShape, points: _PointStack) -> _Nose:
    """The nose solid (10 points, 4 shaded faces), its nostrils and alae."""
    width = _lerp(14.0, 22.0, genes["nose_width"])
    protrusion = _lerp(8.0, 16.0, genes["nose_protrusion"])
    tip = _lerp(-1.5, 2.5, genes["nose_tip"])
    bridge = _lerp(3.0, 6.5, genes["nose_bridge"])
    eye_y, length = head.eye_y, head.nose_length
    tip_y = eye_y + length

    # root l/r, mid l/r, tip, ala l/r, subnasale, junction with the cheek l/r
    nose = head.front(
        np.array(
            [-bridge / 2, bridge / 2, -bridge * 0.4, bridge * 0.4, 0.0,
             -width / 2, width / 2, 0.0, -width * 0.3, width * 0.3]
        ),
        np.array(
            [eye_y + 1, eye_y + 1, eye_y + length * 0.6, eye_y + length * 0.6, tip_y,
             tip_y, tip_y, tip_y + 3, eye_y + 8, eye_y + 8]
        ),
        np.array(
            [1.0, 1.0, 0.55 * protrusion, 0.55 * protrusion, protrusion,
             0.2 * protrusion, 0.2 * protrusion, 0.35 * protrusion, 0, 0]
        ),
    )  # fmt: skip
    nose[4, 1] -= tip * 0.3
    nose[[5, 6], 1] += 1.5
    nose[7, 1] -= tip * 0.4
    m.s_nose = points.add(nose)
    centroid = nose[[0, 1, 4, 5, 6, 7]].sum(axis=0) / 6.0 - np.array([0.0, 0.0, 3.0])
    normals = []
    for face in _NOSE_FACES:
        p = nose[face]
        (ux, uy, uz), (vx, vy, vz) = (p[1] - p[0]).tolist(), (p[-1] - p[0]).tolist()
        n = np.array([uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx])
        n /= math.sqrt(float(n @ n))
        normals.append(n if np.dot(n, p.sum(axis=0) / len(p) - centroid) > 0 else -n)
    down = _unit(nose[7] - nose[4])
    m.s_nostrils, m.s_alae = [], []
    ala_t = _ALA_T
    for side in (-1.0, 1.0):
        centre = np.array([side * width * 0.2, tip_y + 2.2, 0.5 * (nose[4, 2] + nose[5, 2]) - 1.0])
        nostril = (
            centre
            + np.outer(np.cos(_C8) * width * 0.11, [1.0, 0.0, 0.0])
            + np.outer(np.sin(_C8) * 1.3, down)
        )
        m.s_nostrils.append(points.add(nostril))
        ala_x = side * (width / 2 - 2.8 + 1.6 * np.cos(ala_t))
        ala_y = tip_y + 1.0 + 2.6 * np.sin(ala_t)
        m.s_alae.append(points.add(np.stack([ala_x, ala_y, np.full(5, nose[5, 2] + 0.8)], axis=-1)))
    return _Nose(nose, normals, width, tip_y)


def _add_eyes(m: _Model, genes: dict[str, float], head: _HeadShape, points: _PointStack) -> _Eyes:
    """Eye centres, the lid, iris, pupil and crease outlines in eye-local coordinates, and the
    glasses' lenses."""
    spacing = _lerp(30.0, 40.0, genes["eye_spacing"])
    width = _lerp(12.5, 18.0, genes["eye_width"])
    opening = _lerp(0.28, 0.46, genes["eye_opening"])
    m.h_up, m.h_lo = width * opening * 0.62, width * opening * 0.38
    shape = _lerp(0.45, 0.95, genes["eye_shape"])
    tilt = math.tan(_lerp(-0.12, 0.18, genes["eye_tilt"]))
    iris_radius = width * _lerp(0.25, 0.31, genes["iris_size"])
    centres = head.front(
        np.array([-spacing / 2, spacing / 2]), np.array([head.eye_y, head.eye_y]), -1.5
    )
    normals = head.normal(centres)
    tx = _unit(np.stack([np.ones(2), np.zeros(2), -normals[:, 0] / normals[:, 2]], axis=-1))
    ty = _unit(np.stack([np.zeros(2), -np.ones(2), normals[:, 1] / normals[:, 2]], axis=-1))
    m.s_eyes = points.add(centres)

    def lid_up(x: np.ndarray) -> np.ndarray:
        return (1.0 - x * x) ** shape * (1.0 - 0.12 * x)

    def lid_lo(x: np.ndarray) -> np.ndarray:
        return (1.0 - x * x) ** (0.8 * shape + 0.15) * (1.0 + 0.12 * x)

    lower_x = _LID_X[-2:0:-1]
    m.pu, m.pl = lid_up(_LID_X), -lid_lo(lower_x)
    v0 = 0.12 * width * opening
    iris_u, pupil_u = iris_radius * np.cos(_C10), 0.42 * iris_radius * np.cos(_C8)
    # iris then pupil: v of a circle, clamped per sample between the lids at the same u
    m.disc_v = v0 + iris_radius * np.concatenate([np.sin(_C10), 0.42 * np.sin(_C8)])
    disc_x = np.clip(np.concatenate([iris_u, pupil_u]) / (width / 2), -0.98, 0.98)
    m.disc_pu, m.disc_pl = lid_up(disc_x), -lid_lo(disc_x)
    crease_x = _LID_X[1:-1] * 0.92
    m.crease_v = (m.h_up + 1.6 + 0.25 * width * opening) * lid_up(crease_x)
    # eye-local u (outer corner positive) of: sclera (7 upper, 5 lower), iris, pupil, crease
    u_local = np.concatenate(
        [_LID_X * width / 2, lower_x * width / 2, iris_u, pupil_u, crease_x * width / 2]
    )
    u_img = np.array([[-1.0], [1.0]]) * u_local  # the image-left eye's outer corner is on the left
    base = centres[:, None, :] + u_img[..., None] * tx[:, None, :]
    base += (tilt * u_local)[None, :, None] * ty[:, None, :]
    m.eye_base = _homogeneous(base)
    m.eye_ty = np.concatenate([ty, np.zeros((2, 1))], axis=1)[:, None, :]
    # glasses: lens outlines in front of the eyes, as base + size_u * lens_u + size_v * lens_v
    cu, su = np.cos(_C10), np.sin(_C10)
    cu, su = np.sign(cu) * np.abs(cu) ** 0.6 * width, np.sign(su) * np.abs(su) ** 0.6 * width
    m.lens = _homogeneous(np.repeat(centres[:, None, :] + 5.0 * normals[:, None, :], 10, axis=1))
    m.lens_u = np.concatenate([cu[None, :, None] * tx[:, None, :], np.zeros((2, 10, 1))], axis=2)
    m.lens_v = np.concatenate([su[None, :, None] * ty[:, None, :], np.zeros((2, 10, 1))], axis=2)
    return _Eyes(centres, normals, spacing, width)


def _brows(
    genes: dict[str, float], head: _HeadShape, eyes: _Eyes
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(brow outlines, their raise basis, brow height above the eyes)``."""
    length = eyes.width * _lerp(1.05, 1.45, genes["brow_length"])
    height = _lerp(7.5, 11.5, genes["brow_height"])
    t = _BROW_T
    mid = head.eye_y - height - _lerp(0.3, 3.8, genes["brow_arch"]) * np.sin(np.pi * t**0.8)
    mid -= _lerp(-0.12, 0.16, genes["brow_angle"]) * length * (t - 0.3)
    half = (
        0.5
        * _lerp(1.6, 4.4, genes["brow_thickness"])
        * (1.0 - 0.55 * t)
        * (0.85 + 0.3 * np.sin(np.pi * t))
    )
    bx = eyes.spacing / 2 - eyes.width * 0.55 + length * t
    brow_y = np.concatenate([mid - half, (mid + half)[::-1]])
    brow_x = np.concatenate([bx, bx[::-1]])
    brows = np.concatenate([head.front(side * brow_x, brow_y, 0.4) for side in (-1.0, 1.0)])
    brows_raise = np.zeros_like(brows)
    brows_raise[:, 1] = _BROW_RAISE
    return brows, brows_raise, height


def _set_expression_bases(
    m: _Model, head: _HeadShape, mouth: _MouthShape, brows: np.ndarray, brows_raise: np.ndarray
) -> np.ndarray:
    """Set the neutral brows + mouth (``dyn0``) and the smile, open and raise bases; returns the
    neutral mouth."""
    mouth0 = mouth.points(head, 0.0, 0.0)
    num_brow = len(brows)
    m.dyn0 = _homogeneous(np.concatenate([brows, mouth0]))
    zero_b, zero_m = np.zeros((num_brow, 4)), np.zeros((len(mouth0), 4))
    smile = _homogeneous(mouth.points(head, 1.0, 0.0)) - _homogeneous(mouth0)
    m.dyn_smile = np.concatenate([zero_b, smile])
    opened = _homogeneous(mouth.points(head, 0.0, 1.0)) - _homogeneous(mouth0)
    m.dyn_open = np.concatenate([zero_b, opened])
    m.dyn_raise = np.concatenate([_homogeneous(brows_raise) - np.eye(4)[3], zero_m])
    return mouth0


def _add_facial_hair(
    m: _Model,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
    mouth: _MouthShape,
    nose: _Nose,
    colours: tuple[np.ndarray, np.ndarray],
) -> None:
    """Stubble or beard (per side), goatee and moustache outlines, and their colour."""
    beard = FACIAL_HAIR[_pick(_BEARD_P, genes["facial_hair"])]
    density = _lerp(0.45, 0.95, genes["beard_density"])
    m.s_beard = []
    if beard == "none":
        return
    half_height, mouth_y, mouth_w, nose_w = head.half_height, head.mouth_y, mouth.width, nose.width
    moustache = head.front(
        np.array([-mouth_w / 2 - 1.0, -nose_w * 0.32, 0.0, nose_w * 0.32, mouth_w / 2 + 1.0, 0.0]),
        np.array([mouth_y, nose.tip_y + 4.5, nose.tip_y + 5.0, nose.tip_y + 4.5, mouth_y, mouth_y]),
        1.5,
    )
    if beard in ("stubble", "beard"):
        for side in (-1.0, 1.0):
            top = head.front(
                side * np.array([0.74 * head.half_width, mouth_w / 2 + 3.0, -1.0]),
                np.array([mouth_y - 9.0, mouth_y - 2.0, mouth_y + 4.0]),
                1.5,
            )
            jaw = head.around(
                side * np.array([1.65, 1.3, 0.9, 0.45, -0.05]),
                half_height * np.array([0.25, 0.55, 0.8, 0.96, 1.0]),
                1.02 + 0.03 * density,
            )
            m.s_beard.append((points.add(np.concatenate([top, jaw])), int(side > 0)))
    elif beard == "goatee":
        chin = head.front(
            np.array([mouth_w * 0.42, mouth_w * 0.3, 0.0, -mouth_w * 0.3, -mouth_w * 0.42]),
            np.array(
                [mouth_y + 1.0, half_height - 5.0, half_height + 1.0, half_height - 5.0,
                 mouth_y + 1.0]
            ),
            2.0,
        )  # fmt: skip
        m.s_beard.append((points.add(chin), None))
    m.s_beard.append((points.add(moustache), None))
    skin, hair = colours
    stubble = skin * 0.84 + (hair - skin) * 0.12  # a shadow, darker than the skin
    m.c_beard = _tup(stubble if beard == "stubble" else skin + (hair * 0.95 - skin) * density)


def _add_front_hair(
    m: _Model,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
    hair: _Hair,
    brow_height: float,
) -> None:
    """Hair in front of the face (fringe, curls or a side part) or behind it (long hair)."""
    part = genes["hair_part"]
    style, volume, hairline_y, eye_y = hair.style, hair.volume, hair.hairline_y, head.eye_y
    m.s_fringe = m.s_back = None
    if style in ("fringe", "curly"):
        fx = _FRINGE_X
        length = _lerp(12.0, 22.0, part) if style == "fringe" else _lerp(6.0, 12.0, part)
        jag = np.where(np.arange(11) % 2 == 0, 0.0, 2.5 if style == "fringe" else 4.0)
        edge = np.minimum(
            hairline_y + length * (1.0 - 0.6 * fx**4) + jag, eye_y - brow_height - 1.5
        )
        top = head.around(fx * 1.3, np.full(11, hairline_y - 4.0), volume)
        m.s_fringe = points.add(
            np.concatenate([top, head.around(fx[::-1] * 1.3, edge[::-1], 1.02)])
        )
    elif style == "side_part":
        sign = 1.0 if part > 0.5 else -1.0
        k = _PART_K
        phi_top = sign * (0.35 - 1.7 * k)
        top = head.around(phi_top, np.full(8, hairline_y - 3.0), volume)
        drop = (
            hairline_y
            + _lerp(4.0, 14.0, abs(part - 0.5) * 2)
            + (eye_y - 14.0 - hairline_y) * k[::-1] ** 1.5
        )
        bottom = head.around(phi_top[::-1], np.minimum(drop, eye_y - brow_height - 2.0), 1.02)
        m.s_fringe = points.add(np.concatenate([top, bottom]))
    elif style == "long":
        half_height = head.half_height
        length = half_height * _lerp(1.05, 1.7, part)
        wide = head.half_width * volume + 4.0
        half = np.array(  # right half of the outline, top to bottom
            [[0.0, -half_height * volume - 2.0], [wide * 0.7, -half_height * 0.8],
             [wide, -half_height * 0.3], [wide + 2.0, half_height * 0.4], [wide + 7.0, length],
             [wide * 0.4, length + 4.0]]
        )  # fmt: skip
        outline = np.concatenate([half, half[:0:-1] * [-1.0, 1.0]])
        depth = np.full((len(outline), 1), -0.3 * head.depth)
        m.s_back = points.add(np.concatenate([outline, depth], axis=1))


def _add_strands(
    m: _Model,
    rng: np.random.Generator,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
    hair: _Hair,
) -> None:
    """Six hair strands above the hairline, flowing with the parting."""
    m.s_strands = []
    if hair.style in ("bald", "buzz"):
        return
    side_part = hair.style == "side_part"
    flow = rng.normal(0.0, 0.08) + (0.12 if genes["hair_part"] > 0.5 else -0.12) * side_part
    phi0 = (_STRAND_PHI + rng.normal(0.0, 0.08, 6))[:, None]
    ys = hair.hairline_y - 3.0 - np.array([0.0, 5.0, 10.0]) - 3.0 * rng.random((6, 1))
    strands = head.around(phi0 * 1.05 + flow * np.arange(3), ys, hair.volume * 1.005)
    m.s_strands = [points.add(strand) for strand in strands]


def _add_moles_and_freckles(
    m: _Model,
    rng: np.random.Generator,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
) -> np.ndarray:
    """Moles (hexagons) in six skin zones and freckles across the cheeks; returns the mole
    centres."""
    zones = np.array(
        [[-22.0, 22.0, -28.0, -16.0], [-36.0, -16.0, 8.0, 30.0], [16.0, 36.0, 8.0, 30.0],
         [-12.0, 12.0, 50.0, 56.0], [-30.0, -18.0, 34.0, 46.0], [18.0, 30.0, 34.0, 46.0]]
    )  # fmt: skip
    n_moles = int(genes["moles"] * 4.0)
    zone = rng.integers(0, len(zones), size=n_moles)
    within = rng.random((n_moles, 2))
    mole_centres = head.front(
        zones[zone, 0] + (zones[zone, 1] - zones[zone, 0]) * within[:, 0],
        head.eye_y + zones[zone, 2] + (zones[zone, 3] - zones[zone, 2]) * within[:, 1],
        0.3,
    )
    mole_radii = 0.7 + 0.8 * rng.random(n_moles)
    hexagon = np.concatenate([_HEX, np.zeros((6, 1))], axis=1)
    moles = mole_centres[:, None, :] + mole_radii[:, None, None] * hexagon
    m.s_moles = [points.add(poly) for poly in moles]
    n_freckles = int(max(0.0, genes["freckles"] - 0.82) / 0.18 * 45.0)
    fxy = rng.normal(size=(n_freckles, 2)) * np.array([9.0, 4.5])
    fxy[:, 0] += np.where(rng.random(n_freckles) < 0.5, -14.0, 14.0)
    freckles = head.front(fxy[:, 0], head.eye_y + 13.0 + fxy[:, 1], 0.3)
    m.s_freckles = points.add(freckles) if n_freckles else None
    return mole_centres


def _add_wrinkles(
    m: _Model,
    rng: np.random.Generator,
    genes: dict[str, float],
    head: _HeadShape,
    points: _PointStack,
    *,
    hairline_y: float,
    brow_height: float,
    nose: _Nose,
    mouth: _MouthShape,
) -> None:
    """Forehead lines below the hairline and nasolabial folds, from ``age`` 0.6 on."""
    age = genes["age"]
    m.s_wrinkles = []
    if age <= 0.6:
        return
    for k in range(1 + int((age - 0.6) / 0.15)):
        line_y = head.eye_y - brow_height - 9.0 - 5.0 * k
        if line_y < hairline_y + 4.0:
            break
        half_w = head.half_width * (0.3 + 0.15 * rng.random())
        xx = np.linspace(-half_w, half_w, 5)
        yy = line_y - 1.5 * np.cos(xx / half_w * 1.4) + rng.normal(0, 0.4, 5)
        m.s_wrinkles.append(points.add(head.front(xx, yy, 0.2)))
    nose_w, mouth_w, mouth_y = nose.width, mouth.width, head.mouth_y
    for side in (-1.0, 1.0):
        xx = side * np.array(
            [nose_w / 2 + 0.5, nose_w / 2 + 3.0, mouth_w / 2 + 3.5, mouth_w / 2 + 3.0]
        )
        yy = np.array([nose.tip_y - 1.0, nose.tip_y + 6.0, mouth_y - 3.0, mouth_y + 3.0])
        m.s_wrinkles.append(points.add(head.front(xx, yy, 0.2)))


def _add_neck_and_blobs(
    m: _Model,
    head: _HeadShape,
    points: _PointStack,
    eyes: _Eyes,
    nose: _Nose,
    mouth: _MouthShape,
) -> np.ndarray:
    """The chin point, the neck (two hexagons) and the centres of the soft shading blobs; returns
    the blob centres."""
    half_width, half_height, depth = head.half_width, head.half_height, head.depth
    m.s_chin = points.add(head.around(0.0, half_height))
    neck_x = 0.55 * half_width * head.jaw * _NECK_SIN
    neck_z = -0.15 * depth + 0.4 * depth * _NECK_COS
    m.s_neck = points.add(
        np.concatenate(
            [
                np.stack([neck_x, np.full(6, y), neck_z], axis=1)
                for y in (0.5 * half_height, 1.9 * half_height)
            ]
        )
    )
    blobs = np.concatenate(
        [
            eyes.centres + np.array([0.0, -1.5, 0.0]),
            nose.points[7:8] + np.array([0.0, 2.5, -2.0]),
            head.front(0.0, head.mouth_y + mouth.lower_lip + 4.0)[None],
            head.front(np.array([-0.55, 0.55]) * half_width, np.full(2, head.eye_y + 15.0)),
        ]
    )
    m.s_blobs = points.add(blobs)
    m.blob_inv = np.repeat(-0.5 / _BLOB_SIGMA**2, 2)[:, None]
    m.blob_gain = _BLOB_GAIN.tolist()
    return blobs


def _set_mask(m: _Model, head: _HeadShape) -> None:
    """The face mask occluder: its top edge rises by ``mask_d`` as occlusion_params[1] goes
    0 -> 1."""
    xs = _MASK_X * head.half_width * 0.93
    jaw = head.around(
        np.array([1.5, 1.1, 0.6, 0.0, -0.6, -1.1, -1.5]),
        head.half_height * np.array([0.45, 0.75, 0.95, 1.03, 0.95, 0.75, 0.45]),
        1.04,
    )
    masks = []
    for lift in (0.0, 4.0):
        top = head.front(xs, np.full(9, head.eye_y + 8.0 + lift), 1.0)
        top[:, 2] += np.maximum(0.0, 10.0 - np.abs(xs) * 0.9)
        masks.append(_homogeneous(np.concatenate([top, jaw])))
    m.mask, m.mask_d = masks[0], masks[1] - masks[0]


def _set_rows(m: _Model, num_brow: int) -> None:
    """Row indices into ``static`` + ``dyn0`` + eyes that the drawing code needs."""
    num_static = len(m.static)
    m.d_brows = [
        slice(num_static, num_static + num_brow // 2),
        slice(num_static + num_brow // 2, num_static + num_brow),
    ]
    mouth_row = num_static + num_brow  # mouth rows: top, line, low line, bottom (9 each), teeth (7)
    r = np.arange(9)
    m.i_lips = mouth_row + np.concatenate([r, 27 + r[-2:0:-1]])
    m.i_inner = mouth_row + np.concatenate([9 + r, 18 + r[-2:0:-1]])
    m.i_teeth = mouth_row + np.concatenate([9 + r[1:-1], 36 + r[-3::-1]])
    m.d_line = slice(mouth_row + 9, mouth_row + 18)
    m.e0 = num_static + len(m.dyn0)
    m.n_eye = m.eye_base.shape[1]
    m.i_landmarks = np.array(
        [m.s_eyes.start, m.s_eyes.start + 1, m.s_nose.start + 4, mouth_row + 9, mouth_row + 17]
    )


def _set_alignment(m: _Model, landmarks: np.ndarray) -> None:
    """The pose pivot and the identity's similarity that puts its neutral frontal 5
    ``landmarks`` (eyes, nose tip, mouth corners) on the ArcFace template."""
    mean = landmarks.sum(axis=0) / 5.0
    p = landmarks[:, :2] - mean[:2]
    s_id = float((p * (ARCFACE_TEMPLATE - _CENTRE)).sum() / (p * p).sum())
    m.s_id = s_id
    m.pivot = np.array([0.0, mean[1], _PIVOT_DEPTH * mean[2]])
    # the similarity x -> s_id x + t_id puts the neutral frontal landmarks on the template;
    # align_pivot is where it takes the pivot, relative to the template centre C
    m.align_pivot = s_id * (m.pivot[:2] - mean[:2])


def _build_model(params: np.ndarray) -> _Model:
    """The 3D model of the identity with genes ``params`` (see ``identity.PARAM_NAMES``)."""
    genes = dict(zip(PARAM_INDEX, params.tolist(), strict=True))  # PARAM_INDEX: in gene order
    m = _Model()
    head = _HeadShape(genes)
    m.a, m.b = head.half_width, head.half_height
    points = _PointStack()
    skin, hair_colour = _set_colours(m, genes)
    m.s_origin = points.add(np.zeros(3))
    hair = _add_head_and_skin(m, genes, head, points, skin, hair_colour)
    _add_ears(m, genes, head, points, hair.style)
    nose = _add_nose(m, genes, head, points)
    eyes = _add_eyes(m, genes, head, points)
    brows, brows_raise, brow_height = _brows(genes, head, eyes)
    mouth = _MouthShape(
        width=_lerp(24.0, 35.0, genes["mouth_width"]),
        upper_lip=_lerp(2.0, 4.2, genes["upper_lip"]),
        lower_lip=_lerp(2.8, 5.5, genes["lower_lip"]),
        curvature=_lerp(-1.8, 1.8, genes["mouth_curvature"]),
    )
    mouth0 = _set_expression_bases(m, head, mouth, brows, brows_raise)
    _add_facial_hair(m, genes, head, points, mouth, nose, (skin, hair_colour))
    _add_front_hair(m, genes, head, points, hair, brow_height)
    texture = np.random.default_rng(int(genes["texture_seed"] * (1 << 24)))
    _add_strands(m, texture, genes, head, points, hair)
    mole_centres = _add_moles_and_freckles(m, texture, genes, head, points)
    m.c_mole = _tup(skin * 0.55)
    _add_wrinkles(
        m,
        texture,
        genes,
        head,
        points,
        hairline_y=hair.hairline_y,
        brow_height=brow_height,
        nose=nose,
        mouth=mouth,
    )
    m.c_wrinkle = _tup(skin * (1.0 - 0.25 * genes["age"]))
    blobs = _add_neck_and_blobs(m, head, points, eyes, nose, mouth)
    _set_mask(m, head)

    sides = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    on_face = np.concatenate(
        [head.front(0.0, head.mouth_y)[None], blobs, mole_centres.reshape(-1, 3)]
    )
    m.normals = np.concatenate([eyes.normals, sides, np.array(nose.normals), head.normal(on_face)])
    m.static = points.homogeneous()
    _set_rows(m, len(brows))
    landmarks = np.stack([eyes.centres[0], eyes.centres[1], nose.points[4], mouth0[9], mouth0[17]])
    _set_alignment(m, landmarks)
    return m


@functools.lru_cache(maxsize=1024)
def _cached_model(key: bytes) -> _Model:
    return _build_model(np.frombuffer(key, dtype=np.float32))


def _model(identity: Identity) -> _Model:
    return _cached_model(identity.params.tobytes())


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _light_dir(n: Nuisance) -> tuple[float, float, float]:
    """Unit vector towards the light, in camera axes (x right, y down, z to the camera)."""
    ce = math.cos(n.light_elevation)
    az = n.light_azimuth
    return (math.sin(az) * ce, -math.sin(n.light_elevation), math.cos(az) * ce)


_GRADIENTS, _CLUTTERS = 256, 4096  # a sample's seed picks one of each


def _muted(r: random.Random) -> list[float]:
    """A random muted colour: value 40..220, saturation below 0.35."""
    v, sat, hue = 40.0 + 180.0 * r.random(), 0.35 * r.random() ** 2, 6.0 * r.random()
    return [
        v * (1.0 - sat * min(1.0, max(0.0, abs((hue + o) % 6.0 - 3.0) - 1.0))) for o in (0, 4, 2)
    ]


@functools.lru_cache(maxsize=2)
def _gradients(size: int) -> np.ndarray:
    """Fixed background gradients (``_GRADIENTS`` x size x size x 3): stretched 2x2 colour grids."""
    r = random.Random(0xB6)
    out = np.empty((_GRADIENTS, size, size, 3), np.uint8)
    for img in out:
        base, tint = _muted(r), [35.0 * (r.random() - 0.5) for _ in range(3)]
        corners = []
        for _ in range(4):
            dv = 80.0 * (r.random() - 0.5)
            corners += [base[0] + dv + tint[0], base[1] + dv, base[2] + dv - tint[2]]
            tint = tint[1:] + tint[:1]
        grid = np.array([min(255.0, max(0.0, x)) for x in corners], np.uint8).reshape(2, 2, 3)
        cv2.resize(grid, (size, size), dst=img, interpolation=cv2.INTER_LINEAR)
    return out


@functools.lru_cache(maxsize=2)
def _clutters(size: int) -> list[list[tuple]]:
    """Fixed background clutter: each entry 0-2 bars, discs or lines, as cv2 drawing arguments."""
    r = random.Random(0xC1)
    one = size * _ONE
    table = []
    for _ in range(_CLUTTERS):
        clutter = []
        for _ in range(int(r.random() * 3.0)):
            col = tuple(_muted(r))
            x, y, s = r.random() * one, r.random() * one, (0.1 + 0.4 * r.random()) * one
            kind = r.random()
            if kind < 0.45:  # a bar at a random angle
                ang, w = r.random() * math.pi, 0.3 + 0.7 * r.random()
                dx, dy = s * math.cos(ang), s * math.sin(ang)
                ex, ey = dy * w, dx * w
                pts = [[x - dx - ex, y - dy + ey], [x + dx - ex, y + dy + ey],
                       [x + dx + ex, y + dy - ey], [x - dx + ex, y - dy - ey]]  # fmt: skip
                clutter.append(("poly", [np.array(pts, np.int32)], col))
            elif kind < 0.75:
                clutter.append(("disc", (int(x), int(y)), int(s * 0.5), col))
            else:  # a line from top to bottom
                ends = (int(x), 0), (int(x + s * (r.random() - 0.5)), one)
                clutter.append(("line", *ends, col, 1 + int(r.random() * 4)))
        table.append(clutter)
    return table


def _background(img: np.ndarray, index: int, plain: bool) -> None:
    """Fill ``img`` with gradient ``index % _GRADIENTS`` and, unless ``plain``, clutter
    ``index // _GRADIENTS % _CLUTTERS``."""
    size = img.shape[0]
    np.copyto(img, _gradients(size)[index % _GRADIENTS])
    if plain:
        return
    for op in _clutters(size)[index // _GRADIENTS % _CLUTTERS]:
        if op[0] == "poly":
            cv2.fillPoly(img, op[1], op[2], _AA, _SHIFT)
        elif op[0] == "disc":
            cv2.circle(img, op[1], op[2], op[3], -1, _AA, _SHIFT)
        else:
            cv2.line(img, op[1], op[2], op[3], op[4], _AA, _SHIFT)


class _Frame:
    """One posed face: projected points (in 1/16 pixel), visibility and lighting of normals."""

    __slots__ = ("f", "ld", "m16", "nz", "pts", "px")

    def fix(self, p: np.ndarray) -> np.ndarray:
        """Fixed-point pixel coordinates of homogeneous model points ``p`` (..., 4)."""
        return np.rint(p @ self.m16).astype(np.int32)


def _project(m: _Model, n: Nuisance, size: int) -> _Frame:
    """Pose, expression and camera: every point of ``m`` in 1/16 pixels.

    The rotation is ``Rz(roll) Rx(pitch) Ry(yaw)`` about ``m.pivot``; a point ``P`` lands at
    ``k * (C + scale * align_pivot + shift) + f * (R (P - pivot))_xy`` with
    ``k = size / 112`` and ``f = scale * s_id * k``.
    """
    cy, sy = math.cos(n.yaw), math.sin(n.yaw)
    cp, sp = math.cos(n.pitch), math.sin(n.pitch)
    cr, sr = math.cos(n.roll), math.sin(n.roll)
    r00, r01, r02 = cr * cy - sr * sp * sy, -sr * cp, cr * sy + sr * sp * cy
    r10, r11, r12 = sr * cy + cr * sp * sy, cr * cp, sr * sy - cr * sp * cy
    r20, r21, r22 = -cp * sy, sp, cp * cy
    k = size / 112.0
    fr = _Frame()
    fr.f = f = n.scale * m.s_id * k
    f16, k16 = f * _ONE, k * _ONE
    _, py, pz = m.pivot
    ax, ay = m.align_pivot
    ox = k16 * (_CENTRE[0] + n.scale * ax + n.shift[0]) - f16 * (r01 * py + r02 * pz)
    oy = k16 * (_CENTRE[1] + n.scale * ay + n.shift[1]) - f16 * (r11 * py + r12 * pz)
    fr.m16 = m16 = np.array(
        [[r00 * f16, r10 * f16], [r01 * f16, r11 * f16], [r02 * f16, r12 * f16], [ox, oy]]
    )
    dyn = m.dyn0
    if n.smile:
        dyn = dyn + n.smile * m.dyn_smile
    if n.mouth_open:
        dyn = dyn + n.mouth_open * m.dyn_open
    if n.brow_raise:
        dyn = dyn + n.brow_raise * m.dyn_raise
    closure = n.eye_closure
    hu = m.h_up * (1.0 - closure) - 0.6 * m.h_lo * closure
    hl = m.h_lo * (1.0 - 0.35 * n.smile)
    disc = np.minimum(np.maximum(m.disc_v, m.disc_pl * hl), m.disc_pu * hu)
    v = np.concatenate([m.pu * hu, m.pl * hl, disc, m.crease_v - closure])
    eyes = m.eye_base + v[:, None] * m.eye_ty
    fr.px = px = np.concatenate([m.static, dyn, eyes[0], eyes[1]]) @ m16
    fr.pts = np.rint(px).astype(np.int32)
    # normals: z after rotation (visibility) and dot with the light (nose shading)
    lx, ly, lz = _light_dir(n)
    zl = np.array(
        [
            [r20, r00 * lx + r10 * ly + r20 * lz],
            [r21, r01 * lx + r11 * ly + r21 * lz],
            [r22, r02 * lx + r12 * ly + r22 * lz],
        ]
    )
    fr.nz, fr.ld = (m.normals @ zl).T.tolist()
    return fr


def _curls(outline: np.ndarray, f: float) -> np.ndarray:
    """A convex head outline (K, 1, 2) made bumpy above its middle: curly hair."""
    p = outline.reshape(-1, 2).astype(np.float64)
    c = p.sum(axis=0) / len(p)
    ang = np.arctan2(p[:, 1] - c[1], p[:, 0] - c[0])
    rad = np.hypot(p[:, 0] - c[0], p[:, 1] - c[1])
    theta = _CURL_THETA
    r = np.interp(theta, ang, rad, period=2.0 * np.pi)
    r += (3.5 * _ONE * f) * np.abs(np.sin(9.0 * theta)) * (np.sin(theta) < 0.25)
    return np.stack([c[0] + r * np.cos(theta), c[1] + r * np.sin(theta)], axis=1).astype(np.int32)


def _draw(m: _Model, n: Nuisance, size: int, plain: bool) -> tuple[np.ndarray, _Frame]:
    """Draw the unlit face of ``m`` under the pose, expression and occlusion of ``n``."""
    fr = _project(m, n, size)
    pts, nz = fr.pts, fr.nz
    img = np.empty((size, size, 3), np.uint8)
    _background(img, (n.seed * 2654435761) >> 12, plain)
    fill, lines, hull = cv2.fillPoly, cv2.polylines, cv2.convexHull
    lw = max(1, round(fr.f))

    if m.s_back is not None:
        fill(img, [pts[m.s_back]], m.c_back, _AA, _SHIFT)
    if pts[m.s_chin.start, 1] < (size + 2) * _ONE:  # else the neck is below the image
        fill(img, [hull(pts[m.s_neck])], m.c_neck, _AA, _SHIFT)
    # an ear on a side turned away is drawn behind the head, the others in front of it
    ears = (0, 1) if m.show_ears else ()
    far = [i for i in ears if nz[_N_SIDES + i] <= -0.15]
    near = [i for i in ears if nz[_N_SIDES + i] > -0.15]
    if far:
        fill(img, [pts[m.s_ears[i]] for i in far], m.c_ear, _AA, _SHIFT)
    head = hull(pts[m.s_head])
    fill(img, [_curls(head, fr.f) if m.style == "curly" else head], m.c_cap, _AA, _SHIFT)
    if m.s_skin is not None:
        fill(img, [hull(pts[m.s_skin])], m.c_skin, _AA, _SHIFT)
    if near:
        fill(img, [pts[m.s_ears[i]] for i in near], m.c_ear, _AA, _SHIFT)
        lines(img, [pts[m.s_ears_in[i]] for i in near], False, m.c_ear_in, lw, _AA, _SHIFT)

    # skin texture and facial hair
    if m.s_freckles is not None:
        fp = (pts[m.s_freckles] >> _SHIFT).clip(0, size - 1)
        img[fp[:, 1], fp[:, 0]] = (img[fp[:, 1], fp[:, 0]] * 0.82).astype(np.uint8)
    if m.s_wrinkles:
        lines(img, [pts[s] for s in m.s_wrinkles], False, m.c_wrinkle, 1, _AA, _SHIFT)
    if m.s_moles:
        moles = [pts[s] for i, s in enumerate(m.s_moles) if nz[_N_MOLES + i] > 0.25]
        if moles:
            fill(img, moles, m.c_mole, _AA, _SHIFT)
    for s, side in m.s_beard:  # a side half of a beard hides once that side turns away
        if side is None or nz[_N_SIDES + side] > -0.55:
            fill(img, [hull(pts[s])], m.c_beard, _AA, _SHIFT)

    # eyes and brows
    if nz[0] > 0.12 or nz[1] > 0.12:
        e = [m.e0 + i * m.n_eye for i in (0, 1) if nz[i] > 0.12]
        fill(img, [pts[j : j + 12] for j in e], _SCLERA, _AA, _SHIFT)
        fill(img, [pts[j + 12 : j + 22] for j in e], m.c_iris, _AA, _SHIFT)
        fill(img, [pts[j + 22 : j + 30] for j in e], _PUPIL, _L8, _SHIFT)
        lines(img, [pts[j + 30 : j + 35] for j in e], False, m.c_crease, 1, _AA, _SHIFT)
        lines(img, [pts[j : j + 7] for j in e], False, _LASH, lw, _AA, _SHIFT)
    if nz[0] > 0.05 or nz[1] > 0.05:
        fill(img, [pts[m.d_brows[i]] for i in (0, 1) if nz[i] > 0.05], m.c_brow, _AA, _SHIFT)

    # mouth
    fill(img, [pts[m.i_lips]], m.c_lip, _AA, _SHIFT)
    if n.mouth_open > 0.05:
        fill(img, [pts[m.i_inner]], _MOUTH_IN, _AA, _SHIFT)
        fill(img, [pts[m.i_teeth]], _TEETH, _AA, _SHIFT)
    else:
        lines(img, [pts[m.d_line]], False, m.c_mouth_line, 1, _AA, _SHIFT)

    # nose: visible faces, shaded relative to the face around them
    nose = pts[m.s_nose]
    ld = fr.ld
    amb, lit = n.ambient, n.light_strength
    base = 1.0 / (amb + lit * max(0.0, ld[_N_FACE]))
    r, g, b = m.c_skin
    for i in range(4):
        if nz[_N_NOSE + i] > 0.02:
            shade = _NOSE_ALBEDO[i] * ((amb + lit * max(0.0, ld[_N_NOSE + i])) * base) ** 1.5
            shade = min(1.12, max(0.5, shade))
            fill(img, [nose[_NOSE_FACES[i]]], (r * shade, g * shade, b * shade), _L8, _SHIFT)
    if nz[_N_NOSE + 3] > 0.15:  # underside
        fill(img, [pts[s] for s in m.s_nostrils], m.c_nostril, _AA, _SHIFT)
    if nz[_N_FACE] > 0.6:
        lines(img, [pts[s] for s in m.s_alae], False, m.c_alae, 1, _AA, _SHIFT)

    # hair in front of the face
    if m.s_fringe is not None:  # turned far, its outline folds over itself: fill its hull
        fringe = pts[m.s_fringe] if abs(n.yaw) < 0.5 else hull(pts[m.s_fringe])
        fill(img, [fringe], m.c_hair, _AA, _SHIFT)
    if m.s_strands:
        lines(img, [pts[s] for s in m.s_strands], False, m.c_strand, 1, _AA, _SHIFT)
    if n.occlusion != "none":
        _occlude(img, m, n, fr)
    return img, fr


_FRAMES = ((20.0, 18.0, 18.0), (90.0, 60.0, 35.0), (170.0, 170.0, 175.0), (140.0, 30.0, 40.0))
_MASKS = ((150.0, 190.0, 215.0), (235.0, 235.0, 235.0), (30.0, 30.0, 34.0), (120.0, 124.0, 130.0))


def _occlude(img: np.ndarray, m: _Model, n: Nuisance, fr: _Frame) -> None:
    """Draw the occluder ``n.occlusion`` (parameters in ``n.occlusion_params``) over the face."""
    p0, p1, p2, p3 = n.occlusion_params
    size = img.shape[0]
    kind = n.occlusion
    if kind in ("glasses", "sunglasses"):
        lens = m.lens + (0.62 + 0.2 * p0) * m.lens_u + (0.45 + 0.15 * p1) * m.lens_v
        px = fr.fix(lens)
        frame = _FRAMES[int(p2 * 4) % 4]
        if kind == "sunglasses":
            tint = 22.0 + 30.0 * p3
            cv2.fillPoly(img, list(px), (tint, tint + 2.0, tint + 6.0), _AA, _SHIFT)
        width = max(1, round(fr.f * (1.0 + p3)))
        cv2.polylines(img, list(px), True, frame, width, _AA, _SHIFT)
        bridge = np.stack([px[0, 0], px[1, 5]])
        cv2.polylines(img, [bridge], False, frame, max(1, round(fr.f)), _AA, _SHIFT)
    elif kind == "mask":
        poly = fr.fix(m.mask + p1 * m.mask_d)
        cv2.fillPoly(img, [poly], _MASKS[int(p0 * 4) % 4], _AA, _SHIFT)
    elif kind == "bar":
        c = np.array([0.2 + 0.6 * p0, 0.25 + 0.6 * p1]) * size
        d = np.array([math.cos(p2 * math.pi), math.sin(p2 * math.pi)]) * size
        o = np.array([-d[1], d[0]]) * (0.06 + 0.1 * p3)
        pts = np.array([c - d - o, c + d - o, c + d + o, c - d + o]) * _ONE
        colour = (10.0, 10.0, 10.0) if p3 < 0.6 else (200.0 * p3, 40.0 * p3, 40.0 * p3)
        cv2.fillPoly(img, [pts.astype(np.int32)], colour, _AA, _SHIFT)
    else:  # hand: a palm and four fingers
        tone = _tup(_SKIN[int(p3 * (len(_SKIN) - 1))])
        c = np.array([0.25 + 0.5 * p0, 0.55 + 0.35 * p1]) * size
        ang = (p2 - 0.5) * 1.6 - math.pi / 2
        d = np.array([math.cos(ang), math.sin(ang)])
        o = np.array([-d[1], d[0]])
        pr = 0.16 * size
        axes = (int(pr * _ONE), int(pr * 1.2 * _ONE))
        centre = (int(c[0] * _ONE), int(c[1] * _ONE))
        cv2.ellipse(img, centre, axes, math.degrees(ang) + 90.0, 0, 360, tone, -1, _AA, _SHIFT)
        fingers = []
        for k in range(4):
            s0 = c + d * pr * 0.9 + o * pr * (k - 1.5) * 0.5
            s1 = s0 + d * pr * (1.1 - 0.2 * abs(k - 1.5))
            fingers.append((np.stack([s0, s1]) * _ONE).astype(np.int32))
        cv2.polylines(img, fingers, False, tone, max(2, int(pr * 0.42)), _AA, _SHIFT)


@functools.lru_cache(maxsize=1)
def _gaussian_field(size: int) -> np.ndarray:
    """A fixed unit Gaussian noise field, a little larger than the image (crops vary by seed)."""
    return np.random.default_rng(0x5F).standard_normal((size + 61, size + 67, 3))


@functools.lru_cache(maxsize=64)
def _noise_bank(size: int, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative parts of the noise field at sigma ``2 ** (level / 8)``, as uint8."""
    g = _gaussian_field(size) * 2.0 ** (level / 8.0)
    return np.clip(g, 0, 255).astype(np.uint8), np.clip(-g, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _grid16(size: int) -> np.ndarray:
    """Centres of the lighting-map cells, in 1/16 pixels."""
    return (np.arange(_SHADE_CELLS) + 0.5) * (size * _ONE / _SHADE_CELLS)


def _light(img: np.ndarray, m: _Model, n: Nuisance, fr: _Frame) -> np.ndarray:
    """Light ``img``: Lambert shading of the head ellipsoid plus soft blobs (eye sockets, shadows
    under nose and lip, cheekbones), colour gains, then a brightness / contrast / gamma curve."""
    size = img.shape[0]
    g = _grid16(size)
    px = fr.px
    ox, oy = px[m.s_origin.start].tolist()
    scale = fr.f * _ONE
    xn = (g - ox) * (1.0 / (m.a * 1.05 * scale))  # head-normalised; roll is ignored here
    yn = (g - oy) * (1.0 / (m.b * scale))
    r2 = np.add.outer(yn * yn, xn * xn)
    lx, ly, lz = _light_dir(n)
    total = n.ambient + n.light_strength
    ks = n.light_strength / total * 128.0
    # Lambert term of the ellipsoid normal (xn, yn, sqrt(1 - r2)); beyond the rim it keeps
    # growing with (xn, yn), which lights the background on the light's side
    shade = np.add.outer(yn * (ly * ks), xn * (lx * ks))
    shade += np.sqrt(np.maximum(1.0 - r2, 0.04)) * (lz * ks)
    shade = np.minimum(np.maximum(shade, 0.0), 1.2 * ks)
    d = g - px[m.s_blobs].reshape(-1, 1)  # rows: x0, y0, x1, y1, ...
    e = np.exp(d * d * (m.blob_inv / (scale * scale)))
    k = (0.5 + 1.5 * n.light_strength / total) * 128.0
    w = [
        gain * k * max(0.0, z)
        for gain, z in zip(m.blob_gain, fr.nz[_N_BLOBS:_N_MOLES], strict=True)
    ]
    shade += (e[1::2].T * w) @ e[0::2]
    shade += n.ambient / total * 128.0
    gains = [gain * n.contrast for gain in n.color_gains]
    small = np.minimum(np.maximum(np.multiply.outer(shade, gains), 0.0), 255.0).astype(np.uint8)
    img = cv2.multiply(img, cv2.resize(small, (size, size)), scale=1.0 / 128.0)
    offset = 0.5 - 0.5 * n.contrast + n.brightness  # contrast itself is in the gains
    if n.gamma != 1.0:
        x = np.minimum(np.maximum(_RAMP + offset, 0.0), 1.0)
        img = cv2.LUT(img, (x**n.gamma * 255.0 + 0.5).astype(np.uint8))
    elif offset:
        # cv2.add / subtract of a scalar, elementwise: applied to the 256 grey levels it gives a
        # lookup table that cv2.LUT applies 5x faster than the scalar operation on the image
        v = abs(offset) * 255.0
        img = cv2.LUT(img, (cv2.add if offset > 0 else cv2.subtract)(_LEVELS_U8, (v, v, v, 0.0)))
    return img


@functools.lru_cache(maxsize=64)
def _blur_kernel(sigma: float) -> np.ndarray:
    return cv2.getGaussianKernel(2 * math.ceil(2.0 * sigma) + 1, sigma, cv2.CV_32F)


def _degrade(img: np.ndarray, n: Nuisance) -> np.ndarray:
    """Blur, lose resolution and add sensor noise, in that order."""
    size = img.shape[0]
    if n.blur_sigma > 0.05:
        k = _blur_kernel(round(n.blur_sigma * size / 112.0, 2))
        img = cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT)
    if n.lowres_factor > 1.01:
        small = max(4, round(size / n.lowres_factor))
        img = cv2.resize(img, (2 * small, 2 * small), interpolation=cv2.INTER_LINEAR)
        img = cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA)  # exact 2x box
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    if n.noise_sigma > 0.05:
        pos, neg = _noise_bank(size, round(8.0 * math.log2(n.noise_sigma)))  # 1/8 octave steps
        oy, ox = (n.seed * 2654435761 >> 7) % 61, (n.seed * 40503 >> 3) % 67
        img = cv2.add(img, pos[oy : oy + size, ox : ox + size])
        img = cv2.subtract(img, neg[oy : oy + size, ox : ox + size])
    return img


# --------------------------------------------------------------------------------------------------
# Public renderers
# --------------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A rendered sample.

    ``image``: ``size x size x 3`` uint8 RGB, before JPEG compression. ``landmarks``: 5x2 float32
    pixel coordinates of the left eye, right eye, nose tip, left and right mouth corner ("left" =
    image left, as in the ArcFace template). ``quality``: ground-truth quality in [0, 1].
    """

    image: np.ndarray
    landmarks: np.ndarray
    quality: float


def _check_size(size: int) -> None:
    check_int("size", size, 16, 1024)


def _landmarks(m: _Model, fr: _Frame) -> np.ndarray:
    return (fr.px[m.i_landmarks] / _ONE).astype(np.float32)


def render_face(identity: Identity, nuisance: Nuisance, size: int = 112) -> Rendered:
    """Render ``identity`` under ``nuisance`` as an aligned ``size x size`` face crop."""
    _check_size(size)
    m = _model(identity)
    img, fr = _draw(m, nuisance, size, plain=False)
    img = _degrade(_light(img, m, nuisance, fr), nuisance)
    return Rendered(img, _landmarks(m, fr), quality_score(nuisance))


_LEVELS = np.arange(256)
_PENCIL_LUT = (_LEVELS[:, None] * np.array([1.0, 0.97, 0.9])).astype(np.uint8)[:, None, :]
"""Pencil paper tint: grey ``x`` -> ``uint8(x * (1.0, 0.97, 0.9))`` (truncated) per channel."""
_POSTER_LUT = (_LEVELS // 48 * 48 + 24).astype(np.uint8)
"""Cartoon posterisation: 6 levels, ``(x // 48) * 48 + 24`` in uint8 arithmetic (255 wraps to 8)."""
_SATURATE_LUT = np.stack([_LEVELS, np.minimum(2 * _LEVELS, 255), _LEVELS], axis=1).astype(np.uint8)[
    :, None, :
]
"""Cartoon colours: HSV saturation doubled (saturating at 255), hue and value kept."""


def _fixed_blur(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable blur of a uint8 image by an integer kernel summing to 256, rounded half up.

    The sums stay below 2**24, so float32 holds them exactly: this is cv2.GaussianBlur's
    fixed-point arithmetic for 8-bit images, with ``kernel`` its fixed-point coefficients.
    """
    total = cv2.sepFilter2D(gray, cv2.CV_32F, kernel, kernel)  # border: reflect 101, as cv2
    return ((total + 32768.0) * (1.0 / 65536.0)).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _pencil_kernel(size: int) -> np.ndarray | None:
    """cv2.GaussianBlur's fixed-point kernel for ``sigma = 2 size / 112`` on 8-bit images.

    OpenCV rounds the Gaussian times 256 from the tails inwards, carrying each rounding error to
    the next tap, and gives the centre what is left of 256. ``None`` where ``_fixed_blur`` with
    this kernel does not reproduce cv2.GaussianBlur on a random image of this size.
    """
    sigma = 2.0 * size / 112.0
    n = round(sigma * 6.0 + 1.0) | 1  # OpenCV's kernel size for 8-bit images
    gauss = cv2.getGaussianKernel(n, sigma, cv2.CV_64F).ravel() * 256.0
    kernel, err = np.empty(n, np.float32), 0.0
    for i in range(n // 2):
        v = round(gauss[i] + err)
        err += gauss[i] - v
        kernel[i] = kernel[n - 1 - i] = v
    kernel[n // 2] = 256.0 - 2.0 * kernel[: n // 2].sum()
    probe = np.random.default_rng(size).integers(0, 256, (size, size), dtype=np.uint8)
    exact = np.array_equal(_fixed_blur(probe, kernel), cv2.GaussianBlur(probe, (0, 0), sigma))
    return kernel if exact else None


def _pencil_blur(gray: np.ndarray) -> np.ndarray:
    """``cv2.GaussianBlur(gray, (0, 0), 2 size / 112)``, 3x faster (same bytes)."""
    size = gray.shape[0]
    kernel = _pencil_kernel(size)
    if kernel is None:
        return cv2.GaussianBlur(gray, (0, 0), 2.0 * size / 112.0)
    return _fixed_blur(gray, kernel)


@functools.lru_cache(maxsize=2)
def _ink(size: int) -> np.ndarray:
    """The cartoon's edge colour, grey level 20, as a ``size x size x 3`` image to copy from."""
    out = np.full((size, size, 3), 20, np.uint8)
    out.setflags(write=False)
    return out


def render_sketch(identity: Identity, nuisance: Nuisance, size: int = 112) -> Rendered:
    """A non-photorealistic render of ``identity``: pencil sketch, cartoon or line drawing.

    The style is ``SKETCH_STYLES[nuisance.seed % 3]``. Pose, expression and occlusion follow
    ``nuisance``; lighting and degradations do not. ``quality`` is half that of the nuisance.
    """
    _check_size(size)
    m = _model(identity)
    img, fr = _draw(m, nuisance, size, plain=True)
    style = SKETCH_STYLES[nuisance.seed % 3]
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if style == "pencil":
        blur = _pencil_blur(255 - gray)
        dodge = cv2.divide(gray, 255 - blur, scale=256.0)
        sketch = cv2.subtract(dodge, cv2.Canny(gray, 30, 90) // 3)
        img = cv2.LUT(cv2.cvtColor(sketch, cv2.COLOR_GRAY2RGB), _PENCIL_LUT)
    elif style == "cartoon":
        hsv = cv2.cvtColor(cv2.LUT(img, _POSTER_LUT), cv2.COLOR_RGB2HSV)
        img = cv2.cvtColor(cv2.LUT(hsv, _SATURATE_LUT), cv2.COLOR_HSV2RGB)
        edges = cv2.dilate(cv2.Canny(gray, 40, 120), np.ones((2, 2), np.uint8))
        cv2.copyTo(_ink(size), edges, img)  # edge pixels (Canny's 255s, dilated) become 20
    else:
        edges = cv2.Canny(cv2.GaussianBlur(gray, (3, 3), 0), 20, 60)
        img = cv2.cvtColor(255 - edges, cv2.COLOR_GRAY2RGB)
    return Rendered(np.ascontiguousarray(img), _landmarks(m, fr), 0.5 * quality_score(nuisance))


def render_nonface(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """A non-face image: a texture, random shapes, a simple scene, a blank wall or an object."""
    _check_size(size)
    kind = int(rng.integers(5))
    img = np.empty((size, size, 3), np.uint8)
    _background(img, int(rng.integers(_GRADIENTS * _CLUTTERS)), plain=kind == 3)
    if kind == 0:  # texture
        cells = int(rng.integers(3, 24))
        tex = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
        interp = cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_CUBIC
        img = cv2.addWeighted(
            img, 0.4, cv2.resize(tex, (size, size), interpolation=interp), 0.6, 0.0
        )
    elif kind == 1:  # shapes
        for _ in range(int(rng.integers(4, 12))):
            pts = rng.random((int(rng.integers(3, 7)), 2)) * size * _ONE
            col = tuple(float(v) for v in rng.integers(0, 256, 3))
            cv2.fillPoly(img, [pts.astype(np.int32)], col, _AA, _SHIFT)
    elif kind == 2:  # scene: sky, ground, buildings
        horizon = int(size * rng.uniform(0.4, 0.75))
        img[:horizon] = np.array([rng.uniform(120, 220), rng.uniform(160, 230), 235], np.uint8)
        img[horizon:] = rng.integers(40, 140, 3).astype(np.uint8)
        x = 0.0
        while x < size:
            w, h = rng.uniform(0.1, 0.3) * size, rng.uniform(0.1, 0.5) * size
            col = tuple(float(v) for v in rng.integers(60, 200, 3))
            cv2.rectangle(img, (int(x), int(horizon - h)), (int(x + w), horizon), col, -1)
            x += w + rng.uniform(0, 0.1) * size
    elif kind == 3:  # blank wall with a little grain
        img = np.clip(img + rng.normal(0.0, 4.0, (size, size, 1)), 0, 255).astype(np.uint8)
    else:  # an object: ball, box or bottle
        col = tuple(float(v) for v in rng.integers(0, 256, 3))
        c, s = size // 2, int(size * rng.uniform(0.2, 0.4))
        which = int(rng.integers(3))
        if which == 0:
            cv2.circle(img, (c, c), s, col, -1, _AA)
            cv2.circle(img, (c - s // 3, c - s // 3), max(1, s // 5), (250, 250, 250), -1, _AA)
        elif which == 1:
            cv2.rectangle(img, (c - s, c - s // 2), (c + s, c + s), col, -1)
            cv2.rectangle(img, (c - s, c - s // 2), (c + s, c + s), (20, 20, 20), 1)
        else:
            cv2.rectangle(img, (c - s // 3, c - s // 2), (c + s // 3, c + s), col, -1)
            cv2.rectangle(img, (c - s // 8, c - s), (c + s // 8, c - s // 2), col, -1)
    return img


def make_grid(images: Sequence[np.ndarray], ncols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile equally sized images (HxW or HxWx3 uint8) row-major into one RGB image."""
    if len(images) == 0:
        raise ValueError("images must not be empty")
    if ncols < 1 or pad < 0:
        raise ValueError(f"need ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}")
    tiles = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    h, w = tiles[0].shape[:2]
    if any(t.shape != (h, w, 3) for t in tiles):
        raise ValueError("all images must have the same height and width")
    nrows = -(-len(tiles) // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        y, x = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
        grid[y : y + h, x : x + w] = t
    return grid
