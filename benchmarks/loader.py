"""Training DataLoader throughput: samples/s delivered with the PNG path and the decoded-sample cache.

The loader is the one ``unmask train`` builds (``unmask_cli.training._loader``: ``ReportingDataset``,
the error-aware collate, pin_memory on CUDA, the worker init) over ``PairedDataset(root, "train", size,
cache=...)``, fed by the trainer's epoch order (``EpochBatches``, or ``EpochSampler`` in older trainers). One measurement is one training epoch as the trainer
runs it: a fresh DataLoader (the trainer makes one per epoch, so worker start-up is included), every full
batch of the split, each tensor moved to the device (``DeviceSetup.batch``) and, on CUDA, synchronised.
No model runs, so the figure is the most samples/s the input pipeline can feed a training step.

Every (path, workers) configuration runs once per round, the rounds interleaved, and the tables give the
median, so load from other processes spreads over all configurations alike. Two tables: samples/s of wall
clock, and samples per CPU-second of all processes (main + workers, from ``getrusage``), which depends
much less on what else the machine runs and says how many cores a given GPU rate needs. The cache is built (or found
valid) before the rounds; its build time is printed separately.

Data: ``--data ROOT`` (a prepared folder), else ``runs/loader_data``, prepared on first use with

    unmask prepare --source ../shared/utkface --out runs/loader_data --num-samples 600 --size 256 \\
        --workers 2 --mask-types surgical,cloth,n95

    python benchmarks/loader.py                                  # PNG vs cache, 0/1/2 workers, 256 px, batch 16
    python benchmarks/loader.py --workers 0,2,4,8 --rounds 5 --device cuda --json out.json

With 0 workers the batches are made in the main process with torch's intra-op threads; on a machine
whose cores are busy with other work those threads wait on each other, so compare ``--threads 1`` too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "runs" / "loader_data"
UTKFACE = ROOT.parent / "shared" / "utkface"


def ensure_data(root: Path, source: Path) -> None:
    """Prepare the benchmark set with the CLI (resumable) unless ``root`` already holds a manifest."""
    if (root / "manifest.jsonl").exists():
        return
    if not source.is_dir():
        sys.exit(f"no prepared data at {root} and no source photos at {source}; pass --data or --source")
    unmask = Path(sys.executable).with_name("unmask")
    cmd = [str(unmask) if unmask.exists() else "unmask", "prepare", "--source", str(source), "--out", str(root),
           "--num-samples", "600", "--size", "256", "--workers", "2", "--mask-types", "surgical,cloth,n95"]
    print("preparing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_epoch(dataset, batch_size: int, workers: int, dev, epoch: int) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of all processes) for one trainer-style epoch over ``dataset``."""
    import torch

    from unmask_cli import training

    _, count = training.epoch_plan(len(dataset), batch_size, 0)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    if hasattr(training, "EpochBatches"):  # the trainer's batch sampler (one process: rank 0 of 1)
        batches = training.EpochBatches(len(dataset), 0, epoch, count, batch_size)
        loader = training._loader(dataset, batches, workers, dev, epoch)
    else:  # the trainer before the batch sampler: a sample sampler and a batch size
        sampler = training.EpochSampler(len(dataset), 0, epoch, count)
        loader = training._loader(dataset, batch_size, sampler, workers, dev, epoch)
    samples = 0
    for batch in loader:
        batch = training._check_batch(batch)
        for key in ("masked", "mask", "original"):
            dev.batch(batch[key])
        samples += int(batch["masked"].shape[0])
    if dev.device.type == "cuda":
        torch.cuda.synchronize(dev.device)
    wall = time.perf_counter() - start
    del loader  # the exhausted iterator has joined its workers, so their CPU time is counted now
    gc.collect()
    return samples, wall, _cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help=f"prepared folder (default {DEFAULT_DATA})")
    parser.add_argument("--source", type=Path, default=UTKFACE, help="photos to prepare the default set from")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    parser.add_argument("--paths", default="png,cache", help="comma list: png, cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (where batches are moved to)")
    parser.add_argument("--gpu-rate", type=float, default=400.0,
                        help="img/s a GPU trains the seed model at, to compare the loader with")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads of the main process (default: torch's, as in training)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from unmask_cli.data import PairedDataset, cache_paths
    from unmask_cli.device import setup_device

    root = args.data or DEFAULT_DATA
    if args.data is None:
        ensure_data(root, args.source)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = setup_device(args.device)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not set(paths) <= {"png", "cache"}:
        parser.error("--paths takes png and/or cache")

    datasets = {}
    for path in paths:
        start = time.perf_counter()
        record = cache_paths(root, "train", args.image_size)[1]
        before = record.stat().st_mtime_ns if record.exists() else None
        datasets[path] = PairedDataset(root, "train", args.image_size, cache=path == "cache")
        seconds = time.perf_counter() - start
        if path == "cache":
            built = not record.exists() or record.stat().st_mtime_ns != before
            print(f"cache {'built' if built else 'found valid'} in {seconds:.1f} s: {cache_paths(root, 'train', args.image_size)[0]}")
    n = len(datasets[paths[0]])
    print(f"{root}: {n} train samples at {args.image_size} px, batch {args.batch_size}, device {dev.describe()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in the main process, "
          f"{args.rounds} interleaved rounds (median)", flush=True)

    rates: dict[tuple[str, int], list[float]] = {(p, w): [] for p in paths for w in workers}
    per_cpu: dict[tuple[str, int], list[float]] = {(p, w): [] for p in paths for w in workers}
    for round_ in range(args.rounds):
        for path in paths:
            for w in workers:
                samples, wall, cpu = one_epoch(datasets[path], args.batch_size, w, dev, round_)
                rates[(path, w)].append(samples / wall)
                per_cpu[(path, w)].append(samples / max(cpu, 1e-9))
                print(f"  round {round_ + 1}: {path:5s} {w} workers  {samples / wall:8.1f} samples/s  "
                      f"{samples / max(cpu, 1e-9):8.1f} samples per CPU-second", flush=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    median_cpu = {key: statistics.median(values) for key, values in per_cpu.items()}
    for title, table in (("samples/s (wall clock)", median),
                         ("samples per CPU-second (all processes; what one core sustains)", median_cpu)):
        print(f"\n{title}\n")
        print("| path | " + " | ".join(f"{w} workers" for w in workers) + " |")
        print("|---|" + "---:|" * len(workers))
        for path in paths:
            print(f"| {path} | " + " | ".join(f"{table[(path, w)]:.0f}" for w in workers) + " |")
    print()
    for path in paths:
        best_w = max(workers, key=lambda w: median[(path, w)])
        best = median[(path, best_w)]
        verdict = "keeps up with" if best >= args.gpu_rate else "would starve"
        per_core = max(median_cpu[(path, w)] for w in workers if w > 0) if any(w > 0 for w in workers) else \
            median_cpu[(path, workers[0])]
        print(f"{path}: best {best:.0f} samples/s here ({best_w} workers) {verdict} a GPU training at "
              f"{args.gpu_rate:.0f} img/s; at {per_core:.0f} samples per CPU-second it needs about "
              f"{args.gpu_rate / per_core:.1f} free cores for that rate")
    if args.json:
        args.json.write_text(json.dumps({
            "data": str(root), "samples": n, "image_size": args.image_size, "batch_size": args.batch_size,
            "device": dev.describe(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "samples_per_s": {f"{p}/{w}": rates[(p, w)] for p, w in rates},
            "median": {f"{p}/{w}": median[(p, w)] for p, w in median},
            "samples_per_cpu_s": {f"{p}/{w}": per_cpu[(p, w)] for p, w in per_cpu},
            "median_per_cpu_s": {f"{p}/{w}": median_cpu[(p, w)] for p, w in median_cpu},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
