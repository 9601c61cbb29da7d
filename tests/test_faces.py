"""Real dlib detection, 68 landmarks and alignment on real portraits."""

import numpy as np
import pytest

from unmask_cli.errors import BadInput, UnmaskError
from unmask_cli.faces import LANDMARKS_68, FaceAligner, model_path, paste_back
from unmask_cli.fileio import read_image


def test_model_is_found_without_importing_the_package(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    path = model_path(LANDMARKS_68)
    assert path.name == LANDMARKS_68 and path.stat().st_size > 90_000_000
    assert "face_recognition_models" not in sys.modules


def test_model_overrides(monkeypatch, tmp_path):
    with pytest.raises(UnmaskError, match="not found"):
        model_path(LANDMARKS_68, tmp_path / "nope.dat")
    monkeypatch.setenv("UNMASK_LANDMARKS", str(tmp_path / "missing.dat"))
    with pytest.raises(UnmaskError, match=r"\$UNMASK_LANDMARKS"):
        FaceAligner()
    bogus = tmp_path / "bogus.dat"
    bogus.write_bytes(b"not a model")
    with pytest.raises(UnmaskError, match="bogus.dat"):
        FaceAligner(landmarks_path=bogus)


def test_alignment_puts_eyes_and_mouth_on_the_template(aligner, astronaut, grace_hopper):
    for image in (astronaut, grace_hopper):
        (face,) = aligner.faces(image)
        assert face.image.shape == (128, 128, 3)
        lm = face.landmarks
        left_eye, right_eye = lm[36:42].mean(0), lm[42:48].mean(0)
        mouth = (lm[48] + lm[54]) / 2
        assert abs(left_eye[1] - right_eye[1]) < 1.0  # roll removed
        assert 0.18 < (right_eye[0] - left_eye[0]) / 128 <= 0.26  # FFHQ: crop side >= 4x the eye distance
        assert 0.35 * 128 < left_eye[1] < 0.5 * 128 and 0.6 * 128 < mouth[1] < 0.8 * 128
        assert abs((left_eye[0] + right_eye[0]) / 2 - 64) < 4


def test_rotated_face_is_straightened(aligner, astronaut):
    import cv2

    matrix = cv2.getRotationMatrix2D((256, 256), 20, 1.0)
    rotated = cv2.warpAffine(astronaut, matrix, (512, 512), borderMode=cv2.BORDER_REFLECT_101)
    (face,) = aligner.faces(rotated)
    lm = face.landmarks
    assert abs(lm[36:42].mean(0)[1] - lm[42:48].mean(0)[1]) < 2.0


def test_no_face_and_too_small(aligner):
    from skimage.data import coffee

    with pytest.raises(BadInput) as info:
        aligner.faces(coffee(), "coffee.png")
    assert info.value.reason == "no face" and "coffee.png" in str(info.value)
    with pytest.raises(BadInput) as info:
        aligner.faces(np.zeros((10, 10, 3), np.uint8), "tiny.png")
    assert info.value.reason == "too small"


def test_group_photo_largest_first_and_all_faces(aligner, shared_faces):
    image = read_image(shared_faces / "obama_and_biden.jpg")
    faces = aligner.faces(image, all_faces=True)
    assert len(faces) == 3
    areas = [f.face.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert len(aligner.faces(image)) == 1


def test_partial_face_uses_border_filling(aligner, shared_faces):
    (face,) = aligner.faces(read_image(shared_faces / "obama_partial_face.jpg"))
    assert face.border_fraction > 0.05


def test_paste_back_inverts_alignment(aligner, astronaut):
    (face,) = aligner.faces(astronaut)
    region = np.zeros((128, 128), bool)
    region[70:110, 35:95] = True
    edited = face.image.copy()
    edited[region] = (0, 255, 0)
    out = paste_back(astronaut, edited, face.matrix, region)
    assert out.shape == astronaut.shape
    changed = np.abs(out.astype(int) - astronaut).sum(2) > 30
    assert changed.sum() > 500
    ys, xs = np.nonzero(changed)
    left, top, right, bottom = face.face.box
    assert left - 20 < xs.mean() < right + 20 and top < ys.mean() < bottom + 40
    assert (out[:90] == astronaut[:90]).all()  # far from the face: untouched


# ------------------------------------------------------------------- detectors and the visible alignment

def test_the_shipped_yunet_model_is_the_documented_file():
    import hashlib

    from unmask_cli.faces import PACKAGED_MODELS, YUNET_MODEL

    path = model_path(YUNET_MODEL)
    assert path == PACKAGED_MODELS / YUNET_MODEL
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in (PACKAGED_MODELS / "LICENSE-YuNet.txt").read_text()  # the licence note names this file


def test_yunet_finds_masked_faces_hog_misses_and_nothing_on_faceless_images(astronaut, grace_hopper):
    from skimage import data

    from unmask_cli.faces import make_detector
    from unmask_cli.masks import apply_style

    yunet, hog = make_detector("yunet"), make_detector("hog")
    reference = FaceAligner(detector="hog", alignment="ffhq")
    for photo in (astronaut, grace_hopper):
        (face,) = reference.detect(photo)
        for style in ("surgical", "cloth"):
            masked = apply_style(style, photo, face.landmarks, np.random.default_rng(0)).masked
            found = yunet(masked)
            assert len(found) == 1 and found[0].eyes.shape == (2, 2)
            left, top, right, bottom = face.box
            (fl, ft, fr, fb) = found[0].box
            assert abs((fl + fr) / 2 - (left + right) / 2) < 0.15 * (right - left)  # the same face
            assert 0.8 < (fr - fl) / (right - left) < 1.25  # and a predictor box of the HOG's size
        assert not hog(apply_style("cloth", photo, face.landmarks, np.random.default_rng(0)).masked)
    for image in (data.coffee(), data.chelsea(), data.rocket()):
        assert yunet(image) == []


def _drift(reference: np.ndarray, quad: np.ndarray) -> float:
    return float(np.hypot(*(quad - reference).T).max() / np.hypot(*(reference[3] - reference[0])))


def test_visible_alignment_hardly_moves_under_a_mask(astronaut, grace_hopper):
    """The same faces aligned with and without each mask style: the visible alignment's crop corners move
    by a small share of the crop side, far less than the legacy (eyes + mouth) alignment's."""
    from unmask_cli.masks import apply_style
    from unmask_cli.masks.styles import DESIGNS  # the mask designs (not free-form holes or bare faces)

    visible, legacy = FaceAligner(alignment="visible"), FaceAligner(alignment="ffhq")
    drifts = {"visible": [], "ffhq": []}
    for photo in (astronaut, grace_hopper):
        clean = {name: aligner.detect(photo)[0] for name, aligner in (("visible", visible), ("ffhq", legacy))}
        for style in DESIGNS:
            masked = apply_style(style, photo, clean["ffhq"].landmarks, np.random.default_rng(1)).masked
            for name, aligner in (("visible", visible), ("ffhq", legacy)):
                (face,) = aligner.detect(masked)
                drifts[name].append(_drift(aligner.quad(clean[name]), aligner.quad(face)))
    # one case may fail: the seed's rect mask reaches up to grace_hopper's lower eyelids
    assert np.median(drifts["visible"]) < 0.015 and sorted(drifts["visible"])[-2] < 0.05, drifts["visible"]
    assert np.mean(drifts["visible"]) < 0.4 * np.mean(drifts["ffhq"]), drifts


def test_alignments_frame_the_face_alike_and_bad_names_are_one_line_errors(astronaut):
    from unmask_cli.faces import check_alignment, ffhq_quad

    visible, legacy = FaceAligner(128), FaceAligner(128, alignment="ffhq")
    face = visible.detect(astronaut)[0]
    assert np.allclose(legacy.quad(face), ffhq_quad(face.landmarks))
    a, b = visible.quad(face), legacy.quad(face)
    side = np.hypot(*(b[3] - b[0]))
    assert _drift(b, a) < 0.1 and abs(np.hypot(*(a[3] - a[0])) / side - 1) < 0.1  # the same framing, nearly
    crop = visible.align(astronaut, face).landmarks
    left_eye, right_eye = crop[36:42].mean(0), crop[42:48].mean(0)
    assert abs(left_eye[1] - right_eye[1]) < 1.0 and abs((left_eye[0] + right_eye[0]) / 2 - 64) < 2
    for bad in ("eyes", ""):
        with pytest.raises(UnmaskError, match=f"unknown alignment '{bad}' \\(choose visible, visible-neck, ffhq\\)"):
            check_alignment(bad)
    with pytest.raises(UnmaskError, match="unknown face detector 'blazeface'"):
        FaceAligner(detector="blazeface")


def test_a_missing_or_broken_yunet_file_is_a_one_line_error(monkeypatch, tmp_path):
    from unmask_cli import faces

    monkeypatch.setattr(faces, "PACKAGED_MODELS", tmp_path)
    with pytest.raises(UnmaskError, match="model file not found \\(unmask package\\); reinstall unmask") as info:
        faces.YuNetDetector()
    assert str(tmp_path / faces.YUNET_MODEL) in str(info.value)
    (tmp_path / faces.YUNET_MODEL).write_bytes(b"not an onnx model")
    with pytest.raises(UnmaskError, match="cannot load the YuNet face detector") as info:
        faces.YuNetDetector()
    assert "\n" not in str(info.value) and str(tmp_path / faces.YUNET_MODEL) in str(info.value)


def test_visible_neck_framing_holds_masks_that_reach_the_neck(astronaut, grace_hopper):
    """The visible-neck square (moved down, crop 1.1) holds varied masks whole; the v1 framing (visible,
    crop 0.7) cuts most of them at the chin."""
    from unmask_cli.prepare import mask_fits_crop

    shares = {}
    for alignment, crop in (("visible", 0.7), ("visible-neck", 1.1)):
        aligner = FaceAligner(128, alignment=alignment, crop=crop)
        fit = []
        for photo in (astronaut, grace_hopper):
            face = aligner.detect(photo)[0]
            for seed in range(10):
                style = ("surgical", "cloth", "n95", "kn95", "freeform")[seed % 5]
                fit.append(mask_fits_crop(aligner, photo, face, style, np.random.default_rng(seed), variety=True))
        shares[alignment] = np.mean(fit)
    assert shares["visible-neck"] >= 0.95 and shares["visible"] <= 0.5, shares
    # the same eyes: visible-neck is the visible square moved straight down (the eye line stays level)
    visible, neck = FaceAligner(128, crop=1.1), FaceAligner(128, alignment="visible-neck", crop=1.1)
    face = visible.detect(astronaut)[0]
    crop = neck.align(astronaut, face).landmarks
    assert abs(crop[36:42].mean(0)[1] - crop[42:48].mean(0)[1]) < 1.0
    assert crop[36:48, 1].mean() < visible.align(astronaut, face).landmarks[36:48, 1].mean() - 10
