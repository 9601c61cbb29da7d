"""Turn a mask design (outline + strings + paint function, in face units) into pixels and a binary map.

Invariants enforced here for every style:
* the map is exactly the set of pixels that may change: pixels outside it are copied from the input;
* soft edges (anti-aliasing, feathering) only lower the opacity *inside* the map;
* the map covers the nose bottom, the mouth and the chin (the outline is grown when needed) and never
  touches the eyes or brows (the outline is pushed down, then those pixels are cleared as a last resort);
* only the window around the mask is processed, so the cost follows the face size, not the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from unmask_cli.errors import BadInput
from unmask_cli.masks.appearance import Lighting, estimate_lighting, finish
from unmask_cli.masks.geometry import (
    CLEAR_IDX,
    CLEAR_RADIUS,
    COVER_IDX,
    FaceFrame,
    clear_of,
    densify,
    ensure_cover,
)

SHIFT = 4  # sub-pixel bits for cv2 drawing
MIN_COVERAGE = 64  # anti-aliased coverage (of 255) from which a pixel belongs to the map


@dataclass
class MaskResult:
    masked: np.ndarray  # uint8 (H, W, 3) RGB
    mask: np.ndarray  # bool (H, W), True = masked pixel
    style: str
    params: dict = field(default_factory=dict)  # JSON-serialisable description of the mask
    # the face the model should give back; None = the input image. A look-alike (a beard, a hand) is part
    # of the scene, so its scene is the altered image and its map is empty.
    scene: np.ndarray | None = None


@dataclass
class Strap:
    """A thin band (ear loop, head strap) drawn as a polyline; part of the map."""

    points: np.ndarray  # (N, 2) face units
    width: float  # face units
    colour: np.ndarray  # (3,) 0-1, before lighting


@dataclass
class Surface:
    """What a paint function sees: the body pixels of the map (1-D arrays, one entry per pixel)."""

    u: np.ndarray  # (n,) float32 face u of each pixel centre
    v: np.ndarray  # (n,) float32
    dist: np.ndarray  # (n,) float32 distance to the body edge, face units
    px: float  # one pixel in face units
    light: Lighting
    rng: np.random.Generator


@dataclass
class Design:
    body: np.ndarray  # closed outline, face units
    paint: Callable[[Surface], np.ndarray]  # -> (n, 3) float32 lit colour in [0, 1]
    straps: list[Strap] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    split_u: float = 0.0  # u of the nose line, to compare light on the two cheeks


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image must be an RGB uint8 array (H, W, 3), got {dtype} {shape}")


def _fixed(points_px: np.ndarray, x0: int, y0: int) -> np.ndarray:
    return np.round((points_px - (x0, y0)) * (1 << SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _forbidden(frame: FaceFrame, landmarks: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Eyes (filled, dilated) and brows of the window: pixels a mask never touches."""
    canvas = np.zeros((h, w), np.uint8)
    pad = int(math.ceil(0.06 * frame.scale)) + 1
    thickness = 2 * pad + 1
    for idx in (range(36, 42), range(42, 48)):
        pts = _fixed(landmarks[list(idx)], x0, y0)
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_8, shift=SHIFT)
        cv2.polylines(canvas, [pts], True, 255, thickness, cv2.LINE_8, shift=SHIFT)
    for idx in (range(17, 22), range(22, 27)):
        cv2.polylines(canvas, [_fixed(landmarks[list(idx)], x0, y0)], False, 255, thickness, cv2.LINE_8,
                      shift=SHIFT)
    return canvas > 0


def render(style: str, image: np.ndarray, landmarks: np.ndarray, frame: FaceFrame, design: Design,
           rng: np.random.Generator) -> MaskResult:
    height, width = image.shape[:2]
    scale = frame.scale
    lm = np.asarray(landmarks, dtype=np.float64)

    # 1. constraints on the outline, in face units
    body = densify(design.body, 0.03)
    body, cover_fixed = ensure_cover(body, frame.lm[list(COVER_IDX)], frame.cover_margin)
    clear_pts = frame.lm[list(CLEAR_IDX)]
    body = clear_of(densify(body, 0.03), clear_pts, CLEAR_RADIUS)
    straps = [Strap(clear_of(densify(s.points, 0.05, closed=False), clear_pts, CLEAR_RADIUS + s.width), s.width,
                    s.colour) for s in design.straps]

    # 2. pixel window around everything drawn
    body_px = frame.to_image(body)
    strap_px = [frame.to_image(s.points) for s in straps]
    strap_w = [max(1, int(round(s.width * scale))) for s in straps]
    extent = np.vstack([body_px, *strap_px])
    margin = 3 + max(strap_w, default=0)
    x0 = max(0, int(math.floor(extent[:, 0].min())) - margin)
    y0 = max(0, int(math.floor(extent[:, 1].min())) - margin)
    x1 = min(width, int(math.ceil(extent[:, 0].max())) + margin + 1)
    y1 = min(height, int(math.ceil(extent[:, 1].max())) + margin + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise BadInput("the mask would fall outside the image", reason="mask outside image")
    w, h = x1 - x0, y1 - y0

    # 3. coverage (anti-aliased) and the binary map; straps of one colour share a canvas
    body_alpha = np.zeros((h, w), np.uint8)
    cv2.fillPoly(body_alpha, [_fixed(body_px, x0, y0)], 255, cv2.LINE_AA, shift=SHIFT)
    strap_groups: dict[tuple, np.ndarray] = {}
    for s, pts, sw in zip(straps, strap_px, strap_w, strict=True):
        key = tuple(float(c) for c in s.colour)
        canvas = strap_groups.setdefault(key, np.zeros((h, w), np.uint8))
        cv2.polylines(canvas, [_fixed(pts, x0, y0)], False, 255, sw, cv2.LINE_AA, shift=SHIFT)
    forbidden = _forbidden(frame, lm, x0, y0, w, h)
    body_map = (body_alpha >= MIN_COVERAGE) & ~forbidden
    if not body_map.any():
        raise BadInput("the mask would fall outside the image", reason="mask outside image")
    window_map = body_map.copy()
    strap_maps = []
    for key, canvas in strap_groups.items():
        m = (canvas >= MIN_COVERAGE) & ~window_map & ~forbidden
        window_map |= m
        strap_maps.append((np.array(key), canvas, m))

    # 4. paint the body pixels: face coordinates, distance to the edge, lighting from the covered skin
    ys, xs = np.nonzero(body_map)
    u, v = frame.pixels_to_local(xs + x0, ys + y0)
    dist_px = cv2.distanceTransform(np.pad(body_map.view(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1][body_map]
    window = image[y0:y1, x0:x1]
    under = window[body_map].astype(np.float32)  # 0-255
    step = max(1, len(u) // 4000)  # a few thousand pixels are plenty for the lighting statistics
    light = estimate_lighting(image, under[::step] * np.float32(1 / 255), u[::step], design.split_u)
    colour = design.paint(Surface(u, v, dist_px / np.float32(scale), 1.0 / scale, light, rng))

    # 5. composite: opacity = coverage x feather ramp (inside the map only)
    feather_px = np.float32(1.0 + 0.004 * scale)
    alpha = body_alpha[body_map].astype(np.float32) * np.float32(1 / 255) * np.minimum(dist_px / feather_px, 1.0)
    masked = image.copy()
    target = masked[y0:y1, x0:x1]
    target[body_map] = _blend(under, colour, alpha)
    for strap_colour, canvas, m in strap_maps:
        sc = finish(strap_colour, np.full(1, 0.92, np.float32), light)
        target[m] = _blend(window[m].astype(np.float32), sc, canvas[m].astype(np.float32) * np.float32(1 / 255))
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = window_map

    params = {
        "style": style,
        **design.params,
        "roll_deg": math.degrees(frame.roll),
        "yaw": frame.yaw,
        "yaw_deg": frame.yaw_deg,
        "scale_px": scale,
        **light.to_params(),
        "cover_grown": bool(cover_fixed),
        "window": [x0, y0, x1, y1],  # pixel box that was processed (map + margin, clipped)
        "area_px": int(window_map.sum()),
    }
    return MaskResult(masked=masked, mask=mask, style=style, params=plain(params))


def _blend(under: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Rounded uint8 of under + (255 * colour - under) * alpha; ``under`` 0-255 float32, colour 0-1."""
    out = colour * np.float32(255.0) - under
    out *= alpha[:, None]
    out += under
    out += np.float32(0.5)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def plain(value):
    """JSON-friendly copy: numpy scalars/arrays to Python types, floats rounded to 5 decimal places."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 5)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot describe {type(value).__name__} in mask params")
