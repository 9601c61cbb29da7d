"""Does the map module find real masks whatever the photo's quality? Its mask / no-mask decision on the
faces of real photos, as they are and after controlled changes, for one or more models side by side.

    .venv/bin/python benchmarks/map_robustness.py [--checkpoint shipped --checkpoint runs/X/best.pt ...]
        [--masked ../shared/masked_real] [--bare ../shared/utkface_extra --bare-last 1000]
        [--work runs/map_robustness]

Faces are found, aligned and cropped as `unmask infer` does (YuNet, each model's alignment and crop,
resized to its size); the crops are cached under --work. Per change (none, blur, 2x and 3x downscale, JPEG
40, lower and higher contrast, grey, sharpened), the share of faces on which the model finds a mask
(infer's threshold and min mask area): on --masked (people wearing masks: higher is better) and on --bare
(people who wear none: lower is better; by default the last 1,000 names of ../shared/utkface_extra,
which no shipped model trained on). A map module that learned how crisp synthetic masks are loses
its real masks under blur and finds them more often after sharpening.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def _rescale(image: np.ndarray, factor: float) -> np.ndarray:
    import cv2

    size = image.shape[0]
    small = cv2.resize(image, (round(size / factor),) * 2, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return np.clip((image.astype(np.float32) - 128) * factor + 128, 0, 255).astype(np.uint8)


def _changes() -> dict:
    import cv2

    return {
        "as is": lambda c: c,
        "blur 1.5 px": lambda c: cv2.GaussianBlur(c, (0, 0), 1.5),
        "downscale 2x": lambda c: _rescale(c, 2.0),
        "downscale 3x": lambda c: _rescale(c, 3.0),
        "JPEG 40": lambda c: _jpeg(c, 40),
        "contrast x0.6": lambda c: _contrast(c, 0.6),
        "contrast x1.5": lambda c: _contrast(c, 1.5),
        "grey": lambda c: np.repeat(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2),
        "sharpened": lambda c: np.clip(2.0 * c - cv2.GaussianBlur(c, (0, 0), 2).astype(np.float32), 0, 255
                                       ).astype(np.uint8),
    }


def face_crops(folder: Path, alignment: str, crop: float, size: int, cache: Path, last: int = 0) -> np.ndarray:
    """(N, S, S, 3) uint8: every face of at least 32 px in the folder's photos (its ``last`` names, sorted,
    when ``last`` > 0), as infer crops it."""
    from unmask_cli.errors import BadInput
    from unmask_cli.fileio import list_files, read_image
    from unmask_cli.inference import _aligner, _crop_size, _resize

    if cache.is_file():
        return np.load(cache)
    finder = _aligner(None, "yunet", alignment, crop)
    crops = []
    for path in list_files(folder)[-last if last else 0:]:
        try:
            image = read_image(path)
            found, _ = finder.find_faces(image, path, None, True)
        except BadInput:
            continue
        for face in found:
            side = _crop_size(finder.quad(face), size)
            crops.append(_resize(finder.align(image, face, side).image, size, size))
    out = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


def found_share(M, crops: np.ndarray, threshold: float, min_area: float) -> float:
    import torch

    from unmask_cli.inference import mask_decision
    from unmask_cli.models import predict_map
    from unmask_cli.tensors import from_uint8

    found = 0
    with torch.inference_mode():
        for i in range(0, len(crops), 64):
            maps = predict_map(M, from_uint8(torch.from_numpy(np.ascontiguousarray(crops[i:i + 64]))), threshold)
            found += sum(bool(mask_decision(m, min_area).any()) for m in maps[:, 0].numpy() > 0.5)
    return found / max(1, len(crops))


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from unmask_cli.checkpoints import build_networks_from_checkpoint
    from unmask_cli.config import InferConfig
    from unmask_cli.release import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", help="repeatable; default: shipped")
    parser.add_argument("--masked", type=Path, default=SHARED / "masked_real")
    parser.add_argument("--bare", type=Path, default=SHARED / "utkface_extra")
    parser.add_argument("--bare-last", type=int, default=1000, help="only the last N photos of --bare (0 = all)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "map_robustness")
    parser.add_argument("--min-mask-area", type=float, default=None, help="infer.min_mask_area (default: infer's)")
    args = parser.parse_args()
    defaults = InferConfig(**({} if args.min_mask_area is None else {"min_mask_area": args.min_mask_area}))
    changes = _changes()
    result = {"threshold": defaults.threshold, "min_mask_area": defaults.min_mask_area, "models": {}}
    for spec in args.checkpoint or ["shipped"]:
        path = resolve_model(spec)
        model = build_networks_from_checkpoint(path)
        M = model.M.eval()
        rows = {}
        for kind, folder, last in (("masked", args.masked, 0), ("bare", args.bare, args.bare_last)):
            name = f"{kind}_{folder.name}_{last}_{model.alignment}_{model.crop:g}_{model.image_size}.npy"
            crops = face_crops(folder, model.alignment, model.crop, model.image_size, args.work / name, last)
            rows[kind] = {"faces": len(crops), **{label: found_share(M, np.stack([change(c) for c in crops]),
                                                                      defaults.threshold, defaults.min_mask_area)
                                                  if len(crops) else None for label, change in changes.items()}}
        result["models"][spec] = rows
    table = Table(title="share of faces on which a mask is found (masked: higher is better; bare: lower)")
    table.add_column("change")
    for spec, rows in result["models"].items():
        for kind in ("masked", "bare"):
            table.add_column(f"{spec}\n{kind} ({rows[kind]['faces']} faces)", justify="right")
    for label in changes:
        cells = []
        for rows in result["models"].values():
            cells += [f"{100 * rows[k][label]:.1f} %" if rows[k][label] is not None else "-" for k in ("masked", "bare")]
        table.add_row(label, *cells)
    Console().print(table)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
