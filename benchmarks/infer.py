"""Throughput of `unmask infer`: the generator on aligned crops, and whole photos end to end.

    .venv/bin/python benchmarks/infer.py [--size 256] [--ngf 64] [--images 16] [--batch 8] [--rounds 3]
    .venv/bin/python benchmarks/infer.py --photos [--photo-size 128] [--photo-count 12] [--photo-side 640]

``--photos``: `unmask infer` (``run_infer``) end to end on whole photos with one masked face each and
predicted masks (detect, align, map module, generator, paste back, encode), the new path (YuNet + the
visible alignment, a checkpoint of visible-aligned data) against today's (dlib HOG, the CNN where HOG
finds none, a legacy ffhq checkpoint) on the same photos, in interleaved rounds. The photos are the
built-in portraits (augmented, with synthetic masks; `python -m unmask_cli.samples`) scaled to a
``--photo-side`` px long side; the networks are untrained ``--photo-size`` px ones with default widths,
the map module's head biased to mark every pixel (so every face goes through the generator).

Generator mode (default):

Random-init generator (PyTorch's default init, whose activations are O(1) like a trained network's, so
the output difference below is meaningful, plus random BatchNorm statistics, as after training). Variants, measured side by side in interleaved rounds on the same images:

* plain     - model.eval(), torch.no_grad, batch 1, contiguous (NCHW), BatchNorm as is
* +inf/bat  - torch.inference_mode, batches of --batch
* +ch_last  - ... and channels_last weights and inputs
* optimized - ... and BatchNorm folded into the preceding (transposed) convs: ``unmask_cli.inference.Unmasker``,
              the code `unmask infer` runs (pre/post-processing included in every variant alike)

The max abs difference of the generator's [-1, 1] output (optimized vs plain) and of the final uint8
composites is printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from unmask_cli.device import setup_device
from unmask_cli.inference import Unmasker
from unmask_cli.models import UNetGenerator, composite, generator_input

PHOTO_PATHS = {"new: yunet + visible": ("yunet", "visible"), "today: hog+cnn + ffhq": ("hog+cnn", None)}


def _generator(size: int, ngf: int, seed: int = 0) -> UNetGenerator:
    torch.manual_seed(seed)
    G = UNetGenerator(4, 3, ngf, size)
    gen = torch.Generator().manual_seed(seed)
    for m in G.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.05)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(1 + torch.randn(n, generator=gen) * 0.1)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.05)
    return G.eval()


def _inputs(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    maps = np.stack([((xx - size / 2) ** 2 / (0.3 * size) ** 2 + (yy - 0.72 * size) ** 2 / (0.22 * size) ** 2) < 1
                     for _ in range(count)])
    return images, maps


def _plain_batch(G, images: np.ndarray, maps: np.ndarray, channels_last: bool) -> np.ndarray:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(127.5).sub_(1.0)
    m = torch.from_numpy(maps[:, None].astype(np.float32))
    x, m = x.contiguous(memory_format=fmt), m.contiguous(memory_format=fmt)
    out = composite(x, m, G(generator_input(x, m)))
    return out.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run_plain(G, images, maps, batch: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([_plain_batch(G, images[i:i + batch], maps[i:i + batch], False)
                               for i in range(0, len(images), batch)])


def run_inference_mode(G, images, maps, batch: int, channels_last: bool) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([_plain_batch(G, images[i:i + batch], maps[i:i + batch], channels_last)
                               for i in range(0, len(images), batch)])


def run_optimized(net: Unmasker, images, maps, batch: int) -> np.ndarray:
    return np.concatenate([net(images[i:i + batch], maps[i:i + batch])[0] for i in range(0, len(images), batch)])


def _photo_checkpoint(path, size: int, alignment: str | None):
    """An untrained checkpoint at ``size`` px (default widths) whose map module marks every pixel."""
    from unmask_cli.checkpoints import Checkpoint
    from unmask_cli.config import Config
    from unmask_cli.models import build_networks

    cfg = Config()
    cfg.data.image_size = size
    cfg.loss.vgg_weights = "random"
    torch.manual_seed(0)
    nets = build_networks(cfg)
    nets["M"].head.bias.data.fill_(10.0)
    Checkpoint(config=cfg.to_dict(), networks={k: v.state_dict() for k, v in nets.items()}, epoch=1,
               global_step=1, vgg="random", **({"alignment": alignment} if alignment else {})).save(path)
    return path


def _photos(folder, count: int, long_side: int):
    import cv2

    from unmask_cli.demo import write_masked_photos
    from unmask_cli.fileio import read_image, write_image

    paths = write_masked_photos(folder, count)
    for path in paths:
        image = read_image(path)
        scale = long_side / max(image.shape[:2])
        write_image(path, cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
    (folder / "masks").rename(folder.parent / "true_masks")  # maps stay out: infer predicts them
    return paths


def photos_main(args) -> None:
    """End-to-end photos/s of `unmask infer`, new path against today's, interleaved rounds."""
    import tempfile
    from pathlib import Path

    from unmask_cli.config import InferConfig
    from unmask_cli.inference import run_infer

    work = Path(tempfile.mkdtemp(prefix="unmask-infer-bench-"))
    _photos(work / "in", args.photo_count, args.photo_side)
    ckpts = {name: _photo_checkpoint(work / f"{i}.pt", args.photo_size, alignment)
             for i, (name, (_, alignment)) in enumerate(PHOTO_PATHS.items())}
    print(f"{args.photo_count} photos, {args.photo_side} px long side, one masked face each; {args.photo_size} px "
          f"generator (ngf 64), predicted masks; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)

    def run(name: str):
        cfg = InferConfig(checkpoint=str(ckpts[name]), device="cpu", detector=PHOTO_PATHS[name][0], overwrite=True)
        return run_infer(cfg, work / "in", work / "out")

    for name in PHOTO_PATHS:  # warm-up: models loaded once per process, as in a long infer run
        run(name)
    rates: dict[str, list[float]] = {name: [] for name in PHOTO_PATHS}
    faces: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name in (list(PHOTO_PATHS) if round_ % 2 == 0 else list(PHOTO_PATHS)[::-1]):
            summary = run(name)
            rates[name].append(summary.handled / summary.seconds)
            faces[name] = summary.faces
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:.2f}" for n in PHOTO_PATHS) + " photos/s",
              flush=True)
    new, old = (statistics.median(rates[n]) for n in PHOTO_PATHS)
    print(f"\nunmask infer, whole photos, CPU, median of {args.rounds} interleaved rounds")
    for name in PHOTO_PATHS:
        print(f"  {name:<24} {statistics.median(rates[name]):6.2f} photos/s, faces unmasked "
              f"{faces[name]}/{args.photo_count}")
    print(f"  new / today: {new / old:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--photos", action="store_true", help="time whole photos end to end instead")
    parser.add_argument("--photo-size", type=int, default=128, help="generator size for --photos")
    parser.add_argument("--photo-count", type=int, default=12)
    parser.add_argument("--photo-side", type=int, default=640)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.photos:
        photos_main(args)
        return

    G = _generator(args.size, args.ngf)
    G_cl = copy.deepcopy(G).to(memory_format=torch.channels_last)
    net = Unmasker(G, None, args.size, setup_device("cpu", inference=True), fold_bn=True)
    images, maps = _inputs(args.images, args.size)

    variants = {
        "plain (no_grad, b1, NCHW)": lambda: run_plain(G, images, maps, 1),
        f"+inference_mode, b{args.batch}": lambda: run_inference_mode(G, images, maps, args.batch, False),
        "+channels_last": lambda: run_inference_mode(G_cl, images, maps, args.batch, True),
        "+BN folded (Unmasker)": lambda: run_optimized(net, images, maps, args.batch),
    }
    names = list(variants)
    print(f"generator {args.size}px ngf={args.ngf}, {sum(p.numel() for p in G.parameters()) / 1e6:.1f} M params, "
          f"{args.images} images/round, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    run_optimized(net, images[:1], maps[:1], 1)  # warm-up
    run_plain(G, images[:1], maps[:1], 1)
    rates: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]  # alternate the order against drift
        for name in order:
            start = time.perf_counter()
            outputs[name] = variants[name]()
            rates[name].append(args.images / (time.perf_counter() - start))
        print(f"round {round_ + 1}: " + ", ".join(f"{n.split(' ')[0]} {rates[n][-1]:.2f}" for n in names) + " img/s",
              flush=True)

    x = torch.from_numpy(np.ascontiguousarray(images[:args.batch].transpose(0, 3, 1, 2))).float() / 127.5 - 1
    m = torch.from_numpy(maps[:args.batch, None].astype(np.float32))
    with torch.no_grad():
        ref = G(generator_input(x, m))
    with torch.inference_mode():
        fast = net.G(generator_input(x, m).contiguous(memory_format=torch.channels_last))
    diff_g = (ref - fast).abs().max().item()
    spread = f"output range [{ref.min().item():.2f}, {ref.max().item():.2f}], std {ref.std().item():.2f}"
    diff_u8 = int(np.abs(outputs[names[0]].astype(int) - outputs[names[-1]].astype(int)).max())

    base = rates[names[0]]
    print(f"\nunmask infer generator, {args.size}px, CPU, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<28} {'img/s':>7} {'speed-up':>9}")
    for name in names:
        ups = [r / b for r, b in zip(rates[name], base, strict=True)]
        print(f"{name:<28} {statistics.median(rates[name]):>7.2f} {statistics.median(ups):>8.2f}x")
    print(f"\nmax |optimized - plain| on G's [-1, 1] output ({spread}): {diff_g:.2e}; "
          f"on the uint8 composites: {diff_u8}")


if __name__ == "__main__":
    main()
