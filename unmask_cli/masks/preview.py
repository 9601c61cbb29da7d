"""Contact sheet of synthetic masks: original | masked | map triplets, laid out by torchvision's make_grid."""

from __future__ import annotations

import cv2
import numpy as np


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    shrink = img.shape[0] > height or img.shape[1] > width
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def preview_sheet(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ncol_triplets: int = 2) -> np.ndarray:
    """One RGB uint8 image showing each (original, masked, mask bool) triplet side by side.

    ``ncol_triplets`` triplets share a grid row. Every tile is resized to the first original's size; maps are
    drawn white on black.
    """
    import torch
    from torchvision.utils import make_grid

    if not rows:
        raise ValueError("preview_sheet needs at least one (original, masked, mask) row")
    if ncol_triplets < 1:
        raise ValueError(f"ncol_triplets must be >= 1, got {ncol_triplets}")
    height, width = rows[0][0].shape[:2]
    tiles = []
    for original, masked, mask in rows:
        mask_rgb = np.repeat((np.asarray(mask, dtype=bool).astype(np.uint8) * 255)[:, :, None], 3, axis=2)
        for img in (original, masked, mask_rgb):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"preview tiles must be RGB uint8 (H, W, 3), got {img.dtype} {img.shape}")
            tiles.append(torch.from_numpy(np.ascontiguousarray(_fit(img, height, width))).permute(2, 0, 1))
    grid = make_grid(torch.stack(tiles), nrow=3 * ncol_triplets, padding=2, pad_value=255)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())
