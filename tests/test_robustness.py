"""Robustness (issue 7): bad input of every kind, across every command it can reach.

Fatal problems (config, checkpoint, output folder) must end the command with exactly one stderr line
``error: PATH: reason`` and no traceback. Per-file problems must be listed as skipped with their reason
(skipped.csv / metrics.json and the summary) while the rest of the batch is processed, and nothing may be
half-written (no ``.unmask-tmp-`` file, no zero-byte output). Valid-but-odd images (greyscale, RGBA,
16-bit, EXIF-rotated, 64 megapixels, six faces) must be processed.

Commands run through ``badfiles.CliServer`` (the real ``unmask_cli.cli.main`` in a forked process per
command, with its own stdout/stderr/exit code) unless only the job function's behaviour matters. Real
faces throughout: scikit-image's astronaut and matplotlib's Grace Hopper, plus ../shared/faces if present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from badfiles import (
    EPS,
    SVG,
    animated_gif,
    bomb_png,
    cold_cli,
    evil_checkpoint,
    exif_rotated_jpeg,
    gray,
    gray16_png,
    half,
    huge_jpeg,
    jpeg_bytes,
    leftovers,
    png_bytes,
    random_bytes,
    read_csv_rows,
    rgba,
    shared_server,
    tiled,
    write,
)

from unmask_cli.data import MANIFEST, MASK_DIR, MASKED_DIR, ORIGINAL_DIR, check_stem, read_manifest
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import read_image

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick.yaml"
SIZE = 64
TINY_NETS = ["--set", f"data.image_size={SIZE}", "--set", "model.ngf=8", "--set", "model.ndf=8", "--set",
             "model.nmf=8", "--set", "train.batch_size=4", "--set", "loss.vgg_weights=random"]
IS_ROOT = os.geteuid() == 0  # root ignores file modes; the permission tests drop that privilege (CliServer)

# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cli():
    server = shared_server()
    yield server
    assert server.server_stderr.read_text().strip() == "", "import-time output on stderr"


@pytest.fixture(scope="module")
def face_tile(astronaut) -> np.ndarray:
    """The astronaut's head and shoulders (one face, no second false detection)."""
    return np.ascontiguousarray(astronaut[0:256, 96:352])


@pytest.fixture(scope="module")
def exif_upright(astronaut) -> np.ndarray:
    """A non-square upright crop (300 high, 340 wide) holding the astronaut's face only."""
    return np.ascontiguousarray(astronaut[:300, 60:400])


def _save_ckpt(path: Path, *, image_size: int = SIZE, ngf: int = 8, config: dict | None = None,
               networks: dict | None = None, alignment: str | None = "visible") -> Path:
    """A checkpoint as training writes one (a ``Checkpoint``, untrained networks);
    ``alignment`` None: one from before alignments were recorded (ffhq-aligned training data)."""
    from unmask_cli.checkpoints import Checkpoint
    from unmask_cli.config import Config
    from unmask_cli.models import build_networks

    cfg = Config()
    cfg.data.image_size = image_size
    cfg.model.ngf, cfg.model.ndf, cfg.model.nmf = ngf, 8, 8
    cfg.loss.vgg_weights = "random"
    torch.manual_seed(0)
    nets = {k: v.state_dict() for k, v in build_networks(cfg).items()}
    stored = cfg.to_dict()
    for section, values in (config or {}).items():
        stored[section].update(values)
    Checkpoint(config=stored, networks={**nets, **(networks or {})}, epoch=1, global_step=1, best_psnr=0.0,
               best_epoch=0, vgg="random", **({"alignment": alignment} if alignment else {})).save(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Good and bad checkpoints. ``plain`` is a valid 64-px ngf-8 checkpoint with a map module."""
    from unmask_cli.models import MapModule, UNetGenerator

    root = tmp_path_factory.mktemp("ckpts")
    plain = _save_ckpt(root / "plain.pt")
    data = plain.read_bytes()
    out = {"plain": plain}
    out["truncated"] = write(root / "truncated.pt", half(data))
    out["empty"] = write(root / "empty.pt", b"")
    out["text"] = write(root / "notes.pt", b"this is not a checkpoint\n")
    # a plain state dict of another model saved with torch.save (not an unmask checkpoint)
    torch.save(UNetGenerator(4, 3, 8, SIZE).state_dict(), root / "bare_state_dict.pt")
    out["bare_state_dict"] = root / "bare_state_dict.pt"
    # trained with ngf 8, but its config says 16 (e.g. edited or stitched together)
    out["arch_mismatch"] = _save_ckpt(root / "arch.pt", config={"model": {"ngf": 16}})
    # weights for 64 px, config for 128 px (a U-Net one level deeper)
    out["size_mismatch"] = _save_ckpt(root / "size.pt", config={"data": {"image_size": 128}})
    # the map module's weights where the generator's belong
    out["other_model"] = _save_ckpt(root / "other.pt", networks={"G": MapModule(3, 8, SIZE).state_dict()})
    # trained on ffhq-aligned faces before alignments were recorded; the test data is visible-aligned
    out["legacy_alignment"] = _save_ckpt(root / "legacy.pt", alignment=None)
    # a checkpoint from a newer unmask with an alignment this one does not know
    out["future_alignment"] = _save_ckpt(root / "future.pt", alignment="landmarks-3d")
    # an unmask-looking file without a format version (hand-made or edited)
    raw = torch.load(plain, weights_only=True)
    torch.save({k: v for k, v in raw.items() if k != "version"}, root / "no_version.pt")
    out["no_version"] = root / "no_version.pt"
    # a diverged run: NaN in the generator's weights (it would paste black patches)
    nan_g = dict(raw["networks"]["G"])
    first = next(k for k, v in nan_g.items() if v.is_floating_point())
    nan_g[first] = torch.full_like(nan_g[first], float("nan"))
    out["nan_weights"] = _save_ckpt(root / "nan.pt", networks={"G": nan_g})
    # a release file cut short (an interrupted download), its sidecar still beside it
    from unmask_cli.export import export_release

    release, _ = export_release(plain, root / "release" / "model.pt")
    out["truncated_release"] = write(release, half(release.read_bytes()))
    return out


def _prepare_sources(folder: Path, astronaut, grace_hopper, face_tile, exif_upright) -> Path:
    from skimage.data import coffee

    folder.mkdir(parents=True)
    astro_jpg, astro_png = jpeg_bytes(astronaut), png_bytes(astronaut)
    files = {
        "astronaut.jpg": astro_jpg,
        "hopper.png": png_bytes(grace_hopper),
        "empty.jpg": b"",
        "truncated.jpg": half(astro_jpg),
        "truncated.png": half(astro_png),
        "text.jpg": b"this is a text file with a .jpg name\n" * 3,
        "photo.heic": random_bytes(4000),
        "drawing.svg": SVG,
        "figure.eps": EPS,
        "gray.png": png_bytes(gray(astronaut)),
        "rgba.png": png_bytes(rgba(astronaut), "RGBA"),
        "exif.jpg": exif_rotated_jpeg(exif_upright),
        "tiny.png": png_bytes(np.full((10, 10, 3), 128, np.uint8)),
        "huge.jpg": huge_jpeg(face_tile, 8000, 5),
        "bomb.png": bomb_png(20000),
        "coffee.jpg": jpeg_bytes(coffee()),
        "crowd.jpg": jpeg_bytes(tiled(face_tile, 2, 3)),
    }
    for name, data in files.items():
        write(folder / name, data)
    (folder / "folder.jpg").mkdir()  # a directory with an image name
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")  # a broken link
    (folder / "album").mkdir()  # a sub-folder with a photo in it (not read without --recursive)
    write(folder / "album" / "inside.jpg", astro_jpg)
    os.mkfifo(folder / "stream.jpg")  # a named pipe: opening it for reading would block forever
    write(folder / "anim.gif", animated_gif(face_tile))  # prepare and infer read its first frame
    return folder


# every bad or odd source file and what prepare / infer must do with it
#   ("skip", reasons): listed in skipped.csv with one of the reasons; ("ok",): processed;
#   ("copy", reason): infer copies it through (no usable face)
PREPARE_EXPECT = {
    "empty.jpg": ("skip", {"empty file"}),
    "truncated.jpg": ("skip", {"truncated", "corrupt"}),
    "truncated.png": ("skip", {"truncated", "corrupt"}),
    "text.jpg": ("skip", {"not an image"}),
    "photo.heic": ("skip", {"not an image"}),
    "drawing.svg": ("skip", {"not an image"}),
    # with Ghostscript installed Pillow rasterises it (then "no face"); without: "corrupt"
    "figure.eps": ("skip", {"not an image", "unsupported format", "corrupt", "no face"}),
    "tiny.png": ("skip", {"too small"}),
    "bomb.png": ("skip", {"too large"}),
    "coffee.jpg": ("skip", {"no face"}),
    "astronaut.jpg": ("ok",),
    "hopper.png": ("ok",),
    "gray.png": ("ok",),
    "rgba.png": ("ok",),
    "exif.jpg": ("ok",),
    "huge.jpg": ("ok",),
    "crowd.jpg": ("ok",),
    "folder.jpg": ("skip", {"folder"}),
    "dangling.jpg": ("skip", {"broken link"}),
    "album": ("skip", {"folder"}),
    "stream.jpg": ("skip", {"not a regular file"}),
    "anim.gif": ("ok",),
}
INFER_EXPECT = {
    **PREPARE_EXPECT,
    "photo.heic": ("skip", {"not an image"}),  # by extension: never decoded
    "drawing.svg": ("skip", {"not an image"}),
    "figure.eps": ("skip", {"not an image"}),
    "tiny.png": ("copy", "too small"),
    "coffee.jpg": ("copy", "no face"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, astronaut, grace_hopper, face_tile, exif_upright) -> Path:
    return _prepare_sources(tmp_path_factory.mktemp("sources") / "src", astronaut, grace_hopper, face_tile,
                            exif_upright)


@pytest.fixture(scope="module")
def prepared(cli, sources):
    """``unmask prepare --all-faces`` over the bad-source folder: (result, out folder, manifest, skipped rows)."""
    out = sources.parent / "prepared"
    result = cli("prepare", "--source", sources, "--out", out, "--num-samples", "20", "--size", str(SIZE),
                 "--all-faces", "--workers", "2").ok()
    rows = {r["source"]: r for r in read_csv_rows(out / "skipped.csv")}
    return result, out, read_manifest(out), rows


@pytest.fixture(scope="module")
def inferred(cli, sources, ckpts):
    """``unmask infer`` (predicted maps) over the same folder: (result, out folder, skipped rows)."""
    out = sources.parent / "inferred"
    result = cli("infer", sources, out, "--checkpoint", ckpts["plain"], "--device", "cpu").ok()
    rows = {r["file"]: r for r in read_csv_rows(out / "skipped.csv")}
    return result, out, rows


# ------------------------------------------------------------------------- the runner is faithful

def test_cli_server_matches_a_cold_cli_run(cli, ckpts, tmp_path):
    """The forked runner prints what a fresh ``python -m unmask_cli`` prints (stdout, stderr, exit code)."""
    (tmp_path / "in").mkdir()
    args = ("infer", tmp_path / "in", tmp_path / "out", "--checkpoint", ckpts["truncated"])
    cold, forked = cold_cli(*args), cli(*args)
    assert (cold.code, cold.stdout, cold.stderr) == (forked.code, forked.stdout, forked.stderr)
    assert "truncated or corrupt" in forked.error_line()
    cold, forked = cold_cli("--version"), cli("--version")
    assert (cold.code, cold.stdout, cold.stderr) == (forked.code, forked.stdout, forked.stderr) == (0, "unmask 0.1.0\n", "")


# ------------------------------------------------------------------- per-file problems: prepare

def test_prepare_batch_summary(prepared, sources):
    result, out, records, rows = prepared
    assert len(records) == 20 and [r["stem"] for r in records] == [f"{i:06d}" for i in range(20)]
    for sub in (ORIGINAL_DIR, MASKED_DIR, MASK_DIR):
        assert sorted(p.name for p in (out / sub).iterdir()) == [f"{i:06d}.png" for i in range(20)]
    assert leftovers(out) == []
    skipped = {name for name, (what, *_) in PREPARE_EXPECT.items() if what == "skip"}
    assert set(rows) == skipped
    # 64 megapixels included (detected on a 1200-px copy): a full-resolution pass would take minutes
    assert result.seconds < 60
    assert f"skipped sources are listed with reasons in {out / 'skipped.csv'}" in result.stdout
    for reason in ("empty file", "not an image", "too small", "too large", "no face"):
        assert f"skipped: {reason}" in result.stdout


@pytest.mark.parametrize("name", [n for n, e in PREPARE_EXPECT.items() if e[0] == "skip"])
def test_prepare_lists_bad_file_with_reason(prepared, sources, name):
    _, _, records, rows = prepared
    reasons = PREPARE_EXPECT[name][1]
    assert name in rows, f"{name} not listed in skipped.csv"
    row = rows[name]
    assert row["reason"] in reasons
    assert row["detail"].startswith(f"{sources / name}: ") and "\n" not in row["detail"]
    assert name not in {r["source"] for r in records}


@pytest.mark.parametrize("name", [n for n, e in PREPARE_EXPECT.items() if e[0] == "ok"])
def test_prepare_processes_odd_but_valid_image(prepared, name):
    _, out, records, rows = prepared
    mine = [r for r in records if r["source"] == name]
    assert mine and name not in rows
    for record in mine:
        image = read_image(out / ORIGINAL_DIR / f"{record['stem']}.png")
        assert image.shape == (SIZE, SIZE, 3)
        lm = np.asarray(record["aligned_landmarks"])
        assert lm[36:48, 1].mean() < lm[[48, 54, 57], 1].mean()  # eyes above the mouth: upright
    if name == "gray.png":
        first = read_image(out / ORIGINAL_DIR / f"{mine[0]['stem']}.png").astype(int)
        assert (first[..., 0] == first[..., 1]).all() and (first[..., 1] == first[..., 2]).all()


def test_prepare_many_faces(prepared):
    """The 2x3 tiled astronaut gives six distinct faces with --all-faces, in six different places."""
    _, _, records, _ = prepared
    crowd = [r for r in records if r["source"] == "crowd.jpg" and not r["reused"]]
    assert sorted(r["face_index"] for r in crowd) == list(range(6))
    tiles = {((r["box"][0] + r["box"][2]) // 2 // 256, (r["box"][1] + r["box"][3]) // 2 // 256) for r in crowd}
    assert tiles == {(col, row) for row in range(2) for col in range(3)}


def test_prepare_exif_rotation_gives_upright_face(prepared, exif_upright):
    """Stored sideways with EXIF orientation 6: landmarks are in the displayed (upright) frame and the
    aligned crop matches the one of the upright pixels."""
    from unmask_cli.faces import FaceAligner

    _, out, records, _ = prepared
    (record,) = [r for r in records if r["source"] == "exif.jpg" and not r["reused"]]
    reference = FaceAligner(SIZE).faces(exif_upright)[0]
    assert np.abs(np.asarray(record["landmarks"]) - reference.face.landmarks).max() < 4
    lm = np.asarray(record["landmarks"])
    assert lm[36:48, 1].mean() < lm[48:68, 1].mean() and lm[:, 0].max() < 340 and lm[:, 1].max() < 300
    aligned = read_image(out / ORIGINAL_DIR / f"{record['stem']}.png").astype(float)
    assert np.abs(aligned - reference.image).mean() < 8


def test_prepare_reports_entries_that_are_not_files(prepared, sources):
    """A folder named folder.jpg and a dangling symlink are listed as skipped with what they are."""
    _, _, records, rows = prepared
    assert {"folder.jpg", "dangling.jpg"}.isdisjoint(r["source"] for r in records)
    assert rows["folder.jpg"]["reason"] == "folder"
    assert rows["dangling.jpg"]["reason"] == "broken link"
    assert "nowhere.jpg" in rows["dangling.jpg"]["detail"]


def test_prepare_16bit_png(cli, tmp_path, astronaut):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    write(src / "gray16.png", gray16_png(astronaut))
    result = cli("prepare", "--source", src, "--out", tmp_path / "out", "--num-samples", "2", "--size", str(SIZE))
    result.ok()
    assert {r["source"] for r in read_manifest(tmp_path / "out")} == {"astronaut.jpg", "gray16.png"}


def test_prepare_non_utf8_file_name(cli, tmp_path, astronaut):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    write(os.fsencode(src) + b"/caf\xe9.jpg", jpeg_bytes(astronaut))
    out = tmp_path / "out"
    result = cli("prepare", "--source", src, "--out", out, "--num-samples", "2", "--size", str(SIZE))
    result.ok()
    records = read_manifest(out)
    assert {r["source"] for r in records} == {"astronaut.jpg", os.fsdecode(b"caf\xe9.jpg")}
    assert leftovers(out) == []


@pytest.mark.skipif(IS_ROOT, reason="runs as root: root reads a chmod-000 file (test_unreadable_file covers "
                    "this through the CLI with root's override capabilities dropped)")
def test_prepare_and_infer_unreadable_file_same_user(tmp_path, astronaut, ckpts):
    from unmask_cli.config import PrepareConfig
    from unmask_cli.inference import InferConfig, run_infer
    from unmask_cli.prepare import run_prepare

    src = tmp_path / "src"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    write(src / "locked.jpg", jpeg_bytes(astronaut)).chmod(0)
    summary = run_prepare(PrepareConfig(source=src, num_samples=2, size=SIZE), tmp_path / "p")
    assert summary.skipped == {"unreadable": 1} and summary.written == 2
    infer = run_infer(InferConfig(checkpoint=str(ckpts["plain"]), device="cpu"), src, tmp_path / "i")
    assert [(n, r) for n, r, _ in infer.skipped_files] == [("locked.jpg", "unreadable")]


# --------------------------------------------------------------------- per-file problems: infer

def test_infer_batch_summary(inferred, sources):
    result, out, rows = inferred
    listed = {n for n, e in INFER_EXPECT.items() if e[0] == "skip"}
    assert set(rows) == listed
    written = {n for n, e in INFER_EXPECT.items() if e[0] in ("ok", "copy")}
    assert {p.name for p in out.iterdir() if p.is_file()} == written | {"skipped.csv", ".unmask-infer.json"}
    assert leftovers(out) == []
    for name in {n for n, e in INFER_EXPECT.items() if e[0] == "copy"}:
        assert f"│   {name} " in result.stdout  # the summary table names every copied file
    shown = [name for name in listed if f"│   {name} " in result.stdout]  # and the first 10 skipped ones
    assert len(shown) == min(10, len(listed))
    if len(listed) > 10:
        assert f"... {len(listed) - 10} more" in result.stdout


@pytest.mark.parametrize("name", [n for n, e in INFER_EXPECT.items() if e[0] == "skip"])
def test_infer_lists_bad_file_with_reason(inferred, sources, name):
    result, out, rows = inferred
    assert rows[name]["reason"] in INFER_EXPECT[name][1]
    assert rows[name]["detail"].startswith(f"{sources / name}: ")
    assert not (out / name).exists()


@pytest.mark.parametrize("name", [n for n, e in INFER_EXPECT.items() if e[0] in ("ok", "copy")])
def test_infer_writes_every_usable_photo(inferred, sources, name):
    """Processed photos keep their displayed size; photos without a usable face are copied byte for byte."""
    from PIL import Image

    result, out, rows = inferred
    with Image.open(out / name) as img:
        assert img.getexif().get(0x0112, 1) == 1  # written upright: no orientation tag, or 1 (EXIF kept)
        size = img.size
    assert size == (lambda a: (a.shape[1], a.shape[0]))(read_image(sources / name))
    if INFER_EXPECT[name][0] == "copy":
        assert (out / name).read_bytes() == (sources / name).read_bytes()
        assert f"│   {name} " in result.stdout and INFER_EXPECT[name][1] in result.stdout


def test_infer_exif_output_is_upright(inferred, exif_upright):
    _, out, _ = inferred
    result = read_image(out / "exif.jpg").astype(float)
    assert result.shape == exif_upright.shape
    assert np.abs(result - exif_upright).mean() < 20  # the same picture, upright (not rotated 90 degrees)


def test_infer_many_faces_with_supplied_maps(tmp_path, ckpts, face_tile):
    """Six masked faces in one photo, each located and unmasked."""
    from unmask_cli.inference import InferConfig, run_infer

    photo = tiled(face_tile, 2, 3)
    mask = np.zeros(photo.shape[:2], np.uint8)
    for row in range(2):
        for col in range(3):  # lower half of each face: y 125..165, x 85..165 inside the 256-px tile
            mask[row * 256 + 125: row * 256 + 165, col * 256 + 85: col * 256 + 165] = 255
    masked = photo.copy()
    masked[mask > 0] = (40, 90, 210)
    (tmp_path / "in").mkdir()
    (tmp_path / "maps").mkdir()
    write(tmp_path / "in" / "crowd.png", png_bytes(masked))
    write(tmp_path / "maps" / "crowd.png", png_bytes(mask))
    # HOG only (it finds none of them): every face is located from its map
    summary = run_infer(InferConfig(checkpoint=str(ckpts["plain"]), masks=str(tmp_path / "maps"), device="cpu",
                                    detector="hog"), tmp_path / "in", tmp_path / "out")
    assert summary.processed == 1 and summary.faces == 6 and summary.faces_from_maps == 6
    result = read_image(tmp_path / "out" / "crowd.png")
    for row in range(2):
        for col in range(3):
            inner = (slice(row * 256 + 130, row * 256 + 160), slice(col * 256 + 90, col * 256 + 160))
            assert (result[inner] != masked[inner]).any(axis=-1).mean() > 0.5, (row, col)


def test_infer_16bit_png(cli, tmp_path, astronaut, ckpts):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "astronaut.jpg", jpeg_bytes(astronaut))
    write(tmp_path / "in" / "gray16.png", gray16_png(astronaut))
    cli("infer", tmp_path / "in", tmp_path / "out", "--checkpoint", ckpts["plain"], "--device", "cpu").ok()
    assert (tmp_path / "out" / "gray16.png").is_file() and (tmp_path / "out" / "astronaut.jpg").is_file()


def test_infer_non_utf8_file_names(cli, tmp_path, astronaut, ckpts):
    inp = os.fsencode(tmp_path / "in")
    os.mkdir(inp)
    write(inp + b"/caf\xe9.jpg", jpeg_bytes(astronaut))
    write(inp + b"/notes\xff.jpg", b"not a picture\n")
    out = tmp_path / "out"
    result = cli("infer", inp, out, "--checkpoint", ckpts["plain"], "--device", "cpu").ok()
    assert os.path.getsize(os.fsencode(out) + b"/caf\xe9.jpg") > 0
    (row,) = read_csv_rows(out / "skipped.csv")
    assert row["file"] == os.fsdecode(b"notes\xff.jpg") and row["reason"] == "not an image"
    assert "notes" in result.stdout and leftovers(out) == []


# ------------------------------------------------------------------------ mask maps: infer, eval, train

@pytest.fixture(scope="module")
def masked_astronaut(astronaut) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(astronaut.shape[:2], np.uint8)
    mask[125:170, 180:262] = 255  # lower half of the face (dlib box 175,76 - 265,166)
    masked = astronaut.copy()
    masked[mask > 0] = (40, 90, 210)
    return masked, mask


def test_infer_bad_mask_maps(cli, tmp_path, ckpts, masked_astronaut):
    masked, mask = masked_astronaut
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    for name in ("good", "wrongsize", "soft", "nomap", "textmap", "emptymap"):
        write(inp / f"{name}.png", png_bytes(masked))
    write(maps / "good.png", png_bytes(mask))
    write(maps / "wrongsize.png", png_bytes(mask[:300, :200]))
    soft = mask.copy()
    soft[mask > 0] = 128  # a soft (anti-aliased / JPEG-like) map: not binary
    write(maps / "soft.png", png_bytes(soft))
    write(maps / "textmap.png", b"not a mask\n")
    write(maps / "emptymap.png", png_bytes(np.zeros_like(mask)))
    # HOG only: the face is then located from the supplied map (the CNN fallback would find it itself)
    result = cli("infer", inp, out, "--checkpoint", ckpts["plain"], "--masks", maps, "--device", "cpu",
                 "--detector", "hog").ok()
    rows = {r["file"]: r for r in read_csv_rows(out / "skipped.csv")}
    assert {k: v["reason"] for k, v in rows.items()} == {
        "wrongsize.png": "mask size mismatch", "soft.png": "mask not binary", "nomap.png": "missing mask",
        "textmap.png": "not an image"}
    assert rows["wrongsize.png"]["detail"] == f"{maps / 'wrongsize.png'}: mask map is 200x300, image is 512x512"
    assert rows["soft.png"]["detail"].startswith(f"{maps / 'soft.png'}: mask map is not binary")
    assert rows["nomap.png"]["detail"] == f"{inp / 'nomap.png'}: no mask map nomap.* in {maps}"
    assert rows["textmap.png"]["detail"].startswith(f"{maps / 'textmap.png'}: ")
    assert sorted(p.name for p in out.iterdir()) == [".unmask-infer.json", "emptymap.png", "good.png", "skipped.csv"]
    # an empty map: no mask to locate the (masked, undetectable) face from, so the photo is copied
    assert (out / "emptymap.png").read_bytes() == (inp / "emptymap.png").read_bytes()
    assert "│   emptymap.png " in result.stdout and "located from the mask map" in result.stdout
    assert leftovers(out) == []


@pytest.fixture(scope="module")
def bad_eval_folder(prepared) -> tuple[Path, dict[str, Path]]:
    """The prepared set with six broken samples: wrong-size / soft / missing map, 0-byte, text and truncated
    images. Returns (folder, stem -> broken file)."""
    _, out, records, _ = prepared
    root = out.parent / "eval_bad"
    shutil.copytree(out, root)
    s = [r["stem"] for r in records]
    broken = {
        s[1]: root / MASK_DIR / f"{s[1]}.png",
        s[2]: root / MASK_DIR / f"{s[2]}.png",
        s[3]: root / MASK_DIR,
        s[4]: root / MASKED_DIR / f"{s[4]}.png",
        s[5]: root / MASKED_DIR / f"{s[5]}.png",
        s[6]: root / ORIGINAL_DIR / f"{s[6]}.png",
    }
    m = read_image(broken[s[1]])[:, :, 0]
    write(broken[s[1]], png_bytes(m[: SIZE // 2]))
    soft = m.copy()
    soft[m > 0] = 200
    write(broken[s[2]], png_bytes(soft))
    (root / MASK_DIR / f"{s[3]}.png").unlink()
    write(broken[s[4]], b"")
    write(broken[s[5]], b"plain text, not a PNG\n")
    write(broken[s[6]], half(broken[s[6]].read_bytes()))
    return root, broken


def test_eval_skips_broken_samples(cli, bad_eval_folder, ckpts, tmp_path):
    root, broken = bad_eval_folder
    out = tmp_path / "report"
    result = cli("eval", "--checkpoint", ckpts["plain"], "--data", root, "--split", "all", "--out", out,
                 "--device", "cpu", "--baselines", "masked", "--sheet-images", "2", "--max-images", "9").ok()
    doc = json.loads((out / "metrics.json").read_text())
    errors = {s["stem"]: s["error"] for s in doc["skipped"]}
    assert set(errors) == set(broken)
    expect = {0: "mask map is 64x32, image is 64x64", 1: "mask map is not binary", 2: "missing mask_maps/",
              3: "empty file (0 bytes)", 4: "not an image", 5: "truncated"}
    for i, (stem, path) in enumerate(broken.items()):
        assert errors[stem].startswith(f"{path}: ") and expect[i] in errors[stem], errors[stem]
    assert doc["n_images"] == 9 - 6 and [r["stem"] for r in doc["per_image"]] == ["000000", "000007", "000008"]
    assert "6 unreadable sample(s) skipped (listed in metrics.json)" in result.stdout
    assert leftovers(out) == []


def test_train_on_broken_samples_is_one_line(cli, bad_eval_folder, tmp_path):
    root, broken = bad_eval_folder
    result = cli("train", "-c", QUICK, "--data", root, "--runs", tmp_path / "runs", "--device", "cpu", *TINY_NETS,
                 "--set", "train.epochs=1")
    line = result.error_line()
    assert any(line.startswith(f"error: {path}") for path in broken.values()), line
    assert leftovers(tmp_path / "runs") == []


def test_eval_folder_with_non_ascii_names(cli, prepared, ckpts, tmp_path):
    """A hand-made folder (no manifest) whose files have UTF-8 and non-UTF-8 names: all evaluated."""
    _, out, _, _ = prepared
    root = tmp_path / "bare"
    names = {"000002": b"000002", "000003": b"jos\xc3\xa9", "000004": b"caf\xe9"}  # UTF-8, Latin-1 bytes
    for sub in (ORIGINAL_DIR, MASKED_DIR, MASK_DIR):
        (root / sub).mkdir(parents=True)
        for stem, name in names.items():
            write(os.fsencode(root / sub) + b"/" + name + b".png", (out / sub / f"{stem}.png").read_bytes())
    report = tmp_path / "report"
    cli("eval", "--checkpoint", ckpts["plain"], "--data", root, "--split", "all", "--out", report,
        "--device", "cpu", "--baselines", "masked", "--sheet-images", "3").ok()
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["n_images"] == 3 and doc["skipped"] == []
    rows = read_csv_rows(report / "per_image.csv")
    assert sorted({r["stem"] for r in rows}) == sorted(os.fsdecode(n) for n in names.values())
    assert leftovers(report) == []


# --------------------------------------------------------------------------------- configuration

YAML_CASES = {
    "typo key": ("train:\n  epoch: 3\n", ["unknown config key 'train.epoch'", "did you mean 'epochs'?"]),
    "wrong type": ("train:\n  batch_size: sixteen\n", ["train.batch_size must be int, got 'sixteen'"]),
    "section not a mapping": ("model: 64\n", ["model must be a mapping of settings"]),
    "python tag": ("train: !!python/object/apply:os.system ['touch {marker}']\n", ["invalid YAML"]),
    "python object": ("model: !!python/object:unmask_cli.config.ModelConfig {{ngf: 1}}\n", ["invalid YAML"]),
    "not YAML": ("train: [1, 2\n", ["invalid YAML"]),
}


@pytest.mark.parametrize("command", ["prepare", "train"])
@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_config_file_is_one_line_exit_2(cli, tmp_path, command, case):
    marker = tmp_path / "pwned"
    text, fragments = YAML_CASES[case]
    config = tmp_path / "my config.yaml"
    config.write_text(text.format(marker=marker))
    args = ["--out", tmp_path / "out"] if command == "prepare" else ["--runs", tmp_path / "runs"]
    line = cli(command, "-c", config, *args).error_line(code=2)
    assert line.startswith(f"error: {config}: ")
    for fragment in fragments:
        assert fragment in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_bad_set_override_is_one_line_exit_2(cli, tmp_path, command):
    args = ["--out", tmp_path / "out"] if command == "prepare" else ["--runs", tmp_path / "runs"]
    line = cli(command, "--set", "train.epochs=three", *args).error_line(code=2)
    assert line == "error: --set train.epochs=three: train.epochs must be int, got 'three' (str)"
    line = cli(command, "--set", "modle.ngf=8", *args).error_line(code=2)
    assert "unknown config key 'modle'" in line and "did you mean 'model'?" in line


# ----------------------------------------------------------------------------------- checkpoints

CKPT_MESSAGES = {
    "truncated": "cannot load checkpoint: truncated or corrupt file",
    "empty": "checkpoint is empty (0 bytes)",
    "text": "not a PyTorch file (expected a checkpoint written by torch.save)",
    "bare_state_dict": "not an unmask checkpoint",
    "arch_mismatch": "checkpoint does not match the network 'G'",
    "size_mismatch": "checkpoint does not match the network 'G'",
    "other_model": "checkpoint does not match the network 'G'",
    "future_alignment": "checkpoint was trained on faces aligned with 'landmarks-3d', which this unmask does not know",
    "no_version": "checkpoint has no format version (its 'version' entry is missing)",
    "nan_weights": "checkpoint holds non-finite weights (NaN or infinity) in the generator: ",
    "truncated_release": "release file is truncated or damaged: ",
}


def _run_with_checkpoint(cli, command: str, ckpt: Path, tmp_path: Path, data: Path, *extra: str):
    if command == "infer":
        (tmp_path / "in").mkdir(exist_ok=True)
        return cli("infer", tmp_path / "in", tmp_path / "out", "--checkpoint", ckpt, "--device", "cpu", *extra)
    if command == "eval":
        return cli("eval", "--checkpoint", ckpt, "--data", data, "--split", "all", "--out", tmp_path / "out",
                   "--device", "cpu", *extra)
    return cli("train", "-c", QUICK, "--data", data, "--runs", tmp_path / "runs", "--name", "r", "--resume", ckpt,
               "--device", "cpu", *TINY_NETS, *extra)


@pytest.mark.parametrize("command", ["infer", "eval"])
@pytest.mark.parametrize("kind", list(CKPT_MESSAGES))
def test_bad_checkpoint_infer_eval(cli, ckpts, prepared, tmp_path, command, kind):
    line = _run_with_checkpoint(cli, command, ckpts[kind], tmp_path, prepared[1]).error_line()
    assert line.startswith(f"error: {ckpts[kind]}: ") and CKPT_MESSAGES[kind] in line
    assert "If you are seeing this error" not in line and len(line) < 300  # torch's advice cut mid-sentence
    if kind == "truncated_release":  # a whole sentence: what is wrong, the sizes, what to do
        size = ckpts[kind].stat().st_size
        whole = json.loads(ckpts[kind].with_suffix(".json").read_text())["bytes"]
        assert line.endswith(f"{size:,} bytes on disk, {whole:,} in model.json; reinstall or re-export it"), line
    assert not (tmp_path / "out").exists()


TRAIN_RESUME = {
    # checkpoint, extra --set, expected message
    "truncated": ("truncated", [], "cannot load checkpoint: truncated or corrupt file"),
    "empty": ("empty", [], "checkpoint is empty (0 bytes)"),
    "bare_state_dict": ("bare_state_dict", [], "not an unmask checkpoint"),
    "ngf 8 checkpoint, ngf 16 config": ("plain", ["--set", "model.ngf=16"],
                                        "checkpoint is for another network/size (model.ngf=8 in the checkpoint, 16 now)"),
    "64 px checkpoint, 128 px config": ("plain", ["--set", "data.image_size=128"],
                                        "(data.image_size=64 in the checkpoint, 128 now)"),
    "weights of another model": ("other_model", [], "checkpoint does not match the network 'G'"),
    "no training state": ("plain", [], "checkpoint has no optimizer state for 'G'"),
    "ffhq-aligned checkpoint, visible-aligned data": (
        "legacy_alignment", [], "checkpoint was trained on faces with the 'ffhq' alignment and crop 1, but "),
}


@pytest.mark.parametrize("case", list(TRAIN_RESUME))
def test_bad_checkpoint_train_resume(cli, ckpts, prepared, tmp_path, case):
    kind, extra, message = TRAIN_RESUME[case]
    line = _run_with_checkpoint(cli, "train", ckpts[kind], tmp_path, prepared[1], *extra).error_line()
    assert line.startswith(f"error: {ckpts[kind]}: ") and message in line
    assert not list(tmp_path.rglob("runs/**/*.pt")) and not list(tmp_path.rglob("runs/**/*.unmask-tmp-*"))


TRAIN_INIT = {
    # checkpoint given as train.init, extra --set, expected message
    "truncated": ("truncated", [], "cannot load checkpoint: truncated or corrupt file"),
    "empty": ("empty", [], "checkpoint is empty (0 bytes)"),
    "not a checkpoint": ("text", [], "not a PyTorch file"),
    "another width": ("plain", ["--set", "model.ngf=16"], "checkpoint is for another network/size"),
    "weights of another model": ("other_model", [], "checkpoint does not match the network 'G'"),
}


@pytest.mark.parametrize("case", list(TRAIN_INIT))
def test_bad_train_init_is_one_line(cli, ckpts, prepared, tmp_path, case):
    kind, extra, message = TRAIN_INIT[case]
    line = cli("train", "-c", QUICK, "--data", prepared[1], "--runs", tmp_path / "runs", "--name", "r",
               "--device", "cpu", *TINY_NETS, "--set", f"train.init={ckpts[kind]}", *extra).error_line()
    assert line.startswith(f"error: {ckpts[kind]}: ") and message in line
    assert not list(tmp_path.rglob("runs/**/*.pt"))


BAD_OPTIONS = {  # infer option, value, the one line (exit 2): the option, the rule and the value given
    "min-mask-area 1.5": ("--min-mask-area", "1.5", "infer.min_mask_area must be in [0, 1), got 1.5"),
    "min-mask-area -0.1": ("--min-mask-area", "-0.1", "infer.min_mask_area must be in [0, 1), got -0.1"),
    "threshold 1.5": ("--threshold", "1.5", "infer.threshold must be in (0, 1), got 1.5"),
    "threshold 0": ("--threshold", "0", "infer.threshold must be in (0, 1), got 0.0"),
    "batch-size 0": ("--batch-size", "0", "infer.batch_size must be >= 1, got 0"),
    "jpeg-quality 101": ("--jpeg-quality", "101", "infer.jpeg_quality must be in [1, 100] (null = matched to the "
                                                  "input), got 101"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_value_is_one_line_naming_it_exit_2(cli, tmp_path, case):
    option, value, message = BAD_OPTIONS[case]
    (tmp_path / "in").mkdir()
    line = cli("infer", tmp_path / "in", tmp_path / "out", option, value).error_line(code=2)
    assert line == f"error: {option}: {message}"
    line = cli("infer", tmp_path / "in", tmp_path / "out", "--set", f"infer.{option[2:].replace('-', '_')}={value}"
               ).error_line(code=2)
    assert line == f"error: --set infer.{option[2:].replace('-', '_')}={value}: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--degrade", "--backdrop"])
def test_bad_prepare_share_is_one_line_naming_it_exit_2(cli, tmp_path, option):
    key = f"prepare.{option[2:]}"
    line = cli("prepare", "--out", tmp_path / "data", option, "1.5").error_line(code=2)
    assert line == f"error: {option}: {key} must be in [0, 1], got 1.5"
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------- untrusted files

@pytest.mark.parametrize("how", ["torch", "pickle"])
@pytest.mark.parametrize("command", ["infer", "eval", "train"])
def test_checkpoint_with_code_is_refused_and_never_run(cli, prepared, tmp_path, command, how):
    marker = tmp_path / f"pwned_{command}_{how}"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker, how)
    line = _run_with_checkpoint(cli, command, evil, tmp_path, prepared[1]).error_line()
    assert line.startswith(f"error: {evil}: cannot load checkpoint: ")
    if how == "torch":
        assert "refused: the file references Python code (posix.system)" in line
    assert not marker.exists()


def test_unsafe_stems_are_refused(tmp_path):
    for good in ("000042", "img_001", "a.b-c", "josé", "caf\udce9"):
        assert check_stem(good, tmp_path) == good
    for bad in ("../escape", "/etc/passwd", "a/b", "..", "x/../../y", "", "a\\b", ".hidden", "nul\x00", 7, None):
        with pytest.raises(UnmaskError) as info:
            check_stem(bad, tmp_path / MANIFEST)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / MANIFEST}: unsafe sample name {bad!r}") and "\n" not in message


@pytest.fixture(scope="module")
def escaping_manifests(prepared) -> dict[str, Path]:
    _, out, records, _ = prepared
    folders = {}
    for name, stem in (("dotdot", "../../outside"), ("absolute", "/etc/passwd"), ("slash", "sub/000000")):
        root = out.parent / f"escape_{name}"
        shutil.copytree(out, root)
        lines = (root / MANIFEST).read_text().splitlines(keepends=True)
        lines[3] = json.dumps({**json.loads(lines[3]), "stem": stem}) + "\n"
        (root / MANIFEST).write_text("".join(lines))
        folders[stem] = root
    return folders


def test_read_manifest_refuses_escaping_stems(escaping_manifests):
    for stem, root in escaping_manifests.items():
        with pytest.raises(UnmaskError) as info:
            read_manifest(root)
        assert str(info.value).startswith(f"{root / MANIFEST}: unsafe sample name {stem!r} (")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_escaping_manifest_is_one_line_error(cli, ckpts, escaping_manifests, tmp_path, command):
    for stem, root in escaping_manifests.items():
        if command == "eval":
            result = cli("eval", "--checkpoint", ckpts["plain"], "--data", root, "--split", "all", "--out",
                         tmp_path / "out", "--device", "cpu")
        else:
            result = cli("train", "-c", QUICK, "--data", root, "--runs", tmp_path / "runs", "--device", "cpu",
                         *TINY_NETS)
        assert result.error_line().startswith(f"error: {root / MANIFEST}: unsafe sample name {stem!r} (")
        assert not (tmp_path / "out").exists()


def test_eps_source_never_runs_ghostscript(tmp_path, astronaut):
    """A fake ``gs`` first on PATH records any call: decoding an untrusted .eps must not run it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs_was_run"
    (bin_dir / "gs").write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo 10.02.1 && exit 0\ntouch {marker}\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    write(src / "figure.eps", EPS)
    result = cold_cli("prepare", "--source", src, "--out", tmp_path / "out", "--num-samples", "2", "--size",
                      str(SIZE), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    result.ok()  # every source is read before faces are reused
    assert not marker.exists(), "Ghostscript was run on an untrusted .eps file"


# --------------------------------------------------------------------------------- output folders

def test_output_inside_input_is_refused(cli, tmp_path, astronaut, ckpts):
    src = tmp_path / "photos"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "out"):
        line = cli("infer", src, out, "--checkpoint", ckpts["plain"], "--device", "cpu").error_line()
        assert line.startswith(f"error: {out}: output folder must not be the input folder or inside it")
    for out in (src / "prepared", src):
        line = cli("prepare", "--source", src, "--out", out, "--size", str(SIZE), "--num-samples", "1").error_line()
        assert line == f"error: {out}: output folder must not be inside the source folder"
    assert sorted(p.name for p in src.iterdir()) == before


WRITE_COMMANDS = ["prepare", "infer", "eval", "train"]


def _run_writer(cli, command: str, out: Path, inputs: dict, **kwargs):
    if command == "prepare":
        return cli("prepare", "--source", inputs["src"], "--out", out, "--num-samples", "2", "--size", str(SIZE),
                   **kwargs)
    if command == "infer":
        return cli("infer", inputs["src"], out, "--checkpoint", inputs["ckpt"], "--device", "cpu", **kwargs)
    if command == "eval":
        return cli("eval", "--checkpoint", inputs["ckpt"], "--data", inputs["data"], "--split", "all", "--out", out,
                   "--device", "cpu", "--max-images", "2", "--baselines", "masked", **kwargs)
    return cli("train", "-c", QUICK, "--data", inputs["data"], "--runs", out, "--name", "r", "--device", "cpu",
               *TINY_NETS, "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", **kwargs)


@pytest.fixture(scope="module")
def writer_inputs(tmp_path_factory, astronaut, ckpts, prepared) -> dict:
    """Inputs of the output-folder tests: a photo folder, a checkpoint and a prepared dataset."""
    root = tmp_path_factory.mktemp("writers")
    (root / "src").mkdir()
    write(root / "src" / "astronaut.jpg", jpeg_bytes(astronaut))
    return {"src": root / "src", "ckpt": ckpts["plain"], "data": prepared[1], "root": root}


@pytest.mark.parametrize("command", WRITE_COMMANDS)
def test_output_under_a_regular_file(cli, writer_inputs, tmp_path, command):
    """The output path's parent is a file (e.g. a typo): one line, nothing written."""
    blocker = write(tmp_path / "results.txt", b"some file\n")
    line = _run_writer(cli, command, blocker / "out", writer_inputs).error_line()
    assert line.startswith(f"error: {blocker / 'out'}") and "Not a directory" in line
    assert blocker.read_bytes() == b"some file\n"


@contextlib.contextmanager
def read_only(folder: Path):
    """Mode 0555 (root is held to it by CliServer(unprivileged=True)); restored afterwards."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", WRITE_COMMANDS)
def test_output_in_read_only_folder(cli, writer_inputs, tmp_path, command):
    """The output folder would be created inside a folder the user cannot write to."""
    with read_only(tmp_path / "locked") as locked:
        line = _run_writer(cli, command, locked / "out", writer_inputs, unprivileged=True).error_line()
        assert line.startswith(f"error: {locked / 'out'}") and "Permission denied" in line
        assert list(locked.iterdir()) == []


def test_infer_into_read_only_folder(cli, writer_inputs, tmp_path):
    with read_only(tmp_path / "locked") as locked:
        line = _run_writer(cli, "infer", locked, writer_inputs, unprivileged=True).error_line()
        assert line == f"error: {locked / 'astronaut.jpg'}: cannot write (Permission denied)"
        assert list(locked.iterdir()) == []


def test_unreadable_file(cli, writer_inputs, tmp_path, astronaut):
    """A photo the user may not read (mode 000): skipped as 'unreadable' by prepare and infer, the rest done."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "astronaut.jpg", jpeg_bytes(astronaut))
    write(src / "locked.jpg", jpeg_bytes(astronaut)).chmod(0)
    result = cli("prepare", "--source", src, "--out", tmp_path / "p", "--num-samples", "2", "--size", str(SIZE),
                 unprivileged=True).ok()
    (row,) = read_csv_rows(tmp_path / "p" / "skipped.csv")
    assert (row["source"], row["reason"], row["detail"]) == ("locked.jpg", "unreadable",
                                                             f"{src / 'locked.jpg'}: permission denied")
    assert "skipped: unreadable" in result.stdout
    assert [r["source"] for r in read_manifest(tmp_path / "p")] == ["astronaut.jpg"] * 2
    cli("infer", src, tmp_path / "i", "--checkpoint", writer_inputs["ckpt"], "--device", "cpu", unprivileged=True).ok()
    (row,) = read_csv_rows(tmp_path / "i" / "skipped.csv")
    assert (row["file"], row["reason"], row["detail"]) == ("locked.jpg", "unreadable",
                                                           f"{src / 'locked.jpg'}: permission denied")
    assert (tmp_path / "i" / "astronaut.jpg").stat().st_size > 0


@pytest.mark.parametrize("command", WRITE_COMMANDS)
def test_full_disk_is_one_line(cli, writer_inputs, tmp_path, command):
    """RLIMIT_FSIZE makes any write past 4000 bytes fail (EFBIG), like a full disk: one line naming the
    file, no temporary or partial file left behind."""
    out = tmp_path / "out"
    line = _run_writer(cli, command, out, writer_inputs, fsize=4000).error_line()
    assert line.startswith(f"error: {out}/") and "(File too large)" in line
    assert leftovers(out) == []


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", WRITE_COMMANDS)
def test_full_disk_keeps_the_previous_files(cli, writer_inputs, tmp_path, command):
    """Issue 22 item 3: a rerun into a folder that holds a previous run's results, with the file-size limit
    of a full disk: one line naming the file that could not be written and why, and that file (and every
    other one written before) is still the previous, complete one."""
    from unmask_cli.checkpoints import Checkpoint

    out = tmp_path / "out"
    _run_writer(cli, command, out, writer_inputs).ok()
    before = _hashes(out)
    if command == "prepare":  # two more samples
        result = cli("prepare", "--source", writer_inputs["src"], "--out", out, "--num-samples", "4", "--size",
                     str(SIZE), fsize=4000)
    elif command == "train":  # one more epoch; the limit lets the small files through, not the checkpoint
        result = cli("train", "-c", QUICK, "--data", writer_inputs["data"], "--runs", out, "--name", "r", "--device",
                     "cpu", *TINY_NETS, "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=1",
                     fsize=(out / "r" / "last.pt").stat().st_size // 2)
    elif command == "infer":  # made again
        result = cli("infer", writer_inputs["src"], out, "--checkpoint", writer_inputs["ckpt"], "--device", "cpu",
                     "--overwrite", fsize=4000)
    else:
        result = _run_writer(cli, command, out, writer_inputs, fsize=4000)
    line = result.error_line()
    assert line.startswith(f"error: {out}/") and line.endswith("(File too large)"), line
    failed = Path(line[len("error: "):].split(": ", 1)[0])
    name = str(failed.relative_to(out))
    if name in before:  # the file it could not replace is the previous one, byte for byte
        assert hashlib.sha256(failed.read_bytes()).hexdigest() == before[name]
    assert leftovers(out) == []
    after = _hashes(out)
    assert set(before) <= set(after)
    for rel in before:  # every file is still complete: the previous one, or a whole new one
        if rel.endswith(".png") or rel.endswith(".jpg"):
            read_image(out / rel)
        elif rel.endswith(".json"):
            json.loads((out / rel).read_text())
    if command == "train":
        assert name == "r/last.pt" and Checkpoint.load(out / "r" / "last.pt").epoch == 1
    if command == "prepare":
        assert len(read_manifest(out)) == 2 and after["manifest.jsonl"] == before["manifest.jsonl"]
    if command == "infer":
        assert name == "astronaut.jpg"


def test_infer_on_an_empty_folder_warns_and_succeeds(cli, tmp_path, ckpts):
    """Issue 22 item 6.7: nothing failed (exit 0), but the summary says there was nothing to do."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"not shown")
    result = cli("infer", tmp_path / "in", tmp_path / "out", "--checkpoint", ckpts["plain"], "--device", "cpu").ok()
    assert "IN_DIR holds no files: nothing to do" in result.stdout and "0 file(s)" in result.stdout


def test_ctrl_c_during_infer_is_one_line_and_a_rerun_finishes(cli, tmp_path, face_tile, ckpts):
    """Issue 22 item 6.9: SIGINT once the progress has started (outputs are being written): one
    'interrupted' line, exit 130, no partial file; the rerun keeps what was done and does the rest."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    count = 200  # one face per batch: outputs appear one by one, and most are still to come at the interrupt
    # (even when a busy machine lets this process poll only now and then)
    for i in range(count):
        write(src / f"p{i:03d}.jpg", jpeg_bytes(face_tile, quality=80 + i % 10))
    running = cli.start("infer", src, out, "--checkpoint", ckpts["plain"], "--device", "cpu", "--batch-size", "1")
    deadline = time.monotonic() + 240
    while not list(out.glob("p*.jpg")) and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(running.pid, signal.SIGINT)
    result = running.wait()
    assert result.code == 130 and result.err_lines == ["interrupted"], result.describe()
    assert leftovers(out) == []
    done = sorted(p.name for p in out.glob("p*.jpg"))
    assert 0 < len(done) < count, "the run ended before the interrupt: give it more photos"
    again = cli("infer", src, out, "--checkpoint", ckpts["plain"], "--device", "cpu").ok()
    assert sorted(p.name for p in out.glob("p*.jpg")) == [f"p{i:03d}.jpg" for i in range(count)]
    # the outputs written before the interrupt were recorded then: kept, not redone
    assert f"already done (skipped) │ {len(done)} │" in " ".join(again.stdout.split()), again.stdout
    for i in range(count):
        assert read_image(out / f"p{i:03d}.jpg").shape == face_tile.shape


# ------------------------------------------------------------------------------------ shared photos

def test_shared_rgba_and_small_face_photos(shared_faces, tmp_path):
    """Real odd photos from ../shared/faces: a 32-bit RGBA PNG and a 240p photo (63 px face)."""
    from unmask_cli.config import PrepareConfig
    from unmask_cli.prepare import run_prepare

    src = tmp_path / "src"
    src.mkdir()
    for name in ("32bit.png", "obama-240p.jpg"):
        shutil.copy(shared_faces / name, src / name)
    summary = run_prepare(PrepareConfig(source=src, num_samples=2, size=SIZE), tmp_path / "out")
    assert summary.faces == 2 and not summary.skipped
