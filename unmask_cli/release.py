"""Release files: a trained model packed for others to run, and the one that ships inside unmask.

A release file is an ordinary unmask checkpoint (:class:`unmask_cli.checkpoints.Checkpoint`, loaded with
``weights_only=True`` like any other) that holds only what inference needs: the generator (its EMA
weights when the run kept them) and the map module, in float16, with the run's config, alignment and crop,
epoch and steps. Its ``release`` entry says where it came from: the training data, the evaluation
metrics, the licence. Beside it, ``NAME.json`` (the sidecar) repeats that description for people and
holds the file's sha256; a release file whose sidecar is missing or whose bytes do not match it is
refused, so a truncated download or an edited file is never run.

This module owns the format's checks (:func:`verify_release`, used by
:meth:`unmask_cli.checkpoints.Checkpoint.load`), the shipped model (:data:`SHIPPED_MODEL`, what ``unmask
infer`` runs without ``--checkpoint``) and the one-line description; ``unmask export`` writes release files
(:mod:`unmask_cli.export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def describe(path: str | os.PathLike, image_size: int | None = None, global_step: int | None = None,
             sha256: str | None = None) -> str:
    """One line for summaries from what was loaded and checked, never the sidecar's own numbers: a release
    file whose sha256 was verified (``sha256``, :attr:`Checkpoint.verified_sha256`) with the image size of
    its loaded network and its steps, e.g. 'shipped model (128 px, 10138 steps, sha256 0123abcd4567
    verified)'; anything else is its path."""
    if sha256 is None:
        return str(path)
    what = "shipped model" if is_shipped(path) else f"release file {path}"
    parts = ([f"{image_size} px"] if image_size else []) + ([f"{global_step} steps"] if global_step is not None
                                                           else []) + [f"sha256 {sha256[:12]} verified"]
    return f"{what} ({', '.join(parts)})"
