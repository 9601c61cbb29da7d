"""The six mask styles. Each designs an outline, straps and a paint function in face units (see geometry.py)
from the landmarks and the random generator; render.py turns the design into pixels.

Random draws happen in a fixed order per style, so a style + generator state gives one exact mask.
"""

from __future__ import annotations

import math

import numpy as np

from unmask_cli.masks.appearance import (
    COLOURS,
    STYLE_COLOURS,
    blend,
    cylinder_shading,
    dots,
    edge_shading,
    finish,
    grain,
    jittered_colour,
    lambert,
    lut,
    smoothstep,
    stripes,
    to_255,
    value_noise,
    weighted_pick,
)
from unmask_cli.masks.geometry import (
    CLEAR_RADIUS,
    COVER_IDX,
    NOSE_TIP,
    FaceFrame,
    catmull_rom,
    cut_at_level,
    lerp,
    outward_normals,
    quad_bezier,
)
from unmask_cli.masks.render import Design, MaskResult, Strap, Surface, check_image, render
from unmask_cli.masks.variety import bare, freeform, lookalike, restyle, vary_design

LOOP_WHITE = np.array(COLOURS["white"], dtype=np.float64) / 255.0
DARK_COLOURS = {"black", "navy", "charcoal", "burgundy", "teal", "olive", "red"}


# -- shared geometry ------------------------------------------------------------------------------------
def _top_limits(f: FaceFrame, v: float) -> float:
    """Clamp a top-edge height: clear of the eyes, and far enough above the nose tip to cover it."""
    nose_cap = float(f.lm[NOSE_TIP, 1]) - f.cover_margin - 0.09
    return float(max(min(max(v, f.eye_bottom + 0.22), nose_cap), f.eye_bottom + CLEAR_RADIUS + 0.01))


def _chin_drop(f: FaceFrame, rng: np.random.Generator, lo: float, hi: float) -> float:
    """How far below the chin landmark an edge hangs: the cover margin plus a random extra."""
    return f.cover_margin + float(rng.uniform(lo, hi))


def _fit_half_widths(f: FaceFrame, uc: float, vc: float, b: float, a_left: float, a_right: float,
                     width_at) -> tuple[float, float]:
    """Widen a shape centred at (uc, vc) with half-height ``b`` so it holds every covered landmark.

    ``width_at(y)`` is the shape's half-width (as a fraction of a_left / a_right) at the normalised height
    y = (v - vc) / b. Points near the top or bottom tip (narrow there) are left to the vertical extent.
    """
    pts = f.lm[list(COVER_IDX)]
    m = f.cover_margin + 0.01
    for (pu, pv) in pts:
        y = (abs(pv - vc) + m) / b
        if y >= 0.97:
            continue
        frac = float(width_at(float(np.sign(pv - vc) * y)))
        if frac < 0.3:
            continue
        need = (abs(pu - uc) + m) / frac
        if pu < uc:
            a_left = max(a_left, need)
        else:
            a_right = max(a_right, need)
    return a_left, a_right


def _dedupe(points: np.ndarray) -> np.ndarray:
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-6
    return points[keep]


def _jaw_band(f: FaceFrame, v_top_l: float, v_top_r: float, side_off: tuple[float, float],
              chin_off: float) -> np.ndarray:
    """The jaw outline below the given heights (left to right through the chin), pushed outwards.

    The push grows from ``side_off`` (left, right) at the top ends to ``chin_off`` at the chin, so a mask
    hugs the cheeks and hangs a little below the chin.
    """
    lm = f.lm
    jaw = _dedupe(cut_at_level(catmull_rom(lm[0:17], 8), v_top_l, v_top_r))
    centre = np.array([lm[30, 0], lerp(lm[30, 1], lm[8, 1], 0.5)])
    normals = outward_normals(jaw, centre)
    i_chin = int(np.argmax(jaw[:, 1]))
    left = np.arange(len(jaw)) <= i_chin
    v_top = np.where(left, v_top_l, v_top_r)
    w = np.clip((jaw[:, 1] - v_top) / max(lm[8, 1] - min(v_top_l, v_top_r), 1e-3), 0.0, 1.0) ** 2
    side = np.where(left, side_off[0], side_off[1])
    return jaw + normals * (side + (chin_off - side) * w)[:, None]


def _top_edge(start: np.ndarray, peak: np.ndarray, end: np.ndarray, shape: tuple[float, float],
              n: int = 24) -> np.ndarray:
    """Top edge from ``start`` (right end) over ``peak`` (nose bridge) to ``end`` (left end).

    ``shape`` = (a, k): height profile k*x**a + (1-k)*x**3 of the distance x from the peak, so small ``a``
    gives a tent over the nose and the ``x**3`` part bends the edge down into the sides.
    """
    a, k = shape
    x = np.linspace(0.0, 1.0, n)

    def half(tip):
        prof = k * x**a + (1 - k) * x**3
        return np.stack([peak[0] + (tip[0] - peak[0]) * x, peak[1] + (tip[1] - peak[1]) * prof], axis=1)

    right = half(start)[::-1]
    left = half(end)
    return np.vstack([right[1:], left[1:-1]])


def _bottom_profile(outline_lower: np.ndarray):
    """v of the mask bottom as a function of u (the lower outline between its leftmost and rightmost point)."""
    i0 = int(np.argmin(outline_lower[:, 0]))
    i1 = int(np.argmax(outline_lower[:, 0]))
    seg = outline_lower[i0:i1 + 1] if i1 > i0 else outline_lower
    us = np.maximum.accumulate(seg[:, 0]) + np.arange(len(seg)) * 1e-7
    vs = seg[:, 1]
    return lut(lambda u: np.interp(u, us, vs), float(us[0]), float(us[-1]), 1024)


def _side_offsets(f: FaceFrame, rng: np.random.Generator, near: tuple[float, float],
                  far: tuple[float, float]) -> tuple[float, float]:
    """Outward push of the left and right edges: on a turned face the far edge wraps to the silhouette."""
    far_side = f.far_side() if abs(f.yaw) > 0.08 else 0
    offs = []
    for side in (-1, 1):
        lo, hi = far if side == far_side else near
        offs.append(float(rng.uniform(lo, hi)))
    return offs[0], offs[1]


def _loops(f: FaceFrame, corners: dict[int, tuple[np.ndarray, np.ndarray]], width: float,
           colour: np.ndarray) -> tuple[list[Strap], list[int]]:
    """Ear loops: from the upper and lower mask corner of each side towards the ear, hidden on a far side."""
    lm = f.lm
    straps, sides = [], []
    for side, (top, bottom) in corners.items():
        vis = f.side_visibility(side)
        if vis < 0.2:
            continue
        k_top, k_low = (0, 2) if side < 0 else (16, 14)
        ear_top = np.array([lm[k_top, 0] + side * 0.14, lm[k_top, 1] + 0.06])
        ear_low = np.array([lm[k_low, 0] + side * 0.12, lm[k_low, 1] + 0.04])
        for a, b in ((top, ear_top), (bottom, ear_low)):
            b = a + (b - a) * vis
            ctrl = (a + b) / 2 + np.array([side * 0.03, 0.03])
            straps.append(Strap(quad_bezier(a, ctrl, b, 12), width, colour))
        sides.append(side)
    return straps, sides


def _colour(palette: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    name = weighted_pick(STYLE_COLOURS[palette], rng)
    return name, jittered_colour(name, rng)


# Shading against the distance to the outline: (rim depth, rim width, line at, line width, line depth)
SURGICAL_EDGE = edge_shading(0.16, 0.05, 0.075, 0.012, 0.08)  # hem line
N95_EDGE = edge_shading(0.1, 0.02, 0.07, 0.01, 0.12)  # sealing ring
KN95_EDGE = edge_shading(0.08, 0.02, 0.055, 0.009, 0.14)  # welded border
CLOTH_EDGE = edge_shading(0.2, 0.06, 0.05, 0.01, 0.1)  # stitched hem
# Pleat shadow against the distance below the fold line, in shadow widths
PLEAT_SHADOW = lut(lambda d: 1.0 - 0.3 * np.exp(-((d - 1.0) ** 2)), 0.0, 8.0, 1024)


def _half_width_field(u: np.ndarray, centre: float, left: float, right: float) -> np.ndarray:
    """-1..1 across the mask from its left edge through ``centre`` to its right edge."""
    return np.where(u < centre, (u - centre) / max(centre - left, 1e-3), (u - centre) / max(right - centre, 1e-3))


def _lower_face_mask(f: FaceFrame, rng: np.random.Generator, top_range: tuple[float, float],
                     drop_range: tuple[float, float], chin_range: tuple[float, float], shape: tuple[float, float],
                     near: tuple[float, float], far: tuple[float, float]):
    """Outline of a fabric mask tied over the nose and hanging below the chin, following the jaw."""
    lm = f.lm
    t_top = float(rng.uniform(*top_range))
    peak_v = _top_limits(f, lerp(lm[28, 1], lm[29, 1], t_top))
    peak_u = float(lm[28, 0] * 0.6 + lm[29, 0] * 0.4)
    drop = float(rng.uniform(*drop_range))
    chin = _chin_drop(f, rng, *chin_range)
    side_off = _side_offsets(f, rng, near, far)
    side_v = peak_v + drop
    lower = _jaw_band(f, side_v, side_v, side_off, chin)
    top = _top_edge(lower[-1], np.array([peak_u, peak_v]), lower[0], shape)
    outline = np.vstack([lower, top])
    jitter = {"top_t": t_top, "top_drop": drop, "chin_drop": chin, "side_offset": list(side_off)}
    geometry = {"peak": [peak_u, peak_v], "side_top_v": side_v}
    return outline, lower, (peak_u, peak_v), jitter, geometry


def _top_profile(lower: np.ndarray, peak: tuple[float, float], shape: tuple[float, float]):
    """v of the top edge (see _top_edge) as a function of u."""
    a, k = float(shape[0]), float(shape[1])
    pu, pv = float(peak[0]), float(peak[1])
    (lu, lv), (ru, rv) = lower[0].tolist(), lower[-1].tolist()

    def fn(u):
        left = u < pu
        x = np.minimum(np.abs(u - pu) / np.where(left, max(pu - lu, 1e-3), max(ru - pu, 1e-3)), 1.0)
        drop = np.where(left, lv - pv, rv - pv)
        return pv + drop * (k * x**a + (1 - k) * x * x * x)

    return lut(fn, lu, ru, 1024)


def _corner(lower: np.ndarray, v_level: float, side: int) -> np.ndarray:
    """The outline point on one side of ``lower`` nearest to height ``v_level``."""
    i_chin = int(np.argmax(lower[:, 1]))
    part = lower[: i_chin + 1] if side < 0 else lower[i_chin:]
    return part[int(np.argmin(np.abs(part[:, 1] - v_level)))].copy()


# -- styles ---------------------------------------------------------------------------------------------
def design_rect(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    t_top = float(rng.uniform(0.0, 0.8))
    top = _top_limits(f, lerp(lm[28, 1], lm[29, 1], t_top))
    bottom = float(lm[8, 1]) + _chin_drop(f, rng, 0.02, 0.2)
    mid = (top + bottom) / 2
    nose_u = float(lm[30, 0])
    grow = rng.uniform(0.92, 1.1, 2)
    shift = float(rng.uniform(-0.05, 0.05))
    cover_u = f.lm[list(COVER_IDX), 0]
    m = f.cover_margin + 0.03
    left = min(nose_u - (nose_u - float(f.jaw_u(mid, -1))) * grow[0] + shift, float(cover_u.min()) - m)
    right = max(nose_u + (float(f.jaw_u(mid, 1)) - nose_u) * grow[1] + shift, float(cover_u.max()) + m)
    radius = float(rng.uniform(0.0, 0.14))
    body = _rounded_rect(left, top, right, bottom, radius)
    name, colour = _colour("plain", rng)
    centre = (left + right) / 2

    def paint(s: Surface) -> np.ndarray:
        x = _half_width_field(s.u, centre, left, right)
        shade = cylinder_shading(s.light, 0.35, 1.0)(x) * grain(s.u.shape, s.rng, 0.008)
        return finish(colour, shade, s.light)

    params = {"colour": name, "rgb": to_255(colour), "texture": "solid",
              "geometry": {"left": left, "top": top, "right": right, "bottom": bottom, "corner_radius": radius},
              "jitter": {"top_t": t_top, "width_scale": list(grow), "shift": shift}}
    return Design(body, paint, [], params, nose_u)


def _rounded_rect(left, top, right, bottom, radius, n=6) -> np.ndarray:
    radius = min(radius, (right - left) / 2, (bottom - top) / 2)
    if radius <= 1e-3:
        return np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float64)
    pts = []
    for cu, cv, a0 in ((right - radius, top + radius, -90), (right - radius, bottom - radius, 0),
                       (left + radius, bottom - radius, 90), (left + radius, top + radius, 180)):
        ang = np.radians(a0 + np.linspace(0, 90, n))
        pts.append(np.stack([cu + radius * np.cos(ang), cv + radius * np.sin(ang)], axis=1))
    return np.vstack(pts)


def design_oval(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    t_top = float(rng.uniform(0.0, 0.7))
    top = _top_limits(f, lerp(lm[28, 1], lm[29, 1], t_top))
    bottom = float(lm[8, 1]) + _chin_drop(f, rng, 0.03, 0.18)
    shift = float(rng.uniform(-0.04, 0.04))
    uc = float(lerp(lm[30, 0], lm[8, 0], 0.5)) + shift
    vc, b = (top + bottom) / 2, (bottom - top) / 2
    grow = rng.uniform(0.95, 1.12, 2)
    a_left = (uc - float(f.jaw_u(vc, -1))) * grow[0]
    a_right = (float(f.jaw_u(vc, 1)) - uc) * grow[1]
    a_left, a_right = _fit_half_widths(f, uc, vc, b, a_left, a_right, lambda y: math.sqrt(max(1 - y * y, 0.0)))
    phi = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    cu = np.cos(phi)
    body = np.stack([uc + cu * np.where(cu < 0, a_left, a_right), vc + b * np.sin(phi)], axis=1)
    name, colour = _colour("plain", rng)

    def paint(s: Surface) -> np.ndarray:
        x = _half_width_field(s.u, uc, uc - a_left, uc + a_right)
        shade = cylinder_shading(s.light, 0.35, 1.0)(x) * grain(s.u.shape, s.rng, 0.008)
        return finish(colour, shade, s.light)

    params = {"colour": name, "rgb": to_255(colour), "texture": "solid",
              "geometry": {"centre": [uc, vc], "half_width": [a_left, a_right], "half_height": b},
              "jitter": {"top_t": t_top, "width_scale": list(grow), "shift": shift}}
    return Design(body, paint, [], params, uc)


def design_surgical(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    shape = (float(rng.uniform(0.55, 0.8)), 0.7)
    outline, lower, peak, jitter, geometry = _lower_face_mask(
        f, rng, top_range=(0.1, 0.75), drop_range=(0.15, 0.3), chin_range=(0.04, 0.18), shape=shape,
        near=(-0.05, 0.02), far=(0.0, 0.06))
    # pleats run parallel to a smoothed top edge (no kink over the nose)
    top_fn = _top_profile(lower, (peak[0], peak[1] + 0.05), (2.0, 0.75))
    bottom_fn = _bottom_profile(lower)
    n_pleats = 3
    first = float(rng.uniform(0.24, 0.32))
    spacing = float(rng.uniform(0.17, 0.21))
    folds = [first + i * spacing for i in range(n_pleats)]
    name, colour = _colour("surgical", rng)
    loop_colour = colour if name == "black" else LOOP_WHITE * rng.uniform(0.95, 1.0)
    corners = {side: (_corner(lower, geometry["side_top_v"] + 0.04, side),
                      _corner(lower, lm[4 if side < 0 else 12, 1], side)) for side in (-1, 1)}
    straps, loop_sides = _loops(f, corners, 0.022, loop_colour)
    left_u, right_u = float(lower[:, 0].min()), float(lower[:, 0].max())
    pu = peak[0]

    def paint(s: Surface) -> np.ndarray:
        u, v = s.u, s.v
        x = _half_width_field(u, pu, left_u, right_u)
        shade = cylinder_shading(s.light, 0.75)(x)
        vt = top_fn(u)
        height = np.maximum(bottom_fn(u) - vt, np.float32(0.15))
        # pleats: fold k at t = first + k * spacing; p = position (0..1) between fold k and fold k + 1
        rel = ((v - vt) / height - np.float32(first)) * np.float32(1 / spacing)
        k = np.floor(rel)
        p = rel - k
        width = max(0.028, s.px)
        shadow = PLEAT_SHADOW(p * (height * np.float32(spacing / width)))  # thin shadow under the fold
        ramp = np.clip((p - np.float32(0.35)) * np.float32(1 / 0.65), 0.0, 1.0)  # flap catching the light
        shadow = np.where((k >= 0) & (k < n_pleats), shadow, np.float32(1.0))
        ramp = np.where((k >= -1) & (k < n_pleats - 1), ramp, np.float32(0.0))
        shade = shade * shadow * (1.0 + np.float32(0.07) * ramp)
        shade = shade * SURGICAL_EDGE(s.dist) * (1.0 + np.float32(0.035) * value_noise(u, v, 0.3, s.rng))
        return finish(colour, shade * grain(u.shape, s.rng, 0.012), s.light)

    params = {"colour": name, "rgb": to_255(colour), "texture": "pleats",
              "texture_params": {"folds": folds, "loops": loop_sides, "loop_rgb": to_255(loop_colour)},
              "geometry": {**geometry, "top_shape": list(shape)}, "jitter": jitter}
    return Design(outline, paint, straps, params, pu)


def design_n95(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    t_top = float(rng.uniform(0.0, 0.6))
    top = _top_limits(f, lerp(lm[28, 1], lm[29, 1], t_top))
    bottom = float(lm[8, 1]) + _chin_drop(f, rng, 0.03, 0.15)
    uc = float(lerp(lm[30, 0], lm[8, 0], 0.5) + 0.08 * f.yaw)
    vc, b = (top + bottom) / 2, (bottom - top) / 2
    level = float(lerp(lm[33, 1], lm[57, 1], 0.5))
    grow = rng.uniform(0.86, 1.0, 2)
    a_left = max((uc - float(f.jaw_u(level, -1))) * grow[0], 0.55)
    a_right = max((float(f.jaw_u(level, 1)) - uc) * grow[1], 0.55)
    taper = float(rng.uniform(0.18, 0.32))
    power = float(rng.uniform(2.0, 2.5))

    def width_at(y: float) -> float:  # superellipse half-width, narrowed towards the nose
        return max(1 - abs(y) ** power, 0.0) ** (1 / power) * (1 - taper * ((1 - y) / 2) ** 2)

    a_left, a_right = _fit_half_widths(f, uc, vc, b, a_left, a_right, width_at)
    phi = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    cu, sv = np.cos(phi), np.sin(phi)
    yy = np.sign(sv) * np.abs(sv) ** (2 / power)
    xx = np.sign(cu) * np.abs(cu) ** (2 / power) * (1 - taper * ((1 - yy) / 2) ** 2)
    body = np.stack([uc + xx * np.where(xx < 0, a_left, a_right), vc + b * yy], axis=1)
    name, colour = _colour("n95", rng)
    strap_name = weighted_pick([("cream", 0.35), ("white", 0.25), ("sky", 0.2), ("charcoal", 0.2)], rng)
    strap_colour = jittered_colour(strap_name, rng)
    valve = _n95_valve(f, rng, uc, vc, b, a_left, a_right)
    straps = []
    strap_sides = []
    for side in (-1, 1):
        vis = f.side_visibility(side)
        if vis < 0.2:
            continue
        a_side = a_left if side < 0 else a_right
        for yy0, k, dv in ((-0.45, 0 if side < 0 else 16, -0.05), (0.35, 3 if side < 0 else 13, 0.2)):
            xw = width_at(yy0)
            start = np.array([uc + side * (xw * a_side - 0.04), vc + b * yy0])
            end = np.array([lm[k, 0] + side * 0.22, lm[k, 1] + dv])
            end = start + (end - start) * vis
            straps.append(Strap(quad_bezier(start, (start + end) / 2 + np.array([0, -0.02]), end, 10), 0.04,
                                strap_colour))
        strap_sides.append(side)

    def paint(s: Surface) -> np.ndarray:
        u, v = s.u, s.v
        x = (u - uc) / np.where(u < uc, a_left, a_right)
        y = (v - vc) / b
        x = x / np.maximum(1 - taper * ((1 - np.clip(y, -1, 1)) / 2) ** 2, 0.3)
        r2 = x * x + y * y
        k = 0.85
        nz = np.sqrt(np.maximum(1.0 - r2, 0.04))
        nx, ny = k * x, k * y
        rim = s.dist < 0.07  # flattened sealing edge faces the camera
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        nx = np.where(rim, 0.25 * x, nx / norm)
        ny = np.where(rim, 0.25 * y, ny / norm)
        nz = np.where(rim, 0.95, nz / norm)
        shade = lambert(nx, ny, nz, s.light)
        half = s.light.direction + (0.0, 0.0, 1.0)
        hu, hv, hz = (half / np.linalg.norm(half)).tolist()
        spec = np.maximum(nx * hu + ny * hv + nz * hz, 0.0) ** 30 * np.float32(0.07)  # soft sheen of the dome
        shade = shade * N95_EDGE(s.dist)
        shade = shade * (1.0 + 0.025 * value_noise(u, v, 0.12, s.rng)) * grain(u.shape, s.rng, 0.018)
        out = finish(colour, shade.astype(np.float32), s.light) + spec[..., None]
        # nose clip: a thin metal strip along the top edge
        clip_zone = (np.abs(u - uc) < 0.32) & (v < vc - 0.55 * b)
        strip = smoothstep(0.025, 0.03, s.dist) * (1 - smoothstep(0.065, 0.07, s.dist)) * clip_zone
        out = out * (1 - 0.12 * strip[..., None])
        if valve is not None:
            out = _paint_valve(out, s, valve)
        return np.clip(out, 0, 1)

    params = {"colour": name, "rgb": to_255(colour), "texture": "nonwoven",
              "texture_params": {"valve": valve, "straps": strap_sides, "strap_colour": strap_name,
                                 "strap_rgb": to_255(strap_colour)},
              "geometry": {"centre": [uc, vc], "half_width": [a_left, a_right], "half_height": b, "taper": taper,
                           "power": power},
              "jitter": {"top_t": t_top, "width_scale": list(grow)}}
    return Design(body, paint, straps, params, uc)


def _n95_valve(f: FaceFrame, rng: np.random.Generator, uc: float, vc: float, b: float, a_left: float,
               a_right: float) -> dict | None:
    """An exhalation valve on one cheek, on 45 % of N95s (drawn from ``rng`` in a fixed order)."""
    if not rng.random() < 0.45:
        return None
    v_side = int(rng.choice([-1, 1]))
    v_name = weighted_pick([("grey", 0.3), ("white", 0.3), ("sky", 0.15), ("orange", 0.1), ("charcoal", 0.15)], rng)
    v_colour = jittered_colour(v_name, rng)
    a_side = a_left if v_side < 0 else a_right
    radius = float(min(rng.uniform(0.2, 0.26), 0.38 * a_side))
    squeeze = 1.0 - 0.45 * abs(f.yaw) if v_side == f.far_side() else 1.0
    return {"side": v_side, "centre": [uc + v_side * 0.5 * a_side, vc + 0.12 * b], "radius": radius,
            "squeeze": squeeze, "colour": v_name, "rgb": to_255(v_colour)}


def _paint_valve(out: np.ndarray, s: Surface, valve: dict) -> np.ndarray:
    """A shaded disc with slits over the painted N95 (``valve`` from :func:`_n95_valve`)."""
    u, v = s.u, s.v
    cu0, cv0 = valve["centre"]
    ru = valve["radius"] * valve["squeeze"]
    dv = np.sqrt(((u - cu0) / ru) ** 2 + ((v - cv0) / valve["radius"]) ** 2)
    inside = 1 - smoothstep(1 - s.px / ru, 1 + s.px / ru, dv)
    vz = np.sqrt(np.maximum(1 - dv * dv, 0.0))
    vshade = lambert((u - cu0) / ru * 0.5, (v - cv0) / valve["radius"] * 0.5, 0.5 + 0.5 * vz, s.light)
    vshade = vshade * (1 - 0.25 * smoothstep(0.8, 0.95, dv))
    slits = 0.35 * (np.cos((v - cv0) / valve["radius"] * math.pi * 3.5) > 0.55) * (dv < 0.62)
    vcol = finish(np.array(valve["rgb"]) / 255.0, (vshade * (1 - slits)).astype(np.float32), s.light)
    return out * (1 - inside[..., None]) + vcol * inside[..., None]


def design_kn95(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    t_top = float(rng.uniform(0.35, 0.8))
    apex_v = _top_limits(f, lerp(lm[27, 1], lm[29, 1], t_top))
    apex_u = float(lm[28, 0] * 0.5 + lm[29, 0] * 0.5)
    side_drop = float(rng.uniform(0.3, 0.48))
    side_off = _side_offsets(f, rng, (-0.06, 0.0), (-0.01, 0.04))
    chin_drop = _chin_drop(f, rng, 0.04, 0.18) / 0.7  # the pointed bottom: edges slope away from the chin
    side_v = apex_v + side_drop
    band = _jaw_band(f, side_v, side_v, side_off, 0.0)
    bottom = np.array([float(lm[8, 0]), float(lm[8, 1]) + chin_drop])
    low_level = float(rng.uniform(0.55, 0.75))
    corner_v = {side: lerp(side_v, float(lm[8, 1]), low_level) for side in (-1, 1)}
    i_chin = int(np.argmax(band[:, 1]))
    left_side = band[:i_chin + 1]
    right_side = band[i_chin:]
    left_side = left_side[left_side[:, 1] <= corner_v[-1]]
    right_side = right_side[right_side[:, 1] <= corner_v[1]]
    bulge = float(rng.uniform(0.03, 0.09))
    lc, rc = left_side[-1], right_side[0]

    def edge(a, b_, outward):
        mid = (a + b_) / 2
        d = b_ - a
        n = np.array([d[1], -d[0]]) / max(np.linalg.norm(d), 1e-6)
        if np.dot(n, outward) < 0:
            n = -n
        return quad_bezier(a, mid + n * bulge, b_, 12)

    low_l = edge(lc, bottom, np.array([-1.0, 1.0]))
    low_r = edge(bottom, rc, np.array([1.0, 1.0]))
    top = _top_edge(right_side[-1], np.array([apex_u, apex_v]), left_side[0], (1.0, 0.92), n=16)
    body = np.vstack([left_side, low_l[1:], low_r[1:-1], right_side, top])
    name, colour = _colour("kn95", rng)
    fold = float(rng.uniform(0.45, 0.65))  # panel angle (radians) either side of the seam
    loop_colour = colour if name in DARK_COLOURS or name == "pink" else LOOP_WHITE
    corners = {-1: (left_side[0] + np.array([0.02, 0.03]), lc), 1: (right_side[-1] + np.array([-0.02, 0.03]), rc)}
    straps, loop_sides = _loops(f, corners, 0.026, loop_colour)
    left_u, right_u = float(body[:, 0].min()), float(body[:, 0].max())
    seam_top, seam_bottom = np.array([apex_u, apex_v]), bottom

    def paint(s: Surface) -> np.ndarray:
        u, v = s.u, s.v
        t = np.clip((v - seam_top[1]) / (seam_bottom[1] - seam_top[1]), 0, 1)
        seam_u = lerp(seam_top[0], seam_bottom[0], t)
        x = np.where(u < seam_u, (u - seam_u) / np.maximum(seam_u - left_u, 1e-3),
                     (u - seam_u) / np.maximum(right_u - seam_u, 1e-3))
        ang = np.sign(x) * (fold + 0.55 * np.abs(x))
        y = (v - (seam_top[1] + seam_bottom[1]) / 2) / ((seam_bottom[1] - seam_top[1]) / 2)
        nx, nz, ny = np.sin(ang), np.cos(ang), 0.35 * np.clip(y, -1, 1)
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        shade = lambert(nx / norm, ny / norm, nz / norm, s.light)
        seam_d = np.abs(u - seam_u)
        seam_w = max(0.012, 0.8 * s.px)
        shade = shade * (1 - 0.25 * np.exp(-((seam_d / seam_w) ** 2)))
        shade = shade * KN95_EDGE(s.dist)
        weld = (np.cos(s.dist * 2 * math.pi / 0.018) * np.cos((u + v) * 2 * math.pi / 0.03) > 0.6) * (s.dist < 0.05)
        shade = shade * (1 - 0.06 * weld) * grain(u.shape, s.rng, 0.014)
        return finish(colour, shade.astype(np.float32), s.light)

    params = {"colour": name, "rgb": to_255(colour), "texture": "folded",
              "texture_params": {"fold_angle": fold, "loops": loop_sides, "loop_rgb": to_255(loop_colour)},
              "geometry": {"apex": [apex_u, apex_v], "bottom": list(bottom), "side_top_v": side_v,
                           "corner_level": low_level},
              "jitter": {"top_t": t_top, "side_drop": side_drop, "chin_drop": chin_drop, "side_offset": list(side_off),
                         "bulge": bulge}}
    return Design(body, paint, straps, params, apex_u)


CLOTH_TEXTURES = [("solid", 0.2), ("heather", 0.15), ("stripes", 0.18), ("dots", 0.15), ("plaid", 0.17),
                  ("camo", 0.07), ("floral", 0.08)]


def _cloth_albedo(texture: str, tex: dict, colour: np.ndarray, second: np.ndarray, angle: float, s: Surface,
                  su: np.ndarray, sv: np.ndarray) -> np.ndarray:
    """The fabric's colour at the surface coordinates (su: arc length around the cheeks, sv: height)."""
    if texture == "solid":
        return blend(colour, colour * 0.9, 0.5 + 0.5 * value_noise(s.u, s.v, 0.04, s.rng))
    if texture == "heather":
        mix = 0.5 + 0.5 * value_noise(s.u, s.v, 0.025, s.rng)
        return blend(colour * 0.85, np.clip(colour * 1.25 + 0.05, 0, 1), mix)
    if texture == "stripes":
        coord = su * math.sin(angle) + sv * math.cos(angle)
        return blend(colour, second, stripes(coord, tex["period"], tex["duty"], s.px))
    if texture == "dots":
        sp = tex["spacing"]
        return blend(colour, second, dots(su, sv, sp, sp * tex["radius_frac"], s.px))
    if texture == "plaid":
        p = tex["period"]
        h = stripes(sv, p, 0.35, s.px)
        w = stripes(su, p, 0.35, s.px)
        thin = np.maximum(stripes(sv + p * 0.6, p, 0.06, s.px), stripes(su + p * 0.6, p, 0.06, s.px))
        base = blend(colour, second, 0.45 * h + 0.45 * w - 0.2 * h * w)
        third = np.array(tex["third_rgb"]) / 255.0
        return base * (1 - thin[..., None] * 0.8) + third * (thin[..., None] * 0.8)
    if texture == "camo":
        cell = tex["cell"]
        n1 = value_noise(s.u, s.v, cell, s.rng)
        n2 = value_noise(s.u, s.v, cell * 0.7, s.rng)
        palette = [np.array(COLOURS[c]) / 255.0 for c in ("olive", "beige", "charcoal")]
        out = blend(palette[1], palette[0], smoothstep(-0.1, 0.0, n1))
        return blend(out, palette[2] * 1.3, smoothstep(0.25, 0.35, n2))
    # floral: small five-petal flowers on a staggered grid
    sp = tex["spacing"]
    row = np.floor(sv / sp)
    du = np.mod(su + np.where(np.mod(row, 2) == 0, 0.0, sp / 2), sp) - sp / 2
    dv = np.mod(sv, sp) - sp / 2
    r = np.sqrt(du * du + dv * dv)
    petal = sp * (0.22 + 0.1 * np.cos(5 * np.arctan2(dv, du)))
    flower = 1 - smoothstep(petal - s.px, petal + s.px, r)
    centre = 1 - smoothstep(sp * 0.07 - s.px, sp * 0.07 + s.px, r)
    out = blend(colour, second, flower)
    return blend(out, np.array(COLOURS["mustard"]) / 255.0, centre)


def design_cloth(f: FaceFrame, rng: np.random.Generator) -> Design:
    lm = f.lm
    shape = (float(rng.uniform(1.0, 1.4)), 0.8)
    outline, lower, peak, jitter, geometry = _lower_face_mask(
        f, rng, top_range=(0.0, 0.6), drop_range=(0.2, 0.38), chin_range=(0.06, 0.24), shape=shape,
        near=(-0.04, 0.03), far=(0.0, 0.06))
    name, colour = _colour("cloth", rng)
    texture = weighted_pick(CLOTH_TEXTURES, rng)
    dark = name in DARK_COLOURS
    second_name = weighted_pick([("white", 0.5), ("cream", 0.3), ("grey", 0.2)] if dark else
                                [("navy", 0.4), ("black", 0.3), ("burgundy", 0.3)], rng)
    second = jittered_colour(second_name, rng)
    tex = {"name": texture, "second": second_name, "second_rgb": to_255(second)}
    angle = 0.0
    if texture == "stripes":
        angle = float(rng.choice([0.0, 0.0, math.pi / 2, math.pi / 4, -math.pi / 4]))
        tex.update(period=float(rng.uniform(0.08, 0.18)), duty=float(rng.uniform(0.3, 0.55)), angle=angle)
    elif texture == "dots":
        tex.update(spacing=float(rng.uniform(0.1, 0.18)), radius_frac=float(rng.uniform(0.15, 0.3)))
    elif texture == "plaid":
        third = jittered_colour(weighted_pick([("red", 0.3), ("mustard", 0.3), ("white", 0.2), ("teal", 0.2)], rng), rng)
        tex.update(period=float(rng.uniform(0.25, 0.4)), third_rgb=to_255(third))
    elif texture == "camo":
        tex.update(cell=float(rng.uniform(0.18, 0.3)))
    elif texture == "floral":
        tex.update(spacing=float(rng.uniform(0.16, 0.24)))
    seam = bool(rng.random() < 0.5)
    loop_colour = colour
    corners = {side: (_corner(lower, geometry["side_top_v"] + 0.05, side),
                      _corner(lower, lm[4 if side < 0 else 12, 1], side)) for side in (-1, 1)}
    straps, loop_sides = _loops(f, corners, 0.034, loop_colour)
    left_u, right_u = float(lower[:, 0].min()), float(lower[:, 0].max())
    pu = peak[0]
    seam_bottom_u = float(lm[8, 0])

    def paint(s: Surface) -> np.ndarray:
        u, v = s.u, s.v
        x = _half_width_field(u, pu, left_u, right_u)
        half = np.where(u < pu, pu - left_u, right_u - pu)
        su = pu + np.arcsin(np.clip(x, -0.999, 0.999)) * half * 0.8  # arc length around the cheeks
        col = _cloth_albedo(texture, tex, colour, second, angle, s, su, v)
        shade = cylinder_shading(s.light, 0.8)(x) * CLOTH_EDGE(s.dist)
        shade = shade * (1.0 + np.float32(0.05) * value_noise(u, v, 0.25, s.rng))
        if seam:
            t = np.clip((v - peak[1]) / max(float(lm[8, 1]) - peak[1], 1e-3), 0, 1)
            d = u - lerp(pu, seam_bottom_u, t)
            w = max(0.012, 0.8 * s.px)
            seam_line = 1 - 0.3 * np.exp(-((d / w) ** 2))  # stitched seam with a puffed ridge beside it
            shade = shade * seam_line * (1 + 0.06 * np.exp(-(((d - 2.5 * w) / (2 * w)) ** 2)))
        shade = shade * grain(u.shape, s.rng, 0.02)
        return finish(col, shade.astype(np.float32), s.light)

    params = {"colour": name, "rgb": to_255(colour), "texture": texture, "texture_params": {**tex, "seam": seam,
              "loops": loop_sides}, "geometry": {**geometry, "top_shape": list(shape)}, "jitter": jitter}
    return Design(outline, paint, straps, params, pu)


DESIGNS = {
    "rect": design_rect,
    "oval": design_oval,
    "surgical": design_surgical,
    "n95": design_n95,
    "kn95": design_kn95,
    "cloth": design_cloth,
}
# Samples that are not one designed mask: wide free-form holes (for G), and faces with nothing to remove.
SAMPLE_KINDS = {"freeform": freeform, "bare": bare, "lookalike": lookalike}


def make_style(name: str):
    design_fn = DESIGNS[name]

    def style(image: np.ndarray, landmarks68: np.ndarray, rng: np.random.Generator,
              variety: bool = False) -> MaskResult:
        check_image(image)
        check_rng(rng)
        frame = FaceFrame(landmarks68)
        design = design_fn(frame, rng)
        if not variety:
            return render(name, image, landmarks68, frame, design, rng)
        result = render(name, image, landmarks68, frame, vary_design(design, frame, rng), rng)
        return restyle(result, image, frame, rng)

    style.__name__ = f"mask_{name}"
    style.__doc__ = f"Draw a '{name}' mask fitted to the landmarks (``variety``: a varied outline and look, " \
                    "see unmask_cli.masks.variety); see unmask_cli.masks."
    return style


def check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


def make_sample_kind(name: str, fn):
    """A registry entry for the samples that are not one designed mask (free-form holes, bare faces,
    look-alikes): the same call as a style; ``variety`` does not apply to them."""

    def kind(image: np.ndarray, landmarks68: np.ndarray, rng: np.random.Generator,
             variety: bool = False) -> MaskResult:
        check_image(image)
        check_rng(rng)
        return fn(image, landmarks68, rng)

    kind.__name__ = f"mask_{name}"
    kind.__doc__ = fn.__doc__
    return kind
