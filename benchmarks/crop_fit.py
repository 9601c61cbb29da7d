"""Does the whole synthetic mask fit inside the crop? The share of masks, per style, that lie entirely
inside the crop of a framing (alignment + crop), with and without ``--mask-variety``.

    .venv/bin/python benchmarks/crop_fit.py [--source ../shared/utkface] [--images 400]
        [--framing visible:0.7 --framing visible-neck:1.1]

The test is :func:`unmask_cli.prepare.mask_fits_crop` (the face aligned on a canvas twice the crop's
side, the mask drawn there, no mask pixel, straps included, outside the central half). Every framing
sees the same faces and the same random draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from unmask_cli.errors import BadInput
from unmask_cli.faces import FaceAligner
from unmask_cli.fileio import list_images, read_image
from unmask_cli.prepare import mask_fits_crop

HERE = Path(__file__).resolve().parent
STYLES = ("surgical", "cloth", "n95", "kn95", "rect", "oval", "freeform")
SIZE = 256  # aligner size (the measure does not depend on it)


def fits(aligner: FaceAligner, image: np.ndarray, face, style: str, variety: bool, seed: int) -> bool | None:
    """Whether a ``style`` mask on ``face`` lies inside the aligner's crop; None when none can be drawn."""
    try:
        return mask_fits_crop(aligner, image, face, style, np.random.default_rng(seed), variety)
    except BadInput:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE.parent.parent / "shared" / "utkface")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--framing", action="append", help="ALIGNMENT:CROP (repeatable)")
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found (the benchmark uses ../shared/utkface)")
    framings = [(a, float(c)) for a, c in (f.split(":") for f in (args.framing or ["visible:0.7", "visible-neck:1.1"]))]
    aligners = {f: FaceAligner(SIZE, alignment=f[0], crop=f[1]) for f in framings}
    counts = {(f, v, s): [0, 0] for f in framings for v in (False, True) for s in STYLES}
    files = list_images(args.source)[: args.images]
    for index, path in enumerate(files):
        image = read_image(path)
        for framing, aligner in aligners.items():
            try:
                face = aligner.detect(image)[0]
            except (BadInput, IndexError):
                continue
            for variety in (False, True):
                for k, style in enumerate(STYLES):
                    ok = fits(aligner, image, face, style, variety, seed=index * 100 + k)
                    if ok is not None:
                        counts[(framing, variety, style)][0] += ok
                        counts[(framing, variety, style)][1] += 1
    print(f"share of synthetic masks entirely inside the crop ({len(files)} photos of {args.source.name})")
    print(f"{'framing':<20} {'masks':<9} " + " ".join(f"{s:>9}" for s in STYLES) + "   worst")
    for framing in framings:
        for variety in (False, True):
            shares = [c[0] / max(c[1], 1) for c in (counts[(framing, variety, s)] for s in STYLES)]
            label = f"{framing[0]} {framing[1]:g}"
            print(f"{label:<20} {'varied' if variety else 'designed':<9} "
                  + " ".join(f"{100 * x:8.1f}%" for x in shares) + f"  {100 * min(shares):5.1f}%")
    n = counts[(framings[0], False, STYLES[0])][1]
    print(f"({n} faces per cell)")


if __name__ == "__main__":
    main()
