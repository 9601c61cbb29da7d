"""Training-step throughput and peak memory of ``unmask train``.

Runs the real ``unmask_cli.training.train_step`` (D step, G step, map-module step, every loss) on random
batches, so data loading is excluded. Each preset runs in a fresh subprocess, so the peak-memory figure
(``ru_maxrss``, minus the RSS before the first step; on CUDA also ``torch.cuda.max_memory_allocated``) is
that preset's alone.

Presets (read from the config files, so they follow them):
  seed      configs/default.yaml: the paper-sized model, 256 px, batch 16, ngf=ndf=64, VGG layers 3,8,15,22
  quick     configs/quick.yaml: the CPU config, 64 px, batch 8, ngf=ndf=16, nmf=8, VGG layers 3,8
  ablation  quick with lambda_perc = lambda_adv_whole = lambda_adv_mask = 0 (the L1+SSIM-only model of
            benchmarks/quality.py): no VGG pass and no discriminator updates

Also timed, after the steps: one update of the EMA of G (``train.ema_decay``), the only per-step cost the
EMA adds, and its share of a step.

VGG weights: the ImageNet features file in ../shared/weights when present, else random VGG (the table
says which; throughput does not depend on the weight values).

    python benchmarks/train_step.py                         # all presets, CPU or the best device
    python benchmarks/train_step.py --presets quick --steps 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_VGG = ROOT.parent / "shared" / "weights" / "vgg16_features_imagenet.pth"

ABLATION = ["loss.lambda_perc=0", "loss.lambda_adv_whole=0", "loss.lambda_adv_mask=0"]
PRESETS = {
    "seed": (ROOT / "configs" / "default.yaml", []),
    "quick": (ROOT / "configs" / "quick.yaml", []),
    "ablation": (ROOT / "configs" / "quick.yaml", ABLATION),
}


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_mb()


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_one(preset: str, args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from unmask_cli.config import load_config
    from unmask_cli.device import setup_device
    from unmask_cli.models import count_parameters
    from unmask_cli.training import build_state, make_ema, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    vgg = args.vgg
    if vgg == "auto":
        vgg = str(SHARED_VGG) if SHARED_VGG.exists() else "random"
    config_file, overrides = PRESETS[preset]
    cfg = load_config(config_file, [*overrides, f"loss.vgg_weights={vgg}"])
    dev = setup_device(args.device, amp=True)
    state = build_state(cfg, dev)  # exactly what a run trains: networks, optimizers, losses, scaler
    nets, description, t = state.nets, state.vgg, cfg.train
    n, size = t.batch_size, cfg.data.image_size
    original = torch.rand(n, 3, size, size) * 2 - 1
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 2: size * 7 // 8, size // 5: size * 4 // 5] = 1
    batch = {"original": original, "mask": mask, "masked": original * (1 - mask) + 0.6 * mask}

    def sync() -> None:
        if dev.device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = _rss_mb()
    if dev.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(batch, state, dev)
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(batch, state, dev)
        sync()
        times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    ema = make_ema(nets["G"], 0.999)
    ema.update_parameters(nets["G"])  # the first update copies G; later ones average
    ema_times = []
    for _ in range(max(args.steps, 10)):
        start = time.perf_counter()
        ema.update_parameters(nets["G"])
        sync()
        ema_times.append(time.perf_counter() - start)
    ema_s = sum(ema_times) / len(ema_times)
    result = {
        "preset": preset, "size": size, "batch": n, "ngf": cfg.model.ngf, "ndf": cfg.model.ndf,
        "nmf": cfg.model.nmf, "vgg_layers": cfg.loss.vgg_layers, "device": dev.describe(),
        "threads": torch.get_num_threads(), "vgg": description,
        "params_M": {k: round(count_parameters(v) / 1e6, 2) for k, v in nets.items()},
        "warmup": args.warmup, "steps": args.steps, "step_s": mean, "min_step_s": min(times),
        "img_per_s": n / mean, "ema_update_s": ema_s, "peak_rss_mb": _peak_mb(), "rss_delta_mb": _peak_mb() - rss_before,
    }
    if dev.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["quick", "ablation", "seed"], choices=list(PRESETS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--vgg", default="auto", help="auto (shared ImageNet file if present, else random), "
                                                     "random, imagenet or a path")
    parser.add_argument("--json", action="store_true", help="print one JSON line per preset instead of a table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_one(args.worker, args)))
        return

    results = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--worker", preset, "--warmup", str(args.warmup), "--steps",
               str(args.steps), "--device", args.device, "--threads", str(args.threads), "--vgg", args.vgg]
        print(f"running {preset} ({args.warmup} warm-up + {args.steps} timed steps) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{preset} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    header = f"{'preset':<8} {'size':>4} {'batch':>5} {'ngf/ndf/nmf':>11} {'G+D+D+M params':>15} " \
             f"{'s/step':>8} {'img/s':>7} {'EMA update':>16} {'peak RSS MB':>11} {'+MB in steps':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        params = f"{sum(r['params_M'].values()):.1f} M"
        print(f"{r['preset']:<8} {r['size']:>4} {r['batch']:>5} {r['ngf']:>4}/{r['ndf']}/{r['nmf']:<3} {params:>15} "
              f"{r['step_s']:>8.2f} {r['img_per_s']:>7.2f} "
              f"{r['ema_update_s'] * 1e3:>7.2f} ms {r['ema_update_s'] / r['step_s']:>5.1%} {r['peak_rss_mb']:>11.0f} {r['rss_delta_mb']:>12.0f}"
              + (f"  cuda peak {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""))
    by_name = {r["preset"]: r for r in results}
    if "quick" in by_name and "ablation" in by_name:
        ratio = by_name["quick"]["step_s"] / by_name["ablation"]["step_s"]
        print(f"quick (GAN) step / ablation (L1+SSIM) step: {ratio:.2f}x "
              "(the extra cost of the VGG pass and the discriminators)")
    first = results[0]
    print(f"device: {first['device']}, {first['threads']} torch threads; VGG: {first['vgg']}; "
          f"{first['warmup']} warm-up + {first['steps']} timed steps; data loading excluded")


if __name__ == "__main__":
    main()
