"""The prepared-dataset layout, its manifest, the deterministic split, and the paired Dataset.

Layout (``unmask prepare --out ROOT``)::

    ROOT/original_celeba_aligned/STEM.png   aligned unmasked face
    ROOT/masked_images/STEM.png             the same face with a synthetic mask
    ROOT/mask_maps/STEM.png                 binary map (0/255, 255 = masked)
    ROOT/manifest.jsonl                     one JSON line per complete sample
    ROOT/skipped.csv                        source,reason,detail
    ROOT/prepare.json                       the settings it was prepared with (alignment among them)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from unmask_cli.errors import BadInput, UnmaskError

ORIGINAL_DIR = "original_celeba_aligned"
MASKED_DIR = "masked_images"
MASK_DIR = "mask_maps"
SUBDIRS = (ORIGINAL_DIR, MASKED_DIR, MASK_DIR)
MANIFEST = "manifest.jsonl"
SKIPPED = "skipped.csv"
SETTINGS_FILE = "prepare.json"
SPLITS = ("train", "val", "test")
_UNSAFE_STEM = re.compile(r"[/\\\x00]")


def split_of(source_key: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Deterministic split by source image: a hash of its name, so every face of one photo (and every
    reuse of it) lands in the same split, independent of processing order."""
    digest = hashlib.sha256(f"{seed}:{source_key}".encode("utf-8", "surrogateescape")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def dataset_alignment(root: str | os.PathLike) -> str:
    """The face alignment a prepared folder was made with (``prepare.json``); folders from before the
    alignment was recorded, or without settings, used the legacy one."""
    from unmask_cli.faces import LEGACY_ALIGNMENT, check_alignment

    path = Path(root) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings", {}) if path.exists() else {}
    except (ValueError, OSError, AttributeError) as err:
        raise UnmaskError(f"cannot read the dataset settings ({err})", path) from err
    try:
        return check_alignment(settings.get("alignment", LEGACY_ALIGNMENT))
    except UnmaskError as err:
        raise UnmaskError(str(err), path) from err


def check_stem(stem: str, where: str | os.PathLike) -> str:
    """Refuse stems that could escape the data folder (absolute paths, '..', separators)."""
    if not isinstance(stem, str) or not stem or stem.startswith(".") or _UNSAFE_STEM.search(stem):
        raise UnmaskError(f"unsafe sample name {stem!r} (must be a plain file name, no folders)", where)
    return stem


def read_manifest(root: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Complete manifest records. A partial last line (a kill during an append) is ignored, and with
    ``repair=True`` cut from the file; a corrupt line elsewhere is an error naming the line."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        is_last = number == len(lines)
        if not line.strip():
            if not is_last:
                good_end += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "stem" not in record:
                raise ValueError("not a sample record")
        except (ValueError, UnicodeDecodeError) as err:
            if is_last:  # partial final line: the write was interrupted
                break
            raise UnmaskError(f"corrupt manifest line {number} ({err})", path) from err
        if is_last:  # complete JSON but no newline yet: treat as interrupted too
            break
        check_stem(record["stem"], path)
        records.append(record)
        good_end += len(line) + 1
    if repair and good_end != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return records


def append_manifest(root: str | os.PathLike, records: list[dict]) -> None:
    """Append complete lines and fsync, so a record exists only after its three files do."""
    if not records:
        return
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    path = Path(root) / MANIFEST
    try:
        with open(path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:  # a partial line is dropped by read_manifest on the next run
        raise UnmaskError(f"cannot write ({err.strerror or err})", path) from err


def sample_paths(root: str | os.PathLike, stem: str) -> tuple[Path, Path, Path]:
    root = Path(root)
    return tuple(root / sub / f"{stem}.png" for sub in SUBDIRS)  # type: ignore[return-value]


def _find(folder: Path, stem: str) -> Path | None:
    direct = folder / f"{stem}.png"
    if direct.exists():
        return direct
    for candidate in folder.glob(f"{glob_escape(stem)}.*"):
        return candidate
    return None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def dataset_stems(root: str | os.PathLike, split: str | None) -> list[str]:
    """Stems of ``split`` from the manifest; a folder without a manifest (just the three sub-folders)
    gives every stem of ``masked_images/`` for any split."""
    root = Path(root)
    if not root.is_dir():
        raise UnmaskError("data folder not found", root)
    missing = [s for s in SUBDIRS if not (root / s).is_dir()]
    if missing:
        raise UnmaskError(f"not a prepared dataset (missing {', '.join(missing)}/); run 'unmask prepare'", root)
    records = read_manifest(root)
    if records:
        if split is not None and split not in SPLITS:
            raise UnmaskError(f"unknown split '{split}' (train, val, test)")
        return [r["stem"] for r in records if split is None or r.get("split") == split]
    from unmask_cli.fileio import list_images

    return [check_stem(p.stem, root / MASKED_DIR) for p in list_images(root / MASKED_DIR)]


def load_triplet(root: Path, stem: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original RGB uint8, masked RGB uint8, mask bool) for one sample, resized to ``size`` if given
    (images with area/linear interpolation, the map with nearest neighbour)."""
    import cv2

    from unmask_cli.fileio import read_image, read_mask

    paths = []
    for sub in SUBDIRS:
        found = _find(root / sub, stem)
        if found is None:
            raise BadInput(f"missing {sub}/{stem}.*", root / sub, "missing file")
        paths.append(found)
    original = read_image(paths[0])
    masked = read_image(paths[1])
    if original.shape != masked.shape:
        raise BadInput(f"masked image is {masked.shape[1]}x{masked.shape[0]}, original is "
                       f"{original.shape[1]}x{original.shape[0]}", paths[1], "size mismatch")
    mask = read_mask(paths[2], masked.shape[:2])
    if size is not None and masked.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if masked.shape[0] > size else cv2.INTER_LINEAR
        original = cv2.resize(original, (size, size), interpolation=interp)
        masked = cv2.resize(masked, (size, size), interpolation=interp)
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
        masked = np.where(mask[:, :, None], masked, original)  # keep "equal outside the map" after resizing
    return original, masked, mask


class PairedDataset:
    """torch Dataset over a prepared folder. Items: ``masked`` (3,H,W) and ``original`` in [-1, 1],
    ``mask`` (1,H,W) in {0, 1}, and ``stem``."""

    def __init__(self, root: str | os.PathLike, split: str | None = "train", image_size: int | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.stems = dataset_stems(self.root, split)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict:
        import torch

        stem = self.stems[index]
        original, masked, mask = load_triplet(self.root, stem, self.image_size)

        def to_tensor(rgb: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)

        return {
            "masked": to_tensor(masked),
            "original": to_tensor(original),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "stem": stem,
        }


class ReportingDataset:
    """Wraps a :class:`PairedDataset` so that an unreadable sample becomes ``{"stem", "error"}`` (the
    one-line message naming the file) instead of an exception inside a DataLoader worker. Callers decide:
    training stops with that message, evaluation skips and lists the sample."""

    def __init__(self, dataset: PairedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except UnmaskError as err:
            return {"stem": self.dataset.stems[index], "error": str(err)}
