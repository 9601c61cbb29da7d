"""``unmask train``: the GAN training job (seeded, resumable, interruptible).

Per batch: one discriminator step (D_whole and D_mask, one Adam), then one generator step, then one
map-module step (its own Adam; its loss does not touch G). The same code runs on every device; CUDA only
adds autocast/GradScaler/channels_last through :class:`unmask_cli.device.DeviceSetup`.

Exact resume. Each epoch's sample order is a permutation drawn from a generator seeded with
``(train.seed, epoch)``; a checkpoint records the completed epochs and how many samples of the current
epoch were consumed, plus the torch/numpy/python RNG states, optimizer and scaler states and the running
loss sums of the epoch. ``last.pt`` is written at every epoch end and, on Ctrl-C/SIGTERM, at the batch
boundary where the run stops; resuming re-creates the same permutation and starts at the next unconsumed
sample. On the CPU an interrupted and resumed run therefore ends with bitwise the same weights as an
uninterrupted one. A SIGKILL loses the unfinished epoch: the rerun restarts from the last epoch end and
redoes it identically (same order, same RNG states), so the final weights are still the same.

EMA (``train.ema_decay`` > 0, off by default): after every step past ``train.ema_start`` a moving average
of G's weights and BatchNorm statistics is updated (``torch.optim.swa_utils.AveragedModel``); once it has
started, validation, the samples, best.pt, ``unmask eval`` and ``unmask infer`` use it. It is saved in
every checkpoint and resumed exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Sampler, default_collate

from unmask_cli.checkpoints import (
    capture_rng,
    check_compatible,
    load_checkpoint,
    load_state,
    publish_copy,
    restore_rng,
    save_checkpoint,
    stored_alignment,
    stored_ema,
)
from unmask_cli.config import Config, save_config
from unmask_cli.data import ReportingDataset
from unmask_cli.device import DeviceSetup, setup_device
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import atomic_write_text, ensure_dir, remove_temp_files, write_image
from unmask_cli.losses import (
    G_TERMS,
    GeneratorLoss,
    PerceptualLoss,
    discriminator_loss,
    map_loss,
    reconstruction_only,
)
from unmask_cli.models import build_networks, composite, generator_input

METRIC_FIELDS = (
    "epoch", "step", "g_total", "g_l1", "g_ssim", "g_perc", "g_adv_whole", "g_adv_mask",
    "d_whole", "d_mask", "map_loss", "val_psnr", "val_ssim", "val_iou", "time_s", "img_per_s",
)
HEARTBEAT_S = 60.0  # without a terminal (CI logs, nohup): a batch status line at most this often
# what train_step returns, in this order (the running sums of an epoch use the same keys)
STEP_KEYS = ("g_total", *(f"g_{t}" for t in G_TERMS), "d_whole", "d_mask", "map_loss")


class TrainingAborted(UnmaskError):
    """A second Ctrl-C: stop at once without saving (the previous last.pt stays valid)."""

    exit_code = 130


@dataclass
class TrainSummary:
    run_dir: Path
    status: str  # "completed" | "interrupted" | "already-complete"
    epochs_done: int
    target_epochs: int
    global_step: int
    best_psnr: float | None
    best_epoch: int | None
    resumed_from: Path | None
    device: str
    vgg: str
    last_checkpoint: Path | None
    message: str


# ------------------------------------------------------------------------------------------ data order

def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + stream * 104_729 + 12_345) % (2**63)


class EpochSampler(Sampler[int]):
    """The first ``count`` indices of a permutation seeded by (seed, epoch), from position ``start``."""

    def __init__(self, n: int, seed: int, epoch: int, count: int, start: int = 0):
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        self.order = torch.randperm(n, generator=generator)[:count].tolist()[start:]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers: numpy/python RNGs from the per-worker torch seed (base seed + worker id).
    Workers ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and only the main
    process decides when to stop (after the current batch); it then shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_plan(n_train: int, batch_size: int, max_steps: int) -> tuple[int, int]:
    """(batches per epoch, samples per epoch): full batches only, unless the split is smaller than a batch."""
    if n_train < batch_size:
        steps, count = 1, n_train
    else:
        steps = n_train // batch_size
        count = steps * batch_size
    if max_steps > 0 and steps > max_steps:
        steps, count = max_steps, max_steps * batch_size
    return steps, count


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- one step

def train_step(batch: dict, nets: dict, optimizers: dict, scaler, dev: DeviceSetup, gen_loss: GeneratorLoss,
               lambda_map: float) -> dict[str, float]:
    """One D step, one G step, one map-module step. Returns every loss term as a float."""
    G, D_whole, D_mask, M = nets["G"], nets["D_whole"], nets["D_mask"], nets.get("M")
    masked, mask, original = (dev.batch(batch[k]) for k in ("masked", "mask", "original"))

    with dev.autocast():
        generated = G(generator_input(masked, mask))

    # Discriminators: D_whole judges whole images, D_mask the composites. A discriminator whose adversarial
    # weight is 0 cannot affect G, so it is not trained (its loss is reported as 0).
    cfg = gen_loss.cfg
    zero = generated.new_zeros((), dtype=torch.float32)
    d_whole = d_mask = zero
    if cfg.lambda_adv_whole != 0 or cfg.lambda_adv_mask != 0:
        for D in (D_whole, D_mask):
            D.requires_grad_(True)
        optimizers["D"].zero_grad(set_to_none=True)
        with dev.autocast():
            if cfg.lambda_adv_whole != 0:
                d_whole = discriminator_loss(D_whole, original, generated)
            if cfg.lambda_adv_mask != 0:  # real composite == original when masked is original outside
                d_mask = discriminator_loss(D_mask, composite(masked, mask, original),
                                            composite(masked, mask, generated))
        scaler.scale(d_whole + d_mask).backward()
        scaler.step(optimizers["D"])

    # Generator (the discriminators are frozen for this backward pass).
    for D in (D_whole, D_mask):
        D.requires_grad_(False)
    optimizers["G"].zero_grad(set_to_none=True)
    with dev.autocast():
        g_total, terms = gen_loss(generated, masked, mask, original, D_whole, D_mask)
    scaler.scale(g_total).backward()
    scaler.step(optimizers["G"])

    # Map module: learns the synthetic map from the masked image alone.
    m_loss = g_total.new_zeros((), dtype=torch.float32)
    if M is not None:
        optimizers["M"].zero_grad(set_to_none=True)
        with dev.autocast():
            m_loss, _ = map_loss(M(masked), mask)
        scaler.scale(lambda_map * m_loss).backward()
        scaler.step(optimizers["M"])
    scaler.update()

    values = torch.stack([g_total.detach().float(), *(terms[t].float() for t in G_TERMS),
                          d_whole.detach().float(), d_mask.detach().float(), m_loss.detach().float()])
    return dict(zip(STEP_KEYS, values.cpu().tolist(), strict=True))


# ------------------------------------------------------------------------------------------------ EMA

def make_ema(G: nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of G's weights and BatchNorm buffers (``train.ema_decay``), or None
    when it is off. ``update_parameters(G)`` after every step: the first copies G, later ones do
    ``ema = decay * ema + (1 - decay) * G`` (torch.optim.swa_utils)."""
    if decay <= 0:
        return None
    ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def generator_to_score(G: nn.Module, ema: AveragedModel | None) -> nn.Module:
    """The generator validation and samples use: the EMA once it has started, else G."""
    return ema.module if ema is not None and int(ema.n_averaged) > 0 else G


def restore_ema(ema: AveragedModel, ckpt: dict, path: Path) -> bool:
    """Load a checkpoint's EMA weights and update count into ``ema``; False when it has none."""
    stored = stored_ema(ckpt)
    if stored is None:
        return False
    load_state(ema.module, stored["G"], "G (EMA)", path)
    ema.n_averaged.fill_(int(stored.get("updates", 0)))
    return True


# -------------------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(nets: dict, loader: DataLoader | None, dev: DeviceSetup) -> dict[str, float]:
    """Mean PSNR/SSIM of the composite vs the original (whole image, [0,1]) and mean IoU of the map module."""
    from unmask_cli.metrics import psnr, ssim

    if loader is None:
        return {}
    G, M = nets["G"], nets.get("M")
    G.eval()
    if M is not None:
        M.eval()
    sums = {"val_psnr": 0.0, "val_ssim": 0.0, "val_iou": 0.0}
    n = 0
    try:
        for batch in loader:
            batch = _check_batch(batch)
            masked, mask, original = (dev.batch(batch[k]) for k in ("masked", "mask", "original"))
            with dev.autocast():
                generated = G(generator_input(masked, mask))
            out = ((composite(masked, mask, generated.float()) + 1) / 2).clamp(0, 1).float()
            ref = ((original + 1) / 2).clamp(0, 1).float()
            sums["val_psnr"] += float(psnr(out, ref).sum())
            sums["val_ssim"] += float(ssim(out, ref).sum())
            if M is not None:
                with dev.autocast():
                    logits = M(masked)
                pred = torch.sigmoid(logits.float()) > 0.5
                truth = mask > 0.5
                inter = (pred & truth).flatten(1).sum(1).double()
                union = (pred | truth).flatten(1).sum(1).double()
                iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
                sums["val_iou"] += float(iou.sum())
            n += masked.shape[0]
    finally:
        G.train()
        if M is not None:
            M.train()
    if n == 0:
        return {}
    out = {k: v / n for k, v in sums.items()}
    if M is None:
        out.pop("val_iou")
    return out


@torch.no_grad()
def sample_grid(G, fixed: dict | None, dev: DeviceSetup) -> np.ndarray | None:
    """Rows: masked | output (composite) | original for the fixed validation faces; uint8 (H, W, 3)."""
    from torchvision.utils import make_grid

    if fixed is None:
        return None
    G.eval()
    try:
        masked, mask, original = (dev.batch(fixed[k]) for k in ("masked", "mask", "original"))
        with dev.autocast():
            generated = G(generator_input(masked, mask))
        out = composite(masked, mask, generated.float())
    finally:
        G.train()
    rows = torch.cat([masked, out, original]).float().add(1).div(2).clamp(0, 1).cpu()
    grid = make_grid(rows.contiguous(), nrow=masked.shape[0], padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------- run folder files

def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r for r in rows if r.get("epoch", "").strip().isdigit()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file atomically (a kill leaves the old or the new file, never a partial line)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, "")) for k in METRIC_FIELDS})
    atomic_write_text(path, buffer.getvalue())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _write_meta(run_dir: Path, info: dict, resumed: dict | None) -> None:
    path = run_dir / "meta.json"
    meta: dict[str, Any] = {}
    if resumed is not None and path.exists():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
    if resumed is None or "started_at" not in meta:
        meta = {"started_at": _now(), **info, "resumed": []}
    else:
        meta.update(info)
        meta.setdefault("resumed", []).append(resumed)
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def _resolve_resume(run_dir: Path, resume: str | os.PathLike | None) -> Path | None:
    existing = sorted(p.name for p in run_dir.glob("*.pt"))
    if resume is None:
        if existing:
            raise UnmaskError(f"run folder already has checkpoints ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); pick another --name, delete the folder, "
                              "or leave out --no-resume to continue it", run_dir)
        return None
    if isinstance(resume, str) and resume == "auto":
        last = run_dir / "last.pt"
        if last.exists():
            return last
        if existing:
            raise UnmaskError(f"run folder has checkpoints ({', '.join(existing[:3])}) but no last.pt; "
                              "pass --resume FILE or pick another --name", run_dir)
        return None
    path = Path(resume)
    if not path.exists():
        raise UnmaskError("checkpoint to resume from not found", path)
    return path


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current batch, save, exit. A second Ctrl-C aborts at once.

    The handler only sets a flag: it must not call into rich (the progress display's refresh thread holds
    locks the interrupted main thread may need -> deadlock). On a terminal it writes one line straight to
    the stderr file descriptor so the user sees at once that the stop is under way."""

    def __init__(self):
        self.signum: int | None = None
        self.announced = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        try:
            if os.isatty(2):
                name = signal.Signals(signum).name
                os.write(2, f"\n{name}: finishing the current batch, then saving last.pt "
                            "(Ctrl-C again aborts without saving)\n".encode())
                self.announced = True
        except OSError:
            pass

    @property
    def stop(self) -> bool:
        return self.signum is not None


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One log line: no markup parsing (paths may contain brackets), never wrapped in CI logs."""
    console.print(Text(text, style=style or ""), soft_wrap=True)


def _make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False, disable=not console.is_terminal,
    )


def _collate(items: list[dict]) -> dict:
    for item in items:
        if "error" in item:
            return item
    return default_collate(items)


def _check_batch(batch: dict) -> dict:
    if "error" in batch:
        raise UnmaskError(f"{batch['error']} (fix or remove this sample; rerunning resumes from last.pt)")
    return batch


def _loader(dataset, batch_size: int, sampler, workers: int, dev: DeviceSetup, seed: int) -> DataLoader:
    return DataLoader(
        ReportingDataset(dataset), batch_size=batch_size, sampler=sampler, shuffle=False if sampler is None else None,
        num_workers=workers, drop_last=False, pin_memory=dev.device.type == "cuda", collate_fn=_collate,
        worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed),
    )


# ------------------------------------------------------------------------------------------- the job

def train(cfg: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
          resume: str | os.PathLike | None = "auto", device_spec: str | None = None,
          console: Console | None = None) -> TrainSummary:
    """Train (or continue training) the GAN; outputs go to ``run_dir``.

    ``resume``: ``"auto"`` continues from ``run_dir/last.pt`` when it exists, a path continues from that
    checkpoint, ``None`` starts fresh and refuses a run folder that already holds checkpoints.
    ``device_spec`` overrides ``cfg.train.device``. Ctrl-C/SIGTERM stop at a batch boundary after saving
    ``last.pt`` (status "interrupted").
    """
    from unmask_cli.data import PairedDataset, dataset_alignment

    console = console or Console(stderr=True)
    run_dir, data_root = Path(run_dir), Path(data_root)
    if run_dir.exists() and not run_dir.is_dir():
        raise UnmaskError("run folder path exists and is not a folder", run_dir)
    ensure_dir(run_dir)
    samples_dir = run_dir / "samples"
    ensure_dir(samples_dir)
    remove_temp_files(run_dir)
    remove_temp_files(samples_dir)
    tc = cfg.train
    target = tc.epochs

    ckpt_path = _resolve_resume(run_dir, resume)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    start_epoch, start_samples, global_step = 0, 0, 0
    best_psnr: float | None = None
    best_epoch: int | None = None
    if ckpt is not None:
        check_compatible(ckpt, cfg, ckpt_path)
        start_epoch = int(ckpt["epoch"])
        start_samples = int(ckpt.get("samples_in_epoch", 0))
        global_step = int(ckpt["global_step"])
        best_psnr = ckpt.get("best_psnr")
        best_epoch = ckpt.get("best_epoch")
        if start_epoch >= target:
            message = (f"already trained {start_epoch} epochs (train.epochs={target}); nothing to do. "
                       f"Raise train.epochs to train further.")
            _say(console, message, "green")
            return TrainSummary(run_dir, "already-complete", start_epoch, target, global_step, best_psnr,
                                best_epoch, ckpt_path, "-", str(ckpt.get("vgg", "")), ckpt_path, message)

    dev = setup_device(device_spec or tc.device, tc.amp)
    size = cfg.data.image_size
    train_ds = PairedDataset(data_root, "train", size)
    val_ds = PairedDataset(data_root, "val", size)
    if len(train_ds) == 0:
        raise UnmaskError("no training samples (the 'train' split is empty); run 'unmask prepare' first", data_root)
    alignment = dataset_alignment(data_root)
    trained_on = alignment if ckpt is None else stored_alignment(ckpt, ckpt_path)
    if trained_on != alignment:
        raise UnmaskError(f"checkpoint was trained on faces with the '{trained_on}' alignment, but {data_root} "
                          f"holds '{alignment}'-aligned faces; start a new run (another --name) for this data",
                          ckpt_path)
    steps_per_epoch, samples_per_epoch = epoch_plan(len(train_ds), tc.batch_size, tc.max_steps_per_epoch)

    _seed_everything(tc.seed)
    nets = {name: dev.module(net) for name, net in build_networks(cfg).items()}
    if cfg.loss.lambda_perc != 0:
        from unmask_cli.vgg import load_vgg_features

        features, vgg_description = load_vgg_features(cfg.loss.vgg_weights, cfg.loss.vgg_layers)
        perceptual = dev.module(PerceptualLoss(features, cfg.loss.vgg_layers))
    else:
        perceptual, vgg_description = None, "not used (loss.lambda_perc = 0)"
    gen_loss = GeneratorLoss(cfg.loss, perceptual)
    warmup = cfg.loss.warmup_steps
    warm_loss = GeneratorLoss(reconstruction_only(cfg.loss), None)  # steps < loss.warmup_steps
    betas = (tc.beta1, tc.beta2)
    optimizers = {
        "G": torch.optim.Adam(nets["G"].parameters(), lr=tc.lr_g, betas=betas),
        "D": torch.optim.Adam([*nets["D_whole"].parameters(), *nets["D_mask"].parameters()], lr=tc.lr_d,
                              betas=betas),
    }
    if "M" in nets:
        optimizers["M"] = torch.optim.Adam(nets["M"].parameters(), lr=tc.lr_g, betas=betas)
    scaler = dev.grad_scaler()
    epoch_stats: dict[str, float] = {}

    if ckpt is not None:
        for name, net in nets.items():
            if name not in ckpt["networks"]:
                raise UnmaskError(f"checkpoint has no weights for '{name}'", ckpt_path)
            load_state(net, ckpt["networks"][name], name, ckpt_path)
        for name, opt in optimizers.items():
            if name not in ckpt.get("optimizers", {}):
                raise UnmaskError(f"checkpoint has no optimizer state for '{name}'", ckpt_path)
            load_state(opt, ckpt["optimizers"][name], f"optimizer {name}", ckpt_path)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        epoch_stats = dict(ckpt.get("epoch_stats") or {}) if start_samples else {}
        old = _flat(ckpt["config"])
        changed = [k for k, v in _flat(cfg.to_dict()).items() if old.get(k) != v]
        if changed:
            _say(console, f"note: config differs from the checkpoint in {', '.join(changed[:6])}"
                 f"{' ...' if len(changed) > 6 else ''}; continuing with the new values", "yellow")
        if ckpt.get("vgg") and ckpt["vgg"] != vgg_description:
            _say(console, f"note: the checkpoint was trained with {ckpt['vgg']}; now {vgg_description}", "yellow")
    ema = make_ema(nets["G"], tc.ema_decay)
    if ckpt is not None:
        if ema is not None and not restore_ema(ema, ckpt, ckpt_path):
            _say(console, "note: the checkpoint has no EMA of G; the average starts from its G weights", "yellow")
        elif ema is None and stored_ema(ckpt) is not None:
            _say(console, "note: train.ema_decay is 0: the checkpoint's EMA weights are dropped; G continues",
                 "yellow")
    if start_samples >= samples_per_epoch:  # e.g. batch size or max_steps changed since the checkpoint
        start_samples = samples_per_epoch

    # run folder: config, meta, metrics trimmed to the checkpoint
    save_config(cfg, run_dir / "config.yaml")
    info = {"vgg": vgg_description, "alignment": alignment, "device": dev.describe(), "torch": str(torch.__version__),
            "python": sys.version.split()[0], "data_root": str(data_root.resolve()),
            "train_samples": len(train_ds), "val_samples": len(val_ds)}
    resumed = None if ckpt is None else {"at": _now(), "from": str(ckpt_path), "epoch": start_epoch,
                                          "samples_in_epoch": start_samples, "global_step": global_step}
    _write_meta(run_dir, info, resumed)
    metrics_path = run_dir / "metrics.csv"
    rows = [r for r in read_metrics(metrics_path) if int(r["epoch"]) <= start_epoch]
    write_metrics(metrics_path, rows)
    if ckpt is not None:
        _publish_extras(run_dir, ckpt, tc.save_interval)
    del ckpt

    val_loader = (_loader(val_ds, tc.batch_size, None, cfg.data.num_workers, dev, _epoch_seed(tc.seed, 0, 3))
                  if len(val_ds) else None)
    fixed_ds = val_ds if len(val_ds) else train_ds
    k = min(tc.num_sample_images, len(fixed_ds))
    fixed = None
    if k > 0:
        items = [fixed_ds[i] for i in range(k)]
        fixed = {key: torch.stack([it[key] for it in items]) for key in ("masked", "mask", "original")}

    where = (f"resuming {ckpt_path} at epoch {start_epoch + 1}"
             + (f", batch {start_samples // tc.batch_size + 1}" if start_samples else "")
             if ckpt_path is not None else "starting a new run")
    _say(console, f"unmask train: {where} -> {run_dir}", "bold")
    _say(console, f"  device {dev.describe()}; {len(train_ds)} train / {len(val_ds)} val samples at {size} px; "
                  f"{steps_per_epoch} batches of {tc.batch_size} per epoch; epochs {start_epoch + 1}..{target}")
    _say(console, f"  perceptual loss: {vgg_description}")
    if ema is not None:
        _say(console, f"  EMA of G: decay {tc.ema_decay:g} from step {tc.ema_start + 1}; once it has started, "
                      "validation, best.pt, eval and infer use the averaged weights")
    if global_step < warmup:
        _say(console, f"  warm-up: steps {global_step + 1}..{warmup} train on L1 + SSIM only; the perceptual "
                      f"and adversarial terms start at step {warmup + 1}")
    if not len(val_ds):
        _say(console, "  no validation split: no val metrics and no best.pt; samples use training faces", "yellow")

    for net in nets.values():
        net.train()
    stats_keys = (*STEP_KEYS, "batches", "images", "train_time", "val_time")
    last_path = run_dir / "last.pt"
    status = "completed"
    epochs_done = start_epoch
    stop_signal: int | None = None

    def payload(epochs_done: int, samples_done: int, stats: dict) -> dict:
        averaged = {} if ema is None else {"ema": {"decay": tc.ema_decay, "updates": int(ema.n_averaged),
                                                   "G": ema.module.state_dict()}}
        return {
            "epoch": epochs_done, "samples_in_epoch": samples_done, "global_step": global_step,
            "best_psnr": best_psnr, "best_epoch": best_epoch, "epoch_stats": stats,
            "config": cfg.to_dict(), "vgg": vgg_description, "alignment": alignment, "device": str(dev.device),
            "torch_version": str(torch.__version__), "saved_at": _now(),
            "networks": {name: net.state_dict() for name, net in nets.items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "scaler": scaler.state_dict(), "rng": capture_rng(), **averaged,
        }

    try:
        with _StopFlag() as flag, _make_progress(console) as progress:
            epoch_task = progress.add_task("epochs", total=target, completed=start_epoch, info="")
            batch_task = progress.add_task("batches", total=steps_per_epoch, info="")
            next_note = time.monotonic() + HEARTBEAT_S
            for epoch in range(start_epoch, target):
                skip = start_samples if epoch == start_epoch else 0
                stats = {key: float(epoch_stats.get(key, 0.0)) for key in stats_keys} if skip else \
                    dict.fromkeys(stats_keys, 0.0)
                sampler = EpochSampler(len(train_ds), tc.seed, epoch, samples_per_epoch, skip)
                loader = _loader(train_ds, tc.batch_size, sampler, cfg.data.num_workers, dev,
                                 _epoch_seed(tc.seed, epoch, 1))
                done = skip
                progress.update(batch_task, total=steps_per_epoch, completed=math.ceil(skip / tc.batch_size),
                                description=f"epoch {epoch + 1}/{target}", info="")
                tick = time.perf_counter()
                for batch in loader:
                    batch = _check_batch(batch)
                    step_loss = warm_loss if global_step < warmup else gen_loss
                    values = train_step(batch, nets, optimizers, scaler, dev, step_loss, cfg.loss.lambda_map)
                    n = int(batch["masked"].shape[0])
                    global_step += 1
                    if ema is not None and global_step > tc.ema_start:
                        ema.update_parameters(nets["G"])
                    if global_step == warmup:
                        _say(console, f"  step {warmup}: warm-up done; perceptual and adversarial terms on")
                    done += n
                    now = time.perf_counter()
                    stats["train_time"] += now - tick
                    tick = now
                    stats["batches"] += 1
                    stats["images"] += n
                    for key, value in values.items():
                        stats[key] += value
                    rate = stats["images"] / max(stats["train_time"], 1e-9)
                    info = (f"G {values['g_total']:.3f} L1 {values['g_l1']:.3f} D {values['d_whole']:.3f}/"
                            f"{values['d_mask']:.3f}" + (f" map {values['map_loss']:.3f}" if "M" in nets else "")
                            + f" {rate:.1f} img/s")
                    progress.update(batch_task, advance=1, info=info)
                    if progress.disable and time.monotonic() >= next_note:  # plain logs: one line a minute
                        _say(console, f"  epoch {epoch + 1}/{target} batch {math.ceil(done / tc.batch_size)}/"
                                      f"{steps_per_epoch}: {info}")
                        next_note = time.monotonic() + HEARTBEAT_S
                    if flag.stop and done < samples_per_epoch:
                        _announce(console, flag)
                        break
                del loader
                if done < samples_per_epoch:  # stopped by a signal inside the epoch
                    save_checkpoint(last_path, payload(epoch, done, stats))
                    status, stop_signal = "interrupted", flag.signum
                    break

                # epoch end: validation, samples, metrics, checkpoints
                tick = time.perf_counter()
                scored = generator_to_score(nets["G"], ema)
                val = validate({**nets, "G": scored}, val_loader, dev)
                stats["val_time"] += time.perf_counter() - tick
                grid = sample_grid(scored, fixed, dev)
                if grid is not None:
                    write_image(samples_dir / f"epoch_{epoch + 1:03d}.png", grid)
                batches = max(stats["batches"], 1.0)
                row = {"epoch": epoch + 1, "step": global_step,
                       **{key: stats[key] / batches for key in STEP_KEYS},
                       "val_psnr": val.get("val_psnr", float("nan")), "val_ssim": val.get("val_ssim", float("nan")),
                       "val_iou": val.get("val_iou", float("nan")),
                       "time_s": stats["train_time"] + stats["val_time"],
                       "img_per_s": stats["images"] / max(stats["train_time"], 1e-9)}
                if "M" not in nets:
                    row["map_loss"] = float("nan")
                rows.append(row)
                write_metrics(metrics_path, rows)
                improved = "val_psnr" in val and (best_psnr is None or val["val_psnr"] > best_psnr)
                if improved:
                    best_psnr, best_epoch = float(val["val_psnr"]), epoch + 1
                save_checkpoint(last_path, payload(epoch + 1, 0, {}))
                epochs_done = epoch + 1
                if improved:
                    publish_copy(last_path, run_dir / "best.pt")
                if (epoch + 1) % tc.save_interval == 0:
                    publish_copy(last_path, run_dir / f"epoch_{epoch + 1:03d}.pt")
                progress.update(epoch_task, completed=epoch + 1)
                _say(console, _epoch_line(row, target, "M" in nets, improved))
                if flag.stop and epochs_done < target:
                    _announce(console, flag)
                    status, stop_signal = "interrupted", flag.signum
                    break
    except KeyboardInterrupt as err:
        raise TrainingAborted(f"aborted by a second Ctrl-C; {last_path.name} holds the last saved state",
                              run_dir) from err

    best_text = f"; best val PSNR {best_psnr:.2f} dB (epoch {best_epoch})" if best_psnr is not None else ""
    if status == "interrupted":
        message = (f"stopped by {signal.Signals(stop_signal).name} after {global_step} steps; saved {last_path} "
                   f"({epochs_done}/{target} epochs done). Run the same command again to resume.")
        _say(console, message, "yellow")
    else:
        message = f"finished {target} epochs ({global_step} steps){best_text}; checkpoints in {run_dir}"
        _say(console, message, "green")
    return TrainSummary(run_dir, status, epochs_done, target, global_step, best_psnr, best_epoch, ckpt_path,
                        dev.describe(), vgg_description, last_path, message)


def _announce(console: Console, flag: _StopFlag) -> None:
    if not flag.announced:
        _say(console, f"{signal.Signals(flag.signum).name} received: saving last.pt and stopping", "yellow")
        flag.announced = True


def _publish_extras(run_dir: Path, ckpt: dict, save_interval: int) -> None:
    """Redo best.pt / epoch_NNN.pt for the checkpoint's epoch if a kill came between writing last.pt and them."""
    last = run_dir / "last.pt"
    epoch = int(ckpt["epoch"])
    if not last.exists() or int(ckpt.get("samples_in_epoch", 0)) != 0 or epoch == 0:
        return
    best = run_dir / "best.pt"
    if ckpt.get("best_epoch") == epoch and not (best.exists() and os.path.samefile(best, last)):
        publish_copy(last, best)
    numbered = run_dir / f"epoch_{epoch:03d}.pt"
    if epoch % save_interval == 0 and not numbered.exists():
        publish_copy(last, numbered)


def _epoch_line(row: dict, target: int, has_map: bool, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{target}",
             f"G {row['g_total']:.3f} (L1 {row['g_l1']:.4f} 1-SSIM {row['g_ssim']:.3f} perc {row['g_perc']:.3f} "
             f"adv {row['g_adv_whole']:.3f}/{row['g_adv_mask']:.3f})",
             f"D {row['d_whole']:.3f}/{row['d_mask']:.3f}"]
    if has_map:
        parts.append(f"map {row['map_loss']:.3f}")
    if not math.isnan(row["val_psnr"]):
        val = f"val PSNR {row['val_psnr']:.2f} SSIM {row['val_ssim']:.3f}"
        if has_map and not math.isnan(row["val_iou"]):
            val += f" IoU {row['val_iou']:.3f}"
        parts.append(val + (" *" if improved else ""))
    parts.append(f"{row['time_s']:.1f} s, {row['img_per_s']:.1f} img/s")
    return "  ".join(parts)
