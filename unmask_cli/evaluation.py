"""``unmask eval``: score a checkpoint's generator on the held-out split of a prepared dataset.

For every image of the split (resized to the model size, as in training) the generator fills the mask
region of the masked face given the ground-truth map; the evaluated output is the *composite* (the input
outside the map, generated pixels inside it), quantised to 8 bits like a saved result. The same images are
also scored for the classical baselines of :mod:`unmask_cli.baselines` (``telea``, ``ns``) and for the
masked input itself (``masked``: the score of doing nothing), so one run gives one comparison table.

Metrics (all against the unmasked original, see :mod:`unmask_cli.metrics` and :mod:`unmask_cli.identity`):

* PSNR, SSIM and FD (VGG16 feature distance, the network and layers of the checkpoint's perceptual loss
  unless ``vgg_weights`` overrides the weights), each for the whole image and for the mask region;
* identity distance (dlib face descriptors; with the manifest's aligned landmarks when present, so output
  and original are compared on the same face chip) and landmark distance (68 points, inter-ocular units).

Outputs (``out``; none = ``<checkpoint folder>/eval_<split>``): ``metrics.json`` (header, summary per
method and metric, per-image values), ``per_image.csv`` (one row per image and method) and
``comparison.png`` (original | masked | telea | ours rows with per-image captions). Every file is written
atomically.

Speed: dlib's face-recognition ResNet (one 150x150 chip per method and one for the original, per image)
is most of the work. It runs in worker processes (:class:`unmask_cli.identity.FaceScorePool`), one
batch of chips per image, while this process runs the generator and the torch metrics; the original's
box and landmarks are found once per image. The numbers do not depend on any of this.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unmask_cli.config import EvalConfig
from unmask_cli.errors import UnmaskError
from unmask_cli.identity import FaceScorePool, default_workers, usable_cpus
from unmask_cli.tensors import to_uint8

OURS = "ours"
BASELINE_ORDER = ("telea", "ns", "biharmonic", "masked")
SPLIT_CHOICES = ("train", "val", "test", "all")
FD_RANDOM_SEED = 0  # loss.vgg_weights=random: the FD network is the same in every evaluation
FACE_WORKERS_MIN_IMAGES = 4  # up to this many images the dlib metrics run in this process
FACE_BACKLOG_BATCHES = 4  # batches a face-metric worker may fall behind before scoring waits for it


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool
    region: str  # "mask" | "whole" | "face"
    digits: int


# Order = column order of per_image.csv and of metrics.json summaries.
METRICS: dict[str, MetricInfo] = {
    "psnr_mask": MetricInfo("PSNR mask (dB)", True, "mask", 2),
    "ssim_mask": MetricInfo("SSIM mask", True, "mask", 4),
    "fd_mask": MetricInfo("FD mask", False, "mask", 4),
    "psnr_whole": MetricInfo("PSNR whole (dB)", True, "whole", 2),
    "ssim_whole": MetricInfo("SSIM whole", True, "whole", 4),
    "fd_whole": MetricInfo("FD whole", False, "whole", 4),
    "identity": MetricInfo("ID dist", False, "face", 4),
    "landmarks": MetricInfo("landmark dist", False, "face", 4),
}
# Columns of the terminal table (rows = methods).
TABLE_COLUMNS = ("psnr_mask", "ssim_mask", "fd_mask", "identity", "psnr_whole", "ssim_whole", "landmarks")

# comparison.png layout: tiles are the model-size images enlarged (nearest neighbour) by an integer factor
# to at least SHEET_MIN_TILE px, each with a caption band below; one header band on top; grid padding 2 px.
SHEET_COLUMNS = ("original", "masked", "telea", OURS)
SHEET_MIN_TILE = 192
SHEET_CAPTION_HEIGHT = 46
SHEET_HEADER_HEIGHT = 22
SHEET_PADDING = 2


@dataclass
class MaskFinding:
    """The map module's decisions over a split, made the way ``unmask infer`` makes them: on faces that
    wear a mask, how many it found and the IoU of its map; on faces without one, how many it left alone."""

    threshold: float
    min_mask_area: float
    masked: int = 0
    found: int = 0
    iou_sum: float = 0.0
    bare: int = 0
    left_alone: int = 0

    def add(self, truth: np.ndarray, predicted: np.ndarray, decided: np.ndarray) -> None:
        if truth.any():
            self.masked += 1
            self.found += bool(decided.any())
            self.iou_sum += float((predicted & truth).sum() / (predicted | truth).sum())
        else:
            self.bare += 1
            self.left_alone += not decided.any()

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "min_mask_area": self.min_mask_area,
                "masked_faces": self.masked, "found": self.found,
                "map_iou": self.iou_sum / self.masked if self.masked else None,
                "faces_without_a_mask": self.bare, "left_alone": self.left_alone}

    def describe(self) -> str:
        parts = []
        if self.masked:
            parts.append(f"a mask found on {self.found}/{self.masked} masked faces "
                         f"({100 * self.found / self.masked:.1f}%, map IoU {self.iou_sum / self.masked:.3f})")
        if self.bare:
            parts.append(f"{self.left_alone}/{self.bare} faces without a mask left alone "
                         f"({100 * self.left_alone / self.bare:.1f}%)")
        return (f"map module (threshold {self.threshold:g}, min area {self.min_mask_area:g}): "
                + "; ".join(parts))


@dataclass
class EvalReport:
    checkpoint: Path
    epoch: int
    global_step: int
    data: Path
    split: str
    n_images: int
    image_size: int
    weights: str  # which generator weights were scored (G, or its EMA)
    vgg: str  # description of the VGG16 weights used for FD
    vgg_random: bool
    train_vgg: str  # what the checkpoint's perceptual loss was trained with
    device: str
    identity_landmarks: str
    methods: list[str]
    summary: dict[str, dict[str, dict]]  # method -> metric -> {mean, std, count, nan}
    per_image: list[dict]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    skipped: list[dict] = field(default_factory=list)  # {"stem", "error"}: samples that could not be read
    mask_finding: MaskFinding | None = None  # None: the checkpoint has no map module

    def mean(self, method: str, metric: str) -> float | None:
        return self.summary[method][metric]["mean"]


# --------------------------------------------------------------------------------------------- helpers

def feature_distances(pred_maps: list[torch.Tensor], ref_maps: list[torch.Tensor],
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole, region) FD per image, shape (N,) each, from precomputed VGG feature maps of the output and
    the reference: the same arithmetic as :func:`unmask_cli.metrics.feature_distance` (mean over layers of
    the mean absolute difference; region weights = the (N,1,H,W) mask resized to each map by area), without
    a second VGG pass per metric and with the reference maps shared by every method."""
    from unmask_cli.metrics import _masked_mean

    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != pred_maps[0].shape[0]:
        raise ValueError(f"mask must be (N, 1, H, W), got {tuple(mask.shape)}")
    m = (mask.detach().cpu().to(torch.float64) > 0.5).to(torch.float64)
    whole, region = [], []
    for got, want in zip(pred_maps, ref_maps, strict=True):
        diff = (got - want).cpu().to(torch.float64).abs()  # float64 on the CPU (MPS has no float64)
        whole.append(diff.flatten(1).mean(1))
        weights = F.interpolate(m, size=tuple(got.shape[2:]), mode="area")
        region.append(_masked_mean(diff, weights))
    return torch.stack(whole, 1).mean(1), torch.stack(region, 1).mean(1)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run small float64 metric kernels single-threaded: on 2 shared cores torch's intra-op threads make
    the SSIM filters of 64-128 px images 10-40x slower (spin-waiting), never faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_fd_network(spec: str, layers: Sequence[int]) -> tuple[torch.nn.Module, str]:
    """The VGG16 features for FD (:func:`unmask_cli.vgg.load_vgg_features`). ``random`` weights are drawn
    from a fixed seed (without touching the global RNG), so FD values of two evaluations - e.g. a model
    and its ablation - are computed by the same network even in smoke tests."""
    from unmask_cli.vgg import load_vgg_features

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FD_RANDOM_SEED)
        return load_vgg_features(spec, layers)


def _collate(items: list[dict]) -> dict:
    from torch.utils.data import default_collate

    good = [it for it in items if "error" not in it]
    batch = default_collate(good) if good else {"stem": []}
    batch["errors"] = [(it["stem"], it["error"]) for it in items if "error" in it]
    return batch


def _scaled_landmarks(record: dict | None, image_size: int) -> np.ndarray | None:
    """The manifest's aligned landmarks moved to the model size (pixel-centre convention)."""
    if not record or "aligned_landmarks" not in record:
        return None
    pts = np.asarray(record["aligned_landmarks"], dtype=np.float64)
    size = record.get("size")
    if pts.shape != (68, 2) or not size:
        return None
    scale = image_size / float(size)
    return (pts + 0.5) * scale - 0.5


def _clean(value: Any) -> Any:
    """JSON-friendly: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt_csv(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def resolve_split(split: str | None) -> str:
    text = "all" if split is None else str(split).strip().lower()
    if text not in SPLIT_CHOICES:
        raise UnmaskError(f"unknown split '{split}' (use {', '.join(SPLIT_CHOICES)})")
    return text


# ------------------------------------------------------------------------------------------------ the job

def run_eval(cfg: EvalConfig, progress=None) -> EvalReport:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split`` of the prepared dataset ``cfg.data`` and write the
    reports; :class:`unmask_cli.config.EvalConfig` has every setting and its default. ``data`` none = the
    checkpoint's ``data.root``; a folder without a manifest has no splits (every image is used);
    ``vgg_weights`` overrides the checkpoint's ``loss.vgg_weights`` for FD (the layers are always its
    ``loss.vgg_layers``); ``ema`` false scores G's own weights when the checkpoint also holds their moving
    average. ``progress``: a rich Progress."""
    start = time.perf_counter()
    job = EvalJob(cfg)
    job.load_model()
    job.check_framing()
    job.load_data()
    job.load_fd_network()
    workers = job.face_workers()
    with FaceScorePool(workers) as faces, job.torch_threads(workers):
        for batch in job.batches(progress):
            job.find_masks(batch)
            batch = job.with_masks(batch)
            if batch is not None:
                job.score_batch(batch, faces)
        job.finish_rows(0)
    report = job.report()
    report.files = job.write_outputs(report)
    report.seconds = time.perf_counter() - start
    return report


def parse_baselines(text: str | Sequence[str]) -> list[str]:
    """``"telea,ns"`` (or a sequence of names) -> the known baselines in :data:`BASELINE_ORDER`."""
    from unmask_cli.baselines import BASELINES

    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise UnmaskError(f"unknown baseline '{unknown[0]}' (known: {', '.join(BASELINES)})")
    return [b for b in BASELINE_ORDER if b in names]


class EvalJob:
    """One ``unmask eval`` run, in the order it happens: :meth:`load_model`, :meth:`load_data`,
    :meth:`load_fd_network`, then :meth:`score_batch` for each of :meth:`batches`, :meth:`report` and
    :meth:`write_outputs`. A new metric goes into :data:`METRICS` and :meth:`image_metrics` (or
    :meth:`IdentityScorer.face_scores`); a new baseline into :data:`unmask_cli.baselines.BASELINES`."""

    def __init__(self, cfg: EvalConfig):
        from unmask_cli.release import is_shipped, resolve_model

        if cfg.checkpoint is None:
            raise UnmaskError("eval needs a checkpoint (--checkpoint or eval.checkpoint; 'shipped' for the "
                              "model that ships with unmask)")
        self.cfg = cfg
        self.split = resolve_split(cfg.split)
        self.methods = [OURS, *parse_baselines(cfg.baselines)]
        self.checkpoint = resolve_model(cfg.checkpoint)
        self.shipped = is_shipped(self.checkpoint)
        self.rows: list[dict] = []  # per-image rows, in dataset order
        self.sheet: list[dict] = []  # the first cfg.sheet_images rows, with their images
        self.skipped: list[dict] = []  # {"stem", "error"}: samples that could not be read
        self.pending: collections.deque = collections.deque()  # (row, future of its face scores)
        self.n_landmarked = 0
        self._progress = self._task = None

    # ------------------------------------------------------------------------------------- loading

    def load_model(self) -> None:
        from unmask_cli.checkpoints import build_networks_from_checkpoint
        from unmask_cli.device import choose_device

        self.device = choose_device(self.cfg.device)
        self.model = build_networks_from_checkpoint(self.checkpoint, self.device, ema=self.cfg.ema)
        self.size = self.model.image_size
        data = self.cfg.data if self.cfg.data is not None else self.model.config.data.root
        self.data_root = Path(data)

    def check_framing(self) -> None:
        """The faces must be aligned and cropped the way the model's training faces were."""
        from unmask_cli.data import MANIFEST, dataset_framing

        framing, wanted = dataset_framing(self.data_root), (self.model.alignment, self.model.crop)
        if (self.data_root / MANIFEST).exists() and framing != wanted:
            raise UnmaskError(f"the dataset's faces are '{framing[0]}'-aligned with crop {framing[1]:g}, the model "
                              f"was trained on '{wanted[0]}' with crop {wanted[1]:g}; prepare the data with "
                              f"--alignment {wanted[0]} --crop {wanted[1]:g}", self.data_root)

    def load_data(self) -> None:
        """The split's samples (the first ``max_images``), the manifest records, and the output folder."""
        from unmask_cli.data import PairedDataset, read_manifest
        from unmask_cli.fileio import ensure_dir, remove_temp_files

        self.dataset = PairedDataset(self.data_root, None if self.split == "all" else self.split, self.size)
        self.records = {r["stem"]: r for r in read_manifest(self.data_root)}
        self.note = "" if self.records else "no manifest.jsonl: every image of the folder is used (no splits)"
        if not self.dataset.stems:
            if self.split == "all":
                raise UnmaskError("the dataset has no samples; run 'unmask prepare'", self.data_root)
            others = [s for s in ("val", "all") if s != self.split]
            raise UnmaskError(f"no images in the '{self.split}' split of manifest.jsonl; try "
                              + " or ".join(f"--split {s}" for s in others), self.data_root)
        if self.cfg.max_images:
            self.dataset.stems = self.dataset.stems[: self.cfg.max_images]
        self.n_total = len(self.dataset.stems)
        self.n_no_mask = 0  # faces without a mask (empty map): not scored
        self.finding = MaskFinding(self.cfg.threshold, self.cfg.min_mask_area) if self.model.M is not None else None
        out = self.cfg.out
        # the shipped model lives inside the package: its reports go under runs/ in the working folder
        default = Path("runs") / f"eval_shipped_{self.split}" if self.shipped else self.checkpoint.parent / f"eval_{self.split}"
        self.out = Path(out) if out is not None else default
        if self.out.exists() and not self.out.is_dir():
            raise UnmaskError("output path exists and is not a folder", self.out)
        ensure_dir(self.out)
        remove_temp_files(self.out)

    def load_fd_network(self) -> None:
        """FD's VGG16: the checkpoint's perceptual-loss layers, its weights unless ``vgg_weights`` says."""
        from unmask_cli.vgg import RANDOM_DESCRIPTION

        loss = self.model.config.loss
        self.vgg_spec = self.cfg.vgg_weights if self.cfg.vgg_weights is not None else loss.vgg_weights
        self.layers = [int(i) for i in loss.vgg_layers]
        features, self.vgg_description = load_fd_network(self.vgg_spec, self.layers)
        self.features = features.to(self.device)
        self.vgg_random = self.vgg_description == RANDOM_DESCRIPTION

    def face_workers(self) -> int:
        """Processes for the dlib metrics: none for a handful of images (starting them costs more)."""
        if self.n_total <= FACE_WORKERS_MIN_IMAGES:
            return 0
        return min(default_workers(), math.ceil(self.n_total / self.cfg.batch_size))

    def torch_threads(self, workers: int) -> contextlib.AbstractContextManager:
        """On a CPU, torch gets the cores the face-metric workers leave (at least one): its idle intra-op
        threads spin-wait, and beside busy workers that halves the speed of the networks. The thread count
        does not change the results."""
        if workers == 0 or self.device.type != "cpu":
            return contextlib.nullcontext()
        return _torch_threads(max(1, usable_cpus() - workers))

    def batches(self, progress=None) -> Iterator[dict]:
        """Batches of readable samples; unreadable ones go to :attr:`skipped`."""
        from torch.utils.data import DataLoader

        from unmask_cli.data import ReportingDataset

        loader = DataLoader(ReportingDataset(self.dataset), batch_size=self.cfg.batch_size, shuffle=False,
                            num_workers=0, collate_fn=_collate)
        if progress is not None:
            self._progress = progress
            self._task = progress.add_task(f"eval {self.split}", total=self.n_total)
        for batch in loader:
            self.skipped.extend({"stem": stem, "error": error} for stem, error in batch["errors"])
            self._advance(len(batch["errors"]))
            if batch["stem"]:
                yield batch

    def _advance(self, n: int) -> None:
        if self._task is not None and n:
            self._progress.update(self._task, advance=n)

    # ------------------------------------------------------------------------------------- scoring

    def outputs(self, batch: dict) -> dict[str, np.ndarray]:
        """Every method's (N, H, W, 3) uint8 result: the generator's composite, then the baselines."""
        from unmask_cli.baselines import BASELINES
        from unmask_cli.models import composite, generator_input

        masked, mask = batch["masked"].to(self.device), batch["mask"].to(self.device)
        with torch.no_grad():
            generated = self.model.G(generator_input(masked, mask)).float()
            results = {OURS: to_uint8(composite(masked, mask, generated))}
        masked_u8, mask_np = batch["masked_u8"], batch["mask_np"]
        for name in self.methods[1:]:
            fn = BASELINES[name]
            results[name] = np.stack([fn(img, m) for img, m in zip(masked_u8, mask_np, strict=True)])
        return results

    def image_metrics(self, outputs: dict[str, np.ndarray], original_u8: np.ndarray,
                      mask: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        """PSNR, SSIM and FD (whole image and mask region) of each method: method -> metric -> (N,)."""
        from unmask_cli.metrics import psnr, ssim, unit_from_uint8

        ref = unit_from_uint8(original_u8)
        ref_maps = self._vgg_maps(ref)
        values = {}
        for name, images in outputs.items():
            pred = unit_from_uint8(images)
            fd_whole, fd_mask = feature_distances(self._vgg_maps(pred), ref_maps, mask)
            with _torch_threads(1):
                values[name] = {
                    "psnr_mask": psnr(pred, ref, mask).numpy(),
                    "ssim_mask": ssim(pred, ref, mask).numpy(),
                    "fd_mask": fd_mask.numpy(),
                    "psnr_whole": psnr(pred, ref).numpy(),
                    "ssim_whole": ssim(pred, ref).numpy(),
                    "fd_whole": fd_whole.numpy(),
                }
        return values

    def _vgg_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        from unmask_cli.vgg import feature_maps

        param = next(self.features.parameters())
        with torch.no_grad():
            return feature_maps(self.features, images.to(device=param.device, dtype=param.dtype), self.layers)

    def find_masks(self, batch: dict) -> None:
        """Score the map module's decision on every face of the batch, with or without a mask."""
        from unmask_cli.inference import mask_decision
        from unmask_cli.models import predict_map

        if self.finding is None:
            return
        with torch.no_grad():
            predicted = predict_map(self.model.M, batch["masked"].to(self.device), self.cfg.threshold)
        predicted = predicted[:, 0].cpu().numpy() > 0.5
        for truth, pred in zip(batch["mask"][:, 0].numpy() > 0.5, predicted, strict=True):
            self.finding.add(truth, pred, mask_decision(pred, self.cfg.min_mask_area))

    def with_masks(self, batch: dict) -> dict | None:
        """The batch without its faces that wear no mask (bare faces and look-alikes of ``prepare``: an
        empty map, nothing to fill, every method scores perfectly on them); counted in the report's note."""
        keep = batch["mask"].flatten(1).amax(1) > 0.5
        dropped = int((~keep).sum())
        if dropped == 0:
            return batch
        self.n_no_mask += dropped
        if dropped == len(keep):
            return None
        index = keep.nonzero()[:, 0].tolist()

        def subset(value):  # per-image entries only ("errors" lists the unreadable samples, not per image)
            if isinstance(value, torch.Tensor) and len(value) == len(keep):
                return value[keep]
            if isinstance(value, list) and len(value) == len(keep):
                return [value[i] for i in index]
            return value

        return {k: subset(v) for k, v in batch.items()}

    def score_batch(self, batch: dict, faces: FaceScorePool) -> None:
        """Score one batch: the face metrics go to the pool first, so the dlib ResNet runs while this
        process computes the image metrics; rows wait in :attr:`pending` for their face scores."""
        original_u8 = to_uint8(batch["original"])
        batch["masked_u8"], batch["mask_np"] = to_uint8(batch["masked"]), batch["mask"][:, 0].numpy() > 0.5
        outputs = self.outputs(batch)
        rows = []
        for i, stem in enumerate(batch["stem"]):
            landmarks = _scaled_landmarks(self.records.get(stem), self.size)
            self.n_landmarked += landmarks is not None
            future = faces.submit([outputs[name][i] for name in self.methods], original_u8[i], landmarks)
            row = {"stem": stem, "split": (self.records.get(stem) or {}).get("split", ""),
                   "mask_fraction": float(batch["mask_np"][i].mean()), "methods": {}}
            rows.append(row)
            self.pending.append((row, future))
        values = self.image_metrics(outputs, original_u8, batch["mask"])
        for i, row in enumerate(rows):
            row["methods"] = {name: {k: float(values[name][k][i]) for k in values[name]} for name in self.methods}
            self.rows.append(row)
            if len(self.sheet) < self.cfg.sheet_images:
                self.sheet.append({"stem": row["stem"], "original": original_u8[i],
                                   "masked": batch["masked_u8"][i], "mask_fraction": row["mask_fraction"],
                                   "images": {name: outputs[name][i] for name in self.methods}, "row": row})
        self.finish_rows(FACE_BACKLOG_BATCHES * max(1, faces.workers) * self.cfg.batch_size)

    def finish_rows(self, keep: int) -> None:
        """Wait for the face scores of the oldest pending rows until at most ``keep`` are pending (a
        bounded backlog of images in flight)."""
        while len(self.pending) > keep:
            row, future = self.pending.popleft()
            for name, (identity, landmarks) in zip(self.methods, future.result(), strict=True):
                metrics = {**row["methods"][name], "identity": identity, "landmarks": landmarks}
                row["methods"][name] = {k: metrics[k] for k in METRICS}
            self._advance(1)

    # ------------------------------------------------------------------------------------- reports

    def identity_landmarks(self) -> str:
        n_total, n_landmarked = len(self.rows), self.n_landmarked
        if n_landmarked == n_total:
            return "manifest aligned landmarks (same face chip for output and original)"
        if n_landmarked == 0:
            return "dlib detector + 68-landmark predictor on each image"
        return f"manifest aligned landmarks for {n_landmarked} images, dlib detector for {n_total - n_landmarked}"

    def report(self) -> EvalReport:
        from unmask_cli.metrics import summarize

        if not self.rows and self.n_no_mask:
            raise UnmaskError(f"no face of the '{self.split}' split wears a mask: nothing to score", self.data_root)
        if not self.rows:
            raise UnmaskError(f"none of the {self.n_total} images of the '{self.split}' split could be read "
                              f"(first: {self.skipped[0]['error']})", self.data_root)
        summary = {name: {k: summarize([row["methods"][name][k] for row in self.rows]) for k in METRICS}
                   for name in self.methods}
        no_mask = self.n_no_mask
        if no_mask:
            self.note = "; ".join(filter(None, [self.note, f"{no_mask} faces without a mask (empty map: bare "
                                                          "faces, look-alikes) are not scored"]))
        m = self.model
        return EvalReport(
            checkpoint=self.checkpoint, epoch=m.epoch, global_step=m.global_step, data=self.data_root,
            split=self.split, n_images=len(self.rows), image_size=self.size, weights=m.weights,
            vgg=self.vgg_description, vgg_random=self.vgg_random, train_vgg=m.vgg, device=str(self.device),
            identity_landmarks=self.identity_landmarks(), methods=self.methods, summary=summary,
            per_image=self.rows, out=self.out, note=self.note, skipped=self.skipped, mask_finding=self.finding,
        )

    def write_outputs(self, report: EvalReport) -> dict[str, Path]:
        sheet = [{**item, "metrics": item["row"]["methods"]} for item in self.sheet]
        return _write_outputs(report, self.layers, self.vgg_spec, sheet)


# ------------------------------------------------------------------------------------------------ outputs

def _write_outputs(report: EvalReport, layers: list[int], spec: str, sheet: list[dict]) -> dict[str, Path]:
    from unmask_cli.fileio import atomic_write_text, write_image

    out = report.out
    files = {"metrics": out / "metrics.json", "per_image": out / "per_image.csv"}
    header = {
        "checkpoint": str(report.checkpoint.resolve()), "epoch": report.epoch, "global_step": report.global_step,
        "data": str(report.data.resolve()), "split": report.split, "n_images": report.n_images,
        "image_size": report.image_size, "generator_weights": report.weights, "vgg": report.vgg,
        "vgg_weights": spec, "vgg_layers": layers, "vgg_random": report.vgg_random, "train_vgg": report.train_vgg,
        "device": report.device, "identity_landmarks": report.identity_landmarks,
        "output": "composite (input outside the mask, generated inside), 8-bit", "note": report.note,
    }
    doc = {
        **header, "methods": report.methods,
        "metrics": {k: {"label": v.label, "higher_is_better": v.higher_is_better, "region": v.region}
                    for k, v in METRICS.items()},
        "summary": report.summary,
        "mask_finding": report.mask_finding.as_dict() if report.mask_finding is not None else None,
        "per_image": report.per_image, "skipped": report.skipped,
    }
    atomic_write_text(files["metrics"], json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stem", "split", "method", "mask_fraction", *METRICS])
    for row in report.per_image:
        for method, metrics in row["methods"].items():
            writer.writerow([row["stem"], row["split"], method, f"{row['mask_fraction']:.6g}",
                             *(_fmt_csv(metrics[k]) for k in METRICS)])
    atomic_write_text(files["per_image"], buffer.getvalue())

    if sheet:
        files["comparison"] = out / "comparison.png"
        write_image(files["comparison"], comparison_sheet(sheet, report.image_size))
    else:  # no sheet asked for: do not leave one of an earlier evaluation beside these reports
        (out / "comparison.png").unlink(missing_ok=True)
    return files


def sheet_tile_size(image_size: int) -> int:
    """Edge of one image tile in comparison.png: the image enlarged by the smallest integer factor that
    reaches :data:`SHEET_MIN_TILE` px."""
    return image_size * max(1, math.ceil(SHEET_MIN_TILE / image_size))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _caption_lines(column: str, item: dict) -> list[tuple[str, tuple[int, int, int]]]:
    if column == "original":
        return [(item["stem"], (0, 0, 0)), ("reference", (90, 90, 90))]
    if column == "masked":
        return [("input", (0, 0, 0)), (f"mask {item['mask_fraction']:.0%} of the image", (90, 90, 90))]
    m = item["metrics"][column]
    colour = (0, 90, 0) if column == OURS else (140, 40, 0)

    def num(key: str, digits: int) -> str:
        value = m[key]
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    return [(f"PSNR {num('psnr_mask', 2)} dB  SSIM {num('ssim_mask', 3)}", colour),
            (f"FD {num('fd_mask', 3)}  ID {num('identity', 3)}", colour)]


def _tile(image: np.ndarray, tile: int, lines: list[tuple[str, tuple[int, int, int]]]) -> torch.Tensor:
    import cv2
    from PIL import Image, ImageDraw

    big = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_NEAREST)
    canvas = Image.new("RGB", (tile, tile + SHEET_CAPTION_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for k, (text, colour) in enumerate(lines):
        draw.text((4, tile + 4 + 15 * k), text, fill=colour, font=font)
    arr = np.asarray(canvas)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def comparison_sheet(items: list[dict], image_size: int) -> np.ndarray:
    """uint8 (H, W, 3) sheet: a header band, then one row per image: original | masked | telea | ours,
    each tile captioned (mask-region PSNR/SSIM/FD and identity distance for telea and ours).

    Size: width ``4*(T+p)+p``, height ``SHEET_HEADER_HEIGHT + n*(T+C+p)+p`` with T = :func:`sheet_tile_size`,
    C = SHEET_CAPTION_HEIGHT, p = SHEET_PADDING.
    """
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    tile = sheet_tile_size(image_size)
    tiles = []
    for item in items:
        for column in SHEET_COLUMNS:
            if column == "original":
                image = item["original"]
            elif column == "masked":
                image = item["masked"]
            elif column in item["images"]:
                image = item["images"][column]
            else:  # the baseline was not evaluated: an empty tile
                image = np.full((image_size, image_size, 3), 255, np.uint8)
            lines = _caption_lines(column, item) if column in ("original", "masked") or column in item["images"] \
                else [("not evaluated", (90, 90, 90))]
            tiles.append(_tile(image, tile, lines))
    grid = make_grid(torch.stack(tiles), nrow=len(SHEET_COLUMNS), padding=SHEET_PADDING, pad_value=1.0)
    body = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    header = Image.new("RGB", (body.shape[1], SHEET_HEADER_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    font = _font(13)
    titles = {"original": "original", "masked": "masked input", "telea": "telea (cv2)", OURS: "ours (GAN)"}
    for j, column in enumerate(SHEET_COLUMNS):
        draw.text((SHEET_PADDING + j * (tile + SHEET_PADDING) + 4, 4), titles[column], fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(header), body], axis=0)


# ------------------------------------------------------------------------------------------------ tables

def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def comparison_table(rows: Sequence[tuple[str, dict[str, dict]]], title: str | None = None, caption=None,
                     columns: Sequence[str] = TABLE_COLUMNS):
    """A rich Table: one row per (label, summary) with summary = {metric: {"mean": ...}}; the best value of
    each column is bold green (↑ higher is better, ↓ lower)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, caption=caption, show_header=True, caption_justify="left")
    table.add_column("method", style="bold")
    best: dict[str, float] = {}
    for key in columns:
        info = METRICS[key]
        table.add_column(f"{info.label} {'↑' if info.higher_is_better else '↓'}", justify="right")
        means = [s[key]["mean"] for _, s in rows if s.get(key) and s[key]["mean"] is not None
                 and math.isfinite(s[key]["mean"])]
        if len(means) > 1:
            best[key] = max(means) if info.higher_is_better else min(means)
    for label, summary in rows:
        cells = []
        for key in columns:
            mean = summary[key]["mean"] if summary.get(key) else None
            text = _cell(mean, METRICS[key].digits)
            cells.append(Text(text, style="bold green" if key in best and mean == best[key] else ""))
        table.add_row(Text(label), *cells)
    return table


def report_caption(report: EvalReport):
    from rich.text import Text

    text = Text()
    text.append(f"checkpoint {report.checkpoint} (epoch {report.epoch}, weights: {report.weights}); data "
                f"{report.data}; split {report.split}; {report.n_images} images at {report.image_size} px; "
                f"device {report.device}\n")
    text.append("FD network: ")
    text.append(report.vgg, style="bold red" if report.vgg_random else "")
    if report.vgg_random:
        text.append("  <- random VGG weights: FD values are NOT meaningful", style="bold red")
    text.append(f"\nidentity: {report.identity_landmarks}; ID dist < 0.6 = same person (dlib); output = composite")
    if report.mask_finding is not None:
        text.append(f"\n{report.mask_finding.describe()}")
    if report.note:
        text.append(f"\n{report.note}", style="yellow")
    if report.skipped:
        text.append(f"\n{len(report.skipped)} unreadable sample(s) skipped (listed in metrics.json), e.g. "
                    f"{report.skipped[0]['error']}", style="yellow")
    return text


def report_table(report: EvalReport):
    """The terminal summary of :func:`run_eval`: rows = methods (ours first), columns = mask-region
    PSNR/SSIM/FD/ID, whole-image PSNR/SSIM and landmark distance; the caption names the checkpoint, data,
    split, image count and the VGG weights of FD."""
    labels = {OURS: "ours (GAN)", "telea": "telea", "ns": "ns", "masked": "masked (input)"}
    rows = [(labels.get(m, m), report.summary[m]) for m in report.methods]
    return comparison_table(rows, title=f"unmask eval: {report.split} split, {report.n_images} images",
                            caption=report_caption(report))
