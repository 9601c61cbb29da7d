"""Networks of the GAN (Din et al. 2020, pix2pix-style building blocks).

* :class:`UNetGenerator` - the editing module: masked RGB + binary map -> RGB in [-1, 1].
* :class:`PatchDiscriminator` - PatchGAN (pix2pix ``NLayerDiscriminator``), logits out; used twice:
  ``D_whole`` judges the whole generated image, ``D_mask`` judges the composite (generated pixels only
  inside the map, the input elsewhere).
* :class:`MapModule` - small U-Net predicting mask-map logits from the masked RGB.

All images are (N, C, H, W) float tensors in [-1, 1]; maps are (N, 1, H, W) in {0, 1}.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unmask_cli.errors import ConfigError


def _width(base: int, level: int, max_mult: int) -> int:
    return base * min(2**level, max_mult)


def unet_depth(image_size: int) -> int:
    """Number of stride-2 levels so that the bottleneck is 1x1 (64 px -> 6, 256 -> 8, 512 -> 9)."""
    depth = int(round(math.log2(image_size)))
    if image_size < 2 or 2**depth != image_size:
        raise ConfigError(f"image size must be a power of two, got {image_size}")
    return depth


class UNetGenerator(nn.Module):
    """pix2pix U-Net with skip connections, one stride-2 level per power of two of ``image_size``.

    Encoder level ``i`` outputs ``ngf * min(2**i, max_mult)`` channels: Conv(k4, s2, p1) preceded by
    LeakyReLU(0.2) and followed by BatchNorm (neither on the first level; no norm on the 1x1 bottleneck,
    where batch statistics of a single image would be degenerate). Decoder levels: ReLU,
    ConvTranspose(k4, s2, p1), BatchNorm (Tanh instead on the outermost level), optional dropout in the
    three innermost decoders, then concatenation with the mirrored encoder output.
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, ngf: int = 64, image_size: int = 256,
                 max_mult: int = 8, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        self.depth = depth = unet_depth(image_size)
        self.image_size = image_size
        widths = [_width(ngf, i, max_mult) for i in range(depth)]
        self.widths = widths

        downs = []
        for i in range(depth):
            c_in = in_channels if i == 0 else widths[i - 1]
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.LeakyReLU(0.2, inplace=False))
            use_norm = 0 < i < depth - 1
            layers.append(nn.Conv2d(c_in, widths[i], kernel_size=4, stride=2, padding=1, bias=not use_norm))
            if use_norm:
                layers.append(nn.BatchNorm2d(widths[i]))
            downs.append(nn.Sequential(*layers))
        self.downs = nn.ModuleList(downs)

        # ups[j] undoes downs[depth-1-j]; its input is the previous decoder output concatenated with the
        # skip connection (except the innermost one, which only sees the bottleneck).
        ups = []
        for j in range(depth):
            i = depth - 1 - j  # encoder level being mirrored
            c_in = widths[i] if j == 0 else 2 * widths[i]
            outermost = i == 0
            c_out = out_channels if outermost else widths[i - 1]
            layers = [nn.ReLU(inplace=False),
                      nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=outermost)]
            if outermost:
                layers.append(nn.Tanh())
            else:
                layers.append(nn.BatchNorm2d(c_out))
                if dropout > 0 and 1 <= j <= 3:
                    layers.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*layers))
        self.ups = nn.ModuleList(ups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"generator built for {self.image_size} px, got input {tuple(x.shape)}")
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[0](skips[-1])
        for j in range(1, self.depth):
            x = self.ups[j](torch.cat([x, skips[self.depth - 1 - j]], dim=1))
        return x


class PatchDiscriminator(nn.Module):
    """pix2pix ``NLayerDiscriminator``: ``n_layers`` stride-2 convs, then two stride-1 convs; logits out."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, max_mult: int = 8):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        prev = ndf
        for n in range(1, n_layers):
            width = ndf * min(2**n, max_mult)
            layers += [nn.Conv2d(prev, width, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)]
            prev = width
        width = ndf * min(2**n_layers, max_mult)
        layers += [nn.Conv2d(prev, width, kernel_size=4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True),
                   nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def map_module_depth(image_size: int) -> int:
    """Down-sampling levels of the map module: bottleneck of 8x8 up to 256 px (3 at 64 px, 5 at 256+)."""
    return max(2, min(5, unet_depth(image_size) - 3))


class MapModule(nn.Module):
    """Small U-Net (double 3x3 conv blocks, max-pool down, transposed-conv up) -> 1-channel map logits."""

    def __init__(self, in_channels: int = 3, nmf: int = 32, image_size: int = 256, max_mult: int = 8):
        super().__init__()
        self.depth = depth = map_module_depth(image_size)
        widths = [_width(nmf, i, max_mult) for i in range(depth + 1)]
        self.enc = nn.ModuleList(
            [_double_conv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in range(depth)]
        )
        self.dec = nn.ModuleList([_double_conv(2 * widths[i], widths[i]) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """pix2pix/DCGAN init: conv weights N(0, std), biases 0; norm weights N(1, std), norm biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def build_generator(cfg) -> UNetGenerator:
    """G of ``cfg`` (masked RGB + map in, RGB out): training and every checkpoint loader build it here."""
    return UNetGenerator(4, 3, cfg.model.ngf, cfg.data.image_size, cfg.model.max_mult, cfg.model.dropout)


def build_map_module(cfg) -> MapModule:
    return MapModule(3, cfg.model.nmf, cfg.data.image_size, cfg.model.max_mult)


def build_networks(cfg) -> dict[str, nn.Module]:
    """``G``, ``D_whole``, ``D_mask`` (and ``M`` when ``cfg.model.map_module``), initialised, on the CPU."""
    m, size = cfg.model, cfg.data.image_size
    if size // 2**m.d_layers < 4:  # two k4/s1 convs follow; the patch map must stay >= 2x2
        deepest = max(1, int(math.log2(size)) - 2)
        raise ConfigError(f"model.d_layers={m.d_layers} is too deep for {size} px images (at most {deepest})")
    nets: dict[str, nn.Module] = {
        "G": build_generator(cfg),
        "D_whole": PatchDiscriminator(3, m.ndf, m.d_layers, m.max_mult),
        "D_mask": PatchDiscriminator(3, m.ndf, m.d_layers, m.max_mult),
    }
    if m.map_module:
        nets["M"] = build_map_module(cfg)
    for net in nets.values():
        init_weights(net)
    return nets


def composite(masked: torch.Tensor, mask: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The edited image users get: the input outside the map, generated pixels inside it."""
    return masked * (1 - mask) + generated * mask


def generator_input(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G's 4-channel input: masked RGB in [-1, 1] and the binary map in {0, 1}."""
    return torch.cat([masked, mask.to(masked.dtype)], dim=1)


@torch.no_grad()
def predict_map(M: nn.Module, masked: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary (N, 1, H, W) float map from the map module (sigmoid > threshold)."""
    return (torch.sigmoid(M(masked).float()) > threshold).to(masked.dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
