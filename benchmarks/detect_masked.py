"""How many masked faces each face detector of `unmask infer` finds, and how long it takes.

    .venv/bin/python benchmarks/detect_masked.py [--faces ../shared/faces] [--styles surgical,cloth,n95]

The faces are found on the unmasked photos first (HOG); a synthetic mask of each style (the same renderer
as `unmask prepare`) is drawn on every one of them, and the masked photo is searched by each detector mode
exactly as `unmask infer --detector MODE` searches it (``FaceAligner(detector=MODE).detect``). A found face
counts when its box centre lies inside a true face's box. Detectors run side by side on the same photo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from unmask_cli.faces import FaceAligner
from unmask_cli.fileio import list_images, read_image
from unmask_cli.masks import apply_style

HERE = Path(__file__).resolve().parent
MODES = ("hog", "cnn")


def hits(found, truth) -> int:
    """True faces with a found box centred inside them (each counted once)."""
    count = 0
    for left, top, right, bottom in (f.box for f in truth):
        if any(left <= (f.box[0] + f.box[2]) / 2 <= right and top <= (f.box[1] + f.box[3]) / 2 <= bottom
               for f in found):
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=HERE.parent.parent / "shared" / "faces")
    parser.add_argument("--styles", default="surgical,cloth,n95")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    photos = [(p.name, read_image(p)) for p in list_images(args.faces)]
    aligners = {mode: FaceAligner(detector=mode) for mode in MODES}
    table = Table(title=f"masked faces found in {args.faces} ({len(photos)} photos)")
    for column in ("mask style", "faces", *(f"{m} found" for m in MODES), *(f"{m} s/photo" for m in MODES)):
        table.add_column(column, justify="right")
    console = Console()
    for style in args.styles.split(","):
        rng = np.random.default_rng(args.seed)
        total, found, seconds = 0, dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0.0)
        for name, image in photos:
            truth = aligners["hog"].detect(image)
            masked = image
            for face in truth:
                masked = apply_style(style, masked, face.landmarks, rng).masked
            total += len(truth)
            line = []
            for mode, aligner in aligners.items():
                tick = time.perf_counter()
                n = hits(aligner.detect(masked), truth)
                spent = time.perf_counter() - tick
                seconds[mode] += spent
                found[mode] += n
                line.append(f"{mode} {n} ({spent:.1f} s)")
            console.print(f"{style} {name} {image.shape[1]}x{image.shape[0]}: {len(truth)} face(s); "
                          + ", ".join(line))
        table.add_row(style, str(total), *(str(found[m]) for m in MODES),
                      *(f"{seconds[m] / len(photos):.2f}" for m in MODES))
    console.print(table)


if __name__ == "__main__":
    main()
