"""Scenes around faces whose photo ends inside the crop (``prepare.backdrop``).

Tightly cropped face datasets (UTKFace's 200 px crops, for one) cover only the middle of a crop large
enough to hold a whole mask: the rest is :func:`~unmask_cli.faces.fill_border`'s soft smear. A real photo
has a neck, clothes, a collar and a background there. A map module that has only seen masks beside a smear
learns that as part of what a mask looks like, and misses real masks in real surroundings.
:func:`add_backdrop` paints a random scene where the crop lies outside the source photo: a background
(flat, graded, blotchy or built of blocks, sharp or out of focus), then shoulders in clothes and a neck
under the chin, faded into the photo along its edge. The face is left as it is.
"""

from __future__ import annotations

import cv2
import numpy as np


def _colour(rng: np.random.Generator) -> np.ndarray:
    """Any colour, greys and pale tones as often as vivid ones (walls, shirts, scrubs)."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.choice([rng.integers(0, 60), rng.integers(0, 256)]),
                      rng.integers(20, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _blotches(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency random colour field: a few random colours on a coarse grid, smoothly upscaled."""
    grid = np.stack([_colour(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(S, S, 3) float32 scene behind a person, and its kind."""
    kind = str(rng.choice(["flat", "gradient", "blotches", "blocks"]))
    if kind == "flat":
        scene = np.broadcast_to(_colour(rng), (size, size, 3)).copy()
    elif kind == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = np.cos(rng.uniform(0, 2 * np.pi)) * t[None, :] + np.sin(rng.uniform(0, 2 * np.pi)) * t[:, None]
        ramp = (ramp - ramp.min()) / max(1e-6, float(np.ptp(ramp)))
        scene = _colour(rng) * (1 - ramp[..., None]) + _colour(rng) * ramp[..., None]
    elif kind == "blotches":
        scene = _blotches(size, rng, int(rng.integers(2, 7)))
    else:  # walls, doors, windows, shelves: axis-aligned blocks
        scene = np.broadcast_to(_colour(rng), (size, size, 3)).copy()
        for _ in range(int(rng.integers(2, 9))):
            x0, y0 = rng.integers(-size // 4, size, 2)
            w, h = rng.integers(size // 10, size, 2)
            scene[max(0, y0):y0 + h, max(0, x0):x0 + w] = _colour(rng)
    if rng.random() < 0.6:  # out of focus
        scene = cv2.GaussianBlur(scene, (0, 0), rng.uniform(0.5, 0.05 * size))
    return scene, kind


def _skin(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The face's own skin colour: the median of the cheeks (between the jaw and the nose)."""
    points = np.concatenate([(landmarks[1:5] + landmarks[[31, 31, 48, 48]]) / 2,
                             (landmarks[12:16] + landmarks[[35, 35, 54, 54]]) / 2])
    size = crop.shape[0]
    xy = np.clip(points.round().astype(int), 0, size - 1)
    return np.median(crop[xy[:, 1], xy[:, 0]].astype(np.float32), axis=0)


def _clothes(size: int, rng: np.random.Generator) -> np.ndarray:
    cloth = np.broadcast_to(_colour(rng), (size, size, 3)).astype(np.float32)
    pattern = rng.choice(["plain", "stripes", "blotches"], p=[0.6, 0.2, 0.2])
    if pattern == "stripes":
        period = rng.uniform(0.02, 0.12) * size
        angle = rng.uniform(0, np.pi)
        y, x = np.mgrid[:size, :size].astype(np.float32)
        on = (np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period) > 0)[..., None]
        cloth = np.where(on, cloth, _colour(rng))
    elif pattern == "blotches":
        cloth = 0.5 * cloth + 0.5 * _blotches(size, rng, int(rng.integers(3, 10)))
    folds = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 0.06 * size)
    return cloth * (1 + rng.uniform(0, 2.5) * folds[..., None])


def body(scene: np.ndarray, crop: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shoulders in clothes below the chin and a neck of the face's skin between them, on ``scene``."""
    size = scene.shape[0]
    chin = landmarks[8]
    face_w = float(np.linalg.norm(landmarks[16] - landmarks[0]))
    face_h = float(chin[1] - landmarks[19:25, 1].mean())
    cx = chin[0] + rng.normal(0, 0.1) * face_w
    neck_w = rng.uniform(0.4, 0.65) * face_w
    shoulder_y = chin[1] + rng.uniform(0.1, 0.5) * face_h
    out = scene.copy()
    top = chin[1] - 0.3 * face_h  # from under the jaw: the photo covers it where it reaches
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    shadow = np.clip((rows - chin[1]) / (0.4 * face_h), 0.0, 1.0)  # the chin's shadow fades down the neck
    skin = _skin(crop, landmarks) * (rng.uniform(0.5, 0.8) + rng.uniform(0.1, 0.4) * shadow)
    x0, x1 = int(cx - neck_w / 2), int(cx + neck_w / 2)
    out[int(top):, max(0, x0):max(0, x1)] = np.broadcast_to(skin, out.shape)[int(top):, max(0, x0):max(0, x1)]
    half = rng.uniform(0.8, 1.6) * face_w
    drop = rng.uniform(0.1, 0.5) * face_h
    spread = neck_w * rng.uniform(0.5, 0.8)
    outline = np.int32([[cx - spread, shoulder_y], [cx + spread, shoulder_y], [cx + half, shoulder_y + drop],
                        [cx + 1.4 * half, size + 1], [cx - 1.4 * half, size + 1], [cx - half, shoulder_y + drop]])
    torso = np.zeros((size, size), np.uint8)
    cv2.fillPoly(torso, [outline], 1)
    collar = rng.choice(["crew", "v", "none"], p=[0.4, 0.3, 0.3])
    if collar == "v":  # the skin of the neck shows down to the V
        depth = rng.uniform(0.2, 0.6) * face_h
        tri = np.int32([[cx - spread, shoulder_y], [cx + spread, shoulder_y], [cx, shoulder_y + depth]])
        cv2.fillPoly(torso, [tri], 0)
    elif collar == "crew":
        cv2.ellipse(torso, (int(cx), int(shoulder_y)), (int(spread), int(rng.uniform(0.05, 0.2) * face_h)),
                    0, 0, 180, 0, -1)
    edge = cv2.GaussianBlur(torso.astype(np.float32), (0, 0), rng.uniform(0.5, 2.0))[..., None]
    return out * (1 - edge) + _clothes(size, rng) * edge


def add_backdrop(crop: np.ndarray, inside: np.ndarray, landmarks: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """``crop`` (S, S, 3) uint8 with a random scene where ``inside`` (S, S, the part of the crop inside the
    source photo) is 0; the photo fades into it over a band along its edge (2 to 8 % of the crop). Returns
    it and what was drawn."""
    size = crop.shape[0]
    scene, kind = background(size, rng)
    with_body = bool(rng.random() < 0.85)
    if with_body:
        scene = body(scene, crop, landmarks, rng)
    scene += rng.normal(0, rng.uniform(0, 4), scene.shape).astype(np.float32)  # sensor noise like the photo's
    # the photo fades into the scene over a band along its edge: a hard square edge would be a cue of its own
    depth = cv2.distanceTransform((inside > 0).astype(np.uint8), cv2.DIST_L2, 3)
    alpha = np.clip(depth / (rng.uniform(0.02, 0.08) * size), 0.0, 1.0)[..., None]
    out = crop.astype(np.float32) * alpha + np.clip(scene, 0, 255) * (1 - alpha)
    return np.clip(out.round(), 0, 255).astype(np.uint8), {"backdrop": kind, "body": with_body}
