"""Metrics (PSNR/SSIM/FD), classical inpainting baselines and dlib identity/landmark distances."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data, filters, transform
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from unmask_cli import metrics
from unmask_cli.baselines import BASELINES, default_radius
from unmask_cli.errors import UnmaskError

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"
PSNR_TOL_DB = 1e-4
# Measured max |ours - skimage| over the 27 cases below: ~1e-15 (float64 window and arithmetic). With
# pytorch_msssim's own float32 window the gap is up to ~3.4e-6, so 1e-7 also guards the window choice.
SSIM_TOL = 1e-7


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H,W,3) float in [0,1] -> (1,3,H,W) float32."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))[None].astype(np.float32))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).double().numpy()


def _cases():
    """(name, reference, distorted) on real photos at 64/128/256 px: noise, blur, a flat inpainted patch."""
    rng = np.random.default_rng(0)
    for name in ("astronaut", "chelsea", "coffee"):
        photo = getattr(data, name)()
        for size in (64, 128, 256):
            ref = transform.resize(photo, (size, size), anti_aliasing=True)
            patch = ref.copy()
            patch[size // 3: size // 2, size // 4: size // 2] = 0.5
            yield f"{name}{size}-noise", ref, np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
            yield f"{name}{size}-blur", ref, filters.gaussian(ref, sigma=1.5, channel_axis=-1)
            yield f"{name}{size}-patch", ref, patch


CASES = list(_cases())


# ------------------------------------------------------------------------------------------- PSNR/SSIM

def test_psnr_and_ssim_match_skimage():
    assert len(CASES) == 27
    for name, ref, out in CASES:
        pred, target = _to_tensor(out), _to_tensor(ref)
        pred_np, target_np = _to_numpy(pred), _to_numpy(target)  # the very same float32 values, as float64
        p_ref = sk_psnr(target_np, pred_np, data_range=1)
        s_ref = sk_ssim(pred_np, target_np, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                        data_range=1, channel_axis=-1)
        p = metrics.psnr(pred, target)
        s = metrics.ssim(pred, target)
        assert p.shape == (1,) and s.shape == (1,)
        assert abs(p.item() - p_ref) < PSNR_TOL_DB, name
        assert abs(s.item() - s_ref) < SSIM_TOL, name


def test_region_ssim_is_the_masked_mean_of_skimage_map():
    _, ref, out = next(c for c in CASES if c[0] == "chelsea128-noise")
    pred, target = _to_tensor(out), _to_tensor(ref)
    mask = np.zeros((128, 128), bool)
    mask[40:100, 30:90] = True
    mask[0:20, 0:128] = True  # touches the border: border rows have no full window and are left out
    _, s_map = sk_ssim(_to_numpy(pred), _to_numpy(target), gaussian_weights=True, sigma=1.5,
                       use_sample_covariance=False, data_range=1, channel_axis=-1, full=True)
    s_map = s_map.mean(axis=2)
    valid = np.zeros_like(mask)
    valid[5:-5, 5:-5] = True  # window 11 px: centres at least 5 px inside
    expected = s_map[mask & valid].mean()
    got = metrics.ssim(pred, target, torch.from_numpy(mask)[None, None].float())
    assert abs(got.item() - expected) < SSIM_TOL
    # an all-ones mask gives the whole-image value
    whole = metrics.ssim(pred, target)
    assert abs(metrics.ssim(pred, target, torch.ones(1, 1, 128, 128)).item() - whole.item()) < 1e-12


def test_identical_images_give_the_caps():
    _, ref, _ = CASES[0]
    x = _to_tensor(ref).repeat(2, 1, 1, 1)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 20:40, 20:40] = 1
    assert torch.equal(metrics.psnr(x, x), torch.full((2,), metrics.PSNR_CAP_DB, dtype=torch.float64))
    assert torch.equal(metrics.psnr(x, x, mask), torch.full((2,), 100.0, dtype=torch.float64))
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(metrics.ssim(x, x, mask), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_region_psnr_differs_by_the_area_factor():
    target = torch.full((1, 3, 64, 64), 0.5)
    pred = target.clone()
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 8:24, 16:48] = 1  # area 16*32 = 512 of 4096 px -> ratio 1/8
    pred[:, :, 8:24, 16:48] += 0.1
    whole = metrics.psnr(pred, target).item()
    region = metrics.psnr(pred, target, mask).item()
    mse_region = ((pred.double() - target.double())[:, :, 8:24, 16:48] ** 2).mean().item()
    assert region == pytest.approx(10 * math.log10(1 / mse_region), abs=1e-9)
    assert region == pytest.approx(20.0, abs=1e-4)  # error 0.1 (to float32 precision)
    assert whole - region == pytest.approx(10 * math.log10(4096 / 512), abs=1e-9)


def test_region_ssim_sees_only_errors_inside_the_mask():
    _, ref, _ = next(c for c in CASES if c[0] == "coffee128-noise")
    target = _to_tensor(ref)
    mask = torch.zeros(1, 1, 128, 128)
    mask[:, :, 60:110, 60:110] = 1
    inside = target.clone()
    inside[:, :, 70:100, 70:100] = 0.5
    outside = target.clone()
    outside[:, :, 5:40, 5:40] = 0.5  # > 5 px (half window) away from the mask
    assert metrics.ssim(outside, target, mask).item() == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(outside, target).item() < 0.99
    assert metrics.ssim(inside, target, mask).item() < metrics.ssim(inside, target).item() < 1.0
    assert metrics.psnr(outside, target, mask).item() == metrics.PSNR_CAP_DB


def test_empty_mask_is_nan_and_summarize_counts_it():
    _, ref, out = CASES[1]
    pred = torch.cat([_to_tensor(out)] * 2)
    target = torch.cat([_to_tensor(ref)] * 2)
    mask = torch.zeros(2, 1, 64, 64)
    mask[1, :, 10:30, 10:30] = 1
    p = metrics.psnr(pred, target, mask)
    s = metrics.ssim(pred, target, mask)
    assert math.isnan(p[0].item()) and math.isfinite(p[1].item())
    assert math.isnan(s[0].item()) and math.isfinite(s[1].item())
    summary = metrics.summarize(torch.cat([p, torch.tensor([p[1].item() + 2.0], dtype=torch.float64)]))
    assert summary["count"] == 2 and summary["nan"] == 1
    assert summary["mean"] == pytest.approx(p[1].item() + 1.0)
    assert summary["std"] == pytest.approx(1.0)
    assert metrics.summarize([float("nan")]) == {"mean": None, "std": None, "count": 0, "nan": 1}


def test_batch_values_are_per_image_and_shapes_are_checked():
    items = [c for c in CASES if c[0].startswith("astronaut128")]
    pred = torch.cat([_to_tensor(out) for _, _, out in items])
    target = torch.cat([_to_tensor(ref) for _, ref, _ in items])
    batched_p, batched_s = metrics.psnr(pred, target), metrics.ssim(pred, target)
    for i in range(len(items)):
        assert batched_p[i].item() == pytest.approx(metrics.psnr(pred[i:i + 1], target[i:i + 1]).item(), abs=1e-12)
        assert batched_s[i].item() == pytest.approx(metrics.ssim(pred[i:i + 1], target[i:i + 1]).item(), abs=1e-12)
    with pytest.raises(ValueError):
        metrics.psnr(pred, target[:, :, :64])
    with pytest.raises(ValueError):
        metrics.ssim(pred, target, torch.ones(3, 1, 64, 64))


# ---------------------------------------------------------------------------------------- feature distance

@pytest.fixture(scope="module")
def vgg():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.vgg16().features.eval()


LAYERS = [3, 8, 15, 22]  # relu1_2 relu2_2 relu3_3 relu4_3 (receptive fields 5, 14, 40, 92 px)


def test_feature_distance_zero_for_identical_positive_otherwise(vgg):
    _, ref, out = next(c for c in CASES if c[0] == "astronaut64-blur")
    a, b = _to_tensor(ref), _to_tensor(out)
    pair = torch.cat([a, b])
    assert torch.equal(metrics.feature_distance(vgg, pair, pair, LAYERS), torch.zeros(2, dtype=torch.float64))
    fd = metrics.feature_distance(vgg, pair, torch.cat([b, a]), LAYERS)
    assert fd.shape == (2,) and (fd > 0).all()
    assert fd[0].item() == pytest.approx(fd[1].item(), rel=1e-5)  # symmetric
    assert (metrics.feature_distance(vgg, pair, torch.cat([b, a]), LAYERS, distance="l2") > 0).all()
    # an all-ones mask gives the whole-image value
    ones = torch.ones(2, 1, 64, 64)
    assert torch.allclose(metrics.feature_distance(vgg, pair, torch.cat([b, a]), LAYERS, mask=ones), fd, rtol=1e-12)


def test_feature_distance_accepts_a_callable_extractor(vgg):
    _, ref, out = next(c for c in CASES if c[0] == "chelsea64-noise")
    a, b = _to_tensor(ref), _to_tensor(out)
    expected = metrics.feature_distance(vgg, a, b, LAYERS)

    def extractor(x):
        maps = []
        for index, module in enumerate(vgg):
            x = module(x)
            if index in LAYERS:
                maps.append(x)
            if index == LAYERS[-1]:
                return maps

    got = metrics.feature_distance(extractor, a, b, layers=None)
    assert torch.allclose(got, expected, rtol=1e-6)
    # a conv output (index 2, conv1_2) is captured before torchvision's in-place ReLU (index 3) runs
    maps = metrics.vgg_feature_maps(vgg, a, [2, 3])
    assert (maps[0] < 0).any() and torch.equal(maps[1], torch.relu(maps[0]))
    with pytest.raises(ValueError):
        metrics.feature_distance(vgg, a, b, [3, 99])


def test_region_feature_distance_ignores_far_differences(vgg):
    _, ref, _ = next(c for c in CASES if c[0] == "astronaut128-noise")
    target = _to_tensor(ref)
    pred = target.clone()
    pred[:, :, :24, :24] = 0.5  # change in the top-left corner
    far = torch.zeros(1, 1, 128, 128)
    far[:, :, 64:, 64:] = 1  # >= 40 px away: outside relu3_3's receptive field, inside relu4_3's
    near = torch.zeros(1, 1, 128, 128)
    near[:, :, :32, :32] = 1
    whole = metrics.feature_distance(vgg, pred, target, LAYERS).item()
    assert whole > 0
    # up to relu3_3 no feature under the far mask sees the change: exactly zero
    assert metrics.feature_distance(vgg, pred, target, [3, 8, 15], mask=far).item() == 0.0
    # relu4_3 leaks through its 92 px receptive field, but only by a few 1e-7 of the whole value
    leak = metrics.feature_distance(vgg, pred, target, LAYERS, mask=far).item()
    assert 0 <= leak < 1e-4 * whole
    assert metrics.feature_distance(vgg, pred, target, LAYERS, mask=near).item() > whole
    empty = torch.zeros(1, 1, 128, 128)
    assert math.isnan(metrics.feature_distance(vgg, pred, target, LAYERS, mask=empty).item())


# ------------------------------------------------------------------------------------------------ baselines

def _masked_astronaut():
    face = np.ascontiguousarray(data.astronaut()[0:256, 100:356])  # the face, 256x256
    mask = np.zeros((256, 256), bool)
    mask[120:176, 85:166] = True  # from below the nose to the chin, over the mouth
    masked = face.copy()
    masked[mask] = (200, 220, 240)  # a light-blue surgical mask
    return face, masked, mask


def test_baselines_fill_the_mask_and_keep_the_rest():
    face, masked, mask = _masked_astronaut()
    assert set(BASELINES) == {"masked", "telea", "ns", "biharmonic"}
    inside_err = {}
    for name, fn in BASELINES.items():
        for radius in (3, None):  # the default (5 px at 256) last: its error is compared below
            out = fn(masked, mask, radius=radius)
            assert out.dtype == np.uint8 and out.shape == masked.shape
            assert np.array_equal(out[~mask], masked[~mask]), name
        inside_err[name] = ((out[mask].astype(float) - face[mask].astype(float)) ** 2).mean()
    assert np.array_equal(BASELINES["masked"](masked, mask), masked)
    assert BASELINES["masked"](masked, mask) is not masked
    for name in ("telea", "ns", "biharmonic"):  # about 2 dB better than the masked input
        assert inside_err[name] < 0.7 * inside_err["masked"], (name, inside_err)
    # nothing to fill -> the input comes back
    assert np.array_equal(BASELINES["telea"](masked, np.zeros_like(mask)), masked)
    assert np.array_equal(BASELINES["biharmonic"](masked, np.zeros_like(mask)), masked)
    with pytest.raises(ValueError):
        BASELINES["ns"](masked, mask[:100])


def test_default_radius_scales_with_size():
    assert default_radius(256, 256) == 5
    assert default_radius(128, 200) == 2  # round(2.5) -> 2 (banker's rounding)
    assert default_radius(64, 64) == 1
    assert default_radius(512, 512) == 10


# ------------------------------------------------------------------------------------------------- identity

@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("dlib")
    from unmask_cli.identity import IdentityScorer

    try:
        return IdentityScorer()
    except UnmaskError as err:
        pytest.skip(f"dlib models unavailable: {err}")


def _face_crop(scorer, photo: np.ndarray, size: int = 128) -> np.ndarray:
    import cv2

    box, detected = scorer.face_box(photo)
    assert detected
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = max(right - left + 1, bottom - top + 1) * 0.9
    x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
    x1, y1 = int(min(photo.shape[1], cx + half)), int(min(photo.shape[0], cy + half))
    return cv2.resize(photo[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def astronaut_face(scorer):
    return _face_crop(scorer, data.astronaut())


def test_identity_distance_same_blurred_and_given_landmarks(scorer, astronaut_face):
    import cv2

    face = astronaut_face
    assert scorer.identity_distance(face, face) < 1e-6
    blurred = cv2.GaussianBlur(face, (0, 0), 1.5)
    d_blur = scorer.identity_distance(blurred, face)
    assert 0.01 < d_blur < 0.6
    desc = scorer.descriptor(face)
    assert desc.shape == (128,) and np.isfinite(desc).all()
    # the same landmarks passed in give the same descriptor
    assert np.allclose(scorer.descriptor(face, scorer.landmarks(face)), desc, atol=1e-6)
    assert np.allclose(scorer.descriptor(face.astype(np.float64) / 255.0), desc, atol=1e-6)


def test_identity_fallback_box_gives_a_descriptor(scorer, astronaut_face):
    flat = np.full((128, 128, 3), 128, np.uint8)
    box, detected = scorer.face_box(flat)
    assert not detected
    assert box == (26, 38, 101, 114)
    assert np.isfinite(scorer.descriptor(flat)).all()
    assert scorer.identity_distance(flat, astronaut_face) > 0.6


@pytest.mark.shared
def test_identity_distance_to_another_person(scorer, astronaut_face):
    from unmask_cli.fileio import read_image

    path = SHARED_FACES / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("../shared/faces not present")
    other = _face_crop(scorer, read_image(path))
    assert scorer.identity_distance(other, astronaut_face) > 0.6


def test_landmark_distance_zero_then_grows_with_shift(scorer, astronaut_face):
    import cv2

    face = astronaut_face
    assert scorer.landmark_distance(face, face) == 0.0
    ref = scorer.landmarks(face)
    iod = np.linalg.norm(ref[45] - ref[36])
    previous = 0.0
    for dx in (2, 4, 8):
        shifted = cv2.warpAffine(face, np.float32([[1, 0, dx], [0, 1, 0]]), (128, 128),
                                 borderMode=cv2.BORDER_REFLECT_101)
        d = scorer.landmark_distance(shifted, face)
        assert d > previous
        assert d == pytest.approx(dx / iod, rel=0.25)  # the landmarks follow the face
        previous = d


def test_face_scores_in_one_batch_and_in_workers_equal_one_at_a_time(scorer, astronaut_face):
    """The batched, reference-once path of ``unmask eval`` gives exactly the numbers of the one-image calls
    (dlib's single-image API included), in this process and in worker processes."""
    import cv2

    from unmask_cli.identity import FaceScorePool

    face = astronaut_face
    outputs = [cv2.GaussianBlur(face, (0, 0), 1.5), face[:, ::-1].copy(), np.full_like(face, 128)]
    given = scorer.landmarks(face)
    for landmarks in (None, given):
        expected = [(float(np.linalg.norm(scorer.descriptor(out, landmarks) - scorer.descriptor(face, landmarks))),
                     scorer.landmark_distance(out, face)) for out in outputs]
        assert scorer.face_scores(outputs, face, landmarks) == expected
        with FaceScorePool(1) as pool:
            assert pool.submit(outputs, face, landmarks).result() == expected
    shape = scorer._shape(face, given)
    one_by_one = np.array(scorer.recognizer.compute_face_descriptor(face, shape), dtype=np.float64)
    assert np.array_equal(scorer.descriptor(face, given), one_by_one)


def test_model_folder_override(monkeypatch, tmp_path):
    from unmask_cli.faces import FACE_RECOGNITION_MODEL, LANDMARKS_68, model_path

    monkeypatch.setenv("UNMASK_DLIB_MODELS", str(tmp_path))
    with pytest.raises(UnmaskError, match="UNMASK_DLIB_MODELS"):
        model_path(LANDMARKS_68)
    (tmp_path / LANDMARKS_68).write_bytes(b"x")
    assert model_path(LANDMARKS_68) == tmp_path / LANDMARKS_68
    monkeypatch.delenv("UNMASK_DLIB_MODELS")
    found = model_path(FACE_RECOGNITION_MODEL)
    assert found.is_file() and found.parent.name == "models"
