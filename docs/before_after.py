"""The README's opening picture: the shipped model on public-domain photos with drawn masks.

    .venv/bin/python docs/before_after.py [--faces ../shared/faces] [--out docs/before_after.png]

Each photo of ``--faces`` (US government portraits, public domain) gets a synthetic mask drawn on its
largest face from its own landmarks (styles in turn: surgical, cloth, n95, kn95), then ``unmask infer``
runs with no ``--checkpoint`` (the shipped model) and predicted masks. The picture shows, per photo, the
face region: masked input | output | the photo before the mask was drawn.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("obama.jpg", "biden.jpg", "grace_hopper.jpg", "obama2.jpg", "biden2.jpg", "obama1.jpg")
STYLES = ("surgical", "cloth", "n95", "kn95")


def main() -> None:
    import cv2

    from unmask_cli.config import InferConfig
    from unmask_cli.faces import FaceAligner
    from unmask_cli.fileio import read_image, write_image
    from unmask_cli.inference import run_infer
    from unmask_cli.masks import parse_mask_types, synthesize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "before_after.png")
    parser.add_argument("--tile", type=int, default=200)
    args = parser.parse_args()

    aligner = FaceAligner()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="unmask_before_after_"))
    (work / "in").mkdir()
    boxes = {}
    for index, name in enumerate(PHOTOS):
        photo = read_image(args.faces / name)
        face = aligner.detect(photo)[0]
        masked = synthesize(photo, face.landmarks, parse_mask_types(STYLES[index % len(STYLES)]), rng).masked
        write_image(work / "in" / f"{Path(name).stem}.png", masked)
        boxes[Path(name).stem] = (photo, masked, face.landmarks)
    summary = run_infer(InferConfig(device="cpu"), work / "in", work / "out")
    rows = []
    for stem, (photo, masked, landmarks) in boxes.items():
        output = read_image(work / "out" / f"{stem}.png")
        centre = landmarks.mean(axis=0)
        half = 0.75 * max(np.ptp(landmarks, axis=0))
        x0, y0 = (int(max(0, c - half)) for c in centre)
        x1, y1 = int(min(photo.shape[1], centre[0] + half)), int(min(photo.shape[0], centre[1] + half))
        tiles = [cv2.resize(img[y0:y1, x0:x1], (args.tile, args.tile), interpolation=cv2.INTER_AREA)
                 for img in (masked, output, photo)]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    half_rows = (len(rows) + 1) // 2
    left, right = np.concatenate(rows[:half_rows]), np.concatenate(rows[half_rows:])
    gap = np.full((left.shape[0], 12, 3), 255, np.uint8)
    write_image(args.out, np.concatenate([left, gap, right], axis=1))
    print(f"{summary.faces} faces unmasked by the shipped model; picture: {args.out} "
          "(per photo: masked | unmasked | before the mask)")


if __name__ == "__main__":
    main()
