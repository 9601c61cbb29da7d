"""How often a model removes real masks: `unmask infer` on ../shared/masked_real (web photos of people
wearing masks, no ground truth), with predicted masks and the default detector.

    .venv/bin/python benchmarks/masked_real.py [--checkpoint shipped] [--work runs/masked_real] [--limit N]

Per face that infer found (the same detector, alignment and crop, re-run here for the landmarks):

* lower face: the polygon of dlib's 68 landmarks through jaw points 2-14, closed through the nose bridge
  (point 28), where a mask sits. Under a mask the jaw points are the predictor's guesses.
* repainted: pixels the output changed by more than --changed levels (any channel).
* removed: at least --cover of the lower face repainted, and at most --outside of the repainted pixels
  outside the face (the landmark hull widened by 15% of the face size).
* judged "no mask": less than --untouched of the lower face repainted (infer left the face alone).
* lower edge left: on removed faces, the share of the lower face's bottom band (the strip along the jaw
  line below the mouth, a tenth of the face's height wide, where a mask's bottom edge lies) that was not
  repainted: a mask whose bottom edge stays leaves this band.

Prints the share of faces removed (also by the face's size in the photo) and of photos with at least one
face removed, and writes
WORK/sheet.png: 48 photos (input | output, a green outline where a face counted as removed, red where not)
for checking by eye. The photos are research-use web images: the sheet stays under WORK, never in git.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


SIZES = {"32-63 px": 64, "64-127 px": 128, "128+ px": 10**9}  # face box side in the photo: label -> below


def size_label(side: int) -> str:
    return next(label for label, below in SIZES.items() if side < below)


def lower_face(landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([landmarks[2:15], landmarks[[28]]]).round().astype(np.int32)


def face_region(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    hull = cv2.convexHull(landmarks.round().astype(np.int32))
    region = np.zeros(shape, np.uint8)
    cv2.fillPoly(region, [hull], 1)
    size = max(3, int(0.15 * max(np.ptp(landmarks, axis=0))))
    return cv2.dilate(region, np.ones((size, size), np.uint8)).astype(bool)


def bottom_band(landmarks: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The strip of the lower face along the jaw line below the mouth, a tenth of the face height wide."""
    import cv2

    height = max(2.0, float(np.ptp(landmarks[:, 1])))
    width = max(3, int(round(0.1 * height)))
    inner = cv2.erode(lower.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool)
    band = lower & ~inner
    band[: int(round(landmarks[57, 1])) + 1] = False
    return band


def score_face(changed: np.ndarray, landmarks: np.ndarray, others: np.ndarray, args) -> dict:
    """Coverage of the lower face, the share of paint outside every face of the photo, the bottom band."""
    import cv2

    lower = np.zeros(changed.shape, np.uint8)
    cv2.fillPoly(lower, [lower_face(landmarks)], 1)
    lower = lower.astype(bool)
    mine = face_region(landmarks, changed.shape)
    cover = float(changed[lower].mean()) if lower.any() else 0.0
    painted_near = changed & mine
    outside = float((changed & ~others).sum() / max(1, painted_near.sum() + (changed & ~others).sum()))
    band = bottom_band(landmarks, lower)
    edge_left = float(1.0 - changed[band].mean()) if band.any() else 0.0
    return {"cover": cover, "outside": outside, "removed": cover >= args.cover and outside <= args.outside,
            "no_mask": cover < args.untouched, "edge_left": edge_left}


def score_photo(photo: np.ndarray, output: np.ndarray, faces: list, args) -> list[dict]:
    changed = (np.abs(output.astype(np.int16) - photo.astype(np.int16)).max(axis=2) > args.changed)
    everywhere = np.zeros(changed.shape, bool)
    for face in faces:
        everywhere |= face_region(face.landmarks, changed.shape)
    return [score_face(changed, face.landmarks, everywhere, args) for face in faces]


def sheet(rows: list[tuple[np.ndarray, np.ndarray, list, list[dict]]], height: int = 160) -> np.ndarray:
    import cv2

    tiles = []
    for photo, output, faces, scores in rows:
        pair = []
        for image in (photo, output):
            image = image.copy()
            for face, score in zip(faces, scores, strict=True):
                colour = (0, 200, 0) if score["removed"] else (230, 0, 0)
                cv2.polylines(image, [lower_face(face.landmarks)], True, colour, max(1, image.shape[0] // 150))
            scale = height / image.shape[0]
            pair.append(cv2.resize(image, (max(1, round(image.shape[1] * scale)), height), interpolation=cv2.INTER_AREA))
        tile = np.concatenate(pair, axis=1)
        tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=255))
    width = max(t.shape[1] for t in tiles)
    per_row, lines, line, used = 1400, [], [], 0
    for tile in tiles:
        if used + tile.shape[1] > per_row and line:
            lines.append(line)
            line, used = [], 0
        line.append(tile)
        used += tile.shape[1]
    lines.append(line)
    width = max(sum(t.shape[1] for t in ln) for ln in lines)
    return np.concatenate([np.pad(np.concatenate(ln, axis=1), ((0, 0), (0, width - sum(t.shape[1] for t in ln)),
                                                               (0, 0)), constant_values=255) for ln in lines])


def main() -> None:
    from unmask_cli.checkpoints import build_networks_from_checkpoint
    from unmask_cli.config import InferConfig
    from unmask_cli.fileio import list_files, read_image, write_image
    from unmask_cli.inference import _aligner, run_infer
    from unmask_cli.release import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="shipped")
    parser.add_argument("--source", type=Path, default=SHARED / "masked_real")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "masked_real")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (0 = all)")
    parser.add_argument("--changed", type=int, default=12, help="levels a pixel must change to count as repainted")
    parser.add_argument("--cover", type=float, default=0.6)
    parser.add_argument("--outside", type=float, default=0.25)
    parser.add_argument("--untouched", type=float, default=0.05, help="below this share of the lower face "
                        "repainted, a face counts as judged 'no mask'")
    parser.add_argument("--min-mask-area", type=float, default=None, help="infer.min_mask_area (default: infer's)")
    parser.add_argument("--sheet", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = args.source
    if args.limit:
        source = args.work / "in"
        source.mkdir(parents=True, exist_ok=True)
        for path in list_files(args.source)[: args.limit]:
            link = source / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    checkpoint = resolve_model(args.checkpoint)
    out = args.work / "out"
    start = time.perf_counter()
    extra = {} if args.min_mask_area is None else {"min_mask_area": args.min_mask_area}
    summary = run_infer(InferConfig(checkpoint=str(checkpoint), device="cpu", overwrite=True, **extra), source, out)
    seconds = time.perf_counter() - start
    model = build_networks_from_checkpoint(checkpoint)
    finder = _aligner(None, "yunet", model.alignment, model.crop)

    faces_total = removed = photos_removed = photos_with_face = no_mask = 0
    rows, covers, edges = [], [], []
    by_size = {label: [0, 0] for label in SIZES}  # faces, removed
    for path in list_files(source):
        try:
            photo = read_image(path)
        except Exception:
            continue
        found = [f for f in finder.detect(photo) if f.side >= finder.min_face]
        if not found or not (out / path.name).exists():
            continue
        output = read_image(out / path.name)
        scores = score_photo(photo, output, found, args)
        photos_with_face += 1
        faces_total += len(found)
        hits = sum(s["removed"] for s in scores)
        removed += hits
        photos_removed += hits > 0
        covers += [s["cover"] for s in scores]
        no_mask += sum(s["no_mask"] for s in scores)
        edges += [s["edge_left"] for s in scores if s["removed"]]
        for face, score in zip(found, scores, strict=True):
            bucket = by_size[size_label(face.side)]
            bucket[0] += 1
            bucket[1] += score["removed"]
        rows.append((photo, output, found, scores))
    photos = summary.files
    result = {
        "checkpoint": str(checkpoint), "photos": photos, "photos_with_a_face": photos_with_face,
        "faces": faces_total, "faces_removed": removed, "share_faces_removed": removed / max(1, faces_total),
        "photos_with_a_face_removed": photos_removed, "share_photos_removed": photos_removed / max(1, photos),
        "median_lower_face_cover": float(np.median(covers)) if covers else 0.0,
        "faces_judged_no_mask": no_mask, "share_faces_judged_no_mask": no_mask / max(1, faces_total),
        "lower_edge_left_mean": float(np.mean(edges)) if edges else 0.0,
        "lower_edge_left_median": float(np.median(edges)) if edges else 0.0,
        "removed_with_edge_left_over_half": int(sum(e > 0.5 for e in edges)),
        "removed_by_face_size": {label: {"faces": n, "removed": k, "share": k / max(1, n)}
                                 for label, (n, k) in by_size.items()},
        "infer_seconds": seconds, "photos_per_second": photos / seconds,
        "criteria": {"changed_levels": args.changed, "cover": args.cover, "outside": args.outside,
                     "untouched": args.untouched},
    }
    print(json.dumps(result, indent=1))
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(rows), size=min(args.sheet, len(rows)), replace=False)) if rows else []
    if chosen:
        write_image(args.work / "sheet.png", sheet([rows[i] for i in chosen]))
    (args.work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"contact sheet: {args.work / 'sheet.png'} ({len(chosen)} photos; research-use images: never commit it)")


if __name__ == "__main__":
    main()
