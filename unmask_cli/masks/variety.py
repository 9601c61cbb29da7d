"""Masks that give nothing away, and faces that wear none.

A model trained on six designed styles learns their outlines (which follow the jaw landmarks, so the map
tells the generator where the chin is) and their few looks. This module widens the distribution:

* :func:`vary_design`: any style's outline grown or shrunk, pulled down onto the neck, up to the nose
  bridge, sideways past the jaw onto the background, tilted, loose or tight (face units, before the
  cover/clearance rules of render.py, so the mouth, nose bottom and chin stay covered and the eyes clear);
* :func:`restyle`: any colour (a hue turn of the whole mask), prints and patterns, logos, folds,
  specular highlights, shadows, see-through and mesh parts, painted inside the map only;
* :func:`freeform`: LaMa-style wide holes (thick random strokes and boxes over the lower face) filled with
  mask-like material, so the generator learns to draw a face from what is visible, not from a hole's shape;
* :func:`bare`: the face as it is, with an empty map (the map module learns to say "no mask");
* :func:`lookalike`: things that look like a mask to a naive model but are part of the scene (beards,
  shadow over the lower face, a hand over the mouth, a scarf or turtleneck below the chin, a microphone):
  the map stays empty and the scene with the look-alike is the target (``MaskResult.scene``).

Nothing here is fitted to any third-party mask generator or data set: shapes and looks are random draws
from broad ranges.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from unmask_cli.masks.geometry import FaceFrame
from unmask_cli.masks.render import Design, MaskResult, Strap, plain

# ------------------------------------------------------------------------------------------- outlines

def _rotate(points: np.ndarray, centre: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return centre + (points - centre) @ np.array([[c, s], [-s, c]])


def vary_design(design: Design, frame: FaceFrame, rng: np.random.Generator) -> Design:
    """A copy of ``design`` with a randomly changed outline (see the module doc); the paint is kept."""
    lm = frame.lm
    body = np.array(design.body, dtype=np.float64)
    centre = body.mean(axis=0)
    scale = np.array([rng.uniform(0.88, 1.2), rng.uniform(0.9, 1.15)])
    tilt = math.radians(rng.uniform(-10.0, 10.0))
    body = _rotate(centre + (body - centre) * scale, centre, tilt)
    mouth_v, chin_v, nose_v = float(lm[57, 1]), float(lm[8, 1]), float(lm[33, 1])
    neck = float(rng.uniform(0.05, 0.5)) if rng.random() < 0.5 else 0.0
    below = np.clip((body[:, 1] - mouth_v) / max(chin_v - mouth_v, 1e-3), 0.0, 1.0) ** 1.5
    body[:, 1] += neck * below
    lift = float(rng.uniform(0.05, 0.35)) if rng.random() < 0.35 else 0.0
    body[:, 1] -= lift * np.clip((nose_v - body[:, 1]) / 0.4, 0.0, 1.0)
    side = float(rng.choice([-1.0, 1.0]))
    reach = float(rng.uniform(0.05, 0.25)) if rng.random() < 0.35 else 0.0
    beyond = np.clip(side * (body[:, 0] - centre[0]) / 0.5, 0.0, None)
    body[:, 0] += side * reach * np.minimum(beyond, 1.5)
    angles = np.arctan2(body[:, 1] - centre[1], body[:, 0] - centre[0])
    wobble = float(rng.uniform(0.0, 0.06))
    waves, phase = int(rng.integers(2, 6)), float(rng.uniform(0, 2 * math.pi))
    body = centre + (body - centre) * (1.0 + wobble * np.sin(waves * angles + phase))[:, None]
    straps = [Strap(_rotate(centre + (s.points - centre) * scale, centre, tilt), s.width, s.colour)
              for s in design.straps]
    varied = {"scale": scale.tolist(), "tilt_deg": math.degrees(tilt), "neck": neck, "lift": lift,
              "reach": side * reach, "wobble": wobble}
    return Design(body, design.paint, straps, {**design.params, "varied": varied}, design.split_u)


# ----------------------------------------------------------------------------------------- appearance

def random_colour(rng: np.random.Generator) -> np.ndarray:
    """Any colour, 0-255 float: hue uniform, saturation and value broad (greys and blacks included)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 255) * rng.uniform(0.3, 1.0),
                      rng.uniform(25, 250)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(sigma, 0.5))


def _pattern(h: int, w: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A 0-1 print over an (h, w) window: stripes, checks, dots, scattered shapes or a logo."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = str(rng.choice(["stripes", "checks", "dots", "shapes", "logo", "noise"]))
    period = max(3.0, scale * float(rng.uniform(0.08, 0.3)))
    angle = float(rng.uniform(0, math.pi))
    a = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    b = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
    if kind == "stripes":
        out = (np.mod(a, 1.0) < rng.uniform(0.2, 0.6)).astype(np.float32)
    elif kind == "checks":
        out = ((np.floor(a) + np.floor(b)) % 2).astype(np.float32)
    elif kind == "dots":
        out = ((np.mod(a, 1.0) - 0.5) ** 2 + (np.mod(b, 1.0) - 0.5) ** 2 < rng.uniform(0.02, 0.1)).astype(np.float32)
    elif kind == "noise":
        small = rng.random((max(2, int(h / period)), max(2, int(w / period)))).astype(np.float32)
        out = (cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) > 0.5).astype(np.float32)
    else:
        out = np.zeros((h, w), np.float32)
        count = 1 if kind == "logo" else int(rng.integers(3, 12))
        for _ in range(count):
            r = scale * float(rng.uniform(0.06, 0.18) if kind == "logo" else rng.uniform(0.02, 0.07))
            cx, cy = float(rng.uniform(0.2, 0.8) * w), float(rng.uniform(0.25, 0.75) * h)
            if rng.random() < 0.5:
                cv2.circle(out, (int(cx), int(cy)), max(1, int(r)), 1.0, -1)
            else:
                pts = np.array([[cx + r * math.cos(t), cy + r * math.sin(t)] for t in
                                np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 7))))], np.int32)
                cv2.fillPoly(out, [pts], 1.0)
            if kind == "logo" and rng.random() < 0.7:  # a word-like bar beside the sign
                x0 = int(cx + 1.3 * r)
                cv2.rectangle(out, (x0, int(cy - 0.3 * r)), (x0 + int(2.5 * r), int(cy + 0.3 * r)), 1.0, -1)
    return out, kind


def restyle(result: MaskResult, image: np.ndarray, frame: FaceFrame, rng: np.random.Generator) -> MaskResult:
    """New looks for a rendered mask, painted inside its map only (outside it the input is kept)."""
    mask = result.mask
    if not mask.any():
        return result
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    region = mask[y0:y1, x0:x1]
    h, w = region.shape
    out = result.masked[y0:y1, x0:x1].astype(np.float32)
    under = image[y0:y1, x0:x1].astype(np.float32)
    scale = frame.scale
    done: list[str] = []
    if rng.random() < 0.6:  # any colour: turn the hue, change saturation and brightness
        hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(0, 180), 180)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 3.0) + rng.uniform(0, 90), 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.35, 1.15), 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        done.append("recolour")
    if rng.random() < 0.45:  # a print: stripes, checks, dots, shapes, a logo
        pattern, kind = _pattern(h, w, scale, rng)
        amount = _soft(pattern, 0.6)[..., None] * rng.uniform(0.5, 1.0)
        out += (random_colour(rng) - out) * amount
        done.append(f"print:{kind}")
    if rng.random() < 0.35:  # folds: soft horizontal bands of shade
        yy = np.arange(h, dtype=np.float32)[:, None]
        period = scale * float(rng.uniform(0.12, 0.35))
        bands = 1.0 + float(rng.uniform(0.06, 0.2)) * np.sin(2 * math.pi * yy / period + rng.uniform(0, 6.3))
        out *= bands[..., None]
        done.append("folds")
    if rng.random() < 0.3:  # a shadow across part of the mask
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
        dark = np.clip(ramp / (0.25 * max(h, w)) + rng.uniform(-0.5, 0.5), 0, 1)
        out *= (1.0 - rng.uniform(0.3, 0.7) * dark)[..., None]
        done.append("shadow")
    if rng.random() < 0.25:  # a specular highlight
        spot = np.zeros((h, w), np.float32)
        cv2.ellipse(spot, (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.7) * h)),
                    (max(1, int(rng.uniform(0.05, 0.2) * w)), max(1, int(rng.uniform(0.03, 0.1) * h))),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        out += _soft(spot, 0.03 * scale)[..., None] * rng.uniform(40, 110)
        done.append("highlight")
    alpha = np.ones((h, w), np.float32)
    if rng.random() < 0.12:  # see-through fabric
        alpha *= rng.uniform(0.55, 0.85)
        done.append("sheer")
    if rng.random() < 0.12:  # mesh: a grid of holes the face shows through
        period = max(2.0, scale * float(rng.uniform(0.03, 0.08)))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        holes = (np.mod(xx, period) < period * 0.45) & (np.mod(yy, period) < period * 0.45)
        alpha = np.where(holes, alpha * rng.uniform(0.0, 0.4), alpha)
        done.append("mesh")
    out = under + (out - under) * alpha[..., None]
    masked = result.masked.copy()
    patch = masked[y0:y1, x0:x1]
    patch[region] = np.clip(out[region] + 0.5, 0, 255).astype(np.uint8)
    return MaskResult(masked, mask, result.style, {**result.params, "restyled": done}, result.scene)


# --------------------------------------------------------------------------------------- free-form

def lower_face_box(frame: FaceFrame, image_shape) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) around the lower face: jaw points 2-14, nose and chin, with a margin."""
    pts = frame.to_image(frame.lm[[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 29, 30]])
    pad = 0.15 * frame.scale
    h, w = image_shape[:2]
    x0, y0 = np.floor(pts.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0) + pad).astype(int)
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


def freeform(image: np.ndarray, landmarks68: np.ndarray, rng: np.random.Generator) -> MaskResult:
    """Wide free-form holes over the lower face (thick strokes and boxes, as LaMa trains with), filled
    with mask-like material; the map is the holes."""
    frame = FaceFrame(landmarks68)
    x0, y0, x1, y1 = lower_face_box(frame, image.shape)
    if x1 - x0 < 4 or y1 - y0 < 4:
        from unmask_cli.errors import BadInput

        raise BadInput("the mask would fall outside the image", reason="mask outside image")
    hole = np.zeros(image.shape[:2], np.uint8)
    scale = frame.scale
    mouth = frame.to_image(frame.lm[48:68]).mean(axis=0)
    strokes = int(rng.integers(1, 5))
    for _ in range(strokes):
        width = max(2, int(scale * rng.uniform(0.2, 0.55)))
        point = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)]) if rng.random() < 0.6 else mouth.copy()
        for _ in range(int(rng.integers(2, 6))):
            angle, length = rng.uniform(0, 2 * math.pi), scale * rng.uniform(0.3, 1.0)
            nxt = np.clip(point + length * np.array([math.cos(angle), math.sin(angle)]), [x0, y0], [x1 - 1, y1 - 1])
            cv2.line(hole, tuple(int(v) for v in point), tuple(int(v) for v in nxt), 1, width)
            point = nxt
    for _ in range(int(rng.integers(0, 3))):
        bw, bh = scale * rng.uniform(0.4, 1.3), scale * rng.uniform(0.3, 1.0)
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        cv2.rectangle(hole, (int(cx - bw / 2), int(cy - bh / 2)), (int(cx + bw / 2), int(cy + bh / 2)), 1, -1)
    # the eyes and brows stay visible, as with every mask
    for idx in (range(36, 42), range(42, 48), range(17, 22), range(22, 27)):
        pts = np.round(landmarks68[list(idx)]).astype(np.int32)
        cv2.fillPoly(hole, [cv2.convexHull(pts)], 0)
        cv2.polylines(hole, [pts], False, 0, max(3, int(0.15 * scale)))
    mask = hole.astype(bool)
    if not mask.any():
        from unmask_cli.errors import BadInput

        raise BadInput("the mask would fall outside the image", reason="mask outside image")
    colour = random_colour(rng)
    shade = 1.0 + 0.08 * _soft(rng.standard_normal(image.shape[:2]).astype(np.float32), 0.05 * scale)
    masked = image.copy()
    masked[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 255).astype(np.uint8)
    area = int(mask.sum())
    result = MaskResult(masked, mask, "freeform", plain({"style": "freeform", "strokes": strokes,
                                                          "rgb": colour.round().tolist(), "area_px": area}))
    return restyle(result, image, frame, rng)


# ---------------------------------------------------------------------------------- no-mask samples

def bare(image: np.ndarray, landmarks68: np.ndarray, rng: np.random.Generator) -> MaskResult:
    """The face as it is: nothing to remove, an empty map."""
    FaceFrame(landmarks68)  # the same landmark checks as every style
    return MaskResult(image.copy(), np.zeros(image.shape[:2], bool), "bare", {"style": "bare"})


LOOKALIKES = ("beard", "shadow", "hand", "scarf", "microphone")


def _skin(image: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Median colour of the cheeks (below the eyes, beside the nose)."""
    pts = frame.to_image(frame.lm[[1, 2, 14, 15, 31, 35]])
    x0, y0 = np.maximum(pts.min(axis=0).astype(int), 0)
    x1, y1 = pts.max(axis=0).astype(int)
    patch = image[y0:max(y0 + 1, y1), x0:max(x0 + 1, x1)].reshape(-1, 3)
    return np.median(patch, axis=0).astype(np.float32) if len(patch) else np.full(3, 150, np.float32)


def _poly(frame: FaceFrame, points_face: np.ndarray, shape) -> np.ndarray:
    canvas = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(canvas, [np.round(frame.to_image(points_face)).astype(np.int32)], 1)
    return canvas.astype(np.float32)


def lookalike(image: np.ndarray, landmarks68: np.ndarray, rng: np.random.Generator) -> MaskResult:
    """A face with something that is not a mask over or below its lower face; the map stays empty. A
    look-alike that falls outside the image (a scarf below a crop that ends at the chin) is drawn again."""
    frame = FaceFrame(landmarks68)
    h, w = image.shape[:2]
    for _ in range(6):
        kind = str(rng.choice(LOOKALIKES))
        scene = np.clip(_draw_lookalike(kind, image, frame, rng) + 0.5, 0, 255).astype(np.uint8)
        if (scene != image).any():
            break
    return MaskResult(scene, np.zeros((h, w), bool), "lookalike", {"style": "lookalike", "kind": kind}, scene=scene)


def _draw_lookalike(kind: str, image: np.ndarray, frame: FaceFrame, rng: np.random.Generator) -> np.ndarray:
    """The scene with one look-alike of ``kind`` drawn in, float32 0-255."""
    lm, scale = frame.lm, frame.scale
    scene = image.astype(np.float32)
    h, w = image.shape[:2]
    if kind == "beard":
        jaw = lm[2:15].copy()
        top = np.array([[lm[12, 0], lm[33, 1] + rng.uniform(0.0, 0.25)], [lm[4, 0], lm[33, 1] + rng.uniform(0.0, 0.25)]])
        region = _soft(_poly(frame, np.vstack([jaw + [0, 0.05], top]), image.shape), 0.06 * scale)
        mouth = _poly(frame, lm[48:60], image.shape) * rng.uniform(0.0, 1.0)
        hair = _soft(rng.random((h, w)).astype(np.float32), 0.4) * 1.6
        colour = np.array([rng.uniform(10, 90)] * 3, np.float32) * np.array([1.0, 0.85, 0.7], np.float32)
        amount = (region * (1 - mouth) * np.clip(hair, 0, 1) * rng.uniform(0.6, 0.95))[..., None]
        scene += (colour - scene) * amount
    elif kind == "shadow":  # dark skin in shadow: the lower face (or one side) much darker
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        centre = frame.to_image(np.array([[rng.uniform(-0.5, 0.5), lm[33, 1] + rng.uniform(0, 0.4)]]))[0]
        angle = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - centre[0]) * math.cos(angle) + (yy - centre[1]) * math.sin(angle)) / (0.3 * scale)
        dark = np.clip(ramp + 0.5, 0, 1) * rng.uniform(0.4, 0.8)
        scene *= (1 - dark)[..., None]
    elif kind == "hand":  # a hand over the mouth, in the face's own skin colour
        cu, cv = lm[62, 0] + rng.uniform(-0.4, 0.4), lm[62, 1] + rng.uniform(-0.1, 0.3)
        palm = np.array([[cu + 0.45 * math.cos(t), cv + 0.35 * math.sin(t)] for t in np.linspace(0, 2 * math.pi, 24)])
        region = _poly(frame, palm, image.shape)
        tilt = rng.uniform(-0.6, 0.6)
        for k in range(4):
            base = np.array([cu - 0.3 + 0.2 * k, cv - 0.2])
            tip = base + np.array([math.sin(tilt), -math.cos(tilt)]) * rng.uniform(0.35, 0.6)
            finger = np.zeros((h, w), np.uint8)
            a, b = frame.to_image(np.vstack([base, tip]))
            cv2.line(finger, tuple(int(v) for v in a), tuple(int(v) for v in b), 1, max(2, int(0.16 * scale)))
            region = np.maximum(region, finger.astype(np.float32))
        region = _soft(region, 0.02 * scale)
        skin = _skin(image, frame) * rng.uniform(0.8, 1.15)
        texture = 1.0 + 0.06 * _soft(rng.standard_normal((h, w)).astype(np.float32), 0.03 * scale)
        scene += (skin * texture[..., None] - scene) * region[..., None]
    elif kind == "scarf":  # a scarf or turtleneck below the chin, never over the mouth
        chin_v = float(lm[8, 1]) + rng.uniform(0.05, 0.2)
        sides = float(rng.uniform(0.9, 1.6))
        outline = np.array([[-sides, chin_v - 0.15], [0, chin_v], [sides, chin_v - 0.15], [sides * 1.5, 4.0],
                            [-sides * 1.5, 4.0]])
        region = _soft(_poly(frame, outline, image.shape), 0.02 * scale)
        pattern, _ = _pattern(h, w, scale, rng)
        colour = random_colour(rng) + (random_colour(rng) - random_colour(rng)) * pattern[..., None] * 0.5
        yy = np.arange(h, dtype=np.float32)[:, None, None]
        folds = 1.0 + 0.1 * np.sin(yy / max(2.0, 0.15 * scale))
        scene += (np.clip(colour * folds, 0, 255) - scene) * region[..., None]
    else:  # a microphone in front of the mouth: a dark ball on a handle
        centre = np.array([lm[62, 0] + rng.uniform(-0.5, 0.5), lm[62, 1] + rng.uniform(0.1, 0.5)])
        radius = rng.uniform(0.2, 0.35)
        region = np.zeros((h, w), np.uint8)
        c_px = frame.to_image(centre[None])[0]
        end = frame.to_image((centre + np.array([rng.uniform(-0.3, 0.3), 1.5]))[None])[0]
        cv2.line(region, tuple(int(v) for v in c_px), tuple(int(v) for v in end), 1, max(2, int(0.18 * scale)))
        cv2.circle(region, tuple(int(v) for v in c_px), max(2, int(radius * scale)), 1, -1)
        colour = np.array([rng.uniform(15, 70)] * 3, np.float32)
        scene += (colour - scene) * _soft(region.astype(np.float32), 0.01 * scale)[..., None]
    return scene
