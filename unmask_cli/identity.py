"""Offline identity and landmark distances between an unmasked output and its reference face (dlib, no torch).

* Identity: dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) maps a face to a
  128-d descriptor; the euclidean distance between two descriptors is below 0.6 for the same person in
  dlib's calibration (99.38% on LFW).
* Landmarks: dlib's 68-point shape predictor; the mean point error is normalised by the inter-ocular
  distance (outer eye corners, points 36 and 45) of the reference.

Both models come from the ``face-recognition-models`` package, found without importing it (its
``__init__`` needs ``pkg_resources``), or from the folder in ``$UNMASK_DLIB_MODELS``.

Face box: dlib's HOG frontal detector (largest face). When it finds nothing - an output that still shows
part of a mask, a blurry reconstruction, a 64 px crop - a fixed box over the central region of the crop
is used instead (:data:`FALLBACK_BOX`, fractions of width/height, which is where the detector puts the face
on this project's FFHQ-aligned crops at 64-256 px), so every output still gets a descriptor and
landmarks. :meth:`IdentityScorer.face_box` says which one was used.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from unmask_cli.errors import UnmaskError

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
FACE_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
ENV_MODELS_DIR = "UNMASK_DLIB_MODELS"
SAME_PERSON_THRESHOLD = 0.6  # dlib: descriptor distance < 0.6 -> same person
FALLBACK_BOX = (0.2, 0.3, 0.8, 0.9)  # left, top, right, bottom as fractions of the crop
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45


def _model_path(name: str) -> Path:
    """``$UNMASK_DLIB_MODELS/NAME`` when the variable is set, else the file shipped in the
    ``face-recognition-models`` package (located with ``find_spec``, never imported)."""
    candidates: list[Path] = []
    if os.environ.get(ENV_MODELS_DIR):
        candidates.append(Path(os.environ[ENV_MODELS_DIR]) / name)
        origin = f"${ENV_MODELS_DIR}"
    else:
        origin = "face-recognition-models"
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(Path(loc) / "models" / name for loc in spec.submodule_search_locations)
    for path in candidates:
        if path.is_file():
            return path
    if candidates:
        raise UnmaskError(f"dlib model not found ({origin}); install 'face-recognition-models'", candidates[0])
    raise UnmaskError(
        f"dlib model {name} not found: pip install face-recognition-models, or set ${ENV_MODELS_DIR} "
        "to a folder holding it"
    )


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class IdentityScorer:
    """Loads the dlib detector, 68-landmark predictor and face-recognition ResNet once; reuse it for a
    whole evaluation. Images are RGB uint8 (H, W, 3) arrays (floats in [0,1] are converted)."""

    def __init__(self, upsample: int = 1, fallback_box: tuple[float, float, float, float] = FALLBACK_BOX):
        import dlib

        self._dlib = dlib
        self.upsample = upsample
        self.fallback_box = fallback_box
        self.detector = dlib.get_frontal_face_detector()
        paths = {name: _model_path(name) for name in (LANDMARKS_68, FACE_RECOGNITION_MODEL)}
        try:
            self.predictor = dlib.shape_predictor(str(paths[LANDMARKS_68]))
        except RuntimeError as err:
            raise UnmaskError(f"not a dlib shape predictor ({str(err).strip()[:200]})", paths[LANDMARKS_68]) from err
        try:
            self.recognizer = dlib.face_recognition_model_v1(str(paths[FACE_RECOGNITION_MODEL]))
        except RuntimeError as err:
            raise UnmaskError(
                f"not a dlib face recognition model ({str(err).strip()[:200]})", paths[FACE_RECOGNITION_MODEL]
            ) from err

    # ----------------------------------------------------------------------------------- building blocks

    def face_box(self, img: np.ndarray):
        """``(dlib.rectangle, detected)``: the largest detected face, or the central fallback box
        (``detected=False``) when the detector finds none."""
        rgb = _as_rgb_uint8(img)
        rects = list(self.detector(rgb, self.upsample))
        if rects:
            return max(rects, key=lambda r: r.width() * r.height()), True
        h, w = rgb.shape[:2]
        left, top, right, bottom = self.fallback_box
        rect = self._dlib.rectangle(
            int(round(left * w)), int(round(top * h)), int(round(right * w)) - 1, int(round(bottom * h)) - 1
        )
        return rect, False

    def _shape(self, rgb: np.ndarray, box):
        return self.predictor(rgb, box)

    def landmarks(self, img: np.ndarray, box=None) -> np.ndarray:
        """(68, 2) float landmarks of the face in ``box`` (default: :meth:`face_box`)."""
        rgb = _as_rgb_uint8(img)
        if box is None:
            box, _ = self.face_box(rgb)
        shape = self._shape(rgb, box)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def descriptor(self, img: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """128-d dlib face descriptor (float64) of the face in ``img``.

        ``landmarks`` (68, 2), e.g. the aligned landmarks of the manifest, are used as given; otherwise the
        face box comes from :meth:`face_box` (detector, else the central fallback) and the landmarks from
        the 68-point predictor. dlib aligns a 150x150 chip from them (padding 0.25, no jitter).
        """
        dlib = self._dlib
        rgb = _as_rgb_uint8(img)
        if landmarks is None:
            box, _ = self.face_box(rgb)
            shape = self._shape(rgb, box)
        else:
            pts = np.asarray(landmarks, dtype=np.float64)
            if pts.shape != (68, 2):
                raise ValueError(f"landmarks must be (68, 2), got {pts.shape}")
            ints = np.round(pts).astype(int)
            lo, hi = ints.min(axis=0), ints.max(axis=0)
            box = dlib.rectangle(int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
            shape = dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in ints])
        return np.array(self.recognizer.compute_face_descriptor(rgb, shape), dtype=np.float64)

    # ------------------------------------------------------------------------------------------ metrics

    def identity_distance(
        self,
        out: np.ndarray,
        ref: np.ndarray,
        out_landmarks: np.ndarray | None = None,
        ref_landmarks: np.ndarray | None = None,
    ) -> float:
        """Euclidean distance between the descriptors of ``out`` and ``ref`` (< 0.6: same person for dlib)."""
        return float(np.linalg.norm(self.descriptor(out, out_landmarks) - self.descriptor(ref, ref_landmarks)))

    def landmark_distance(self, out: np.ndarray, ref: np.ndarray) -> float:
        """Mean 68-landmark error between ``out`` and ``ref``, in units of the reference's inter-ocular
        distance (outer eye corners 36-45). Both are predicted inside the same box - the one found on
        ``ref`` (or the fallback) - so the score measures the face geometry, not detector jitter."""
        out_rgb = _as_rgb_uint8(out)
        ref_rgb = _as_rgb_uint8(ref)
        if out_rgb.shape != ref_rgb.shape:
            raise ValueError(f"out and ref differ in shape: {out_rgb.shape} vs {ref_rgb.shape}")
        box, _ = self.face_box(ref_rgb)
        ref_pts = self.landmarks(ref_rgb, box)
        out_pts = self.landmarks(out_rgb, box)
        iod = float(np.linalg.norm(ref_pts[RIGHT_EYE_OUTER] - ref_pts[LEFT_EYE_OUTER]))
        if iod <= 0:
            return float("nan")
        return float(np.linalg.norm(out_pts - ref_pts, axis=1).mean() / iod)
