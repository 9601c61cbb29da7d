"""How far a mask moves the face crop: the same faces aligned with and without a synthetic mask.

    .venv/bin/python benchmarks/alignment_drift.py [--utkface 500] [--offset 500] [--today-faces 100] [--out runs/drift]

Faces: ``--utkface`` photos of ../shared/utkface from ``--offset`` on (by default photos 500 to 999: the
visible alignment's settings were chosen on photos among the first 500) plus every face of ../shared/faces. Each face is
found and aligned on the unmasked photo; then a mask of every style (the renderer of `unmask prepare`,
drawn from the unmasked photo's landmarks) is drawn on it, and the masked photo is searched and aligned
again exactly as `unmask infer` does it (``FaceAligner.detect`` + ``FaceAligner.quad``). Drift = the
largest displacement of the four crop corners, as a share of the unmasked crop's side. A masked face the
detector misses counts as missed, not as drift.

Methods, side by side on the same masked photos:

* ``visible`` (the default): YuNet, 68 landmarks, eyes from the upper face (``VisibleEyes``)
* ``ffhq/yunet``: today's alignment (eyes + mouth corners of the 68 landmarks) on YuNet's faces
* ``ffhq/hog+cnn``: today's whole path (dlib HOG, the CNN where HOG finds none), on the first
  ``--today-faces`` UTKFace photos only: the CNN takes about a second a masked UTKFace photo, and 3 to
  27 s a photo of ../shared/faces
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from unmask_cli.errors import BadInput
from unmask_cli.faces import FaceAligner
from unmask_cli.fileio import list_images, read_image
from unmask_cli.masks import MASK_DESIGNS, apply_style

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
METHODS = {"visible": ("yunet", "visible"), "ffhq/yunet": ("yunet", "ffhq"), "ffhq/hog+cnn": ("hog+cnn", "ffhq")}


def drift(reference: np.ndarray, quad: np.ndarray) -> float:
    side = float(np.hypot(*(reference[3] - reference[0])))
    return float(np.hypot(*(quad - reference).T).max()) / side


def same_face(found, box, min_side: int = 32):
    """The (largest) found face of at least ``min_side`` px (the smallest `unmask infer` aligns) whose box
    centre lies inside ``box`` (the face before the mask), else None."""
    left, top, right, bottom = box
    for face in (f for f in found if f.side >= min_side):
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        if left <= cx <= right and top <= cy <= bottom:
            return face
    return None


def distinct(faces):
    """The faces (largest first) minus those whose centre lies inside a larger one (false detections of
    a face part)."""
    kept = []
    for face in faces:
        if same_face(kept, face.box, 0) is None and not any(same_face([face], k.box, 0) for k in kept):
            kept.append(face)
    return kept


def photos(args) -> list[tuple[np.ndarray, bool]]:
    """(image, in the subset today's path is measured on)."""
    chosen = list_images(args.utkface_dir)[args.offset:args.offset + args.utkface]
    items = [(read_image(p), i < args.today_faces) for i, p in enumerate(chosen)]
    if args.faces_dir.is_dir():
        items += [(read_image(p), False) for p in list_images(args.faces_dir)]
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utkface-dir", type=Path, default=SHARED / "utkface")
    parser.add_argument("--faces-dir", type=Path, default=SHARED / "faces")
    parser.add_argument("--utkface", type=int, default=500)
    parser.add_argument("--offset", type=int, default=500,
                        help="skip the first N UTKFace photos (the alignment's constants were tuned on the first 500)")
    parser.add_argument("--today-faces", type=int, default=100)
    parser.add_argument("--styles", default=",".join(MASK_DESIGNS))
    parser.add_argument("--out", type=Path, default=Path("runs/drift"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    chosen = args.methods.split(",")
    styles = args.styles.split(",")
    truth_finder = FaceAligner(detector="yunet", alignment="ffhq")  # the faces masks are drawn on
    finders = {name: FaceAligner(detector=d, alignment=a) for name, (d, a) in METHODS.items() if name in chosen}
    drifts = {m: {s: [] for s in styles} for m in METHODS}
    missed = {m: {s: 0 for s in styles} for m in METHODS}
    rng = np.random.default_rng(args.seed)
    console, start = Console(), time.perf_counter()
    items = photos(args)
    for index, (image, today) in enumerate(items):
        truth = distinct(truth_finder.detect(image))
        methods = [m for m in finders if today or m != "ffhq/hog+cnn"]
        refs = {m: finders[m].detect(image) for m in methods}
        for style in styles:
            masked = image
            try:
                for face in truth:
                    masked = apply_style(style, masked, face.landmarks, rng).masked
            except BadInput:  # a mask outside the photo (a face cut by the edge)
                continue
            for m in methods:
                found = finders[m].detect(masked)
                for face in truth:
                    ref, now = same_face(refs[m], face.box), same_face(found, face.box)
                    if ref is None:
                        continue
                    if now is None:
                        missed[m][style] += 1
                    else:
                        drifts[m][style].append(drift(finders[m].quad(ref), finders[m].quad(now)))
        if (index + 1) % 50 == 0:
            console.print(f"{index + 1}/{len(items)} photos, {time.perf_counter() - start:.0f} s")
    report(console, args, styles, drifts, missed, len(items))


def report(console, args, styles, drifts, missed, count) -> None:
    table = Table(title=f"crop-corner drift under a mask, % of the crop side ({count} photos; median / 95th pct)")
    table.add_column("method")
    for column in ("all styles", *styles, "faces", "missed"):
        table.add_column(column, justify="right")
    summary = {}
    for m in METHODS:
        every = np.array([v for s in styles for v in drifts[m][s]])
        if every.size == 0:
            continue
        cell = lambda v: f"{100 * np.median(v):.2f} / {100 * np.percentile(v, 95):.2f}" if len(v) else "-"  # noqa: E731
        table.add_row(m, cell(every), *(cell(drifts[m][s]) for s in styles), str(every.size),
                      str(sum(missed[m].values())))
        summary[m] = {"median": float(np.median(every)), "p95": float(np.percentile(every, 95)),
                      "faces": int(every.size), "missed": int(sum(missed[m].values())),
                      "styles": {s: {"median": float(np.median(drifts[m][s])), "p95": float(np.percentile(drifts[m][s], 95)),
                                     "faces": len(drifts[m][s]), "missed": missed[m][s]}
                                 for s in styles if drifts[m][s]}}
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    console.print(f"written {args.out / 'drift.json'}")


if __name__ == "__main__":
    main()
