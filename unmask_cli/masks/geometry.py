"""Face geometry for fitting masks: a landmark-derived face frame, smooth curves, cover/clearance constraints.

Everything a style designs lives in *face units*: ``u`` runs along the eye line (towards landmark 16's side),
``v`` runs down towards the chin, both measured in inter-ocular distances (eye centre to eye centre), with
the origin between the eyes. A 64 px crop and a 1024 px photo therefore get the same design; only the final
conversion to pixels (:meth:`FaceFrame.to_image`) knows the image size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from unmask_cli.errors import BadInput

# dlib / iBUG 68-point indices
JAW = tuple(range(0, 17))
BROWS = tuple(range(17, 27))
EYES = tuple(range(36, 48))
MOUTH = tuple(range(48, 68))
NOSE_TIP = 30
NOSE_BOTTOM = tuple(range(31, 36))
CHIN = 8
# What every mask must hide, and what it must leave visible. The nose tip (30) is aimed for by every design
# (top edges stay above it) but not forced: on a face tilted down it projects close to the eyes.
COVER_IDX = (*NOSE_BOTTOM, CHIN, *MOUTH)
CLEAR_IDX = (*BROWS, *EYES)

COVER_MARGIN = 0.04  # face units kept between a covered landmark and the mask edge (plus 1.5 px)
CLEAR_RADIUS = 0.13  # face units the designed outline keeps away from eye and brow landmarks
MAX_COORD = 1e6  # landmarks further out than this (px) are nonsense


class FaceFrame:
    """Face-aligned coordinates built from 68 landmarks (see module docstring).

    Attributes: ``scale`` (inter-ocular distance in px), ``roll`` (radians, eye-line angle in the image),
    ``lm`` (the 68 landmarks in face units), ``yaw`` (-1..1: where the nose tip sits between the jaw
    extremes 0 and 16; > 0 means the nose is nearer landmark 16, so the 16 side is the far side).
    """

    def __init__(self, landmarks: np.ndarray):
        lm = np.asarray(landmarks, dtype=np.float64)
        if lm.shape != (68, 2):
            raise ValueError(f"landmarks must have shape (68, 2), got {lm.shape}")
        if not np.isfinite(lm).all() or np.abs(lm).max() > MAX_COORD:
            raise BadInput("face landmarks are not finite numbers", reason="bad landmarks")
        left_eye = lm[36:42].mean(axis=0)
        right_eye = lm[42:48].mean(axis=0)
        delta = right_eye - left_eye
        self.scale = float(math.hypot(delta[0], delta[1]))
        if self.scale < 4.0:
            raise BadInput(f"face too small for a mask (eye distance {self.scale:.1f} px)", reason="face too small")
        self.roll = math.atan2(delta[1], delta[0])
        cos, sin = math.cos(self.roll), math.sin(self.roll)
        self.rot = np.array([[cos, sin], [-sin, cos]])  # image offsets -> face axes
        self.origin = (left_eye + right_eye) / 2.0
        self.lm = self.to_local(lm)
        loc = self.lm
        jaw_width = loc[16, 0] - loc[0, 0]
        if not (jaw_width > 0.8 and loc[CHIN, 1] > 0.6 and loc[51, 1] > loc[33, 1] > 0.1):
            raise BadInput("face landmarks are not in a plausible face layout", reason="bad landmarks")
        t = (loc[30, 0] - loc[0, 0]) / jaw_width
        self.yaw = float(np.clip(2.0 * t - 1.0, -1.0, 1.0))
        # A head as a cylinder with the nose tip ~30% of its radius in front: offset = 1.3 * sin(yaw angle).
        self.yaw_deg = float(math.degrees(math.asin(float(np.clip(self.yaw / 1.3, -1.0, 1.0)))))
        self.eye_bottom = float(loc[list(EYES), 1].max())
        # distance (face units) the outline keeps from covered landmarks: COVER_MARGIN + 1.5 px
        self.cover_margin = COVER_MARGIN + 1.5 / self.scale
        self._jaw_left = _monotone(loc[0:9])
        self._jaw_right = _monotone(loc[16:7:-1])

    # -- coordinate conversion -------------------------------------------------------------------------
    def to_local(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.origin) @ self.rot.T / self.scale

    def to_image(self, points: np.ndarray) -> np.ndarray:
        return self.origin + (np.asarray(points, dtype=np.float64) * self.scale) @ self.rot

    def pixels_to_local(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face coordinates (u, v) of pixel centres given by integer columns/rows, float32."""
        (a, b), (c, d) = (self.rot / self.scale).tolist()
        dx = xs.astype(np.float32) - np.float32(self.origin[0])
        dy = ys.astype(np.float32) - np.float32(self.origin[1])
        return (a * dx + b * dy).astype(np.float32), (c * dx + d * dy).astype(np.float32)

    # -- landmark-derived measurements -----------------------------------------------------------------
    def jaw_u(self, v: float | np.ndarray, side: int) -> float | np.ndarray:
        """u of the jaw outline at height ``v`` on the left (side -1, landmarks 0-8) or right (+1, 16-8)."""
        pts = self._jaw_left if side < 0 else self._jaw_right
        return np.interp(v, pts[:, 1], pts[:, 0])

    def far_side(self) -> int:
        return 1 if self.yaw > 0 else -1

    def side_visibility(self, side: int) -> float:
        """1 for a frontal face; falls towards 0 for the side turned away from the camera."""
        return 1.0 if side != self.far_side() else float(np.clip(1.0 - 2.5 * abs(self.yaw), 0.0, 1.0))


def _monotone(points: np.ndarray) -> np.ndarray:
    """Jaw half-outline with strictly increasing v (for interpolation)."""
    pts = points.copy()
    pts[:, 1] = np.maximum.accumulate(pts[:, 1]) + np.arange(len(pts)) * 1e-6
    return pts


def lerp(a, b, t):
    return a + (b - a) * t


def catmull_rom(points: np.ndarray, samples: int = 8, closed: bool = False) -> np.ndarray:
    """A smooth curve through ``points`` (centripetal-free uniform Catmull-Rom), ``samples`` per segment."""
    p = np.asarray(points, dtype=np.float64)
    if closed:
        ext = np.vstack([p[-1], p, p[0], p[1]])
    else:
        ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[None, :, None]
    p0, p1, p2, p3 = ext[:-3, None], ext[1:-2, None], ext[2:-1, None], ext[3:, None]
    curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                   + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    curve = curve.reshape(-1, 2)
    return curve if closed else np.vstack([curve, p[-1]])


def quad_bezier(a, control, b, n: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, control, b = (np.asarray(x, dtype=np.float64) for x in (a, control, b))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * control + t**2 * b


def densify(poly: np.ndarray, max_step: float, closed: bool = True) -> np.ndarray:
    """Insert points so no segment is longer than ``max_step``."""
    pts = np.asarray(poly, dtype=np.float64)
    nxt = np.roll(pts, -1, axis=0) if closed else pts[1:]
    cur = pts if closed else pts[:-1]
    counts = np.maximum(1, np.ceil(np.linalg.norm(nxt - cur, axis=1) / max_step).astype(np.int64))
    seg = np.repeat(np.arange(len(cur)), counts)
    starts = np.cumsum(counts) - counts
    frac = (np.arange(counts.sum()) - starts[seg]) / counts[seg]
    out = cur[seg] + (nxt[seg] - cur[seg]) * frac[:, None]
    return out if closed else np.vstack([out, pts[-1:]])


def outward_normals(curve: np.ndarray, centre: np.ndarray) -> np.ndarray:
    tangent = np.gradient(curve, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    flip = np.sum(normal * (curve - centre), axis=1) < 0
    normal[flip] *= -1
    return normal


def cut_at_level(curve: np.ndarray, v_left: float, v_right: float) -> np.ndarray:
    """Part of a left-to-right curve (jaw) below v_left on its left end and below v_right on its right end.

    Ends are interpolated exactly at the requested heights; if the curve starts lower than asked, the end is
    extended straight up (in face units) to that height.
    """
    v = curve[:, 1]
    i_lo = int(np.argmax(curve[:, 1]))  # lowest point (chin) splits the two halves

    def end(indices, level):
        # walk from the chin outwards until the curve rises above ``level``
        prev = indices[0]
        for i in indices[1:]:
            if v[i] < level:
                t = (level - v[prev]) / (v[i] - v[prev]) if v[i] != v[prev] else 0.0
                return prev, curve[prev] + (curve[i] - curve[prev]) * t
            prev = i
        top = curve[prev]
        return prev, np.array([top[0], min(level, top[1])])

    li, left_pt = end(list(range(i_lo, -1, -1)), v_left)
    ri, right_pt = end(list(range(i_lo, len(curve))), v_right)
    return np.vstack([left_pt, curve[li:ri + 1], right_pt])


def signed_distances(poly: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of each point to the polygon's edge, positive inside."""
    contour = np.asarray(poly, dtype=np.float32).reshape(-1, 1, 2)
    return np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in points])


def ensure_cover(poly: np.ndarray, required: np.ndarray, margin: float) -> tuple[np.ndarray, bool]:
    """Grow ``poly`` (convex hull with the margin-expanded points) if it misses a required point."""
    inside = signed_distances(poly, required)
    missing = required[inside < margin]
    if len(missing) == 0:
        return poly, False
    angles = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (margin * 1.05)
    extra = (missing[:, None, :] + ring[None]).reshape(-1, 2)
    pts = np.vstack([poly, extra]).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2).astype(np.float64)
    return hull, True


def clear_of(points: np.ndarray, forbidden: np.ndarray, radius: float) -> np.ndarray:
    """Push points straight down (+v) until they are ``radius`` below/away from every forbidden point.

    Works on densified outlines: only top-edge points can come near the eyes, and moving them down keeps the
    outline below the eyes. Points already clear are returned unchanged.
    """
    pts = np.array(points, dtype=np.float64)
    du = pts[:, None, 0] - forbidden[None, :, 0]
    near = np.abs(du) < radius
    floor = np.where(near, forbidden[None, :, 1] + np.sqrt(np.maximum(radius**2 - du**2, 0.0)), -np.inf)
    pts[:, 1] = np.maximum(pts[:, 1], floor.max(axis=1))
    return pts
