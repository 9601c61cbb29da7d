"""Image-quality metrics for ``unmask eval``: PSNR, SSIM and VGG16 feature distance (FD), each for the whole
image and for the masked region only.

Conventions shared by every function here:

* ``pred`` and ``target`` are float tensors in [0, 1] of shape (N, 3, H, W); ``mask`` is (N, 1, H, W) (or
  (N, H, W)) with values in {0, 1}, 1 = the pixels the mask covered (the region the generator had to fill).
* Every function returns a float64 tensor of shape (N,), one value per image; the arithmetic is done in
  float64 so results match scikit-image (which computes in float64) to a few 1e-7.
* A region metric of an image whose mask is empty is NaN (nothing to measure). Aggregate with
  :func:`summarize`, which uses ``nanmean`` and reports how many values were NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unmask_cli.vgg import FeatureExtractor
from unmask_cli.vgg import feature_maps as vgg_feature_maps  # noqa: F401 (the metrics' name for it)

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE = 0) instead of +inf; no 8-bit image pair gets close
SSIM_WIN_SIZE = 11  # Gaussian window, = skimage's gaussian_weights=True, sigma=1.5 (truncate 3.5 -> 11 taps)
SSIM_WIN_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


# --------------------------------------------------------------------------------------------- helpers

def unit_from_uint8(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float64 in [0, 1], exactly u8 / 255: what the metrics compare
    (a VGG gets a float32 copy)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double().div(255.0)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(pred.shape)}")


def _prepare_mask(mask: Tensor, pred: Tensor) -> Tensor:
    """(N,1,H,W) float64 mask in {0,1}, checked against ``pred``."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    n, _, h, w = pred.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != n or tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"mask must be (N, 1, H, W) = ({n}, 1, {h}, {w}), got {tuple(mask.shape)}")
    return (mask.to(device=pred.device, dtype=torch.float64) > 0.5).to(torch.float64)


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Per-image weighted mean of (N,C,H,W) ``values`` with (N,1,H,W) ``weights`` over C, H, W.

    NaN where the weights sum to zero.
    """
    channels = values.shape[1]
    num = (values * weights).flatten(1).sum(1)
    den = weights.flatten(1).sum(1) * channels
    out = num / den.clamp_min(1e-300)
    return torch.where(den > 0, out, torch.full_like(out, math.nan))


def summarize(values: Sequence[float] | Tensor) -> dict:
    """Aggregate per-image values: ``{"mean", "std", "count", "nan"}`` with NaN values left out.

    ``count`` is how many finite values went into the mean; ``nan`` how many were NaN (e.g. empty masks).
    ``mean``/``std`` are None when no value is finite (kept JSON-friendly).
    """
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    valid = t[~torch.isnan(t)]
    count = int(valid.numel())
    return {
        "mean": float(valid.mean()) if count else None,
        "std": float(valid.std(unbiased=False)) if count else None,
        "count": count,
        "nan": int(t.numel() - count),
    }


# ------------------------------------------------------------------------------------------------ PSNR

def psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``10*log10(data_range**2 / MSE)``, shape (N,).

    The data range is fixed (1.0 for [0,1] images), never estimated from the images. Without ``mask`` the
    MSE is the mean over all pixels and channels (as ``skimage.metrics.peak_signal_noise_ratio``); with
    ``mask`` it is the mean over the masked pixels only, all 3 channels of each. Values are capped at
    :data:`PSNR_CAP_DB` (100 dB) so identical images give a finite number. An empty mask gives NaN.
    """
    _check_pair(pred, target)
    err = (pred.to(torch.float64) - target.to(torch.float64)).pow(2)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        mse = _masked_mean(err, _prepare_mask(mask, pred))
    value = 10.0 * torch.log10(data_range ** 2 / mse)  # mse = 0 -> +inf -> capped below; NaN stays NaN
    return torch.where(torch.isnan(value), value, value.clamp(max=PSNR_CAP_DB))


# ------------------------------------------------------------------------------------------------ SSIM

def ssim_window(height: int, width: int) -> int:
    """The SSIM Gaussian window of the metrics and of the training loss: 11 px (skimage's/pytorch_msssim's
    standard) for any side >= 11 px, so the 64-256 px faces of this project all use it; smaller images use
    the largest odd size that fits."""
    side = min(height, width)
    if side >= SSIM_WIN_SIZE:
        return SSIM_WIN_SIZE
    if side < 3:
        raise ValueError(f"image too small for SSIM ({width}x{height})")
    return side if side % 2 == 1 else side - 1


def _gauss_window(win_size: int, channels: int) -> Tensor:
    """pytorch_msssim's 1-D Gaussian window (``_fspecial_gauss_1d``: exp(-x^2 / 2 sigma^2) over
    x = -w//2..w//2, normalised to sum 1), built in float64: its float32 window sums to 1 only within
    ~1e-7, which shifts SSIM by up to ~3e-6 through the variance terms (E[x^2] - mu^2 cancellation)."""
    coords = torch.arange(win_size, dtype=torch.float64) - win_size // 2
    g = torch.exp(-(coords ** 2) / (2 * SSIM_WIN_SIGMA ** 2))
    g = g / g.sum()
    return g.view(1, 1, 1, win_size).repeat(channels, 1, 1, 1)  # (C,1,1,w), the shape pytorch_msssim uses


def ssim_map(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """The SSIM map (N, C, H-w+1, W-w+1), w = :func:`ssim_window`, float64.

    Same Gaussian window, constants (K1=0.01, K2=0.03) and 'valid' convolution as
    ``pytorch_msssim.ssim`` (whose mean over the map is the whole-image SSIM); map entry (i, j) belongs to
    the window centred on pixel (i + w//2, j + w//2).
    """
    from pytorch_msssim.ssim import gaussian_filter

    _check_pair(pred, target)
    x = pred.to(torch.float64)
    y = target.to(torch.float64)
    win = _gauss_window(ssim_window(*x.shape[2:]), x.shape[1]).to(x.device)
    c1 = (SSIM_K[0] * data_range) ** 2
    c2 = (SSIM_K[1] * data_range) ** 2
    mu1 = gaussian_filter(x, win)
    mu2 = gaussian_filter(y, win)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = gaussian_filter(x * x, win) - mu1_sq
    sigma2_sq = gaussian_filter(y * y, win) - mu2_sq
    sigma12 = gaussian_filter(x * y, win) - mu12
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    return ((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map


def ssim(pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image, shape (N,), channels averaged.

    Whole image: ``pytorch_msssim.ssim`` (Gaussian window 11 px, sigma 1.5, K=(0.01, 0.03), no padding:
    the map covers the pixels whose whole window lies inside the image, as skimage's mean does), computed
    in float64. It matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)``.

    Region (``mask`` given): the mean of the same SSIM map over the windows *centred* on a masked pixel:
    the mask is cropped by w//2 px on every side to line up with the valid map. Windows near the mask
    border also see some unmasked pixels (no erosion: a thin mask would otherwise vanish). NaN when no
    masked pixel lies at least w//2 px inside the image border.
    """
    _check_pair(pred, target)
    if mask is None:
        from pytorch_msssim import ssim as _ms_ssim

        x = pred.to(torch.float64)
        y = target.to(torch.float64)
        win = _gauss_window(ssim_window(*x.shape[2:]), x.shape[1]).to(x.device)
        return _ms_ssim(x, y, data_range=data_range, size_average=False, win=win, K=SSIM_K)
    m = _prepare_mask(mask, pred)
    smap = ssim_map(pred, target, data_range)
    pad_h = (m.shape[2] - smap.shape[2]) // 2
    pad_w = (m.shape[3] - smap.shape[3]) // 2
    m = m[:, :, pad_h:pad_h + smap.shape[2], pad_w:pad_w + smap.shape[3]]
    return _masked_mean(smap, m)


# ------------------------------------------------------------------------------------- feature distance

def feature_distance(
    features: torch.nn.Module | FeatureExtractor,
    pred: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = (3, 8, 15, 22),
    mask: Tensor | None = None,
    normalize: bool = True,
    distance: str = "l1",
) -> Tensor:
    """VGG16 feature distance (FD) per image, shape (N,): the mean over ``layers`` of the mean absolute
    (``distance="l1"``) or squared (``"l2"``) difference between the feature maps of ``pred`` and
    ``target`` - the same network and layers as the perceptual loss (see :func:`vgg_feature_maps` for
    ``features``/``layers``/``normalize``). Lower is better; 0 for identical images.

    Region variant (``mask`` given): each layer's difference is averaged with weights = the mask resized to
    that feature map by area interpolation (the share of each feature cell covered by the mask). Features
    near the mask border also see unmasked pixels through their receptive field, so a difference just
    outside the mask still leaks in a little; one farther away than the receptive field does not. NaN for
    an empty mask. Runs under ``torch.no_grad`` on the device of ``pred``.
    """
    _check_pair(pred, target)
    if distance not in ("l1", "l2"):
        raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
    m = _prepare_mask(mask, pred) if mask is not None else None
    n = pred.shape[0]
    param = next(iter(features.parameters()), None) if isinstance(features, torch.nn.Module) else None
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else pred.device
    with torch.no_grad():
        both = torch.cat([pred, target]).to(device=device, dtype=dtype)  # one pass: same kernels for both
        maps = vgg_feature_maps(features, both, layers, normalize)
        per_layer = []
        for fmap in maps:
            diff = (fmap[:n] - fmap[n:]).to(torch.float64)
            diff = diff.abs() if distance == "l1" else diff.pow(2)
            if m is None:
                per_layer.append(diff.flatten(1).mean(1))
            else:
                weights = F.interpolate(m.to(diff.device), size=tuple(fmap.shape[2:]), mode="area")
                per_layer.append(_masked_mean(diff, weights))
    return torch.stack(per_layer, 1).mean(1).to(pred.device)
