"""``unmask infer``: remove face masks from a folder of photos (or of aligned face crops) with a trained GAN.

Pipeline per input file:

* whole photos (default): find every face (YuNet by default, then 68 landmarks; with ``--masks``, masks no
  detected face explains are taken as masked faces the detector missed, see
  :meth:`unmask_cli.faces.FaceAligner.find_faces`), align each one the way the checkpoint's training data
  was aligned (``visible``: from the eyes of the upper face; ``ffhq``: eyes and mouth) at the face's own
  resolution (crop side = the alignment square measured in photo pixels, clamped to [model size, 1024]),
  shrink the crop to the model size, get the map (the
  ``--masks`` map warped into the crop with nearest neighbour, or the map module's prediction, decided per
  face by :func:`mask_decision`: specks dropped, and a face whose map covers less than
  ``infer.min_mask_area`` of its crop wears no mask and is left untouched), run the editing module, take the generated pixels only inside the map (scaled back to the crop resolution) and
  paste the crop back with ``faces.paste_back`` (feathered blend limited to the dilated map). Pixels the
  blend does not reach are returned untouched.
* aligned crops (``aligned=True``): the file itself is the crop; the map is read at (or predicted and
  scaled to) the input size, so every pixel outside the map is byte-identical to the input.

Why align at the face's own resolution instead of at the model size: the model only ever sees an
``image_size`` crop, but the composite (input outside the map, generated pixels inside it) and the paste
back happen at the crop resolution. A native-resolution crop keeps the supplied map exact, and the
feathered ring around the map (where input and crop are blended) is resampled ~1:1 instead of being
blurred by a 64/256-px round trip.

Outputs keep the input's name, size, format and what :mod:`unmask_cli.photo_meta` carries over: EXIF
(Orientation reset to 1, Software naming unmask and the model), ICC profile, XMP, JPEG comment, PNG text
chunks, DPI; JPEG quality (estimated from the input's quantization tables, or ``infer.jpeg_quality``)
and chroma subsampling; mode and bit depth (grey stays grey, alpha stays, 16-bit stays 16-bit with the
untouched pixels' own values). PNG/TIFF/BMP (and lossless WebP) keep untouched pixels bit-identical;
those of a JPEG change by the re-encoding only. Photos are read with EXIF orientation applied and written upright;
``--masks`` maps must match the photo as displayed. A photo without a usable face (or whose faces all
wear no mask) is copied byte for byte; in a group photo each face is judged on its own, and the
paste-back reaches only the masked faces' maps (feathered), so every other pixel of a lossless output is
unchanged.

Faces of several photos are batched together (``batch_size`` crops per forward pass); photos are held
in memory only until their last face is done. Every output is written atomically and then recorded in
``OUT_DIR/.unmask-infer.json`` (:class:`OutputRecord`: the model's sha256 and the settings that change
outputs, the input's size and time, each file's size, sha256 and image size); a rerun skips an input only
when its record matches (same model and settings, same input, files exactly as written) unless
``overwrite=True``, and redoes the rest, saying why (a zero-byte, truncated or edited output, other
settings, a changed input, or no record). The record is saved every couple of seconds and at the end
(also on Ctrl-C); an output a kill left unrecorded is redone, never trusted. Speed: ``torch.inference_mode``,
the device policy of :func:`unmask_cli.device.setup_device` (fp16 autocast and channels_last on CUDA)
with channels_last on the CPU as well (``setup_device(inference=True)``), and BatchNorm folded into the
preceding (transposed) convolution (tests/test_inference.py holds it to plain eager fp32 within 1e-4 on
the [-1, 1] output; benchmarks/infer.py measures both).

Settings come from the ``infer`` section of the config (:class:`unmask_cli.config.InferConfig`, where
every default lives); :class:`InferJob` is one run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unmask_cli.config import InferConfig
from unmask_cli.device import DeviceSetup, setup_device
from unmask_cli.errors import BadInput, UnmaskError
from unmask_cli.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    encode_image,
    ensure_dir,
    entry_problem,
    is_image_name,
    list_entries,
    list_files,
    read_image,
    read_mask,
    remove_temp_files,
    sha256_file,
)
from unmask_cli.photo_meta import encode_photo, read_photo
from unmask_cli.tensors import from_uint8, to_uint8

MASKS_SUBDIR = "masks"
COMPARE_SUBDIR = "compare"
SKIPPED_CSV = "skipped.csv"
MAX_CROP = 1024  # largest native-resolution face crop (px)
JPEG_QUALITY = 95  # of the compare/ side-by-sides (outputs match their input's quality)
NO_FACE_REASONS = ("no face", "face too small", "too small")  # FaceAligner.find_faces reasons -> copied through
RECORD_FILE = ".unmask-infer.json"  # OUT_DIR's record of what made each output (OutputRecord)
RECORD_FORMAT = "unmask-infer"
RECORD_SAVE_S = 2.0  # the record is saved at most this often while running (and always at the end)
# why an output that was there is made again (InferSummary.redone_*): the reason -> the summary's words
REDO_REASONS = {
    "corrupt": "output corrupt or changed since written (zero-byte, truncated, edited)",
    "changed settings": "made with another model or other settings",
    "changed input": "input changed since",
    "unrecorded": "no record of how it was made (an older unmask, or a kill before the record was saved)",
}


@dataclass
class InferSummary:
    in_dir: str
    out_dir: str
    checkpoint: str
    device: str = ""
    mode: str = "photos"  # "photos" (detect + align + paste back) | "aligned" (inputs are face crops)
    mask_source: str = "predicted"  # "predicted" (map module) | "supplied" (--masks)
    detector: str = "yunet"  # face detector of "photos" mode (unmask_cli.faces.DETECTORS)
    alignment: str = "visible"  # how faces are aligned: the alignment of the checkpoint's training data
    image_size: int = 0
    weights: str = "G"  # the generator weights used: G, or its EMA (train.ema_decay > 0)
    files: int = 0  # visible files in IN_DIR
    processed: int = 0  # outputs written with at least one face unmasked
    faces: int = 0  # faces unmasked
    faces_from_maps: int = 0  # masked faces the detector missed, located from the --masks map
    faces_empty_map: int = 0  # faces without a mask (an empty map, or a predicted one below min_mask_area): untouched
    no_face: int = 0  # photos without a usable face: copied through byte for byte
    unchanged: int = 0  # photos/crops with faces but none wearing a mask: copied through
    already_done: int = 0  # outputs an earlier run made with the same model and settings, intact: not redone
    redone_files: list[tuple[str, str]] = field(default_factory=list)  # (file, a REDO_REASONS key)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_files: list[tuple[str, str, str]] = field(default_factory=list)  # (file, reason, message)
    no_face_files: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0
    folded_bn: bool = False
    global_step: int = 0  # the loaded checkpoint's training steps
    release_sha256: str | None = None  # a release file's sha256, verified against its sidecar when loaded

    def redone_for(self, reason: str) -> int:
        """Outputs redone for one of the REDO_REASONS."""
        return sum(1 for _, why in self.redone_files if why == reason)

    @property
    def redone(self) -> int:
        return len(self.redone_files)

    @property
    def redone_corrupt(self) -> int:  # zero-byte, truncated or edited since written
        return self.redone_for("corrupt")

    @property
    def redone_changed_settings(self) -> int:  # made with another model or other settings
        return self.redone_for("changed settings")

    @property
    def redone_changed_input(self) -> int:  # the input changed since
        return self.redone_for("changed input")

    @property
    def redone_unrecorded(self) -> int:  # no record of how it was made
        return self.redone_for("unrecorded")

    @property
    def handled(self) -> int:
        """Images this run wrote an output for (unmasked or copied through)."""
        return self.processed + self.no_face + self.unchanged

    @property
    def rate(self) -> float:
        return self.handled / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------- fast network

def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) where every BatchNorm2d that directly follows a Conv2d or
    ConvTranspose2d inside an ``nn.Sequential`` is folded into that convolution (and replaced by Identity).

    Exact in real arithmetic for eval-mode BN (running statistics); in fp32 the outputs match the
    unfolded network to rounding (< 1e-4 on the generator's [-1, 1] output).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for parent in net.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if not (isinstance(bn, nn.BatchNorm2d) and isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d))):
                continue
            if bn.running_mean is None or bn.running_var is None or conv.groups != 1:
                continue
            parent._modules[first] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
            parent._modules[second] = nn.Identity()
    return net


class Unmasker:
    """G (and M) prepared for fast batched inference under one :class:`DeviceSetup`."""

    def __init__(self, G: nn.Module, M: nn.Module | None, image_size: int, setup: DeviceSetup,
                 threshold: float = 0.5, fold_bn: bool = True, min_mask_area: float = 0.0):
        self.setup = setup
        self.device = setup.device
        self.image_size = image_size
        self.threshold = threshold
        self.min_mask_area = min_mask_area
        self.folded = fold_bn
        prep = fold_batchnorm if fold_bn else (lambda n: copy.deepcopy(n).eval())
        self.G = setup.module(prep(G)).eval()
        self.M = setup.module(prep(M)).eval() if M is not None else None

    def describe(self) -> str:
        extras = ["inference_mode"] + (["BN folded"] if self.folded else [])
        return f"{self.setup.describe()}, {', '.join(extras)}"

    def _images(self, nhwc: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1] on the device. The uint8 buffer is what crosses to
        the device (a quarter of the float bytes), and its NHWC layout already is channels_last."""
        t = torch.from_numpy(np.ascontiguousarray(nhwc)).to(self.device, non_blocking=self.device.type == "cuda")
        return self.setup.batch(from_uint8(t))

    def __call__(self, images: np.ndarray, maps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``images`` (N, S, S, 3) uint8, ``maps`` (N, S, S) bool or None (predict them).

        Returns the composites (N, S, S, 3) uint8 (input outside the map, generated inside) and the maps.
        """
        from unmask_cli.models import composite, generator_input, predict_map

        if maps is None and self.M is None:
            raise UnmaskError("no mask maps given and the checkpoint has no map module")
        with torch.inference_mode(), self.setup.autocast():
            x = self._images(images)
            if maps is None:
                predicted = predict_map(self.M, x, self.threshold)[:, 0].cpu().numpy() > 0.5
                cleaned = np.stack([mask_decision(p, self.min_mask_area) for p in predicted])
                m = self.setup.batch(torch.from_numpy(cleaned[:, None].astype(np.float32)))
            else:
                m = self.setup.batch(torch.from_numpy(maps[:, None].astype(np.float32)))
            generated = self.G(generator_input(x, m)).float()
            out = to_uint8(composite(x, m, generated))
            maps_np = (m[:, 0] > 0.5).cpu().numpy()
        return out, maps_np


def mask_decision(predicted: np.ndarray, min_area: float) -> np.ndarray:
    """Does this face wear a mask? ``predicted`` (S, S) bool map of the map module. Specks (connected parts
    below a tenth of ``min_area`` of the crop) are dropped; when what is left covers less than ``min_area``
    of the crop the face wears no mask and the map is empty (the face is then left untouched)."""
    import cv2

    if min_area <= 0 or not predicted.any():
        return predicted
    total = predicted.size
    count, labels, stats, _ = cv2.connectedComponentsWithStats(predicted.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 0.1 * min_area * total
    cleaned = keep[labels]
    return cleaned if cleaned.sum() >= min_area * total else np.zeros_like(predicted)


# ----------------------------------------------------------------------------------------- image helpers

def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _map_down(mask: np.ndarray, size: int) -> np.ndarray:
    """Map at the model size: a model pixel is masked when any source pixel it covers is (conservative)."""
    import cv2

    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 1e-6


def _map_up(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise UnmaskError(f"cannot write ({err.strerror or err})", path) from err


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or path.is_relative_to(folder)


# ------------------------------------------------------------------------------------------ work items

@dataclass
class _Face:
    item: _Item
    model_in: np.ndarray  # (S, S, 3) uint8
    model_map: np.ndarray | None  # (S, S) bool, None = predict
    crop: np.ndarray  # crop at its own resolution (the whole input in aligned mode)
    crop_map: np.ndarray | None  # bool at crop resolution (supplied), None = from the prediction
    matrix: np.ndarray | None  # photo -> crop (None in aligned mode)


@dataclass
class _Item:
    path: Path
    key: str  # name of the side outputs (masks/KEY.png, compare/KEY.jpg)
    output: Path
    image: np.ndarray  # RGB uint8 as decoded (alpha composited over white)
    photo_map: np.ndarray | None  # supplied whole-photo map
    faces: list[_Face] = field(default_factory=list)
    pending: int = 0
    result: np.ndarray | None = None
    used_map: np.ndarray | None = None
    edited_faces: int = 0
    empty_faces: int = 0  # faces whose (supplied) map is empty: not sent to the network
    identity: list[int] = field(default_factory=list)  # the input's [size, mtime_ns] when it was read
    redo: str | None = None  # why the output already there is made again (a REDO_REASONS key)


class _MaskIndex:
    """Mask maps of ``--masks DIR`` by file stem (any image extension; ``.png`` preferred)."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise UnmaskError("mask folder not found" if not folder.exists() else "mask path is not a folder", folder)
        self.folder = folder
        self.by_stem: dict[str, Path] = {}
        for p in list_files(folder):
            if is_image_name(p) and (p.stem not in self.by_stem or p.suffix.lower() == ".png"):
                self.by_stem[p.stem] = p

    def find(self, stem: str, image_path: Path) -> Path:
        found = self.by_stem.get(stem)
        if found is None:
            raise BadInput(f"no mask map {stem}.* in {self.folder}", image_path, "missing mask")
        return found


# ------------------------------------------------------------------------------------------ the record

def _identity(path: Path) -> list[int]:
    """What tells that an input changed: its size and modification time (ns)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _header_size(data: bytes | Path) -> list[int] | None:
    """(width, height) from an image's header (not decoded); None when Pillow cannot identify it."""
    from PIL import Image

    from unmask_cli.fileio import RASTER_FORMATS

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data,
                        formats=[f for f in RASTER_FORMATS if f in Image.OPEN]) as img:
            return list(img.size)
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


class OutputRecord:
    """``OUT_DIR/.unmask-infer.json``: how each output was made, so a rerun keeps only what it would make
    again. ``settings``: settings key -> the model's sha256 and the settings that change outputs;
    ``outputs``: output name -> {settings key, the input's [size, mtime_ns], each file written for it
    (``name``, ``masks/KEY.png``, ``compare/KEY.jpg``) -> [bytes, sha256], the output's header size}.

    An entry is added only after its files are written (atomically), and the record itself is written
    atomically, so a kill leaves at worst an output without an entry (then redone), never an entry for a
    file that is not complete."""

    def __init__(self, out_dir: Path, settings: dict):
        self.path = out_dir / RECORD_FILE
        self.out_dir = out_dir
        self.settings = settings
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.doc = self._read()
        self.dirty = False
        self.saved_at = time.monotonic()

    def _read(self) -> dict:
        empty = {"format": RECORD_FORMAT, "version": 1, "settings": {}, "outputs": {}}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8", errors="surrogateescape"))
        except (OSError, ValueError):  # none yet, or unreadable: every output there counts as unrecorded
            return empty
        if (not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT
                or not isinstance(doc.get("settings"), dict) or not isinstance(doc.get("outputs"), dict)):
            return empty
        return doc

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out_dir).as_posix()

    def check(self, name: str, source: Path, targets: list[Path]) -> str | None:
        """None when ``name``'s outputs are done (recorded with these settings for this input, each file
        exactly as written); "todo" when there is nothing there to redo (no output yet, or a side output
        asked for now); else the REDO_REASONS key of why the output there is redone."""
        main = targets[0]
        if not (main.exists() or main.is_symlink()):
            return "todo"
        entry = self.doc["outputs"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            return "unrecorded"
        if entry.get("settings") != self.key:
            return "changed settings"
        try:
            if entry.get("input") != _identity(source):
                return "changed input"
        except OSError:
            return "changed input"
        for target in targets:
            written = entry["files"].get(self.rel(target))
            if written is None or not (target.exists() or target.is_symlink()):
                return "todo"  # a side output asked for now, or one removed since
            if not target.is_file() or target.stat().st_size != written[0] or sha256_file(target) != written[1]:
                return "corrupt"
        if _header_size(main) != entry.get("size"):
            return "corrupt"
        return None

    def add(self, name: str, identity: list[int], files: dict[Path, bytes]) -> None:
        """Record the files just written for input ``name`` (the main output first)."""
        self.doc["outputs"][name] = {
            "settings": self.key, "input": identity,
            "files": {self.rel(path): [len(data), hashlib.sha256(data).hexdigest()] for path, data in files.items()},
            "size": _header_size(next(iter(files.values()))),
        }
        self.doc["settings"][self.key] = self.settings
        self.dirty = True
        if time.monotonic() - self.saved_at >= RECORD_SAVE_S:
            self.save()

    def save(self) -> None:
        if not self.dirty:
            return
        used = {entry.get("settings") for entry in self.doc["outputs"].values() if isinstance(entry, dict)}
        self.doc["settings"] = {k: v for k, v in self.doc["settings"].items() if k in used}
        atomic_write_text(self.path, json.dumps(self.doc, indent=0, sort_keys=True) + "\n")
        self.dirty = False
        self.saved_at = time.monotonic()


# ------------------------------------------------------------------------------------------------- job

def _crop_size(quad: np.ndarray, image_size: int) -> int:
    side = float(np.hypot(*(quad[3] - quad[0])))
    return int(np.clip(round(side), image_size, max(MAX_CROP, image_size)))


@functools.lru_cache(maxsize=2)
def _aligner(landmarks_path: str | None, detector: str, alignment: str, crop: float = 1.0):
    """Face detector + 68-landmark predictor for one alignment and crop, loaded once per process (the models
    take seconds)."""
    from unmask_cli.faces import FaceAligner

    return FaceAligner(size=256, landmarks_path=landmarks_path, detector=detector, alignment=alignment, crop=crop)


def _paste_face(item: _Item, edited: np.ndarray, crop_map: np.ndarray, matrix: np.ndarray, save_masks: bool) -> None:
    """``faces.paste_back`` restricted to the photo rectangle the crop covers (same pixels, much less work on
    large photos: paste_back blends the whole frame it is given), plus the used map in photo coordinates."""
    import cv2

    from unmask_cli.faces import paste_back

    size = edited.shape[0]
    H, W = item.result.shape[:2]
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    inverse = cv2.invertAffineTransform(matrix)
    photo_corners = corners @ inverse[:, :2].T + inverse[:, 2]
    x0, y0 = np.floor(photo_corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(photo_corners.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    if x1 <= x0 or y1 <= y0:
        return
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)  # ROI coordinates -> crop
    roi = item.result[y0:y1, x0:x1]
    roi[...] = paste_back(roi, edited, shifted, region=crop_map)
    if save_masks:
        back = cv2.invertAffineTransform(shifted)
        if item.photo_map is not None:  # supplied map: the part of it inside this face's crop
            footprint = cv2.warpAffine(np.ones(crop_map.shape, np.uint8), back, (x1 - x0, y1 - y0),
                                       flags=cv2.INTER_NEAREST, borderValue=0) > 0
            item.used_map[y0:y1, x0:x1] |= item.photo_map[y0:y1, x0:x1] & footprint
        else:
            item.used_map[y0:y1, x0:x1] |= cv2.warpAffine(crop_map.astype(np.uint8), back, (x1 - x0, y1 - y0),
                                                          flags=cv2.INTER_NEAREST, borderValue=0) > 0


def _check_folders(in_dir: Path, out_dir: Path, masks_dir: Path | None, save_masks: bool, compare: bool) -> None:
    if not in_dir.exists():
        raise UnmaskError("input folder not found", in_dir)
    if not in_dir.is_dir():
        raise UnmaskError("input is not a folder", in_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UnmaskError("output exists and is not a folder", out_dir)
    if _inside(out_dir, in_dir):
        raise UnmaskError(f"output folder must not be the input folder or inside it ({in_dir}); choose another "
                          "OUT_DIR so inputs are never overwritten", out_dir)
    written = [out_dir] + [out_dir / sub for sub, on in ((MASKS_SUBDIR, save_masks), (COMPARE_SUBDIR, compare)) if on]
    sources = [in_dir] + ([masks_dir] if masks_dir is not None else [])
    for folder in written:
        for source in sources:
            if _inside(folder, source):
                raise UnmaskError(f"outputs would be written into {source}, which holds inputs; "
                                  "choose another OUT_DIR", folder)
    if masks_dir is not None and masks_dir.exists() and masks_dir.resolve() == in_dir.resolve():
        raise UnmaskError("the mask folder must not be the input folder (maps and photos share file stems)", masks_dir)


def resolve_checkpoint(cfg: InferConfig) -> Path:
    """The checkpoint infer runs: ``infer.checkpoint``, or the model that ships with unmask when it is
    none (or ``shipped``)."""
    from unmask_cli.release import resolve_model

    return resolve_model(cfg.checkpoint)


def software_tag(checkpoint: Path, image_size: int | None = None, global_step: int | None = None,
                 sha256: str | None = None) -> str:
    """The EXIF Software value of an edited photo: unmask, its version and the model (a checkpoint by its
    file name only: no local folders in shared photos; a release file with what was loaded and verified)."""
    from unmask_cli import __version__
    from unmask_cli.release import describe

    model = describe(checkpoint, image_size, global_step, sha256).replace(str(checkpoint), Path(checkpoint).name)
    return f"unmask {__version__} (face mask removed; model: {model})"


def run_infer(cfg: InferConfig, in_dir: str | os.PathLike, out_dir: str | os.PathLike,
              progress=None) -> InferSummary:
    """Unmask every image of ``in_dir`` into ``out_dir`` (same names and formats). See the module doc.

    ``cfg`` is the validated ``infer`` section of the config (:func:`unmask_cli.config.load_config`).
    Per-file problems (not an image, unreadable, missing or wrong-size mask map) are skipped with a reason
    and listed in the summary and ``OUT_DIR/skipped.csv``; setup problems raise :class:`UnmaskError`.
    """
    return InferJob(cfg, Path(in_dir), Path(out_dir), progress).run()


class InferJob:
    """One ``unmask infer`` run. The constructor checks the folders, loads the networks and the face aligner
    and prepares OUT_DIR; :meth:`run` then streams the files: :meth:`submit` each one (resume check,
    :meth:`load`), queue its faces, run the network on full batches (:meth:`flush`), :meth:`apply` each
    result to its photo and, once a photo's last face is back, :meth:`finish` it (write, free)."""

    def __init__(self, cfg: InferConfig, in_dir: Path, out_dir: Path, progress=None):
        self.start = time.perf_counter()
        self.cfg, self.in_dir, self.out_dir = cfg, in_dir, out_dir
        checkpoint = resolve_checkpoint(cfg)
        masks_dir = Path(cfg.masks) if cfg.masks is not None else None
        _check_folders(in_dir, out_dir, masks_dir, cfg.save_masks, cfg.compare)
        self.masks = _MaskIndex(masks_dir) if masks_dir is not None else None
        model = self._load_model(checkpoint)
        self.aligner = None if cfg.aligned else _aligner(cfg.landmarks or None, cfg.detector, model.alignment,
                                                          model.crop)
        self.files = _inputs(in_dir, masks_dir)
        self.stems = Counter(p.stem for p in self.files if is_image_name(p))
        self.summary = InferSummary(
            in_dir=str(in_dir), out_dir=str(out_dir), checkpoint=str(checkpoint), device=self.net.describe(),
            mode="aligned" if cfg.aligned else "photos", mask_source="predicted" if self.masks is None else "supplied",
            detector=cfg.detector, alignment=model.alignment, image_size=self.size, weights=model.weights,
            files=len(self.files), folded_bn=cfg.fold_bn, global_step=model.global_step,
            release_sha256=model.sha256)
        self.software = software_tag(checkpoint, self.size, model.global_step, model.sha256)
        self._prepare_outputs()
        self.record = OutputRecord(out_dir, self._settings(checkpoint, model.sha256))
        self.progress = progress
        self.task = progress.add_task("infer", total=len(self.files)) if progress is not None else None
        self.queue: list[_Face] = []  # faces waiting for a full batch

    def _load_model(self, checkpoint: Path):
        """Set up ``self.net`` (the networks prepared on the configured device) and ``self.size``; returns
        the loaded :class:`~unmask_cli.checkpoints.TrainedModel` for its metadata."""
        from unmask_cli.checkpoints import build_networks_from_checkpoint

        setup = setup_device(self.cfg.device, inference=True)
        model = build_networks_from_checkpoint(checkpoint, "cpu")  # Unmasker moves the prepared copies
        if self.masks is None and model.M is None:
            raise UnmaskError("this checkpoint has no map module (trained with model.map_module off); pass "
                              "--masks DIR with one mask map per image", checkpoint)
        self.size = model.image_size
        self.net = Unmasker(model.G, model.M if self.masks is None else None, self.size, setup,
                            self.cfg.threshold, self.cfg.fold_bn, self.cfg.min_mask_area)
        return model

    def _settings(self, checkpoint: Path, verified_sha256: str | None) -> dict:
        """What decides the outputs: the model (its sha256) and every setting that changes them."""
        cfg = self.cfg
        resolved = lambda value: str(Path(value).resolve()) if value else None  # noqa: E731
        return {"model_sha256": verified_sha256 or sha256_file(checkpoint), "threshold": cfg.threshold,
                "min_mask_area": cfg.min_mask_area, "masks": resolved(cfg.masks), "aligned": cfg.aligned,
                "detector": cfg.detector, "all_faces": cfg.all_faces, "jpeg_quality": cfg.jpeg_quality,
                "fold_bn": cfg.fold_bn, "landmarks": resolved(cfg.landmarks)}

    def _prepare_outputs(self) -> None:
        """Create OUT_DIR (and its side folders) and drop the temp files an interrupted run left there."""
        ensure_dir(self.out_dir)
        on = ((MASKS_SUBDIR, self.cfg.save_masks), (COMPARE_SUBDIR, self.cfg.compare))
        for folder in [self.out_dir] + [self.out_dir / sub for sub, wanted in on if wanted]:
            ensure_dir(folder)
            remove_temp_files(folder)

    # -------------------------------------------------------------------------------------------- run

    def run(self) -> InferSummary:
        try:
            for path in self.files:
                self.submit(path)
            self.flush(1)
        except BaseException:  # Ctrl-C, a failed write ...: keep the record of what is done
            with contextlib.suppress(UnmaskError):
                self.record.save()
            raise
        self.record.save()
        summary = self.summary
        summary.skipped = dict(Counter(reason for _, reason, _ in summary.skipped_files))
        _write_skipped(self.out_dir, summary.skipped_files)
        summary.seconds = time.perf_counter() - self.start
        return summary

    def submit(self, path: Path) -> None:
        """Take one entry of IN_DIR: skip it, count it done, copy it through, or queue its faces."""
        problem = entry_problem(path)  # a folder, a FIFO, a broken link: never opened
        if problem is not None:
            self.skip(path, problem)
            return
        if not is_image_name(path):
            self.skip(path, BadInput("not an image (unsupported file extension)", path, "not an image"))
            return
        key = path.stem if self.stems[path.stem] == 1 else path.name
        targets = [p for p in self.out_paths(path, key) if p is not None]
        why = None if self.cfg.overwrite else self.record.check(path.name, path, targets)
        if why is None and not self.cfg.overwrite:  # done by an earlier run with this model and settings, intact
            self.summary.already_done += 1
            self.advance()
            return
        try:
            identity = _identity(path)
            item = self.load(path, key, targets[0], identity, why if why != "todo" else None)
        except BadInput as err:
            self.skip(path, err)
            return
        except MemoryError:
            self.skip(path, BadInput("out of memory while decoding", path, "too large"))
            return
        except OSError as err:  # removed or made unreadable between the listing and the read
            self.skip(path, BadInput(f"cannot read file ({err.strerror or err})", path, "unreadable"))
            return
        if item is None:  # no face: already copied through
            return
        if not item.faces:  # every face of the photo has an empty map
            self.finish(item)
            return
        item.pending = len(item.faces)
        self.queue.extend(item.faces)
        self.flush(self.cfg.batch_size)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def out_paths(self, path: Path, key: str) -> tuple[Path, Path | None, Path | None]:
        """(output, mask map, side-by-side) of one input; None for the side outputs not asked for."""
        return (self.out_dir / path.name,
                self.out_dir / MASKS_SUBDIR / f"{key}.png" if self.cfg.save_masks else None,
                self.out_dir / COMPARE_SUBDIR / f"{key}.jpg" if self.cfg.compare else None)

    def skip(self, path: Path, err: BadInput) -> None:
        self.summary.skipped_files.append((path.name, err.reason, str(err)))
        self.advance()

    # ------------------------------------------------------------------------------------------ load

    def load(self, path: Path, key: str, output: Path, identity: list[int], redo: str | None = None) -> _Item | None:
        """Read one input and prepare its faces; None when it was copied through (no face)."""
        image = read_image(path)
        photo_map = read_mask(self.masks.find(path.stem, path), image.shape[:2]) if self.masks is not None else None
        item = _Item(path=path, key=key, output=output, image=image, photo_map=photo_map, identity=identity,
                     redo=redo)
        if self.cfg.aligned:  # the file is the crop: one face, composited in place
            item.faces.append(self._face(item, image, photo_map, None))
            item.result, item.used_map = image, np.zeros(image.shape[:2], bool)
            return item
        try:
            found, guided = self.aligner.find_faces(image, path, photo_map, self.cfg.all_faces)
        except BadInput as err:
            if err.reason not in NO_FACE_REASONS:
                raise
            self.summary.no_face += 1
            self.summary.no_face_files.append((path.name, err.reason))
            self.copy_through(item)
            self.advance()
            return None
        self.summary.faces_from_maps += guided
        item.result, item.used_map = image.copy(), np.zeros(image.shape[:2], bool)
        for face in found:
            self._add_photo_face(item, face)
        return item

    def _add_photo_face(self, item: _Item, face) -> None:
        """Align one face of a photo at its own resolution (the crop prepare makes) and queue it, unless its
        supplied map is empty there (nothing to do: the network is skipped)."""
        import cv2

        crop_side = _crop_size(self.aligner.quad(face), self.size)
        aligned = self.aligner.align(item.image, face, crop_side)
        crop_map = None
        if item.photo_map is not None:
            crop_map = cv2.warpAffine(item.photo_map.astype(np.uint8), aligned.matrix, (crop_side, crop_side),
                                      flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
            if not crop_map.any():
                item.empty_faces += 1
                return
        item.faces.append(self._face(item, aligned.image, crop_map, aligned.matrix))

    def _face(self, item: _Item, crop: np.ndarray, crop_map: np.ndarray | None, matrix: np.ndarray | None) -> _Face:
        size = self.size
        return _Face(item, _resize(crop, size, size), _map_down(crop_map, size) if crop_map is not None else None,
                     crop, crop_map, matrix)

    # ------------------------------------------------------------------------------- network, results

    def flush(self, limit: int) -> None:
        """Run the network on batches of queued faces while at least ``limit`` wait (1: everything left)."""
        batch_size = self.cfg.batch_size
        while len(self.queue) >= limit and self.queue:
            batch, self.queue = self.queue[:batch_size], self.queue[batch_size:]
            images = np.stack([f.model_in for f in batch])
            maps = None if self.masks is None else np.stack([f.model_map for f in batch])
            comps, model_maps = self.net(images, maps)
            for face, comp, model_map in zip(batch, comps, model_maps, strict=True):
                self.apply(face, comp, model_map)

    def apply(self, face: _Face, comp: np.ndarray, model_map: np.ndarray) -> None:
        """Put one network result into its item (at the crop's own resolution); finish the item after its last."""
        item = face.item
        h, w = face.crop.shape[:2]
        crop_map = face.crop_map if face.crop_map is not None else _map_up(model_map, w, h)
        if crop_map.any():
            edited = np.where(crop_map[:, :, None], _resize(comp, w, h), face.crop)
            item.edited_faces += 1
            if face.matrix is None:  # aligned crop: the output is the composite itself
                item.result = edited
                item.used_map = crop_map
            else:
                _paste_face(item, edited, crop_map, face.matrix, self.cfg.save_masks)
        item.pending -= 1
        if item.pending == 0:
            self.finish(item)

    # ---------------------------------------------------------------------------------------- write

    def finish(self, item: _Item) -> None:
        """Write an item whose faces are all done (or copy it through when none was edited), then free it."""
        self.summary.faces_empty_map += item.empty_faces + len(item.faces) - item.edited_faces
        if item.edited_faces == 0:
            self.summary.unchanged += 1
            self.copy_through(item)
        else:
            side = self.write_side(item, item.result, item.used_map)
            data = self.encode(item)
            _write(item.output, data)  # last, then recorded: it marks the file done
            self.written(item, {item.output: data, **side})
            self.summary.processed += 1
            self.summary.faces += item.edited_faces
        item.faces.clear()
        item.image = item.result = item.used_map = item.photo_map = None  # type: ignore[assignment]
        self.advance()

    def encode(self, item: _Item) -> bytes:
        """The output file of an edited item: its format, mode, bit depth, metadata and JPEG settings come
        from the input file (:mod:`unmask_cli.photo_meta`); the pixels nothing changed keep their values."""
        photo = read_photo(item.path, item.output.suffix, item.image.shape[:2])
        return encode_photo(item.result, item.image, photo, self.software, self.cfg.jpeg_quality)

    def copy_through(self, item: _Item) -> None:
        side = self.write_side(item, item.image, np.zeros(item.image.shape[:2], bool))
        try:
            data = item.path.read_bytes()
        except OSError as err:
            raise UnmaskError(f"cannot read the input again to copy it ({err.strerror or err})", item.path) from err
        _write(item.output, data)  # byte copy, last, then recorded: it marks the file done
        self.written(item, {item.output: data, **side})

    def written(self, item: _Item, files: dict[Path, bytes]) -> None:
        """Record an item's files (the output first), and count it as redone when it replaced one."""
        self.record.add(item.path.name, item.identity, files)
        if item.redo is not None:
            self.summary.redone_files.append((item.path.name, item.redo))

    def write_side(self, item: _Item, result: np.ndarray, used_map: np.ndarray) -> dict[Path, bytes]:
        """Write the asked-for side outputs of an item; what was written, by path."""
        _, mask_out, compare_out = self.out_paths(item.path, item.key)
        written = {}
        if mask_out is not None:
            written[mask_out] = encode_image(used_map.astype(np.uint8) * 255, ".png")
        if compare_out is not None:
            written[compare_out] = encode_image(np.concatenate([item.image, result], axis=1), ".jpg", JPEG_QUALITY)
        for path, data in written.items():
            _write(path, data)
        return written


def _inputs(in_dir: Path, masks_dir: Path | None) -> list[Path]:
    """Every visible entry of IN_DIR (files, and the sub-folders, FIFOs and broken links that are listed as
    skipped), except the ``--masks`` folder when it is one of them."""
    masks = masks_dir.resolve() if masks_dir is not None and masks_dir.exists() else None
    return [p for p in list_entries(in_dir) if masks is None or not p.is_dir() or p.resolve() != masks]


def _write_skipped(out_dir: Path, rows: list[tuple[str, str, str]]) -> None:
    path = out_dir / SKIPPED_CSV
    if not rows:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "reason", "detail"])
    writer.writerows(rows)
    _write(path, buffer.getvalue().encode("utf-8", errors="surrogateescape"))


DETECTOR_NAMES = {"yunet": "YuNet", "hog": "dlib HOG", "cnn": "dlib CNN", "hog+cnn": "dlib HOG, CNN where HOG finds none"}


def summary_table(summary: InferSummary, max_listed: int = 10):
    from rich.table import Table

    from unmask_cli.release import describe

    table = Table(title=f"unmask infer -> {summary.out_dir}", show_header=True)
    table.add_column("item")
    table.add_column("value", justify="right")
    what = ("aligned face crops" if summary.mode == "aligned"
            else f"photos (detect with {DETECTOR_NAMES[summary.detector]}, {summary.alignment} alignment, paste back)")
    table.add_row("input", f"{summary.files} file(s), {what}")
    if summary.files == 0:
        table.add_row("[yellow]warning[/]", "[yellow]IN_DIR holds no files: nothing to do[/]")
    table.add_row("masks", "supplied (--masks)" if summary.mask_source == "supplied" else "predicted (map module)")
    table.add_row("checkpoint", describe(summary.checkpoint, summary.image_size, summary.global_step,
                                         summary.release_sha256))
    table.add_row("model", f"{summary.image_size} px, {summary.weights}, {summary.device}")
    table.add_row("unmasked images", str(summary.processed))
    if summary.mode == "photos":
        table.add_row("faces unmasked", str(summary.faces))
        if summary.faces_from_maps:
            table.add_row("  located from the mask map", str(summary.faces_from_maps))
        if summary.faces_empty_map:
            table.add_row("faces without a mask (left untouched)", str(summary.faces_empty_map))
        if summary.no_face:
            table.add_row("[yellow]no face: copied[/]", f"[yellow]{summary.no_face}[/]")
            for name, reason in summary.no_face_files[:max_listed]:
                table.add_row(f"  {name}", reason)
            if len(summary.no_face_files) > max_listed:
                table.add_row(f"  ... {len(summary.no_face_files) - max_listed} more", "")
            if summary.mask_source == "predicted":
                table.add_row("[yellow]  hint[/]", "[yellow]"
                              + ("dlib's HOG misses most masked faces (try --detector yunet); "
                                 if summary.detector in ("hog", "hog+cnn") else "")
                              + "pass --masks DIR (faces are then also located from the maps) or use --aligned "
                              "crops[/]")
    if summary.unchanged:
        table.add_row("no masked face: copied", str(summary.unchanged))
    if summary.already_done:
        table.add_row("already done (skipped)", str(summary.already_done))
    for reason, words in REDO_REASONS.items():
        count = summary.redone_for(reason)
        if count:
            table.add_row(f"[yellow]redone: {words}[/]", f"[yellow]{count}[/]")
            named = [name for name, why in summary.redone_files if why == reason]
            for name in named[:max_listed]:
                table.add_row(f"  {name}", "")
            if len(named) > max_listed:
                table.add_row(f"  ... {len(named) - max_listed} more", "")
    for reason, count in sorted(summary.skipped.items()):
        table.add_row(f"[red]skipped: {reason}[/]", f"[red]{count}[/]")
    for name, reason, _ in summary.skipped_files[:max_listed]:
        table.add_row(f"  {name}", reason)
    if len(summary.skipped_files) > max_listed:
        table.add_row(f"  ... {len(summary.skipped_files) - max_listed} more", f"see {SKIPPED_CSV}")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.rate:.2f} img/s)")
    return table
