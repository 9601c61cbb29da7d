"""The ``unmask`` command: a thin Typer layer over the shared core (faces, masks, data, models, ...)."""

from __future__ import annotations

import functools
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


def _interruptible(command):
    """A command that a Ctrl-C (SIGINT) ends with one yellow 'interrupted' line on stderr and exit code 130
    (Typer would exit 130 silently). The jobs leave no partial file: writes are atomic."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]", highlight=False)
            raise typer.Exit(130) from None

    return run


def _version(value: bool) -> None:
    if value:
        console.print(f"unmask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """unmask: prepare paired data, train the GAN, evaluate it, unmask photos."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/default.yaml, configs/quick.yaml); every command reads its own section.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config key, e.g. --set train.epochs=3 or --set infer.threshold=0.4 (repeatable).")]


def _default(key: str) -> str:
    """' Default: KEY (VALUE).' from the config dataclasses, the only place defaults live."""
    from unmask_cli.config import Config

    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f" Config key {key} (default {shown})."


def _sample_defaults() -> str:
    from unmask_cli.config import PrepareConfig

    return f"{PrepareConfig.SOURCE_SAMPLES} from a source, {PrepareConfig.BUILTIN_SAMPLES} from the built-in samples"


def _config(config: Path | None, set_: list[str] | None, options: dict):
    """The command's config: defaults <- --config <- --set <- the command's own options (None = not given)."""
    from unmask_cli.config import load_config

    return load_config(config, set_ or (), options)


@app.command()
@_interruptible
def prepare(
    source: Annotated[Path | None, typer.Option(help="Folder of unmasked face photos (e.g. CelebA img_align_celeba); none = the built-in sample portraits." + _default("prepare.source"))] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (or the sheet PNG with --preview)." + _default("data.root"))] = None,
    num_samples: Annotated[int | None, typer.Option(help="Samples to write (faces are reused with fresh masks when there are fewer); none = " + _sample_defaults() + "." + _default("prepare.num_samples"))] = None,
    size: Annotated[int | None, typer.Option(help="Aligned crop size in pixels." + _default("prepare.size"))] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes." + _default("prepare.workers"))] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for masks and the split." + _default("prepare.seed"))] = None,
    mask_types: Annotated[str | None, typer.Option(help="Mask styles with optional weights, e.g. 'surgical:3,cloth:2,rect'; also 'freeform' (wide free-form holes), 'bare' (no mask: an empty map) and 'lookalike' (a beard, shadow, hand, scarf or microphone: no mask)." + _default("prepare.mask_types"))] = None,
    mask_variety: Annotated[bool | None, typer.Option("--mask-variety/--designed-masks", help="Vary every style's outline (grown, shrunk, onto the neck, up to the nose bridge, past the jaw, tilted, loose) and look (any colour, prints, logos, folds, highlights, shadows, sheer and mesh parts), or draw the designs as they are." + _default("prepare.mask_variety"), show_default=False)] = None,
    degrade: Annotated[float | None, typer.Option(help="Share of samples (0-1) degraded like web photos: downscaled, blurred, noisy, JPEG-compressed, the face and its masked copy alike." + _default("prepare.degrade"))] = None,
    backdrop: Annotated[float | None, typer.Option(help="Share of faces (0-1) whose crop reaches past the photo (tight face crops such as UTKFace's) that get a synthetic scene there, a background, shoulders in clothes and a neck, instead of a soft smear." + _default("prepare.backdrop"))] = None,
    all_faces: Annotated[bool | None, typer.Option("--all-faces/--largest-face", help="Use every detected face, or only the largest." + _default("prepare.all_faces"), show_default=False)] = None,
    recursive: Annotated[bool | None, typer.Option("--recursive/--no-recursive", help="Also read photos in sub-folders of --source." + _default("prepare.recursive"), show_default=False)] = None,
    landmarks: Annotated[Path | None, typer.Option(help="dlib 68-landmark model file; none = from face-recognition-models, or $UNMASK_LANDMARKS." + _default("prepare.landmarks"))] = None,
    detector: Annotated[str | None, typer.Option(help="Face detector: yunet (OpenCV's YuNet, shipped), hog, cnn (dlib) or hog+cnn." + _default("prepare.detector"))] = None,
    alignment: Annotated[str | None, typer.Option(help="visible (from the eyes: a masked face gets the same crop as its unmasked photo), visible-neck (the same square moved down, so that with --crop 1.1 a mask reaching the neck stays inside; the shipped model's) or ffhq (eyes and mouth, the alignment before 'visible'). Recorded in the dataset and in checkpoints trained on it." + _default("prepare.alignment"))] = None,
    crop: Annotated[float | None, typer.Option(help="Side of the crop square as a factor of the alignment square: 1.0 = FFHQ-sized (the face fills the middle half), 0.7 = the face fills the frame. Recorded like --alignment." + _default("prepare.crop"))] = None,
    preview: Annotated[int | None, typer.Option(help="Write a contact sheet of N random samples to --out (a .png) instead of a dataset.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Synthesise a paired dataset: aligned faces, masked faces and binary mask maps.

    Writes [bold]original_celeba_aligned/[/], [bold]masked_images/[/], [bold]mask_maps/[/], manifest.jsonl (source, box, landmarks, mask, split) and skipped.csv. Resumable: rerun the same command after a kill.
    """
    from unmask_cli.prepare import preview as make_preview
    from unmask_cli.prepare import run_prepare, summary_table

    options = {"prepare.source": source, "data.root": out, "prepare.num_samples": num_samples, "prepare.size": size,
               "prepare.workers": workers, "prepare.seed": seed, "prepare.mask_types": mask_types,
               "prepare.mask_variety": mask_variety, "prepare.degrade": degrade, "prepare.backdrop": backdrop,
               "prepare.all_faces": all_faces, "prepare.recursive": recursive, "prepare.landmarks": landmarks,
               "prepare.detector": detector, "prepare.alignment": alignment,
               "prepare.crop": crop}
    cfg = _config(config, set_, options)
    pc, root = cfg.prepare, Path(cfg.data.root)
    if preview is not None:
        count = make_preview(pc, preview, root)
        console.print(f"preview sheet with {count} samples (original | masked | map): [bold]{root}[/]")
        return
    what = f"{pc.source}" if pc.source else "built-in sample portraits (astronaut, grace_hopper; augmented)"
    console.print(f"preparing {pc.samples()} samples at {pc.size}px from {what} with {pc.workers} worker(s); "
                  f"{pc.detector} detector, {pc.alignment} alignment, crop {pc.crop:g}")
    with make_progress(console, unit="faces") as progress:
        summary = run_prepare(pc, root, progress)
    console.print(summary_table(summary))
    if summary.skipped:
        console.print(f"skipped sources are listed with reasons in [bold]{root / 'skipped.csv'}[/]")


@app.command()
@_interruptible
def train(
    config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset folder." + _default("data.root"))] = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to RUNS/NAME/; none = the config file's stem." + _default("train.name"))] = None,
    runs: Annotated[Path | None, typer.Option(help="Folder holding the run folders." + _default("train.runs"))] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue from this checkpoint (default: RUNS/NAME/last.pt when it exists).")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start fresh (refused if the run folder already has checkpoints).")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps." + _default("train.device"))] = None,
    set_: SetOpt = None,
) -> None:
    """Train the U-Net generator against two PatchGAN discriminators (+ the mask-map module).

    Writes [bold]RUNS/NAME/[/]: config.yaml, meta.json, metrics.csv, curves.png, samples/epoch_NNN.png, last.pt, best.pt and epoch_NNN.pt every save_interval epochs. Rerunning the same command resumes exactly where it stopped; Ctrl-C saves and exits. Under torchrun it trains on every process with DistributedDataParallel.
    """
    from unmask_cli.training import run_dir_of
    from unmask_cli.training import train as run_train

    if resume is not None and no_resume:
        raise UnmaskError("--resume and --no-resume exclude each other")
    cfg = _config(config, set_, {"data.root": data, "train.name": name, "train.runs": runs, "train.device": device})
    summary = run_train(cfg, run_dir_of(cfg, config), Path(cfg.data.root),
                        resume=None if no_resume else (resume if resume is not None else "auto"), console=console)
    if summary.status == "interrupted":
        raise typer.Exit(130)


@app.command("eval")
@_interruptible
def eval_(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint from 'unmask train' (last.pt, best.pt, epoch_NNN.pt), a release file, or 'shipped' (the model that ships with unmask)." + _default("eval.checkpoint"))] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset (or a folder with original_celeba_aligned/, masked_images/, mask_maps/); none = the checkpoint's data.root." + _default("eval.data"))] = None,
    split: Annotated[str | None, typer.Option(help="train, val, test or all." + _default("eval.split"))] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder; none = <checkpoint folder>/eval_<split>." + _default("eval.out"))] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch." + _default("eval.batch_size"))] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps." + _default("eval.device"))] = None,
    vgg_weights: Annotated[str | None, typer.Option(help="VGG16 weights for FD: imagenet, a weights file, or random; none = the checkpoint's loss.vgg_weights." + _default("eval.vgg_weights"))] = None,
    max_images: Annotated[int | None, typer.Option(help="Evaluate only the first N images of the split (0 = all)." + _default("eval.max_images"))] = None,
    sheet_images: Annotated[int | None, typer.Option(help="Rows in comparison.png (0 = none)." + _default("eval.sheet_images"))] = None,
    baselines: Annotated[str | None, typer.Option(help="Classical methods scored beside the GAN: any of telea,ns,biharmonic,masked." + _default("eval.baselines"))] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="Score the moving average of G's weights when the checkpoint has one (train.ema_decay > 0); --no-ema scores G's own weights." + _default("eval.ema"), show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score a checkpoint on held-out faces against classical inpainting (OpenCV Telea and Navier-Stokes, scikit-image biharmonic).

    PSNR, SSIM, VGG feature distance (whole image and mask region), dlib identity and landmark distances. Writes metrics.json, per_image.csv and comparison.png, and prints the table.
    """
    from unmask_cli.evaluation import report_table, run_eval

    options = {"eval.checkpoint": checkpoint, "eval.data": data, "eval.split": split, "eval.out": out,
               "eval.batch_size": batch_size, "eval.device": device, "eval.vgg_weights": vgg_weights,
               "eval.max_images": max_images, "eval.sheet_images": sheet_images, "eval.baselines": baselines,
               "eval.ema": ema}
    cfg = _config(config, set_, options)
    with make_progress(console, unit="img") as progress:
        report = run_eval(cfg.eval, progress)
    console.print(report_table(report))
    console.print(f"reports: [bold]{report.out}[/] (metrics.json, per_image.csv, comparison.png)")


@app.command()
@_interruptible
def infer(
    in_dir: Annotated[Path, typer.Argument(help="Folder of masked photos (or aligned crops with --aligned).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (must not be IN_DIR or inside it).")],
    checkpoint: Annotated[Path | None, typer.Option(help="Trained checkpoint (runs/NAME/best.pt) or release file; none = the model that ships with unmask." + _default("infer.checkpoint"))] = None,
    masks: Annotated[Path | None, typer.Option(help="Folder of mask maps with the same file stems; none = the map module predicts them." + _default("infer.masks"))] = None,
    aligned: Annotated[bool | None, typer.Option("--aligned/--photos", help="Inputs are aligned face crops (no detection, no paste-back), or whole photos." + _default("infer.aligned"), show_default=False)] = None,
    threshold: Annotated[float | None, typer.Option(help="Map-module threshold for predicted masks." + _default("infer.threshold"))] = None,
    min_mask_area: Annotated[float | None, typer.Option(help="A face wears a mask when its predicted map covers at least this share of its crop; other faces are left untouched." + _default("infer.min_mask_area"))] = None,
    save_masks: Annotated[bool | None, typer.Option("--save-masks/--no-save-masks", help="Write the masks used to OUT_DIR/masks/." + _default("infer.save_masks"), show_default=False)] = None,
    compare: Annotated[bool | None, typer.Option("--compare/--no-compare", help="Also write input | output pairs to OUT_DIR/compare/." + _default("infer.compare"), show_default=False)] = None,
    jpeg_quality: Annotated[int | None, typer.Option(help="Quality (1-100) of JPEG outputs; none = each input's own (estimated from its quantization tables)." + _default("infer.jpeg_quality"))] = None,
    batch_size: Annotated[int | None, typer.Option(help="Faces per batch." + _default("infer.batch_size"))] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps." + _default("infer.device"))] = None,
    all_faces: Annotated[bool | None, typer.Option("--all-faces/--largest-face", help="Unmask every face or only the largest." + _default("infer.all_faces"), show_default=False)] = None,
    landmarks: Annotated[Path | None, typer.Option(help="dlib 68-landmark model file." + _default("infer.landmarks"))] = None,
    detector: Annotated[str | None, typer.Option(help="Face detector: yunet (OpenCV's YuNet, shipped with unmask: finds masked faces in milliseconds), hog (dlib; misses most masked faces), cnn (dlib; finds most, but takes seconds a photo on a CPU) or hog+cnn (the CNN only where HOG finds none, and not with --masks). Faces are aligned the way the checkpoint's training data was." + _default("infer.detector"))] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite/--no-overwrite", help="Redo outputs that already exist (default: skip them, so reruns resume)." + _default("infer.overwrite"), show_default=False)] = None,
    fold_bn: Annotated[bool | None, typer.Option("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convolutions (same outputs within 1e-4, faster)." + _default("infer.fold_bn"), show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Unmask every photo of IN_DIR into OUT_DIR (same names, sizes and formats).

    Whole photos: every face is detected, aligned, unmasked and pasted back with a feathered blend; photos without a face are copied through. Outputs keep the input's metadata (EXIF, ICC, XMP, comments, PNG text, DPI), JPEG quality and chroma subsampling, mode and bit depth. Inputs are never modified; unreadable files are skipped with a reason.
    """
    from unmask_cli.inference import run_infer, summary_table

    options = {"infer.checkpoint": checkpoint, "infer.masks": masks, "infer.aligned": aligned,
               "infer.threshold": threshold, "infer.min_mask_area": min_mask_area, "infer.save_masks": save_masks, "infer.compare": compare,
               "infer.jpeg_quality": jpeg_quality, "infer.batch_size": batch_size, "infer.device": device, "infer.all_faces": all_faces,
               "infer.landmarks": landmarks, "infer.detector": detector, "infer.overwrite": overwrite,
               "infer.fold_bn": fold_bn}
    cfg = _config(config, set_, options)
    with make_progress(console, unit="img") as progress:
        summary = run_infer(cfg.infer, in_dir, out_dir, progress)
    console.print(summary_table(summary))


@app.command()
@_interruptible
def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint from 'unmask train' (runs/NAME/best.pt).")],
    out: Annotated[Path, typer.Option(help="Release file to write (NAME.pt; NAME.json, its sha256 and description, goes beside it).")],
    data: Annotated[Path | None, typer.Option(help="The prepared dataset it was trained on, described in the release; none = the checkpoint's data.root (when present).")] = None,
    metrics: Annotated[Path | None, typer.Option(help="An 'unmask eval' metrics.json to record in the release.")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Pack the moving average of G's weights when the checkpoint has one.")] = True,
    about: Annotated[str, typer.Option(help="The training data in words (where the faces came from, their licence), recorded in the release.")] = "",
    licence: Annotated[str | None, typer.Option(help="The release's licence; default: from the training data's recorded source (the built-in samples: public domain; UTKFace: non-commercial research), else 'not recorded'.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (and its .json); never the checkpoint being exported.")] = False,
) -> None:
    """Pack a checkpoint into a release file others can run: float16 generator and map module, config, alignment, crop, data, metrics and sha256.

    Run it with [bold]unmask infer IN OUT --checkpoint NAME.pt[/] (NAME.json must stay beside it). The shipped model was made this way.
    """
    from unmask_cli.export import export_release

    path, sidecar = export_release(checkpoint, out, data=data, metrics=metrics, ema=ema, about=about,
                                   licence=licence, overwrite=overwrite)
    console.print(f"release file [bold]{path}[/] ({sidecar['bytes'] / 1e6:.1f} MB, {sidecar['image_size']} px, "
                  f"{sidecar['weights']}, sha256 {sidecar['sha256'][:12]}) and [bold]{path.with_suffix('.json')}[/]")


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
