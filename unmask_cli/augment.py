"""Photo-quality augmentation of the map module's input, drawn afresh at every step (``train.map_augment``).

``prepare.degrade`` bakes one degradation into each sample, the same every epoch. A map module trained on
that still leans on what crisp synthetic masks show (sharp edges, fine print): a real photo that is a
little soft, low in contrast or washed out hides exactly those cues, and its mask is missed. Here every
step redraws, per image, a contrast, brightness and saturation change, a blur or a downscale and upscale,
and sensor noise, on the map module's input only: the map it must find is the same, and the generator
keeps learning from the prepared pixels.

The random numbers come from torch's global CPU generator, which checkpoints capture, so a resumed run
draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _tone(image: torch.Tensor) -> torch.Tensor:
    """Contrast about the image mean, brightness, saturation (0 = grey)."""
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).expand_as(image)
    image = grey + (image - grey) * _uniform(0.0, 1.6)
    mean = image.mean()
    return (image - mean) * math.exp(_uniform(-0.6, 0.4)) + mean + _uniform(-0.25, 0.25)


def _soften(image: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur or a downscale and upscale back (a small face enlarged), in proportion to the size."""
    size = image.shape[-1]
    if float(torch.rand(())) < 0.5:
        sigma = _uniform(0.3, 2.5) * size / 128
        kernel = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    small = max(8, round(size / _uniform(1.5, 4.0)))
    down = F.interpolate(image[None], size=(small, small), mode="area")
    return F.interpolate(down, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


def photometric(x: torch.Tensor, share: float) -> torch.Tensor:
    """``x`` (N, 3, H, W) in [-1, 1]: a share ``share`` of the images, each with its own random chain; the
    rest as they are. Returns a new tensor (no gradient flows through the augmentation)."""
    if share <= 0:
        return x
    out = x.detach().clone()
    for i in range(len(out)):
        if float(torch.rand(())) >= share:
            continue
        image = _tone(out[i].float())
        if float(torch.rand(())) < 0.7:
            image = _soften(image)
        if float(torch.rand(())) < 0.3:
            noise = torch.randn(image.shape).to(image.device)
            image = image + noise * _uniform(0.01, 0.06)
        out[i] = image.clamp(-1, 1).to(out.dtype)
    return out
