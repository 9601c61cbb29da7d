"""``unmask eval`` throughput before and after a change, side by side in one run, on the same data.

"Before" is the code at a git ref (``--before``, default: the commit before the eval speed-up), checked
out with ``git worktree`` into a temporary folder; "after" is this working tree. Each run is a fresh
Python process (``run_eval`` of that tree, on the PYTHONPATH), so both pay the same start-up; the two
alternate for ``--rounds`` rounds so a change in the machine's load hits both. The report gives img/s of
each run, the ratio of the medians, and whether the two trees wrote identical metrics.json numbers.

Without ``--data``/``--checkpoint`` it builds its own with the "before" tree's CLI (once, kept in
``--work``): ``--images`` faces of ../shared/utkface (else the built-in portraits) prepared at 128 px, 80 %
of them in the test split, and a checkpoint of ``configs/quick.yaml`` trained for one epoch with random
VGG weights (a 64 px model).

    .venv/bin/python benchmarks/eval_speed.py                      # 300 UTKFace faces, 2 rounds
    .venv/bin/python benchmarks/eval_speed.py --data D --checkpoint C --max-images 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UTKFACE = REPO.parent / "shared" / "utkface"
SPEED_UP_MARK = ("class FaceScorePool", "unmask_cli/identity.py")  # what the eval speed-up added

# Runs in the tree under test; speaks both signatures of run_eval (keyword arguments before the
# EvalConfig one). Prints one JSON line: images scored, the seconds run_eval took and the CPU seconds of
# the process and its workers (imports included: on a shared machine the fairer measure of work).
DRIVER = r"""
import inspect, json, resource, sys, time
from unmask_cli.evaluation import run_eval
checkpoint, data, out, device, max_images, batch_size = sys.argv[1:7]
start = time.perf_counter()
if "cfg" in inspect.signature(run_eval).parameters:
    from unmask_cli.config import EvalConfig
    report = run_eval(EvalConfig(checkpoint=checkpoint, data=data, split="test", out=out, device=device,
                                 max_images=int(max_images), batch_size=int(batch_size)))
else:
    report = run_eval(checkpoint, data, split="test", out=out, device=device,
                      max_images=int(max_images) or None, batch_size=int(batch_size))
seconds = time.perf_counter() - start
cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
          for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"images": report.n_images, "seconds": seconds, "cpu": cpu}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared dataset (default: built in --work)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (default: trained in --work)")
    p.add_argument("--before", default=None,
                   help="git ref of the 'before' code (default: the commit before the eval speed-up)")
    p.add_argument("--rounds", type=int, default=2, help="before/after pairs, interleaved")
    p.add_argument("--max-images", type=int, default=0, help="first N test images (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=300, help="faces to prepare when --data is not given")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "unmask_eval_speed")
    return p.parse_args()


def build_inputs(work: Path, tree: Path, images: int) -> tuple[Path, Path]:
    """A prepared set and a checkpoint, made by the 'before' tree's CLI, so that both trees can read them
    (a newer trainer may store config keys an older evaluation does not know)."""
    root, run = work / "data", work / "runs" / "quick"
    settings = work / "prepare.yaml"  # most faces in the test split: that is what eval reads
    settings.write_text("prepare:\n  size: 128\n  val_fraction: 0.05\n  test_fraction: 0.8\n")
    source = ["--source", str(UTKFACE)] if UTKFACE.is_dir() else []
    if not (root / "manifest.jsonl").is_file():
        print(f"preparing {images} faces ({UTKFACE if source else 'built-in portraits'}) at 128 px -> {root}",
              flush=True)
        _unmask(tree, "prepare", *source, "--out", str(root), "--num-samples", str(images), "--workers", "2",
                "--config", str(settings))
    if not (run / "last.pt").is_file():
        print(f"training configs/quick.yaml for one epoch -> {run}", flush=True)
        _unmask(tree, "train", "--config", str(REPO / "configs" / "quick.yaml"), "--data", str(root),
                "--runs", str(run.parent), "--name", run.name, "--set", "loss.vgg_weights=random",
                "--set", "train.epochs=1", "--set", "train.device=cpu")
    return root, run / "last.pt"


def _unmask(tree: Path, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "unmask_cli", *argv], cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"unmask {argv[0]} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def commit_before_speed_up() -> str:
    """The parent of the commit that added :data:`SPEED_UP_MARK`; HEAD while that is not committed yet."""
    text, path = SPEED_UP_MARK
    found = subprocess.run(["git", "-C", str(REPO), "log", "--format=%H", "-S", text, "--", path],
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{found[-1]}^" if found else "HEAD"


def checkout(ref: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                   capture_output=True, text=True)
    return folder


def time_eval(tree: Path, args, data: Path, checkpoint: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", DRIVER, str(checkpoint), str(data), str(out), args.device,
           str(args.max_images), str(args.batch_size)]
    done = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eval in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "rate": result["images"] / result["seconds"]}


def compare_metrics(before: Path, after: Path) -> tuple[bool, float]:
    """(identical, largest absolute difference) over every summary and per-image number."""
    a = json.loads(before.read_text())
    b = json.loads(after.read_text())
    pairs = [(a["summary"][m][k]["mean"], b["summary"][m][k]["mean"]) for m in a["summary"] for k in a["summary"][m]]
    for row_a, row_b in zip(a["per_image"], b["per_image"], strict=True):
        pairs += [(row_a["methods"][m][k], row_b["methods"][m][k]) for m in row_a["methods"] for k in row_a["methods"][m]]
    worst = max((abs(x - y) for x, y in pairs if x is not None and y is not None), default=0.0)
    same = len(a["per_image"]) == len(b["per_image"]) and all(x == y or (x is None and y is None) for x, y in pairs)
    return same, worst


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.before = args.before or commit_before_speed_up()
    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        before_tree = checkout(args.before, Path(tmp) / "before")
        try:
            data, checkpoint = args.data, args.checkpoint
            if data is None or checkpoint is None:
                built_data, built_checkpoint = build_inputs(args.work, before_tree, args.images)
                data, checkpoint = data or built_data, checkpoint or built_checkpoint
            runs = {"before": [], "after": []}
            for k in range(args.rounds):
                for name, tree in (("before", before_tree), ("after", REPO)):
                    run = time_eval(tree, args, data, checkpoint, Path(tmp) / f"{name}_{k}")
                    runs[name].append(run)
                    print(f"round {k + 1} {name:6s} {run['images']} images in {run['seconds']:.1f} s = "
                          f"{run['rate']:.2f} img/s ({run['cpu']:.1f} CPU s)", flush=True)
            same, worst = compare_metrics(Path(tmp) / "before_0" / "metrics.json",
                                          Path(tmp) / "after_0" / "metrics.json")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                           capture_output=True)
    before = statistics.median(r["rate"] for r in runs["before"])
    after = statistics.median(r["rate"] for r in runs["after"])
    cpu_before = statistics.median(r["cpu"] for r in runs["before"])
    cpu_after = statistics.median(r["cpu"] for r in runs["after"])
    print(f"\nbefore ({args.before}): {before:.2f} img/s   after (working tree): {after:.2f} img/s   "
          f"ratio {after / before:.2f}x   CPU s {cpu_before:.0f} -> {cpu_after:.0f}   "
          f"images {runs['after'][0]['images']} on {os.cpu_count()} CPUs   "
          f"metrics.json identical: {'yes' if same else f'NO (max abs diff {worst:.3g})'}")
    if not same or not math.isfinite(after):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
