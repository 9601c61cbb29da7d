"""What a processed photo keeps of its input file, so ``unmask infer`` changes the masked region and nothing else.

* metadata: EXIF (Orientation reset to 1, since pixels are read and written upright; Software, 0x0131,
  names unmask and its model; the thumbnail is dropped: it would still show the mask), ICC profile, XMP,
  JPEG comment, PNG text chunks (tEXt, zTXt, iTXt, as they were) and colour chunks (gAMA, cHRM, sRGB,
  cICP), DPI;
* encoding: JPEG quality (estimated from the input's quantization tables) and chroma subsampling,
  progressive; WebP lossless; TIFF compression;
* pixels: the mode and bit depth (grey stays grey, alpha stays, 16 bits per channel stay 16 bits, a GIF keeps
  its palette). Pixels the edit did not change keep the file's own values; the changed ones are converted
  (luminance for grey, times 257 for 16 bits, the nearest palette colour for a GIF).

:func:`read_photo` reads all of it from the input file; :func:`encode_photo` writes the edited RGB uint8
result with it. Everything goes through Pillow, except 16-bit colour pixels (Pillow holds 8 bits a channel),
which OpenCV reads and writes (a PNG then gets the metadata chunks Pillow makes spliced in).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORIENTATION, SOFTWARE, EXIF_IFD = 0x0112, 0x0131, 0x8769
DEFAULT_QUALITY = 95  # JPEG without its own tables to match, and lossy WebP
PNG_COMPRESSION = 1  # zlib level of PNG outputs (fast; lossless at any level)
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
           ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".gif": "GIF"}  # by the output's suffix; any other: PNG
# the pixel modes each format is written in; "RGB;16"/"RGBA;16" are 16 bits a channel (numpy uint16)
MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "RGBA", "L", "LA", "I;16", "RGB;16", "RGBA;16"),
         "TIFF": ("RGB", "RGBA", "L", "LA", "I;16", "RGB;16", "RGBA;16"), "BMP": ("RGB", "RGBA", "L"),
         "WEBP": ("RGB", "RGBA"), "PPM": ("RGB", "L", "I;16", "RGB;16"), "GIF": ("P", "L", "RGB")}
GREY = ("L", "LA", "I;16")
PNG_CARRIED = (b"tEXt", b"zTXt", b"iTXt", b"gAMA", b"cHRM", b"sRGB", b"cICP")  # the rest is Pillow's to write
XMP_ITXT = b"XML:com.adobe.xmp\0\0\0\0\0"  # iTXt keyword, uncompressed, no language: the XMP follows
PNG_EXIF_TEXT = (b"Raw profile type exif", b"Raw profile type APP1")  # old-style EXIF (its orientation) : dropped
METADATA_KEYS = ("exif", "icc_profile", "xmp", "comment", "pnginfo")  # Pillow save arguments
TIFF_LAYOUT_TAGS = {256, 257, 258, 259, 262, 273, 277, 278, 279, 282, 283, 284, 296, 317, 320, 322, 323, 324, 325,
                    338, 339, 700, 34675}  # a TIFF's own structure (and its XMP/ICC, written separately)
TIFF_COMPRESSIONS = ("tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits")
_QUANT_BASE = (  # ITU T.81 Annex K tables (natural order), what libjpeg scales by quality
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99),
    (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
     47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32,
)


@dataclass
class Photo:
    """What an output carries over from its input (see the module doc)."""

    format: str  # Pillow format the output is written in (by its suffix)
    mode: str  # pixel mode of the output (one of MODES[format])
    pixels: np.ndarray | None = None  # the input's own pixels in ``mode``, upright; None: made from the edit
    exif: object | None = None  # PIL.Image.Exif, orientation reset
    icc_profile: bytes | None = None
    xmp: bytes | None = None
    comment: bytes | None = None
    dpi: tuple[float, float] | None = None
    quality: int | None = None  # JPEG: estimated from the input's tables
    subsampling: int = -1  # JPEG: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, -1 = Pillow's default
    progressive: bool = False
    lossless: bool = False  # WebP
    compression: str | None = None  # TIFF
    png_chunks: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw ancillary chunks to carry
    palette: list[int] | None = None  # GIF (mode "P"): the input's palette, RGB triplets
    transparency: int | None = None  # GIF: its transparent palette index


# ------------------------------------------------------------------------------------------------ JPEG

def _ijg_tables() -> np.ndarray:
    """(100, 2, 64): the baseline tables libjpeg makes for quality 1..100."""
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)[:, None, None]
    return np.clip((np.asarray(_QUANT_BASE)[None] * scale + 50) // 100, 1, 255)


def estimate_quality(quantization: dict) -> int | None:
    """The IJG quality (1-100) whose scaled standard tables are closest to a JPEG's quantization tables
    (Pillow's ``img.quantization``, natural order); None without tables. Ties go to the higher quality."""
    tables = [np.asarray(quantization[k], np.int64).ravel() for k in sorted(quantization)[:2]]
    if not tables or any(t.size != 64 for t in tables):
        return None
    reference = _ijg_tables()
    error = sum(np.abs(reference[:, i] - t).sum(axis=1) for i, t in enumerate(tables))
    return int(100 - np.argmin(error[::-1]))


# ------------------------------------------------------------------------------------------------- PNG

def _png_chunks(handle) -> list[tuple[bytes, bytes]]:
    """(type, data) of a PNG's chunks, image data (IDAT) skipped unread."""
    handle.seek(8)
    chunks = []
    while True:
        head = handle.read(8)
        if len(head) < 8:
            return chunks
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"fdAT"):
            handle.seek(length + 4, os.SEEK_CUR)
            continue
        chunks.append((kind, handle.read(length)))
        handle.seek(4, os.SEEK_CUR)  # CRC
        if kind == b"IEND":
            return chunks


def _carried_png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """The input's text and colour chunks, plus private chunks marked safe to copy into an edited image."""
    with open(path, "rb") as handle:
        chunks = _png_chunks(handle)
    keep = []
    for kind, data in chunks:
        private_safe = kind[1:2].islower() and kind[3:4].islower()  # private, and safe to copy after an edit
        if kind in PNG_CARRIED or private_safe:
            if kind in (b"tEXt", b"zTXt", b"iTXt") and data.split(b"\0", 1)[0] in PNG_EXIF_TEXT:
                continue
            keep.append((kind, data))
    return keep


def _xmp_upright(xmp: bytes) -> bytes:
    """XMP with its tiff:Orientation (a copy of the EXIF one) set to 1, as the EXIF tag is."""
    xmp = re.sub(rb'(tiff:Orientation=")[0-9]"', rb'\g<1>1"', xmp)
    return re.sub(rb"(<tiff:Orientation>)[0-9]<", rb"\g<1>1<", xmp)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# ----------------------------------------------------------------------------------------------- reading

def _webp_lossless(path: Path) -> bool:
    """Whether a WebP file's image is coded lossless (a VP8L chunk)."""
    with open(path, "rb") as handle:
        if handle.read(12)[8:12] != b"WEBP":
            return False
        while len(head := handle.read(8)) == 8:
            kind, size = head[:4], struct.unpack("<I", head[4:])[0]
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8L"
            handle.seek(size + (size & 1), os.SEEK_CUR)
    return False


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation to a (H, W[, C]) array the way ``PIL.ImageOps.exif_transpose`` does."""
    turn = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
            5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1), 7: lambda x: np.rot90(x, 2).swapaxes(0, 1),
            8: lambda x: np.rot90(x, 1)}.get(orientation)
    return np.ascontiguousarray(turn(arr)) if turn is not None else arr


def _native_mode(img) -> str:
    """The mode an output keeps of a decoded file: RGB, RGBA, L, LA, I;16, RGB;16, RGBA;16, or P (a GIF's
    palette indices)."""
    if img.format == "GIF" and img.mode == "P":
        return "P"
    if img.mode in ("RGB", "RGBA") and any(";16" in str(tile.args) for tile in img.tile):  # raw mode RGB;16B ...
        return img.mode + ";16"
    if img.mode in ("L", "1"):
        return "L"
    if img.mode.startswith("I;16"):
        return "I;16"
    if img.mode == "I":  # e.g. a 16-bit PGM; read_image scales it to 8 bits as 16-bit data when above 255
        low, high = img.getextrema()
        return "I;16" if low >= 0 and 255 < high <= 65535 else "L"
    if img.mode in ("RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return "RGBA"
    return "LA" if img.mode == "LA" else "RGB"


def _native_pixels(img, path: Path, mode: str, orientation: int) -> np.ndarray | None:
    """The file's own pixels in ``mode``, upright (None for plain RGB: the decoded photo is them)."""
    from PIL import ImageOps

    if mode == "RGB":
        return None
    if mode.endswith(";16") and mode != "I;16":  # 16-bit colour: OpenCV (BGR[A] uint16, orientation not applied)
        import cv2

        arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        channels = 4 if mode == "RGBA;16" else 3
        if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] != channels:
            return None
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if channels == 4 else cv2.COLOR_BGR2RGB)
        return _upright(arr, orientation)
    img.load()
    img = ImageOps.exif_transpose(img)
    if mode == "I;16":
        return np.asarray(img).astype(np.uint16)
    if mode == "P":
        return np.asarray(img).copy()
    source = {"RGBA": "RGBA", "LA": "LA", "L": "L"}[mode]
    return np.asarray(img if img.mode == source else img.convert(source))


def read_photo(path: str | os.PathLike, suffix: str | None = None, shape: tuple[int, int] | None = None) -> Photo:
    """What an output written as ``suffix`` (default: the input's) keeps of the input file ``path``.
    ``shape``: the (height, width) the photo was decoded at; native pixels of another size are not used.
    A file Pillow cannot read again gives a bare :class:`Photo` (plain RGB, no metadata)."""
    import cv2
    from PIL import Image, JpegImagePlugin

    from unmask_cli.fileio import RASTER_FORMATS

    path = Path(path)
    fmt = FORMATS.get((suffix or path.suffix).lower(), "PNG")
    Image.init()
    try:
        with Image.open(path, formats=[f for f in RASTER_FORMATS if f in Image.OPEN]) as img:
            native = _native_mode(img)
            mode = native if native in MODES[fmt] else ("L" if native in GREY and "L" in MODES[fmt] else "RGB")
            exif = img.getexif()
            orientation = exif.get(ORIENTATION, 1)
            if ORIENTATION in exif:
                exif[ORIENTATION] = 1
            if img.format == "TIFF":  # its tags describe the TIFF's own layout too
                for tag in TIFF_LAYOUT_TAGS & set(exif):
                    del exif[tag]
            photo = Photo(format=fmt, mode=mode, exif=exif, xmp=img.info.get("xmp"), comment=img.info.get("comment"),
                          dpi=img.info.get("dpi"), progressive=bool(img.info.get("progressive")))
            icc = img.info.get("icc_profile")
            if icc and icc[16:20] == (b"GRAY" if mode in GREY else b"RGB "):  # its colour space must still fit
                photo.icc_profile = icc
            if img.format == "JPEG":
                photo.quality = estimate_quality(img.quantization)
                photo.subsampling = JpegImagePlugin.get_sampling(img) if img.layers == 3 else -1
            elif img.format == "PNG":
                photo.png_chunks = _carried_png_chunks(path)
            elif img.format == "WEBP":
                photo.lossless = _webp_lossless(path)
            elif img.format == "TIFF" and img.info.get("compression") in TIFF_COMPRESSIONS:
                photo.compression = img.info["compression"]
            if orientation != 1 and photo.xmp:  # XMP may repeat the orientation (tiff:Orientation)
                photo.xmp = _xmp_upright(photo.xmp)
                photo.png_chunks = [(k, XMP_ITXT + photo.xmp if k == b"iTXt" and d.startswith(XMP_ITXT[:18]) else d)
                                    for k, d in photo.png_chunks]
            if mode == native:
                photo.pixels = _native_pixels(img, path, mode, orientation)
            if mode == "P":
                photo.palette = img.getpalette()
                transparency = img.info.get("transparency")
                photo.transparency = transparency if isinstance(transparency, int) else None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, MemoryError, cv2.error):
        return Photo(format=fmt, mode="RGB")
    if (photo.pixels is None and photo.mode not in ("RGB", "L")) or (photo.mode == "P" and not photo.palette) or (
            photo.pixels is not None and shape is not None and photo.pixels.shape[:2] != tuple(shape)):
        photo.pixels, photo.mode = None, "L" if photo.mode in GREY and "L" in MODES[fmt] else "RGB"
    return photo


# ---------------------------------------------------------------------------------------------- writing

def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB (..., 3), exactly as Pillow's ``convert("L")``."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def compose(edited: np.ndarray, decoded: np.ndarray, photo: Photo) -> np.ndarray:
    """The output pixels in ``photo.mode``: the input's own pixels, except where ``edited`` (RGB uint8)
    differs from ``decoded`` (the photo as read, RGB uint8), there converted to the mode."""
    if photo.pixels is None:
        return _luminance(edited) if photo.mode == "L" else edited
    changed = (edited != decoded).any(axis=2)
    out = photo.pixels.copy()
    new = edited[changed]
    if photo.mode == "P":
        out[changed] = _nearest_colour(new, photo.palette, photo.transparency)
        return out
    if photo.mode in GREY:
        new = _luminance(new)
    if out.dtype == np.uint16:
        new = new.astype(np.uint16) * 257
    if out.ndim == 2:
        out[changed] = new
    elif new.ndim == 1:
        out[changed, 0] = new
    else:
        out[changed, :3] = new
    return out


def _nearest_colour(rgb: np.ndarray, palette: list[int], transparent: int | None) -> np.ndarray:
    """The index of the palette colour nearest to each (N, 3) uint8 colour (never the transparent one)."""
    colours = np.asarray(palette, np.int32)[: len(palette) // 3 * 3].reshape(-1, 3)
    usable = np.ones(len(colours), bool)
    if transparent is not None and transparent < len(colours) and len(colours) > 1:
        usable[transparent] = False
    candidates = np.flatnonzero(usable)
    out = np.empty(len(rgb), np.uint8)
    for start in range(0, len(rgb), 16384):
        part = rgb[start:start + 16384].astype(np.int32)
        distance = ((part[:, None, :] - colours[None, candidates, :]) ** 2).sum(axis=2)
        out[start:start + 16384] = candidates[distance.argmin(axis=1)]
    return out


def _exif_bytes(photo: Photo, software: str | None, size: tuple[int, int]) -> bytes | None:
    from PIL import Image

    exif = photo.exif if photo.exif is not None else Image.Exif()
    if photo.format == "TIFF" and photo.xmp:  # a TIFF's XMP is a tag of its IFD, written with the EXIF ones
        exif[700] = photo.xmp
    if software:
        exif[SOFTWARE] = software.encode("ascii", "replace").decode("ascii")
    if EXIF_IFD in exif:
        sub = exif.get_ifd(EXIF_IFD)
        if 0xA002 in sub and 0xA003 in sub:  # PixelXDimension, PixelYDimension: the upright size
            sub[0xA002], sub[0xA003] = size
    return exif.tobytes() if len(exif) else None


def encode_photo(edited: np.ndarray, decoded: np.ndarray, photo: Photo, software: str | None = None,
                 jpeg_quality: int | None = None) -> bytes:
    """Encode the edited photo (RGB uint8; ``decoded``: the photo as read, before the edit) as ``photo``
    says: its format, mode, bit depth, metadata and JPEG settings. ``jpeg_quality`` overrides the quality
    matched to the input; ``software`` goes into the EXIF Software tag."""
    pixels = compose(edited, decoded, photo)
    fmt = photo.format
    kwargs: dict = {}
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = _exif_bytes(photo, software, (pixels.shape[1], pixels.shape[0]))
        kwargs.update({k: v for k, v in (("exif", exif), ("icc_profile", photo.icc_profile)) if v})
    if photo.dpi and fmt in ("JPEG", "PNG", "TIFF", "BMP"):
        kwargs["dpi"] = tuple(float(d) for d in photo.dpi)
    if fmt == "JPEG":
        kwargs.update(quality=jpeg_quality or photo.quality or DEFAULT_QUALITY, optimize=True,
                      progressive=photo.progressive)
        if photo.subsampling in (0, 1, 2) and pixels.ndim == 3:
            kwargs["subsampling"] = photo.subsampling
        kwargs.update({k: v for k, v in (("comment", photo.comment), ("xmp", photo.xmp)) if v})
    elif fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for kind, data in photo.png_chunks:  # XMP travels as its iTXt chunk
            info.add(kind, data)
        kwargs.update(pnginfo=info, compress_level=PNG_COMPRESSION)
    elif fmt == "WEBP":
        kwargs.update(lossless=photo.lossless, quality=100 if photo.lossless else DEFAULT_QUALITY)
        if photo.xmp:
            kwargs["xmp"] = photo.xmp
    elif fmt == "TIFF" and photo.compression:
        kwargs["compression"] = photo.compression
    elif fmt == "GIF":  # one frame (the first of an animation); a palette photo keeps its palette
        kwargs.update({k: v for k, v in (("comment", photo.comment), ("transparency", photo.transparency))
                       if v is not None})
        if photo.mode == "P":  # as it was, unused entries included: every index keeps its colour
            kwargs.update(palette=photo.palette, optimize=False)
    try:
        return _save(pixels, fmt, kwargs)
    except (OSError, ValueError):  # metadata the format cannot hold (an EXIF over 64 KB in a JPEG ...): without
        return _save(pixels, fmt, {k: v for k, v in kwargs.items() if k not in METADATA_KEYS})


def _save(pixels: np.ndarray, fmt: str, kwargs: dict) -> bytes:
    from PIL import Image

    if pixels.dtype == np.uint16 and pixels.ndim == 3:
        return _encode_wide(pixels, fmt, kwargs)
    buffer = io.BytesIO()
    kwargs = dict(kwargs)
    palette = kwargs.pop("palette", None)
    image = Image.fromarray(pixels)
    if palette is not None:  # palette indices
        image = Image.fromarray(pixels, "P")
        image.putpalette(palette)
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _encode_wide(pixels: np.ndarray, fmt: str, kwargs: dict) -> bytes:
    """16-bit colour through OpenCV; a PNG gets the metadata chunks Pillow writes for ``kwargs`` (made on a
    1-pixel carrier image) spliced in after its header. A TIFF or PPM is written without metadata."""
    import cv2
    from PIL import Image

    from unmask_cli.errors import UnmaskError

    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    suffix = {"PNG": ".png", "TIFF": ".tif", "PPM": ".ppm"}[fmt]
    ok, buf = cv2.imencode(suffix, bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION] if fmt == "PNG" else [])
    if not ok:
        raise UnmaskError(f"cannot encode a 16-bit image as {suffix}")
    data = buf.tobytes()
    if fmt != "PNG":
        return data
    carrier = io.BytesIO()
    Image.new("RGB", (1, 1)).save(carrier, "PNG", **kwargs)
    extra = [c for c in _png_chunks(carrier) if c[0] not in (b"IHDR", b"PLTE", b"IEND", b"sBIT")]
    ihdr_end = 8 + 12 + 13  # signature + the IHDR chunk, always first
    return data[:ihdr_end] + b"".join(_png_chunk(k, d) for k, d in extra) + data[ihdr_end:]
