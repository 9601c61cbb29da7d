"""Throughput of `unmask prepare`: faces/s with 1 worker vs 2 workers, measured side by side in one run.

    .venv/bin/python benchmarks/prepare.py [--source ../shared/utkface] [--images 600] [--rounds 2]

Each round runs 1 worker then 2 workers on the same images (fresh output folders), so machine noise hits
both alike; the ratio is computed per round and the median reported.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from unmask_cli.config import PrepareConfig
from unmask_cli.fileio import list_images
from unmask_cli.prepare import run_prepare

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE.parent.parent / "shared" / "utkface")
    parser.add_argument("--images", type=int, default=600, help="source photos to use")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mask-types", default="rect,oval")
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found (the benchmark uses ../shared/utkface)")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for path in list_images(args.source)[: args.images]:
            (src / path.name).symlink_to(path.resolve())
        rates: dict[int, list[float]] = {1: [], 2: []}
        ratios = []
        for round_ in range(args.rounds):
            for workers in (1, 2):
                out = Path(tmp) / f"out{workers}"
                shutil.rmtree(out, ignore_errors=True)
                summary = run_prepare(PrepareConfig(source=src, num_samples=args.images, size=args.size, workers=workers, mask_types=args.mask_types), out)
                rates[workers].append(summary.faces / summary.seconds)
                print(f"round {round_ + 1}: {workers} worker(s): {summary.faces} faces in {summary.seconds:.1f} s "
                      f"= {rates[workers][-1]:.1f} faces/s (skipped {sum(summary.skipped.values())})", flush=True)
            ratios.append(rates[2][-1] / rates[1][-1])
    print(f"\nprepare @ {args.size}px, {args.images} UTKFace photos, median of {args.rounds} rounds:")
    print(f"  1 worker : {statistics.median(rates[1]):.1f} faces/s")
    print(f"  2 workers: {statistics.median(rates[2]):.1f} faces/s")
    print(f"  speed-up : {statistics.median(ratios):.2f}x (per-round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
