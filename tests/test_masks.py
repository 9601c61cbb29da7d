"""Synthetic mask rendering (unmask_cli.masks): invariants on real faces with dlib landmarks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from unmask_cli.errors import BadInput, ConfigError
from unmask_cli.masks import (
    MASK_STYLES,
    MaskResult,
    apply_style,
    choose_style,
    parse_mask_types,
    preview_sheet,
    synthesize,
)
from unmask_cli.masks.geometry import FaceFrame

STYLES = ["rect", "oval", "surgical", "n95", "kn95", "cloth"]
KINDS = ("freeform", "bare", "lookalike")  # samples that are not one designed mask
SHARED = Path(__file__).resolve().parents[2] / "shared"
AREA_BOUNDS = (0.25, 1.1)  # mask area / face box (jaw landmarks' extent in the eye-aligned frame); the
# box ends at the chin landmark while masks hang below it, so children's faces reach ~1.05


# -- landmark fixtures ----------------------------------------------------------------------------------
def _predictor_path() -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face_recognition_models (dlib 68-point predictor) not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        pytest.skip(f"missing {path}")
    return str(path)


@pytest.fixture(scope="module")
def dlib_models():
    dlib = pytest.importorskip("dlib")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(_predictor_path())


def _landmarks(models, image: np.ndarray, upsample: int = 0) -> np.ndarray | None:
    detector, predictor = models
    faces = detector(image, upsample)
    if len(faces) != 1:
        return None
    shape = predictor(image, faces[0])
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)


@pytest.fixture(scope="module")
def astronaut(dlib_models):
    data = pytest.importorskip("skimage.data")
    image = np.ascontiguousarray(data.astronaut()[:, :, :3])
    lm = _landmarks(dlib_models, image)
    assert lm is not None, "dlib should find the astronaut's face"
    return image, lm


def aligned_crop(image: np.ndarray, lm: np.ndarray, size: int, roll_deg: float = 0.0):
    """Face crop of ``size`` px (eyes ~40% down, mouth ~73%), optionally rolled; returns (crop, landmarks)."""
    eyes = (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2
    mouth = lm[48:68].mean(0)
    span = 3.0 * np.linalg.norm(mouth - eyes)
    angle = math.degrees(math.atan2(*(lm[42:48].mean(0) - lm[36:42].mean(0))[::-1])) + roll_deg
    matrix = cv2.getRotationMatrix2D((float(eyes[0]), float(eyes[1])), angle, size / span)
    matrix[:, 2] += np.array([size / 2, 0.4 * size]) - eyes
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA if size < span else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)
    return crop, lm @ matrix[:, :2].T + matrix[:, 2]


@pytest.fixture(scope="module")
def crops(astronaut):
    image, lm = astronaut
    return {size: aligned_crop(image, lm, size) for size in (64, 128, 256)}


# -- invariant checks -----------------------------------------------------------------------------------
def _inside(pt, shape) -> bool:
    return 0 <= round(pt[0]) < shape[1] and 0 <= round(pt[1]) < shape[0]


def _at(mask: np.ndarray, pt) -> bool:
    return bool(mask[int(round(pt[1])), int(round(pt[0]))])


def face_box_area(lm: np.ndarray) -> float:
    """Area spanned by the jaw landmarks, measured along the eye line and across it."""
    d = lm[42:48].mean(0) - lm[36:42].mean(0)
    d /= np.linalg.norm(d)
    axes = np.array([d, [-d[1], d[0]]])
    jaw = lm[0:17] @ axes.T
    return float(np.ptp(jaw[:, 0]) * np.ptp(jaw[:, 1]))


def check_invariants(image: np.ndarray, lm: np.ndarray, result: MaskResult, style: str,
                     nose_tip: bool = True, area: tuple[float, float] = AREA_BOUNDS) -> None:
    """All hard invariants; ``nose_tip`` also requires landmark 30 (not only the nose bottom 31-35)."""
    original = image.copy()
    assert isinstance(result, MaskResult) and result.style == style and result.params["style"] == style
    assert result.masked.dtype == np.uint8 and result.masked.shape == image.shape
    assert result.mask.dtype == bool and result.mask.shape == image.shape[:2]
    mask = result.mask
    # outside the map the picture is untouched
    assert np.array_equal(result.masked[~mask], image[~mask])
    assert np.array_equal(image, original)
    # the map is painted: most of it differs from the input
    changed = np.any(result.masked != image, axis=2)
    assert changed[mask].mean() > 0.5
    # covers nose bottom, mouth, chin (chin within 2 px of the map)
    for i in [30] * nose_tip + [31, 32, 33, 34, 35, *range(48, 68)]:
        if _inside(lm[i], mask.shape):
            assert _at(mask, lm[i]), f"{style}: landmark {i} not covered"
    if _inside(lm[8], mask.shape):
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert _at(grown, lm[8]), f"{style}: chin not covered"
    # eyes and brows stay visible (3x3 neighbourhood of each landmark)
    for i in range(17, 48):
        if 27 <= i <= 35:
            continue
        x, y = int(round(lm[i, 0])), int(round(lm[i, 1]))
        window = mask[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        assert not window.any(), f"{style}: landmark {i} (eye/brow) is masked"
    ratio = mask.sum() / face_box_area(lm)
    assert area[0] <= ratio <= area[1], f"{style}: area ratio {ratio:.2f}"
    # params: plain JSON types only, round trip unchanged
    assert json.loads(json.dumps(result.params)) == result.params
    _assert_plain(result.params)


def _assert_plain(value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            _assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            _assert_plain(v)
    else:
        assert value is None or type(value) in (bool, int, float, str), type(value)


# -- tests ----------------------------------------------------------------------------------------------
def test_registry_has_all_styles():
    assert sorted(MASK_STYLES) == sorted(STYLES + list(KINDS))
    assert all(callable(fn) for fn in MASK_STYLES.values())


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("size", [64, 128, 256])
def test_invariants_on_astronaut(crops, style, size):
    image, lm = crops[size]
    for seed in (0, 1, 2):
        result = apply_style(style, image, lm, np.random.default_rng(seed))
        check_invariants(image, lm, result, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("roll", [-28.0, 17.0])
def test_invariants_rolled_face(astronaut, style, roll):
    image, lm = aligned_crop(*astronaut, 160, roll_deg=roll)
    result = apply_style(style, image, lm, np.random.default_rng(5))
    check_invariants(image, lm, result, style)
    assert result.params["roll_deg"] == pytest.approx(-roll, abs=3.0)


@pytest.mark.parametrize("style", STYLES)
def test_large_image(astronaut, style):
    image, lm = aligned_crop(*astronaut, 1024)
    result = MASK_STYLES[style](image, lm, np.random.default_rng(3))
    check_invariants(image, lm, result, style)


@pytest.mark.parametrize("style", STYLES)
def test_deterministic_and_seed_dependent(crops, style):
    image, lm = crops[128]
    a = apply_style(style, image, lm, np.random.default_rng(11))
    b = apply_style(style, image, lm, np.random.default_rng(11))
    assert np.array_equal(a.masked, b.masked) and np.array_equal(a.mask, b.mask)
    assert a.params == b.params
    others = [apply_style(style, image, lm, np.random.default_rng(s)).params for s in (12, 13, 14)]
    assert len({json.dumps(p, sort_keys=True) for p in [a.params, *others]}) == 4


@pytest.mark.parametrize("style", STYLES)
def test_input_untouched_and_read_only_ok(crops, style):
    image, lm = crops[128]
    frozen = image.copy()
    frozen.setflags(write=False)
    lm_copy = lm.copy()
    result = apply_style(style, frozen, lm_copy, np.random.default_rng(0))
    assert np.array_equal(frozen, image) and np.array_equal(lm_copy, lm)
    assert result.masked.flags.writeable and result.masked is not frozen


@pytest.mark.parametrize("style", ["rect", "surgical", "kn95"])
def test_map_follows_roll(astronaut, style):
    """Rotating the face rotates the map (same seed): the shape is built in face coordinates."""
    image, lm = aligned_crop(*astronaut, 200)
    rolled, lm_rolled = aligned_crop(*astronaut, 200, roll_deg=30.0)
    a = apply_style(style, image, lm, np.random.default_rng(4)).mask
    b = apply_style(style, rolled, lm_rolled, np.random.default_rng(4)).mask
    # rotate ``a`` the same way the crop was rotated (about the eye midpoint, +30 degrees)
    eyes = (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2
    rot = cv2.getRotationMatrix2D((float(eyes[0]), float(eyes[1])), 30.0, 1.0)
    a_rot = cv2.warpAffine(a.astype(np.uint8), rot, (200, 200), flags=cv2.INTER_NEAREST) > 0
    inter, union = (a_rot & b).sum(), (a_rot | b).sum()
    assert inter / union > 0.9


@pytest.mark.parametrize("style", STYLES)
def test_same_shape_at_any_resolution(crops, style):
    """Geometry is in face units: the 64 px map, scaled up, matches the 256 px map (same seed)."""
    (small, lm_small), (large, lm_large) = crops[64], crops[256]
    a = apply_style(style, small, lm_small, np.random.default_rng(9)).mask
    b = apply_style(style, large, lm_large, np.random.default_rng(9)).mask
    a_up = cv2.resize(a.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST) > 0
    assert (a_up & b).sum() / (a_up | b).sum() > 0.85


def test_yaw_shifts_and_hides_far_side(astronaut):
    """Moving the nose towards landmark 16 reads as a head turned that way: the far side's loops go."""
    image, lm = aligned_crop(*astronaut, 200)
    turned = lm.copy()
    jaw_width = lm[16, 0] - lm[0, 0]
    turned[27:36, 0] += 0.22 * jaw_width
    frame = FaceFrame(turned)
    assert frame.yaw > 0.35 and frame.far_side() == 1
    assert FaceFrame(lm).yaw == pytest.approx(0.0, abs=0.15)
    front = apply_style("surgical", image, lm, np.random.default_rng(2)).params
    side = apply_style("surgical", image, turned, np.random.default_rng(2)).params
    assert sorted(front["texture_params"]["loops"]) == [-1, 1]
    assert side["texture_params"]["loops"] == [-1]
    assert side["yaw"] > 0.35 and side["yaw_deg"] > 15
    n95_front = apply_style("n95", image, lm, np.random.default_rng(2)).params["geometry"]["centre"][0]
    n95_side = apply_style("n95", image, turned, np.random.default_rng(2)).params["geometry"]["centre"][0]
    assert n95_side > n95_front + 0.1  # the cup moves with the nose (face units)


def test_loops_are_part_of_the_map(crops):
    image, lm = crops[256]
    result = apply_style("surgical", image, lm, np.random.default_rng(0))
    scale = np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0))
    beyond_jaw = result.mask[:, : int(lm[0:5, 0].min() - 0.08 * scale)]
    assert beyond_jaw.any(), "left ear loop missing from the map"


def test_valve_and_textures_vary(crops):
    image, lm = crops[128]
    valves = [apply_style("n95", image, lm, np.random.default_rng(s)).params["texture_params"]["valve"]
              for s in range(12)]
    assert any(v is None for v in valves) and any(v is not None for v in valves)
    textures = {apply_style("cloth", image, lm, np.random.default_rng(s)).params["texture"] for s in range(30)}
    assert len(textures) >= 4


def test_brightness_follows_the_skin(crops):
    image, lm = crops[128]
    dark = (image.astype(np.float32) * 0.35).astype(np.uint8)
    bright = apply_style("surgical", image, lm, np.random.default_rng(1))
    dim = apply_style("surgical", dark, lm, np.random.default_rng(1))
    assert np.array_equal(bright.mask, dim.mask)
    assert dim.params["brightness"] < bright.params["brightness"]
    assert dim.masked[dim.mask].mean() < bright.masked[bright.mask].mean() * 0.85


def test_bad_inputs(crops):
    image, lm = crops[64]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        apply_style("rect", image.astype(np.float32), lm, rng)
    with pytest.raises(ValueError):
        apply_style("rect", image[:, :, 0], lm, rng)
    with pytest.raises(ValueError):
        apply_style("rect", image, lm[:60], rng)
    bad = lm.copy()
    bad[3] = np.nan
    with pytest.raises(BadInput):
        apply_style("rect", image, bad, rng)
    with pytest.raises(BadInput):
        apply_style("rect", image, lm * 0.02, rng)  # eyes 1 px apart
    with pytest.raises(BadInput, match="outside the image"):
        apply_style("oval", image, lm + 5000, rng)
    with pytest.raises(ConfigError, match="unknown mask type 'hat'"):
        apply_style("hat", image, lm, rng)
    with pytest.raises(TypeError, match="Generator"):
        apply_style("rect", image, lm, 42)


# -- mask type specs and weighted choice ----------------------------------------------------------------
def test_parse_mask_types():
    assert parse_mask_types("surgical:3,cloth:2,rect") == [("surgical", 3.0), ("cloth", 2.0), ("rect", 1.0)]
    assert parse_mask_types(" N95 : 0.5 , kn95 ") == [("n95", 0.5), ("kn95", 1.0)]
    assert parse_mask_types("oval,") == [("oval", 1.0)]


@pytest.mark.parametrize("spec, message", [
    ("x", "unknown mask type 'x' (known: rect, oval, surgical, n95, kn95, cloth, freeform, bare, lookalike)"),
    ("surgical:3,hat:1", "unknown mask type 'hat'"),
    ("rect:0", "bad weight '0' for mask type 'rect'"),
    ("rect:-1", "bad weight '-1'"),
    ("rect:abc", "bad weight 'abc'"),
    ("rect:nan", "bad weight 'nan'"),
    ("rect:inf", "bad weight 'inf'"),
    ("rect:", "bad weight ''"),
    ("", "no mask types given"),
    (" , ", "no mask types given"),
    (":2", "missing mask type name"),
    ("rect,oval,rect:2", "'rect' is listed twice"),
])
def test_parse_mask_types_errors(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_mask_types(spec)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert err.value.exit_code == 2


def test_weighted_choice_statistics():
    rng = np.random.default_rng(123)
    picks = [choose_style([("rect", 1.0), ("surgical", 3.0), ("cloth", 0.5)], rng) for _ in range(6000)]
    share = {name: picks.count(name) / len(picks) for name in ("rect", "surgical", "cloth")}
    assert share["surgical"] == pytest.approx(3 / 4.5, abs=0.025)
    assert share["rect"] == pytest.approx(1 / 4.5, abs=0.025)
    assert share["cloth"] == pytest.approx(0.5 / 4.5, abs=0.02)
    assert {choose_style([("kn95", 2.0)], rng) for _ in range(50)} == {"kn95"}
    for weights in ([("rect", 0.0), ("oval", 1.0)], [("rect", -1.0)], [], [("hat", 1.0)]):
        with pytest.raises(ConfigError):
            choose_style(weights, rng)


def test_synthesize_uses_the_weights(crops):
    image, lm = crops[64]
    weights = parse_mask_types("surgical:3,oval:1")
    styles = []
    for seed in range(40):
        result = synthesize(image, lm, weights, np.random.default_rng(seed))
        assert result.style == choose_style(weights, np.random.default_rng(seed))
        assert result.style in ("surgical", "oval")
        styles.append(result.style)
    assert 20 <= styles.count("surgical") <= 38
    again = synthesize(image, lm, weights, np.random.default_rng(7))
    first = synthesize(image, lm, weights, np.random.default_rng(7))
    assert np.array_equal(again.masked, first.masked) and again.params == first.params
    with pytest.raises(ConfigError):
        synthesize(image, lm, [("surgical", 0.0)], np.random.default_rng(0))


# -- preview --------------------------------------------------------------------------------------------
def test_preview_sheet_layout(crops):
    image, lm = crops[64]
    rows = []
    for seed, style in enumerate(["rect", "surgical", "cloth"]):
        r = apply_style(style, image, lm, np.random.default_rng(seed))
        rows.append((image, r.masked, r.mask))
    sheet = preview_sheet(rows, ncol_triplets=2)
    pad = 2
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[:2] == (2 * (64 + pad) + pad, 6 * (64 + pad) + pad)

    def tile(row, col):
        y, x = pad + row * (64 + pad), pad + col * (64 + pad)
        return sheet[y:y + 64, x:x + 64]

    assert np.array_equal(tile(0, 0), image)
    assert np.array_equal(tile(0, 1), rows[0][1])
    assert np.array_equal(tile(0, 2)[:, :, 0] == 255, rows[0][2])
    assert np.array_equal(tile(0, 4), rows[1][1])  # second triplet on the first grid row
    assert np.array_equal(tile(1, 1), rows[2][1])  # third triplet starts the second grid row
    # tiles of another size are resized to the first original's size
    big = cv2.resize(image, (100, 100))
    sheet2 = preview_sheet([(image, image, np.zeros((64, 64), bool)), (big, big, np.ones((100, 100), bool))],
                           ncol_triplets=1)
    assert sheet2.shape[:2] == (2 * (64 + pad) + pad, 3 * (64 + pad) + pad)
    with pytest.raises(ValueError):
        preview_sheet([])


# -- real faces from ../shared/utkface ------------------------------------------------------------------
@pytest.mark.shared
def test_invariants_on_utkface(dlib_models):
    folder = SHARED / "utkface"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    files = sorted(folder.glob("*.jpg"))
    picked = [files[i] for i in np.linspace(0, len(files) - 1, 24).astype(int)]
    done = tip_covered = runs = 0
    for k, path in enumerate(picked):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        lm = _landmarks(dlib_models, image, upsample=1)
        if lm is None:
            continue
        for j, style in enumerate(STYLES):
            result = apply_style(style, image, lm, np.random.default_rng(100 * k + j))
            # a face tilted down can bring the nose tip level with the eyes: require the nose bottom
            check_invariants(image, lm, result, style, nose_tip=False)
            tip_covered += _at(result.mask, lm[30]) if _inside(lm[30], result.mask.shape) else 1
            runs += 1
        done += 1
        if done == 20:
            break
    assert done >= 15
    assert tip_covered >= 0.9 * runs  # the nose tip itself is covered on nearly every face


# -- varied masks, free-form holes, faces without a mask --------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_varied_masks_keep_the_invariants_and_vary(crops, style):
    """--mask-variety: the same hard rules (outside untouched, mouth/nose bottom/chin covered, eyes clear),
    with outlines that differ far more between draws than the designs do."""
    image, lm = crops[128]
    designed, varied = [], []
    for seed in range(6):
        result = apply_style(style, image, lm, np.random.default_rng(seed), variety=True)
        check_invariants(image, lm, result, style, nose_tip=False, area=(0.2, 1.6))
        assert "varied" in result.params["geometry"] or "varied" in result.params
        varied.append(result.mask)
        designed.append(apply_style(style, image, lm, np.random.default_rng(seed)).mask)

    def spread(masks):  # mean pairwise IoU distance between the draws' maps
        pairs = [(a, b) for i, a in enumerate(masks) for b in masks[i + 1:]]
        return np.mean([1 - (a & b).sum() / (a | b).sum() for a, b in pairs])

    assert spread(varied) > spread(designed) + 0.05


def test_varied_masks_have_many_looks(crops):
    """Any colour: the hues of varied surgical masks cover far more of the colour wheel than the palette."""
    image, lm = crops[128]
    hues = {False: set(), True: set()}
    for variety in (False, True):
        for seed in range(30):
            r = apply_style("surgical", image, lm, np.random.default_rng(seed), variety=variety)
            mean = r.masked[r.mask].mean(axis=0).astype(np.uint8)[None, None]
            h, s_, _ = cv2.cvtColor(mean, cv2.COLOR_RGB2HSV)[0, 0]
            if s_ > 40:
                hues[variety].add(int(h) // 15)  # 12 hue sectors
    assert len(hues[True]) >= len(hues[False]) + 3, hues


def test_freeform_holes_cover_the_lower_face_and_spare_the_eyes(crops):
    image, lm = crops[128]
    areas = []
    for seed in range(8):
        r = apply_style("freeform", image, lm, np.random.default_rng(seed))
        assert r.style == "freeform" and r.mask.any() and r.scene is None
        assert np.array_equal(r.masked[~r.mask], image[~r.mask])
        for i in range(36, 48):
            assert not _at(r.mask, lm[i]), f"free-form hole over eye landmark {i}"
        ys = np.nonzero(r.mask)[0]
        assert ys.min() > lm[36:48, 1].min()  # below the eyes' top
        areas.append(r.mask.mean())
    assert np.ptp(areas) > 0.02  # holes of many sizes


def test_bare_faces_and_lookalikes_have_empty_maps(crops):
    image, lm = crops[128]
    bare = apply_style("bare", image, lm, np.random.default_rng(0))
    assert not bare.mask.any() and np.array_equal(bare.masked, image)
    kinds = set()
    for seed in range(20):
        r = apply_style("lookalike", image, lm, np.random.default_rng(seed))
        assert not r.mask.any(), "a look-alike is not a mask: its map stays empty"
        assert r.scene is not None and np.array_equal(r.scene, r.masked)  # the target is the scene itself
        assert (r.scene != image).any()
        kinds.add(r.params["kind"])
    assert len(kinds) >= 4


def test_new_kinds_in_the_weights_spec():
    assert parse_mask_types("surgical:3,freeform:2,bare,lookalike:0.5") == [
        ("surgical", 3.0), ("freeform", 2.0), ("bare", 1.0), ("lookalike", 0.5)]
