"""``unmask export``: pack a trained checkpoint into a release file (see :mod:`unmask_cli.release` for
the format): float16 G (its EMA weights when the run kept them) and M, the run's config, alignment and
crop, a ``release`` entry (data, metrics, licence) and the sha256 sidecar.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from unmask_cli.checkpoints import Checkpoint, build_networks_from_checkpoint
from unmask_cli.errors import UnmaskError
from unmask_cli.release import DEFAULT_LICENCE, SIDECAR_FORMAT, sidecar_path


def _half(state: dict) -> dict:
    """Floating tensors to float16 (BatchNorm counters and other integers stay as they are)."""
    return {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def _data_description(root: str | os.PathLike | None) -> dict:
    """What the model was trained on: the prepared folder's settings and split sizes, when it is here."""
    from collections import Counter

    from unmask_cli.data import dataset_settings, read_manifest

    settings = dataset_settings(root) if root is not None else {}
    if not settings:
        return {}
    splits = Counter(record.get("split", "?") for record in read_manifest(root))
    return {"settings": settings, "samples": dict(splits)}


def _metrics_description(path: str | os.PathLike | None) -> dict:
    """The summary of an ``unmask eval`` metrics.json (means per method and metric)."""
    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        summary = doc["summary"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnmaskError(f"not an unmask eval metrics.json ({err})", path) from err
    means = {method: {metric: stats.get("mean") for metric, stats in metrics.items()}
             for method, metrics in summary.items()}
    return {"split": doc.get("split"), "n_images": doc.get("n_images"), "vgg": doc.get("vgg"),
            "data": doc.get("data"), "means": means}


def export_release(source: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | None = None,
                   metrics: str | os.PathLike | None = None, ema: bool = True,
                   licence: str = DEFAULT_LICENCE, about: str = "") -> tuple[Path, dict]:
    """Pack checkpoint ``source`` into release file ``out`` (float16 G and M) and its sidecar.

    ``data``: the prepared folder it was trained on (default: the checkpoint's ``data.root``, described
    only when present); ``metrics``: an ``unmask eval`` metrics.json to record; ``about``: the training data
    in words. Returns (path, sidecar)."""
    from unmask_cli.fileio import atomic_write_text, sha256_file

    out = Path(out)
    if out.suffix != ".pt":
        raise UnmaskError("a release file name must end in .pt (its description goes beside it as .json)", out)
    ckpt = Checkpoint.load(source)
    model = build_networks_from_checkpoint(source, "cpu", ema=ema)
    networks = {"G": _half(model.G.state_dict())}
    if model.M is not None:
        networks["M"] = _half(model.M.state_dict())
    trained_on = _data_description(data if data is not None else model.config.data.root)
    release = {"weights": model.weights, "source": str(Path(source).resolve()), "licence": licence,
               "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": {"about": about, **trained_on},
               "metrics": _metrics_description(metrics)}
    packed = Checkpoint(config=ckpt.config, networks=networks, epoch=ckpt.epoch, global_step=ckpt.global_step,
                        best_psnr=ckpt.best_psnr, best_epoch=ckpt.best_epoch, vgg=ckpt.vgg,
                        alignment=ckpt.alignment, crop=ckpt.crop, device="cpu", world_size=ckpt.world_size,
                        torch_version=str(torch.__version__), saved_at=release["exported_at"], release=release)
    packed.save(out)
    sidecar = {"format": SIDECAR_FORMAT, "file": out.name, "sha256": sha256_file(out),
               "bytes": out.stat().st_size, "image_size": model.image_size, "alignment": ckpt.alignment,
               "crop": ckpt.crop, "epoch": ckpt.epoch, "global_step": ckpt.global_step, "dtype": "float16",
               "model": dict(model.config.to_dict()["model"]), **release}
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
    return out, sidecar
