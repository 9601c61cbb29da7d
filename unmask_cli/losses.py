"""Training losses.

Generator (Din et al. 2020, editing module)::

    errG = lambda_rc * (L1 + (1 - SSIM)) + lambda_perc * perceptual
           + lambda_adv_whole * adv(D_whole(generated)) + lambda_adv_mask * adv(D_mask(composite))

* L1, SSIM and the perceptual term compare the raw generator output with the original over the whole
  image (so G also learns to reproduce the visible face, and the composite has no seams).
* SSIM: ``pytorch_msssim.ssim`` on [0, 1] images, data_range=1, Gaussian window 11 (sigma 1.5; smaller
  windows for images below 11 px: :func:`unmask_cli.metrics.ssim_window`), computed in fp32.
* Perceptual: mean over ``loss.vgg_layers`` of the mean absolute difference (L1) between VGG16 feature
  maps of output and original; [0, 1] inputs with ImageNet normalisation; the VGG is frozen.
* Adversarial: BCE with logits against "real" labels, always in fp32 (also under autocast).

Discriminators (pix2pix): ``0.5 * (BCE(D(real), 1) + BCE(D(fake.detach()), 0))`` each.
Map module: BCE with logits + soft Dice (1 - 2|P.T| / (|P| + |T|), per image) against the synthetic map.

Warm-up (``loss.warmup_steps``, off by default): the first steps use :func:`reconstruction_only`, i.e.
``lambda_rc * (L1 + (1 - SSIM))`` alone, the cheap part of the step, before the other terms switch on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _ms_ssim
from torch import Tensor, nn

from unmask_cli.metrics import ssim_window
from unmask_cli.models import composite
from unmask_cli.tensors import to_unit
from unmask_cli.vgg import feature_maps

G_TERMS = ("l1", "ssim", "perc", "adv_whole", "adv_mask")


def fp32(x: Tensor) -> contextlib.AbstractContextManager:
    """A region computed in full precision even inside ``torch.autocast``."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def ssim_index(output: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM of two batches in [-1, 1] (computed on [0, 1], data_range=1, fp32)."""
    with fp32(output):
        a, b = to_unit(output.float()), to_unit(target.float())
        return _ms_ssim(a, b, data_range=1.0, size_average=True, win_size=ssim_window(*a.shape[-2:]))


def adversarial(logits: Tensor, real: bool) -> Tensor:
    """BCE-with-logits against an all-real or all-fake target, in fp32."""
    with fp32(logits):
        logits = logits.float()
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)


def discriminator_loss(D: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """pix2pix: 0.5 * (BCE(D(real), 1) + BCE(D(fake.detach()), 0))."""
    return 0.5 * (adversarial(D(real), True) + adversarial(D(fake.detach()), False))


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss per image, averaged: 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)."""
    with fp32(logits):
        p = torch.sigmoid(logits.float()).flatten(1)
        t = target.float().flatten(1)
        dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
        return (1 - dice).mean()


def map_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Map-module loss = BCE with logits + soft Dice (unweighted; the caller applies lambda_map)."""
    with fp32(logits):
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    dice = dice_loss(logits, target)
    return bce + dice, {"map_bce": bce.detach(), "map_dice": dice.detach()}


class PerceptualLoss(nn.Module):
    """Mean over layers of the mean |VGG(output) - VGG(target)| (L1); images in [-1, 1]."""

    def __init__(self, features: nn.Module, layers: Sequence[int]):
        super().__init__()
        self.features = features
        self.layers = sorted({int(i) for i in layers})
        self.features.requires_grad_(False)
        self.features.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:  # the VGG always stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """VGG maps of ``images`` in [-1, 1] (ImageNet-normalised [0, 1] inputs, :func:`vgg.feature_maps`)."""
        return feature_maps(self.features, to_unit(images), self.layers)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            wanted = self.feature_maps(target)
        got = self.feature_maps(output)
        with fp32(output):
            terms = [(g.float() - w.float()).abs().mean() for g, w in zip(got, wanted, strict=True)]
        return torch.stack(terms).mean()


def reconstruction_only(loss_cfg):
    """The loss config of the warm-up (``loss.warmup_steps``): perceptual and adversarial weights 0."""
    return dataclasses.replace(loss_cfg, lambda_perc=0.0, lambda_adv_whole=0.0, lambda_adv_mask=0.0)


class GeneratorLoss(nn.Module):
    """errG and its terms. ``perceptual`` may be None only when ``lambda_perc == 0``."""

    def __init__(self, loss_cfg, perceptual: PerceptualLoss | None):
        super().__init__()
        if perceptual is None and loss_cfg.lambda_perc != 0:
            raise ValueError("a perceptual loss module is needed when lambda_perc != 0")
        self.cfg = loss_cfg
        self.perceptual = perceptual

    def forward(self, generated: Tensor, masked: Tensor, mask: Tensor, original: Tensor,
                D_whole: nn.Module, D_mask: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        zero = generated.new_zeros((), dtype=torch.float32)
        with fp32(generated):
            l1 = (generated.float() - original.float()).abs().mean()
        ssim_term = 1 - ssim_index(generated, original)
        perc = self.perceptual(generated, original) if c.lambda_perc != 0 else zero
        adv_whole = adversarial(D_whole(generated), True) if c.lambda_adv_whole != 0 else zero
        adv_mask = (adversarial(D_mask(composite(masked, mask, generated)), True)
                    if c.lambda_adv_mask != 0 else zero)
        total = (c.lambda_rc * (l1 + ssim_term) + c.lambda_perc * perc
                 + c.lambda_adv_whole * adv_whole + c.lambda_adv_mask * adv_mask)
        terms = {"l1": l1, "ssim": ssim_term, "perc": perc, "adv_whole": adv_whole, "adv_mask": adv_mask}
        return total, {k: v.detach() for k, v in terms.items()}
