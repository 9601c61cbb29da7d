"""Photo-quality degradations for training samples (``prepare.degrade``).

The faces a model meets in ``unmask infer`` are often small (upscaled to the model size), blurred, noisy
and JPEG-compressed; synthetic masks drawn on clean crops are crisp. A map module trained only on crisp
masks learns their sharpness, and misses real ones. :func:`degrade_pair` applies one random chain of
degradations (downscale and upscale back, blur, noise, JPEG), identically to the face and to its masked
copy, and keeps the sample's rule that the two are equal outside the map.
"""

from __future__ import annotations

import cv2
import numpy as np


def _chain(image: np.ndarray, ops: dict, noise: np.ndarray | None) -> np.ndarray:
    size = image.shape[1], image.shape[0]
    out = image
    if ops["scale"] > 1.0:
        small = (max(8, round(size[0] / ops["scale"])), max(8, round(size[1] / ops["scale"])))
        out = cv2.resize(cv2.resize(out, small, interpolation=cv2.INTER_AREA), size, interpolation=ops["up"])
    if ops["blur"] > 0:
        out = cv2.GaussianBlur(out, (0, 0), ops["blur"])
    if noise is not None:
        out = np.clip(out.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)
    if ops["jpeg"] < 100:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(ops["jpeg"])])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else out
    return out


def degrade_pair(scene: np.ndarray, masked: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scene, masked) with the same random degradations; outside ``mask`` the masked copy is the
    degraded scene itself. Returns both and the parameters drawn (plain JSON)."""
    ops = {"scale": float(np.exp(rng.uniform(0.0, np.log(4.0)))) if rng.random() < 0.7 else 1.0,
           "up": int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC])),
           "blur": float(rng.uniform(0.4, 1.5)) if rng.random() < 0.3 else 0.0,
           "noise": float(rng.uniform(1.0, 8.0)) if rng.random() < 0.3 else 0.0,
           "jpeg": int(rng.integers(30, 96)) if rng.random() < 0.7 else 100}
    noise = rng.normal(0.0, ops["noise"], scene.shape).astype(np.float32) if ops["noise"] > 0 else None
    scene_d = _chain(scene, ops, noise)
    masked_d = _chain(masked, ops, noise)
    masked_d = np.where(mask[:, :, None], masked_d, scene_d)
    return scene_d, masked_d, {k: round(v, 3) if isinstance(v, float) else v for k, v in ops.items()}
