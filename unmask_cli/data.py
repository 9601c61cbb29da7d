"""The prepared-dataset layout, its manifest, the deterministic split, and the paired Dataset.

Layout (``unmask prepare --out ROOT``)::

    ROOT/original_celeba_aligned/STEM.png   aligned unmasked face
    ROOT/masked_images/STEM.png             the same face with a synthetic mask
    ROOT/mask_maps/STEM.png                 binary map (0/255, 255 = masked)
    ROOT/manifest.jsonl                     one JSON line per complete sample
    ROOT/skipped.csv                        source,reason,detail
    ROOT/prepare.json                       the settings it was prepared with (alignment among them)
    ROOT/cache/SPLIT_SIZE.npy, .json        decoded-sample cache of ``PairedDataset(cache=True)`` (below)

Decoded-sample cache (``data.cache``). Decoding three PNGs per sample is the CPU cost of every training
epoch, so ``PairedDataset(root, split, size, cache=True)`` decodes the split once, at the training size and
with the resize rules of :func:`load_triplet`, into ``ROOT/cache/SPLIT_SIZE.npy`` (``SPLIT`` is ``all`` for
``split=None``): a uint8 array (N, 7, SIZE, SIZE) of original RGB, masked RGB and the map (0/1) per sample,
read memory-mapped, so DataLoader workers share the page cache instead of decoding. ``SPLIT_SIZE.json``
beside it is written last and records what the array was built from: the stems in order, the size, and the
size and modification time of the manifest and of every sample file, plus the identity of the array file.
Any difference (a sample added or rewritten, a new manifest, another size) rebuilds the cache; a cache is
never used unless its record matches. Both files are written to temporary names and renamed into place,
so a kill during a build leaves the previous complete cache or none, and the next build removes the
temporary files. Samples that could not be read at build time are read from their PNGs on every use, so
they fail exactly as without the cache (the same one-line error item from :class:`ReportingDataset`).
The folder is outside the three image folders, so nothing that lists samples sees it; deleting it is
always safe.
"""

from __future__ import annotations

import contextlib
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


def dataset_settings(root: str | os.PathLike) -> dict:
    """The ``settings`` a prepared folder was made with (``prepare.json``); {} for a folder without them."""
    path = Path(root) / SETTINGS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("settings", {}) if path.exists() else {}
    except (ValueError, OSError, AttributeError) as err:
        raise UnmaskError(f"cannot read the dataset settings ({err})", path) from err


def dataset_framing(root: str | os.PathLike) -> tuple[str, float]:
    """The face alignment and crop a prepared folder was made with (``prepare.json``); folders from before
    they were recorded, or without settings, used the legacy ones."""
    from unmask_cli.faces import LEGACY_ALIGNMENT, LEGACY_CROP, check_alignment, check_crop

    path = Path(root) / SETTINGS_FILE
    settings = dataset_settings(root)
    try:
        return (check_alignment(settings.get("alignment", LEGACY_ALIGNMENT)),
                check_crop(float(settings.get("crop", LEGACY_CROP))))
    except (TypeError, ValueError) as err:
        raise UnmaskError(f"bad crop in the dataset settings ({err})", path) from err
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
    append_or_restore(path, data)


def append_or_restore(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync; when the write fails (full disk, file-size limit) the file is
    cut back to its previous length (a kill's partial line is dropped by the readers) and the error is one
    line naming the file."""
    try:
        with open(path, "ab", buffering=0) as handle:  # unbuffered: nothing is written after a failure
            start = handle.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[handle.write(view):]
                os.fsync(handle.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(handle.fileno(), start)
                raise
    except OSError as err:
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


CACHE_DIR = "cache"
CACHE_VERSION = 1
CACHE_CHANNELS = 7  # original RGB, masked RGB, map (0/1)


def _to_tensor(chw_uint8: np.ndarray):
    """uint8 (C,H,W) -> float tensor in [-1, 1]; one function for both paths, so their items are bitwise equal."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(chw_uint8)).float().div_(127.5).sub_(1.0)


def _file_state(path: Path | None) -> list | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return [path.name, st.st_size, st.st_mtime_ns]


def cache_paths(root: str | os.PathLike, split: str | None, image_size: int) -> tuple[Path, Path]:
    """(array file, record file) of the decoded-sample cache of one (split, size)."""
    name = f"{split or 'all'}_{int(image_size)}"
    folder = Path(root) / CACHE_DIR
    return folder / f"{name}.npy", folder / f"{name}.json"


class PairedDataset:
    """torch Dataset over a prepared folder. Items: ``masked`` (3,H,W) and ``original`` in [-1, 1],
    ``mask`` (1,H,W) in {0, 1}, and ``stem``.

    ``cache=True`` serves the items from the decoded-sample cache (module docstring), building it here,
    in the constructing process, when it is missing or stale; items are bitwise the same tensors."""

    def __init__(self, root: str | os.PathLike, split: str | None = "train", image_size: int | None = None,
                 cache: bool = False):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.stems = dataset_stems(self.root, split)
        self.cache = bool(cache)
        self._array = None  # the memory map, opened lazily in each process (never pickled to workers)
        self._unreadable: frozenset[int] = frozenset()
        if self.cache:
            if image_size is None:
                raise UnmaskError("the data cache needs a fixed image size (set data.image_size)", self.root)
            self.cache_file, self.cache_record = cache_paths(self.root, split, image_size)
            self._unreadable = frozenset(self._ensure_cache())

    def __len__(self) -> int:
        return len(self.stems)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __getitem__(self, index: int) -> dict:
        import torch

        stem = self.stems[index]
        if self.cache and index not in self._unreadable:
            if self._array is None:
                self._array = np.load(self.cache_file, mmap_mode="r")
            block = np.array(self._array[index])  # one copy out of the map, (7, H, W)
            original, masked, mask = block[0:3], block[3:6], block[6:7]
            return {"masked": _to_tensor(masked), "original": _to_tensor(original),
                    "mask": torch.from_numpy(mask).float(), "stem": stem}
        # the PNG path; with the cache also the samples that were unreadable when it was built, so they
        # raise the same error here (or load, if fixed since)
        original, masked, mask = load_triplet(self.root, stem, self.image_size)
        return {
            "masked": _to_tensor(masked.transpose(2, 0, 1)),
            "original": _to_tensor(original.transpose(2, 0, 1)),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "stem": stem,
        }

    # ----------------------------------------------------------------------------------- the cache

    def _fingerprint(self) -> dict:
        """What the cache must have been built from: any change to a sample file (they are rewritten by
        rename, so the time changes), the manifest or the stems makes it stale."""
        files = []
        for stem in self.stems:
            files.append([_file_state(_find(self.root / sub, stem)) for sub in SUBDIRS])
        digest = hashlib.sha256(json.dumps([self.stems, files], separators=(",", ":")).encode(
            "utf-8", "surrogateescape")).hexdigest()
        return {"version": CACHE_VERSION, "split": self.split, "size": int(self.image_size),
                "count": len(self.stems), "manifest": _file_state(self.root / MANIFEST), "samples": digest}

    def _valid_record(self, fingerprint: dict) -> list[int] | None:
        """The unreadable indices of a cache that matches ``fingerprint``; None when it is missing or stale."""
        try:
            record = json.loads(self.cache_record.read_text(encoding="utf-8"))
            st = self.cache_file.stat()
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("built_from") != fingerprint:
            return None
        if record.get("array") != [st.st_size, st.st_mtime_ns, st.st_ino]:  # the array it was written with
            return None
        try:
            shape = np.load(self.cache_file, mmap_mode="r").shape
        except (OSError, ValueError):
            return None
        if shape != (len(self.stems), CACHE_CHANNELS, self.image_size, self.image_size):
            return None
        return [int(i) for i in record.get("unreadable", [])]

    def _ensure_cache(self) -> list[int]:
        fingerprint = self._fingerprint()
        unreadable = self._valid_record(fingerprint)
        if unreadable is not None:
            return unreadable
        from unmask_cli.fileio import ensure_dir

        folder = ensure_dir(self.cache_file.parent)
        with _cache_lock(folder):  # one builder at a time; a second one then finds the fresh cache
            unreadable = self._valid_record(fingerprint)
            if unreadable is None:
                unreadable = self._build_cache(folder, fingerprint)
        return unreadable

    def _build_cache(self, folder: Path, fingerprint: dict) -> list[int]:
        import shutil

        from unmask_cli.fileio import atomic_output, atomic_write_text, remove_temp_files

        remove_temp_files(folder)  # what a killed build left (we hold the lock, so no build is running)
        self.cache_record.unlink(missing_ok=True)  # from here on the old array is being replaced
        size = int(self.image_size)
        shape = (len(self.stems), CACHE_CHANNELS, size, size)
        needed = int(np.prod(shape))
        free = shutil.disk_usage(folder).free
        old = self.cache_file.stat().st_size if self.cache_file.exists() else 0
        if needed > free + old:
            raise UnmaskError(f"not enough disk space for the data cache ({needed / 2**30:.2f} GiB needed, "
                              f"{(free + old) / 2**30:.2f} GiB free); free some or set data.cache=false",
                              self.cache_file)
        unreadable: list[int] = []
        blank = np.zeros((CACHE_CHANNELS, size, size), np.uint8)
        # sequential writes, not a writable memory map: a full disk is then an OSError (a one-line error),
        # not a SIGBUS
        with atomic_output(self.cache_file, fsync=True, what="cannot write the data cache") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                         "shape": shape})
            for index, block in enumerate(_decode_all(self.root, self.stems, size)):
                if block is None:
                    unreadable.append(index)
                    block = blank
                handle.write(block.tobytes())
        st = self.cache_file.stat()
        record = {"built_from": fingerprint, "array": [st.st_size, st.st_mtime_ns, st.st_ino],
                  "unreadable": unreadable, "stems": self.stems}
        atomic_write_text(self.cache_record, json.dumps(record) + "\n")
        return unreadable


CACHE_BUILD_PARALLEL_MIN = 256  # samples; below this, starting decode processes costs more than it saves
CACHE_BUILD_WORKERS = 8


class _Decoded:
    """The packed (7, SIZE, SIZE) uint8 block of each sample, or None when it cannot be read."""

    def __init__(self, root: Path, stems: list[str], size: int):
        self.root, self.stems, self.size = root, stems, size

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> np.ndarray | None:
        try:
            original, masked, mask = load_triplet(self.root, self.stems[index], self.size)
        except UnmaskError:
            return None
        block = np.empty((CACHE_CHANNELS, self.size, self.size), np.uint8)
        block[0:3] = original.transpose(2, 0, 1)
        block[3:6] = masked.transpose(2, 0, 1)
        block[6] = mask
        return block


def _as_is(item):
    return item


def _ignore_sigint(worker_id: int) -> None:
    """Build workers leave a Ctrl-C to the main process, which stops the build (as the trainer's workers do)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_all(root: Path, stems: list[str], size: int):
    """The blocks in stem order; a large split is decoded by several processes (a DataLoader keeps the order)."""
    decoded = _Decoded(root, stems, size)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    workers = min(cpus, CACHE_BUILD_WORKERS)
    if len(stems) < CACHE_BUILD_PARALLEL_MIN or workers < 2:
        yield from (decoded[i] for i in range(len(decoded)))
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(decoded, batch_size=None, num_workers=workers, collate_fn=_as_is,
                          worker_init_fn=_ignore_sigint)


class _cache_lock:
    """An exclusive ``flock`` on ``FOLDER/.lock`` (released by the OS if the holder dies)."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        import fcntl

        try:
            self.handle = open(self.path, "a")
        except OSError as err:
            raise UnmaskError(f"cannot write the data cache ({err.strerror or err})", self.path) from err
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


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
