"""Synthetic face masks fitted to dlib's 68 landmarks.

    from unmask_cli.masks import MASK_STYLES, parse_mask_types, synthesize, apply_style, MaskResult, preview_sheet

``MASK_STYLES`` maps a name to a function ``(image_rgb_uint8, landmarks68, rng, variety=False) ->
MaskResult``: the mask designs (``MASK_DESIGNS``: "rect", "oval", "surgical", "n95", "kn95", "cloth"; with
``variety`` their outline and look are varied at random, see :mod:`unmask_cli.masks.variety`), and three
kinds of sample that are not one design: "freeform" (wide free-form holes filled with mask-like material),
"bare" (no mask, an empty map) and "lookalike" (a beard, shadow, hand, scarf or microphone that is part of
the scene: an empty map, and ``MaskResult.scene`` is the face to give back). ``landmarks68`` are dlib's 68 iBUG points (x, y) in
the image's pixel coordinates; shapes are designed in units of the inter-ocular distance, so any image or
face size works.

Guarantees (designs; free-form holes keep all but the coverage ones): ``MaskResult.masked`` equals the
input outside ``MaskResult.mask`` (bool map, True = masked
pixel; soft edges are blended inside the map only); the map covers the nose bottom (31-35), the mouth
(48-67) and the chin (8), and the designs keep the nose tip (30) under it too, while eyes and brows stay
clear; the input array is never modified; the same inputs and generator state give the same result.

``params`` is plain JSON: ``style``, ``colour``/``rgb``, ``texture`` (+ ``texture_params``), ``geometry``
(face units), ``jitter`` (the random draws), head pose ``roll_deg``/``yaw``/``yaw_deg``, ``scale_px``
(inter-ocular distance), lighting ``brightness``/``skin_luma``/``tint``/``light``, ``cover_grown`` (the
outline had to be widened to cover a landmark), ``window`` and ``area_px``.

Bad landmarks (non-finite, implausible layout, eyes < 4 px apart) or a mask falling outside the image raise
:class:`unmask_cli.errors.BadInput`; unknown styles and bad weights raise :class:`ConfigError`.
"""

from __future__ import annotations

import math

import numpy as np

from unmask_cli.errors import ConfigError
from unmask_cli.masks.preview import preview_sheet
from unmask_cli.masks.render import MaskResult
from unmask_cli.masks.styles import DESIGNS, SAMPLE_KINDS, make_sample_kind, make_style

MASK_DESIGNS: tuple[str, ...] = tuple(DESIGNS)  # the designed masks (the rest are not one mask design)
MASK_STYLES: dict = {name: make_style(name) for name in DESIGNS}
MASK_STYLES.update({name: make_sample_kind(name, fn) for name, fn in SAMPLE_KINDS.items()})
# kinds whose map is empty: the face wears no mask (the map module learns to find nothing)
NO_MASK_KINDS = ("bare", "lookalike")

__all__ = ["MASK_DESIGNS", "MASK_STYLES", "NO_MASK_KINDS", "MaskResult", "apply_style", "choose_style", "parse_mask_types", "preview_sheet",
           "synthesize"]


def _known() -> str:
    return ", ".join(MASK_STYLES)


def _check_name(name: str) -> str:
    if name not in MASK_STYLES:
        raise ConfigError(f"unknown mask type '{name}' (known: {_known()})")
    return name


def _check_weight(name: str, weight) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"bad weight '{weight}' for mask type '{name}' (expected a number > 0)")
    return value


def parse_mask_types(spec: str) -> list[tuple[str, float]]:
    """``"surgical:3,cloth:2,rect"`` -> ``[("surgical", 3.0), ("cloth", 2.0), ("rect", 1.0)]``.

    Weights default to 1 and must be finite numbers > 0; names are case-insensitive; each style at most
    once. Raises :class:`ConfigError` (one line) on anything else.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"mask types must be a string like 'surgical:3,cloth:1', got {type(spec).__name__}")
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.partition(":")
        name = name.strip().lower()
        if not name:
            raise ConfigError(f"missing mask type name in '{item}' (known: {_known()})")
        _check_name(name)
        value = _check_weight(name, weight.strip()) if sep else 1.0
        if any(name == seen for seen, _ in out):
            raise ConfigError(f"mask type '{name}' is listed twice in '{spec}'")
        out.append((name, value))
    if not out:
        raise ConfigError(f"no mask types given in '{spec}' (known: {_known()})")
    return out


def choose_style(weights: list[tuple[str, float]], rng: np.random.Generator) -> str:
    """Pick a style name with probability proportional to its weight (one draw from ``rng``)."""
    if not weights:
        raise ConfigError(f"no mask types given (known: {_known()})")
    names = [_check_name(name) for name, _ in weights]
    values = np.array([_check_weight(name, w) for name, w in weights], dtype=np.float64)
    return names[int(rng.choice(len(names), p=values / values.sum()))]


def apply_style(style: str, image_rgb_uint8: np.ndarray, landmarks68: np.ndarray,
                rng: np.random.Generator, variety: bool = False) -> MaskResult:
    """Draw one mask of ``style`` (``variety``: with a varied outline and look); the input array is
    never modified."""
    return MASK_STYLES[_check_name(style)](image_rgb_uint8, landmarks68, rng, variety)


def synthesize(image_rgb_uint8: np.ndarray, landmarks68: np.ndarray, weights: list[tuple[str, float]],
               rng: np.random.Generator, variety: bool = False) -> MaskResult:
    """Pick a style by weight (with ``rng``), then draw it (with the same ``rng``)."""
    return apply_style(choose_style(weights, rng), image_rgb_uint8, landmarks68, rng, variety)
