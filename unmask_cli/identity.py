"""Offline identity and landmark distances between an unmasked output and its reference face (dlib, no torch).

* Identity: dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) maps a face to a
  128-d descriptor; the euclidean distance between two descriptors is below 0.6 for the same person in
  dlib's calibration (99.38% on LFW).
* Landmarks: dlib's 68-point shape predictor; the mean point error is normalised by the inter-ocular
  distance (outer eye corners, points 36 and 45) of the reference.

Both models are found by :func:`unmask_cli.faces.model_path` (the ``face-recognition-models`` package, or
the folder in ``$UNMASK_DLIB_MODELS``).

Face box: dlib's HOG frontal detector (largest face; the outputs are unmasked faces, where HOG works).
When it finds nothing - an output that still shows part of a mask, a blurry reconstruction, a 64 px crop -
a fixed box over the central region of the crop is used instead (:data:`FALLBACK_BOX`, fractions of
width/height, which is where the detector puts the face on this project's aligned crops at 64-256 px), so
every output still gets a descriptor and landmarks. :meth:`IdentityScorer.face_box` says which one was used.

``unmask eval`` scores every method's output of an image in one :meth:`IdentityScorer.face_scores` call
(the reference's box, landmarks and descriptor found once), in :class:`FaceScorePool` worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from unmask_cli.errors import UnmaskError
from unmask_cli.faces import FACE_RECOGNITION_MODEL, HogDetector, Landmarks68, model_path

SAME_PERSON_THRESHOLD = 0.6  # dlib: descriptor distance < 0.6 -> same person
FALLBACK_BOX = (0.2, 0.3, 0.8, 0.9)  # left, top, right, bottom as fractions of the crop
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45


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
        self.fallback_box = fallback_box
        self.detector = HogDetector(upsample, grey=False)  # HOG on all three channels, as always here
        self.landmarks_model = Landmarks68()
        path = model_path(FACE_RECOGNITION_MODEL)
        try:
            self.recognizer = dlib.face_recognition_model_v1(str(path))
        except RuntimeError as err:
            raise UnmaskError(f"not a dlib face recognition model ({str(err).strip()[:200]})", path) from err

    # ----------------------------------------------------------------------------------- building blocks

    def face_box(self, img: np.ndarray) -> tuple[tuple[int, int, int, int], bool]:
        """``((left, top, right, bottom), detected)``: the largest detected face, or the central fallback
        box (``detected=False``) when the detector finds none."""
        rgb = _as_rgb_uint8(img)
        found = self.detector(rgb)
        if found:
            return max(found, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1])).box, True
        h, w = rgb.shape[:2]
        left, top, right, bottom = self.fallback_box
        box = (int(round(left * w)), int(round(top * h)), int(round(right * w)) - 1, int(round(bottom * h)) - 1)
        return box, False

    def landmarks(self, img: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(68, 2) float landmarks of the face in ``box`` (default: :meth:`face_box`)."""
        rgb = _as_rgb_uint8(img)
        if box is None:
            box, _ = self.face_box(rgb)
        return self.landmarks_model(rgb, box)

    def _shape(self, rgb: np.ndarray, landmarks: np.ndarray | None):
        """The dlib ``full_object_detection`` that places the descriptor's face chip."""
        dlib = self._dlib
        if landmarks is None:
            box, _ = self.face_box(rgb)
            return self.landmarks_model.predictor(rgb, dlib.rectangle(*box))
        pts = np.asarray(landmarks, dtype=np.float64)
        if pts.shape != (68, 2):
            raise ValueError(f"landmarks must be (68, 2), got {pts.shape}")
        ints = np.round(pts).astype(int)
        lo, hi = ints.min(axis=0), ints.max(axis=0)
        box = dlib.rectangle(int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
        return dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in ints])

    def descriptors(self, images: Sequence[np.ndarray], landmarks: np.ndarray | None = None) -> np.ndarray:
        """(N, 128) dlib face descriptors (float64) of ``images``, one call of dlib's batch API (the same
        values as one image at a time: the ResNet sees each 150x150 chip on its own).

        ``landmarks`` (68, 2), e.g. the aligned landmarks of the manifest, are used as given for every
        image; otherwise each face box comes from :meth:`face_box` (detector, else the central fallback)
        and the landmarks from the 68-point predictor. dlib aligns a 150x150 chip from them (padding 0.25,
        no jitter).
        """
        rgbs = [_as_rgb_uint8(img) for img in images]
        shapes = []
        for rgb in rgbs:
            one = self._dlib.full_object_detections()
            one.append(self._shape(rgb, landmarks))
            shapes.append(one)
        found = self.recognizer.compute_face_descriptor(rgbs, shapes)
        return np.array([list(faces[0]) for faces in found], dtype=np.float64).reshape(len(rgbs), 128)

    def descriptor(self, img: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """128-d dlib face descriptor (float64) of the face in ``img`` (see :meth:`descriptors`)."""
        return self.descriptors([img], landmarks)[0]

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
        return self.landmark_distances([out], ref)[0]

    def landmark_distances(self, outputs: Sequence[np.ndarray], ref: np.ndarray) -> list[float]:
        """:meth:`landmark_distance` of each output, with the box and landmarks of ``ref`` found once."""
        ref_rgb = _as_rgb_uint8(ref)
        box, _ = self.face_box(ref_rgb)
        ref_pts = self.landmarks(ref_rgb, box)
        iod = float(np.linalg.norm(ref_pts[RIGHT_EYE_OUTER] - ref_pts[LEFT_EYE_OUTER]))
        distances = []
        for out in outputs:
            out_rgb = _as_rgb_uint8(out)
            if out_rgb.shape != ref_rgb.shape:
                raise ValueError(f"out and ref differ in shape: {out_rgb.shape} vs {ref_rgb.shape}")
            out_pts = self.landmarks(out_rgb, box)
            distances.append(float(np.linalg.norm(out_pts - ref_pts, axis=1).mean() / iod) if iod > 0
                             else float("nan"))
        return distances

    def face_scores(self, outputs: Sequence[np.ndarray], ref: np.ndarray,
                    landmarks: np.ndarray | None = None) -> list[tuple[float, float]]:
        """``(identity distance, landmark distance)`` of each output against ``ref``: one descriptor batch
        for the outputs and the reference (``landmarks`` for all, or each found on its own image)."""
        found = self.descriptors([*outputs, ref], landmarks)
        identity = [float(np.linalg.norm(d - found[-1])) for d in found[:-1]]
        return list(zip(identity, self.landmark_distances(outputs, ref), strict=True))


# ---------------------------------------------------------------------------------- worker processes

_WORKER_SCORER: IdentityScorer | None = None


def _worker_face_scores(outputs: list[np.ndarray], ref: np.ndarray,
                        landmarks: np.ndarray | None) -> list[tuple[float, float]]:
    global _WORKER_SCORER
    if _WORKER_SCORER is None:  # loaded by the first task, so a bad model file comes back as its error
        _WORKER_SCORER = IdentityScorer()
    return _WORKER_SCORER.face_scores(outputs, ref, landmarks)


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes for :class:`FaceScorePool`: one per usable CPU, at most 8."""
    return min(8, usable_cpus())


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C is the main process's to handle (it shuts the pool down), no traceback here."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FaceScorePool:
    """:meth:`IdentityScorer.face_scores` in worker processes, as futures, so the dlib ResNet (single-
    threaded, about 70 ms a chip on a CPU, most of an evaluation) runs beside the torch metrics and on
    every core. ``workers=0`` scores in this process (futures that are already done)."""

    def __init__(self, workers: int):
        self.workers = workers
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: a spawned worker re-imports the caller's main script, which runs
            # it again unless it has an ``if __name__ == "__main__"`` guard. The workers use dlib and numpy
            # only, never torch, so its thread pools are no hazard in them.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                             initializer=_ignore_interrupts)
        else:
            self._pool, self._scorer = None, IdentityScorer()

    def submit(self, outputs: list[np.ndarray], ref: np.ndarray, landmarks: np.ndarray | None) -> Future:
        if self._pool is not None:
            return self._pool.submit(_worker_face_scores, outputs, ref, landmarks)
        done: Future = Future()
        done.set_result(self._scorer.face_scores(outputs, ref, landmarks))
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FaceScorePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
