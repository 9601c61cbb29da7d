"""Every face detector of `unmask infer` side by side: real masked photos, synthetic masks, faceless images.

    .venv/bin/python benchmarks/detect_masked.py [--real ../shared/masked_real] [--limit N] [--out runs/detect]

Three sets, each searched by every detector exactly as `unmask infer --detector NAME` searches a photo
(the detector objects of ``unmask_cli.faces``), one photo at a time, all detectors on the same photo:

1. ``--real`` (../shared/masked_real: real web photos of people wearing masks, many of them crowds; no
   ground truth): photos with at least one face found, faces found (all, and at least ``--min-face`` px,
   the smallest face `unmask infer` unmasks) and ms a photo. ``hog+cnn`` is derived from the hog and cnn
   runs (HOG's faces, or the CNN's where HOG finds none; HOG's time plus the CNN's there).
2. ``--faces`` (../shared/faces) with a synthetic mask of every style drawn on each face found on the
   unmasked photo (the renderer of `unmask prepare`): recall per style (a true face counts as found when
   a found box's centre lies inside it).
3. faceless images shipped with scikit-image (coffee, chelsea the cat, rocket, ...): false faces.

Writes ``OUT/detect.json`` and ``OUT/contact_sheet.png``: real photos with every detector's boxes (YuNet
green, CNN red, HOG blue), the photos where YuNet and the CNN disagree most first, for checking by eye.
The sheet shows the research-only photos of --real: it stays in OUT, never in the repository.
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
from unmask_cli.faces import FaceAligner, make_detector
from unmask_cli.fileio import list_images, read_image
from unmask_cli.masks import MASK_DESIGNS, apply_style

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DETECTORS = ("yunet", "hog", "cnn")
COLOURS = {"yunet": (0, 200, 0), "cnn": (230, 0, 0), "hog": (0, 90, 255)}
FACELESS = ("coffee", "chelsea", "rocket", "coins", "hubble_deep_field", "immunohistochemistry", "moon", "page",
            "text", "brick", "grass", "gravel", "colorwheel", "logo", "motorcycle_left", "retina", "horse", "clock")


def timed(detector, image: np.ndarray) -> tuple[list, float]:
    start = time.perf_counter()
    found = detector(image)
    return found, 1000 * (time.perf_counter() - start)


def side(d) -> int:
    return min(d.box[2] - d.box[0], d.box[3] - d.box[1])


def real_photos(args, detectors, console) -> tuple[dict, list]:
    paths = list_images(args.real)[:args.limit] if args.limit else list_images(args.real)
    stats = {name: {"photos_found": 0, "faces": 0, "usable_faces": 0, "ms": 0.0} for name in (*DETECTORS, "hog+cnn")}
    records = []
    start = time.perf_counter()
    for index, path in enumerate(paths):
        image = read_image(path)
        result = {name: timed(det, image) for name, det in detectors.items()}
        hog, hog_ms = result["hog"]
        result["hog+cnn"] = (hog, hog_ms) if hog else (result["cnn"][0], hog_ms + result["cnn"][1])
        for name, (found, ms) in result.items():
            s = stats[name]
            s["photos_found"] += bool(found)
            s["faces"] += len(found)
            s["usable_faces"] += sum(side(d) >= args.min_face for d in found)
            s["ms"] += ms
        records.append((path, {name: [d.box for d in found] for name, (found, _) in result.items()}))
        if (index + 1) % 100 == 0:
            console.print(f"  real photos: {index + 1}/{len(paths)} ({time.perf_counter() - start:.0f} s)")
    for s in stats.values():
        s["photos"] = len(paths)
        s["ms"] = s["ms"] / max(1, len(paths))
    return stats, records


def hits(found, truth) -> int:
    """True faces with a found box centred inside them (each counted once)."""
    count = 0
    for left, top, right, bottom in (f.box for f in truth):
        if any(left <= (d.box[0] + d.box[2]) / 2 <= right and top <= (d.box[1] + d.box[3]) / 2 <= bottom
               for d in found):
            count += 1
    return count


def synthetic(args, detectors) -> dict:
    truth_finder = FaceAligner(detector="hog", alignment="ffhq")  # the unmasked faces the masks are drawn on
    photos = [read_image(p) for p in list_images(args.faces)]
    out = {}
    for style in args.styles.split(","):
        rng = np.random.default_rng(args.seed)
        total, found = 0, dict.fromkeys(detectors, 0)
        for image in photos:
            truth = truth_finder.detect(image)
            masked = image
            try:
                for face in truth:
                    masked = apply_style(style, masked, face.landmarks, rng).masked
            except BadInput:
                continue
            total += len(truth)
            for name, det in detectors.items():
                found[name] += hits(det(masked), truth)
        out[style] = {"faces": total, **found}
    return out


def faceless(detectors) -> dict:
    import skimage.data

    out = {name: 0 for name in detectors}
    out["images"] = []
    for name in FACELESS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # not shipped with this scikit-image (some are downloaded on demand)
            continue
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, :3].astype(np.uint8))
        out["images"].append(name)
        for det_name, det in detectors.items():
            out[det_name] += len(det(image))
    return out


def contact_sheet(records, path: Path, count: int = 24, tile: int = 320) -> None:
    import cv2

    from unmask_cli.fileio import write_image

    def disagreement(item):
        boxes = item[1]
        return abs(len(boxes["yunet"]) - len(boxes["cnn"])) + (len(boxes["yunet"]) == 0)

    tiles = []
    for image_path, boxes in sorted(records, key=disagreement, reverse=True)[:count]:
        image = read_image(image_path).copy()
        thickness = max(1, round(max(image.shape[:2]) / 250))
        for name in ("hog", "cnn", "yunet"):
            for left, top, right, bottom in boxes[name]:
                cv2.rectangle(image, (left, top), (right, bottom), COLOURS[name], thickness)
        scale = tile / max(image.shape[:2])
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        label = f"Y{len(boxes['yunet'])} C{len(boxes['cnn'])} H{len(boxes['hog'])}"
        cv2.putText(canvas, label, (4, tile - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(canvas)
    while len(tiles) % 6:
        tiles.append(np.full((tile, tile, 3), 255, np.uint8))
    rows = [np.concatenate(tiles[i:i + 6], axis=1) for i in range(0, len(tiles), 6)]
    write_image(path, np.concatenate(rows, axis=0))


def report(console, real, synth, none, args) -> None:
    table = Table(title=f"real masked photos ({real['yunet']['photos']} in {args.real})")
    for column in ("detector", "photos with a face", "faces", f"faces >= {args.min_face} px", "ms / photo"):
        table.add_column(column, justify="right")
    for name, s in real.items():
        table.add_row(name, f"{s['photos_found']} ({100 * s['photos_found'] / max(1, s['photos']):.1f} %)",
                      str(s["faces"]), str(s["usable_faces"]), f"{s['ms']:.1f}")
    console.print(table)
    table = Table(title=f"synthetic masks on {args.faces}: faces found / faces")
    table.add_column("style")
    for name in DETECTORS:
        table.add_column(name, justify="right")
    for style, row in synth.items():
        table.add_row(style, *(f"{row[n]} / {row['faces']}" for n in DETECTORS))
    console.print(table)
    console.print(f"faceless images ({', '.join(none['images'])}): false faces "
                  + ", ".join(f"{n} {none[n]}" for n in DETECTORS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=SHARED / "masked_real")
    parser.add_argument("--faces", type=Path, default=SHARED / "faces")
    parser.add_argument("--limit", type=int, default=0, help="only the first N real photos (0 = all)")
    parser.add_argument("--min-face", type=int, default=32)
    parser.add_argument("--styles", default=",".join(MASK_DESIGNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/detect"))
    args = parser.parse_args()
    console = Console()
    detectors = {name: make_detector(name) for name in DETECTORS}
    real, records = real_photos(args, detectors, console)
    synth = synthetic(args, detectors)
    none = faceless(detectors)
    report(console, real, synth, none, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect.json").write_text(json.dumps({"real": real, "synthetic": synth, "faceless": none}, indent=2)
                                          + "\n", encoding="utf-8")
    contact_sheet(records, args.out / "contact_sheet.png")
    console.print(f"written {args.out / 'detect.json'} and {args.out / 'contact_sheet.png'} (check it by eye)")


if __name__ == "__main__":
    main()
