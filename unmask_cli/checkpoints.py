"""Training checkpoints: one typed :class:`Checkpoint`, written and read here only; atomic writes, safe
loading (``weights_only=True`` always), exact-resume state.

On disk a checkpoint is a plain dict (tensors, numbers, strings, lists, dicts only) of the fields of
:class:`Checkpoint` plus ``format`` ("unmask-checkpoint") and ``version``. Files written before a field
existed load with its default: no ``alignment`` means the legacy ``ffhq``, no ``world_size`` means 1.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from unmask_cli.errors import ConfigError, UnmaskError
from unmask_cli.fileio import TMP_MARK, atomic_output, file_mode
from unmask_cli.release import verify_release

FORMAT = "unmask-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("epoch", "global_step", "config", "networks")


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly, and eval/infer need to rebuild its networks."""

    config: dict  # Config.to_dict() of the run
    networks: dict  # state dicts: G, D_whole, D_mask (and M)
    epoch: int = 0  # completed epochs
    # samples of epoch ``epoch`` (0-based) already trained on, over all processes: 0 at an epoch end, > 0
    # when the run was stopped (Ctrl-C / SIGTERM) at a batch boundary
    samples_in_epoch: int = 0
    global_step: int = 0  # optimizer steps so far
    best_psnr: float | None = None  # best validation PSNR (composite, whole image; the EMA's when on)
    best_epoch: int | None = None
    epoch_stats: dict = field(default_factory=dict)  # running loss sums of the unfinished epoch
    vgg: str = "unknown"  # the VGG16 weights of the perceptual loss
    # how the training faces were aligned (unmask_cli.faces.ALIGNMENTS); infer aligns photos the same way.
    # Files from before it was recorded were trained on the legacy alignment.
    alignment: str = "ffhq"
    crop: float = 1.0  # the crop factor of those faces (unmask_cli.faces.cropped_quad); 1.0 before it was recorded
    optimizers: dict = field(default_factory=dict)  # state dicts: G, D (both discriminators), M
    scaler: dict = field(default_factory=dict)  # torch.amp.GradScaler state (empty when AMP is off)
    rng: dict = field(default_factory=dict)  # torch / cuda / numpy / python random states (rank 0's)
    # only with train.ema_decay > 0: {decay, updates, G}, the moving average of G's weights and BatchNorm
    # buffers; once updates > 0, eval and infer use it instead of networks.G
    ema: dict | None = None
    device: str = ""
    world_size: int = 1  # processes that trained it (torchrun); the global batch is train.batch_size
    torch_version: str = ""
    saved_at: str = ""
    # only in release files (unmask_cli.release): float16 G (+ M) for inference, and where they came from;
    # loading one checks it against the sha256 of its sidecar
    release: dict | None = None
    # not stored: set by load for a release file, the sha256 its sidecar holds and its bytes were checked against
    verified_sha256: ClassVar[str | None] = None

    def save(self, path: str | os.PathLike) -> Path:
        """``torch.save`` to a temporary file in the same folder, fsync, rename into place."""
        path = Path(path)
        payload = {"format": FORMAT, "version": VERSION,
                   **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
                      or f.name in ("best_psnr", "best_epoch")}}
        try:
            with atomic_output(path, fsync=True, what="cannot write checkpoint") as handle:
                torch.save(payload, handle)
        except RuntimeError as err:  # torch's zip writer reports a failed write (full disk, size limit) so;
            cause = _os_error(err)  # the OSError of the file handle it wrote to is its context
            reason = cause.strerror or str(cause) if cause is not None else "the write failed: disk full or file-size limit?"
            raise UnmaskError(f"cannot write checkpoint ({reason})", path) from err
        _fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load and check an unmask checkpoint. Always ``weights_only=True``: a file holding code or
        arbitrary Python objects is refused. Every failure is a one-line :class:`UnmaskError` naming the file."""
        path = Path(path)
        try:
            raw = safe_torch_load(path, "checkpoint", map_location)
        except UnmaskError as err:
            _check_release_bytes(path, err)
            raise
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UnmaskError("not an unmask checkpoint (no 'unmask-checkpoint' format tag)", path)
        version = raw.get("version")
        if version is None:
            raise UnmaskError("checkpoint has no format version (its 'version' entry is missing); it was not "
                              "written by unmask, or was edited", path)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UnmaskError(f"checkpoint has an invalid format version ({version!r}; this unmask reads "
                              f"version {VERSION})", path)
        if version > VERSION:
            raise UnmaskError(f"checkpoint format version {version} is newer than this unmask supports "
                              f"({VERSION}); upgrade unmask", path)
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise UnmaskError(f"incomplete checkpoint (missing {', '.join(missing)})", path)
        if not isinstance(raw["networks"], dict) or not isinstance(raw["config"], dict):
            raise UnmaskError("checkpoint entries 'networks' and 'config' must be mappings", path)
        known = {f.name for f in fields(cls)}
        ckpt = cls(**{k: v for k, v in raw.items() if k in known})
        ckpt.alignment = _known_alignment(ckpt.alignment, path)
        ckpt.crop = _known_crop(ckpt.crop, path)
        if ckpt.release is not None:
            ckpt.verified_sha256 = verify_release(path)["sha256"]
        return ckpt

    def model_config(self, path: str | os.PathLike):
        """The Config stored in the checkpoint (an invalid one is an UnmaskError naming the checkpoint)."""
        from unmask_cli.config import config_from_dict

        try:
            return config_from_dict(self.config, where=str(path))
        except ConfigError as err:
            raise UnmaskError(f"checkpoint holds an invalid config ({err})", path) from err

    @property
    def ema_weights(self) -> dict | None:
        """The ``ema`` entry ({decay, updates, G}) when the checkpoint has one, else None."""
        return self.ema if isinstance(self.ema, dict) and "G" in self.ema else None


# ----------------------------------------------------------------------------------------------- writing

def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind an exception (its cause or context, a few levels deep), if any."""
    for _ in range(5):
        err = err.__cause__ or err.__context__
        if err is None or isinstance(err, OSError):
            return err
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def publish_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Atomically make ``target`` hold the content of ``source``: a hard link when the file system allows
    (no extra space; a later ``os.replace`` of ``source`` leaves ``target`` untouched), else a copy."""
    source, target = Path(source), Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, file_mode())
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise UnmaskError(f"cannot write checkpoint ({err.strerror or err})", target) from err
        raise
    _fsync_dir(target.parent)


# ----------------------------------------------------------------------------------------------- loading

def _check_release_bytes(path: Path, err: UnmaskError) -> None:
    """A file torch cannot read that has a release sidecar beside it: say it is a damaged release file
    (its size and sha256 against the sidecar's) rather than torch's words."""
    from unmask_cli.release import read_sidecar, sidecar_path

    if not (sidecar_path(path).exists() and path.is_file()):
        return
    try:
        doc = read_sidecar(path)
    except UnmaskError:
        return  # not a release sidecar: the plain load error stands
    size, expected = path.stat().st_size, doc.get("bytes")
    if isinstance(expected, int) and size != expected:
        raise UnmaskError(f"release file is truncated or damaged: {size:,} bytes on disk, {expected:,} in "
                          f"{sidecar_path(path).name}; reinstall or re-export it", path) from err
    verify_release(path)  # a sha256 mismatch is the clearer message


def _first_sentence(text: str) -> str:
    """The first sentence of an error message's first line, without a trailing period (torch's messages
    go on with advice for torch developers)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    sentence = re.split(r"(?<=[a-z0-9)\]])\. ", line, maxsplit=1)[0].rstrip(".")
    if len(sentence) > 200:
        sentence = sentence[:200].rsplit(" ", 1)[0] + " ..."
    return sentence

def _unpickling_reason(err: Exception) -> str:
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused: the file references Python code ({found.group(1)}); only tensors and plain data "
                "are loaded (weights_only=True)")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return (f"not a PyTorch file, or a pickle that weights_only loading refuses "
                f"(unsupported pickle opcode {found.group(1)})")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), err.__class__.__name__)
    return f"refused by weights_only loading ({first[:120]})"


def safe_torch_load(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; missing, empty, truncated, foreign or unsafe files become
    one-line :class:`UnmaskError` naming the file and the reason. Nothing in the file is ever executed."""
    path = Path(path)
    if not path.exists():
        raise UnmaskError(f"{what} not found", path)
    if path.is_dir():
        raise UnmaskError(f"{what} path is a folder, expected a file", path)
    if path.stat().st_size == 0:
        raise UnmaskError(f"{what} is empty (0 bytes)", path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise UnmaskError(f"cannot read {what} ({err.strerror or err})", path) from err
    if not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive (or a legacy pickle)
        raise UnmaskError(f"not a PyTorch file (expected a {what} written by torch.save)", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnmaskError(f"cannot load {what}: {_unpickling_reason(err)}", path) from err
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile, UnicodeDecodeError,
            AttributeError, TypeError, IndexError) as err:
        first = "not a PyTorch file" if isinstance(err, KeyError) else (
            _first_sentence(str(err)) or err.__class__.__name__)
        raise UnmaskError(f"cannot load {what}: truncated or corrupt file ({first})", path) from err


def check_compatible(ckpt: Checkpoint, cfg, path: str | os.PathLike) -> None:
    """Refuse to resume a checkpoint of another architecture or image size (one line, names the keys)."""
    from unmask_cli.config import architecture_keys

    stored, wanted = flatten(ckpt.model_config(path).to_dict()), flatten(cfg.to_dict())
    diff = [f"{k}={stored[k]} in the checkpoint, {wanted[k]} now" for k in architecture_keys() if stored[k] != wanted[k]]
    if diff:
        raise UnmaskError("checkpoint is for another network/size (" + "; ".join(diff) + "); use the same "
                          "settings, or start a new run with another --name", path)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_state(module: nn.Module | Any, state: Any, name: str, path: str | os.PathLike) -> None:
    """``load_state_dict`` (strict for modules) with a one-line error instead of a size-mismatch dump."""
    if not isinstance(state, dict):
        raise UnmaskError(f"checkpoint entry '{name}' is not a state dict", path)
    try:
        if isinstance(module, nn.Module):
            result = module.load_state_dict(state, strict=True)
            del result
        else:
            module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else err.__class__.__name__)
        raise UnmaskError(f"checkpoint does not match the network '{name}' ({detail[:200]})", path) from err


# ------------------------------------------------------------------------------------------------ RNG

def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain types (so ``weights_only=True`` loading works)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(version), "state": [int(x) for x in mt], "gauss": gauss},
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# ------------------------------------------------------------------------------------- eval / inference

def _known_alignment(alignment: Any, path: str | os.PathLike) -> str:
    from unmask_cli.faces import ALIGNMENTS

    if alignment not in ALIGNMENTS:
        raise UnmaskError(f"checkpoint was trained on faces aligned with '{alignment}', which this unmask does "
                          f"not know ({', '.join(ALIGNMENTS)}); upgrade unmask", path)
    return alignment


def _known_crop(crop: Any, path: str | os.PathLike) -> float:
    from unmask_cli.faces import check_crop

    try:
        return check_crop(float(crop))
    except (TypeError, ValueError, UnmaskError) as err:
        raise UnmaskError(f"checkpoint records a bad crop ({err})", path) from err


@dataclass
class TrainedModel:
    """What ``unmask eval`` / ``unmask infer`` need from a checkpoint; networks are in eval mode."""

    G: nn.Module
    M: nn.Module | None
    config: Any  # unmask_cli.config.Config
    image_size: int
    epoch: int
    global_step: int
    vgg: str
    path: Path
    weights: str = "G"  # which generator weights: "G", or "EMA of G (decay ..., N updates)"
    alignment: str = "ffhq"  # how its training faces were aligned (infer aligns photos the same way)
    crop: float = 1.0  # and cropped
    sha256: str | None = None  # a release file's sha256, checked against its sidecar when loaded


def check_finite(module: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Refuse weights or buffers holding NaN or infinity (a run that diverged, a damaged export): such a
    network paints black or grey patches. One line naming the checkpoint and the network."""
    bad = [key for key, value in module.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UnmaskError(f"checkpoint holds non-finite weights (NaN or infinity) in {name}: {len(bad)} "
                          f"tensor(s), the first {bad[0]}; the run diverged or the file was damaged, so it "
                          "cannot be used (take an earlier checkpoint)", path)


def build_networks_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                                   ema: bool = True) -> TrainedModel:
    """Rebuild G (and the map module M, if the run had one) from the stored config, load the weights
    (strict), move them to ``device`` and switch to eval mode. G gets the EMA weights when the checkpoint
    has them (``train.ema_decay`` > 0) unless ``ema`` is False."""
    from unmask_cli.models import build_generator, build_map_module

    path = Path(path)
    ckpt = Checkpoint.load(path)
    cfg = ckpt.model_config(path)
    nets = ckpt.networks
    if "G" not in nets:
        raise UnmaskError("checkpoint has no generator weights", path)
    try:
        G = build_generator(cfg)
        M = build_map_module(cfg) if cfg.model.map_module and "M" in nets else None
    except ConfigError as err:
        raise UnmaskError(f"checkpoint holds an invalid config ({err})", path) from err
    weights = _load_generator(G, ckpt, ema, path)
    check_finite(G, "the generator" + (" (its EMA)" if weights.startswith("EMA") else ""), path)
    if ckpt.release is not None:
        weights = f"{ckpt.release.get('weights', 'G')}, float16 release"
    if M is not None:
        load_state(M, nets["M"], "M", path)
        check_finite(M, "the map module", path)
    device = torch.device(device)
    G = G.to(device).eval()
    M = M.to(device).eval() if M is not None else None
    return TrainedModel(G=G, M=M, config=cfg, image_size=cfg.data.image_size, epoch=int(ckpt.epoch),
                        global_step=int(ckpt.global_step), vgg=str(ckpt.vgg), path=path, weights=weights,
                        alignment=ckpt.alignment, crop=ckpt.crop, sha256=ckpt.verified_sha256)


def _load_generator(G: nn.Module, ckpt: Checkpoint, ema: bool, path: Path) -> str:
    """Load G's weights (the EMA's when it has started and ``ema``); returns which ones, in words."""
    stored = ckpt.ema_weights
    started = stored is not None and int(stored.get("updates", 0)) > 0
    if ema and started:
        load_state(G, stored["G"], "G (EMA)", path)
        return f"EMA of G (decay {stored.get('decay', 0):g}, {int(stored.get('updates', 0))} updates)"
    load_state(G, ckpt.networks["G"], "G", path)
    return "G (its EMA not used)" if started else ("G (its EMA has not started)" if stored else "G")

