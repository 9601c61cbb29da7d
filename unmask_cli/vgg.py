"""VGG16 convolutional features for the perceptual loss (and FD), frozen and in eval mode.

``loss.vgg_weights`` chooses the weights:

* ``imagenet`` - torchvision's ``VGG16_Weights.IMAGENET1K_V1`` from torchvision's standard cache
  (``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``), downloaded there once if missing;
* a path - a state dict for the whole ``vgg16()`` or for ``vgg16().features`` (keys ``0.weight`` ...
  ``28.bias``), loaded with ``torch.load(..., weights_only=True)``;
* ``random`` - random initialisation, for smoke tests only (the description says so, and every report
  that records it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from unmask_cli.errors import UnmaskError

IMAGENET_FILE = "vgg16-397923af.pth"
RANDOM_DESCRIPTION = "RANDOM VGG features (smoke test only; perceptual loss and FD are not meaningful)"
N_FEATURE_MODULES = 31  # len(torchvision.models.vgg16().features)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's VGG16 weights expect of [0, 1] RGB inputs
IMAGENET_STD = (0.229, 0.224, 0.225)

FeatureExtractor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def imagenet_cache_path() -> Path:
    """Where torchvision keeps (and looks for) the ImageNet VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def _offline_help() -> str:
    return (f"put torchvision's {IMAGENET_FILE} in {imagenet_cache_path().parent}, or use "
            "--set loss.vgg_weights=/path/to/features.pth (a vgg16 or vgg16().features state dict), "
            "or --set loss.vgg_weights=random for smoke tests")


def _sha256_prefix(path: Path, n: int = 12) -> str:
    from unmask_cli.fileio import sha256_file

    return sha256_file(path)[:n]


def _torch_load_state(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing/corrupt/unsafe files."""
    from unmask_cli.checkpoints import safe_torch_load

    state = safe_torch_load(path, what)
    if not isinstance(state, dict):
        raise UnmaskError(f"{what} is not a state dict (found {type(state).__name__})", path)
    return state


def _features_state(state: dict, path: Path) -> dict:
    """Reduce a whole-vgg16 state dict (``features.N.*``) to a features one (``N.*``)."""
    for key in ("state_dict", "model"):  # common wrappers of training scripts
        if isinstance(state.get(key), dict) and len(state) <= 3:
            return _features_state(state[key], path)
    if any(isinstance(k, str) and k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    return state


def _empty_features() -> nn.Sequential:
    """``vgg16().features`` without building (and initialising) the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    for m in features.modules():  # the same init as torchvision's VGG.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _load_into(features: nn.Sequential, state: dict, path: Path) -> None:
    expected = features.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UnmaskError(
            "not a VGG16 weights file: keys do not match vgg16() or vgg16().features (" + ", ".join(parts) + ")",
            path,
        )
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(value.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise UnmaskError(f"not a VGG16 weights file: {key} has shape {shape}, expected {tuple(value.shape)}",
                              path)
        if not got.is_floating_point():
            raise UnmaskError(f"not a VGG16 weights file: {key} is {got.dtype}, expected floats", path)
        if not torch.isfinite(got).all():
            raise UnmaskError(f"corrupt VGG16 weights: {key} contains NaN or infinity", path)
    features.load_state_dict({k: state[k].float() for k in expected}, strict=True)


def _imagenet_features() -> tuple[nn.Sequential, str]:
    from torchvision.models import VGG16_Weights, vgg16

    cached = imagenet_cache_path()
    if not cached.exists():
        try:
            model = vgg16(weights=VGG16_Weights.IMAGENET1K_V1, progress=False)
        except Exception as err:  # URLError, HTTPError, socket errors, hash mismatch ...
            reason = " ".join(str(getattr(err, "reason", err)).split())[:120] or err.__class__.__name__
            raise UnmaskError(
                f"cannot download the ImageNet VGG16 weights ({reason}); {_offline_help()}"
            ) from err
        return model.features, f"torchvision VGG16 IMAGENET1K_V1 ({cached})"
    # Present in the cache: load it ourselves, always with weights_only=True, and never touch the network.
    features = _empty_features()
    try:
        state = _torch_load_state(cached, "cached ImageNet VGG16 weights")
        _load_into(features, _features_state(state, cached), cached)
    except UnmaskError as err:
        raise UnmaskError(f"{err} - delete the cached file so torchvision downloads it again") from err
    return features, f"torchvision VGG16 IMAGENET1K_V1 ({cached})"


def load_vgg_features(spec: str, layers: Sequence[int]) -> tuple[nn.Module, str]:
    """VGG16 ``features`` cut after ``max(layers)``, frozen and in eval mode, and a one-line description
    of where the weights came from (stored in checkpoints, metrics and reports)."""
    layers = [int(i) for i in layers]
    if not layers or min(layers) < 0 or max(layers) >= N_FEATURE_MODULES:
        raise UnmaskError(f"VGG layer indices must be in 0..{N_FEATURE_MODULES - 1}, got {layers}")
    text = str(spec).strip()
    if text.lower() == "imagenet":
        features, description = _imagenet_features()
    elif text.lower() == "random":
        features, description = _empty_features(), RANDOM_DESCRIPTION
    else:
        if not text:
            raise UnmaskError("loss.vgg_weights is empty; use 'imagenet', 'random' or a weights file path")
        path = Path(os.path.expanduser(text))
        if not path.exists():
            raise UnmaskError("VGG weights file not found (loss.vgg_weights must be 'imagenet', 'random' "
                              "or the path of a vgg16 / vgg16().features state dict)", path)
        state = _torch_load_state(path, "VGG weights")
        features = _empty_features()
        _load_into(features, _features_state(state, path), path)
        description = f"VGG16 features from {path.resolve()} (sha256 {_sha256_prefix(path)})"
    features = features[: max(layers) + 1]
    for module in features:  # a captured layer output must not be overwritten by the next in-place ReLU
        if isinstance(module, nn.ReLU):
            module.inplace = False
    features.eval()
    features.requires_grad_(False)
    return features, description


# ------------------------------------------------------------------------------------------- features

@functools.lru_cache(maxsize=16)
def _imagenet_stats(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Built in float64 and cast: the same constants in float32, float16 and bfloat16 as a float32 buffer
    # cast to them, and exact in float64. Cached per device, so training steps copy nothing to a GPU.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1).to(device=device, dtype=dtype)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1).to(device=device, dtype=dtype)
    return mean, std


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> ImageNet-normalised, in the dtype and on the device of ``images``."""
    mean, std = _imagenet_stats(images.device, images.dtype)
    return (images - mean) / std


def feature_maps(features: nn.Module | FeatureExtractor, images: torch.Tensor, layers: Sequence[int] | None,
                 normalize: bool = True) -> list[torch.Tensor]:
    """Feature maps of ``images`` ([0, 1], (N, 3, H, W)): the one VGG pass of the perceptual loss, FD and
    ``unmask eval``.

    ``features`` is a ``vgg16().features``-style ``nn.Sequential`` with ``layers`` = indices into it (the
    output of module ``i`` is taken; e.g. 3, 8, 15, 22 = relu1_2, relu2_2, relu3_3, relu4_3), or, with
    ``layers=None``, any callable returning the list of feature maps. ``normalize`` applies the ImageNet
    mean/std first. Runs with whatever grad mode the caller has.
    """
    x = imagenet_normalize(images) if normalize else images
    if layers is None:
        out = features(x)
        return [out] if isinstance(out, torch.Tensor) else list(out)
    wanted = sorted({int(i) for i in layers})
    if not wanted:
        raise ValueError("no VGG layers given")
    modules = list(features.children()) if isinstance(features, nn.Module) else list(features)
    if wanted[0] < 0 or wanted[-1] >= len(modules):
        raise ValueError(f"VGG layer indices must be in 0..{len(modules) - 1}, got {list(layers)}")
    maps = []
    for index, module in enumerate(modules[: wanted[-1] + 1]):
        if maps and maps[-1] is x and getattr(module, "inplace", False):
            x = x.clone()  # torchvision's in-place ReLU would overwrite a captured conv output
        x = module(x)
        if index in wanted:
            maps.append(x)
    return maps
