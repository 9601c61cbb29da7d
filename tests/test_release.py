"""Release files and the shipped model: export, sha256 checks, infer/eval without --checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask_cli.checkpoints import Checkpoint, build_networks_from_checkpoint
from unmask_cli.config import Config, EvalConfig, InferConfig, PrepareConfig
from unmask_cli.errors import UnmaskError
from unmask_cli.export import export_release
from unmask_cli.fileio import read_image, sha256_file, write_image
from unmask_cli.release import SHIPPED_MODEL, resolve_model, verify_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(path: Path) -> Path:
    """A small trained-looking checkpoint: random weights, BatchNorm statistics and an EMA of G that
    differs from G (so the export must pick the EMA)."""
    from unmask_cli.models import build_networks

    cfg = Config()
    cfg.data.image_size = 64
    cfg.model.ngf = cfg.model.ndf = cfg.model.nmf = 8
    cfg.loss.vgg_weights = "random"
    torch.manual_seed(0)
    nets = build_networks(cfg)
    for net in nets.values():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    ema_G = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in nets["G"].state_dict().items()}
    Checkpoint(config=cfg.to_dict(), networks={k: v.state_dict() for k, v in nets.items()}, epoch=3,
               global_step=30, vgg="random", alignment="visible", crop=0.7,
               ema={"decay": 0.999, "updates": 20, "G": ema_G}).save(path)
    return path


def test_export_packs_fp16_ema_weights_with_a_verified_sidecar(tmp_path):
    source = _checkpoint(tmp_path / "best.pt")
    out, sidecar = export_release(source, tmp_path / "mine.pt")
    assert sidecar["sha256"] == sha256_file(out) and sidecar["bytes"] == out.stat().st_size
    assert json.loads((tmp_path / "mine.json").read_text())["sha256"] == sidecar["sha256"]
    assert sidecar["crop"] == 0.7 and sidecar["alignment"] == "visible" and sidecar["global_step"] == 30
    assert sidecar["licence"].startswith("not recorded") and sidecar["weights"].startswith("EMA of G")
    packed = Checkpoint.load(out)
    assert set(packed.networks) == {"G", "M"} and not packed.optimizers and packed.ema is None
    assert all(v.dtype == torch.float16 for v in packed.networks["G"].values() if v.is_floating_point())
    assert out.stat().st_size < 0.6 * source.stat().st_size
    # the release runs like the EMA of the source, within float16 rounding
    ours, theirs = build_networks_from_checkpoint(out), build_networks_from_checkpoint(source)
    assert ours.crop == 0.7 and "float16 release" in ours.weights
    x = torch.rand(2, 4, 64, 64) * 2 - 1
    with torch.no_grad():
        diff = (ours.G(x) - theirs.G(x)).abs().max().item()
        plain = build_networks_from_checkpoint(source, ema=False).G(x)
    assert diff < 0.02 and (plain - theirs.G(x)).abs().max().item() > 10 * diff


def test_a_release_whose_bytes_or_sidecar_are_wrong_is_refused(tmp_path):
    out, _ = export_release(_checkpoint(tmp_path / "best.pt"), tmp_path / "mine.pt")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "edited.pt").write_bytes(bytes(data))
    (tmp_path / "edited.json").write_text((tmp_path / "mine.json").read_text())
    with pytest.raises(UnmaskError, match="does not match its sha256") as err:
        build_networks_from_checkpoint(tmp_path / "edited.pt")
    assert "edited.pt" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "lonely.pt").write_bytes(out.read_bytes())
    with pytest.raises(UnmaskError, match="has no lonely.json beside it"):
        Checkpoint.load(tmp_path / "lonely.pt")
    with pytest.raises(UnmaskError, match="must end in .pt"):
        export_release(tmp_path / "best.pt", tmp_path / "mine.bin")


def test_export_never_destroys_a_file(tmp_path):
    """Not the checkpoint itself (by name or through a link), not an existing pair without --overwrite;
    missing folders are created, and a missing --data folder is an error, not a silent omission."""
    source = _checkpoint(tmp_path / "best.pt")
    before = source.read_bytes()
    (tmp_path / "link.pt").symlink_to(source)
    for out in (source, tmp_path / "." / "best.pt", tmp_path / "link.pt"):
        with pytest.raises(UnmaskError, match="is the checkpoint being exported"):
            export_release(source, out)
    assert source.read_bytes() == before and not (tmp_path / "best.json").exists()
    out, first = export_release(source, tmp_path / "new" / "folder" / "mine.pt")
    with pytest.raises(UnmaskError, match="already exists; pass --overwrite"):
        export_release(source, out)
    assert sha256_file(out) == first["sha256"]
    _, second = export_release(source, out, overwrite=True, about="again")
    assert second["data"]["about"] == "again" and verify_release(out)["sha256"] == second["sha256"]
    with pytest.raises(UnmaskError, match="--data: prepared data folder not found"):
        export_release(source, tmp_path / "other.pt", data=tmp_path / "no such data")
    assert not [p for p in tmp_path.rglob("*") if "unmask-tmp" in p.name]


def test_export_licence_follows_the_data_and_no_machine_path_is_recorded(tmp_path):
    source = _checkpoint(tmp_path / "best.pt")
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "prepare.json").write_text(json.dumps({"settings": {"source": "builtin", "crop": 0.7}}))
    (data / "manifest.jsonl").write_text("")
    _, sidecar = export_release(source, tmp_path / "a.pt", data=data)
    assert sidecar["licence"].startswith("trained on public-domain photos")
    (data / "prepare.json").write_text(json.dumps({"settings": {"source": str(tmp_path / "utkface_all")}}))
    _, sidecar = export_release(source, tmp_path / "b.pt", data=data, licence="CC0, my own photos")
    assert sidecar["licence"] == "CC0, my own photos"
    text = (tmp_path / "b.json").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text and sidecar["source"] == "best.pt"
    assert sidecar["data"]["settings"]["source"] == "utkface_all"


def test_a_full_disk_during_export_is_one_line_and_keeps_the_previous_release(tmp_path):
    """A file-size limit (as a full disk would) during the write: one line naming the file, the old pair
    intact, no temporary file left."""
    import resource
    import subprocess
    import sys

    source = _checkpoint(tmp_path / "best.pt")
    out, first = export_release(source, tmp_path / "mine.pt")
    limit = out.stat().st_size // 3

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "unmask_cli", "export", "--checkpoint", str(source), "--out", str(out),
           "--overwrite"]
    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: {out}: cannot write checkpoint"), lines[0]
    assert verify_release(out)["sha256"] == first["sha256"]
    assert not [p for p in tmp_path.iterdir() if "unmask-tmp" in p.name]


# ------------------------------------------------------------------------------------- the shipped model

def _drawn_mask(aligner, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A light-blue surgical mask drawn over the lower face (jaw points 2-14 through the nose bridge)."""
    import cv2

    face = aligner.detect(photo)[0]
    poly = np.concatenate([face.landmarks[2:15], face.landmarks[[29]]]).round().astype(np.int32)
    masked, region = photo.copy(), np.zeros(photo.shape[:2], np.uint8)
    cv2.fillPoly(masked, [poly], (170, 200, 225))
    cv2.fillPoly(region, [poly], 1)
    return masked, cv2.erode(region, np.ones((5, 5), np.uint8)).astype(bool)


def test_the_shipped_model_is_verified_small_and_described():
    assert resolve_model(None) == SHIPPED_MODEL == resolve_model("shipped")
    doc = verify_release(SHIPPED_MODEL)
    assert SHIPPED_MODEL.stat().st_size <= 30e6 and doc["dtype"] == "float16"
    assert doc["image_size"] >= 128 and doc["alignment"] == "visible-neck" and "non-commercial" in doc["licence"]
    assert "/" not in doc["source"] and "/" not in doc["data"]["settings"]["source"]  # no machine paths
    assert doc["data"]["samples"]["train"] > 5000 and doc["metrics"]["means"]["ours"]["psnr_mask"] > 0


def test_infer_without_a_checkpoint_unmasks_a_photo_with_the_shipped_model(tmp_path, aligner, astronaut):
    """No --checkpoint: the shipped model finds the drawn mask and paints a face that is much closer to
    the real one than the mask was; the summary names the shipped model."""
    from rich.console import Console

    from unmask_cli.inference import run_infer, summary_table

    masked, region = _drawn_mask(aligner, astronaut)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "astro.png", masked)
    summary = run_infer(InferConfig(device="cpu"), tmp_path / "in", tmp_path / "out")
    assert summary.faces == 1 and summary.checkpoint == str(SHIPPED_MODEL)
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    assert "shipped model" in console.export_text()
    out = read_image(tmp_path / "out" / "astro.png").astype(float)
    before = np.abs(masked[region].astype(float) - astronaut[region]).mean()
    after = np.abs(out[region] - astronaut[region]).mean()
    assert after < 0.7 * before, (before, after)  # measured: 51 -> 34 levels (v1, crop 0.7: 27)


def test_the_shipped_model_leaves_the_bare_face_of_a_group_photo_untouched(tmp_path, aligner, astronaut,
                                                                           grace_hopper):
    """Two real people side by side, a mask drawn on one: that face is unmasked, the other face wears no
    mask and every pixel away from the drawn mask comes out bit for bit (PNG)."""
    import cv2

    height = 360
    people = [cv2.resize(p, (round(p.shape[1] * height / p.shape[0]), height), interpolation=cv2.INTER_AREA)
              for p in (astronaut, grace_hopper)]
    photo = np.ascontiguousarray(np.concatenate(people, axis=1))
    masked, region = _drawn_mask(aligner, photo)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "two.png", masked)
    summary = run_infer_default(tmp_path)
    assert summary.faces == 1 and summary.faces_empty_map == 1, summary
    out = read_image(tmp_path / "out" / "two.png")
    changed = (out != masked).any(axis=2)
    masked_person = slice(people[0].shape[1], None) if region[:, people[0].shape[1]:].any() else slice(0, people[0].shape[1])
    bare_person = slice(0, people[0].shape[1]) if masked_person.start else slice(people[0].shape[1], None)
    assert not changed[:, bare_person].any()  # the bare face's half of the photo: bit for bit
    # the masked face is unmasked; its predicted map may reach a little past the drawn mask (onto the neck)
    assert changed[region].mean() > 0.9 and changed.sum() < 3 * region.sum()
    assert np.abs(out[region].astype(float) - photo[region]).mean() < 0.7 * np.abs(
        masked[region].astype(float) - photo[region]).mean()


def run_infer_default(tmp_path: Path):
    """``unmask infer IN OUT`` as a new user runs it: the shipped model, predicted masks."""
    from unmask_cli.inference import run_infer

    return run_infer(InferConfig(device="cpu"), tmp_path / "in", tmp_path / "out")


def test_eval_scores_the_shipped_model_on_data_with_its_crop(tmp_path, astronaut, grace_hopper, monkeypatch):
    from unmask_cli.evaluation import run_eval
    from unmask_cli.prepare import run_prepare

    doc = verify_release(SHIPPED_MODEL)
    src = tmp_path / "src"
    src.mkdir()
    write_image(src / "astronaut.png", astronaut)
    write_image(src / "hopper.png", grace_hopper)
    data = tmp_path / "data"
    run_prepare(PrepareConfig(source=str(src), num_samples=2, size=doc["image_size"], crop=doc["crop"],
                              alignment=doc["alignment"], mask_types="surgical", val_fraction=0,
                              test_fraction=0), data)
    monkeypatch.chdir(tmp_path)  # the shipped model's reports go to ./runs/eval_shipped_<split>
    report = run_eval(EvalConfig(checkpoint="shipped", data=str(data), split="all", device="cpu",
                                 vgg_weights="random", sheet_images=0, baselines="telea,biharmonic"))
    assert report.n_images == 2 and report.out == Path("runs") / "eval_shipped_all"
    assert (tmp_path / "runs" / "eval_shipped_all" / "metrics.json").exists()
    assert report.mean("ours", "psnr_mask") > report.mean("telea", "psnr_mask")
    run_prepare(PrepareConfig(source=str(src), num_samples=1, size=doc["image_size"], mask_types="surgical",
                              val_fraction=0, test_fraction=0), tmp_path / "wide")
    with pytest.raises(UnmaskError, match=f"--alignment {doc['alignment']} --crop {doc['crop']:g}"):
        run_eval(EvalConfig(checkpoint="shipped", data=str(tmp_path / "wide"), split="all", device="cpu",
                            vgg_weights="random"))


def test_unmask_export_command_writes_a_release_infer_can_run(tmp_path, astronaut):
    """The CLI path: `unmask export` writes the pair; `unmask infer --aligned --checkpoint` runs it."""
    import subprocess
    import sys

    source = _checkpoint(tmp_path / "best.pt")
    run = subprocess.run([sys.executable, "-m", "unmask_cli", "export", "--checkpoint", str(source), "--out",
                          str(tmp_path / "mine.pt"), "--about", "random weights"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "sha256" in run.stdout and json.loads((tmp_path / "mine.json").read_text())["data"]["about"] == "random weights"
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "face.png", np.ascontiguousarray(astronaut[:200, 150:350]))
    run = subprocess.run([sys.executable, "-m", "unmask_cli", "infer", str(tmp_path / "in"), str(tmp_path / "out"),
                          "--aligned", "--checkpoint", str(tmp_path / "mine.pt"), "--device", "cpu"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "face.png").exists() and "release file" in run.stdout
