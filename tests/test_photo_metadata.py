"""Faithful outputs: ``unmask infer`` changes the masked region of a photo and keeps everything else of the file:
EXIF (Orientation reset to 1, Software naming unmask), ICC profile, XMP, JPEG comment, PNG text chunks,
DPI, JPEG quality and chroma subsampling, mode and bit depth.

Real files made here from a real portrait with a drawn mask, a supplied map (``--masks``) so the edited
region is known, and the tiny untrained checkpoint of test_inference (its generator paints ~mid-grey). One
``unmask infer`` run over all of them (module fixture) keeps the file fast.
"""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from test_inference import _cfg, _far_from, _mask_polygon, _write_checkpoint

from unmask_cli.config import load_config
from unmask_cli.errors import ConfigError
from unmask_cli.fileio import read_image
from unmask_cli.inference import run_infer
from unmask_cli.photo_meta import estimate_quality

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MASK_RGB = (40, 90, 210)
FAR = 60  # px from the map: beyond the feathered paste-back
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>Ann Example'
       b'</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>')
TURNED_XMP = XMP.replace(b'rdf:about=""', b'rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"')
COMMENT = b"taken at the 2020 meeting"
TAGS = {0x8298: "(c) 2020 Ann Example", 0x013B: "Ann Example", 0x0132: "2020:01:02 03:04:05"}  # copyright, artist, date
TAKEN = {0x9003: "2020:01:02 03:04:05"}  # Exif IFD: DateTimeOriginal


@functools.cache
def _icc() -> bytes:
    """An sRGB profile (made once: it holds its creation time)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int | None = None):
    from PIL import Image

    exif = Image.Exif()
    exif.update(TAGS)
    if orientation is not None:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769).update(TAKEN)
    return exif


def _noise(shape, seed: int = 0) -> np.ndarray:
    """Low-byte detail, so 16-bit values are not just 8-bit ones times 257."""
    return np.random.default_rng(seed).integers(0, 200, shape).astype(np.uint16)


def _png_chunk_types(path: Path) -> list[bytes]:
    data, pos, kinds = path.read_bytes(), 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


@pytest.fixture(scope="module")
def scene(aligner, astronaut):
    """(masked portrait, its map 0/255): a surgical-mask-like polygon drawn from the face's landmarks."""
    import cv2

    poly = _mask_polygon(aligner.detect(astronaut)[0].landmarks)
    masked, mask = astronaut.copy(), np.zeros(astronaut.shape[:2], np.uint8)
    cv2.fillPoly(masked, [poly], MASK_RGB)
    cv2.fillPoly(mask, [poly], 255)
    return masked, mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", map_bias=10.0)


def _write_inputs(folder: Path, masked: np.ndarray) -> dict[str, object]:
    """Every kind of input file; returns what was written (16-bit arrays, alpha) for the checks."""
    import cv2
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir()
    stored = np.ascontiguousarray(np.rot90(masked, 1))  # orientation 6: shown turned 90 degrees clockwise
    Image.fromarray(stored).save(folder / "meta.jpg", quality=67, exif=_exif(6), icc_profile=_icc(), xmp=TURNED_XMP,
                                 comment=COMMENT, dpi=(300, 300))
    Image.fromarray(masked).save(folder / "s444.jpg", quality=92, subsampling=0)
    Image.fromarray(masked).convert("L").save(folder / "gray.jpg", quality=85)
    info = PngInfo()
    info.add_text("Title", "Astronaut")
    info.add_text("Comment", "a long note " * 40, zip=True)  # zTXt
    info.add_itxt("Description", "Eileen Collins, NASA", lang="en", tkey="Beschreibung")
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    Image.fromarray(masked).save(folder / "text.png", pnginfo=info, dpi=(150, 150), icc_profile=_icc(), exif=_exif())
    Image.fromarray(masked).save(folder / "plain.png")
    Image.fromarray(masked).save(folder / "scan.tif", compression="tiff_lzw", exif=_exif(), icc_profile=_icc(),
                                 dpi=(600, 600))
    Image.fromarray(masked).save(folder / "lossless.webp", lossless=True)
    rgb16 = masked.astype(np.uint16) * 257 + _noise(masked.shape)
    cv2.imwrite(str(folder / "rgb16.png"), rgb16[:, :, ::-1])
    grey = np.asarray(Image.fromarray(masked).convert("L"))
    gray16 = grey.astype(np.uint16) * 257 + _noise(grey.shape, 1)
    Image.fromarray(gray16).save(folder / "gray16.png")
    alpha = np.full(masked.shape[:2], 255, np.uint8)
    alpha[:60, :60] = 0
    alpha[:, -40:] = np.linspace(0, 255, 40).astype(np.uint8)
    Image.fromarray(np.dstack([masked, alpha])).save(folder / "alpha.png")
    return {"rgb16": rgb16, "gray16": gray16, "alpha": alpha}


@pytest.fixture(scope="module")
def inferred(tmp_path_factory, scene, ckpt):
    """(input folder, output folder, written arrays, summary) of one ``unmask infer --masks`` run."""
    masked, mask = scene
    root = tmp_path_factory.mktemp("faithful")
    inp, maps, out = root / "in", root / "maps", root / "out"
    written = _write_inputs(inp, masked)
    maps.mkdir()
    for path in inp.iterdir():
        _save_map(maps / f"{path.stem}.png", mask)
    summary = run_infer(_cfg(ckpt, masks=maps, device="cpu"), inp, out)
    return inp, out, written, summary


def _save_map(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(mask).save(path)


def _open(path: Path):
    from PIL import Image

    img = Image.open(path)
    img.load()
    return img


# ---------------------------------------------------------------------------------------------- tests

def test_every_photo_was_processed(inferred):
    inp, out, _, summary = inferred
    assert summary.processed == len(list(inp.iterdir())) and summary.faces == summary.processed
    assert not summary.skipped_files


def test_exif_is_kept_orientation_reset_and_unmask_recorded(inferred, scene, ckpt):
    inp, out, _, _ = inferred
    masked, mask = scene
    exif = _open(out / "meta.jpg").getexif()
    assert exif[0x0112] == 1  # the pixels are written upright: viewers must not turn them again
    assert {tag: exif.get(tag) for tag in TAGS} == TAGS
    assert {tag: exif.get_ifd(0x8769).get(tag) for tag in TAKEN} == TAKEN
    assert "unmask" in exif[0x0131] and ckpt.name in exif[0x0131] and str(ckpt.parent) not in exif[0x0131]
    assert "unmask" in _open(out / "text.png").getexif()[0x0131]
    # the edit landed on the face as displayed (the photo was turned once, not twice)
    before, after = read_image(inp / "meta.jpg").astype(int), read_image(out / "meta.jpg").astype(int)
    assert after.shape == masked.shape
    far = _far_from(mask > 0, FAR)
    assert np.abs(after[far] - before[far]).mean() < 2
    assert np.abs(after[mask > 0] - before[mask > 0]).sum(axis=1).mean() > 30


def test_icc_xmp_comment_and_dpi_of_a_jpeg(inferred):
    _, out, _, _ = inferred
    img = _open(out / "meta.jpg")
    assert img.info["icc_profile"] == _icc()
    assert img.info["xmp"] == TURNED_XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')  # as the EXIF tag
    assert img.info["comment"] == COMMENT
    assert img.info["dpi"] == (300, 300)


def test_png_text_chunks_xmp_icc_and_dpi(inferred):
    _, out, _, _ = inferred
    img = _open(out / "text.png")
    assert img.text["Title"] == "Astronaut" and img.text["Comment"] == "a long note " * 40
    assert (img.text["Description"], img.text["Description"].lang, img.text["Description"].tkey) == (
        "Eileen Collins, NASA", "en", "Beschreibung")
    assert img.info["xmp"] == XMP
    assert img.info["icc_profile"] == _icc()
    assert tuple(round(d) for d in img.info["dpi"]) == (150, 150)
    assert {tag: img.getexif().get(tag) for tag in TAGS} == TAGS
    kinds = _png_chunk_types(out / "text.png")
    assert kinds.count(b"zTXt") == 1 and kinds.count(b"iTXt") == 2 and kinds.count(b"tEXt") == 1  # types kept


def test_png_pixels_away_from_the_mask_are_bit_identical(inferred, scene):
    inp, out, _, _ = inferred
    _, mask = scene
    far = _far_from(mask > 0, FAR)
    assert far.mean() > 0.5
    for name in ("plain.png", "text.png"):
        before, after = np.asarray(_open(inp / name)), np.asarray(_open(out / name))
        assert after.shape == before.shape and after.dtype == np.uint8
        changed = (after != before).any(axis=2)
        assert not changed[far].any(), name
        assert changed[mask > 0].mean() > 0.9, name


def test_tiff_and_lossless_webp(inferred, scene):
    inp, out, _, _ = inferred
    far = _far_from(scene[1] > 0, FAR)
    tiff = _open(out / "scan.tif")
    assert tiff.info["compression"] == "tiff_lzw" and tiff.info["icc_profile"] == _icc()
    assert tuple(tiff.info["dpi"]) == (600, 600)
    assert {tag: tiff.getexif().get(tag) for tag in TAGS} == TAGS and "unmask" in tiff.getexif()[0x0131]
    for name in ("scan.tif", "lossless.webp"):
        before, after = read_image(inp / name), read_image(out / name)
        assert np.array_equal(after[far], before[far]), name  # lossless: untouched pixels bit-identical


def test_rgb_16bit_png_stays_16bit(inferred, scene):
    import cv2

    _, out, written, summary = inferred
    _, mask = scene
    result = cv2.imread(str(out / "rgb16.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    source = written["rgb16"]
    assert result.dtype == np.uint16 and result.shape == source.shape
    far = _far_from(mask > 0, FAR)
    assert np.array_equal(result[far], source[far])  # the untouched pixels keep their exact 16-bit values
    changed = (result != source).any(axis=2)
    assert changed[mask > 0].mean() > 0.9 and (result[changed] % 257 == 0).all()  # the edit: 8 bits scaled up
    assert "unmask" in _open(out / "rgb16.png").getexif()[0x0131]  # metadata spliced into OpenCV's PNG


def test_grey_16bit_png_stays_grey_16bit(inferred, scene):
    _, out, written, _ = inferred
    _, mask = scene
    img = _open(out / "gray16.png")
    assert img.mode == "I;16"
    result, source = np.asarray(img), written["gray16"]
    far = _far_from(mask > 0, FAR)
    assert np.array_equal(result[far], source[far])
    changed = result != source
    assert changed[mask > 0].mean() > 0.5 and (result[changed] % 257 == 0).all()


def test_grey_jpeg_stays_grey(inferred, scene):
    inp, out, _, _ = inferred
    _, mask = scene
    img = _open(out / "gray.jpg")
    assert img.mode == "L" and img.layers == 1
    assert abs(estimate_quality(img.quantization) - 85) <= 3
    before, after = np.asarray(_open(inp / "gray.jpg"), int), np.asarray(img, int)
    assert np.abs(after - before)[_far_from(mask > 0, FAR)].mean() < 2


def test_alpha_is_kept(inferred, scene):
    inp, out, written, _ = inferred
    _, mask = scene
    before, after = np.asarray(_open(inp / "alpha.png")), np.asarray(_open(out / "alpha.png"))
    assert after.shape[2] == 4 and np.array_equal(after[:, :, 3], written["alpha"])
    far = _far_from(mask > 0, FAR)
    assert np.array_equal(after[far], before[far])  # RGB under transparent pixels too


def test_jpeg_quality_and_size_match_the_input(inferred):
    from PIL import JpegImagePlugin

    inp, out, _, _ = inferred
    img = _open(out / "meta.jpg")
    assert abs(estimate_quality(img.quantization) - 67) <= 3
    assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0, as the input
    assert (out / "meta.jpg").stat().st_size < 1.3 * (inp / "meta.jpg").stat().st_size


def test_jpeg_444_stays_444(inferred):
    from PIL import JpegImagePlugin

    _, out, _, _ = inferred
    img = _open(out / "s444.jpg")
    assert JpegImagePlugin.get_sampling(img) == 0
    assert abs(estimate_quality(img.quantization) - 92) <= 3


def test_jpeg_quality_option(tmp_path, inferred, scene, ckpt):
    """``--jpeg-quality 90`` (the infer.jpeg_quality key) overrides the quality matched to the input."""
    from PIL import JpegImagePlugin
    from typer.testing import CliRunner

    from unmask_cli.cli import app

    inp, _, _, _ = inferred
    (tmp_path / "in").mkdir()
    (tmp_path / "maps").mkdir()
    (tmp_path / "in" / "meta.jpg").write_bytes((inp / "meta.jpg").read_bytes())
    _save_map(tmp_path / "maps" / "meta.png", scene[1])
    result = CliRunner().invoke(app, ["infer", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", str(ckpt),
                                      "--masks", str(tmp_path / "maps"), "--device", "cpu", "--jpeg-quality", "90"])
    assert result.exit_code == 0, result.output
    img = _open(tmp_path / "out" / "meta.jpg")
    assert abs(estimate_quality(img.quantization) - 90) <= 3 and JpegImagePlugin.get_sampling(img) == 2
    assert img.getexif()[0x0112] == 1 and img.info["comment"] == COMMENT


def test_jpeg_quality_config_key():
    assert load_config(None, ["infer.jpeg_quality=90"]).infer.jpeg_quality == 90
    assert load_config(None, ["infer.jpeg_quality=null"]).infer.jpeg_quality is None
    assert load_config(None).infer.jpeg_quality is None
    for bad in ("0", "101", "high"):
        with pytest.raises(ConfigError, match="infer.jpeg_quality"):
            load_config(None, [f"infer.jpeg_quality={bad}"])


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_quality_estimate_matches_the_encoder(astronaut, subsampling):
    from PIL import Image

    for quality in (10, 35, 50, 67, 75, 90, 95, 100):
        buffer = io.BytesIO()
        Image.fromarray(astronaut[:64, :64]).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
        assert estimate_quality(Image.open(buffer).quantization) == quality
