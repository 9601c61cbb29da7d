"""Images <-> tensors, one convention everywhere: networks see (N, 3, H, W) floats in [-1, 1], files and
metrics see (N, H, W, 3) uint8. Losses, metrics, training samples, eval and infer all convert here."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) * 0.5


def from_uint8(images: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 -> (N, 3, H, W) or (3, H, W) float32 in [-1, 1] (u8 / 127.5 - 1).
    A tensor keeps its device; the NHWC buffer becomes a channels_last view, no copy."""
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    t = t.permute(0, 3, 1, 2) if t.dim() == 4 else t.permute(2, 0, 1)
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded like a saved 8-bit image."""
    x = images.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())


def unit_to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] (e.g. a torchvision ``make_grid``) -> (H, W, 3) uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
