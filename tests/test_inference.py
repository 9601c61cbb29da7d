"""``unmask infer`` end to end on real portraits with synthetic masks and a tiny (untrained) checkpoint.

The checkpoint is a ``Checkpoint`` as training writes one (64 px, ngf 8, nmf 8,
map module on). An untrained generator outputs ~mid-grey, far from the blue mask colour used here, so
"the pixels inside each mask changed" proves every masked face went through the network; the map
module's head bias is set to +-10 to make its prediction deterministic (all masked / nothing masked).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask_cli.config import InferConfig, load_config
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import read_image, read_mask
from unmask_cli.inference import fold_batchnorm, run_infer, summary_table

SHARED = Path(__file__).resolve().parents[2] / "shared"
MASK_RGB = (40, 90, 210)  # far from the ~mid-grey output of an untrained generator


# ------------------------------------------------------------------------------------------- fixtures

def _randomise_bn(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, as after training (so folding them is really tested)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.05)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(1 + torch.randn(n, generator=gen) * 0.1)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.05)


def _write_checkpoint(path: Path, map_module: bool = True, map_bias: float | None = None,
                      alignment: str | None = "visible", crop: float = 1.0) -> Path:
    """``alignment`` None: a checkpoint from before alignments were recorded (trained on ffhq crops)."""
    from unmask_cli.checkpoints import Checkpoint
    from unmask_cli.config import Config
    from unmask_cli.models import build_networks

    cfg = Config()
    cfg.data.image_size = 64
    cfg.model.ngf = cfg.model.ndf = cfg.model.nmf = 8
    cfg.model.map_module = map_module
    cfg.loss.vgg_weights = "random"
    torch.manual_seed(0)
    nets = build_networks(cfg)
    gen = torch.Generator().manual_seed(1)
    for net in nets.values():
        _randomise_bn(net, gen)
    if map_bias is not None:
        nets["M"].head.bias.data.fill_(map_bias)
    Checkpoint(config=cfg.to_dict(), networks={k: v.state_dict() for k, v in nets.items()}, epoch=1,
               global_step=1, best_psnr=0.0, best_epoch=0, vgg="random",
               crop=crop, **({"alignment": alignment} if alignment is not None else {})).save(path)
    return path


def _cfg(checkpoint, **settings) -> InferConfig:
    """The ``infer`` config of a test run; paths as strings, as a YAML file or the CLI gives them."""
    return InferConfig(checkpoint=str(checkpoint),
                       **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})


# Tests of the --masks path (faces located from the supplied maps where the detector misses them) name the
# HOG detector, which misses the masked faces drawn here (test_detectors_on_a_masked_face checks that).
HOG = "hog"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "plain": _write_checkpoint(root / "plain.pt"),
        "no_map": _write_checkpoint(root / "no_map.pt", map_module=False),
        "map_all": _write_checkpoint(root / "map_all.pt", map_bias=10.0),
        "map_none": _write_checkpoint(root / "map_none.pt", map_bias=-10.0),
        "map_all_legacy": _write_checkpoint(root / "map_all_legacy.pt", map_bias=10.0, alignment=None),
        "map_all_tight": _write_checkpoint(root / "map_all_tight.pt", map_bias=10.0, crop=0.7),
    }


@pytest.fixture(scope="module")
def aligner():
    """HOG + ffhq: finds the unmasked faces the masks are drawn on (and misses the masked ones)."""
    from unmask_cli.inference import _aligner

    return _aligner(None, "hog", "ffhq")


def _mask_polygon(landmarks: np.ndarray) -> np.ndarray:
    """A surgical-mask-like polygon: the jaw line (points 1-15) closed over the nose bridge (point 28)."""
    return np.concatenate([landmarks[1:16], landmarks[[28]]]).round().astype(np.int32)


def _draw_masks(image: np.ndarray, polygons: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    masked, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    for poly in polygons:
        cv2.fillPoly(masked, [poly], MASK_RGB)
        cv2.fillPoly(mask, [poly], 255)
    return masked, mask


def _masked_photo(aligner, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list]:
    """Mask every face found on the unmasked photo: (masked, map 0/255, per-face polygons, faces)."""
    faces = aligner.detect(image)
    polys = [_mask_polygon(f.landmarks) for f in faces]
    masked, mask = _draw_masks(image, polys)
    return masked, mask, polys, faces


def _png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, compress_level=1)
    return path


def _jpeg(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=92)
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _far_from(mask: np.ndarray, distance: float) -> np.ndarray:
    """Pixels farther than ``distance`` px from every masked pixel."""
    import cv2

    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5) > distance


def _poly_region(shape: tuple[int, int], poly: np.ndarray, erode: int = 3) -> np.ndarray:
    import cv2

    region = np.zeros(shape, np.uint8)
    cv2.fillPoly(region, [poly], 1)
    return cv2.erode(region, np.ones((2 * erode + 1,) * 2, np.uint8)) > 0


def _check_photo(inp: np.ndarray, out: np.ndarray, mask: np.ndarray, polys, faces, share: float = 0.9) -> None:
    """Same size, untouched far from the masks, every masked face changed inside its mask (at least
    ``share`` of its pixels: the crop may end before a wide mask does)."""
    assert out.shape == inp.shape
    face_width = max(f.box[2] - f.box[0] for f in faces)
    far = _far_from(mask > 0, 0.5 * face_width)
    assert far.mean() > 0.3
    assert np.array_equal(out[far], inp[far]), "pixels far from the faces changed"
    for poly in polys:
        inside = _poly_region(mask.shape, poly)
        diff = np.abs(out[inside].astype(int) - inp[inside].astype(int)).sum(axis=1)
        assert (diff > 30).mean() > share, "a masked face was not unmasked"


# ------------------------------------------------------------------------------------- fast network

def test_folded_batchnorm_matches_eager_fp32():
    from unmask_cli.models import MapModule, UNetGenerator

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    G = UNetGenerator(4, 3, ngf=16, image_size=64)  # PyTorch default init: larger activations than N(0, 0.02)
    M = MapModule(3, nmf=8, image_size=64)
    for net in (G, M):
        _randomise_bn(net, gen)
        net.eval()
    x = torch.rand(3, 4, 64, 64) * 2 - 1
    x[:, 3] = (x[:, 3] > 0).float()
    fused_G, fused_M = fold_batchnorm(G), fold_batchnorm(M)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused_G.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused_M.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())  # the original is untouched
    with torch.no_grad():
        ref, out = G(x), fused_G(x.contiguous(memory_format=torch.channels_last))
        assert ref.abs().max() > 0.05  # a real signal, not a near-zero output
        assert (ref - out).abs().max().item() < 1e-4
        ref_m, out_m = M(x[:, :3]), fused_M(x[:, :3])
        assert (ref_m - out_m).abs().max().item() < 1e-4 * max(1.0, ref_m.abs().max().item())


def test_paste_in_the_face_rectangle_equals_paste_back_on_the_whole_photo(aligner, astronaut):
    import cv2

    from unmask_cli.faces import paste_back
    from unmask_cli.inference import _Item, _paste_face

    face = aligner.detect(astronaut)[0]
    rng = np.random.default_rng(0)
    for size in (64, 300):
        aligned = aligner.align(astronaut, face, size)
        crop, matrix = aligned.image, aligned.matrix
        edited = rng.integers(0, 256, crop.shape, dtype=np.uint8)
        yy, xx = np.mgrid[:size, :size]
        region = ((xx - size / 2) ** 2 / (0.3 * size) ** 2 + (yy - 0.72 * size) ** 2 / (0.2 * size) ** 2) < 1
        item = _Item(path=Path("x.png"), key="x", output=Path("y.png"), image=astronaut, photo_map=None)
        item.result, item.used_map = astronaut.copy(), np.zeros(astronaut.shape[:2], bool)
        _paste_face(item, edited, region, matrix, save_masks=True)
        full = paste_back(astronaut, edited, matrix, region=region)
        diff = np.abs(full.astype(int) - item.result.astype(int))
        assert (full != astronaut).any(axis=2).sum() > 1000
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # fixed-point warp rounding only
        back = cv2.warpAffine(region.astype(np.uint8), cv2.invertAffineTransform(matrix), (512, 512),
                              flags=cv2.INTER_NEAREST) > 0
        assert np.array_equal(item.used_map, back)


# --------------------------------------------------------------------------------------- aligned mode

def _aligned_crop(aligner, astronaut, size: int = 150):
    import cv2

    from unmask_cli.faces import quad_matrix, transform_points

    face = aligner.detect(astronaut)[0]
    matrix = quad_matrix(aligner.quad(face), size)
    crop = cv2.warpAffine(astronaut, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT_101)
    return crop, transform_points(face.landmarks, matrix)


def test_aligned_supplied_maps_keep_outside_byte_identical(tmp_path, ckpts, aligner, astronaut, grace_hopper):
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    sources = {}
    for name, photo, size in (("astro", astronaut, 150), ("grace", grace_hopper, 96)):
        crop, lm = _aligned_crop(aligner, photo, size)
        masked, mask = _draw_masks(crop, [_mask_polygon(lm)])
        sources[name] = (masked, mask > 0)
        _png(inp / f"{name}.png", masked)
        _png(maps / f"{name}.png", mask)
    _jpeg(inp / "astro_q.jpg", sources["astro"][0])
    _png(maps / "astro_q.png", sources["astro"][1].astype(np.uint8) * 255)
    before_in, before_maps = _hashes(inp), _hashes(maps)

    summary = run_infer(_cfg(ckpts["plain"], masks=maps, aligned=True, save_masks=True, compare=True,
                             device="cpu", batch_size=2), inp, out)
    assert summary.processed == 3 and not summary.skipped_files and summary.mode == "aligned"
    for name, (masked, mask) in sources.items():
        result = read_image(out / f"{name}.png")
        assert result.shape == masked.shape
        assert np.array_equal(result[~mask], masked[~mask]), "pixels outside the mask must be byte-identical"
        diff = np.abs(result[mask].astype(int) - masked[mask].astype(int)).sum(axis=1)
        assert (diff > 30).mean() > 0.9
        assert np.array_equal(read_mask(out / "masks" / f"{name}.png"), mask)
        side = read_image(out / "compare" / f"{name}.jpg")
        assert side.shape == (masked.shape[0], 2 * masked.shape[1], 3)
    jpeg_out = out / "astro_q.jpg"
    assert jpeg_out.exists() and read_image(jpeg_out).shape == sources["astro"][0].shape
    assert _hashes(inp) == before_in and _hashes(maps) == before_maps


def test_infer_uses_the_ema_weights_of_a_checkpoint_that_has_them(tmp_path, ckpts, aligner, astronaut):
    import dataclasses

    from rich.console import Console

    from unmask_cli.checkpoints import Checkpoint

    ckpt = Checkpoint.load(ckpts["plain"])
    averaged = {k: v * 0.8 if v.is_floating_point() else v for k, v in ckpt.networks["G"].items()}
    with_ema = dataclasses.replace(ckpt, ema={"decay": 0.999, "updates": 7, "G": averaged}).save(tmp_path / "ema.pt")
    as_plain_g = dataclasses.replace(ckpt, networks={**ckpt.networks, "G": averaged}).save(tmp_path / "g.pt")
    crop, lm = _aligned_crop(aligner, astronaut, 64)
    masked, mask = _draw_masks(crop, [_mask_polygon(lm)])
    inp, maps = tmp_path / "in", tmp_path / "maps"
    inp.mkdir()
    maps.mkdir()
    _png(inp / "face.png", masked)
    _png(maps / "face.png", mask)

    outputs = {}
    for name, path in (("ema", with_ema), ("g", as_plain_g), ("plain", ckpts["plain"])):
        summary = run_infer(_cfg(path, masks=maps, aligned=True, device="cpu"), inp, tmp_path / name)
        outputs[name] = read_image(tmp_path / name / "face.png")
        if name == "ema":
            assert summary.weights == "EMA of G (decay 0.999, 7 updates)"
            console = Console(record=True, width=160)
            console.print(summary_table(summary))
            assert "EMA of G (decay 0.999, 7 updates)" in console.export_text()
    assert np.array_equal(outputs["ema"], outputs["g"]) and not np.array_equal(outputs["ema"], outputs["plain"])


def test_aligned_predicted_maps(tmp_path, ckpts, aligner, astronaut):
    crop, _ = _aligned_crop(aligner, astronaut, 128)
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "face.png", crop)

    everything = run_infer(_cfg(ckpts["map_all"], aligned=True, save_masks=True, device="cpu"),
                           inp, tmp_path / "all")
    assert everything.processed == 1 and everything.mask_source == "predicted"
    assert read_mask(tmp_path / "all" / "masks" / "face.png").all()
    changed = (read_image(tmp_path / "all" / "face.png") != crop).any(axis=2)
    assert changed.mean() > 0.9

    nothing = run_infer(_cfg(ckpts["map_none"], aligned=True, save_masks=True, device="cpu"),
                        inp, tmp_path / "none")
    assert nothing.processed == 0 and nothing.unchanged == 1
    assert (tmp_path / "none" / "face.png").read_bytes() == (inp / "face.png").read_bytes()
    assert not read_mask(tmp_path / "none" / "masks" / "face.png").any()


def test_same_stem_in_two_formats(tmp_path, ckpts, aligner, astronaut):
    crop, _ = _aligned_crop(aligner, astronaut, 64)
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "face.png", crop)
    _jpeg(inp / "face.jpg", crop)
    summary = run_infer(_cfg(ckpts["map_all"], aligned=True, save_masks=True, compare=True, device="cpu"),
                        inp, tmp_path / "out")
    assert summary.processed == 2
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                   if p.is_file() and not p.name.startswith("."))  # .unmask-infer.json: the rerun record
    assert names == ["compare/face.jpg.jpg", "compare/face.png.jpg", "face.jpg", "face.png",
                     "masks/face.jpg.png", "masks/face.png.png"]


def test_batching_across_files_matches_one_by_one(tmp_path, ckpts, aligner, astronaut, grace_hopper):
    import cv2

    inp, maps = tmp_path / "in", tmp_path / "maps"
    inp.mkdir()
    maps.mkdir()
    for i, (photo, size) in enumerate([(astronaut, 128), (grace_hopper, 100), (astronaut, 90), (grace_hopper, 64)]):
        crop, lm = _aligned_crop(aligner, photo, size)
        crop = cv2.flip(crop, 1) if i >= 2 else crop
        masked, mask = _draw_masks(crop, [_mask_polygon(lm if i < 2 else lm * [-1, 1] + [size - 1, 0])])
        _png(inp / f"{i}.png", masked)
        _png(maps / f"{i}.png", mask)
    one = run_infer(_cfg(ckpts["plain"], masks=maps, aligned=True, batch_size=1, device="cpu", fold_bn=False),
                    inp, tmp_path / "b1")
    many = run_infer(_cfg(ckpts["plain"], masks=maps, aligned=True, batch_size=3, device="cpu"),
                     inp, tmp_path / "b3")
    assert one.processed == many.processed == 4
    for i in range(4):
        a = read_image(tmp_path / "b1" / f"{i}.png").astype(int)
        b = read_image(tmp_path / "b3" / f"{i}.png").astype(int)
        assert np.abs(a - b).max() <= 1  # batched + folded + channels_last == one by one, plain (to rounding)


# ---------------------------------------------------------------------------------------- whole photos

def test_photo_with_supplied_map_png_jpeg_and_rerun(tmp_path, ckpts, aligner, astronaut):
    masked, mask, polys, faces = _masked_photo(aligner, astronaut)
    assert len(faces) == 1
    assert not aligner.detect(masked), "the detector is expected to miss the masked face (tests the fallback)"
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    _png(inp / "astro.png", masked)
    _jpeg(inp / "astro_jpeg.jpg", masked)
    _png(maps / "astro.png", mask)
    _png(maps / "astro_jpeg.png", mask)
    _png(inp / "clean.png", astronaut)  # a face the detector finds, but an empty map: copied through
    _png(maps / "clean.png", np.zeros(mask.shape, np.uint8))
    before = _hashes(inp)

    summary = run_infer(_cfg(ckpts["plain"], masks=maps, save_masks=True, compare=True, device="cpu",
                             detector=HOG), inp, out)
    assert (summary.processed, summary.faces, summary.faces_from_maps) == (2, 2, 2)
    # clean.png's face, plus any detector false positive (dlib fires on the suit of the JPEG copy): no map there
    assert summary.unchanged == 1 and summary.faces_empty_map >= 1
    assert (out / "clean.png").read_bytes() == (inp / "clean.png").read_bytes()
    _check_photo(masked, read_image(out / "astro.png"), mask, polys, faces)
    assert np.array_equal(read_mask(out / "masks" / "astro.png"), mask > 0)
    assert read_image(out / "compare" / "astro.jpg").shape == (512, 1024, 3)
    jpeg_in, jpeg_out = read_image(inp / "astro_jpeg.jpg"), read_image(out / "astro_jpeg.jpg")
    assert jpeg_out.shape == jpeg_in.shape and (out / "astro_jpeg.jpg").read_bytes()[:2] == b"\xff\xd8"
    far = _far_from(mask > 0, 100)
    assert np.abs(jpeg_out[far].astype(int) - jpeg_in[far].astype(int)).mean() < 1.5  # JPEG q95 re-encoding only
    assert _hashes(inp) == before

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    again = run_infer(_cfg(ckpts["plain"], masks=maps, save_masks=True, compare=True, device="cpu",
                           detector=HOG), inp, out)
    assert again.already_done == 3 and again.processed == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*")} == stamps
    redo = run_infer(_cfg(ckpts["plain"], masks=maps, device="cpu", detector=HOG, overwrite=True), inp, out)
    assert redo.processed == 2 and redo.unchanged == 1 and redo.already_done == 0


def test_detectors_on_a_masked_face(tmp_path, ckpts, astronaut, aligner):
    """A realistic surgical mask hides the face from dlib's HOG detector; YuNet (the default) finds it, and
    so does dlib's CNN, which hog+cnn runs where HOG finds none (but not with supplied maps)."""
    from unmask_cli.masks import apply_style

    face = aligner.detect(astronaut)[0]
    masked = apply_style("surgical", astronaut, face.landmarks, np.random.default_rng(0))
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "masked.png", masked.masked)
    hog = run_infer(_cfg(ckpts["map_all"], device="cpu", detector="hog"), inp, tmp_path / "hog")
    assert hog.no_face == 1 and hog.faces == 0 and hog.detector == "hog"
    assert (read_image(tmp_path / "hog" / "masked.png") == masked.masked).all()  # copied through

    for detector in ("yunet", "hog+cnn"):
        found = run_infer(_cfg(ckpts["map_all"], device="cpu", detector=detector), inp, tmp_path / detector)
        assert found.detector == detector and found.no_face == 0 and found.processed == 1 and found.faces == 1
        changed = (read_image(tmp_path / detector / "masked.png") != masked.masked).any(axis=2)
        assert changed[masked.mask].mean() > 0.9  # the mask region was replaced
        left, top, right, bottom = face.box  # the face found is the one HOG found before the mask was drawn
        ys, xs = np.nonzero(changed)
        assert abs(xs.mean() - (left + right) / 2) < 0.25 * (right - left)
        assert abs(ys.mean() - (top + bottom) / 2) < 0.5 * (bottom - top)

    maps = tmp_path / "maps"  # with supplied maps, hog+cnn skips the CNN: the map locates the face
    maps.mkdir()
    _png(maps / "masked.png", (masked.mask * 255).astype(np.uint8))
    mapped = run_infer(_cfg(ckpts["plain"], masks=maps, device="cpu", detector="hog+cnn"),
                       inp, tmp_path / "mapped")
    assert mapped.faces == 1 and mapped.faces_from_maps == 1

    with pytest.raises(UnmaskError, match="unknown face detector 'mtcnn'"):
        run_infer(_cfg(ckpts["map_all"], device="cpu", detector="mtcnn"), inp, tmp_path / "bad")


def test_infer_aligns_photos_the_way_the_checkpoint_was_trained(tmp_path, ckpts, astronaut):
    """The map module of map_all marks the whole crop, so the used map is the crop's footprint in the photo:
    the eyes square for a checkpoint of visible-aligned data, the FFHQ square for a legacy checkpoint, the
    eyes square shrunk about the chin for a checkpoint of 0.7 crops."""
    import cv2

    from unmask_cli.inference import _aligner

    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "astro.png", astronaut)
    areas = {}
    for name, alignment, crop in (("map_all", "visible", 1.0), ("map_all_legacy", "ffhq", 1.0),
                                  ("map_all_tight", "visible", 0.7)):
        summary = run_infer(_cfg(ckpts[name], save_masks=True, device="cpu"), inp, tmp_path / name)
        assert summary.alignment == alignment and summary.faces == 1
        finder = _aligner(None, "yunet", alignment, crop)
        quad = finder.quad(finder.detect(astronaut)[0])
        expected = np.zeros(astronaut.shape[:2], np.uint8)
        cv2.fillPoly(expected, [quad.round().astype(np.int32)], 1)
        used = read_mask(tmp_path / name / "masks" / "astro.png")
        overlap = (used & (expected > 0)).sum() / (used | (expected > 0)).sum()
        assert overlap > 0.97, (alignment, overlap)
        areas[name] = used.sum()
    assert areas["map_all_tight"] / areas["map_all"] == pytest.approx(0.49, rel=0.05)
    assert "visible alignment" in _table_text(run_infer(_cfg(ckpts["map_all"], device="cpu"),
                                                        inp, tmp_path / "map_all"))


def _table_text(summary) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    return console.export_text()


def test_photo_with_predicted_map(tmp_path, ckpts, astronaut):
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "astro.png", astronaut)
    summary = run_infer(_cfg(ckpts["map_all"], save_masks=True, device="cpu"), inp, tmp_path / "out")
    assert summary.processed == 1 and summary.faces == 1
    used = read_mask(tmp_path / "out" / "masks" / "astro.png")
    result = read_image(tmp_path / "out" / "astro.png")
    changed = (result != astronaut).any(axis=2)
    assert 0.02 < used.mean() < 0.6  # the whole face crop, pasted back into photo coordinates
    assert changed[used].mean() > 0.9
    assert not changed[_far_from(used, 60)].any()


def test_group_photos(tmp_path, ckpts, aligner):
    if not (SHARED / "faces").is_dir():
        pytest.skip("../shared/faces not present")
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    expected = {}
    for name, count in (("obama_and_biden", 3), ("two_people", 2)):
        photo = read_image(SHARED / "faces" / f"{name}.jpg")
        masked, mask, polys, faces = _masked_photo(aligner, photo)
        assert len(faces) == count
        _png(inp / f"{name}.png", masked)
        _png(maps / f"{name}.png", mask)
        expected[name] = (masked, mask, polys, faces)
    before = _hashes(inp)
    summary = run_infer(_cfg(ckpts["plain"], masks=maps, device="cpu", detector=HOG, batch_size=4), inp, out)
    assert summary.processed == 2 and summary.faces == 5
    for name, (masked, mask, polys, faces) in expected.items():
        # the turned head at the right of obama_and_biden: its eyes give a crop that ends just inside its
        # far cheek, before this jaw-wide mask does
        _check_photo(masked, read_image(out / f"{name}.png"), mask, polys, faces, share=0.8)
    assert _hashes(inp) == before

    (inp / "obama_and_biden.png").unlink()
    largest = run_infer(_cfg(ckpts["plain"], masks=maps, device="cpu", detector=HOG, all_faces=False),
                        inp, tmp_path / "largest")
    assert largest.faces == 1
    masked, mask, polys, _ = expected["two_people"]
    result = read_image(tmp_path / "largest" / "two_people.png")
    changed = [(result[_poly_region(mask.shape, p)] != masked[_poly_region(mask.shape, p)]).any(axis=1).mean()
               for p in polys]
    assert sorted(round(c) for c in changed) == [0, 1]  # one face unmasked, the other left as it was


def test_rgba_png_keeps_alpha(tmp_path, ckpts, aligner):
    from PIL import Image

    if not (SHARED / "faces" / "32bit.png").is_file():
        pytest.skip("../shared/faces not present")
    with Image.open(SHARED / "faces" / "32bit.png") as img:
        rgba = np.asarray(img.convert("RGBA")).copy()
    rgba[:40, :40, 3] = 0  # make sure some pixels are transparent
    rgba[:40, :40, :3] = (7, 8, 9)
    masked_rgb, mask, polys, faces = _masked_photo(aligner, rgba[:, :, :3])
    inp, maps = tmp_path / "in", tmp_path / "maps"
    inp.mkdir()
    maps.mkdir()
    Image.fromarray(np.dstack([masked_rgb, rgba[:, :, 3]])).save(inp / "alpha.png")
    _png(maps / "alpha.png", mask)
    summary = run_infer(_cfg(ckpts["plain"], masks=maps, device="cpu"), inp, tmp_path / "out")
    assert summary.processed == 1
    with Image.open(tmp_path / "out" / "alpha.png") as img:
        assert img.mode == "RGBA"
        result = np.asarray(img)
    assert np.array_equal(result[:, :, 3], rgba[:, :, 3])
    assert np.array_equal(result[:40, :40, :3], rgba[:40, :40, :3])  # transparent pixels keep their RGB
    _check_photo(masked_rgb, result[:, :, :3], mask, polys, faces)


# ----------------------------------------------------------------------------------- per-file problems

def test_bad_files_no_face_and_mask_errors(tmp_path, ckpts, aligner, astronaut):
    from skimage.data import coffee

    masked, mask, _, _ = _masked_photo(aligner, astronaut)
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    _png(inp / "good.png", masked)
    _png(maps / "good.png", mask)
    _jpeg(inp / "coffee.jpg", coffee())
    _png(maps / "coffee.png", np.zeros(coffee().shape[:2], np.uint8))
    _png(inp / "nomap.png", masked)  # no maps/nomap.*
    _png(inp / "wrongsize.png", masked)
    _png(maps / "wrongsize.png", mask[:300, :200])
    (inp / "fake.jpg").write_text("this is not a JPEG\n")
    (inp / "notes.txt").write_text("hello\n")
    before = _hashes(inp)

    import io

    from rich.console import Console

    from unmask_cli.progress import make_progress

    with make_progress(Console(file=io.StringIO()), unit="img") as progress:
        summary = run_infer(_cfg(ckpts["plain"], masks=maps, compare=True, device="cpu", detector=HOG),
                            inp, out, progress)
    (task,) = progress.tasks
    assert task.total == task.completed == 6
    reasons = {name: reason for name, reason, _ in summary.skipped_files}
    assert reasons == {"fake.jpg": "not an image", "notes.txt": "not an image", "nomap.png": "missing mask",
                       "wrongsize.png": "mask size mismatch"}
    assert summary.skipped == {"not an image": 2, "missing mask": 1, "mask size mismatch": 1}
    message = dict((n, m) for n, _, m in summary.skipped_files)["wrongsize.png"]
    assert "200x300" in message and "512x512" in message
    assert summary.processed == 1 and summary.no_face == 1
    assert summary.no_face_files == [("coffee.jpg", "no face")]
    assert (out / "coffee.jpg").read_bytes() == (inp / "coffee.jpg").read_bytes()
    assert (out / "compare" / "coffee.jpg").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [".unmask-infer.json", "coffee.jpg", "good.png",
                                                                    "skipped.csv"]
    assert "wrongsize.png,mask size mismatch" in (out / "skipped.csv").read_text()
    assert _hashes(inp) == before

    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    text = console.export_text()
    for expected in ("no face: copied", "coffee.jpg", "skipped: missing mask", "wrongsize.png", "img/s"):
        assert expected in text


def test_refusals(tmp_path, ckpts, astronaut):
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png", astronaut)
    for bad in (inp, inp / "out", inp / "deeper" / "out"):
        with pytest.raises(UnmaskError, match="must not be the input folder or inside it") as info:
            run_infer(_cfg(ckpts["plain"], device="cpu"), inp, bad)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in inp.iterdir()) == ["a.png"]
    with pytest.raises(UnmaskError, match="no map module"):
        run_infer(_cfg(ckpts["no_map"], device="cpu"), inp, tmp_path / "out")
    with pytest.raises(UnmaskError, match="holds inputs"):  # --save-masks would overwrite the supplied maps
        run_infer(_cfg(ckpts["plain"], masks=tmp_path / "out" / "masks", save_masks=True),
                  inp, tmp_path / "out")
    with pytest.raises(UnmaskError, match="threshold"):
        options = {"infer.checkpoint": str(ckpts["plain"]), "infer.threshold": 1.5}
        run_infer(load_config(options=options).infer, inp, tmp_path / "out")  # refused by the config check
    with pytest.raises(UnmaskError, match="input folder not found"):
        run_infer(_cfg(ckpts["plain"]), tmp_path / "missing", tmp_path / "out")
    with pytest.raises(UnmaskError, match=r"missing\.pt: checkpoint not found$"):
        run_infer(_cfg(tmp_path / "missing.pt"), inp, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_unmasker_uses_the_shared_device_policy():
    """setup_device's policy, plus channels_last on the CPU (faster NHWC inference, same outputs as before)."""
    from unmask_cli.device import setup_device
    from unmask_cli.inference import Unmasker
    from unmask_cli.models import UNetGenerator

    setup = setup_device("cpu", inference=True)
    assert setup.device.type == "cpu" and setup.channels_last and not setup.amp
    net = Unmasker(UNetGenerator(4, 3, ngf=8, image_size=64), None, 64, setup)
    assert net.describe() == "cpu, channels_last, inference_mode, BN folded"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.G.parameters() if p.dim() == 4)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    maps = np.zeros((2, 64, 64), bool)
    maps[:, 32:] = True
    out, used = net(images, maps)
    assert out.dtype == np.uint8 and out.shape == images.shape and np.array_equal(used, maps)
    assert np.array_equal(out[~maps], images[~maps])  # the input outside the map, exactly


def test_mask_decision_drops_specks_and_faces_without_a_mask():
    """A face wears a mask when its predicted map, without specks, covers min_mask_area of the crop."""
    import cv2

    from unmask_cli.inference import mask_decision

    size, area = 64, 0.04
    mask = np.zeros((size, size), bool)
    cv2.ellipse(mask.view(np.uint8), (32, 44), (18, 12), 0, 0, 360, 1, -1)  # ~16 % of the crop: a mask
    specks = mask.copy()
    specks[2:4, 2:4] = specks[60:62, 5:7] = True  # stray pixels elsewhere
    assert np.array_equal(mask_decision(specks, area), mask)
    small = np.zeros_like(mask)
    small[30:36, 30:36] = True  # < 4 % of the crop: no mask, the map is emptied
    assert not mask_decision(small, area).any()
    assert np.array_equal(mask_decision(small, 0.0), small)  # 0 turns the decision off
    assert not mask_decision(np.zeros_like(mask), area).any()


def test_a_face_judged_without_a_mask_is_left_bit_identical(tmp_path, ckpts, astronaut):
    """The map module finds nothing on the face: it counts as without a mask and the photo is copied."""
    from rich.console import Console

    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "bare.png", astronaut)
    summary = run_infer(_cfg(ckpts["map_none"], device="cpu"), inp, tmp_path / "out")
    assert summary.faces == 0 and summary.faces_empty_map == 1 and summary.unchanged == 1
    assert (tmp_path / "out" / "bare.png").read_bytes() == (inp / "bare.png").read_bytes()
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    assert "faces without a mask (left untouched)" in console.export_text()


# ------------------------------------------------------------------------------------------------ reruns

def _rerun_inputs(inp: Path, aligner, astronaut, grace_hopper) -> dict[str, tuple[int, int]]:
    """Three aligned crops (PNG, JPEG, GIF); their (height, width)."""
    from PIL import Image

    inp.mkdir()
    a, _ = _aligned_crop(aligner, astronaut, 96)
    b, _ = _aligned_crop(aligner, grace_hopper, 80)
    _png(inp / "a.png", a)
    _jpeg(inp / "b.jpg", b)
    Image.fromarray(_aligned_crop(aligner, astronaut, 64)[0]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        inp / "c.gif")
    return {"a.png": (96, 96), "b.jpg": (80, 80), "c.gif": (64, 64)}


def _summary_text(summary) -> str:
    from rich.console import Console

    console = Console(record=True, width=220)
    console.print(summary_table(summary))
    return console.export_text()


def test_a_rerun_keeps_only_outputs_made_the_same_way_and_intact(tmp_path, ckpts, aligner, astronaut, grace_hopper):
    """Issue 22 item 5: an output counts as done only when OUT_DIR's record says it was made by this model
    with these settings from this input, and it is still exactly as written; otherwise it is redone, and
    the summary says why."""
    import json
    import os

    from unmask_cli.inference import RECORD_FILE

    inp, out = tmp_path / "in", tmp_path / "out"
    shapes = _rerun_inputs(inp, aligner, astronaut, grace_hopper)
    run = lambda ckpt="map_all", **kw: run_infer(_cfg(ckpts[ckpt], aligned=True, device="cpu", **kw), inp, out)  # noqa: E731

    first = run()
    assert first.processed == 3 and first.redone == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert set(record["outputs"]) == set(shapes) and len(record["settings"]) == 1
    (settings,) = record["settings"].values()
    assert settings["threshold"] == 0.5 and len(settings["model_sha256"]) == 64
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run()
    assert (again.already_done, again.processed, again.redone) == (3, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten, the record included

    # a zero-byte and a truncated output (a full disk, an interrupted copy by hand): redone
    (out / "a.png").write_bytes(b"")
    data = (out / "b.jpg").read_bytes()
    (out / "b.jpg").write_bytes(data[: len(data) // 2])
    fixed = run()
    assert (fixed.redone_corrupt, fixed.processed, fixed.already_done) == (2, 2, 1)
    assert sorted(fixed.redone_files) == [("a.png", "corrupt"), ("b.jpg", "corrupt")]
    for name, shape in shapes.items():
        assert read_image(out / name).shape[:2] == shape
    text = _summary_text(fixed)
    assert "redone: output corrupt or changed since written (zero-byte, truncated, edited)" in text
    assert "a.png" in text and "b.jpg" in text

    # another threshold, another checkpoint: every output is made again, not kept silently
    other = run(threshold=0.4)
    assert (other.redone_changed_settings, other.already_done) == (3, 0)
    assert "redone: made with another model or other settings" in _summary_text(other)
    assert run(threshold=0.4).already_done == 3
    plain = run("plain", threshold=0.4)
    assert (plain.redone_changed_settings, plain.already_done) == (3, 0)

    # an input replaced since: its output is redone
    stat = (inp / "a.png").stat()
    os.utime(inp / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = run("plain", threshold=0.4)
    assert (changed.redone_changed_input, changed.already_done) == (1, 2)

    # no record (an older unmask wrote them, or a kill came before the record was saved): never trusted
    (out / RECORD_FILE).unlink()
    unrecorded = run("plain", threshold=0.4)
    assert (unrecorded.redone_unrecorded, unrecorded.already_done) == (3, 0)

    # --overwrite redoes everything, counted as work, not as repairs
    forced = run("plain", threshold=0.4, overwrite=True)
    assert forced.already_done == 0 and forced.redone == 0 and forced.handled == 3


def test_an_output_replaced_before_its_record_was_saved_is_redone(tmp_path, ckpts, aligner, astronaut, grace_hopper,
                                                                   monkeypatch):
    """A kill after a rerun with other settings replaced an output but before the record was saved: the
    record still names the old settings and the old bytes, so the next run redoes that output."""
    from unmask_cli.inference import OutputRecord

    inp, out = tmp_path / "in", tmp_path / "out"
    _rerun_inputs(inp, aligner, astronaut, grace_hopper)
    cfg = lambda **kw: _cfg(ckpts["map_all"], aligned=True, device="cpu", **kw)  # noqa: E731
    assert run_infer(cfg(), inp, out).processed == 3
    with monkeypatch.context() as patch:
        patch.setattr(OutputRecord, "save", lambda self: None)  # killed: the record is never saved
        assert run_infer(cfg(jpeg_quality=40), inp, out).redone_changed_settings == 3
    again = run_infer(cfg(), inp, out)
    # the PNG and GIF outputs do not depend on the JPEG quality (the same bytes: rightly done); the JPEG does
    assert again.redone_files == [("b.jpg", "corrupt")] and again.already_done == 2


def test_a_gif_is_read_like_prepare_reads_it_and_written_as_a_gif(tmp_path, ckpts, aligner, astronaut):
    """Issue 22 item 6.5: infer reads a GIF's first frame (as prepare does) and writes a one-frame GIF in
    the input's palette: pixels away from the mask keep their palette index."""
    from PIL import Image

    crop, lm = _aligned_crop(aligner, astronaut, 96)
    masked, mask = _draw_masks(crop, [_mask_polygon(lm)])
    inp, maps, out = tmp_path / "in", tmp_path / "maps", tmp_path / "out"
    inp.mkdir()
    maps.mkdir()
    frames = [Image.fromarray(masked).convert("P", palette=Image.Palette.ADAPTIVE),
              Image.fromarray(crop).convert("P", palette=Image.Palette.ADAPTIVE)]
    frames[0].save(inp / "face.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _png(maps / "face.png", mask)
    summary = run_infer(_cfg(ckpts["plain"], masks=maps, aligned=True, device="cpu"), inp, out)
    assert summary.processed == 1 and not summary.skipped_files
    with Image.open(inp / "face.gif") as img:
        before = np.asarray(img).copy()
    with Image.open(out / "face.gif") as img:
        assert (img.format, img.mode, img.size, getattr(img, "n_frames", 1)) == ("GIF", "P", (96, 96), 1)
        after = np.asarray(img).copy()
    outside, inside = _far_from(mask > 0, 0.5), _poly_region(mask.shape, _mask_polygon(lm))
    assert np.array_equal(after[outside], before[outside])
    assert (read_image(out / "face.gif")[inside] != read_image(inp / "face.gif")[inside]).any(axis=1).mean() > 0.9


def test_the_summary_describes_the_loaded_release_not_its_sidecar(tmp_path, ckpts, aligner, astronaut):
    """Issue 22 item 6.3: the model line shows the sha256 that was verified and the image size of the
    loaded network; numbers edited into the sidecar (which its sha256 does not cover) are not shown."""
    import json

    from PIL import Image

    from unmask_cli.export import export_release

    release, sidecar = export_release(ckpts["map_all"], tmp_path / "model" / "mine.pt")
    side = release.with_suffix(".json")
    doc = json.loads(side.read_text())
    doc.update(image_size=999, global_step=424242)
    side.write_text(json.dumps(doc))
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "face.png", _aligned_crop(aligner, astronaut, 64)[0])
    summary = run_infer(_cfg(release, aligned=True, device="cpu"), inp, tmp_path / "out")
    text = _summary_text(summary)
    assert f"release file {release} (64 px, 1 steps, sha256 {sidecar['sha256'][:12]} verified)" in text
    assert "999" not in text and "424242" not in text
    with Image.open(tmp_path / "out" / "face.png") as img:
        software = img.getexif()[0x0131]
    assert f"release file mine.pt (64 px, 1 steps, sha256 {sidecar['sha256'][:12]} verified)" in software


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, ckpts, aligner, astronaut):
    """Issue 22 item 6.10: NaN weights would paste black patches counted as faces unmasked."""
    import dataclasses

    from unmask_cli.checkpoints import Checkpoint

    ckpt = Checkpoint.load(ckpts["map_all"])
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "face.png", _aligned_crop(aligner, astronaut, 64)[0])
    for net, value, words in (("G", float("nan"), "the generator"), ("M", float("inf"), "the map module")):
        state = dict(ckpt.networks[net])
        name = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
        path = dataclasses.replace(ckpt, networks={**ckpt.networks, net: state}).save(tmp_path / f"{net}.pt")
        with pytest.raises(UnmaskError) as info:
            run_infer(_cfg(path, aligned=True, device="cpu"), inp, tmp_path / "out")
        assert str(info.value).startswith(f"{path}: checkpoint holds non-finite weights (NaN or infinity) in "
                                          f"{words}: 1 tensor(s), the first {name}")
    assert not (tmp_path / "out").exists()


def test_entries_that_are_not_files_are_listed_but_not_the_masks_folder(tmp_path, ckpts, aligner, astronaut):
    """Issue 22 item 6.6: a sub-folder and a FIFO of IN_DIR are listed as skipped with what they are (never
    opened: reading a FIFO would block); the --masks folder inside IN_DIR is an input of its own, not listed."""
    import os

    crop, lm = _aligned_crop(aligner, astronaut, 64)
    masked, mask = _draw_masks(crop, [_mask_polygon(lm)])
    inp = tmp_path / "in"
    (inp / "masks").mkdir(parents=True)
    (inp / "old").mkdir()
    os.mkfifo(inp / "pipe.png")
    _png(inp / "face.png", masked)
    _png(inp / "masks" / "face.png", mask)
    summary = run_infer(_cfg(ckpts["plain"], masks=inp / "masks", aligned=True, device="cpu"), inp, tmp_path / "out")
    assert summary.processed == 1 and summary.files == 3
    assert [(name, reason) for name, reason, _ in summary.skipped_files] == [("old", "folder"),
                                                                            ("pipe.png", "not a regular file")]
    assert "old,folder," in (tmp_path / "out" / "skipped.csv").read_text()
