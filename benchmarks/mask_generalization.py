"""Leave one mask family out: does the model find and fill masks it never saw in training?

    .venv/bin/python benchmarks/mask_generalization.py [--minutes 30] [--families n95,cloth,freeform]
        [--conditions before,after] [--images 3000] [--work runs/mask_generalization] [--threads 1]

Two training distributions side by side ("conditions"):

* ``before``: the v1 release's data: the four realistic designed styles (surgical:3,cloth:2,n95:1,kn95:1)
  as drawn, the ``visible`` alignment, crop 0.7;
* ``after``: configs/release.yaml's ``prepare`` section: every style with a varied outline and look,
  free-form holes, bare faces and look-alikes, photo degradations, synthetic surroundings past tight
  source crops, the ``visible-neck`` alignment, crop 1.1.

For each condition and each left-out family (``n95`` = n95 + kn95, ``cloth``, ``surgical``, ``rect`` =
rect + oval, ``freeform``), a model is trained from scratch on that condition's mask mix without the
family (configs/release.yaml's network and L1+SSIM loss, --minutes of wall clock, SIGTERM at the
deadline), then scored on the test faces (../shared/utkface's file-name split, never trained on) twice:
with masks of the left-out family, and with the families it trained on ("in-family"), both drawn the
condition's way (its framing and variety). Scores: the map module's IoU against the true map, and the
fill's mask-region PSNR over OpenCV Telea's, both given the true map. The goal: on a left-out family,
IoU >= 0.95 and an advantage over Telea within 1.5 dB of the in-family one.

Everything lives under --work; prepared data and finished runs are reused by a second call (--fresh
redoes the runs). Writes WORK/result.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

FAMILIES = {"surgical": ("surgical",), "cloth": ("cloth",), "n95": ("n95", "kn95"), "rect": ("rect", "oval"),
            "freeform": ("freeform",)}
BEFORE = {"mask_types": "surgical:3,cloth:2,n95:1,kn95:1", "mask_variety": False, "alignment": "visible",
          "crop": 0.7, "degrade": 0.0, "backdrop": 0.0}


def condition_settings(name: str) -> dict:
    """The prepare settings of a condition (``after``: configs/release.yaml's)."""
    if name == "before":
        return dict(BEFORE)
    from unmask_cli.config import load_config

    pc = load_config(REPO / "configs" / "release.yaml").prepare
    return {"mask_types": pc.mask_types, "mask_variety": pc.mask_variety, "alignment": pc.alignment, "crop": pc.crop,
            "degrade": pc.degrade, "backdrop": pc.backdrop}


def without(mask_types: str, family: str) -> str:
    left_out = FAMILIES[family]
    return ",".join(item for item in mask_types.split(",") if item.split(":")[0] not in left_out)


def only(mask_types: str, styles: tuple[str, ...]) -> str:
    kept = [item for item in mask_types.split(",") if item.split(":")[0] in styles]
    return ",".join(kept) if kept else ",".join(styles)


def test_sources(source: Path, folder: Path, seed: int = 0) -> Path:
    """A folder of links to the photos of ``source`` whose file name puts them in the test split."""
    from unmask_cli.data import split_of
    from unmask_cli.fileio import list_images

    folder.mkdir(parents=True, exist_ok=True)
    for path in list_images(source):
        if split_of(path.name, 0.04, 0.08, seed) == "test" and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    return folder


def prepare(source: Path, out: Path, settings: dict, mask_types: str, images: int, workers: int) -> Path:
    from unmask_cli.config import PrepareConfig
    from unmask_cli.prepare import run_prepare

    pc = PrepareConfig(source=str(source), num_samples=images, size=128, workers=workers, mask_types=mask_types,
                       mask_variety=settings["mask_variety"], alignment=settings["alignment"],
                       crop=settings["crop"], degrade=settings["degrade"], backdrop=settings["backdrop"],
                       val_fraction=0.04, test_fraction=0.08)
    run_prepare(pc, out)
    return out


def train(data: Path, run_dir: Path, minutes: float, console) -> dict:
    """configs/release.yaml's network and loss from scratch for ``minutes`` of wall clock."""
    from unmask_cli.config import load_config
    from unmask_cli.training import train as run_training

    if (run_dir / "run.json").is_file() and (run_dir / "last.pt").is_file():
        return json.loads((run_dir / "run.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "release.yaml", ["train.epochs=1000000", "train.ema_decay=0",
                                                          "data.num_workers=0"])
    cfg.data.root = str(data)
    pid = os.getpid()
    timer = threading.Timer(minutes * 60, lambda: os.kill(pid, signal.SIGTERM))
    timer.daemon = True
    start = time.perf_counter()
    timer.start()
    try:
        summary = run_training(cfg, run_dir, data, resume=None, device_spec="cpu", console=console)
    finally:
        timer.cancel()
    info = {"seconds": round(time.perf_counter() - start, 1), "global_step": summary.global_step,
            "status": summary.status}
    (run_dir / "run.json").write_text(json.dumps(info) + "\n")
    return info


def map_iou(checkpoint: Path, data: Path) -> float:
    """Mean per-image IoU of the map module's prediction (threshold 0.5) on the test split."""
    import torch

    from unmask_cli.checkpoints import build_networks_from_checkpoint
    from unmask_cli.data import PairedDataset
    from unmask_cli.models import predict_map

    model = build_networks_from_checkpoint(checkpoint, "cpu")
    ds = PairedDataset(data, "test", model.image_size)
    ious = []
    with torch.inference_mode():
        for start in range(0, len(ds), 32):
            items = [ds[i] for i in range(start, min(len(ds), start + 32))]
            masked = torch.stack([it["masked"] for it in items])
            truth = torch.stack([it["mask"] for it in items]) > 0.5
            pred = predict_map(model.M, masked) > 0.5
            inter = (pred & truth).flatten(1).sum(1).float()
            union = (pred | truth).flatten(1).sum(1).float().clamp(min=1)
            ious += (inter / union).tolist()
    return float(np.mean(ious))


def fill_advantage(checkpoint: Path, data: Path, out: Path) -> dict:
    """Mask-region PSNR of the fill and of Telea (the true map given), on the test split."""
    from unmask_cli.config import EvalConfig
    from unmask_cli.evaluation import run_eval

    report = run_eval(EvalConfig(checkpoint=str(checkpoint), data=str(data), split="test", out=str(out),
                                 device="cpu", vgg_weights="random", baselines="telea", sheet_images=0))
    ours, telea = report.mean("ours", "psnr_mask"), report.mean("telea", "psnr_mask")
    return {"psnr_mask": ours, "telea": telea, "advantage": ours - telea, "images": report.n_images}


def score(checkpoint: Path, data: Path, out: Path) -> dict:
    return {"iou": map_iou(checkpoint, data), **fill_advantage(checkpoint, data, out)}


def main() -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per run (wall clock)")
    parser.add_argument("--families", default="n95,cloth,freeform")
    parser.add_argument("--conditions", default="before,after")
    parser.add_argument("--images", type=int, default=3000, help="training samples per run")
    parser.add_argument("--source", type=Path, default=SHARED / "utkface")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "mask_generalization")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--workers", type=int, default=2, help="prepare worker processes")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that finished before")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    families = args.families.split(",")
    work = args.work
    tests = test_sources(args.source, work / "test_sources")
    test_count = len(os.listdir(tests))
    results = []
    for condition in args.conditions.split(","):
        settings = condition_settings(condition)
        for family in families:
            trained_on = without(settings["mask_types"], family)
            trained_styles = [item.split(":")[0] for item in trained_on.split(",")]
            seen_styles = tuple(s for s in trained_styles if any(s in fam for fam in FAMILIES.values()))
            name = f"{condition}_without_{family}"
            console.print(f"[bold]{name}[/]: training on {trained_on}")
            data = prepare(args.source, work / "data" / name, settings, trained_on, args.images, args.workers)
            run_dir = work / "runs" / name
            if args.fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            info = train(data, run_dir, args.minutes, console)
            checkpoint = run_dir / "last.pt"
            left = prepare(tests, work / "data" / f"{condition}_test_{family}", settings,
                           only(settings["mask_types"], FAMILIES[family]), test_count, args.workers)
            seen = prepare(tests, work / "data" / f"{condition}_test_in_{family}", settings,
                           only(trained_on, seen_styles), test_count, args.workers)
            row = {"condition": condition, "left_out": family, "trained_on": trained_on, **info,
                   "left_out_scores": score(checkpoint, left, run_dir / "eval_left_out"),
                   "in_family_scores": score(checkpoint, seen, run_dir / "eval_in_family")}
            row["gap_db"] = row["in_family_scores"]["advantage"] - row["left_out_scores"]["advantage"]
            row["pass"] = row["left_out_scores"]["iou"] >= 0.95 and row["gap_db"] <= 1.5
            results.append(row)
            (work / "result.json").write_text(json.dumps({"minutes": args.minutes, "images": args.images,
                                                          "rows": results}, indent=1) + "\n")
    print(f"leave one family out: {args.minutes:g} min of training per run, {args.images} samples; "
          "IoU of the map module, fill PSNR over Telea (dB), both with the true map, test faces")
    print(f"{'condition':<9} {'left out':<9} {'steps':>6} {'IoU out':>8} {'IoU in':>7} {'adv out':>8} "
          f"{'adv in':>7} {'gap':>6}  goal")
    for r in results:
        lo, fi = r["left_out_scores"], r["in_family_scores"]
        print(f"{r['condition']:<9} {r['left_out']:<9} {r['global_step']:>6} {lo['iou']:>8.3f} {fi['iou']:>7.3f} "
              f"{lo['advantage']:>8.2f} {fi['advantage']:>7.2f} {r['gap_db']:>6.2f}  {'PASS' if r['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
