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
