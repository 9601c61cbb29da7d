"""Generator throughput of `unmask infer` on aligned crops: plain eager fp32 vs the optimized path.

    .venv/bin/python benchmarks/infer.py [--size 256] [--ngf 64] [--images 16] [--batch 8] [--rounds 3]

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

from unmask_cli.inference import Unmasker
from unmask_cli.models import UNetGenerator, composite, generator_input


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    G = _generator(args.size, args.ngf)
    G_cl = copy.deepcopy(G).to(memory_format=torch.channels_last)
    net = Unmasker(G, None, args.size, torch.device("cpu"), fold_bn=True)
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
