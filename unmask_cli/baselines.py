"""Classical baselines for ``unmask eval``: what a GAN has to beat.

Every baseline is ``fn(masked, mask, radius=None) -> uint8 RGB (H, W, 3)`` where ``masked`` is the masked
face (uint8 RGB (H, W, 3)) and ``mask`` the bool (H, W) map (True = pixels to fill). Pixels outside the
mask are returned unchanged, bit for bit.

* ``masked``: the input as it is (the score of doing nothing).
* ``telea``: ``cv2.inpaint`` with ``INPAINT_TELEA`` (fast marching, Telea 2004).
* ``ns``: ``cv2.inpaint`` with ``INPAINT_NS`` (Navier-Stokes, Bertalmio et al. 2001).
* ``biharmonic``: ``skimage.restoration.inpaint_biharmonic`` (smooth biharmonic fill; slower, often the
  strongest of the three on large holes). It takes no radius.

``radius`` is the inpainting neighbourhood in pixels; by default 5 px at 256 px, scaled with the image
size (``round(5 * min(H, W) / 256)``, at least 1): 3 px at 128, 1 px at 64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RADIUS_AT_256 = 5


def default_radius(height: int, width: int) -> int:
    """Inpainting radius: 5 px for a 256 px image, proportional to the smaller side, at least 1."""
    return max(1, int(round(DEFAULT_RADIUS_AT_256 * min(height, width) / 256)))


def _check(masked: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(masked)
    m = np.asarray(mask)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {img.dtype} {img.shape}")
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask is {m.shape}, image is {img.shape[:2]}")
    return np.ascontiguousarray(img), m.astype(bool)


def keep_masked(masked: np.ndarray, mask: np.ndarray, radius: int | None = None) -> np.ndarray:
    """The masked input unchanged (a copy); ``radius`` is ignored."""
    img, _ = _check(masked, mask)
    return img.copy()


def _cv2_inpaint(masked: np.ndarray, mask: np.ndarray, radius: int | None, method: int) -> np.ndarray:
    import cv2

    img, m = _check(masked, mask)
    if not m.any():
        return img.copy()
    r = default_radius(*img.shape[:2]) if radius is None else int(radius)
    if r < 1:
        raise ValueError(f"inpainting radius must be >= 1, got {radius}")
    filled = cv2.inpaint(img, m.astype(np.uint8) * 255, r, method)  # works per channel: RGB order is fine
    return np.where(m[:, :, None], filled, img)


def telea(masked: np.ndarray, mask: np.ndarray, radius: int | None = None) -> np.ndarray:
    """``cv2.inpaint(..., cv2.INPAINT_TELEA)`` inside the mask."""
    import cv2

    return _cv2_inpaint(masked, mask, radius, cv2.INPAINT_TELEA)


def navier_stokes(masked: np.ndarray, mask: np.ndarray, radius: int | None = None) -> np.ndarray:
    """``cv2.inpaint(..., cv2.INPAINT_NS)`` inside the mask."""
    import cv2

    return _cv2_inpaint(masked, mask, radius, cv2.INPAINT_NS)


def biharmonic(masked: np.ndarray, mask: np.ndarray, radius: int | None = None) -> np.ndarray:
    """``skimage.restoration.inpaint_biharmonic`` inside the mask, per channel; ``radius`` is ignored."""
    from skimage.restoration import inpaint_biharmonic

    img, m = _check(masked, mask)
    if not m.any():
        return img.copy()
    filled = inpaint_biharmonic(img, m, channel_axis=-1)  # floats in [0, 1]
    filled = np.clip(np.rint(filled * 255.0), 0, 255).astype(np.uint8)
    return np.where(m[:, :, None], filled, img)


Baseline = Callable[..., np.ndarray]
BASELINES: dict[str, Baseline] = {"masked": keep_masked, "telea": telea, "ns": navier_stokes,
                                   "biharmonic": biharmonic}
