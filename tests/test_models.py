"""Networks, losses, VGG weight loading and device choice (small sizes; CPU)."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unmask_cli.config import load_config
from unmask_cli.device import choose_device, setup_device
from unmask_cli.errors import ConfigError, UnmaskError
from unmask_cli.losses import (
    GeneratorLoss,
    PerceptualLoss,
    adversarial,
    dice_loss,
    discriminator_loss,
    map_loss,
    ssim_index,
    ssim_window,
)
from unmask_cli.models import (
    MapModule,
    PatchDiscriminator,
    UNetGenerator,
    build_networks,
    composite,
    count_parameters,
    generator_input,
    init_weights,
)
from unmask_cli.vgg import IMAGENET_FILE, RANDOM_DESCRIPTION, imagenet_cache_path, load_vgg_features

SHARED_VGG = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg16_features_imagenet.pth"


# tiny networks: one intra-op thread (the conftest fixture)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(*overrides: str):
    return load_config(None, ["data.image_size=64", "model.ngf=8", "model.ndf=8", "model.nmf=8", *overrides])


# --------------------------------------------------------------------------------------------- networks

@pytest.mark.parametrize("size,depth", [(64, 6), (128, 7), (256, 8)])
def test_generator_depth_shapes_and_range(size, depth):
    torch.manual_seed(0)
    G = init_weights(UNetGenerator(4, 3, ngf=8, image_size=size, max_mult=8))
    assert G.depth == depth == int(math.log2(size))
    assert G.widths == [8 * min(2**i, 8) for i in range(depth)]
    bottleneck = {}

    def record(module, inputs, output):
        bottleneck["shape"] = tuple(output.shape)

    G.downs[-1].register_forward_hook(record)
    x = torch.cat([torch.rand(2, 3, size, size) * 2 - 1, (torch.rand(2, 1, size, size) > 0.5).float()], 1)
    y = G(x)
    assert y.shape == (2, 3, size, size)
    assert bottleneck["shape"] == (2, G.widths[-1], 1, 1)
    assert y.min() >= -1 and y.max() <= 1
    assert isinstance(G.ups[-1][-1], nn.Tanh)
    # pix2pix: no norm on the first encoder level, BatchNorm on the inner ones
    assert not any(isinstance(m, nn.BatchNorm2d) for m in G.downs[0].modules())
    assert isinstance(G.downs[1][-1], nn.BatchNorm2d)


def test_generator_width_cap_dropout_and_bad_sizes():
    G = UNetGenerator(4, 3, ngf=4, image_size=128, max_mult=2, dropout=0.5)
    assert G.widths == [4, 8, 8, 8, 8, 8, 8]
    assert sum(isinstance(m, nn.Dropout) for m in G.modules()) == 3
    with pytest.raises(ConfigError):
        UNetGenerator(image_size=96)
    with pytest.raises(ConfigError):
        UNetGenerator(image_size=64, dropout=1.0)
    with pytest.raises(ValueError, match="64 px"):
        UNetGenerator(4, 3, 4, 64)(torch.zeros(1, 4, 32, 32))


def test_patch_discriminator_is_pix2pix_nlayer():
    D = PatchDiscriminator(3, ndf=8, n_layers=3)
    out = D(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert isinstance(D.model[-1], nn.Conv2d)  # logits, no sigmoid
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert PatchDiscriminator(3, 8, n_layers=5, max_mult=2)(torch.randn(1, 3, 128, 128)).shape == (1, 1, 2, 2)
    with pytest.raises(ConfigError, match="too deep"):
        build_networks(small_cfg("model.d_layers=5"))


@pytest.mark.parametrize("size", [64, 128])
def test_map_module_outputs_logit_map(size):
    M = init_weights(MapModule(3, nmf=4, image_size=size))
    out = M(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, size, size)
    assert out.min() < 0 < out.max()  # raw logits


def test_init_statistics():
    torch.manual_seed(0)
    nets = build_networks(load_config(None, ["data.image_size=128", "model.ngf=32", "model.ndf=32"]))
    conv_w, norm_w = [], []
    for net in nets.values():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                conv_w.append(m.weight.detach().flatten())
                if m.bias is not None:
                    assert torch.count_nonzero(m.bias) == 0
            elif isinstance(m, nn.BatchNorm2d):
                norm_w.append(m.weight.detach().flatten())
                assert torch.count_nonzero(m.bias) == 0
    conv_w, norm_w = torch.cat(conv_w), torch.cat(norm_w)
    assert abs(conv_w.mean().item()) < 1e-3
    assert conv_w.std().item() == pytest.approx(0.02, rel=0.02)
    assert norm_w.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert norm_w.std().item() == pytest.approx(0.02, rel=0.15)


def test_build_networks_keys_and_sizes():
    nets = build_networks(small_cfg())
    assert set(nets) == {"G", "D_whole", "D_mask", "M"}
    assert set(build_networks(small_cfg("model.map_module=false"))) == {"G", "D_whole", "D_mask"}
    assert count_parameters(nets["D_whole"]) == count_parameters(nets["D_mask"])
    assert nets["G"].downs[0][0].in_channels == 4
    torch.manual_seed(1)
    first = build_networks(small_cfg())["G"].state_dict()
    torch.manual_seed(1)
    second = build_networks(small_cfg())["G"].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded init is reproducible


def test_composite_and_generator_input():
    masked = torch.full((1, 3, 4, 4), -1.0)
    generated = torch.full((1, 3, 4, 4), 0.5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    out = composite(masked, mask, generated)
    assert torch.all(out[..., 1:3, 1:3] == 0.5)
    assert out.sum() == -1.0 * 3 * 12 + 0.5 * 3 * 4
    x = generator_input(masked, mask.bool())
    assert x.shape == (1, 4, 4, 4) and x.dtype == torch.float32 and torch.equal(x[:, 3:], mask)


# ----------------------------------------------------------------------------------------------- losses

def test_ssim_window_and_index():
    assert ssim_window(64, 64) == 11 and ssim_window(8, 8) == 7 and ssim_window(9, 20) == 9
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert ssim_index(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert ssim_index(noisy, x).item() < 0.9


def test_adversarial_and_map_losses_are_fp32_under_autocast():
    logits = torch.randn(2, 1, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = adversarial(logits.bfloat16(), True)
        fake = adversarial(logits.bfloat16(), False)
    assert real.dtype == fake.dtype == torch.float32
    expected = nn.functional.binary_cross_entropy_with_logits(logits.bfloat16().float(), torch.ones_like(logits))
    assert real.item() == pytest.approx(expected.item(), rel=1e-6)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    perfect = (target * 2 - 1) * 30
    assert dice_loss(perfect, target).item() < 1e-3
    total, parts = map_loss(perfect, target)
    assert total.item() < 1e-3 and set(parts) == {"map_bce", "map_dice"}
    assert map_loss(-perfect, target)[0].item() > 1.5


def test_discriminator_loss_detaches_fake():
    D = PatchDiscriminator(3, 4, 2)
    fake = torch.randn(1, 3, 32, 32, requires_grad=True)
    discriminator_loss(D, torch.randn(1, 3, 32, 32), fake).backward()
    assert fake.grad is None and D.model[0].weight.grad is not None


def test_generator_loss_terms_and_weights():
    torch.manual_seed(0)
    cfg = small_cfg("loss.vgg_layers=[3, 8]")
    features, _ = load_vgg_features("random", cfg.loss.vgg_layers)
    loss = GeneratorLoss(cfg.loss, PerceptualLoss(features, cfg.loss.vgg_layers))
    nets = build_networks(cfg)
    original = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 30:50, 10:50] = 1
    masked = composite(original, mask, torch.zeros_like(original))
    generated = (original + 0.2 * torch.randn_like(original)).clamp(-1, 1)
    total, terms = loss(generated, masked, mask, original, nets["D_whole"], nets["D_mask"])
    c = cfg.loss
    recomposed = (c.lambda_rc * (terms["l1"] + terms["ssim"]) + c.lambda_perc * terms["perc"]
                  + c.lambda_adv_whole * terms["adv_whole"] + c.lambda_adv_mask * terms["adv_mask"])
    assert total.item() == pytest.approx(recomposed.item(), rel=1e-6)
    assert terms["l1"].item() == pytest.approx((generated - original).abs().mean().item(), rel=1e-6)
    assert all(v.item() > 0 for v in terms.values())
    same, same_terms = loss(original, masked, mask, original, nets["D_whole"], nets["D_mask"])
    assert same_terms["l1"].item() == 0 and same_terms["perc"].item() == 0
    assert same_terms["ssim"].item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError):
        GeneratorLoss(cfg.loss, None)


def test_perceptual_loss_uses_imagenet_normalisation_and_frozen_vgg():
    features, _ = load_vgg_features("random", [3])
    P = PerceptualLoss(features, [3])
    assert not any(p.requires_grad for p in P.parameters())
    P.train()
    assert not P.features.training
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    maps = P.feature_maps(x)
    expected = features(((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    assert torch.allclose(maps[0], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------- VGG

def test_vgg_random_truncates_and_freezes():
    features, description = load_vgg_features("random", [3, 8])
    assert description == RANDOM_DESCRIPTION and "RANDOM" in description and "smoke test" in description
    assert len(features) == 9
    assert not features.training and not any(p.requires_grad for p in features.parameters())
    assert not any(getattr(m, "inplace", False) for m in features)


def test_vgg_imagenet_offline_without_cache_gives_one_line_help(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls = []

    def offline(url, dst, *args, **kwargs):  # what urlopen raises without a network
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UnmaskError) as info:
        load_vgg_features("imagenet", [3, 8, 15, 22])
    text = str(info.value)
    assert "\n" not in text
    assert IMAGENET_FILE in text
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in text
    assert "loss.vgg_weights=random" in text and "loss.vgg_weights=/path/to/features.pth" in text
    assert calls and calls[0].endswith(IMAGENET_FILE)


def test_vgg_imagenet_uses_cache_file_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("network used although the cache file exists")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cached = imagenet_cache_path()
    assert cached == tmp_path / "hub" / "checkpoints" / IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference, _ = load_vgg_features("random", [30])
    torch.save({f"features.{k}": v for k, v in reference.state_dict().items()} | {"classifier.0.weight": torch.zeros(2)},
               cached)
    features, description = load_vgg_features("imagenet", [3, 8])
    assert "IMAGENET1K_V1" in description and str(cached) in description
    assert torch.equal(features[0].weight, reference[0].weight)
    cached.write_bytes(b"garbage")
    with pytest.raises(UnmaskError, match="delete the cached file|corrupt|not a PyTorch"):
        load_vgg_features("imagenet", [3])


def test_vgg_weights_file_variants_and_errors(tmp_path):
    torch.manual_seed(4)
    reference, _ = load_vgg_features("random", [30])
    features_file = tmp_path / "features.pth"
    torch.save(reference.state_dict(), features_file)
    whole_file = tmp_path / "whole.pth"
    torch.save({f"features.{k}": v for k, v in reference.state_dict().items()}, whole_file)
    for path in (features_file, whole_file):
        features, description = load_vgg_features(str(path), [3, 8, 15, 22])
        assert len(features) == 23 and str(path) in description and "sha256" in description
        assert torch.equal(features[21].weight, reference[21].weight)

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(UnmaskError) as info:
        load_vgg_features(str(wrong), [3])
    assert "keys do not match" in str(info.value) and str(wrong) in str(info.value) and "\n" not in str(info.value)

    shape = tmp_path / "shape.pth"
    state = dict(reference.state_dict())
    state["0.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(state, shape)
    with pytest.raises(UnmaskError, match="0.weight has shape"):
        load_vgg_features(str(shape), [3])

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(features_file.read_bytes()[:5000])
    with pytest.raises(UnmaskError, match="truncated or corrupt"):
        load_vgg_features(str(truncated), [3])
    with pytest.raises(UnmaskError, match="not found"):
        load_vgg_features(str(tmp_path / "missing.pth"), [3])
    with pytest.raises(UnmaskError, match="layer indices"):
        load_vgg_features("random", [31])


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_VGG.exists(), reason="../shared/weights/vgg16_features_imagenet.pth not present")
def test_vgg_shared_imagenet_features_file():
    from unmask_cli.fileio import read_image

    features, description = load_vgg_features(str(SHARED_VGG), [3, 8, 15, 22])
    assert "sha256" in description and "RANDOM" not in description
    faces = sorted((SHARED_VGG.parents[1] / "faces").glob("*.jpg"))
    if faces:
        rgb = read_image(faces[0])[:224, :224]
    else:  # a smooth synthetic image instead
        rgb = (np.indices((224, 224)).sum(0)[:, :, None] % 255 * np.ones(3)).astype(np.uint8)
    P = PerceptualLoss(features, [3, 8, 15, 22])
    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1
    maps = P.feature_maps(x)
    assert 0.2 < maps[0].mean().item() < 10  # README: relu1_2 mean ~1.2 on natural photos
    shifted = torch.roll(x, shifts=4, dims=3)
    assert P(shifted, x).item() > P(x, x).item() == 0


# ----------------------------------------------------------------------------------------------- device

def test_choose_device_and_cpu_setup(monkeypatch):
    assert choose_device("cpu") == torch.device("cpu")
    setup = setup_device("cpu", amp=True)
    assert not setup.amp and not setup.channels_last and setup.memory_format == torch.contiguous_format
    assert not setup.grad_scaler().is_enabled()
    with setup.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UnmaskError, match="unknown device"):
        choose_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(UnmaskError) as info:
        choose_device("cuda:1")
    assert "CUDA is not available" in str(info.value) and "--device cpu" in str(info.value)
    with pytest.raises(UnmaskError, match="MPS is not available"):
        choose_device("mps")
