"""Files: robust image reading (any mode, EXIF rotation, 16-bit), atomic writes, image listing.

Every write goes to a temporary file in the destination folder and is renamed into place, so a kill at
any moment leaves either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from unmask_cli.errors import BadInput, UnmaskError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")  # GIF: its first frame
TMP_MARK = ".unmask-tmp-"
MAX_PIXELS = 120_000_000
# Pillow decoders allowed on untrusted files: plain raster formats only (EPS/PDF would run Ghostscript).
RASTER_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM", "GIF", "TGA", "ICO", "DIB")  # ~11000x11000; larger files are refused, not decoded


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def file_mode() -> int:
    """0666 minus the umask: the mode a plain ``open(path, "w")`` gives (mkstemp files are 0600)."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, fsync: bool = False, what: str = "cannot write"):
    """Yield a binary handle on a temp file beside ``path``; on success it is (optionally fsynced and)
    renamed into place, on any failure removed. An OS error (full disk, read-only folder ...) becomes a
    one-line :class:`UnmaskError` naming the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(err, OSError):
            raise UnmaskError(f"{what} ({err.strerror or err})", path) from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, fsync) as handle:
        handle.write(data)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a folder (and its parents); an OS error is a one-line :class:`UnmaskError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnmaskError(f"cannot create folder ({err.strerror or err})", path) from err
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))  # non-UTF-8 file names round-trip


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete temporary files a killed run left in ``folder`` (never complete outputs). Returns how many."""
    count = 0
    folder = Path(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            if TMP_MARK in entry.name:
                entry.unlink(missing_ok=True)
                count += 1
    return count


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Files of ``folder`` with an image extension, sorted by name (hidden and temporary files excluded)."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and not p.name.startswith(".") and TMP_MARK not in p.name and is_image_name(p)
    )


def list_entries(folder: str | os.PathLike) -> list[Path]:
    """Every visible entry of ``folder`` (sorted): files, folders, links, FIFOs ...; hidden and temporary
    ones excluded. For jobs that list what they did not read (a sub-folder, a FIFO) with a reason."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".") and TMP_MARK not in p.name)


def entry_problem(path: str | os.PathLike) -> BadInput | None:
    """Why ``path`` cannot be read as an image file before opening it (a folder, a broken link, a FIFO,
    socket or device, which would block or never end), or None for a regular file (or a link to one)."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return BadInput(f"broken symbolic link (its target {os.readlink(path)} does not exist)", path,
                            "broken link")
        return BadInput("file not found (removed while running?)", path, "unreadable")
    except OSError as err:
        return BadInput(f"cannot read file ({err.strerror or err})", path, "unreadable")
    if stat.S_ISDIR(mode):
        return BadInput("is a folder, not an image file", path, "folder")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        return BadInput(f"not a regular file ({kind})", path, "not a regular file")
    return None


def list_files(folder: str | os.PathLike) -> list[Path]:
    """The visible entries of ``folder`` a user may have meant as inputs (sorted): regular files, broken
    symbolic links, and sub-folders named like images (``2019.jpg/``). Callers read each one and report
    the failures (non-images, folders, broken links) as skipped; other sub-folders are not inputs."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists())
                                           or (p.is_dir() and is_image_name(p)))
    )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):  # 32-bit integer modes ("I"): assume 16-bit range if it fits
        top = 65535 if arr.max(initial=0) > 255 else 255
        return np.clip(arr.astype(np.float64) * 255.0 / top, 0, 255).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):  # "F" mode: [0,1] or [0,255]
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(arr * 255.0 / top, 0, 255).round().astype(np.uint8)
    raise BadInput(f"unsupported pixel type {arr.dtype}", reason="unsupported format")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image Pillow can decode as an RGB uint8 array (H, W, 3).

    EXIF orientation is applied; grayscale is expanded; alpha is composited over white; 16-bit and
    float images are scaled to 8 bits. Failures raise :class:`BadInput` naming the file and the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    problem = entry_problem(path)
    if problem is not None:
        raise problem
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadInput(f"cannot read file ({err.strerror or err})", path, "unreadable") from err
    if size == 0:
        raise BadInput("empty file (0 bytes)", path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            Image.init()
            with Image.open(path, formats=[f for f in RASTER_FORMATS if f in Image.OPEN]) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadInput(
                        f"image too large ({img.width}x{img.height} > {MAX_PIXELS} pixels)", path, "too large"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return _pil_to_rgb(img)
    except BadInput:
        raise
    except PermissionError as err:
        raise BadInput("permission denied", path, "unreadable") from err
    except UnidentifiedImageError as err:
        raise BadInput("not an image or unsupported format", path, "not an image") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadInput("image too large (decompression bomb guard)", path, "too large") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err) or err.__class__.__name__
        reason = "truncated" if "truncated" in text.lower() else "corrupt"
        raise BadInput(f"corrupt or truncated image ({text})", path, reason) from err


def _pil_to_rgb(img) -> np.ndarray:
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if img.mode in ("RGB",):
        return np.asarray(img)
    if img.mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    # 16-bit / 32-bit / float single channel modes ("I;16", "I;16B", "I", "F")
    arr = _to_uint8(np.asarray(img))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None, binary: bool = True) -> np.ndarray:
    """Read a mask map as a bool (H, W) array. Must be binary (0 and 255/1 only) unless ``binary=False``."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise BadInput("mask map missing", path, "missing mask")
    rgb = read_image(path)
    gray = rgb[:, :, 0] if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 0] == rgb[:, :, 2]).all() else \
        np.asarray(Image.fromarray(rgb).convert("L"))
    if expected_hw is not None and gray.shape != tuple(expected_hw):
        raise BadInput(
            f"mask map is {gray.shape[1]}x{gray.shape[0]}, image is {expected_hw[1]}x{expected_hw[0]}",
            path, "mask size mismatch",
        )
    if binary:
        values = np.unique(gray)
        if not set(values.tolist()) <= {0, 1, 255}:
            raise BadInput(f"mask map is not binary ({len(values)} grey levels; expected 0 and 255)", path, "mask not binary")
    return gray > 127 if gray.max(initial=0) > 1 else gray > 0


def encode_image(rgb: np.ndarray, suffix: str = ".png", quality: int = 95) -> bytes:
    """Encode an RGB (H,W,3) or gray (H,W) uint8 array; ``suffix`` picks the format."""
    import cv2

    suffix = suffix.lower()
    arr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif suffix == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    else:
        params = []
    ok, buf = cv2.imencode(suffix if suffix in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff") else ".png",
                           arr, params)
    if not ok:
        raise UnmaskError(f"cannot encode image as {suffix}")
    return buf.tobytes()


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Atomically write an image; the format follows the file extension (PNG is lossless)."""
    path = Path(path)
    atomic_write_bytes(path, encode_image(rgb, path.suffix or ".png", quality))
