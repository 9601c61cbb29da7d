"""Robust image reading: real images in every odd mode, and clear one-line errors for bad files."""

import os

import numpy as np
import pytest
from conftest import write_jpeg
from PIL import Image

from unmask_cli.errors import BadInput
from unmask_cli.fileio import (
    atomic_write_bytes,
    list_images,
    read_image,
    read_mask,
    remove_temp_files,
    write_image,
)


def test_modes_are_normalised_to_rgb(tmp_path, astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(astronaut).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(astronaut).convert("CMYK").save(tmp_path / "cmyk.jpg")

    assert (read_image(tmp_path / "gray.png") == gray[:, :, None]).all()
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == astronaut.shape and (out[:10, :10] == 255).all() and (out[20:, 20:] == astronaut[20:, 20:]).all()
    assert np.abs(read_image(tmp_path / "gray16.png")[:, :, 0].astype(int) - gray).max() <= 1
    for name in ("palette.png", "cmyk.jpg"):
        img = read_image(tmp_path / name)
        assert img.shape == astronaut.shape and img.dtype == np.uint8


def test_exif_rotation_is_applied(tmp_path, astronaut):
    image = Image.fromarray(astronaut[:, :400])  # 512 x 400, not square
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rotated.jpg")
    assert out.shape == (400, 512, 3)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image\n" * 10, "not an image"),
        ("random.png", bytes(range(256)) * 4, "not an image"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInput) as info:
        read_image(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_images(tmp_path, astronaut):
    write_jpeg(tmp_path / "full.jpg", astronaut)
    Image.fromarray(astronaut).save(tmp_path / "full.png")
    for name in ("full.jpg", "full.png"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(BadInput) as info:
            read_image(cut)
        assert info.value.reason in ("truncated", "corrupt") and str(cut) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, astronaut):
    path = write_jpeg(tmp_path / "locked.jpg", astronaut)
    path.chmod(0)
    with pytest.raises(BadInput, match="permission denied"):
        read_image(path)


def test_read_mask_checks(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:30] = 255
    write_image(tmp_path / "m.png", mask)
    assert read_mask(tmp_path / "m.png", (32, 32)).sum() == 12 * 26
    with pytest.raises(BadInput, match="mask map is 32x32, image is 40x32"):
        read_mask(tmp_path / "m.png", (32, 40))
    soft = mask.copy()
    soft[0, 0] = 128
    write_image(tmp_path / "soft.png", soft)
    with pytest.raises(BadInput, match="not binary"):
        read_mask(tmp_path / "soft.png")
    with pytest.raises(BadInput, match="mask map missing"):
        read_mask(tmp_path / "none.png")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # fails mid-write
    assert target.read_bytes() == b"old"
    assert remove_temp_files(tmp_path) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_png_is_lossless_and_listing_ignores_temp(tmp_path, astronaut):
    write_image(tmp_path / "x.png", astronaut)
    (tmp_path / ".x.png.unmask-tmp-123").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("hi")
    assert (read_image(tmp_path / "x.png") == astronaut).all()
    assert [p.name for p in list_images(tmp_path)] == ["x.png"]
    assert remove_temp_files(tmp_path) == 1
