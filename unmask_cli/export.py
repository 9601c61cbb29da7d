"""``unmask export``: pack a trained checkpoint into a release file (see :mod:`unmask_cli.release` for
the format): float16 G (its EMA weights when the run kept them) and M, the run's config, alignment and
crop, a ``release`` entry (data, metrics, licence) and the sha256 sidecar.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from unmask_cli.checkpoints import Checkpoint, build_networks_from_checkpoint
from unmask_cli.errors import UnmaskError
from unmask_cli.fileio import TMP_MARK
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


# Licences by the recorded source of the training data (prepare.json's settings.source): the built-in
# samples are public-domain photos; a folder named after UTKFace carries its non-commercial licence.
# Inference always needs dlib's 68-landmark model, whose licence excludes commercial use.
DLIB_NOTE = "unmask infer runs dlib's 68-landmark model (non-commercial licence, iBUG 300-W)"
PUBLIC_DOMAIN = f"trained on public-domain photos (the built-in sample portraits, NASA and US Navy); {DLIB_NOTE}"
UNKNOWN_LICENCE = "not recorded: unmask does not know the licence of the training data (export with --licence)"
_MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/()'\"]+/)+([^\s/()'\"]+)")


def licence_for(data: dict) -> str:
    """The licence a release inherits from its training data's recorded source (see the constants)."""
    source = str(data.get("settings", {}).get("source") or "")
    if source == "builtin":
        return PUBLIC_DOMAIN
    if "utkface" in source.lower():
        return DEFAULT_LICENCE
    return UNKNOWN_LICENCE


def without_machine_paths(value):
    """``value`` with every absolute path in its strings cut to the file or folder name: a release
    description must not carry the exporting machine's folders."""
    if isinstance(value, dict):
        return {k: without_machine_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(v) for v in value]
    return _MACHINE_PATH.sub(r"\1", value) if isinstance(value, str) else value


def _check_target(source: Path, out: Path, overwrite: bool) -> None:
    """Export never destroys a file: not the checkpoint itself, and not an existing pair without --overwrite."""
    if out.suffix != ".pt":
        raise UnmaskError("a release file name must end in .pt (its description goes beside it as .json)", out)
    for target in (out, sidecar_path(out)):
        if not (target.exists() or target.is_symlink()):
            continue
        if target.is_dir():
            raise UnmaskError("is a folder, not a file name for the release", target)
        if source.exists() and target.exists() and os.path.samefile(source, target):
            raise UnmaskError(f"is the checkpoint being exported ({source}); exporting over it would destroy "
                              "the training checkpoint: choose another --out", target)
        if not overwrite:
            raise UnmaskError("already exists; pass --overwrite to replace it (and its .json)", target)


def export_release(source: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | None = None,
                   metrics: str | os.PathLike | None = None, ema: bool = True,
                   licence: str | None = None, about: str = "", overwrite: bool = False) -> tuple[Path, dict]:
    """Pack checkpoint ``source`` into release file ``out`` (float16 G and M) and its sidecar.

    ``data``: the prepared folder it was trained on (default: the checkpoint's ``data.root``, described
    only when present; a given folder must exist); ``metrics``: an ``unmask eval`` metrics.json to record;
    ``licence``: default :func:`licence_for` the data; ``about``: the training data in words. The pair is
    written to temporary files and renamed into place; ``out`` may not be ``source``, and an existing
    pair is replaced only with ``overwrite``. Returns (path, sidecar)."""
    from unmask_cli.fileio import atomic_write_text, ensure_dir, sha256_file

    source, out = Path(source), Path(out)
    _check_target(source, out, overwrite)
    if data is not None and not Path(data).is_dir():
        raise UnmaskError("--data: prepared data folder not found", data)
    ckpt = Checkpoint.load(source)
    model = build_networks_from_checkpoint(source, "cpu", ema=ema)
    networks = {"G": _half(model.G.state_dict())}
    if model.M is not None:
        networks["M"] = _half(model.M.state_dict())
    trained_on = _data_description(data if data is not None else model.config.data.root)
    release = without_machine_paths({
        "weights": model.weights, "source": source.name, "licence": licence or licence_for(trained_on),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": {"about": about, **trained_on},
        "metrics": _metrics_description(metrics)})
    packed = Checkpoint(config=ckpt.config, networks=networks, epoch=ckpt.epoch, global_step=ckpt.global_step,
                        best_psnr=ckpt.best_psnr, best_epoch=ckpt.best_epoch, vgg=ckpt.vgg,
                        alignment=ckpt.alignment, crop=ckpt.crop, device="cpu", world_size=ckpt.world_size,
                        torch_version=str(torch.__version__), saved_at=release["exported_at"], release=release)
    ensure_dir(out.parent)
    staged = out.with_name(f".{out.name}{TMP_MARK}export")
    try:
        try:
            packed.save(staged)
        except UnmaskError as err:  # name the file the user asked for, not the staging name
            raise UnmaskError(str(err).removeprefix(f"{staged}: "), out) from err
        sidecar = {"format": SIDECAR_FORMAT, "file": out.name, "sha256": sha256_file(staged),
                   "bytes": staged.stat().st_size, "image_size": model.image_size, "alignment": ckpt.alignment,
                   "crop": ckpt.crop, "epoch": ckpt.epoch, "global_step": ckpt.global_step, "dtype": "float16",
                   "model": dict(model.config.to_dict()["model"]), **release}
        # the file first, then its description: a stop between the two leaves a file that does not match
        # its (old) sidecar, which every load refuses, never a wrong model that passes
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
    return out, sidecar
