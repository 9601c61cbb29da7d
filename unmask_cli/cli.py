"""The ``unmask`` command: a thin Typer layer over the shared core (faces, masks, data, models, ...)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from unmask_cli import __version__
from unmask_cli.errors import UnmaskError
from unmask_cli.progress import make_progress

app = typer.Typer(
    name="unmask",
    help="Remove face masks from photos with a GAN and fill in the hidden face (Din et al., IEEE Access 2020).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"unmask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """unmask: prepare paired data, train the GAN, evaluate it, unmask photos."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/default.yaml, configs/quick.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set train.epochs=3 (repeatable).")]


@app.command()
def prepare(
    source: Annotated[Path | None, typer.Option(help="Folder of unmasked face photos (e.g. CelebA img_align_celeba). Default: built-in sample portraits.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (or the sheet PNG with --preview).")] = Path("data/prepared"),
    num_samples: Annotated[int | None, typer.Option(help="Samples to write (faces are reused with fresh masks when there are fewer). Default: prepare.num_samples (256 for the built-in samples).")] = None,
    size: Annotated[int | None, typer.Option(help="Aligned crop size in pixels. Default: prepare.size (256).")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed for masks and the split. Default: prepare.seed.")] = None,
    mask_types: Annotated[str | None, typer.Option(help="Mask styles with optional weights, e.g. 'surgical:3,cloth:2,rect'. Default: prepare.mask_types.")] = None,
    all_faces: Annotated[bool, typer.Option("--all-faces", help="Use every detected face, not just the largest.")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", help="Also read photos in sub-folders of --source.")] = False,
    landmarks: Annotated[Path | None, typer.Option(help="dlib 68-landmark model file (default: from face-recognition-models, or $UNMASK_LANDMARKS).")] = None,
    detector: Annotated[str | None, typer.Option(help="Face detector: yunet (OpenCV's YuNet, shipped), hog, cnn (dlib) or hog+cnn. Default: prepare.detector (yunet).")] = None,
    alignment: Annotated[str | None, typer.Option(help="visible (from the eyes: a masked face gets the same crop as its unmasked photo) or ffhq (eyes and mouth, the alignment before 'visible'). Recorded in the dataset and in checkpoints trained on it. Default: prepare.alignment (visible).")] = None,
    preview: Annotated[int | None, typer.Option(help="Write a contact sheet of N random samples to --out (a .png) instead of a dataset.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Synthesise a paired dataset: aligned faces, masked faces and binary mask maps.

    Writes [bold]original_celeba_aligned/[/], [bold]masked_images/[/], [bold]mask_maps/[/], manifest.jsonl (source, box, landmarks, mask, split) and skipped.csv. Resumable: rerun the same command after a kill.
    """
    from unmask_cli.config import load_config
    from unmask_cli.prepare import BUILTIN_DEFAULT_SAMPLES, PrepareOptions, run_prepare, summary_table
    from unmask_cli.prepare import preview as make_preview

    cfg = load_config(config, set_ or ())
    pc = cfg.prepare
    source = source if source is not None else (Path(pc.source) if pc.source else None)
    if num_samples is None:
        num_samples = pc.num_samples if (source is not None or config is not None or set_) else BUILTIN_DEFAULT_SAMPLES
    opts = PrepareOptions(
        out=out, source=source, num_samples=num_samples, size=size or pc.size, workers=workers,
        seed=pc.seed if seed is None else seed, mask_types=mask_types or pc.mask_types,
        all_faces=all_faces or pc.all_faces, min_face=pc.min_face, upsample=pc.upsample,
        val_fraction=pc.val_fraction, test_fraction=pc.test_fraction,
        landmarks_path=str(landmarks) if landmarks else None, recursive=recursive,
        detector=detector or pc.detector, alignment=alignment or pc.alignment,
    )
    if preview is not None:
        if out.suffix.lower() != ".png":
            raise UnmaskError("with --preview, --out must be a .png file path", out)
        count = make_preview(opts, preview, out)
        console.print(f"preview sheet with {count} samples (original | masked | map): [bold]{out}[/]")
        return
    what = f"{source}" if source else "built-in sample portraits (astronaut, grace_hopper; augmented)"
    console.print(f"preparing {opts.num_samples} samples at {opts.size}px from {what} with {workers} worker(s); "
                  f"{opts.detector} detector, {opts.alignment} alignment")
    with make_progress(console, unit="faces") as progress:
        summary = run_prepare(opts, progress)
    console.print(summary_table(summary))
    if summary.skipped:
        console.print(f"skipped sources are listed with reasons in [bold]{out / 'skipped.csv'}[/]")


@app.command()
def train(
    config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset folder. Default: data.root of the config.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to RUNS/NAME/. Default: the config file's stem.")] = None,
    runs: Annotated[Path, typer.Option(help="Folder holding the run folders.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option(help="Continue from this checkpoint (default: RUNS/NAME/last.pt when it exists).")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start fresh (refused if the run folder already has checkpoints).")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps (default: train.device).")] = None,
    set_: SetOpt = None,
) -> None:
    """Train the U-Net generator against two PatchGAN discriminators (+ the mask-map module).

    Writes [bold]RUNS/NAME/[/]: config.yaml, meta.json, metrics.csv, samples/epoch_NNN.png, last.pt, best.pt and epoch_NNN.pt every save_interval epochs. Rerunning the same command resumes exactly where it stopped; Ctrl-C saves and exits.
    """
    from unmask_cli.config import load_config
    from unmask_cli.training import train as run_train

    if resume is not None and no_resume:
        raise UnmaskError("--resume and --no-resume exclude each other")
    cfg = load_config(config, set_ or ())
    run_name = name or (config.stem if config is not None else "default")
    summary = run_train(
        cfg, runs / run_name, data if data is not None else Path(cfg.data.root),
        resume=None if no_resume else (resume if resume is not None else "auto"),
        device_spec=device, console=console,
    )
    if summary.status == "interrupted":
        raise typer.Exit(130)


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint from 'unmask train' (last.pt, best.pt, epoch_NNN.pt).")],
    data: Annotated[Path | None, typer.Option(help="Prepared dataset (or a folder with original_celeba_aligned/, masked_images/, mask_maps/). Default: the checkpoint's data.root.")] = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Report folder. Default: <checkpoint folder>/eval_<split>.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    vgg_weights: Annotated[str | None, typer.Option(help="VGG16 weights for FD: imagenet, a weights file, or random. Default: the checkpoint's loss.vgg_weights.")] = None,
    max_images: Annotated[int | None, typer.Option(help="Evaluate only the first N images of the split.")] = None,
    sheet_images: Annotated[int, typer.Option(help="Rows in comparison.png (0 = none).")] = 8,
    baselines: Annotated[str, typer.Option(help="Classical methods scored beside the GAN: any of telea,ns,masked.")] = "telea,ns,masked",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Score the moving average of G's weights when the checkpoint has one (train.ema_decay > 0); --no-ema scores G's own weights.")] = True,
) -> None:
    """Score a checkpoint on held-out faces against classical inpainting (OpenCV Telea and Navier-Stokes).

    PSNR, SSIM, VGG feature distance (whole image and mask region), dlib identity and landmark distances. Writes metrics.json, per_image.csv and comparison.png, and prints the table.
    """
    from unmask_cli.evaluation import report_table, run_eval

    names = tuple(b.strip() for b in baselines.split(",") if b.strip())
    with make_progress(console, unit="img") as progress:
        report = run_eval(checkpoint, data, split=split, out=out, batch_size=batch_size, device=device,
                          vgg_weights=vgg_weights, max_images=max_images, sheet_images=sheet_images,
                          progress=progress, baselines=names, ema=ema)
    console.print(report_table(report))
    console.print(f"reports: [bold]{report.out}[/] (metrics.json, per_image.csv, comparison.png)")


@app.command()
def infer(
    in_dir: Annotated[Path, typer.Argument(help="Folder of masked photos (or aligned crops with --aligned).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (must not be IN_DIR or inside it).")],
    checkpoint: Annotated[Path, typer.Option(help="Trained checkpoint (runs/NAME/best.pt).")],
    masks: Annotated[Path | None, typer.Option(help="Folder of mask maps with the same file stems (default: the map module predicts them).")] = None,
    aligned: Annotated[bool, typer.Option("--aligned", help="Inputs are aligned face crops (no detection, no paste-back).")] = False,
    threshold: Annotated[float, typer.Option(help="Map-module threshold for predicted masks.")] = 0.5,
    save_masks: Annotated[bool, typer.Option("--save-masks", help="Write the masks used to OUT_DIR/masks/.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also write input | output pairs to OUT_DIR/compare/.")] = False,
    batch_size: Annotated[int, typer.Option(help="Faces per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    all_faces: Annotated[bool, typer.Option("--all-faces/--largest-face", help="Unmask every face or only the largest.")] = True,
    landmarks: Annotated[Path | None, typer.Option(help="dlib 68-landmark model file.")] = None,
    detector: Annotated[str, typer.Option(help="Face detector: yunet (OpenCV's YuNet, shipped with unmask: finds masked faces in milliseconds), hog (dlib; misses most masked faces), cnn (dlib; finds most, but takes seconds a photo on a CPU) or hog+cnn (the CNN only where HOG finds none, and not with --masks). Faces are aligned the way the checkpoint's training data was.")] = "yunet",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist (default: skip them, so reruns resume).")] = False,
    fold_bn: Annotated[bool, typer.Option("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convolutions (same outputs within 1e-4, faster).")] = True,
) -> None:
    """Unmask every photo of IN_DIR into OUT_DIR (same names, sizes and formats).

    Whole photos: every face is detected, aligned, unmasked and pasted back with a feathered blend; photos without a face are copied through. Inputs are never modified; unreadable files are skipped with a reason.
    """
    from unmask_cli.inference import run_infer, summary_table

    with make_progress(console, unit="img") as progress:
        summary = run_infer(
            in_dir, out_dir, checkpoint, masks_dir=masks, aligned=aligned, threshold=threshold,
            save_masks=save_masks, compare=compare, batch_size=batch_size, device=device, all_faces=all_faces,
            landmarks_path=landmarks, progress=progress, overwrite=overwrite, fold_bn=fold_bn, detector=detector,
        )
    console.print(summary_table(summary))


def main() -> None:
    try:
        app()
    except UnmaskError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
