"""Release files: a trained model packed for others to run, and the one that ships inside unmask.

A release file is an ordinary unmask checkpoint (:class:`unmask_cli.checkpoints.Checkpoint`, loaded with
``weights_only=True`` like any other) that holds only what inference needs: the generator (its EMA
weights when the run kept them) and the map module, in float16, with the run's config, alignment and crop,
epoch and steps. Its ``release`` entry says where it came from: the training data, the evaluation
metrics, the licence. Beside it, ``NAME.json`` (the sidecar) repeats that description for people and
holds the file's sha256; a release file whose sidecar is missing or whose bytes do not match it is
refused, so a truncated download or an edited file is never run.

``unmask export --checkpoint runs/NAME/best.pt --out my-model.pt`` writes both files
(:func:`export_release`); ``unmask infer`` without ``--checkpoint`` runs :data:`SHIPPED_MODEL`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from unmask_cli.errors import UnmaskError

SHIPPED_MODEL = Path(__file__).resolve().parent / "weights" / "unmask-release.pt"
SHIPPED = "shipped"  # the --checkpoint value that names it
SIDECAR_FORMAT = "unmask-release"
# The licence every release inherits from the parts it is built from (see the README's "Licences").
DEFAULT_LICENCE = ("non-commercial research use only: trained on UTKFace (non-commercial research licence) "
                   "with dlib's 68-landmark model (non-commercial licence, iBUG 300-W)")


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """``--checkpoint`` as a path: none or ``shipped`` is the model that ships with unmask."""
    if spec is None or str(spec) == SHIPPED:
        if not SHIPPED_MODEL.exists():
            raise UnmaskError("this install has no shipped model; pass --checkpoint runs/NAME/best.pt",
                              SHIPPED_MODEL)
        return SHIPPED_MODEL
    return Path(spec)


def is_shipped(path: str | os.PathLike) -> bool:
    return Path(path).resolve() == SHIPPED_MODEL


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of release file ``path`` (one-line errors when missing or unreadable)."""
    side = sidecar_path(path)
    if not side.exists():
        raise UnmaskError(f"release file has no {side.name} beside it (its sha256 and description)", path)
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UnmaskError(f"cannot read the release description ({err})", side) from err
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT or not isinstance(doc.get("sha256"), str):
        raise UnmaskError(f"not an unmask release description (no '{SIDECAR_FORMAT}' format and sha256)", side)
    return doc


def verify_release(path: str | os.PathLike) -> dict:
    """Check release file ``path`` against the sha256 of its sidecar; returns the sidecar."""
    from unmask_cli.fileio import sha256_file

    doc = read_sidecar(path)
    actual = sha256_file(path)
    if actual != doc["sha256"]:
        raise UnmaskError(f"release file does not match its sha256 ({actual[:12]}... on disk, "
                          f"{doc['sha256'][:12]}... in {sidecar_path(path).name}): corrupt or modified; "
                          "reinstall or re-export it", path)
    return doc


# ----------------------------------------------------------------------------------------------- export

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
    from unmask_cli.checkpoints import Checkpoint, build_networks_from_checkpoint
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


def describe(path: str | os.PathLike) -> str:
    """One line for summaries: 'shipped model (128 px, 12000 steps)' or the path."""
    doc: dict[str, Any] = {}
    if sidecar_path(path).exists():
        try:
            doc = read_sidecar(path)
        except UnmaskError:
            doc = {}
    if not doc:
        return str(path)
    what = "shipped model" if is_shipped(path) else f"release file {path}"
    return f"{what} ({doc.get('image_size')} px, {doc.get('global_step')} steps, sha256 {doc['sha256'][:12]})"
