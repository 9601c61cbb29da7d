"""Face finding, in one place: model files, detectors, 68 landmarks, the eyes of a masked face, alignment,
mask-guided face boxes and the paste-back. ``unmask prepare``, ``unmask infer`` and the identity metric
all find faces through this module.

Pipeline (:class:`FaceAligner`): a detector (:data:`DETECTORS`, YuNet by default) gives face boxes;
dlib's 68-landmark predictor runs in each box (the box converted to the HOG-box convention it was trained
on); for the ``visible`` alignment, :class:`VisibleEyes` then re-finds the two eye centres from the upper
face alone, so that a mask does not move them; the alignment (:data:`ALIGNMENTS`) maps the face to an
SxS crop with a similarity transform. Each :class:`AlignedFace` keeps its 2x3 source->crop matrix so
results can be pasted back.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask_cli.errors import BadInput, UnmaskError
from unmask_cli.samples import portrait

# ------------------------------------------------------------------------------------------ model files

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"  # dlib's CNN face detector, also in face-recognition-models
FACE_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
YUNET_MODEL = "face_detection_yunet_2023mar.onnx"  # OpenCV Zoo's YuNet (MIT), shipped in unmask_cli/weights
PACKAGED_MODELS = Path(__file__).resolve().parent / "weights"
ENV_MODELS_DIR = "UNMASK_DLIB_MODELS"  # folder holding dlib .dat models
ENV_LANDMARKS = "UNMASK_LANDMARKS"  # path of the 68-landmark predictor itself


def model_path(name: str, override: str | os.PathLike | None = None) -> Path:
    """Locate a model file: explicit path; for the shipped YuNet file, ``unmask_cli/weights``; for dlib
    models ``$UNMASK_LANDMARKS`` (68-landmark model only), then ``$UNMASK_DLIB_MODELS/NAME``, then the
    ``face-recognition-models`` package, found without importing it (its ``__init__`` needs
    ``pkg_resources``, which may be missing)."""
    candidates: list[tuple[Path, str]] = []
    if override:
        candidates.append((Path(override), "given path"))
    elif name == YUNET_MODEL:
        candidates.append((PACKAGED_MODELS / name, "unmask package"))
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
        hint = "reinstall unmask" if origin == "unmask package" else "install 'face-recognition-models' or pass its path"
        raise UnmaskError(f"model file not found ({origin}); {hint}", path)
    raise UnmaskError(
        f"dlib model {name} not found: pip install face-recognition-models, or set ${ENV_MODELS_DIR} to a folder "
        f"holding it (or ${ENV_LANDMARKS} / --landmarks for the 68-landmark file)"
    )


def _load_dlib(factory, path: Path, what: str):
    try:
        return factory(str(path))
    except RuntimeError as err:
        raise UnmaskError(f"not a {what} ({str(err).strip().splitlines()[0][:200]})", path) from err


# ------------------------------------------------------------------------------------------- detectors

@dataclass
class Detection:
    box: tuple[int, int, int, int]  # left, top, right, bottom, in the HOG-box convention of the predictor
    score: float
    eyes: np.ndarray | None = None  # (2, 2) the detector's eye points (image-left eye first), if it has them


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale == 1.0:
        return image
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _rect_box(rect, scale: float) -> tuple[int, int, int, int]:
    return (int(round(rect.left() / scale)), int(round(rect.top() / scale)), int(round(rect.right() / scale)),
            int(round(rect.bottom() / scale)))


class YuNetDetector:
    """OpenCV's YuNet (``cv2.FaceDetectorYN``, 233 KB, MIT): finds masked faces, with 5 landmarks, in a few
    milliseconds a photo on one core. A photo is searched at its own size (capped at ``max_side``) and,
    when its long side is under ``min_side``, also upscaled to it: the small faces of a small web photo
    are found only upscaled, a face that fills the photo only at its own size. Overlapping boxes of the
    two searches are merged (non-maximum suppression)."""

    # the detector's box -> the HOG-box convention of dlib's 68-landmark predictor (median fit on UTKFace
    # faces both detectors find): centre shifted by (-0.052, -0.055) box widths, side 1.02 box widths
    TO_HOG = (-0.052, -0.055, 1.02)

    def __init__(self, threshold: float = 0.6, min_side: int = 640, max_side: int = 1280):
        import cv2

        path = model_path(YUNET_MODEL)
        if not hasattr(cv2, "FaceDetectorYN"):
            raise UnmaskError(f"this OpenCV ({cv2.__version__}) has no FaceDetectorYN; install "
                              "opencv-python-headless>=4.8")
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns about DNN targets
        try:
            self.net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), threshold, 0.3, 5000)
        except cv2.error as err:
            raise UnmaskError(f"cannot load the YuNet face detector ({str(err).strip().splitlines()[-1][:160]})",
                              path) from err
        finally:
            cv2.utils.logging.setLogLevel(level)
        self.threshold, self.min_side, self.max_side = threshold, min_side, max_side

    def _rows(self, rgb: np.ndarray, scale: float) -> np.ndarray:
        """YuNet's rows (box, 5 points, score) at ``scale``, in photo coordinates."""
        import cv2

        image = cv2.cvtColor(_scaled(rgb, scale), cv2.COLOR_RGB2BGR)
        self.net.setInputSize((image.shape[1], image.shape[0]))
        _, rows = self.net.detect(image)
        if rows is None:
            return np.zeros((0, 15))
        rows = rows.astype(np.float64)
        rows[:, :14] /= scale
        return rows

    def __call__(self, rgb: np.ndarray, fallback: bool = True) -> list[Detection]:
        import cv2

        long_side = max(rgb.shape[:2])
        scales = [min(1.0, self.max_side / long_side)] + ([self.min_side / long_side] if long_side < self.min_side else [])
        rows = np.concatenate([self._rows(rgb, scale) for scale in scales])
        if len(scales) > 1 and len(rows) > 1:
            keep = cv2.dnn.NMSBoxes(rows[:, :4].tolist(), rows[:, 14].tolist(), self.threshold, 0.3)
            rows = rows[np.asarray(keep, dtype=int).reshape(-1)]
        found = []
        for row in rows:
            x, y, w, h = row[:4]
            dx, dy, side = self.TO_HOG
            cx, cy, half = x + w / 2 + dx * w, y + h / 2 + dy * w, side * w / 2
            box = (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))
            found.append(Detection(box, float(row[14]), row[4:8].reshape(2, 2).copy()))
        return found


class HogDetector:
    """dlib's HOG frontal face detector: fast, but it misses most faces whose lower half is covered."""

    def __init__(self, upsample: int = 1, max_side: int = 1200, grey: bool = True):
        import dlib

        self.dlib_detector = dlib.get_frontal_face_detector()
        self.upsample, self.max_side, self.grey = upsample, max_side, grey

    def __call__(self, rgb: np.ndarray, fallback: bool = True) -> list[Detection]:
        """``grey``: search OpenCV's grey conversion; else dlib's HOG on all three channels."""
        import cv2

        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if self.grey and rgb.ndim == 3 else rgb
        scale = min(1.0, self.max_side / max(image.shape[:2]))
        rects, scores, _ = self.dlib_detector.run(_scaled(image, scale), self.upsample, 0.0)
        return [Detection(_rect_box(r, scale), float(s)) for r, s in zip(rects, scores, strict=True)]


class CnnDetector:
    """dlib's CNN (MMOD) face detector: finds most masked faces, but takes seconds a photo on a CPU, so
    photos are searched at up to ``max_side`` px."""

    def __init__(self, upsample: int = 1, max_side: int = 800):
        import dlib

        self.net = _load_dlib(dlib.cnn_face_detection_model_v1, model_path(CNN_DETECTOR), "dlib CNN face detector")
        self.upsample, self.max_side = upsample, max_side

    def __call__(self, rgb: np.ndarray, fallback: bool = True) -> list[Detection]:
        scale = min(1.0, self.max_side / max(rgb.shape[:2]))
        found = self.net(np.ascontiguousarray(_scaled(rgb, scale)), self.upsample)
        return [Detection(_rect_box(d.rect, scale), float(d.confidence)) for d in found]


class FallbackDetector:
    """``first``, then ``second`` on photos where ``first`` finds no face (unless ``fallback`` is False,
    e.g. when mask maps locate the missed faces faster)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, rgb: np.ndarray, fallback: bool = True) -> list[Detection]:
        return self.first(rgb) or (self.second(rgb) if fallback else [])


DETECTORS = {
    "yunet": lambda upsample: YuNetDetector(),
    "hog": lambda upsample: HogDetector(upsample),
    "cnn": lambda upsample: CnnDetector(upsample),
    "hog+cnn": lambda upsample: FallbackDetector(HogDetector(upsample), CnnDetector(upsample)),
}
DEFAULT_DETECTOR = "yunet"


def check_detector(name: str) -> str:
    """``name`` if it is one of :data:`DETECTORS`, else a one-line :class:`UnmaskError`."""
    if name not in DETECTORS:
        raise UnmaskError(f"unknown face detector '{name}' (choose {', '.join(DETECTORS)})")
    return name


def make_detector(name: str, upsample: int = 1):
    return DETECTORS[check_detector(name)](upsample)


class Landmarks68:
    """dlib's 68-point shape predictor (iBUG 300-W layout)."""

    def __init__(self, path: str | os.PathLike | None = None):
        import dlib

        self.path = model_path(LANDMARKS_68, path)
        self.predictor = _load_dlib(dlib.shape_predictor, self.path, "dlib shape predictor")
        self._rectangle = dlib.rectangle

    def __call__(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        shape = self.predictor(gray, self._rectangle(*(int(v) for v in box)))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


# ------------------------------------------------------------------------------------------- alignment

def eyes_in_box(box: tuple[int, int, int, int]) -> np.ndarray:
    """(2, 2): where the eye centres of a HOG-convention face box usually are (median fit on UTKFace: the
    eye midpoint at 0.552 / 0.319 of the box width / height, eye distance 0.460 box widths)."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    x, y, half = left + 0.552 * width, top + 0.319 * height, 0.230 * width
    return np.array([[x - half, y], [x + half, y]], dtype=np.float64)


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """(2, 2): the means of the 68-landmark eye contours, image-left eye (36-41) first."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)])


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square (4 corners: top-left, bottom-left, bottom-right, top-right) from 68 landmarks:
    eyes and mouth corners (the ``ffhq`` alignment; under a mask the mouth points are guesses)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = eye_centres(lm)
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


# The visible template: the FFHQ square of a frontal face, from the upper face alone. Medians over
# unmasked UTKFace faces: FFHQ's half side is 2.0 eye distances and its centre lies 0.098 eye distances
# below the eye midpoint. A turned head brings the eyes closer together but keeps the face about as wide,
# so the half side is also at least 0.82 face widths at eye level (landmarks 0-16, 2.04 to 2.43 eye
# distances on 90% of frontal faces: they use the eye distance). FFHQ uses the eye-to-mouth distance
# for this; under a mask the mouth is a guess.
EYES_HALF_SIDE = 2.0
EYES_CENTRE_DROP = 0.098
WIDTH_HALF_SIDE = 0.82


def eyes_quad(eyes: np.ndarray, face_width: float = 0.0) -> np.ndarray:
    """The crop square (same corner order as :func:`ffhq_quad`) from the two eye centres and the face
    width at eye level: rotation from the eye line, scale from the eye distance (or, for a turned head,
    the face width), centre just below the eye midpoint."""
    left, right = np.asarray(eyes, dtype=np.float64)
    eye_to_eye = right - left
    distance = max(float(np.hypot(*eye_to_eye)), 1e-6)
    down = np.array([-eye_to_eye[1], eye_to_eye[0]])  # eye_to_eye turned 90 degrees towards the chin
    center = (left + right) * 0.5 + down * EYES_CENTRE_DROP
    half = max(EYES_HALF_SIDE, WIDTH_HALF_SIDE * face_width / distance)
    x, y = eye_to_eye * half, down * half
    return np.stack([center - x - y, center - x + y, center + x + y, center + x - y])


def visible_quad(upper: np.ndarray) -> np.ndarray:
    """:func:`eyes_quad` of the landmarks found on the upper face (:class:`VisibleEyes`)."""
    return eyes_quad(eye_centres(upper), float(np.hypot(*(upper[16] - upper[0]))))


ALIGNMENTS = ("visible", "visible-neck", "ffhq")
DEFAULT_ALIGNMENT = "visible"
LEGACY_ALIGNMENT = "ffhq"  # datasets and checkpoints that record no alignment were made with this one


def check_alignment(name: str) -> str:
    if name not in ALIGNMENTS:
        raise UnmaskError(f"unknown alignment '{name}' (choose {', '.join(ALIGNMENTS)})")
    return name


# visible-neck: the visible square moved down by NECK_DROP of its side and cropped about its centre, so a
# crop a little larger than the square holds a mask that hangs onto the neck, pulled up to the nose
# bridge or out past the jaw (benchmarks/crop_fit.py measures which share of synthetic masks fit).
NECK_DROP = 0.2


def neck_quad(upper: np.ndarray) -> np.ndarray:
    """:func:`visible_quad` moved down (towards the chin) by :data:`NECK_DROP` of its side."""
    quad = visible_quad(upper)
    down = (quad[1] - quad[0]) * NECK_DROP
    return quad + down


# The crop: a factor on the side of the alignment square. 1.0 is the FFHQ-sized square, in which a face
# fills only its middle and the rest is border fill; below 1 the face fills the frame and the mask takes a
# larger share of the pixels. The square shrinks about the point CROP_ANCHOR of its height down its
# centre line, where the chin of a frontal face lies, so a tighter crop keeps the chin and loses forehead
# and background first.
CROPS = (0.4, 1.5)
CROP_ANCHOR = 0.9
LEGACY_CROP = 1.0  # datasets and checkpoints that record no crop were made with the full square


def check_crop(crop: float) -> float:
    if not CROPS[0] <= crop <= CROPS[1]:
        raise UnmaskError(f"crop {crop} is outside [{CROPS[0]}, {CROPS[1]}] (1.0 = the full alignment square)")
    return float(crop)


def cropped_quad(quad: np.ndarray, crop: float, anchor_at: float = CROP_ANCHOR) -> np.ndarray:
    """``quad`` (corners as in :func:`ffhq_quad`) scaled by ``crop`` about the point ``anchor_at`` of its
    height down its centre line (see :data:`CROP_ANCHOR`)."""
    quad = np.asarray(quad, dtype=np.float64)
    if crop == 1.0:
        return quad
    top_mid, bottom_mid = (quad[0] + quad[3]) * 0.5, (quad[1] + quad[2]) * 0.5
    anchor = top_mid + (bottom_mid - top_mid) * anchor_at
    return anchor + (quad - anchor) * crop


def quad_matrix(quad: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity matrix mapping the source photo to the SxS crop of ``quad``."""
    import cv2

    dst = np.float32([[0, 0], [0, size], [size, size]])
    return cv2.getAffineTransform(np.asarray(quad, np.float32)[:3], dst).astype(np.float64)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


# ------------------------------------------------------------------------------- eyes of a masked face

class VisibleEyes:
    """The eyes and the face outline at eye level from the upper face alone, so that a mask barely moves them.

    dlib's predictor places all 68 points together, so a mask over the mouth also pulls the eye points.
    Here everything below a cut line just under the eyes is replaced by a generic lower face (the mean of
    the two public-domain portraits that ship with the installed packages, in the face's own
    brightness), in a frame fixed by the current eyes, and the predictor runs again there. Masked or not,
    it then sees the same picture (the first pass cuts at the eye line). A few passes from each of the
    starting guesses (the predictor's eyes
    on the whole face, the eyes where the detector's box puts them, the detector's eye points); the
    results of the starts that end where the medoid start ends are averaged (a start on a wrong face part
    ends elsewhere).
    """

    SIDE = 256  # the frame the predictor runs in: the eyes_quad square at this size (eyes 64 px apart)
    CUT = 0.25  # cut line, in eye distances below the eye line (masks start lower; lower eyelids end higher)
    FEATHER = 0.15  # blend width at the cut, in eye distances
    PASSES = 4
    # the first pass cuts at the eye line itself: a start that a mask pulled down onto the mask's top edge
    # then sees no edge there and moves up to the eyes (measured: 95th-percentile drift 4.4 -> 3.8 %)
    FIRST_CUT = 0.0
    AGREE = 0.1  # starts that end within this many eye distances of the medoid's end are averaged
    # predictor box from the eyes (HOG-box convention, median fit): centre 0.373 eye distances below the
    # eye midpoint, side 2.247 eye distances
    BOX_DROP, BOX_SIDE = 0.373, 2.247

    def __init__(self, landmarks: Landmarks68):
        self.landmarks = landmarks
        side = self.SIDE
        self.template = _lower_face_template(side, landmarks)
        distance = side / (2 * EYES_HALF_SIDE)  # the eye distance in the frame
        eye_y = side / 2 - EYES_CENTRE_DROP * distance
        rows = np.arange(side, dtype=np.float32)[:, None].repeat(side, axis=1)
        self.weights = [np.clip((rows - (eye_y + cut * distance)) / (self.FEATHER * distance), 0, 1)
                        for cut in (self.FIRST_CUT, self.CUT)]
        half = self.BOX_SIDE * distance / 2
        cx, cy = side / 2, eye_y + self.BOX_DROP * distance
        self.box = (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))

    def completed(self, gray: np.ndarray, eyes: np.ndarray, first: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The face in the frame (the ``eyes_quad`` of ``eyes``), everything below the cut line replaced by
        the generic lower face in the face's own brightness, and the 2x3 photo -> frame matrix."""
        quad = eyes_quad(eyes)
        matrix = quad_matrix(quad, self.SIDE)
        frame = _warp_region(gray, quad, matrix, self.SIDE).astype(np.float32)
        weight = self.weights[0 if first else 1]
        visible = frame[weight < 0.01]
        out = frame * (1 - weight) + (visible.mean() + self.template * visible.std()) * weight
        return np.clip(out, 0, 255).astype(np.uint8), matrix

    def _pass(self, gray: np.ndarray, eyes: np.ndarray, first: bool = False) -> np.ndarray:
        """68 landmarks (photo coordinates) predicted on the completed face; only the upper ones count."""
        import cv2

        frame, matrix = self.completed(gray, eyes, first)
        return transform_points(self.landmarks(frame, self.box), cv2.invertAffineTransform(matrix))

    def __call__(self, gray: np.ndarray, starts: list[np.ndarray]) -> np.ndarray:
        """The mean landmarks of the starts that end within ``AGREE`` eye distances of the medoid start's end.
        The eyes and the outline at eye level are from the upper face; the other points follow the
        generic lower face."""
        ends = []
        for eyes in starts:
            for index in range(self.PASSES):
                points = self._pass(gray, eyes, index == 0)
                eyes = eye_centres(points)
            ends.append(points)
        eyes = np.stack([eye_centres(points) for points in ends])  # (starts, 2, 2)
        apart = np.hypot(*(eyes[:, None] - eyes[None]).transpose(3, 0, 1, 2)).max(axis=-1)  # (starts, starts)
        medoid = int(np.argmin(apart.sum(axis=1)))
        distance = float(np.hypot(*(eyes[medoid, 1] - eyes[medoid, 0])))
        agree = [i for i in range(len(ends)) if apart[medoid, i] < self.AGREE * distance]
        return np.mean([ends[i] for i in agree], axis=0)


def _warp_region(gray: np.ndarray, quad: np.ndarray, matrix: np.ndarray, side: int) -> np.ndarray:
    """``cv2.warpAffine(gray, matrix)`` to ``side`` px, reading only the region of ``quad``, blurred first
    when the warp shrinks it (a plain bilinear warp would alias)."""
    import cv2

    x0, y0 = np.maximum(np.floor(quad.min(axis=0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(quad.max(axis=0)).astype(int) + 3, (gray.shape[1], gray.shape[0]))
    if x1 <= x0 or y1 <= y0:  # the face lies outside the photo
        x0, y0, x1, y1 = 0, 0, gray.shape[1], gray.shape[0]
    region = gray[y0:y1, x0:x1]
    scale = _scale(matrix)
    if scale < 0.7:
        region = cv2.GaussianBlur(region, (0, 0), 0.5 / scale)
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)  # region coordinates -> frame
    return cv2.warpAffine(region, shifted, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@functools.lru_cache(maxsize=2)
def _lower_face_template(side: int, landmarks: Landmarks68) -> np.ndarray:
    """Mean of the two built-in portraits (skimage's astronaut, matplotlib's grace_hopper), grey, each
    standardised, in the ``eyes_quad`` frame at ``side`` px (float32, mean 0, unit spread). ``landmarks``:
    the caller's predictor (loading another copy of the 100 MB model would take seconds)."""
    import cv2

    hog = HogDetector()
    frames = []
    for name in ("astronaut", "grace_hopper"):
        gray = cv2.cvtColor(portrait(name), cv2.COLOR_RGB2GRAY)
        box = max(hog(gray), key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1])).box
        matrix = quad_matrix(eyes_quad(eye_centres(landmarks(gray, box))), side)
        frame = cv2.warpAffine(gray, matrix, (side, side), flags=cv2.INTER_AREA,
                               borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        frames.append((frame - frame.mean()) / max(float(frame.std()), 1e-6))
    return np.mean(frames, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- faces

@dataclass
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the source photo
    landmarks: np.ndarray  # (68, 2) float, source coordinates (from the whole face)
    upper: np.ndarray | None = None  # (68, 2) from the upper face alone (VisibleEyes): the visible alignment

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)

    @property
    def eyes(self) -> np.ndarray | None:
        """(2, 2) eye centres found on the upper face (None unless the aligner uses ``visible``)."""
        return None if self.upper is None else eye_centres(self.upper)

    @property
    def side(self) -> int:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass
class AlignedFace:
    image: np.ndarray  # (S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float, crop coordinates
    matrix: np.ndarray  # (2, 3) float, source -> crop
    face: Face
    border_fraction: float  # share of the crop outside the source photo (see fill_border)
    inside: np.ndarray | None = None  # (S, S) uint8: 1 where the crop lies inside the source photo


class FaceAligner:
    """A detector, dlib's 68-landmark predictor and an alignment, loaded once (one per worker process).

    ``detector``: one of :data:`DETECTORS`. ``alignment``: ``visible`` (from the eyes of the upper face,
    see :class:`VisibleEyes`; the same crop with or without a mask) or ``ffhq`` (eyes and mouth corners,
    the alignment of datasets and checkpoints made before ``visible`` existed). ``crop``: the side of the
    crop square as a factor of the alignment square's (:func:`cropped_quad`).
    """

    def __init__(self, size: int = 256, landmarks_path: str | os.PathLike | None = None, upsample: int = 1,
                 min_face: int = 32, detector: str = DEFAULT_DETECTOR, alignment: str = DEFAULT_ALIGNMENT,
                 crop: float = LEGACY_CROP):
        self.alignment = check_alignment(alignment)
        self.crop = check_crop(crop)
        self.size = size
        self.upsample = upsample
        self.min_face = min_face
        self.landmarks = Landmarks68(landmarks_path)
        self.detector = make_detector(detector, upsample)
        self.visible_eyes = VisibleEyes(self.landmarks) if alignment != "ffhq" else None
        self._hog: HogDetector | None = None

    @property
    def hog(self) -> HogDetector:
        """dlib's HOG detector, for the low-threshold search around mask maps (loaded on first use)."""
        if self._hog is None:
            self._hog = self.detector if isinstance(self.detector, HogDetector) else HogDetector(self.upsample)
        return self._hog

    def face_at(self, gray: np.ndarray, box: tuple[int, int, int, int], hint: np.ndarray | None = None) -> Face:
        """The face in ``box``: 68 landmarks, and for the visible alignment the landmarks of its upper face
        (``hint``: the detector's eye points, one more starting guess). Faces smaller than ``min_face``,
        which are never aligned, get no upper-face landmarks (they cost a dozen predictor runs)."""
        landmarks = self.landmarks(gray, box)
        upper = None
        if self.visible_eyes is not None and min(box[2] - box[0], box[3] - box[1]) >= self.min_face:
            starts = [eye_centres(landmarks), eyes_in_box(box)] + ([hint] if hint is not None else [])
            upper = self.visible_eyes(gray, starts)
        return Face(tuple(int(v) for v in box), landmarks, upper)  # type: ignore[arg-type]

    def detect(self, rgb: np.ndarray, fallback: bool = True) -> list[Face]:
        """All faces, largest first. ``fallback``: let ``hog+cnn`` run the CNN where HOG finds none (the
        caller passes False when mask maps will locate the missed faces)."""
        import cv2

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        faces = [self.face_at(gray, d.box, d.eyes) for d in self.detector(rgb, fallback)]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def quad(self, face: Face) -> np.ndarray:
        """The face's crop square in photo coordinates (see :func:`visible_quad`, :func:`ffhq_quad`,
        :func:`cropped_quad`)."""
        if self.alignment == "ffhq":
            return cropped_quad(ffhq_quad(face.landmarks), self.crop)
        if face.upper is None:
            raise ValueError(f"face {face.box} has no upper-face landmarks (smaller than min_face={self.min_face})")
        if self.alignment == "visible-neck":
            return cropped_quad(neck_quad(face.upper), self.crop, 0.5)
        return cropped_quad(visible_quad(face.upper), self.crop)

    def align(self, rgb: np.ndarray, face: Face, size: int | None = None) -> AlignedFace:
        """Warp ``face`` to a ``size`` (default ``self.size``) square crop; the part outside the photo is
        filled (:func:`fill_border`)."""
        import cv2

        size = size or self.size
        matrix = quad_matrix(self.quad(face), size)
        crop = cv2.warpAffine(
            rgb, matrix, (size, size), flags=cv2.INTER_LINEAR if _scale(matrix) >= 1 else cv2.INTER_AREA,
            borderMode=cv2.BORDER_REPLICATE,
        )
        inside = cv2.warpAffine(
            np.ones(rgb.shape[:2], np.uint8), matrix, (size, size), flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        if not inside.all():
            crop = fill_border(crop, inside)
        return AlignedFace(image=crop, landmarks=transform_points(face.landmarks, matrix), matrix=matrix,
                           face=face, border_fraction=float(1.0 - inside.mean()), inside=inside)

    def _check_size(self, rgb: np.ndarray, path) -> None:
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_face:
            raise BadInput(f"image too small ({width}x{height}, need at least {self.min_face} px)", path, "too small")

    def faces(self, rgb: np.ndarray, path: str | os.PathLike | None = None, all_faces: bool = False) -> list[AlignedFace]:
        """Detect and align the largest face (or all of them). Raises :class:`BadInput` when none is usable."""
        self._check_size(rgb, path)
        found = self.detect(rgb)
        if not found:
            raise BadInput("no face found", path, "no face")
        usable = [f for f in found if f.side >= self.min_face]
        if not usable:
            raise BadInput(f"face too small (smaller than {self.min_face} px)", path, "face too small")
        chosen = usable if all_faces else usable[:1]
        return [self.align(rgb, f) for f in chosen]

    def find_faces(self, image: np.ndarray, path: str | os.PathLike | None = None,
                   photo_map: np.ndarray | None = None, all_faces: bool = True) -> tuple[list[Face], int]:
        """Faces of a photo (largest first) and how many of them were located from the mask map.

        The detector first (``hog+cnn`` with a map runs HOG alone: the map does the CNN's job faster).
        With a whole-photo mask map, every mask that no detected face explains (its centre inside a face
        box widened by 25%) is taken as a masked face the detector missed: its box is searched around the
        mask (:func:`face_box_for_mask`) and its landmarks predicted there. Raises :class:`BadInput`
        (reason ``no face`` / ``face too small`` / ``too small``) when nothing is usable.
        """
        import cv2

        self._check_size(image, path)
        detected = self.detect(image, fallback=photo_map is None)
        found = [f for f in detected if f.side >= self.min_face]
        guided = 0
        if photo_map is not None and photo_map.any():
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            for blob in mask_blobs(photo_map, max(8, self.min_face // 2)):
                if any(_explains(f.box, blob) for f in detected):
                    continue
                box = face_box_for_mask(self.hog, gray, blob)
                if min(box[2] - box[0], box[3] - box[1]) < self.min_face:
                    continue
                found.append(self.face_at(gray, box))
                guided += 1
        if not found:
            if detected:
                raise BadInput(f"face too small (smaller than {self.min_face} px)", path, "face too small")
            raise BadInput("no face found", path, "no face")
        found.sort(key=lambda f: f.area, reverse=True)
        if not all_faces:
            found = found[:1]
            guided = int(not any(found[0] is f for f in detected))
        return found, guided


# -------------------------------------------------------------------------------- mask-guided face boxes

def mask_blobs(photo_map: np.ndarray, min_side: int) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x, y, w, h) of the masks in a whole-photo map, one per mask: fragments closer than
    ~1% of the photo diagonal are merged; blobs narrower than ``min_side`` are ignored."""
    import cv2

    binary = photo_map.astype(np.uint8)
    radius = max(1, int(round(0.005 * float(np.hypot(*photo_map.shape)))))
    merged = cv2.dilate(binary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
    count, labels = cv2.connectedComponents(merged)
    blobs = []
    for label in range(1, count):
        ys, xs = np.nonzero((labels == label) & photo_map)
        if xs.size == 0:
            continue
        x, y, w, h = int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        if w >= min_side:
            blobs.append((x, y, w, h))
    return blobs


def _explains(box: tuple[int, int, int, int], blob: tuple[int, int, int, int]) -> bool:
    """Whether the mask ``blob`` belongs to the face in ``box`` (its centre inside the box widened by 25%)."""
    left, top, right, bottom = box
    bx, by = blob[0] + blob[2] / 2.0, blob[1] + blob[3] / 2.0
    mx, my = 0.25 * (right - left), 0.25 * (bottom - top)
    return left - mx <= bx <= right + mx and top - my <= by <= bottom + my


def face_box_for_mask(hog: HogDetector, gray: np.ndarray, blob: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The face box (HOG-box convention) of a masked face whose mask is ``blob``.

    dlib's HOG detector rarely fires on a masked face at its normal threshold. Around each mask we search a
    small region, rescaled so the expected face is ~120 px, with a lowered threshold, and keep the best
    box consistent with the mask (centred on it, similar width, bottom near the mask's lower edge). When
    none is found, the box is estimated from the mask alone (a face box is ~1.1x the mask width, square,
    ending ~0.13 mask widths above the mask's lower edge).
    """
    x, y, w, h = blob
    side = 1.1 * w
    cx, bottom = x + w / 2.0, y + h - 0.13 * w
    height, width = gray.shape
    x0, y0 = int(max(0, cx - 1.5 * side)), int(max(0, bottom - 2 * side))
    x1, y1 = int(min(width, cx + 1.5 * side)), int(min(height, bottom + side))
    scale = 120.0 / side
    best = None
    if x1 - x0 >= 8 and y1 - y0 >= 8:
        roi = _scaled(gray[y0:y1, x0:x1], scale)
        rects, scores, _ = hog.dlib_detector.run(roi, 0, -1.5)
        for rect, score in zip(rects, scores, strict=True):
            box = (x0 + rect.left() / scale, y0 + rect.top() / scale, x0 + rect.right() / scale,
                   y0 + rect.bottom() / scale)
            box_w = box[2] - box[0]
            consistent = (abs((box[0] + box[2]) / 2 - cx) < 0.25 * w and 0.7 < box_w / side < 1.4
                          and abs(box[3] - bottom) < 0.3 * w)
            if consistent and (best is None or score > best[0]):
                best = (score, box)
    if best is not None:
        return tuple(int(round(v)) for v in best[1])  # type: ignore[return-value]
    return (int(round(cx - side / 2)), int(round(bottom - side)), int(round(cx + side / 2)), int(round(bottom)))


# ------------------------------------------------------------------------------------ crops and pasting

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
