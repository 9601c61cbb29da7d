"""The training job: outputs, checkpoints (safe loading, errors), exact resume, signals and SIGKILL."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from unmask_cli.checkpoints import Checkpoint, build_networks_from_checkpoint
from unmask_cli.config import load_config
from unmask_cli.data import PairedDataset
from unmask_cli.device import DeviceSetup, setup_device
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import TMP_MARK, read_image, write_image
from unmask_cli.models import composite, generator_input
from unmask_cli.training import METRIC_FIELDS, TrainHooks, build_state, read_metrics, train, train_step

ROOT = Path(__file__).resolve().parents[1]

BASE = [
    "data.image_size=64", "data.num_workers=0", "model.ngf=8", "model.ndf=8", "model.nmf=4",
    "loss.vgg_weights=random", "loss.vgg_layers=[3]", "train.batch_size=2", "train.num_sample_images=3",
    "train.lr_g=0.001", "train.lr_d=0.0005", "train.save_interval=2",
]


def make_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 64, seed: int = 0,
                 alignment: str | None = "visible") -> Path:
    """A prepared folder in the documented layout: smooth backgrounds with a disc, a rectangular 'mask'.
    ``alignment`` goes into prepare.json (None: no prepare.json, as in a folder made by hand)."""
    rng = np.random.default_rng(seed)
    for sub in ("original_celeba_aligned", "masked_images", "mask_maps"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = []
    for i in range(n_train + n_val):
        stem = f"{i:06d}"
        c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
        img = c0 * (1 - yy[..., None]) + c1 * yy[..., None]
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
        img = img.clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), bool)
        top, left = int(size * rng.uniform(0.45, 0.6)), int(size * rng.uniform(0.15, 0.3))
        mask[top: top + size // 3, left: size - left] = True
        masked = img.copy()
        masked[mask] = (170, 200, 230)
        write_image(root / "original_celeba_aligned" / f"{stem}.png", img)
        write_image(root / "masked_images" / f"{stem}.png", masked)
        write_image(root / "mask_maps" / f"{stem}.png", (mask * 255).astype(np.uint8))
        lines.append(json.dumps({"stem": stem, "split": "train" if i < n_train else "val"}) + "\n")
    (root / "manifest.jsonl").write_text("".join(lines))
    if alignment is not None:
        (root / "prepare.json").write_text(json.dumps({"settings": {"alignment": alignment}}))
    return root


# tiny networks: one intra-op thread (the conftest fixture)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("prepared"))


def cfg_with(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=100)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every network's tensors, and the EMA of G's when the run keeps one."""
    ckpt = Checkpoint.load(path)
    nets = {**ckpt.networks, **({"G_ema": ckpt.ema["G"]} if ckpt.ema is not None else {})}
    return {f"{net}.{k}": v for net, sd in nets.items() for k, v in sd.items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def loss_columns(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("time_s", "img_per_s")} for row in read_metrics(path)]


def no_temp_files(run_dir: Path) -> bool:
    return not [p for p in run_dir.rglob("*") if TMP_MARK in p.name]


# ---------------------------------------------------------------------------------------- train step

def _batch(root: Path, n: int) -> dict:
    ds = PairedDataset(root, "train", 64)
    return {k: torch.stack([ds[i][k] for i in range(n)]) for k in ("masked", "mask", "original")}


def _step_parts(cfg, dev: DeviceSetup | None = None):
    """The training state exactly as a run builds it (seeded networks, optimizers, losses, scaler)."""
    dev = dev or setup_device("cpu")
    return build_state(cfg, dev), dev


def test_discriminators_see_whole_image_and_composite(data_root):
    cfg = cfg_with("loss.lambda_perc=0")
    state, dev = _step_parts(cfg)
    nets = state.nets
    batch = _batch(data_root, 2)
    seen: dict[str, list] = {"G": [], "D_whole": [], "D_mask": []}
    for name in seen:
        nets[name].register_forward_hook(lambda m, i, o, name=name: seen[name].append((i[0].detach(), o.detach())))
    train_step(batch, state, dev)
    assert len(seen["G"]) == 1
    g_in, generated = seen["G"][0]
    assert torch.equal(g_in, generator_input(batch["masked"], batch["mask"]))
    masked, mask, original = batch["masked"], batch["mask"], batch["original"]
    fake_composite = composite(masked, mask, generated)
    # D step: real then fake; G step: fake again
    whole = [x for x, _ in seen["D_whole"]]
    assert len(whole) == 3
    assert torch.equal(whole[0], original) and torch.equal(whole[1], generated) and torch.equal(whole[2], generated)
    dmask = [x for x, _ in seen["D_mask"]]
    assert len(dmask) == 3
    assert torch.equal(dmask[0], composite(masked, mask, original))
    assert torch.allclose(dmask[0], original, atol=1e-6)  # the data keeps masked == original outside the map
    assert torch.equal(dmask[1], fake_composite) and torch.equal(dmask[2], fake_composite)
    outside = (mask == 0).expand_as(masked)
    assert torch.equal(dmask[1][outside], masked[outside]) and not torch.equal(dmask[1], generated)


@pytest.mark.parametrize("zeroed", [("whole", "mask"), ("mask",)])
def test_discriminator_with_zero_adversarial_weight_is_not_trained(data_root, zeroed):
    cfg = cfg_with("loss.lambda_perc=0", *(f"loss.lambda_adv_{name}=0" for name in zeroed))
    state, dev = _step_parts(cfg)
    nets = state.nets
    before = {name: {k: v.clone() for k, v in nets[name].state_dict().items()} for name in ("D_whole", "D_mask")}
    calls = {"D_whole": 0, "D_mask": 0}
    for name in calls:
        nets[name].register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    values = train_step(_batch(data_root, 2), state, dev)
    for name in ("whole", "mask"):
        state = nets[f"D_{name}"].state_dict()
        unchanged = all(torch.equal(state[k], v) for k, v in before[f"D_{name}"].items())
        if name in zeroed:
            assert unchanged and calls[f"D_{name}"] == 0 and values[f"d_{name}"] == 0.0
        else:  # D step (real, fake) + the generator's adversarial term
            assert not unchanged and calls[f"D_{name}"] == 3 and values[f"d_{name}"] > 0


def test_losses_fall_when_overfitting_eight_images(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=8, n_val=0, seed=1)
    cfg = cfg_with("loss.lambda_perc=0")
    state, dev = _step_parts(cfg)
    batch = _batch(root, 8)
    history = [train_step(batch, state, dev) for _ in range(40)]
    first, last = history[0], history[-1]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert last["g_l1"] < 0.8 * first["g_l1"], (first["g_l1"], last["g_l1"])
    assert last["g_ssim"] < 0.5 * first["g_ssim"]
    assert last["g_total"] < 0.6 * first["g_total"]
    assert last["map_loss"] < first["map_loss"]


def test_amp_and_channels_last_path_runs_the_same_step_code(data_root):
    """The CUDA switches (autocast fp16 + GradScaler + channels_last) exercised on the CPU: same train_step."""
    cfg = cfg_with("loss.lambda_perc=0")
    state, dev = _step_parts(cfg, DeviceSetup(torch.device("cpu"), amp=True, channels_last=True))
    assert state.nets["G"].downs[1][1].weight.is_contiguous(memory_format=torch.channels_last)
    scaler = state.scaler
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**10
    batch = _batch(data_root, 2)
    history = [train_step(batch, state, dev) for _ in range(8)]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert history[-1]["g_l1"] < history[0]["g_l1"] and history[-1]["g_total"] < history[0]["g_total"]
    assert scaler.get_scale() > 1


# -------------------------------------------------------------------------------------------- a run

def test_train_writes_run_folder(tmp_path, data_root):
    run = tmp_path / "runs" / "demo"
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    summary = train(cfg_with("train.epochs=2"), run, data_root, device_spec="cpu", console=console)
    assert summary.status == "completed" and summary.epochs_done == 2 and summary.global_step == 6
    assert summary.best_psnr is not None and summary.best_epoch in (1, 2)
    assert "RANDOM VGG" in summary.vgg
    for name in ("config.yaml", "metrics.csv", "meta.json", "last.pt", "best.pt", "epoch_002.pt",
                 "samples/epoch_001.png", "samples/epoch_002.png", "curves.png"):
        assert (run / name).is_file(), name
    assert not (run / "epoch_001.pt").exists()
    assert no_temp_files(run)
    assert load_config(run / "config.yaml").train.epochs == 2

    with open(run / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == METRIC_FIELDS
        rows = list(reader)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["3", "6"]
    for row in rows:
        for key in METRIC_FIELDS:
            assert row[key] != "" and np.isfinite(float(row[key])), key
        assert 0 <= float(row["val_iou"]) <= 1 and float(row["val_psnr"]) > 5

    curves = read_image(run / "curves.png")  # six panels, redrawn every epoch
    assert curves.shape == (700, 1300, 3) and (curves < 128).any()
    grid = read_image(run / "samples" / "epoch_002.png")
    # rows masked | output | original; one column per fixed validation face (2 < num_sample_images=3)
    assert grid.shape == (2 + 3 * (64 + 2), 2 + 2 * (64 + 2), 3)

    meta = json.loads((run / "meta.json").read_text())
    assert meta["vgg"] == summary.vgg and meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["data_root"] == str(data_root.resolve()) and meta["started_at"] and meta["alignment"] == "visible"

    raw = torch.load(run / "last.pt", weights_only=True)
    assert raw["format"] == "unmask-checkpoint" and raw["version"] == 1 and raw["world_size"] == 1
    ckpt = Checkpoint.load(run / "last.pt")
    assert ckpt.epoch == 2 and ckpt.global_step == 6 and ckpt.samples_in_epoch == 0
    assert set(ckpt.networks) == {"G", "D_whole", "D_mask", "M"} and set(ckpt.optimizers) == {"G", "D", "M"}
    assert {"torch", "numpy", "python", "cuda"} <= set(ckpt.rng) and ckpt.vgg == summary.vgg
    assert ckpt.alignment == "visible" and build_networks_from_checkpoint(run / "last.pt").alignment == "visible"
    assert os.path.samefile(run / "last.pt", run / "epoch_002.pt")

    text = out.getvalue()  # a non-terminal console: plain lines, no progress-bar redraws
    assert "epoch 1/2" in text and "epoch 2/2" in text and "━" not in text and "\r" not in text
    assert len(text.splitlines()) < 12

    again = train(cfg_with("train.epochs=2"), run, data_root, device_spec="cpu", console=quiet())
    assert again.status == "already-complete" and "already trained 2 epochs" in again.message
    assert len(read_metrics(run / "metrics.csv")) == 2

    with pytest.raises(UnmaskError, match="already has checkpoints.*another --name"):
        train(cfg_with("train.epochs=3"), run, data_root, resume=None, device_spec="cpu", console=quiet())


def test_a_folder_without_settings_is_taken_as_legacy_ffhq_crops(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=2, n_val=0, alignment=None)
    train(cfg_with("train.epochs=1"), tmp_path / "run", root, device_spec="cpu", console=quiet())
    assert Checkpoint.load(tmp_path / "run" / "last.pt").alignment == "ffhq"
    assert build_networks_from_checkpoint(tmp_path / "run" / "last.pt").alignment == "ffhq"
    (root / "prepare.json").write_text('{"settings": {"alignment": "visible"}}')  # now visible-aligned data
    with pytest.raises(UnmaskError, match="trained on faces with the 'ffhq' alignment and crop 1, but .* holds 'visible'-aligned faces with crop 1"):
        train(cfg_with("train.epochs=2"), tmp_path / "run", root, device_spec="cpu", console=quiet())


def test_checkpoint_round_trip_and_model_rebuild(tmp_path, data_root):
    run = tmp_path / "run"
    train(cfg_with("train.epochs=1", "model.dropout=0.5"), run, data_root, device_spec="cpu", console=quiet())
    ckpt = Checkpoint.load(run / "last.pt")
    copy = tmp_path / "copy.pt"
    ckpt.save(copy)
    again = Checkpoint.load(copy)
    assert again.config == ckpt.config and again.epoch_stats == ckpt.epoch_stats and again.rng.keys() == ckpt.rng.keys()
    assert_bitwise_equal(weights(run / "last.pt"), weights(copy))
    umask = os.umask(0)
    os.umask(umask)
    assert copy.stat().st_mode & 0o777 == 0o666 & ~umask  # like a normal file, not mkstemp's 0600

    model = build_networks_from_checkpoint(copy, "cpu")
    assert model.epoch == 1 and model.image_size == 64 and model.M is not None and not model.G.training
    assert model.config.model.ngf == 8 and "RANDOM" in model.vgg
    assert_bitwise_equal({f"G.{k}": v for k, v in model.G.state_dict().items()},
                         {k: v for k, v in weights(copy).items() if k.startswith("G.")})
    x = torch.rand(1, 4, 64, 64)
    assert torch.equal(model.G(x), model.G(x))  # eval mode: dropout off


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoint_files_give_one_line_errors(tmp_path, data_root):
    run = tmp_path / "run"
    train(cfg_with("train.epochs=1", "loss.lambda_perc=0"), run, data_root, device_spec="cpu", console=quiet())
    good = (run / "last.pt").read_bytes()

    def error_of(path: Path) -> str:
        with pytest.raises(UnmaskError) as info:
            Checkpoint.load(path)
        text = str(info.value)
        assert "\n" not in text and str(path) in text
        return text

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    assert "truncated or corrupt" in error_of(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in error_of(empty)
    text_file = tmp_path / "notes.pt"
    text_file.write_text("hello, not a checkpoint\n")
    assert "not a PyTorch file (expected a checkpoint written by torch.save)" in error_of(text_file)
    tensor_file = tmp_path / "tensor.pt"
    torch.save({"G": torch.zeros(3)}, tensor_file)
    assert "not an unmask checkpoint" in error_of(tensor_file)
    assert "not found" in error_of(tmp_path / "missing.pt")

    # a pickle that would run a shell command when unpickled: refused, never executed
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, data in (("evil2.pt", pickle.dumps(Evil(), protocol=2)), ("evil4.pt", pickle.dumps(Evil()))):
        (tmp_path / name).write_bytes(data)
        assert "cannot load checkpoint" in error_of(tmp_path / name)
    torch.save({"format": "unmask-checkpoint", "payload": Evil()}, tmp_path / "evil_zip.pt")
    assert "refused" in error_of(tmp_path / "evil_zip.pt") and "system" in error_of(tmp_path / "evil_zip.pt")
    assert not marker.exists()

    # resuming with another architecture/size, and a checkpoint whose weights do not fit its config
    with pytest.raises(UnmaskError) as info:
        train(cfg_with("train.epochs=2", "loss.lambda_perc=0", "data.image_size=128"), run, data_root,
              device_spec="cpu", console=quiet())
    assert "another network/size" in str(info.value) and "data.image_size=64" in str(info.value)
    with pytest.raises(UnmaskError, match="model.ngf=8 in the checkpoint, 16 now"):
        train(cfg_with("train.epochs=2", "loss.lambda_perc=0", "model.ngf=16"), run, data_root, device_spec="cpu",
              console=quiet())
    ckpt = Checkpoint.load(run / "last.pt")
    ckpt.config["model"]["ngf"] = 16
    ckpt.save(tmp_path / "mismatch.pt")
    with pytest.raises(UnmaskError) as info:
        build_networks_from_checkpoint(tmp_path / "mismatch.pt")
    assert "does not match the network 'G'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UnmaskError, match="another network/size"):
        train(cfg_with("train.epochs=2", "loss.lambda_perc=0"), tmp_path / "other", data_root,
              resume=tmp_path / "mismatch.pt", device_spec="cpu", console=quiet())


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_sample_is_a_one_line_error(tmp_path, workers):
    root = make_dataset(tmp_path / "data", n_train=2, n_val=1)  # sample faces come from val: the loader hits it
    bad = root / "masked_images" / "000001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UnmaskError) as info:
        train(cfg_with("train.epochs=1", "loss.lambda_perc=0", f"data.num_workers={workers}"), tmp_path / "run",
              root, device_spec="cpu", console=quiet())
    text = str(info.value)
    assert str(bad) in text and "\n" not in text and "Traceback" not in text and "rerunning resumes" in text


# ----------------------------------------------------------------------------------------- resume

def test_map_augment_redraws_a_photo_quality_change_per_image(astronaut):
    """train.map_augment: a share of the map module's inputs get their own random tone, blur or rescale
    and noise, drawn from torch's global generator (so a checkpoint's RNG state replays them); the input
    batch is left as it was."""
    import cv2

    from unmask_cli.augment import photometric
    from unmask_cli.tensors import from_uint8

    faces = np.stack([cv2.resize(np.roll(astronaut, 40 * i, axis=1), (64, 64)) for i in range(6)])
    x = from_uint8(torch.from_numpy(faces))
    before = x.clone()
    assert photometric(x, 0.0) is x
    torch.manual_seed(3)
    a = photometric(x, 1.0)
    after_a = torch.get_rng_state()
    torch.manual_seed(3)
    b = photometric(x, 1.0)
    assert torch.equal(a, b) and torch.equal(x, before) and torch.equal(torch.get_rng_state(), after_a)
    assert a.shape == x.shape and a.dtype == x.dtype and -1 <= a.min() and a.max() <= 1
    changed = (a - x).abs().flatten(1).mean(1)
    assert (changed > 0.01).all()  # every image, each its own way
    assert len({round(float(c), 4) for c in changed}) == len(changed)
    assert not torch.equal(photometric(x, 1.0), a)  # the next step draws afresh
    torch.manual_seed(3)
    some = photometric(x, 0.5)
    untouched = [torch.equal(some[i], x[i]) for i in range(len(x))]
    assert any(untouched) and not all(untouched)


class SignalAt(TrainHooks):
    """Deliver ``signum`` to this process as the ``calls``-th training step starts (like a Ctrl-C/kill)."""

    def __init__(self, calls: int, signum: int):
        self.calls, self.signum, self.count = calls, signum, 0

    def step_started(self, trainer) -> None:
        self.count += 1
        if self.count == self.calls:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("how", ["sigint-mid-epoch", "sigterm-mid-epoch", "epoch-boundary"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, data_root, how):
    # 6 training images, batch 2 -> 3 steps per epoch, 3 epochs; dropout, the VGG term, the EMA and the map
    # module's random augmentation are on
    overrides = ("train.epochs=3", "model.dropout=0.5", "train.ema_decay=0.9", "train.map_augment=0.7")
    full = tmp_path / "full"
    train(cfg_with(*overrides), full, data_root, device_spec="cpu", console=quiet())

    part = tmp_path / "part"
    if how == "epoch-boundary":
        first = train(cfg_with("train.epochs=1", *overrides[1:]), part, data_root, device_spec="cpu",
                      console=quiet())
        assert first.status == "completed" and first.epochs_done == 1
    else:
        signum = signal.SIGINT if how == "sigint-mid-epoch" else signal.SIGTERM
        previous = signal.getsignal(signum)
        first = train(cfg_with(*overrides), part, data_root, device_spec="cpu", console=quiet(),
                      hooks=SignalAt(5, signum))  # the 2nd step of epoch 2
        assert signal.getsignal(signum) is previous  # handlers restored
        assert first.status == "interrupted" and first.global_step == 5 and first.epochs_done == 1
        ckpt = Checkpoint.load(part / "last.pt")
        assert ckpt.epoch == 1 and ckpt.samples_in_epoch == 4 and ckpt.global_step == 5
        assert [r["epoch"] for r in read_metrics(part / "metrics.csv")] == ["1"]
    # a row the checkpoint does not cover (as after a kill between metrics.csv and last.pt) is dropped
    with open(part / "metrics.csv", "a") as handle:
        handle.write("2,999" + "," * (len(METRIC_FIELDS) - 2) + "\n")

    out = io.StringIO()
    resumed = train(cfg_with(*overrides), part, data_root, device_spec="cpu",
                    console=Console(file=out, force_terminal=False, width=200))
    assert resumed.status == "completed" and resumed.resumed_from == part / "last.pt"
    assert resumed.global_step == 9 and resumed.epochs_done == 3
    assert "resuming" in out.getvalue()
    assert_bitwise_equal(weights(full / "last.pt"), weights(part / "last.pt"))
    full_ckpt, part_ckpt = Checkpoint.load(full / "last.pt"), Checkpoint.load(part / "last.pt")
    assert full_ckpt.ema["updates"] == part_ckpt.ema["updates"] == 9
    for name in ("G", "D", "M"):
        a, b = full_ckpt.optimizers[name]["state"], part_ckpt.optimizers[name]["state"]
        assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert loss_columns(full / "metrics.csv") == loss_columns(part / "metrics.csv")
    meta = json.loads((part / "meta.json").read_text())
    assert len(meta["resumed"]) == 1 and meta["resumed"][0]["global_step"] == first.global_step
    assert no_temp_files(part)


def test_resume_continues_to_a_raised_epoch_target(tmp_path, data_root):
    run = tmp_path / "run"
    train(cfg_with("train.epochs=1", "loss.lambda_perc=0", "train.max_steps_per_epoch=2"), run, data_root,
          device_spec="cpu", console=quiet())
    more = train(cfg_with("train.epochs=2", "loss.lambda_perc=0", "train.max_steps_per_epoch=2"), run, data_root,
                 device_spec="cpu", console=quiet())
    assert more.status == "completed" and more.epochs_done == 2 and more.global_step == 4
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == ["2", "4"]


def test_warmup_trains_reconstruction_only_then_every_term(tmp_path, data_root):
    seen = []

    class LossesUsed(TrainHooks):
        def step_started(self, trainer) -> None:
            loss = trainer.state.gen_loss
            c = loss.cfg
            seen.append((c.lambda_perc, c.lambda_adv_whole, c.lambda_adv_mask, loss.perceptual is not None))

    out = io.StringIO()
    run = tmp_path / "run"  # 3 steps per epoch: epoch 1 and the first step of epoch 2 are warm-up
    summary = train(cfg_with("train.epochs=3", "loss.warmup_steps=4"), run, data_root, device_spec="cpu",
                    console=Console(file=out, force_terminal=False, width=200), hooks=LossesUsed())
    assert summary.status == "completed" and summary.global_step == 9
    assert seen == [(0.0, 0.0, 0.0, False)] * 4 + [(1.0, 1.0, 1.0, True)] * 5
    rows = read_metrics(run / "metrics.csv")
    for key in ("g_perc", "g_adv_whole", "g_adv_mask", "d_whole", "d_mask"):
        assert float(rows[0][key]) == 0.0 and float(rows[2][key]) > 0, key
    text = out.getvalue()
    assert "steps 1..4 train on L1 + SSIM only" in text and "step 4: warm-up done" in text

    seen.clear()  # resuming after the warm-up does not repeat it
    train(cfg_with("train.epochs=4", "loss.warmup_steps=4"), run, data_root, device_spec="cpu", console=quiet(),
          hooks=LossesUsed())
    assert seen == [(1.0, 1.0, 1.0, True)] * 3


def test_ema_averages_every_step_after_its_start_resumes_and_is_what_eval_loads(tmp_path, data_root):
    after_step = []  # G's weights and BatchNorm statistics after every step
    validated = []  # the generator weights each validation scored

    class Watch(TrainHooks):
        def step_done(self, trainer, values) -> None:
            after_step.append({k: v.detach().clone() for k, v in trainer.state.nets["G"].state_dict().items()})

        def validating(self, trainer, G) -> None:
            validated.append({k: v.clone() for k, v in G.state_dict().items()})

    decay = 0.8

    def expected_ema(start: dict | None, snapshots: list[dict]) -> dict:
        ema = dict(start or snapshots[0])  # the first update copies G
        for snap in snapshots[0 if start else 1:]:
            ema = {k: decay * ema[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in snap.items()}
        return ema

    def check(stored: dict, wanted: dict) -> None:
        floats = [k for k, v in wanted.items() if v.is_floating_point()]
        assert floats and any(k.endswith("running_var") for k in floats)  # BatchNorm statistics averaged too
        for k in floats:
            torch.testing.assert_close(stored[k], wanted[k], rtol=1e-5, atol=1e-6, msg=k)

    # 3 steps per epoch; the average starts after step 3: epoch 1 validates G, epoch 2 the average
    run = tmp_path / "run"
    out = io.StringIO()
    overrides = ("loss.lambda_perc=0", f"train.ema_decay={decay}", "train.ema_start=3")
    summary = train(cfg_with("train.epochs=2", *overrides), run, data_root, device_spec="cpu",
                    console=Console(file=out, force_terminal=False, width=200), hooks=Watch())
    assert summary.global_step == 6 and "EMA of G: decay 0.8 from step 4" in out.getvalue()
    ckpt = Checkpoint.load(run / "last.pt")
    assert ckpt.ema["decay"] == decay and ckpt.ema["updates"] == 3
    wanted = expected_ema(None, after_step[3:])
    check(ckpt.ema["G"], wanted)
    check(validated[0], after_step[2])
    check(validated[1], wanted)
    raw = ckpt.networks["G"]
    assert any(not torch.allclose(ckpt.ema["G"][k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert build_networks_from_checkpoint(run / "epoch_002.pt").weights == "EMA of G (decay 0.8, 3 updates)"

    model = build_networks_from_checkpoint(run / "last.pt")  # eval and infer load the average...
    assert model.weights == "EMA of G (decay 0.8, 3 updates)"
    assert all(torch.equal(v, ckpt.ema["G"][k]) for k, v in model.G.state_dict().items())
    plain = build_networks_from_checkpoint(run / "last.pt", ema=False)  # ... or, asked, G's own weights
    assert plain.weights == "G (its EMA not used)"
    assert all(torch.equal(v, raw[k]) for k, v in plain.G.state_dict().items())

    # resuming continues the same average (3 more steps)
    saved_ema = {k: v.clone() for k, v in ckpt.ema["G"].items()}
    first_run = len(after_step)
    train(cfg_with("train.epochs=3", *overrides), run, data_root, device_spec="cpu", console=quiet(), hooks=Watch())
    ckpt = Checkpoint.load(run / "last.pt")
    assert ckpt.ema["updates"] == 6
    wanted = expected_ema(saved_ema, after_step[first_run:])
    check(ckpt.ema["G"], wanted)
    check(validated[-1], wanted)

    # a checkpoint saved before the average started is scored with G
    early = tmp_path / "early"
    train(cfg_with("train.epochs=1", *overrides), early, data_root, device_spec="cpu", console=quiet())
    assert Checkpoint.load(early / "last.pt").ema["updates"] == 0
    assert build_networks_from_checkpoint(early / "last.pt").weights == "G (its EMA has not started)"

    # a run without EMA (the paper) stores none, and says so when it drops a checkpoint's average
    out = io.StringIO()
    train(cfg_with("train.epochs=4", "loss.lambda_perc=0"), run, data_root, device_spec="cpu",
          console=Console(file=out, force_terminal=False, width=200))
    assert "EMA weights are dropped" in out.getvalue()
    assert Checkpoint.load(run / "last.pt").ema is None
    assert "ema" not in torch.load(run / "last.pt", weights_only=True)
    assert build_networks_from_checkpoint(run / "last.pt").weights == "G"


# ------------------------------------------------------------------------------------------ SIGKILL

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from rich.console import Console
    from unmask_cli.config import load_config
    from unmask_cli.training import train
    run, data, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    summary = train(load_config(None, overrides), Path(run), Path(data), device_spec="cpu",
                    console=Console(stderr=True, force_terminal=False))
    print("STATUS", summary.status, summary.epochs_done, summary.global_step)
""")


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_then_rerun_resumes(tmp_path, workers):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=2)
    run = tmp_path / "run"
    overrides = [*BASE, "train.epochs=6", "loss.lambda_perc=0", f"data.num_workers={workers}"]
    cmd = [sys.executable, "-c", CHILD, str(run), str(data), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        child.kill()  # SIGKILL: no handler runs
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    killed_at = Checkpoint.load(run / "last.pt").epoch
    assert 1 <= killed_at < 6

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "STATUS completed 6 12" in rerun.stdout
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"epoch_{e:03d}.png" for e in range(1, 7)]
    assert {"epoch_002.pt", "epoch_004.pt", "epoch_006.pt", "best.pt", "last.pt"} <= {p.name for p in run.iterdir()}
    assert no_temp_files(run)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["resumed"] and meta["resumed"][0]["epoch"] == killed_at
    # the lost part of the killed epoch is redone from the epoch-end state: same weights as a clean run
    reference = train(load_config(None, overrides), tmp_path / "reference", data, device_spec="cpu", console=quiet())
    assert reference.global_step == 12
    assert_bitwise_equal(weights(tmp_path / "reference" / "last.pt"), weights(run / "last.pt"))


def test_tensorboard_scalars_and_samples_when_the_package_is_installed(tmp_path, data_root):
    pytest.importorskip("tensorboard")  # optional for users; installed with the dev extras
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(cfg_with("train.epochs=2", "loss.lambda_perc=0"), run, data_root, device_spec="cpu", console=quiet())
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"g_total", "g_l1", "d_whole", "map_loss", "val_psnr", "val_iou", "img_per_s"} <= set(scalars)
    assert [e.step for e in events.Scalars("g_total")] == [3, 6]
    assert len(events.Tags()["images"]) == 1


def test_training_from_the_decoded_cache_equals_training_from_pngs(tmp_path):
    """data.cache reads the same tensors, so a run gives bitwise the same weights."""
    data_root = make_dataset(tmp_path / "data")
    overrides = ("train.epochs=1", "loss.lambda_perc=0")
    train(cfg_with(*overrides), tmp_path / "png", data_root, device_spec="cpu", console=quiet())
    train(cfg_with(*overrides, "data.cache=true"), tmp_path / "cache", data_root, device_spec="cpu", console=quiet())
    assert list((data_root / "cache").glob("*.npy"))
    assert_bitwise_equal(weights(tmp_path / "png" / "last.pt"), weights(tmp_path / "cache" / "last.pt"))


def test_init_starts_a_new_run_from_another_checkpoints_weights(tmp_path, data_root):
    """train.init: the networks start as the given checkpoint's (release files too), the step count and
    optimizers fresh; another architecture is a one-line error; a resumed run ignores it."""
    from unmask_cli.export import export_release

    first = tmp_path / "runs" / "first"
    train(cfg_with("train.epochs=1"), first, data_root, device_spec="cpu", console=quiet())
    release, _ = export_release(first / "last.pt", tmp_path / "first-release.pt")
    seen = {}

    class Watch(TrainHooks):
        def step_started(self, trainer):
            seen.setdefault("G", {k: v.clone() for k, v in trainer.state.nets["G"].state_dict().items()})
            seen.setdefault("step", trainer.state.global_step)

    for source in (first / "last.pt", release):
        seen.clear()
        run = tmp_path / "runs" / f"from_{source.stem}"
        summary = train(cfg_with("train.epochs=1", f"train.init={source}"), run, data_root, device_spec="cpu",
                        console=quiet(), hooks=Watch())
        assert summary.status == "completed" and seen["step"] == 0 and summary.global_step == 3
        start = Checkpoint.load(source).networks["G"]
        assert all(torch.allclose(seen["G"][k].float(), start[k].float(), atol=1e-3) for k in start)

    with pytest.raises(UnmaskError, match="another network/size"):
        train(cfg_with("train.epochs=1", "model.ngf=16", f"train.init={release}"), tmp_path / "runs" / "wide",
              data_root, device_spec="cpu", console=quiet())
    with pytest.raises(UnmaskError, match="train.init: checkpoint not found"):
        train(cfg_with("train.epochs=1", f"train.init={tmp_path / 'nope.pt'}"), tmp_path / "runs" / "none",
              data_root, device_spec="cpu", console=quiet())
