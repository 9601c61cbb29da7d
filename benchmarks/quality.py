"""Quality benchmark: the GAN vs an L1+SSIM ablation vs cv2 inpainting, same wall-clock training budget.

    .venv/bin/python benchmarks/quality.py                          # full run: 2 x 20 min training
    .venv/bin/python benchmarks/quality.py --minutes 1 --images 200 # smoke run

Steps (everything under --work, default runs/quality/):

1. ``unmask prepare`` of ../shared/utkface at 128 px (realistic mask styles), split by source image into
   train/val/test (resumable: a second run reuses the prepared data).
2. Train the ablation (configs/quick.yaml, 64 px, with lambda_perc = lambda_adv_whole = lambda_adv_mask =
   0: L1 + SSIM only) for a fixed wall-clock budget: ``train.epochs`` is set out of reach and a timer sends
   SIGTERM to this process when the budget is spent; the trainer stops at the next batch boundary and
   saves last.pt (its documented Ctrl-C/SIGTERM path), which is the checkpoint evaluated
   (``--checkpoint best`` evaluates best.pt, the best validation PSNR at an epoch end, instead: with 122
   validation faces and a few epochs that choice was noisier than the last weights).
3. Train the GAN (configs/quick.yaml, every loss term) under the same budget the same way, with
   ``loss.warmup_steps`` = ``--warmup-fraction`` (default 0.6) times the ablation's step count: it spends
   about that share of its budget on L1 + SSIM alone, the rest with the perceptual and adversarial terms
   and both discriminators. ``--warmup-fraction 0`` trains the paper's loss from the first step. Each run
   starts fresh. ``--ema-decay D --ema-start N`` set ``train.ema_decay`` and ``train.ema_start`` for both
   runs (the moving average of G's weights from step N + 1 on is what gets evaluated).
4. ``run_eval`` of both on the test split; FD uses the same VGG16 network for both (the ImageNet features
   in ../shared/weights when present, else random weights - printed loudly); the baselines (telea, ns,
   masked input) come from the GAN's evaluation (they do not depend on the model).
5. The comparison table (mask region PSNR/SSIM/FD/ID) and the targets, PASS/FAIL; quality.json.

``--matched-ablation`` also trains the ablation for the GAN's number of steps (same images seen, not the
same time: on a CPU the GAN's VGG pass and discriminators make its step several times dearer), to separate
what the GAN terms do per step from what they cost. ``--reuse`` keeps finished runs (their run.json and
last.pt) instead of retraining, e.g. to add the matched ablation or re-evaluate.

Targets (mask region, test split): PSNR >= Telea + 7 dB; SSIM, FD and identity distance better than Telea;
FD and identity distance better than the ablation with PSNR within 1 dB of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
sys.path.insert(0, str(REPO))

ABLATION_SET = ["loss.lambda_perc=0", "loss.lambda_adv_whole=0", "loss.lambda_adv_mask=0"]
REALISTIC_MASKS = "surgical:3,cloth:2,n95:1,kn95:1"
TABLE_COLUMNS = ("psnr_mask", "ssim_mask", "fd_mask", "identity", "psnr_whole", "landmarks")
UNREACHABLE_EPOCHS = 1_000_000
ROW_LABELS = {"gan": "ours (GAN)", "ablation": "ablation (L1+SSIM)", "ablation_steps": "ablation, GAN's steps"}


def default_mask_types() -> str:
    """The realistic styles when unmask_cli.masks has them, else the config default."""
    try:
        from unmask_cli.masks import MASK_STYLES
    except ImportError:
        MASK_STYLES = {}
    names = [item.split(":")[0] for item in REALISTIC_MASKS.split(",")]
    if all(name in MASK_STYLES for name in names):
        return REALISTIC_MASKS
    from unmask_cli.config import PrepareConfig

    return PrepareConfig().mask_types


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per model (wall clock)")
    parser.add_argument("--images", type=int, default=3000, help="samples to prepare from UTKFace")
    parser.add_argument("--source", type=Path, default=SHARED / "utkface")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality",
                        help="folder for the data, both runs and the reports")
    parser.add_argument("--prep-size", type=int, default=128, help="aligned crop size of the prepared data")
    parser.add_argument("--mask-types", default=None, help=f"default: {REALISTIC_MASKS} (realistic styles)")
    parser.add_argument("--val-fraction", type=float, default=0.04)
    parser.add_argument("--test-fraction", type=float, default=0.08)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quick.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for both runs, e.g. --set train.batch_size=16")
    parser.add_argument("--vgg-weights", default=None,
                        help="VGG16 weights of the perceptual loss and FD (default: ../shared/weights/"
                             "vgg16_features_imagenet.pth if present, else random)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate only the first N test images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch default; use 1 when the cores are shared)")
    parser.add_argument("--workers", type=int, default=2, help="prepare worker processes")
    parser.add_argument("--alignment", default="visible",
                        help="prepare alignment (the README's tables: ffhq with --detector hog, made before 'visible')")
    parser.add_argument("--detector", default="yunet", help="prepare face detector")
    parser.add_argument("--warmup-fraction", type=float, default=0.6,
                        help="share of the GAN's budget spent in the L1+SSIM warm-up (loss.warmup_steps = this "
                             "times the ablation's steps in the same budget, which is trained first); "
                             "0 = the paper's loss from the first step")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="set the GAN's loss.warmup_steps directly (overrides --warmup-fraction)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="train.ema_decay of both runs: evaluate the moving average of G's weights "
                             "(e.g. 0.999); 0 = off, the last weights (the paper)")
    parser.add_argument("--ema-start", type=int, default=0,
                        help="train.ema_start of both runs: steps before the average starts. These runs are "
                             "short: start it late, e.g. where the GAN's warm-up ends (--warmup-steps)")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--matched-ablation", action="store_true",
                        help="also train the ablation for the GAN's number of steps (not its time)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="last",
                        help="evaluate last.pt (default) or best.pt (best validation PSNR) of each run")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs that finished before (run.json + last.pt in --work) instead of retraining")
    args = parser.parse_args()
    if args.minutes < 0.5:
        parser.error("--minutes must be >= 0.5 (the trainer needs a few seconds to start)")
    if not 0 <= args.warmup_fraction < 1:
        parser.error("--warmup-fraction must be in [0, 1)")
    if not 0 <= args.ema_decay < 1:
        parser.error("--ema-decay must be in [0, 1)")
    if args.ema_start < 0:
        parser.error("--ema-start must be >= 0")
    if args.skip_ablation and args.warmup_fraction > 0 and args.warmup_steps is None:
        parser.error("--skip-ablation needs --warmup-steps or --warmup-fraction 0 (the fraction is measured "
                     "on the ablation)")
    return args


def resolve_vgg(spec: str | None) -> str:
    if spec:
        return spec
    local = SHARED / "weights" / "vgg16_features_imagenet.pth"
    return str(local) if local.is_file() else "random"


def prepare_data(args: argparse.Namespace, console) -> Path:
    from unmask_cli.config import PrepareConfig
    from unmask_cli.prepare import run_prepare, summary_table
    from unmask_cli.progress import make_progress

    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found (the benchmark uses ../shared/utkface)")
    root = args.work / "data"
    opts = PrepareConfig(source=args.source, num_samples=args.images, size=args.prep_size, workers=args.workers,
                         mask_types=args.mask_types, val_fraction=args.val_fraction,
                         test_fraction=args.test_fraction, alignment=args.alignment, detector=args.detector)
    console.print(f"[bold]1. prepare[/] {args.images} samples at {args.prep_size} px from {args.source} "
                  f"(masks: {args.mask_types}) -> {root}")
    with make_progress(console, unit="faces") as progress:
        summary = run_prepare(opts, root, progress)
    console.print(summary_table(summary))
    return root


def reused_run(run_dir: Path, reuse: bool, cfg) -> dict | None:
    """The record of a finished run trained with the same config (``--reuse``), else None."""
    from unmask_cli.config import load_config

    record = run_dir / "run.json"
    if not (reuse and record.is_file() and (run_dir / "last.pt").is_file() and (run_dir / "config.yaml").is_file()):
        return None
    old = load_config(run_dir / "config.yaml").to_dict()
    new = cfg.to_dict()
    for key in ("epochs", "max_steps_per_epoch"):  # set by the budget
        old["train"].pop(key, None)
        new["train"].pop(key, None)
    return json.loads(record.read_text(encoding="utf-8")) if old == new else None


def train_for_budget(cfg, run_dir: Path, data_root: Path, seconds: float | None, device: str, console,
                     steps: int | None = None) -> dict:
    """Train from scratch until ``seconds`` of wall clock are spent (SIGTERM at the deadline -> the trainer
    saves last.pt at the next batch boundary), or for about ``steps`` steps (epochs of equal length, at most
    one epoch's rounding away). Returns what happened (also saved as run_dir/run.json)."""
    from unmask_cli.data import PairedDataset
    from unmask_cli.fileio import atomic_write_text
    from unmask_cli.training import epoch_plan, train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    if steps is not None:
        full, _ = epoch_plan(len(PairedDataset(data_root, "train", cfg.data.image_size)), cfg.train.batch_size, 0)
        cfg.train.epochs = max(1, math.ceil(steps / full))
        cfg.train.max_steps_per_epoch = math.ceil(steps / cfg.train.epochs)
    else:
        cfg.train.epochs = UNREACHABLE_EPOCHS
    pid = os.getpid()
    timer = threading.Timer(seconds, lambda: os.kill(pid, signal.SIGTERM)) if seconds else None
    start = time.perf_counter()
    if timer:
        timer.daemon = True
        timer.start()
    try:
        summary = train(cfg, run_dir, data_root, resume=None, device_spec=device, console=console)
    finally:
        if timer:
            timer.cancel()
    elapsed = time.perf_counter() - start
    expected = "completed" if steps is not None else "interrupted"
    if summary.status != expected:
        raise SystemExit(f"{run_dir}: training ended with status {summary.status!r}, expected {expected!r}")
    info = {"run_dir": str(run_dir), "seconds": round(elapsed, 1), "budget_seconds": seconds,
            "budget_steps": steps, "warmup_steps": cfg.loss.warmup_steps, "ema_decay": cfg.train.ema_decay,
            "ema_start": cfg.train.ema_start, "global_step": summary.global_step, "epochs_done": summary.epochs_done,
            "images_seen": summary.global_step * cfg.train.batch_size, "vgg": summary.vgg,
            "best_val_psnr": summary.best_psnr, "best_epoch": summary.best_epoch}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    return info


def gan_warmup_steps(args: argparse.Namespace, trained: dict) -> int:
    """--warmup-steps, else --warmup-fraction of the steps the ablation (= warm-up steps) made in the budget."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    if args.warmup_fraction == 0:
        return 0
    return round(args.warmup_fraction * trained["ablation"]["global_step"])


def chosen_checkpoint(run_dir: Path, which: str) -> Path:
    """best.pt (needs a validation split) or last.pt; last.pt when there is no best.pt."""
    best = run_dir / "best.pt"
    return best if which == "best" and best.is_file() else run_dir / "last.pt"


def evaluate(checkpoint: Path, data_root: Path, out: Path, vgg: str, args, console, baselines) -> object:
    from unmask_cli.evaluation import EvalConfig, run_eval
    from unmask_cli.progress import make_progress

    cfg = EvalConfig(checkpoint=str(checkpoint), data=str(data_root), split="test", out=str(out), device=args.device,
                     vgg_weights=vgg, max_images=args.eval_images or 0, baselines=",".join(baselines))
    with make_progress(console, unit="img") as progress:
        return run_eval(cfg, progress)


def check_targets(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    def mean(label: str, key: str) -> float:
        value = rows[label][key]["mean"]
        return math.nan if value is None else value

    ours, telea = ROW_LABELS["gan"], "telea"
    checks = [
        (f"PSNR mask >= telea + 7 dB ({mean(ours, 'psnr_mask'):.2f} vs {mean(telea, 'psnr_mask') + 7:.2f})",
         mean(ours, "psnr_mask") >= mean(telea, "psnr_mask") + 7),
        (f"SSIM mask > telea ({mean(ours, 'ssim_mask'):.4f} vs {mean(telea, 'ssim_mask'):.4f})",
         mean(ours, "ssim_mask") > mean(telea, "ssim_mask")),
        (f"FD mask < telea ({mean(ours, 'fd_mask'):.4f} vs {mean(telea, 'fd_mask'):.4f})",
         mean(ours, "fd_mask") < mean(telea, "fd_mask")),
        (f"ID dist < telea ({mean(ours, 'identity'):.4f} vs {mean(telea, 'identity'):.4f})",
         mean(ours, "identity") < mean(telea, "identity")),
    ]
    abl = ROW_LABELS["ablation"]
    if abl in rows:
        checks += [
            (f"FD mask < ablation ({mean(ours, 'fd_mask'):.4f} vs {mean(abl, 'fd_mask'):.4f})",
             mean(ours, "fd_mask") < mean(abl, "fd_mask")),
            (f"ID dist < ablation ({mean(ours, 'identity'):.4f} vs {mean(abl, 'identity'):.4f})",
             mean(ours, "identity") < mean(abl, "identity")),
            (f"|PSNR mask - ablation| <= 1 dB ({mean(ours, 'psnr_mask') - mean(abl, 'psnr_mask'):+.2f} dB)",
             abs(mean(ours, "psnr_mask") - mean(abl, "psnr_mask")) <= 1.0),
        ]
    return [(text, bool(ok), "PASS" if ok else "FAIL") for text, ok in checks]


def main() -> None:
    args = parse_args()
    import torch
    from rich.console import Console
    from rich.text import Text

    from unmask_cli.config import load_config
    from unmask_cli.errors import UnmaskError
    from unmask_cli.evaluation import comparison_table
    from unmask_cli.fileio import atomic_write_text

    console = Console()
    if not console.is_terminal:  # logs: wide enough for the comparison table
        console = Console(width=140)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.mask_types = args.mask_types or default_mask_types()
    args.work.mkdir(parents=True, exist_ok=True)
    vgg = resolve_vgg(args.vgg_weights)
    if vgg == "random":
        console.print("[bold red]WARNING: no VGG16 weights (../shared/weights/vgg16_features_imagenet.pth missing):"
                      " perceptual loss and FD use RANDOM weights; FD numbers are NOT meaningful[/]")
    t0 = time.perf_counter()
    try:
        data_root = prepare_data(args, console)
        prep_seconds = time.perf_counter() - t0
        base = [f"loss.vgg_weights={vgg}", f"train.device={args.device}", f"train.ema_decay={args.ema_decay}",
                f"train.ema_start={args.ema_start}", *args.overrides]
        runs = {} if args.skip_ablation else {"ablation": [*base, *ABLATION_SET]}  # first: it sets the warm-up
        runs["gan"] = base
        if args.matched_ablation:
            runs["ablation_steps"] = [*base, *ABLATION_SET]
        trained = {}
        for step, (name, overrides) in enumerate(runs.items(), 2):
            if name == "gan":
                overrides = [*overrides, f"loss.warmup_steps={gan_warmup_steps(args, trained)}"]
            cfg = load_config(args.config, overrides)
            steps = trained["gan"]["global_step"] if name == "ablation_steps" else None
            budget = f"{steps} steps (the GAN's)" if steps else f"{args.minutes:g} min"
            console.print(f"[bold]{step}. train {name}[/] for {budget}: {args.config.name} "
                          f"{' '.join(overrides)} ({cfg.data.image_size} px, torch threads "
                          f"{torch.get_num_threads()})")
            info = reused_run(args.work / name, args.reuse, cfg)
            budget_key = ("budget_steps", steps) if steps else ("budget_seconds", args.minutes * 60)
            if info is not None and info.get(budget_key[0]) != budget_key[1]:
                console.print(f"   not reusing {args.work / name}: trained for another budget")
                info = None
            if info is None:
                info = train_for_budget(cfg, args.work / name, data_root, None if steps else args.minutes * 60,
                                        args.device, console, steps=steps)
            else:
                console.print(f"   reusing {args.work / name} (--reuse)")
            trained[name] = info
            console.print(f"   {name}: {info['global_step']} steps ({info['images_seen']} images, "
                          f"{info['epochs_done']} full epochs) in {info['seconds']:.0f} s")

        console.print(f"[bold]{len(runs) + 2}. evaluate[/] the test split (FD network: {vgg})")
        reports = {}
        for name in ("gan", *(n for n in ("ablation", "ablation_steps") if n in trained)):
            baselines = ("telea", "ns", "masked") if name == "gan" else ()  # they do not depend on the model
            reports[name] = evaluate(chosen_checkpoint(args.work / name, args.checkpoint), data_root,
                                     args.work / f"eval_{name}", vgg, args, console, baselines)
            if reports[name].vgg != reports["gan"].vgg:  # the same FD network for all (random: same seed)
                raise SystemExit(f"FD networks differ: {reports['gan'].vgg} vs {reports[name].vgg}")
        gan_report = reports["gan"]
        rows = {ROW_LABELS[name]: report.summary["ours"] for name, report in reports.items()}
        for name in ("telea", "ns", "masked"):
            rows[name if name != "masked" else "masked (input)"] = gan_report.summary[name]
    except UnmaskError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise SystemExit(1) from err

    evaluated = ", ".join(f"{name} {r.checkpoint.name} (epoch {r.epoch}, step {r.global_step}, {r.weights})"
                          for name, r in reports.items())
    caption = Text(f"{gan_report.n_images} test faces at {gan_report.image_size} px from {args.source.name} "
                   f"(masks: {args.mask_types}); {args.minutes:g} min of training per model on {args.device} "
                   f"({torch.get_num_threads()} threads); GAN {trained['gan']['global_step']} steps "
                   f"(the first {trained['gan'].get('warmup_steps', 0)} L1+SSIM only)"
                   + (f", ablation {trained['ablation']['global_step']} steps" if "ablation" in trained else "")
                   + (f"; 'ablation, GAN's steps': {trained['ablation_steps']['global_step']} steps in "
                      f"{trained['ablation_steps']['seconds'] / 60:.1f} min" if "ablation_steps" in trained else "")
                   + f"\nevaluated: {evaluated}\nFD: ")
    caption.append(gan_report.vgg, style="bold red" if gan_report.vgg_random else "")
    if gan_report.vgg_random:
        caption.append("  <- RANDOM weights: FD and perceptual loss are NOT meaningful", style="bold red")
    console.print(comparison_table(list(rows.items()), title="quality benchmark (mask region; test split)",
                                   caption=caption, columns=TABLE_COLUMNS))
    targets = check_targets(rows)
    for text, _, verdict in targets:
        console.print(Text(f"  {verdict}  {text}", style="green" if verdict == "PASS" else "red"))

    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vgg": gan_report.vgg, "vgg_random": gan_report.vgg_random, "prepare_seconds": round(prep_seconds, 1),
        "training": trained, "n_test_images": gan_report.n_images, "image_size": gan_report.image_size,
        "summary": rows, "targets": [{"target": t, "pass": ok} for t, ok, _ in targets],
        "reports": {name: str(r.out) for name, r in reports.items()},
        "evaluated": {name: {"checkpoint": str(r.checkpoint), "epoch": r.epoch, "global_step": r.global_step,
                             "weights": r.weights}
                      for name, r in reports.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(args.work / "quality.json", json.dumps(result, indent=2) + "\n")
    console.print(f"total {result['total_seconds'] / 60:.1f} min; reports in {args.work} (quality.json, "
                  "eval_gan/comparison.png)")


if __name__ == "__main__":
    main()
