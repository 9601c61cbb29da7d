"""``unmask prepare``: synthesise a paired dataset (aligned face, masked face, binary mask map).

Work split: worker processes do everything CPU-heavy (decode, detect, landmarks, align, mask, PNG
encode) and return encoded bytes; the main process only assigns sample names in source order, writes
files atomically and appends the manifest. A sample exists once its manifest line is written (after
its three files), so a rerun after a kill drops orphan files and continues without duplicates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from unmask_cli import samples
from unmask_cli.config import PrepareConfig
from unmask_cli.data import (
    ORIGINAL_DIR,
    SETTINGS_FILE,
    SKIPPED,
    SUBDIRS,
    append_manifest,
    append_or_restore,
    read_manifest,
    sample_paths,
    split_of,
)
from unmask_cli.errors import BadInput, UnmaskError
from unmask_cli.faces import LEGACY_ALIGNMENT, LEGACY_CROP, check_alignment, check_crop, check_detector
from unmask_cli.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    ensure_dir,
    list_entries,
    remove_temp_files,
)

BUILTIN_VARIANTS = 48  # distinct augmented photos of the built-in portraits


@dataclass
class PrepareSummary:
    out: str
    requested: int
    total: int = 0  # complete samples in the folder at the end
    written: int = 0  # written by this run
    resumed_from: int = 0  # complete samples found at the start
    faces: int = 0  # distinct faces (non-reused samples)
    reused: int = 0  # samples that reuse a face with a fresh mask
    sources_seen: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)
    styles: dict[str, int] = field(default_factory=dict)
    orphans_removed: int = 0

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(size: int, landmarks_path: str | None, upsample: int, min_face: int, detector: str,
                 alignment: str, crop: float, weights, variety: bool, degrade: float, backdrop: float,
                 parent_dies: bool) -> None:
    import cv2

    cv2.setNumThreads(1)
    if parent_dies:  # a pool worker: Ctrl-C is the main process's to handle (it ends the pool), no traceback here
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_dies and sys.platform.startswith("linux"):  # do not outlive a killed parent
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    settings = (size, landmarks_path, upsample, min_face, detector, alignment, crop)
    if _WORKER.get("aligner_settings") != settings:
        from unmask_cli.faces import FaceAligner

        _WORKER["aligner"] = FaceAligner(size, landmarks_path, upsample=upsample, min_face=min_face,
                                         detector=detector, alignment=alignment, crop=crop)
        _WORKER["aligner_settings"] = settings
    _WORKER["weights"] = weights
    _WORKER["variety"] = variety
    _WORKER["degrade"] = degrade
    _WORKER["backdrop"] = backdrop


def _mask_rng(seed: int, key: str, face_index: int, round_: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{key}|{face_index}|{round_}".encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _png(rgb: np.ndarray) -> bytes:
    from unmask_cli.fileio import encode_image

    return encode_image(rgb, ".png")


SCENE_KEYS = ("backdrop", "body")  # what unmask_cli.backdrop records


def _surroundings(face, seed: int, key: str, face_index: int) -> tuple[np.ndarray, dict]:
    """The aligned face, with a synthetic scene where its crop lies outside the photo for a share
    ``prepare.backdrop`` of faces (:mod:`unmask_cli.backdrop`); its own random stream."""
    rng = _mask_rng(seed, key, face_index, 2 * 10**6)
    if face.border_fraction <= 0 or face.inside is None or not rng.random() < _WORKER["backdrop"]:
        return face.image, {}
    from unmask_cli.backdrop import add_backdrop

    return add_backdrop(face.image, face.inside, face.landmarks, rng)


def _render(aligned_rgb: np.ndarray, aligned_lm: np.ndarray, seed: int, key: str, face_index: int, round_: int,
            scene_params: dict | None = None):
    from unmask_cli.masks import synthesize

    result = synthesize(aligned_rgb, aligned_lm, _WORKER["weights"], _mask_rng(seed, key, face_index, round_),
                        _WORKER["variety"])
    scene = aligned_rgb if result.scene is None else result.scene  # a look-alike is part of the face
    masked, params = result.masked, {"style": result.style, **result.params, **(scene_params or {})}
    quality = _mask_rng(seed, key, face_index, round_ + 10**6)  # its own stream: the masks stay as they were
    if _WORKER["degrade"] > 0 and quality.random() < _WORKER["degrade"]:
        from unmask_cli.degrade import degrade_pair

        scene, masked, params["degraded"] = degrade_pair(scene, masked, result.mask, quality)
    return _png(scene), _png(masked), _png(result.mask.astype(np.uint8) * 255), params


def _load_source(key: str, path: str | None) -> np.ndarray:
    from unmask_cli.fileio import read_image

    return samples.load_variant(key) if samples.is_builtin(key) else read_image(path)


def _process_source(task: tuple) -> dict:
    """Detect, align and mask the faces of one source photo. Never raises for a bad input."""
    key, path, seed, all_faces = task
    try:
        image = _load_source(key, path)
        faces = _WORKER["aligner"].faces(image, path or key, all_faces=all_faces)
        out = []
        for index, face in enumerate(faces):
            image, scene_params = _surroundings(face, seed, key, index)
            files = _render(image, face.landmarks, seed, key, index, 0, scene_params)
            out.append({
                "face_index": index,
                "box": [int(v) for v in face.face.box],
                "landmarks": np.round(face.face.landmarks, 2).tolist(),
                **({"eyes": np.round(face.face.eyes, 2).tolist()} if face.face.eyes is not None else {}),
                "aligned_landmarks": np.round(face.landmarks, 2).tolist(),
                "matrix": np.round(face.matrix, 6).tolist(),
                "border_fraction": round(face.border_fraction, 4),
                "files": files,
            })
        return {"key": key, "faces": out}
    except BadInput as err:
        return {"key": key, "skip": (err.reason, str(err))}
    except MemoryError:
        return {"key": key, "skip": ("too large", f"{path}: out of memory while decoding")}


def _process_reuse(task: tuple) -> dict:
    """A fresh mask on an already aligned face (when there are fewer faces than samples)."""
    from unmask_cli.fileio import read_image

    record, round_, root, seed = task
    original = read_image(Path(root) / ORIGINAL_DIR / f"{record['stem']}.png")
    lm = np.asarray(record["aligned_landmarks"], dtype=np.float64)
    scene = {k: record["mask"][k] for k in SCENE_KEYS if k in record["mask"]}  # it is part of the original
    for attempt in range(8):  # a jittered mask can (rarely) leave the crop: draw another, deterministically
        try:
            files = _render(original, lm, seed, record["source"], record["face_index"], round_ + 1000 * attempt,
                            scene)
            break
        except BadInput:
            if attempt == 7:
                raise
    return {"key": record["source"], "faces": [{**{k: record[k] for k in (
        "face_index", "box", "landmarks", "aligned_landmarks", "matrix", "border_fraction")},
        "files": files, "reuse_of": record["stem"], "round": round_}]}


# ---------------------------------------------------------------------------------------------- main
def _source_items(opts: PrepareConfig) -> list[tuple[str, str | None]]:
    if opts.source is None:
        return [(key, None) for key in samples.sample_keys(BUILTIN_VARIANTS)]
    source = Path(opts.source)
    if not source.exists():
        raise UnmaskError("source folder not found", source)
    if not source.is_dir():
        raise UnmaskError("source is not a folder", source)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(source).parts)) if opts.recursive else list_entries(source)
    if not files:
        raise UnmaskError("source folder is empty", source)
    return [(p.relative_to(source).as_posix(), str(p)) for p in files]


def _read_skipped(root: Path) -> dict[str, tuple[str, str]]:
    path = root / SKIPPED
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):  # a kill during an append: drop the partial row
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    return {r[0]: (r[1], r[2]) for r in rows[1:] if len(r) == 3}


def _append_skipped(root: Path, key: str, reason: str, detail: str) -> None:
    path = root / SKIPPED
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not path.exists():
        writer.writerow(["source", "reason", "detail"])
    writer.writerow([key, reason, detail])
    append_or_restore(path, buffer.getvalue().encode("utf-8", errors="surrogateescape"))


def _settings(opts: PrepareConfig) -> dict:
    return {"size": opts.size, "seed": opts.seed, "mask_types": opts.mask_types,
            "mask_variety": opts.mask_variety, "degrade": opts.degrade, "backdrop": opts.backdrop,
            "all_faces": opts.all_faces,
            "alignment": opts.alignment, "crop": opts.crop, "detector": opts.detector,
            "source": str(Path(opts.source).resolve()) if opts.source else "builtin",
            "val_fraction": opts.val_fraction,
            "test_fraction": opts.test_fraction}


def _check_resume(root: Path, opts: PrepareConfig, have: int) -> None:
    path = root / SETTINGS_FILE
    if not path.exists() or have == 0:
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (ValueError, OSError) as err:
        raise UnmaskError(f"cannot read previous run settings ({err})", path) from err
    new = _settings(opts)
    if old.get("source") not in (None, "builtin"):  # the same folder, however it is spelled
        old["source"] = str(Path(old["source"]).resolve())
    old.setdefault("alignment", LEGACY_ALIGNMENT)  # folders from before the alignment was recorded
    old.setdefault("crop", LEGACY_CROP)
    old.setdefault("mask_variety", False)
    old.setdefault("degrade", 0.0)
    old.setdefault("backdrop", 0.0)
    changed = [k for k in ("size", "seed", "mask_types", "mask_variety", "degrade", "backdrop", "all_faces", "source",
                           "alignment", "crop")
               if k in old and old[k] != new[k]]
    if changed:
        detail = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise UnmaskError(f"output folder holds a dataset prepared with other settings ({detail}); "
                          "use another --out or the same settings", root)


def _clean_orphans(root: Path, records: list[dict]) -> int:
    """Remove temp files and sample files that have no manifest line (a kill between write and append)."""
    known = {r["stem"] for r in records}
    removed = 0
    for sub in SUBDIRS:
        folder = root / sub
        removed += remove_temp_files(folder)
        for entry in folder.iterdir():
            if entry.suffix == ".png" and entry.stem not in known:
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


class _Pool:
    """imap over a process pool (workers > 1) or in this process (workers == 1), same worker code."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.pool = None
        if workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
            if method == "fork":  # load dlib models once; children share them copy-on-write
                _init_worker(*initargs[:-1], False)
            self.pool = multiprocessing.get_context(method).Pool(workers, _init_worker, initargs)
        else:
            _init_worker(*initargs[:-1], False)

    def imap(self, fn, tasks):
        if self.pool is None:
            return map(fn, tasks)
        return self.pool.imap(fn, tasks, chunksize=2)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _check_job(pc: PrepareConfig, root: Path) -> None:
    check_detector(pc.detector)
    check_alignment(pc.alignment)
    check_crop(pc.crop)
    if root.exists() and not root.is_dir():
        raise UnmaskError("output exists and is not a folder", root)
    if pc.source is not None and root.resolve().is_relative_to(Path(pc.source).resolve()):
        raise UnmaskError("output folder must not be inside the source folder", root)


class _Writer:
    """The main process's side: names samples in source order, writes their files atomically, then the
    manifest line (a sample exists once that line is written), and keeps the summary."""

    def __init__(self, pc: PrepareConfig, root: Path, progress):
        self.pc, self.root, self.target = pc, root, pc.samples()
        self.records = read_manifest(root, repair=True)
        _check_resume(root, pc, len(self.records))
        self.summary = PrepareSummary(out=str(root), requested=self.target, resumed_from=len(self.records))
        self.summary.orphans_removed = _clean_orphans(root, self.records)
        self.skipped = _read_skipped(root)
        self.progress = progress
        self.task = progress.add_task("prepare", total=self.target, completed=min(len(self.records), self.target)) \
            if progress is not None else None

    @property
    def full(self) -> bool:
        return len(self.records) >= self.target

    def commit(self, result: dict) -> bool:
        """Write one source's samples (or its skip row); True when the target count is reached."""
        if "skip" in result:
            reason, detail = result["skip"]
            _append_skipped(self.root, result["key"], reason, detail)
            self.skipped[result["key"]] = (reason, detail)
            return False
        for face in result["faces"]:
            if self.full:
                return True
            self._write_sample(result["key"], face)
        return self.full

    def _write_sample(self, key: str, face: dict) -> None:
        pc, stem = self.pc, f"{len(self.records):06d}"
        for path, data in zip(sample_paths(self.root, stem), face["files"][:3], strict=True):
            atomic_write_bytes(path, data)
        record = {"stem": stem, "source": key, **{k: v for k, v in face.items() if k != "files"},
                  "size": pc.size, "mask": face["files"][3],
                  "split": split_of(key, pc.val_fraction, pc.test_fraction, pc.seed), "reused": "reuse_of" in face}
        append_manifest(self.root, [record])
        self.records.append(record)
        self.summary.written += 1
        if self.progress is not None:
            self.progress.update(self.task, completed=len(self.records))

    def finish(self, seconds: float) -> PrepareSummary:
        summary, records = self.summary, self.records
        summary.seconds = seconds
        summary.total = len(records)
        summary.faces = sum(1 for r in records if not r.get("reused"))
        summary.reused = summary.total - summary.faces
        summary.skipped = dict(Counter(reason for reason, _ in self.skipped.values()))
        summary.splits = dict(Counter(r["split"] for r in records))
        summary.styles = dict(Counter(r["mask"]["style"] for r in records))
        return summary


def run_prepare(pc: PrepareConfig, out: str | os.PathLike, progress=None) -> PrepareSummary:
    """Write (or resume) ``pc.samples()`` samples into ``out``. ``progress`` is a rich Progress (optional).

    New faces first, in source order; when the sources run out, the faces already written get fresh masks."""
    from unmask_cli.masks import parse_mask_types

    weights = parse_mask_types(pc.mask_types)
    root = Path(out)
    _check_job(pc, root)
    items = _source_items(pc)
    for sub in SUBDIRS:
        ensure_dir(root / sub)
    start = time.perf_counter()
    writer = _Writer(pc, root, progress)
    atomic_write_text(root / SETTINGS_FILE, json.dumps({"settings": _settings(pc), "status": "running"}, indent=2))
    done = {r["source"] for r in writer.records}
    pending = [(k, p) for k, p in items if k not in done and k not in writer.skipped]
    pool = _Pool(pc.workers, (pc.size, pc.landmarks, pc.upsample, pc.min_face, pc.detector, pc.alignment,
                              pc.crop, weights, pc.mask_variety, pc.degrade, pc.backdrop, True))
    try:
        if not writer.full and pending:
            for result in pool.imap(_process_source, ((k, p, pc.seed, pc.all_faces) for k, p in pending)):
                writer.summary.sources_seen += 1
                if writer.commit(result):
                    break
        if not writer.full:
            _reuse_faces(pool, writer, len(items))
    finally:
        pool.close()
    summary = writer.finish(time.perf_counter() - start)
    atomic_write_text(root / SETTINGS_FILE, json.dumps(
        {"settings": _settings(pc), "status": "complete", "summary": asdict(summary)}, indent=2))
    return summary


def _reuse_faces(pool: _Pool, writer: _Writer, sources: int) -> None:
    """Fill the remaining samples with fresh masks on the faces already written, round-robin."""
    records, target = writer.records, writer.target
    base = [r for r in records if not r.get("reused")]
    if not base:
        raise UnmaskError(f"no usable face in {sources} source file(s); see {writer.root / SKIPPED}", writer.pc.source)
    tasks = ((base[(j - len(base)) % len(base)], 1 + (j - len(base)) // len(base), str(writer.root), writer.pc.seed)
             for j in range(len(records), target))
    for result in pool.imap(_process_reuse, tasks):
        if writer.commit(result):
            break


def mask_fits_crop(aligner, image: np.ndarray, face, style: str, rng: np.random.Generator,
                   variety: bool = False) -> bool:
    """Whether a ``style`` mask drawn on ``face`` lies entirely inside the crop ``aligner`` makes of it.

    A mask drawn on the crop itself is clipped at its border and cannot tell, so the face is aligned on a
    canvas of twice the crop's side around the same centre (masks are designed in face units: the same
    draw gives the same mask at any scale) and no mask pixel, straps included, may fall outside its central
    half. Raises BadInput when no mask can be drawn."""
    import cv2

    from unmask_cli.faces import quad_matrix, transform_points
    from unmask_cli.masks import apply_style

    size = 256
    quad = aligner.quad(face)
    centre = quad.mean(axis=0)
    matrix = quad_matrix(centre + (quad - centre) * 2.0, size)
    canvas = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    mask = apply_style(style, canvas, transform_points(face.landmarks, matrix), rng, variety).mask
    inside = np.zeros_like(mask)
    inside[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    return not (mask & ~inside).any()


def summary_table(summary: PrepareSummary):
    from rich.table import Table

    table = Table(title=f"unmask prepare -> {summary.out}", show_header=True)
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("samples in folder", f"{summary.total} / {summary.requested} requested")
    table.add_row("written by this run", str(summary.written))
    if summary.resumed_from:
        table.add_row("already there (resumed)", str(summary.resumed_from))
    table.add_row("distinct faces", str(summary.faces))
    if summary.reused:
        table.add_row("[yellow]faces reused with fresh masks[/]",
                      f"[yellow]{summary.reused} (only {summary.faces} usable faces)[/]")
    for reason, count in sorted(summary.skipped.items()):
        table.add_row(f"skipped: {reason}", str(count))
    table.add_row("splits", ", ".join(f"{k} {v}" for k, v in sorted(summary.splits.items())))
    table.add_row("mask styles", ", ".join(f"{k} {v}" for k, v in sorted(summary.styles.items())))
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.rate:.1f} samples/s)")
    return table


def preview(opts: PrepareConfig, count: int, sheet_path: Path) -> int:
    """Write a contact sheet of ``count`` random samples (original | masked | map) without a dataset."""
    if Path(sheet_path).suffix.lower() != ".png":
        raise UnmaskError("with --preview, --out must be a .png file path", sheet_path)
    from unmask_cli.fileio import write_image
    from unmask_cli.masks import parse_mask_types, preview_sheet, synthesize

    weights = parse_mask_types(opts.mask_types)
    _init_worker(opts.size, opts.landmarks, opts.upsample, opts.min_face, opts.detector, opts.alignment,
                 opts.crop, weights, opts.mask_variety, opts.degrade, opts.backdrop, False)
    items = _source_items(opts)
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(items))
    rows = []
    for index in order:
        key, path = items[index]
        try:
            faces = _WORKER["aligner"].faces(_load_source(key, path), path or key, all_faces=opts.all_faces)
        except BadInput:
            continue
        for face_index, face in enumerate(faces):
            image, _ = _surroundings(face, opts.seed, key, face_index)
            result = synthesize(image, face.landmarks, weights, _mask_rng(opts.seed, key, face_index, 0),
                                opts.mask_variety)
            rows.append((image if result.scene is None else result.scene, result.masked, result.mask))
        if len(rows) >= count:
            break
    if not rows:
        raise UnmaskError("no usable face found for the preview", opts.source)
    ensure_dir(Path(sheet_path).parent)
    write_image(sheet_path, preview_sheet(rows[:count]))
    return len(rows[:count])
