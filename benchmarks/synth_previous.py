"""SynthFace's renderer before the generation-rate work, for ``synth_rate.py``'s baseline.

Copies of the functions and methods of ``robustface/data/synth/render.py`` at commit a103c02
that the generation-rate work replaced (identity-model building, lighting, sketches), verbatim
but for the methods' names. :func:`previous_renderer` swaps them into the render module, so that
``render_face`` / ``render_sketch`` run the previous code; every other function is shared.
Both produce the same bytes (``tests/test_synth_render_pinned.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import cv2
import numpy as np

from robustface.data.synth import render
from robustface.data.synth.render import (
    _BLOB_GAIN,
    _BLOB_SIGMA,
    _BROW_T,
    _C8,
    _MOUTH_X,
    _N_BLOBS,
    _N_MOLES,
    _NOSE_FACES,
    _ONE,
    _RAMP,
    _RING_PHI,
    _RING_STEPS,
    _RING_T,
    _STYLE_P,
    HAIR_STYLES,
    PARAM_INDEX,
    SKETCH_STYLES,
    Identity,
    Nuisance,
    Rendered,
    _add_ears,
    _add_eyes,
    _add_facial_hair,
    _add_moles_and_freckles,
    _add_wrinkles,
    _check_size,
    _draw,
    _Eyes,
    _Frame,
    _grid16,
    _Hair,
    _HeadShape,
    _landmarks,
    _lerp,
    _light_dir,
    _Model,
    _model,
    _MouthShape,
    _Nose,
    _pick,
    _PointStack,
    _set_alignment,
    _set_colours,
    _set_expression_bases,
    _set_rows,
    _tup,
    quality_score,
)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _homogeneous(p: np.ndarray) -> np.ndarray:
    """``p`` (..., 3) with a fourth coordinate 1, so that one matrix product also translates."""
    return np.concatenate([p, np.ones((*p.shape[:-1], 1))], axis=-1)


def _headshape_ring(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-width, depth centre and half-depth of the head's horizontal ring at height ``y``."""
    row = np.rint((np.asarray(y) * (1.0 / self.half_height) + 1.0) * _RING_STEPS)
    row = row.astype(np.intp)
    ring = self._table[np.minimum(np.maximum(row, 0), len(self._table) - 1)]
    return ring[..., 0], ring[..., 1], ring[..., 2]


def _headshape_front(
    self, x: np.ndarray, y: np.ndarray, out: float | np.ndarray = 0.0
) -> np.ndarray:
    """Points on the front of the head at (x, y), pushed ``out`` towards the camera."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        x, y = np.broadcast_arrays(x, y)
    half_width, centre, half_depth = self.ring(y)
    across = np.minimum(np.abs(x) / np.maximum(half_width, 1e-3), 1.0)
    points = np.empty((*x.shape, 3))
    points[..., 0], points[..., 1] = x, y
    points[..., 2] = centre + half_depth * np.sqrt(1.0 - across * across) + out
    return points


def _headshape_around(self, phi: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Points of the rings at heights ``y`` and angles ``phi`` (0 = front), scaled."""
    phi, y = np.asarray(phi, np.float64), np.asarray(y, np.float64)
    if phi.shape != y.shape:
        phi, y = np.broadcast_arrays(phi, y)
    half_width, centre, half_depth = self.ring(y)
    points = np.empty((*phi.shape, 3))
    points[..., 0], points[..., 1], points[..., 2] = (
        half_width * np.sin(phi) * scale,
        y,
        (centre + half_depth * np.cos(phi)) * scale,
    )
    return points


def _mouthshape_points(self, head: _HeadShape, smile: float, opened: float) -> np.ndarray:
    """Rows top lip (9), lip line (9), lower lip line (9), bottom lip (9), teeth (7)."""
    x = _MOUTH_X * self.width / 2 * (1.0 + 0.12 * smile)
    xs2 = _MOUTH_X**2
    line = head.mouth_y - smile * 1.0 - (self.curvature + 3.5 * smile) * xs2
    bow = np.sqrt(1.0 - xs2) * (1.0 - 0.3 * np.exp(-((_MOUTH_X / 0.2) ** 2)))
    top = line - self.upper_lip * (1.0 - 0.3 * smile) * bow
    gap = opened * 9.0 * (1.0 - xs2) ** 0.8
    bottom = line + gap + self.lower_lip * (1.0 - 0.2 * smile) * (1.0 - xs2) ** 0.6
    teeth = line[1:-1] + np.minimum(gap[1:-1], 2.5 + 0.5 * self.upper_lip)
    out = 1.8 * (1.0 - xs2)
    xx = np.concatenate([x, x, x, x, x[1:-1]])
    yy = np.concatenate([top, line, line + gap, bottom, teeth])
    return head.front(xx, yy, np.concatenate([out, out, out, out, out[1:-1] - 0.5]))


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
        phi_h = np.linspace(-1.35, 1.35, 11)
        hairline = head.around(
            phi_h, hairline_y + (eye_y - 12.0 - hairline_y) * (np.abs(phi_h) / 1.35) ** 2.5
        )
        side_phi = 1.2 if style == "long" else 1.75
        side = head.around(
            np.repeat([-side_phi, side_phi], 3), np.tile(eye_y + np.array([-10.0, 6.0, 20.0]), 2)
        )
        phi = _RING_PHI[::2] if style != "long" else _RING_PHI[np.abs(_RING_PHI) <= 1.3]
        lower = head.around(phi[None, :], head.half_height * _RING_T[6:, None])
        m.s_skin = points.add(np.concatenate([hairline, side, lower.reshape(-1, 3)]))
    return _Hair(style, volume, hairline_y)


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
    ala_t = np.linspace(-1.2, 1.4, 5)
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
    brows_raise[:, 1] = -3.0 * (1.0 - 0.4 * np.tile(np.concatenate([t, t[::-1]]), 2))
    return brows, brows_raise, height


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
        fx = np.linspace(-1.0, 1.0, 11)
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
        k = np.linspace(0.0, 1.0, 8)
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
    phi0 = (np.linspace(-1.1, 1.1, 6) + rng.normal(0.0, 0.08, 6))[:, None]
    ys = hair.hairline_y - 3.0 - np.array([0.0, 5.0, 10.0]) - 3.0 * rng.random((6, 1))
    strands = head.around(phi0 * 1.05 + flow * np.arange(3), ys, hair.volume * 1.005)
    m.s_strands = [points.add(strand) for strand in strands]


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
    neck_phi = np.linspace(0.0, 2.0 * np.pi, 6, endpoint=False)
    neck_x = 0.55 * half_width * head.jaw * np.sin(neck_phi)
    neck_z = -0.15 * depth + 0.4 * depth * np.cos(neck_phi)
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
    xs = np.linspace(-0.96, 0.96, 9) * head.half_width * 0.93
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


def _build_model(params: np.ndarray) -> _Model:
    """The 3D model of the identity with genes ``params`` (see ``identity.PARAM_NAMES``)."""
    genes = {name: float(params[i]) for name, i in PARAM_INDEX.items()}
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
        v = abs(offset) * 255.0
        img = (cv2.add if offset > 0 else cv2.subtract)(img, (v, v, v, 0.0))
    return img


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
        blur = cv2.GaussianBlur(255 - gray, (0, 0), 2.0 * size / 112.0)
        dodge = cv2.divide(gray, 255 - blur, scale=256.0)
        sketch = cv2.subtract(dodge, cv2.Canny(gray, 30, 90) // 3)
        img = (cv2.cvtColor(sketch, cv2.COLOR_GRAY2RGB) * np.array([1.0, 0.97, 0.9])).astype(
            np.uint8
        )
    elif style == "cartoon":
        hsv = cv2.cvtColor((img // 48) * 48 + 24, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = np.minimum(hsv[..., 1].astype(np.int32) * 2, 255).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        img[cv2.dilate(cv2.Canny(gray, 40, 120), np.ones((2, 2), np.uint8)) > 0] = 20
    else:
        edges = cv2.Canny(cv2.GaussianBlur(gray, (3, 3), 0), 20, 60)
        img = cv2.cvtColor(255 - edges, cv2.COLOR_GRAY2RGB)
    return Rendered(np.ascontiguousarray(img), _landmarks(m, fr), 0.5 * quality_score(nuisance))


_FUNCTIONS = (
    "_unit",
    "_homogeneous",
    "_add_head_and_skin",
    "_add_nose",
    "_brows",
    "_add_front_hair",
    "_add_strands",
    "_add_neck_and_blobs",
    "_set_mask",
    "_build_model",
    "_light",
    "render_sketch",
)
_METHODS = {
    ("_HeadShape", "ring"): "_headshape_ring",
    ("_HeadShape", "front"): "_headshape_front",
    ("_HeadShape", "around"): "_headshape_around",
    ("_MouthShape", "points"): "_mouthshape_points",
}


@contextlib.contextmanager
def previous_renderer() -> Iterator[None]:
    """Run the render module with the previous functions and methods while in the block."""
    saved = {name: getattr(render, name) for name in _FUNCTIONS}
    saved_methods = {key: getattr(getattr(render, key[0]), key[1]) for key in _METHODS}
    try:
        for name in _FUNCTIONS:
            setattr(render, name, globals()[name])
        for (cls, meth), fn in _METHODS.items():
            setattr(getattr(render, cls), meth, globals()[fn])
        yield
    finally:
        for name, fn in saved.items():
            setattr(render, name, fn)
        for (cls, meth), fn in saved_methods.items():
            setattr(getattr(render, cls), meth, fn)
