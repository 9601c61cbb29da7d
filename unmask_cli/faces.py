"""Face detection (dlib HOG), 68-landmark prediction and FFHQ-style alignment to an SxS crop.

The alignment is a similarity transform computed from the eye and mouth landmarks (the FFHQ recipe).
Each :class:`AlignedFace` keeps its 2x3 source->crop matrix so results can be pasted back.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask_cli.errors import BadInput, UnmaskError

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"  # dlib's CNN face detector, also in face-recognition-models
DETECTORS = ("auto", "hog", "cnn")  # auto = HOG, then the CNN when HOG finds no face
FACE_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
ENV_MODELS_DIR = "UNMASK_DLIB_MODELS"  # folder holding dlib .dat models
ENV_LANDMARKS = "UNMASK_LANDMARKS"  # path of the 68-landmark predictor itself


def model_path(name: str, override: str | os.PathLike | None = None) -> Path:
    """Locate a dlib model file: explicit path, then ``$UNMASK_LANDMARKS`` (68-landmark model only),
    then ``$UNMASK_DLIB_MODELS/NAME``, then the ``face-recognition-models`` package, found without
    importing it (its ``__init__`` needs ``pkg_resources``, which may be missing)."""
    candidates: list[tuple[Path, str]] = []
    if override:
        candidates.append((Path(override), "given path"))
    elif name == LANDMARKS_68 and os.environ.get(ENV_LANDMARKS):
        candidates.append((Path(os.environ[ENV_LANDMARKS]), f"${ENV_LANDMARKS}"))
    elif os.environ.get(ENV_MODELS_DIR):
        candidates.append((Path(os.environ[ENV_MODELS_DIR]) / name, f"${ENV_MODELS_DIR}"))
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append((Path(location) / "models" / name, "face-recognition-models"))
    for path, _ in candidates:
        if path.is_file():
            return path
    if candidates:
        path, origin = candidates[0]
        raise UnmaskError(f"dlib model not found ({origin}); install 'face-recognition-models' or pass its path", path)
    raise UnmaskError(
        f"dlib model {name} not found: pip install face-recognition-models, or set ${ENV_MODELS_DIR} to a folder "
        f"holding it (or ${ENV_LANDMARKS} / --landmarks for the 68-landmark file)"
    )


def check_detector(name: str) -> str:
    """``name`` if it is one of :data:`DETECTORS`, else a one-line :class:`UnmaskError`."""
    if name not in DETECTORS:
        raise UnmaskError(f"unknown face detector '{name}' (choose {', '.join(DETECTORS)})")
    return name


@dataclass
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the source photo
    landmarks: np.ndarray  # (68, 2) float, source coordinates

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


@dataclass
class AlignedFace:
    image: np.ndarray  # (S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float, crop coordinates
    matrix: np.ndarray  # (2, 3) float, source -> crop
    face: Face
    border_fraction: float  # share of the crop outside the source photo (see fill_border)


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square (4 corners: top-left, bottom-left, bottom-right, top-right) from 68 landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= max(np.hypot(*x), 1e-6)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    center = eye_avg + eye_to_mouth * 0.1
    return np.stack([center - x - y, center - x + y, center + x + y, center + x - y])


def alignment_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity matrix mapping the source photo to the SxS aligned crop."""
    import cv2

    quad = ffhq_quad(landmarks).astype(np.float32)
    dst = np.float32([[0, 0], [0, size], [size, size]])
    return cv2.getAffineTransform(quad[:3], dst).astype(np.float64)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


class FaceAligner:
    """dlib detector + 68-landmark predictor, loaded once (one per worker process)."""

    def __init__(
        self,
        size: int = 256,
        landmarks_path: str | os.PathLike | None = None,
        upsample: int = 1,
        min_face: int = 32,
        max_detect_side: int = 1200,
        detector: str = "hog",
        max_cnn_side: int = 800,
    ):
        import dlib

        self.mode = check_detector(detector)
        self.size = size
        self.upsample = upsample
        self.min_face = min_face
        self.max_detect_side = max_detect_side
        self.max_cnn_side = max_cnn_side
        self.landmarks_path = model_path(LANDMARKS_68, landmarks_path)
        self.detector = dlib.get_frontal_face_detector()
        self.cnn = None
        if detector != "hog":
            cnn_path = model_path(CNN_DETECTOR)
            try:
                self.cnn = dlib.cnn_face_detection_model_v1(str(cnn_path))
            except RuntimeError as err:
                raise UnmaskError(f"not a dlib CNN face detector ({str(err).strip().splitlines()[0]})",
                                  cnn_path) from err
        try:
            self.predictor = dlib.shape_predictor(str(self.landmarks_path))
        except RuntimeError as err:
            raise UnmaskError(f"not a dlib shape predictor ({str(err).strip().splitlines()[0]})", self.landmarks_path) from err

    def _boxes(self, image: np.ndarray, max_side: int, detect) -> list[tuple[int, int, int, int]]:
        """``detect(downscaled image)`` -> dlib rectangles, mapped back to ``image`` coordinates."""
        import cv2

        scale = 1.0
        if max(image.shape[:2]) > max_side:
            scale = max_side / max(image.shape[:2])
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return [(int(round(r.left() / scale)), int(round(r.top() / scale)), int(round(r.right() / scale)),
                 int(round(r.bottom() / scale))) for r in detect(image)]

    def detect(self, rgb: np.ndarray, fallback: bool = True) -> list[Face]:
        """All faces, largest first. Large photos are detected on a downscaled copy (landmarks at full size).

        ``hog``: dlib's HOG detector (fast; misses most faces whose lower half is covered). ``cnn``: dlib's
        CNN detector (finds most masked faces; about 3-27 s per photo on 2 CPU cores, so photos are searched
        at up to ``max_cnn_side`` px). ``auto``: HOG, then the CNN when HOG finds no face and ``fallback``
        (the caller passes False when it has another way to find missed faces, e.g. supplied mask maps).
        """
        import cv2
        import dlib

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes = [] if self.mode == "cnn" else self._boxes(
            gray, self.max_detect_side, lambda image: self.detector(image, self.upsample))
        if self.cnn is not None and not boxes and (fallback or self.mode == "cnn"):
            boxes = self._boxes(np.ascontiguousarray(rgb), self.max_cnn_side,
                                lambda image: [d.rect for d in self.cnn(image, self.upsample)])
        faces = []
        for box in boxes:
            box = dlib.rectangle(*box)
            shape = self.predictor(gray, box)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face((box.left(), box.top(), box.right(), box.bottom()), points))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def align(self, rgb: np.ndarray, face: Face) -> AlignedFace:
        import cv2

        matrix = alignment_matrix(face.landmarks, self.size)
        crop = cv2.warpAffine(
            rgb, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR if _scale(matrix) >= 1 else cv2.INTER_AREA,
            borderMode=cv2.BORDER_REPLICATE,
        )
        inside = cv2.warpAffine(
            np.ones(rgb.shape[:2], np.uint8), matrix, (self.size, self.size), flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        if not inside.all():
            crop = fill_border(crop, inside)
        return AlignedFace(
            image=crop,
            landmarks=transform_points(face.landmarks, matrix),
            matrix=matrix,
            face=face,
            border_fraction=float(1.0 - inside.mean()),
        )

    def faces(self, rgb: np.ndarray, path: str | os.PathLike | None = None, all_faces: bool = False) -> list[AlignedFace]:
        """Detect and align the largest face (or all of them). Raises :class:`BadInput` when none is usable."""
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_face:
            raise BadInput(f"image too small ({width}x{height}, need at least {self.min_face} px)", path, "too small")
        found = self.detect(rgb)
        if not found:
            raise BadInput("no face found", path, "no face")
        usable = [f for f in found if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.min_face]
        if not usable:
            raise BadInput(f"face too small (smaller than {self.min_face} px)", path, "face too small")
        chosen = usable if all_faces else usable[:1]
        return [self.align(rgb, f) for f in chosen]


def fill_border(crop: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Fill the part of a crop that lies outside the photo (FFHQ-style): edge pixels replicated, then
    blurred and faded towards the crop's median colour with the distance from the photo's edge. Mirrored
    copies of the face (plain reflection) would teach the model ghost faces; this leaves a soft backdrop."""
    import cv2

    size = crop.shape[0]
    distance = cv2.distanceTransform((inside == 0).astype(np.uint8), cv2.DIST_L2, 3)
    weight = np.clip(distance / (0.08 * size), 0.0, 1.0)[:, :, None]
    image = crop.astype(np.float32)
    blurred = cv2.GaussianBlur(image, (0, 0), max(1.0, 0.04 * size))
    median = np.median(image[inside > 0], axis=0) if inside.any() else np.median(image.reshape(-1, 3), axis=0)
    filled = image * (1 - weight) + blurred * weight
    filled += (median - filled) * np.clip(weight * 0.6, 0.0, 0.6)
    return np.clip(filled.round(), 0, 255).astype(np.uint8)


def _scale(matrix: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def paste_back(
    photo: np.ndarray, crop: np.ndarray, matrix: np.ndarray, region: np.ndarray | None = None, feather: float = 0.04
) -> np.ndarray:
    """Warp an edited SxS crop back into ``photo`` (inverse of ``matrix``) with a feathered blend.

    ``region`` (S, S) bool limits the blend to the edited area (e.g. the mask map, dilated); without it
    the whole crop is blended. ``feather`` is the blur width as a fraction of the crop size. Pixels the
    blend does not reach are returned unchanged.
    """
    import cv2

    size = crop.shape[0]
    height, width = photo.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    weight = np.ones((size, size), np.float32) if region is None else region.astype(np.float32)
    radius = max(1, int(round(feather * size)))
    if region is not None:
        weight = cv2.dilate(weight, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
    else:  # fade out towards the crop border
        weight[:radius, :] = weight[-radius:, :] = weight[:, :radius] = weight[:, -radius:] = 0
    weight = cv2.GaussianBlur(weight, (0, 0), radius / 2.0)
    warped = cv2.warpAffine(crop, inverse, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    alpha = cv2.warpAffine(weight, inverse, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)[:, :, None]
    out = photo.astype(np.float32) * (1 - alpha) + warped.astype(np.float32) * alpha
    out = np.clip(out.round(), 0, 255).astype(np.uint8)
    untouched = alpha[:, :, 0] <= 0
    out[untouched] = photo[untouched]
    return out
