"""Built-in sample faces: real portraits that ship inside installed packages, with light augmentation.

They make ``unmask prepare`` (and ``make demo``) work offline on a fresh machine with no data:
scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain) and matplotlib's ``grace_hopper``
(US Navy, public domain). Each variant is a deterministic augmentation (small rotation, scale, shift,
flip, brightness/contrast/colour jitter) of one portrait, so variants are distinct images but the
same two people: good for a demo, not a benchmark.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from unmask_cli.errors import UnmaskError

PREFIX = "builtin:"


def _astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def _grace_hopper() -> np.ndarray:
    import matplotlib

    from unmask_cli.fileio import read_image

    return read_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


PORTRAITS = {"astronaut": _astronaut, "grace_hopper": _grace_hopper}


def available_portraits() -> list[str]:
    names = []
    for name, loader in PORTRAITS.items():
        try:
            loader()
        except Exception:  # an optional package missing: use the others
            continue
        names.append(name)
    if not names:
        raise UnmaskError("no built-in sample portraits found (scikit-image missing?); pass --source DIR")
    return names


@functools.lru_cache(maxsize=4)
def portrait(name: str) -> np.ndarray:
    if name not in PORTRAITS:
        raise UnmaskError(f"unknown built-in portrait '{name}'")
    return PORTRAITS[name]()


def sample_keys(count: int) -> list[str]:
    """``count`` variant keys cycling over the available portraits: ``builtin:astronaut#000`` ..."""
    names = available_portraits()
    return [f"{PREFIX}{names[i % len(names)]}#{i // len(names):03d}" for i in range(count)]


def is_builtin(key: str) -> bool:
    return key.startswith(PREFIX)


def load_variant(key: str) -> np.ndarray:
    """The augmented RGB image for a key from :func:`sample_keys` (variant 0 is the unaltered photo)."""
    import cv2

    name, _, index = key[len(PREFIX):].partition("#")
    base = portrait(name)
    variant = int(index or 0)
    if variant == 0:
        return base.copy()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    height, width = base.shape[:2]
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.06, 0.06, size=2) * (width, height)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    matrix[:, 2] += shift
    image = cv2.warpAffine(base, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image.astype(np.float32)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-20, 20)
    colour = rng.uniform(0.92, 1.08, size=3)
    image = (image - 128.0) * contrast + 128.0 + brightness
    image *= colour
    return np.ascontiguousarray(np.clip(image, 0, 255).round().astype(np.uint8))


def write_masked_photos(out_dir: str | Path, count: int = 4, mask_types: str = "surgical,n95,kn95,cloth",
                        seed: int = 0) -> list[Path]:
    """Whole photos with synthetic masks drawn over each face (for demos of ``unmask infer``).

    Masks are rendered in photo coordinates from the photo's own landmarks. Writes ``NAME.jpg`` photos
    and ``masks/NAME.png`` maps (the ground truth, usable with ``unmask infer --masks``).
    """
    from unmask_cli.faces import FaceAligner
    from unmask_cli.fileio import ensure_dir, write_image
    from unmask_cli.masks import parse_mask_types, synthesize

    out_dir = Path(out_dir)
    ensure_dir(out_dir / "masks")
    aligner = FaceAligner()
    weights = parse_mask_types(mask_types)
    rng = np.random.default_rng(seed)
    written = []
    for key in sample_keys(count):
        photo = load_variant(key)
        mask = np.zeros(photo.shape[:2], bool)
        for face in aligner.detect(photo)[:1]:  # the portrait; reflections can hold false detections
            result = synthesize(photo, face.landmarks, weights, rng)
            photo, mask = result.masked, mask | result.mask
        name = key[len(PREFIX):].replace("#", "_")
        write_image(out_dir / f"{name}.jpg", photo)
        write_image(out_dir / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
        written.append(out_dir / f"{name}.jpg")
    return written


if __name__ == "__main__":  # python -m unmask_cli.samples OUT_DIR [COUNT]
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "demo/photos"
    paths = write_masked_photos(target, int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    print(f"wrote {len(paths)} masked sample photos to {target}/ (ground-truth maps in {target}/masks/)")
