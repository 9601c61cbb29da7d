"""Does `unmask infer` leave faces without a mask alone? Default infer (predicted masks) on folders of
photos of people who wear none, then the share of each photo it changed.

    .venv/bin/python benchmarks/bare_faces.py [--checkpoint shipped] [--source DIR ...] [--work DIR]

Per photo: the share of its pixels that changed by more than --levels (any channel). Reports, per folder,
the share of photos with more than --pixels of their pixels changed (the goal: at most 1 %), the faces
infer judged to wear no mask, and the worst photos by name. Defaults: ../shared/utkface (3,000 faces)
and ../shared/faces (public-domain portraits and group photos).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def changed_share(before: np.ndarray, after: np.ndarray, levels: int) -> float:
    if before.shape != after.shape:
        return 1.0
    return float((np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2) > levels).mean())


def main() -> None:
    from unmask_cli.config import InferConfig
    from unmask_cli.fileio import list_files, read_image
    from unmask_cli.inference import run_infer
    from unmask_cli.release import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="shipped")
    parser.add_argument("--source", type=Path, action="append")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bare_faces")
    parser.add_argument("--levels", type=int, default=24)
    parser.add_argument("--pixels", type=float, default=0.02)
    parser.add_argument("--min-mask-area", type=float, default=None, help="infer.min_mask_area (default: infer's)")
    args = parser.parse_args()
    sources = args.source or [SHARED / "utkface", SHARED / "faces"]
    checkpoint = resolve_model(args.checkpoint)
    report = {"checkpoint": str(checkpoint), "levels": args.levels, "pixels": args.pixels, "folders": {}}
    for source in sources:
        if not source.is_dir():
            raise SystemExit(f"{source}: not found")
        out = args.work / source.name
        extra = {} if args.min_mask_area is None else {"min_mask_area": args.min_mask_area}
        start = time.perf_counter()
        summary = run_infer(InferConfig(checkpoint=str(checkpoint), device="cpu", overwrite=True, **extra),
                            source, out)
        seconds = time.perf_counter() - start
        shares = {}
        for path in list_files(source):
            if (out / path.name).exists():
                try:
                    shares[path.name] = changed_share(read_image(path), read_image(out / path.name), args.levels)
                except Exception:  # an unreadable input is infer's to report
                    continue
        values = np.array(list(shares.values()))
        worst = sorted(shares.items(), key=lambda kv: -kv[1])[:10]
        report["folders"][source.name] = {
            "photos": len(values), "faces_found": summary.faces + summary.faces_empty_map,
            "faces_judged_no_mask": summary.faces_empty_map, "faces_unmasked": summary.faces,
            "photos_over": int((values > args.pixels).sum()), "share_photos_over": float((values > args.pixels).mean()),
            "share_photos_over_10pct": float((values > 0.10).mean()), "mean_changed": float(values.mean()),
            "worst": [[name, round(share, 4)] for name, share in worst], "seconds": round(seconds, 1)}
        print(f"{source.name}: {report['folders'][source.name]['photos_over']} of {len(values)} photos "
              f"({100 * (values > args.pixels).mean():.2f} %) have more than {100 * args.pixels:g} % of their pixels "
              f"changed by more than {args.levels} levels; faces judged without a mask: {summary.faces_empty_map} "
              f"of {summary.faces + summary.faces_empty_map}")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
