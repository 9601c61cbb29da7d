"""``unmask train``: the GAN training job (seeded, resumable, interruptible, one or many processes).

The parts, top to bottom: the data order (:class:`EpochBatches`), the state a run carries
(:class:`TrainState`: networks, optimizers, losses, EMA, scaler; :func:`build_state`,
:func:`restore_state`, :func:`checkpoint_of`), one step (:func:`train_step`), validation and samples,
the run folder's files, and the job (:class:`Trainer`: run an epoch, end an epoch).

Per batch: one discriminator step (D_whole and D_mask, one Adam), then one generator step, then one
map-module step (its own Adam; its loss does not touch G). The same code runs on every device; CUDA only
adds autocast/GradScaler/channels_last through :class:`unmask_cli.device.DeviceSetup`.

Exact resume. Each epoch's sample order is a permutation drawn from a generator seeded with
``(train.seed, epoch)``; a checkpoint records the completed epochs and how many samples of the current
epoch were consumed, plus the RNG, optimizer and scaler states and the running loss sums of the epoch.
``last.pt`` is written at every epoch end and, on Ctrl-C/SIGTERM, at the batch boundary where the run
stops; resuming re-creates the same permutation and starts at the next unconsumed sample. On the CPU an
interrupted and resumed run therefore ends with bitwise the same weights as an uninterrupted one. A
SIGKILL loses the unfinished epoch: the rerun restarts from the last epoch end and redoes it identically.

Many processes (``torchrun --nproc_per_node N -m unmask_cli train ...``): DistributedDataParallel over
:mod:`unmask_cli.distributed`. ``train.batch_size`` stays the global batch: every global batch of the
same permutation is split over the processes, so epochs, steps and the resume position are those of a
single-process run. Losses and validation are averaged over the processes; rank 0 alone writes the run
folder. BatchNorm statistics are per process (DDP's default).

EMA (``train.ema_decay`` > 0, off by default): after every step past ``train.ema_start`` a moving average
of G's weights and BatchNorm statistics is updated (``torch.optim.swa_utils.AveragedModel``); once it has
started, validation, the samples, best.pt, ``unmask eval`` and ``unmask infer`` use it.
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
from dataclasses import dataclass, field
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

from unmask_cli.augment import photometric
from unmask_cli.checkpoints import (
    Checkpoint,
    capture_rng,
    check_compatible,
    flatten,
    load_state,
    publish_copy,
    restore_rng,
)
from unmask_cli.config import Config, save_config
from unmask_cli.curves import TensorBoard, write_curves
from unmask_cli.data import ReportingDataset
from unmask_cli.device import DeviceSetup, setup_device
from unmask_cli.distributed import Distributed, from_env
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
STATS_KEYS = (*STEP_KEYS, "batches", "images", "train_time", "val_time")


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


class TrainHooks:
    """Where a caller watches a run without patching it (tests, benchmarks). Every method is a no-op."""

    def step_started(self, trainer: Trainer) -> None:
        """Before each training step (``trainer.state.global_step`` steps done)."""

    def step_done(self, trainer: Trainer, values: dict[str, float]) -> None:
        """After each step and its EMA update, with the step's loss terms."""

    def validating(self, trainer: Trainer, G: nn.Module) -> None:
        """At each epoch end, with the generator about to be validated (the EMA once it has started)."""


# ------------------------------------------------------------------------------------------ data order

def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + stream * 104_729 + 12_345) % (2**63)


class EpochBatches(Sampler[list[int]]):
    """This process's share of each global batch of an epoch: the first ``count`` indices of a permutation
    seeded by (seed, epoch), from position ``start``, cut into global batches of ``batch``; process
    ``rank`` of ``world`` takes its slice of each. ``sizes`` holds the global batch sizes."""

    def __init__(self, n: int, seed: int, epoch: int, count: int, batch: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=generator)[:count].tolist()[start:]
        chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
        self.sizes = [len(c) for c in chunks]
        self.batches = [c[rank * len(c) // world:(rank + 1) * len(c) // world] for c in chunks]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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


def _loader(dataset, batches: Sampler, workers: int, dev: DeviceSetup, seed: int) -> DataLoader:
    return DataLoader(
        ReportingDataset(dataset), batch_sampler=batches, num_workers=workers,
        pin_memory=dev.device.type == "cuda", collate_fn=_collate, worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------- the state

@dataclass
class TrainState:
    """What a run carries from step to step, and what a checkpoint saves and restores."""

    cfg: Config
    nets: dict[str, nn.Module]  # the networks themselves: checkpoints, EMA, validation, samples
    wrapped: dict[str, nn.Module]  # what the step calls: DDP wrappers under torchrun, else ``nets``
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    full_loss: GeneratorLoss  # the paper's errG
    warm_loss: GeneratorLoss  # steps < loss.warmup_steps: L1 + SSIM only
    ema: AveragedModel | None
    vgg: str  # the perceptual loss's VGG weights, in words
    epoch: int = 0  # completed epochs
    samples: int = 0  # samples of the current epoch done (over all processes)
    global_step: int = 0
    best_psnr: float | None = None
    best_epoch: int | None = None
    epoch_stats: dict[str, float] = field(default_factory=dict)  # running sums of a resumed unfinished epoch

    @property
    def gen_loss(self) -> GeneratorLoss:
        return self.warm_loss if self.global_step < self.cfg.loss.warmup_steps else self.full_loss


def _perceptual(cfg: Config, dev: DeviceSetup) -> tuple[PerceptualLoss | None, str]:
    if cfg.loss.lambda_perc == 0:
        return None, "not used (loss.lambda_perc = 0)"
    from unmask_cli.vgg import load_vgg_features

    features, description = load_vgg_features(cfg.loss.vgg_weights, cfg.loss.vgg_layers)
    return dev.module(PerceptualLoss(features, cfg.loss.vgg_layers)), description


def build_state(cfg: Config, dev: DeviceSetup, dist: Distributed | None = None) -> TrainState:
    """Networks (seeded by ``train.seed``), Adam optimizers, losses, EMA and loss scaler, on ``dev``."""
    dist = dist or Distributed()
    tc = cfg.train
    _seed_everything(tc.seed)
    nets = {name: dev.module(net) for name, net in build_networks(cfg).items()}
    perceptual, vgg = _perceptual(cfg, dev)
    betas = (tc.beta1, tc.beta2)
    optimizers = {
        "G": torch.optim.Adam(nets["G"].parameters(), lr=tc.lr_g, betas=betas),
        "D": torch.optim.Adam([*nets["D_whole"].parameters(), *nets["D_mask"].parameters()], lr=tc.lr_d,
                              betas=betas),
    }
    if "M" in nets:
        optimizers["M"] = torch.optim.Adam(nets["M"].parameters(), lr=tc.lr_g, betas=betas)
    return TrainState(cfg=cfg, nets=nets, wrapped={k: dist.wrap(v, dev.device) for k, v in nets.items()},
                      optimizers=optimizers, scaler=dev.grad_scaler(), full_loss=GeneratorLoss(cfg.loss, perceptual),
                      warm_loss=GeneratorLoss(reconstruction_only(cfg.loss), None),
                      ema=make_ema(nets["G"], tc.ema_decay), vgg=vgg)


def restore_state(state: TrainState, ckpt: Checkpoint, path: Path, say=lambda text: None) -> None:
    """Load a checkpoint into ``state`` (weights, optimizers, scaler, RNG, EMA, position); ``say`` gets
    one line for each setting that differs from the checkpoint's."""
    for name, net in state.nets.items():
        if name not in ckpt.networks:
            raise UnmaskError(f"checkpoint has no weights for '{name}'", path)
        load_state(net, ckpt.networks[name], name, path)
    for name, opt in state.optimizers.items():
        if name not in ckpt.optimizers:
            raise UnmaskError(f"checkpoint has no optimizer state for '{name}'", path)
        load_state(opt, ckpt.optimizers[name], f"optimizer {name}", path)
    if ckpt.scaler and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt.scaler)
    restore_rng(ckpt.rng)
    state.epoch, state.samples, state.global_step = int(ckpt.epoch), int(ckpt.samples_in_epoch), int(ckpt.global_step)
    state.best_psnr, state.best_epoch = ckpt.best_psnr, ckpt.best_epoch
    state.epoch_stats = dict(ckpt.epoch_stats or {}) if state.samples else {}
    _restore_ema(state, ckpt, path, say)
    old, new = flatten(ckpt.config), flatten(state.cfg.to_dict())
    changed = [k for k, v in new.items() if old.get(k) != v]
    if changed:
        say(f"note: config differs from the checkpoint in {', '.join(changed[:6])}"
            f"{' ...' if len(changed) > 6 else ''}; continuing with the new values")
    if ckpt.vgg and ckpt.vgg != state.vgg:
        say(f"note: the checkpoint was trained with {ckpt.vgg}; now {state.vgg}")


def init_weights(state: TrainState, path: Path) -> str:
    """``train.init``: load the weights of every network ``path`` has into the fresh ``state`` (a training
    checkpoint or a release file of the same architecture); returns a line saying what was loaded."""
    if not path.is_file():
        raise UnmaskError("train.init: checkpoint not found", path)
    ckpt = Checkpoint.load(path)
    check_compatible(ckpt, state.cfg, path)
    loaded = [name for name in state.nets if name in ckpt.networks]
    if "G" not in loaded:
        raise UnmaskError("train.init: the checkpoint has no generator weights", path)
    for name in loaded:
        load_state(state.nets[name], ckpt.networks[name], name, path)
    fresh = [name for name in state.nets if name not in loaded]
    return (f"initialised {', '.join(loaded)} from {path} (step {ckpt.global_step} there)"
            + (f"; {', '.join(fresh)} start from scratch" if fresh else ""))


def checkpoint_of(state: TrainState, epochs_done: int, samples_done: int, stats: dict,
                  framing: tuple[str, float], dev: DeviceSetup, world: int = 1) -> Checkpoint:
    """``framing``: the (alignment, crop) of the training faces (:func:`unmask_cli.data.dataset_framing`)."""
    ema = state.ema
    averaged = None if ema is None else {"decay": state.cfg.train.ema_decay, "updates": int(ema.n_averaged),
                                         "G": ema.module.state_dict()}
    return Checkpoint(
        config=state.cfg.to_dict(), networks={name: net.state_dict() for name, net in state.nets.items()},
        epoch=epochs_done, samples_in_epoch=samples_done, global_step=state.global_step,
        best_psnr=state.best_psnr, best_epoch=state.best_epoch, epoch_stats=stats, vgg=state.vgg,
        alignment=framing[0], crop=framing[1], optimizers={name: opt.state_dict() for name, opt in state.optimizers.items()},
        scaler=state.scaler.state_dict(), rng=capture_rng(), ema=averaged, device=str(dev.device),
        world_size=world, torch_version=str(torch.__version__), saved_at=_now(),
    )


# ----------------------------------------------------------------------------------------- one step

def train_step(batch: dict, state: TrainState, dev: DeviceSetup) -> dict[str, float]:
    """One D step, one G step, one map-module step. Returns every loss term as a float."""
    nets, run, optimizers, scaler = state.nets, state.wrapped, state.optimizers, state.scaler
    gen_loss = state.gen_loss
    masked, mask, original = (dev.batch(batch[k]) for k in ("masked", "mask", "original"))

    with dev.autocast():
        generated = run["G"](generator_input(masked, mask))

    # Discriminators: D_whole judges whole images, D_mask the composites. A discriminator whose adversarial
    # weight is 0 cannot affect G, so it is not trained (its loss is reported as 0).
    cfg = gen_loss.cfg
    zero = generated.new_zeros((), dtype=torch.float32)
    d_whole = d_mask = zero
    if cfg.lambda_adv_whole != 0 or cfg.lambda_adv_mask != 0:
        for D in (nets["D_whole"], nets["D_mask"]):
            D.requires_grad_(True)
        optimizers["D"].zero_grad(set_to_none=True)
        with dev.autocast():
            if cfg.lambda_adv_whole != 0:
                d_whole = discriminator_loss(run["D_whole"], original, generated)
            if cfg.lambda_adv_mask != 0:  # real composite == original when masked is original outside
                d_mask = discriminator_loss(run["D_mask"], composite(masked, mask, original),
                                            composite(masked, mask, generated))
        scaler.scale(d_whole + d_mask).backward()
        scaler.step(optimizers["D"])

    # Generator. The discriminators are frozen for this backward pass and called directly, not through
    # DDP: their gradients are not wanted here, so there is nothing to average.
    for D in (nets["D_whole"], nets["D_mask"]):
        D.requires_grad_(False)
    optimizers["G"].zero_grad(set_to_none=True)
    with dev.autocast():
        g_total, terms = gen_loss(generated, masked, mask, original, nets["D_whole"], nets["D_mask"])
    scaler.scale(g_total).backward()
    scaler.step(optimizers["G"])

    # Map module: learns the synthetic map from the masked image alone, seen through a fresh random
    # photo-quality change (train.map_augment) so that it does not learn how crisp the samples are.
    m_loss = g_total.new_zeros((), dtype=torch.float32)
    if "M" in nets:
        optimizers["M"].zero_grad(set_to_none=True)
        seen = photometric(masked, state.cfg.train.map_augment)
        with dev.autocast():
            m_loss, _ = map_loss(run["M"](seen), mask)
        scaler.scale(state.cfg.loss.lambda_map * m_loss).backward()
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


def _restore_ema(state: TrainState, ckpt: Checkpoint, path: Path, say) -> None:
    stored = ckpt.ema_weights
    if state.ema is None:
        if stored is not None:
            say("note: train.ema_decay is 0: the checkpoint's EMA weights are dropped; G continues")
        return
    if stored is None:
        say("note: the checkpoint has no EMA of G; the average starts from its G weights")
        return
    load_state(state.ema.module, stored["G"], "G (EMA)", path)
    state.ema.n_averaged.fill_(int(stored.get("updates", 0)))


# -------------------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(G: nn.Module, M: nn.Module | None, loader: DataLoader | None, dev: DeviceSetup,
             dist: Distributed | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM of the composite vs the original (whole image, [0,1]) over the faces that have a mask
    to fill, and mean IoU of the map module over every face (a face without a mask scores 1 when nothing
    is predicted, else 0), over every process's share of the validation split."""
    if loader is None:
        return {}
    nets = [net for net in (G, M) if net is not None]
    for net in nets:
        net.eval()
    try:
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # psnr, ssim (masked faces), iou (all), images, masked faces
        for batch in loader:
            for i, value in enumerate(_validation_sums(G, M, _check_batch(batch), dev)):
                sums[i] += value
    finally:
        for net in nets:
            net.train()
    psnr_sum, ssim_sum, iou_sum, n, n_masked = (dist or Distributed()).sum(sums)
    if n == 0:
        return {}
    out = {"val_psnr": psnr_sum / n_masked, "val_ssim": ssim_sum / n_masked} if n_masked else {}
    if M is not None:
        out["val_iou"] = iou_sum / n
    return out


def _validation_sums(G: nn.Module, M: nn.Module | None, batch: dict, dev: DeviceSetup) -> list[float]:
    from unmask_cli.metrics import psnr, ssim
    from unmask_cli.tensors import to_unit

    masked, mask, original = (dev.batch(batch[k]) for k in ("masked", "mask", "original"))
    with dev.autocast():
        generated = G(generator_input(masked, mask))
    out = to_unit(composite(masked, mask, generated.float())).clamp(0, 1).float()
    ref = to_unit(original).clamp(0, 1).float()
    has_mask = mask.flatten(1).amax(1) > 0.5  # faces without a mask (bare, look-alikes) have nothing to fill
    iou_sum = 0.0
    if M is not None:
        with dev.autocast():
            logits = M(masked)
        pred, truth = torch.sigmoid(logits.float()) > 0.5, mask > 0.5
        inter = (pred & truth).flatten(1).sum(1).double()
        union = (pred | truth).flatten(1).sum(1).double()
        iou_sum = float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).sum())
    return [float(psnr(out, ref)[has_mask].sum()), float(ssim(out, ref)[has_mask].sum()), iou_sum,
            float(masked.shape[0]), float(has_mask.sum())]


@torch.no_grad()
def sample_grid(G, fixed: dict | None, dev: DeviceSetup) -> np.ndarray | None:
    """Rows: masked | output (composite) | original for the fixed validation faces; uint8 (H, W, 3)."""
    from torchvision.utils import make_grid

    from unmask_cli.tensors import to_unit, unit_to_uint8

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
    rows = to_unit(torch.cat([masked, out, original]).float()).clamp(0, 1).cpu()
    return unit_to_uint8(make_grid(rows.contiguous(), nrow=masked.shape[0], padding=2, pad_value=1.0))


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


# ------------------------------------------------------------------------------------------- the job

class Trainer:
    """One ``unmask train`` run: open the checkpoint and data, build or restore the state, then run
    epochs and end each one (validate, samples, metrics, curves, checkpoints) until the target or a stop."""

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
                 resume: str | os.PathLike | None = "auto", device_spec: str | None = None,
                 console: Console | None = None, hooks: TrainHooks | None = None):
        self.cfg, self.run_dir, self.data_root = cfg, Path(run_dir), Path(data_root)
        self.resume, self.device_spec = resume, device_spec
        self.hooks = hooks or TrainHooks()
        self.dist = from_env()
        console = console or Console(stderr=True)
        self.console = console if self.dist.main else Console(quiet=True)
        self.last_path = self.run_dir / "last.pt"
        self.rows: list[dict] = []

    def say(self, text: str, style: str | None = None) -> None:
        _say(self.console, text, style)

    # -- setup

    def run(self) -> TrainSummary:
        """Train (or continue training) to ``train.epochs``. Ctrl-C/SIGTERM stop at a batch boundary after
        saving ``last.pt`` (status "interrupted")."""
        try:
            return self._run()
        finally:
            self.dist.close()

    def _run(self) -> TrainSummary:
        self._open_run_folder()
        ckpt_path = _resolve_resume(self.run_dir, self.resume)
        ckpt = Checkpoint.load(ckpt_path) if ckpt_path is not None else None
        target = self.cfg.train.epochs
        if ckpt is not None:
            check_compatible(ckpt, self.cfg, ckpt_path)
            if ckpt.epoch >= target:
                return self._already_complete(ckpt, ckpt_path)
        self.dev = setup_device(self.dist.device_spec(self.device_spec or self.cfg.train.device), self.cfg.train.amp)
        self._open_data(ckpt, ckpt_path)
        self.state = build_state(self.cfg, self.dev, self.dist)
        if ckpt is not None:
            restore_state(self.state, ckpt, ckpt_path, lambda text: self.say(text, "yellow"))
            self.state.samples = min(self.state.samples, self.samples_per_epoch)  # batch size or max_steps changed
        elif self.cfg.train.init is not None:
            self.say(init_weights(self.state, Path(self.cfg.train.init)))
        self._write_run_files(ckpt, ckpt_path)
        del ckpt
        self._announce_start(ckpt_path)
        self.board = TensorBoard(self.run_dir, enabled=self.dist.main)
        try:
            status, signum = self._loop()
        except KeyboardInterrupt as err:
            raise TrainingAborted(f"aborted by a second Ctrl-C; {self.last_path.name} holds the last saved state",
                                  self.run_dir) from err
        finally:
            self.board.close()
        return self._summary(status, signum, ckpt_path)

    def _open_run_folder(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UnmaskError("run folder path exists and is not a folder", self.run_dir)
        if self.dist.main:  # only rank 0 writes there: another rank must not remove its temp files
            for folder in (self.run_dir, self.run_dir / "samples"):
                ensure_dir(folder)
                remove_temp_files(folder)
        self.dist.barrier()

    def _already_complete(self, ckpt: Checkpoint, path: Path) -> TrainSummary:
        target = self.cfg.train.epochs
        message = (f"already trained {ckpt.epoch} epochs (train.epochs={target}); nothing to do. "
                   f"Raise train.epochs to train further.")
        self.say(message, "green")
        return TrainSummary(self.run_dir, "already-complete", ckpt.epoch, target, ckpt.global_step, ckpt.best_psnr,
                            ckpt.best_epoch, path, "-", ckpt.vgg, path, message)

    def _open_data(self, ckpt: Checkpoint | None, ckpt_path: Path | None) -> None:
        from unmask_cli.data import PairedDataset, dataset_framing

        tc, size = self.cfg.train, self.cfg.data.image_size
        cache = self.cfg.data.cache
        self.train_ds = PairedDataset(self.data_root, "train", size, cache=cache)
        self.val_ds = PairedDataset(self.data_root, "val", size, cache=cache)
        if len(self.train_ds) == 0:
            raise UnmaskError("no training samples (the 'train' split is empty); run 'unmask prepare' first",
                              self.data_root)
        self.framing = dataset_framing(self.data_root)
        trained_on = self.framing if ckpt is None else (ckpt.alignment, ckpt.crop)
        if trained_on != self.framing:
            raise UnmaskError(f"checkpoint was trained on faces with the '{trained_on[0]}' alignment and crop "
                              f"{trained_on[1]:g}, but {self.data_root} holds '{self.framing[0]}'-aligned faces "
                              f"with crop {self.framing[1]:g}; start a new run (another --name) for this data",
                              ckpt_path)
        if tc.batch_size % self.dist.world:
            raise UnmaskError(f"train.batch_size={tc.batch_size} (the global batch) must be a multiple of the "
                              f"{self.dist.world} processes")
        self.steps_per_epoch, self.samples_per_epoch = epoch_plan(len(self.train_ds), tc.batch_size,
                                                                  tc.max_steps_per_epoch)
        self.val_loader = self._val_loader() if len(self.val_ds) else None
        self.fixed = self._fixed_faces() if self.dist.main else None

    def _val_loader(self) -> DataLoader:
        tc, d = self.cfg.train, self.dist
        order = list(range(len(self.val_ds)))[d.rank::d.world]  # each process scores its share
        batches = [order[i:i + tc.batch_size] for i in range(0, len(order), tc.batch_size)]
        return _loader(self.val_ds, batches, self.cfg.data.num_workers, self.dev, _epoch_seed(tc.seed, 0, 3))

    def _fixed_faces(self) -> dict | None:
        fixed_ds = self.val_ds if len(self.val_ds) else self.train_ds
        k = min(self.cfg.train.num_sample_images, len(fixed_ds))
        if k == 0:
            return None
        items = [fixed_ds[i] for i in range(k)]
        return {key: torch.stack([it[key] for it in items]) for key in ("masked", "mask", "original")}

    def _write_run_files(self, ckpt: Checkpoint | None, ckpt_path: Path | None) -> None:
        """config.yaml, meta.json, metrics.csv trimmed to the checkpoint (rank 0)."""
        state = self.state
        metrics_path = self.run_dir / "metrics.csv"
        self.rows = [r for r in read_metrics(metrics_path) if int(r["epoch"]) <= state.epoch]
        if not self.dist.main:
            return
        save_config(self.cfg, self.run_dir / "config.yaml")
        info = {"vgg": state.vgg, "alignment": self.framing[0], "crop": self.framing[1], "device": self.dev.describe(),
                "world_size": self.dist.world, "backend": self.dist.backend, "torch": str(torch.__version__),
                "python": sys.version.split()[0], "data_root": str(self.data_root.resolve()),
                "train_samples": len(self.train_ds), "val_samples": len(self.val_ds)}
        resumed = None if ckpt is None else {"at": _now(), "from": str(ckpt_path), "epoch": state.epoch,
                                              "samples_in_epoch": state.samples, "global_step": state.global_step}
        _write_meta(self.run_dir, info, resumed)
        write_metrics(metrics_path, self.rows)
        if ckpt is not None:
            _publish_extras(self.run_dir, ckpt, self.cfg.train.save_interval)

    def _announce_start(self, ckpt_path: Path | None) -> None:
        state, tc, target = self.state, self.cfg.train, self.cfg.train.epochs
        where = (f"resuming {ckpt_path} at epoch {state.epoch + 1}"
                 + (f", batch {state.samples // tc.batch_size + 1}" if state.samples else "")
                 if ckpt_path is not None else "starting a new run")
        self.say(f"unmask train: {where} -> {self.run_dir}", "bold")
        procs = f" x {self.dist.world} processes ({self.dist.backend})" if self.dist.on else ""
        self.say(f"  device {self.dev.describe()}{procs}; {len(self.train_ds)} train / {len(self.val_ds)} val "
                 f"samples at {self.cfg.data.image_size} px; {self.steps_per_epoch} batches of {tc.batch_size} per "
                 f"epoch; epochs {state.epoch + 1}..{target}")
        self.say(f"  perceptual loss: {state.vgg}")
        if state.ema is not None:
            self.say(f"  EMA of G: decay {tc.ema_decay:g} from step {tc.ema_start + 1}; once it has started, "
                     "validation, best.pt, eval and infer use the averaged weights")
        warmup = self.cfg.loss.warmup_steps
        if state.global_step < warmup:
            self.say(f"  warm-up: steps {state.global_step + 1}..{warmup} train on L1 + SSIM only; the "
                     f"perceptual and adversarial terms start at step {warmup + 1}")
        if not len(self.val_ds):
            self.say("  no validation split: no val metrics and no best.pt; samples use training faces", "yellow")

    # -- the loop

    def _loop(self) -> tuple[str, int | None]:
        """("completed" | "interrupted", the stop signal)."""
        state, target = self.state, self.cfg.train.epochs
        for net in state.nets.values():
            net.train()
        with _StopFlag() as flag, _make_progress(self.console) as progress:
            self.flag, self.progress = flag, progress
            self.epoch_task = progress.add_task("epochs", total=target, completed=state.epoch, info="")
            self.batch_task = progress.add_task("batches", total=self.steps_per_epoch, info="")
            self.next_note = time.monotonic() + HEARTBEAT_S
            for epoch in range(state.epoch, target):
                stats, stopped = self.run_epoch(epoch)
                if stopped:
                    self._save(checkpoint_of(state, epoch, state.samples, stats, self.framing, self.dev,
                                             self.dist.world))
                    return "interrupted", flag.signum
                self.end_epoch(epoch, stats)
                if self.dist.any(flag.stop) and state.epoch < target:
                    self._announce_stop()
                    return "interrupted", flag.signum
        return "completed", None

    def run_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """Train on the rest of epoch ``epoch``: (the epoch's running sums, stopped by a signal inside it)."""
        state, tc = self.state, self.cfg.train
        skip = state.samples if epoch == state.epoch else 0
        stats = {k: float(state.epoch_stats.get(k, 0.0)) for k in STATS_KEYS} if skip else dict.fromkeys(STATS_KEYS, 0.0)
        state.samples = skip
        batches = EpochBatches(len(self.train_ds), tc.seed, epoch, self.samples_per_epoch, tc.batch_size, skip,
                               self.dist.rank, self.dist.world)
        loader = _loader(self.train_ds, batches, self.cfg.data.num_workers, self.dev, _epoch_seed(tc.seed, epoch, 1))
        self.progress.update(self.batch_task, total=self.steps_per_epoch, completed=math.ceil(skip / tc.batch_size),
                             description=f"epoch {epoch + 1}/{tc.epochs}", info="")
        tick = time.perf_counter()
        for index, batch in enumerate(loader):
            values, stop = self._step(_check_batch(batch))
            state.samples += batches.sizes[index]
            now = time.perf_counter()
            stats["train_time"] += now - tick
            tick = now
            stats["batches"] += 1
            stats["images"] += batches.sizes[index]
            for key, value in values.items():
                stats[key] += value
            self._show_batch(epoch, values, stats)
            if stop and state.samples < self.samples_per_epoch:
                self._announce_stop()
                return stats, True
        return stats, False

    def _step(self, batch: dict) -> tuple[dict[str, float], bool]:
        """One training step; its losses averaged over the processes, and whether any process was signalled."""
        state, tc = self.state, self.cfg.train
        self.hooks.step_started(self)
        values = train_step(batch, state, self.dev)
        state.global_step += 1
        if state.ema is not None and state.global_step > tc.ema_start:
            state.ema.update_parameters(state.nets["G"])
        if state.global_step == self.cfg.loss.warmup_steps:
            self.say(f"  step {state.global_step}: warm-up done; perceptual and adversarial terms on")
        if self.dist.on:  # one all-reduce carries the losses and the stop flag
            *summed, stop = self.dist.sum([*values.values(), float(self.flag.stop)])
            values = {k: v / self.dist.world for k, v in zip(values, summed, strict=True)}
        else:
            stop = self.flag.stop
        self.hooks.step_done(self, values)
        return values, bool(stop)

    def _show_batch(self, epoch: int, values: dict[str, float], stats: dict) -> None:
        rate = stats["images"] / max(stats["train_time"], 1e-9)
        info = (f"G {values['g_total']:.3f} L1 {values['g_l1']:.3f} D {values['d_whole']:.3f}/"
                f"{values['d_mask']:.3f}" + (f" map {values['map_loss']:.3f}" if "M" in self.state.nets else "")
                + f" {rate:.1f} img/s")
        self.progress.update(self.batch_task, advance=1, info=info)
        if self.progress.disable and time.monotonic() >= self.next_note:  # plain logs: one line a minute
            tc = self.cfg.train
            self.say(f"  epoch {epoch + 1}/{tc.epochs} batch {math.ceil(self.state.samples / tc.batch_size)}/"
                     f"{self.steps_per_epoch}: {info}")
            self.next_note = time.monotonic() + HEARTBEAT_S

    def end_epoch(self, epoch: int, stats: dict) -> dict:
        """Validate, write the samples, metrics, curves and checkpoints of a finished epoch; its metrics row."""
        state = self.state
        tick = time.perf_counter()
        scored = generator_to_score(state.nets["G"], state.ema)
        self.hooks.validating(self, scored)
        val = validate(scored, state.nets.get("M"), self.val_loader, self.dev, self.dist)
        stats["val_time"] += time.perf_counter() - tick
        row = _metrics_row(epoch, state.global_step, stats, val, "M" in state.nets)
        self.rows.append(row)
        improved = "val_psnr" in val and (state.best_psnr is None or val["val_psnr"] > state.best_psnr)
        if improved:
            state.best_psnr, state.best_epoch = float(val["val_psnr"]), epoch + 1
        state.epoch, state.samples = epoch + 1, 0
        if self.dist.main:
            self._write_epoch_files(epoch, row, improved, scored)
        self.progress.update(self.epoch_task, completed=epoch + 1)
        self.say(_epoch_line(row, self.cfg.train.epochs, "M" in state.nets, improved))
        return row

    def _write_epoch_files(self, epoch: int, row: dict, improved: bool, scored: nn.Module) -> None:
        run_dir = self.run_dir
        grid = sample_grid(scored, self.fixed, self.dev)
        if grid is not None:
            write_image(run_dir / "samples" / f"epoch_{epoch + 1:03d}.png", grid)
        write_metrics(run_dir / "metrics.csv", self.rows)
        write_curves(run_dir / "curves.png", self.rows, f"unmask train: {run_dir.name}")
        self.board.log(row, grid)
        self._save(checkpoint_of(self.state, epoch + 1, 0, {}, self.framing, self.dev, self.dist.world))
        if improved:
            publish_copy(self.last_path, run_dir / "best.pt")
        if (epoch + 1) % self.cfg.train.save_interval == 0:
            publish_copy(self.last_path, run_dir / f"epoch_{epoch + 1:03d}.pt")

    def _save(self, ckpt: Checkpoint) -> None:
        if self.dist.main:
            ckpt.save(self.last_path)

    def _announce_stop(self) -> None:
        flag = self.flag
        if not flag.announced:
            name = signal.Signals(flag.signum).name if flag.signum else "a stop on another process"
            self.say(f"{name} received: saving last.pt and stopping", "yellow")
            flag.announced = True

    def _summary(self, status: str, signum: int | None, ckpt_path: Path | None) -> TrainSummary:
        state, target = self.state, self.cfg.train.epochs
        best = f"; best val PSNR {state.best_psnr:.2f} dB (epoch {state.best_epoch})" if state.best_psnr is not None else ""
        if status == "interrupted":
            name = signal.Signals(signum).name if signum else "a stop on another process"
            message = (f"stopped by {name} after {state.global_step} steps; saved {self.last_path} "
                       f"({state.epoch}/{target} epochs done). Run the same command again to resume.")
            self.say(message, "yellow")
        else:
            message = f"finished {target} epochs ({state.global_step} steps){best}; checkpoints in {self.run_dir}"
            self.say(message, "green")
        return TrainSummary(self.run_dir, status, state.epoch, target, state.global_step, state.best_psnr,
                            state.best_epoch, ckpt_path, self.dev.describe(), state.vgg, self.last_path, message)


def train(cfg: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
          resume: str | os.PathLike | None = "auto", device_spec: str | None = None,
          console: Console | None = None, hooks: TrainHooks | None = None) -> TrainSummary:
    """Train (or continue training) the GAN; outputs go to ``run_dir``.

    ``resume``: ``"auto"`` continues from ``run_dir/last.pt`` when it exists, a path continues from that
    checkpoint, ``None`` starts fresh and refuses a run folder that already holds checkpoints.
    ``device_spec`` overrides ``cfg.train.device``. ``hooks`` watch the run (see :class:`TrainHooks`).
    """
    return Trainer(cfg, run_dir, data_root, resume, device_spec, console, hooks).run()


def run_dir_of(cfg: Config, config_path: str | os.PathLike | None) -> Path:
    """RUNS/NAME: ``train.runs`` / (``train.name``, else the config file's stem, else "default")."""
    name = cfg.train.name or (Path(config_path).stem if config_path is not None else "default")
    return Path(cfg.train.runs) / name


def _metrics_row(epoch: int, step: int, stats: dict, val: dict, has_map: bool) -> dict:
    batches = max(stats["batches"], 1.0)
    row = {"epoch": epoch + 1, "step": step, **{key: stats[key] / batches for key in STEP_KEYS},
           **{key: val.get(key, float("nan")) for key in ("val_psnr", "val_ssim", "val_iou")},
           "time_s": stats["train_time"] + stats["val_time"],
           "img_per_s": stats["images"] / max(stats["train_time"], 1e-9)}
    if not has_map:
        row["map_loss"] = float("nan")
    return row


def _publish_extras(run_dir: Path, ckpt: Checkpoint, save_interval: int) -> None:
    """Redo best.pt / epoch_NNN.pt for the checkpoint's epoch if a kill came between writing last.pt and them."""
    last = run_dir / "last.pt"
    epoch = int(ckpt.epoch)
    if not last.exists() or int(ckpt.samples_in_epoch) != 0 or epoch == 0:
        return
    best = run_dir / "best.pt"
    if ckpt.best_epoch == epoch and not (best.exists() and os.path.samefile(best, last)):
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
