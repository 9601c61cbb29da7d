"""Masked demo photos: the built-in portraits (:mod:`unmask_cli.samples`) with synthetic masks drawn from
their own landmarks, for trying ``unmask infer`` with no data (``make demo``)::

    python -m unmask_cli.demo OUT_DIR [COUNT]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmask_cli.faces import FaceAligner
from unmask_cli.fileio import ensure_dir, write_image
from unmask_cli.masks import parse_mask_types, synthesize
from unmask_cli.samples import PREFIX, load_variant, sample_keys


def write_masked_photos(out_dir: str | Path, count: int = 4, mask_types: str = "surgical,n95,kn95,cloth",
                        seed: int = 0) -> list[Path]:
    """Whole photos with synthetic masks drawn over each face (for demos of ``unmask infer``).

    Masks are rendered in photo coordinates from the photo's own landmarks. Writes ``NAME.jpg`` photos
    and ``masks/NAME.png`` maps (the ground truth, usable with ``unmask infer --masks``).
    """
    out_dir = Path(out_dir)
    ensure_dir(out_dir / "masks")
    aligner = FaceAligner()
    weights = parse_mask_types(mask_types)
    rng = np.random.default_rng(seed)
    written = []
    for key in sample_keys(count):
        photo = load_variant(key)
        mask = np.zeros(photo.shape[:2], bool)
        for face in aligner.detect(photo)[:1]:  # the portrait; reflections can hold false detections
            result = synthesize(photo, face.landmarks, weights, rng)
            photo, mask = result.masked, mask | result.mask
        name = key[len(PREFIX):].replace("#", "_")
        write_image(out_dir / f"{name}.jpg", photo)
        write_image(out_dir / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
        written.append(out_dir / f"{name}.jpg")
    return written


if __name__ == "__main__":  # python -m unmask_cli.demo OUT_DIR [COUNT]
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "demo/photos"
    paths = write_masked_photos(target, int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    print(f"wrote {len(paths)} masked sample photos to {target}/ (ground-truth maps in {target}/masks/)")
