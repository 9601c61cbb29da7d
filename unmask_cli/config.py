"""Typed configuration: dataclass defaults, YAML files (``yaml.safe_load``) and ``--set key=value`` overrides.

Every key is checked: an unknown key or a value of the wrong type is a one-line :class:`ConfigError`
naming the key and the file (the CLI exits with code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unmask_cli.errors import ConfigError
from unmask_cli.faces import ALIGNMENTS, CROPS, DETECTORS


@dataclass
class DataConfig:
    """Where the prepared dataset lives (the output of ``unmask prepare``)."""

    root: str = "data/prepared"
    image_size: int = 256  # training resolution; prepared images of another size are resized
    num_workers: int = 2  # DataLoader workers
    # decode the split once into a uint8 array file beside the dataset and read batches from it
    # (memory-mapped, shared by the workers) instead of decoding PNGs every epoch
    cache: bool = False


@dataclass
class PrepareConfig:
    """Dataset synthesis (``unmask prepare``); the dataset is written to ``data.root``."""

    source: str | None = None  # folder of unmasked face photos (CelebA img_align_celeba); None = built-in samples
    recursive: bool = False  # also read photos in sub-folders of source
    num_samples: int | None = None  # None = 10000 from a source, BUILTIN_SAMPLES from the built-in portraits
    size: int = 256  # aligned crop size
    workers: int = 1  # worker processes
    mask_types: str = "rect,oval"  # comma list, optional weights: "surgical:3,cloth:2,freeform,bare"
    # every style's outline and look varied at random (unmask_cli.masks.variety); off = the designs as drawn
    mask_variety: bool = False
    # share of samples whose face and masked copy get one random chain of photo degradations (downscale,
    # blur, noise, JPEG; unmask_cli.degrade), so the map module does not learn the crispness of synthetic masks
    degrade: float = 0.0
    # share of faces whose crop reaches past the source photo (tight face crops) that get a synthetic scene
    # there (background, shoulders in clothes, a neck; unmask_cli.backdrop) instead of a soft smear: real
    # photos have surroundings, and a map module must find masks beside them
    backdrop: float = 0.0
    all_faces: bool = False  # every detected face instead of the largest
    min_face: int = 32  # smallest usable face box (px, in the source photo)
    upsample: int = 1  # dlib detector upsampling (hog, cnn)
    detector: str = "yunet"  # yunet | hog | cnn | hog+cnn (unmask_cli.faces.DETECTORS)
    # visible: from the eye centres of the upper face, so a masked face gets the crop its unmasked photo
    # gets; ffhq: eyes and mouth corners (datasets made before 'visible'). Checkpoints record it; infer
    # aligns photos the same way.
    alignment: str = "visible"
    # side of the crop square as a factor of the alignment square (1.0: FFHQ-sized, the face fills the
    # middle half; 0.7: the face fills the frame and the mask about a third of it). Recorded like alignment.
    crop: float = 1.0
    landmarks: str | None = None  # dlib 68-landmark model file; None = face-recognition-models / $UNMASK_LANDMARKS
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0

    SOURCE_SAMPLES = 10000
    BUILTIN_SAMPLES = 256

    def samples(self) -> int:
        """How many samples to write: ``num_samples``, or the default for the kind of source."""
        if self.num_samples is not None:
            return self.num_samples
        return self.SOURCE_SAMPLES if self.source else self.BUILTIN_SAMPLES


@dataclass
class ModelConfig:
    """Generator (U-Net) and the two PatchGAN discriminators."""

    ngf: int = 64  # generator base width
    ndf: int = 64  # discriminator base width
    max_mult: int = 8  # widths are capped at ngf*max_mult / ndf*max_mult
    d_layers: int = 3  # PatchGAN strided layers
    map_module: bool = True  # learn the mask-map module alongside the GAN
    nmf: int = 32  # map-module base width
    # dropout in the 3 innermost generator decoders (pix2pix uses 0.5); 0 = off. It changes no weight shape,
    # so a checkpoint resumes with another value.
    dropout: float = field(default=0.0, metadata={"shapes": False})


@dataclass
class LossConfig:
    """errG = lambda_rc*(L1 + (1-SSIM)) + lambda_perc*VGG + lambda_adv_whole*adv_whole + lambda_adv_mask*adv_mask."""

    lambda_rc: float = 100.0
    lambda_perc: float = 1.0
    lambda_adv_whole: float = 1.0
    lambda_adv_mask: float = 1.0
    lambda_map: float = 1.0  # mask-map module loss (BCE + Dice)
    # "imagenet": torchvision IMAGENET1K_V1 (standard cache); a path to a features state dict;
    # "random": random VGG features, only for smoke tests and CPU demos (recorded in every report).
    vgg_weights: str = "imagenet"
    vgg_layers: list[int] = field(default_factory=lambda: [3, 8, 15, 22])  # relu1_2 relu2_2 relu3_3 relu4_3
    # The first warmup_steps generator steps train on lambda_rc*(L1 + (1-SSIM)) alone: no VGG pass, no
    # adversarial terms, discriminators untouched. 0 = every term from the first step (the paper).
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    runs: str = "runs"  # folder of the run folders
    name: str | None = None  # run folder RUNS/NAME; None = the config file's stem ("default" without one)
    epochs: int = 100
    batch_size: int = 16
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    save_interval: int = 10  # also keep epoch_NNN.pt every this many epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # mixed precision on CUDA (ignored elsewhere)
    num_sample_images: int = 8  # fixed validation faces in samples/epoch_NNN.png
    max_steps_per_epoch: int = 0  # 0 = the whole training split each epoch
    # Exponential moving average of G's weights (and BatchNorm statistics), updated after every step past
    # ema_start: ema = decay * ema + (1 - decay) * G. Validation, best.pt, eval and infer then use it.
    # 0 = off (the paper: the last weights of G).
    ema_decay: float = 0.0
    # Steps before the average starts (it starts as a copy of G); until then G itself is validated and saved
    # for eval. Short runs set it late: an average over the fast early steps is a poor network.
    ema_start: int = 0
    # Start G, M and the discriminators present in this checkpoint or release file from its weights (the same
    # architecture; optimizers, step count and EMA start fresh): fine-tuning on new data or another framing.
    # Only for a new run: a resumed run continues from its own checkpoint.
    init: str | None = None
    # share of the map module's inputs given a fresh random contrast, colour, blur or rescale, and noise at
    # every step (unmask_cli.augment): its map must not depend on how crisp the photo is
    map_augment: float = 0.0


@dataclass
class EvalConfig:
    """``unmask eval``: score a checkpoint on held-out faces against classical inpainting."""

    checkpoint: str | None = None  # required: a checkpoint of 'unmask train', a release file, or 'shipped'
    data: str | None = None  # prepared dataset (or a folder of the three image folders); None = the checkpoint's data.root
    split: str = "test"  # train | val | test | all
    out: str | None = None  # report folder; None = <checkpoint folder>/eval_<split>
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    vgg_weights: str | None = None  # FD network: imagenet | a weights file | random; None = the checkpoint's
    max_images: int = 0  # only the first N images of the split; 0 = all
    sheet_images: int = 8  # rows in comparison.png; 0 = none
    baselines: str = "telea,ns,biharmonic,masked"  # classical methods scored beside the GAN
    ema: bool = True  # score the moving average of G when the checkpoint has one
    # the map module's mask / no-mask decision is scored as infer makes it (see infer.min_mask_area)
    threshold: float = 0.5
    min_mask_area: float = 0.04


@dataclass
class InferConfig:
    """``unmask infer IN_DIR OUT_DIR``: unmask a folder of photos or aligned crops."""

    checkpoint: str | None = None  # runs/NAME/best.pt or a release file; None = the model shipped with unmask
    masks: str | None = None  # folder of mask maps with the photos' file stems; None = the map module predicts them
    aligned: bool = False  # inputs are aligned crops: no detection, no paste-back
    threshold: float = 0.5  # map-module threshold for predicted masks
    # a face counts as masked when its predicted map covers at least this share of its crop (after specks
    # below a tenth of it are dropped); below it the face is left untouched, bit for bit
    min_mask_area: float = 0.04
    save_masks: bool = False  # write the masks used to OUT_DIR/masks/
    compare: bool = False  # also write input | output pairs to OUT_DIR/compare/
    jpeg_quality: int | None = None  # JPEG outputs' quality (1-100); None = matched to each input's own
    batch_size: int = 8  # faces per batch
    device: str = "auto"
    all_faces: bool = True  # every face, or only the largest
    landmarks: str | None = None  # dlib 68-landmark model file
    detector: str = "yunet"  # unmask_cli.faces.DETECTORS; faces are aligned the way the checkpoint's data was
    overwrite: bool = False  # redo outputs that exist (default: skip them, so reruns resume)
    fold_bn: bool = True  # fold BatchNorm into the convolutions (same outputs within 1e-4, faster)


def architecture_keys() -> tuple[str, ...]:
    """The config keys that decide tensor shapes: the image size and every model.* key except those whose
    field says ``metadata={"shapes": False}``. A checkpoint resumes only under the same values."""
    model = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.metadata.get("shapes", True)]
    return ("data.image_size", *model)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}", where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}", where)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {tp!r}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})", where)


def _unknown(key: str, choices: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(choices)})"
    return ConfigError(f"unknown config key '{key}'{hint}", where)


def _apply(obj: Any, mapping: dict, prefix: str, where: str, sources: dict[str, str] | None = None) -> None:
    """Set the values of ``mapping`` on ``obj`` (type-checked); ``sources`` records where each key was set."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in names:
            raise _unknown(str(key), names, where)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of settings, got {value!r}", where)
            _apply(current, value, f"{key}.", where, sources)
        else:
            setattr(obj, name, _coerce(value, hints[name], key, where))
            if sources is not None:
                sources[key] = where


def _validate(cfg: Config, where: str, sources: dict[str, str] | None = None) -> None:
    """Check every value rule. The message names the key(s) and the value(s) given (``..., got 1.5``) and
    starts with where the first of them was set: the option (``--threshold``), the ``--set`` override or
    the config file; ``where`` when they are defaults."""
    checks = [  # (keys the rule is about, ok, message)
        (("data.image_size",), cfg.data.image_size >= 32 and cfg.data.image_size & (cfg.data.image_size - 1) == 0,
         "data.image_size must be a power of two >= 32"),
        (("prepare.size",), cfg.prepare.size >= 32, "prepare.size must be >= 32"),
        (("prepare.num_samples",), cfg.prepare.num_samples is None or cfg.prepare.num_samples >= 1,
         "prepare.num_samples must be >= 1"),
        (("prepare.workers",), cfg.prepare.workers >= 1, "prepare.workers must be >= 1"),
        (("prepare.detector",), cfg.prepare.detector in DETECTORS,
         f"prepare.detector must be one of {', '.join(DETECTORS)}"),
        (("prepare.alignment",), cfg.prepare.alignment in ALIGNMENTS,
         f"prepare.alignment must be one of {', '.join(ALIGNMENTS)}"),
        (("prepare.crop",), CROPS[0] <= cfg.prepare.crop <= CROPS[1], f"prepare.crop must be in [{CROPS[0]}, {CROPS[1]}]"),
        (("prepare.degrade",), 0 <= cfg.prepare.degrade <= 1, "prepare.degrade must be in [0, 1]"),
        (("prepare.backdrop",), 0 <= cfg.prepare.backdrop <= 1, "prepare.backdrop must be in [0, 1]"),
        (("prepare.val_fraction", "prepare.test_fraction"),
         0 <= cfg.prepare.val_fraction < 1 and 0 <= cfg.prepare.test_fraction < 1
         and cfg.prepare.val_fraction + cfg.prepare.test_fraction < 1,
         "prepare.val_fraction + prepare.test_fraction must be in [0, 1)"),
        (("train.epochs",), cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (("eval.batch_size",), cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (("eval.max_images", "eval.sheet_images"), cfg.eval.max_images >= 0 and cfg.eval.sheet_images >= 0,
         "eval.max_images and eval.sheet_images must be >= 0"),
        (("train.map_augment",), 0 <= cfg.train.map_augment <= 1, "train.map_augment must be in [0, 1]"),
        (("eval.threshold",), 0 < cfg.eval.threshold < 1, "eval.threshold must be in (0, 1)"),
        (("eval.min_mask_area",), 0 <= cfg.eval.min_mask_area < 1, "eval.min_mask_area must be in [0, 1)"),
        (("infer.batch_size",), cfg.infer.batch_size >= 1, "infer.batch_size must be >= 1"),
        (("infer.threshold",), 0 < cfg.infer.threshold < 1, "infer.threshold must be in (0, 1)"),
        (("infer.min_mask_area",), 0 <= cfg.infer.min_mask_area < 1, "infer.min_mask_area must be in [0, 1)"),
        (("infer.jpeg_quality",), cfg.infer.jpeg_quality is None or 1 <= cfg.infer.jpeg_quality <= 100,
         "infer.jpeg_quality must be in [1, 100] (null = matched to the input)"),
        (("infer.detector",), cfg.infer.detector in DETECTORS, f"infer.detector must be one of {', '.join(DETECTORS)}"),
        (("train.batch_size",), cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (("train.save_interval",), cfg.train.save_interval >= 1, "train.save_interval must be >= 1"),
        (("train.lr_g", "train.lr_d"), cfg.train.lr_g > 0 and cfg.train.lr_d > 0, "train.lr_g and train.lr_d must be > 0"),
        (("train.beta1", "train.beta2"), 0 <= cfg.train.beta1 < 1 and 0 <= cfg.train.beta2 < 1,
         "train.beta1 and train.beta2 must be in [0, 1)"),
        (("model.ngf", "model.ndf", "model.nmf"), cfg.model.ngf >= 1 and cfg.model.ndf >= 1 and cfg.model.nmf >= 1,
         "model widths must be >= 1"),
        (("model.d_layers",), cfg.model.d_layers >= 1, "model.d_layers must be >= 1"),
        (("loss.warmup_steps",), cfg.loss.warmup_steps >= 0, "loss.warmup_steps must be >= 0"),
        (("train.ema_decay",), 0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1) (0 = off)"),
        (("train.ema_start",), cfg.train.ema_start >= 0, "train.ema_start must be >= 0"),
        (("loss.vgg_layers",), all(0 <= i <= 29 for i in cfg.loss.vgg_layers)
         and cfg.loss.vgg_layers == sorted(set(cfg.loss.vgg_layers)) and len(cfg.loss.vgg_layers) > 0,
         "loss.vgg_layers must be increasing indices into vgg16().features (0-29)"),
    ]
    for keys, ok, message in checks:
        if not ok:
            raise ConfigError(f"{message}, got {_given(cfg, keys)}",
                              next((sources[k] for k in keys if sources and k in sources), where))


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _given(cfg: Config, keys: tuple[str, ...]) -> str:
    """``1.5`` for one key, ``train.beta1=0.5, train.beta2=1.0`` for several."""
    if len(keys) == 1:
        return repr(_value(cfg, keys[0]))
    return ", ".join(f"{k}={_value(cfg, k)!r}" for k in keys)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML (safe_load)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}' ({err.__class__.__name__})") from err
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                options: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides <- ``options`` (a command's own options, as
    ``{"infer.threshold": 0.4}``; None = not given), all type-checked."""
    cfg = Config()
    sources: dict[str, str] = {}  # key -> where its value was set (file, --set ..., --option)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ConfigError("config file not found", path) from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config ({err.__class__.__name__}: {err})", path) from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"invalid YAML{at}: {getattr(err, 'problem', None) or err}", path) from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("config must be a mapping of sections (data, prepare, model, loss, train, eval, infer)", path)
        _apply(cfg, data, "", str(path), sources)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "", f"--set {text}", sources)
    for key, value in (options or {}).items():
        if value is not None:
            value = str(value) if isinstance(value, os.PathLike) else value
            _apply(cfg, _nest(key, value), "", f"--{key.rsplit('.', 1)[-1].replace('_', '-')}", sources)
    _validate(cfg, str(path) if path is not None else "config", sources)
    return cfg


def config_from_dict(data: dict, where: str = "checkpoint") -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. inside a checkpoint)."""
    cfg = Config()
    _apply(cfg, data, "", where)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from unmask_cli.fileio import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
