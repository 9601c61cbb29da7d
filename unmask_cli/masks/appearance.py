"""Mask appearance: colour palettes, scene lighting estimated from the face, shading and procedural textures.

All fields are float32 arrays over a pixel window, computed from the window's face coordinates (U, V) so
patterns keep their size relative to the face whatever the image resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Named colours (sRGB 0-255) seen on real masks.
COLOURS: dict[str, tuple[int, int, int]] = {
    "light blue": (128, 182, 216),
    "pale blue": (170, 206, 228),
    "white": (238, 238, 236),
    "off white": (228, 224, 214),
    "black": (36, 37, 41),
    "charcoal": (66, 68, 72),
    "grey": (150, 152, 156),
    "navy": (34, 44, 84),
    "pink": (236, 176, 194),
    "pale green": (162, 208, 190),
    "lavender": (188, 178, 222),
    "red": (170, 38, 46),
    "olive": (96, 104, 62),
    "beige": (206, 186, 156),
    "teal": (34, 112, 120),
    "burgundy": (110, 30, 48),
    "sky": (120, 170, 220),
    "mustard": (210, 164, 52),
    "cream": (236, 222, 180),
    "orange": (222, 120, 50),
}

# (colour name, weight) per style
STYLE_COLOURS: dict[str, list[tuple[str, float]]] = {
    "surgical": [("light blue", 0.46), ("pale blue", 0.12), ("white", 0.14), ("black", 0.12),
                 ("pink", 0.06), ("pale green", 0.05), ("lavender", 0.05)],
    "n95": [("white", 0.6), ("off white", 0.25), ("grey", 0.1), ("charcoal", 0.05)],
    "kn95": [("white", 0.44), ("black", 0.26), ("grey", 0.1), ("pink", 0.08), ("pale blue", 0.07),
             ("navy", 0.05)],
    "cloth": [("black", 0.2), ("navy", 0.14), ("grey", 0.12), ("charcoal", 0.06), ("pink", 0.08),
              ("red", 0.06), ("olive", 0.06), ("beige", 0.08), ("teal", 0.06), ("burgundy", 0.06),
              ("white", 0.08)],
    "plain": [("white", 0.25), ("black", 0.2), ("light blue", 0.2), ("grey", 0.1), ("navy", 0.1),
              ("pink", 0.08), ("beige", 0.07)],
}


def weighted_pick(items: list[tuple[str, float]], rng: np.random.Generator) -> str:
    names = [name for name, _ in items]
    weights = np.array([w for _, w in items], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def jittered_colour(name: str, rng: np.random.Generator, amount: float = 0.04) -> np.ndarray:
    """The named colour (0-1 floats) with a small random brightness and per-channel variation."""
    base = np.array(COLOURS[name], dtype=np.float64) / 255.0
    gain = rng.uniform(1.0 - 2 * amount, 1.0 + amount)
    return np.clip(base * gain * (1.0 + rng.normal(0.0, amount / 2, 3)), 0.0, 1.0)


def to_255(colour: np.ndarray) -> list[int]:
    return [int(round(float(c) * 255)) for c in np.clip(colour, 0, 1)]


# -- lighting -------------------------------------------------------------------------------------------
SKIN_REFERENCE = 0.5  # luminance of a typical well-exposed skin patch (sRGB, 0-1)


@dataclass
class Lighting:
    brightness: float  # global gain for the mask colours, from the skin luminance under the mask
    tint: np.ndarray  # (3,) colour cast of the scene (grey world), gentle
    direction: np.ndarray  # (3,) unit light vector in face axes (u, v, towards camera)
    skin_luma: float

    def to_params(self) -> dict:
        return {"brightness": self.brightness, "skin_luma": self.skin_luma, "tint": [float(t) for t in self.tint],
                "light": [float(d) for d in self.direction]}


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def estimate_lighting(image: np.ndarray, under: np.ndarray, u: np.ndarray, split_u: float) -> Lighting:
    """Brightness, colour cast and light side from the skin the mask will cover.

    ``under`` holds (n, 3) colours in [0, 1] of (a sample of) the pixels the mask body covers, ``u`` their
    face u coordinates; the left/right halves are split at ``split_u`` (the nose line).
    """
    sample = luminance(under)
    n = len(sample)
    ordered = np.partition(sample, [n // 4, (9 * n) // 10])
    core = ordered[n // 4:(9 * n) // 10 + 1]  # 25th-90th percentile: skin without nostrils/highlights
    skin = float(core.mean())
    # Gentle exponent: the skin's luminance mixes exposure with skin tone, and only exposure should dim
    # the mask (a white mask on dark skin in a well-exposed photo is still light).
    brightness = float(np.clip((max(skin, 1e-3) / SKIN_REFERENCE) ** 0.4, 0.5, 1.12))
    stride = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / 4096)))
    mean_rgb = image[::stride, ::stride].mean(axis=(0, 1)) + 1.0
    tint = np.clip((mean_rgb / mean_rgb.mean()) ** 0.25, 0.9, 1.1)
    left_side = u < split_u
    left, right = sample[left_side], sample[~left_side]
    side = 0.0
    if left.size > 10 and right.size > 10:
        l_mean = float(np.partition(left, len(left) // 2)[len(left) // 2])  # medians
        r_mean = float(np.partition(right, len(right) // 2)[len(right) // 2])
        side = float(np.clip(1.6 * (r_mean - l_mean) / (r_mean + l_mean + 1e-3), -0.6, 0.6))
    direction = np.array([side, -0.35, 1.0])
    direction /= np.linalg.norm(direction)
    return Lighting(brightness, tint, direction, skin)


AMBIENT = 0.4


def lambert(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray, light: Lighting) -> np.ndarray:
    """Diffuse shading of unit normals, 1.0 for a surface facing the camera."""
    lu, lv, lz = (float(c) for c in light.direction)
    dot = np.maximum(nx * lu + ny * lv + nz * lz, 0.0)
    return (AMBIENT + (1 - AMBIENT) * dot) / (AMBIENT + (1 - AMBIENT) * lz)


def cylinder_normals(x: np.ndarray, bend: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals of a surface wrapped around a vertical cylinder; ``x`` in [-1, 1] across it."""
    ang = np.arcsin(np.clip(x, -0.999, 0.999)) * bend
    nx = np.sin(ang)
    return nx.astype(np.float32), np.zeros_like(nx, dtype=np.float32), np.cos(ang).astype(np.float32)


def lut(fn, lo: float, hi: float, n: int = 2048):
    """Tabulate a smooth 1-D profile once; the returned function looks values up (clamped at the ends).

    A fine table read by nearest index is several times faster per pixel than evaluating the profile
    (or than ``np.interp``), and the profiles are smooth enough for the rounding not to show.
    """
    table = np.asarray(fn(np.linspace(lo, hi, n)), dtype=np.float32)
    step = np.float32((n - 1) / (hi - lo))
    offset = np.float32(0.5 - lo * (n - 1) / (hi - lo))

    def lookup(x: np.ndarray) -> np.ndarray:
        index = np.clip(x * step + offset, 0, n - 1).astype(np.int32)
        return table[index]

    return lookup


def cylinder_shading(light: Lighting, bend: float, squeeze: float = 0.95):
    """Shading across a mask wrapped around the cheeks, as a function of x in [-1, 1]."""
    return lut(lambda x: lambert(*cylinder_normals(x * squeeze, bend), light), -1.0, 1.0)


def edge_shading(rim_depth: float, rim_width: float, line_at: float, line_width: float, line_depth: float):
    """Shading against the distance to the outline (face units): darker rim + a thin hem/weld line."""
    def fn(d):
        rim = 1.0 - rim_depth * np.exp(-d / rim_width)
        return rim * (1.0 - line_depth * np.exp(-(((d - line_at) / line_width) ** 2)))
    return lut(fn, 0.0, 0.6, 512)


def finish(albedo: np.ndarray, shade: np.ndarray, light: Lighting) -> np.ndarray:
    """Colour = albedo x shading x scene brightness x tint in [0, 1].

    Highlights above a knee are compressed on all three channels together, so a bright light-blue mask
    stays light blue instead of clipping its blue channel (which would turn it cyan).
    """
    gain = (light.tint * light.brightness).astype(np.float32)
    shade = shade.astype(np.float32, copy=False)
    if albedo.ndim == 1:
        colour = albedo.astype(np.float32) * gain
        out = shade[:, None] * colour
        peak = shade * colour.max()
    else:
        out = albedo.astype(np.float32, copy=False) * shade[:, None] * gain
        peak = np.maximum(np.maximum(out[:, 0], out[:, 1]), out[:, 2])
    hot = np.flatnonzero(peak > KNEE)
    if hot.size:
        over = peak[hot] - KNEE
        squeeze = (KNEE + (1 - KNEE) * np.tanh(over / (1 - KNEE))) / peak[hot]
        out[hot] *= squeeze[:, None]
    return np.clip(out, 0.0, 1.0, out=out)


KNEE = np.float32(0.88)


# -- procedural patterns --------------------------------------------------------------------------------
def smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def value_noise(u: np.ndarray, v: np.ndarray, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1] with features of ``cell`` face units, anchored to face coordinates."""
    u0, v0 = float(u.min()), float(v.min())
    gw = int(math.ceil((float(u.max()) - u0) / cell)) + 4
    gh = int(math.ceil((float(v.max()) - v0) / cell)) + 4
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    # cv2.remap wants maps under 32767 wide: lay the pixel list out in rows of REMAP_ROW
    n = u.size
    pad = (-n) % REMAP_ROW
    map_x = np.pad(((u.reshape(-1) - u0) / cell + 1.0).astype(np.float32), (0, pad)).reshape(-1, REMAP_ROW)
    map_y = np.pad(((v.reshape(-1) - v0) / cell + 1.0).astype(np.float32), (0, pad)).reshape(-1, REMAP_ROW)
    out = cv2.remap(grid, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return out.reshape(-1)[:n].reshape(u.shape)


REMAP_ROW = 1024


def grain(shape: tuple[int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    """Per-pixel fibre noise around 1.0 (uniform, standard deviation ``amount``)."""
    noise = rng.random(shape, dtype=np.float32)
    noise *= np.float32(2 * math.sqrt(3) * amount)
    noise += np.float32(1 - math.sqrt(3) * amount)
    return noise


def stripes(s: np.ndarray, period: float, duty: float, px: float) -> np.ndarray:
    """Anti-aliased 0/1 stripes along coordinate ``s`` (face units); ``px`` is one pixel in face units."""
    f = np.mod(s / period, 1.0)
    aa = max(px / period, 1e-4)
    return _band(f, duty, aa)


def _band(f: np.ndarray, duty: float, aa: float) -> np.ndarray:
    """1 where f in [0, duty) with soft edges of width aa (f in [0, 1), periodic)."""
    rise = smoothstep(-aa, aa, f) + smoothstep(-aa, aa, f - 1.0)  # periodic edge at 0 (== 1)
    fall = smoothstep(duty - aa, duty + aa, f)
    return np.clip(rise - fall, 0.0, 1.0) if duty < 1 else np.ones_like(f)


def dots(su: np.ndarray, sv: np.ndarray, spacing: float, radius: float, px: float) -> np.ndarray:
    """Anti-aliased polka dots on a staggered grid (0 background, 1 dot)."""
    row = np.floor(sv / spacing)
    shift = np.where(np.mod(row, 2) == 0, 0.0, 0.5 * spacing)
    du = np.mod(su + shift, spacing) - spacing / 2
    dv = np.mod(sv, spacing) - spacing / 2
    dist = np.sqrt(du * du + dv * dv)
    aa = max(px, 1e-4)
    return 1.0 - smoothstep(radius - aa, radius + aa, dist)


def blend(base: np.ndarray, other: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two colours (each (3,)) by ``amount`` (h, w) -> (h, w, 3)."""
    a = amount[..., None].astype(np.float32)
    return base.astype(np.float32) * (1 - a) + other.astype(np.float32) * a
