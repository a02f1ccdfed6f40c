"""Offline face detection for the refine pass: only what installed packages ship, never a hub download.

Default: OpenCV's bundled Haar cascade ``haarcascade_frontalface_alt2.xml`` (opencv-python / -headless ship it in
``cv2.data.haarcascades``; Forge installs opencv-python). It was picked by measurement on scikit-image's real faces
(``data.lfw_subset()`` composed into scenes, and ``data.astronaut()``) against the other bundled frontal cascades
and scikit-image's LBP cascade — see README.md and tests/test_faces.py for the figures.

Optional: a user-supplied YOLO face model file (e.g. ADetailer's ``face_yolov8n.pt`` already on disk) through
ultralytics when it is installed. Nothing here downloads anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lib_fluxq.errors import FluxqError
from lib_fluxq.refine import Box

HAAR_CASCADE = "haarcascade_frontalface_alt2.xml"
# Confidence for a cascade hit = 1 − exp(−neighbours / 8): OpenCV's own default acceptance (3 merged neighbours)
# maps to 0.31; the refine default 0.5 needs 6. Real lfw faces get 14–78 neighbours (5th–95th percentile, measured),
# i.e. 0.83–1.0; the non-face lfw patches get none.
NEIGHBOUR_SCALE = 8.0
MIN_FACE_FRACTION = 0.04  # ignore faces smaller than 4% of the short side: too small to re-draw usefully


class FaceDetectorError(FluxqError):
    """The face detector cannot be set up (missing package or model file)."""


@dataclass(frozen=True)
class Face:
    box: Box
    confidence: float


def neighbours_to_confidence(neighbours: int) -> float:
    return 1.0 - math.exp(-max(0, neighbours) / NEIGHBOUR_SCALE)


def _to_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.ndim == 3:
        # ITU-R 601 luma, as PIL's convert("L") does
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * (255.0 if array.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return array


class CascadeDetector:
    """OpenCV cascade face detector from a file the opencv package ships (no download)."""

    def __init__(self, cascade_path: str | None = None, scale_factor: float = 1.1) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise FaceDetectorError("the face pass needs OpenCV: pip install opencv-python-headless "
                                    "(Forge and A1111 already ship opencv-python)") from exc
        self._cv2 = cv2
        path = cascade_path or os.path.join(cv2.data.haarcascades, HAAR_CASCADE)
        self.classifier = cv2.CascadeClassifier(path)
        if self.classifier.empty():
            raise FaceDetectorError(f"{path}: OpenCV could not load this cascade file (reinstall opencv-python)")
        self.path = path
        self.scale_factor = scale_factor

    def __call__(self, image: Image.Image | np.ndarray) -> list[Face]:
        # no histogram equalisation: measured on the lfw scenes it adds false positives (precision 0.98 → 0.90)
        gray = _to_gray(image)
        min_side = max(24, int(MIN_FACE_FRACTION * min(gray.shape)))
        boxes, neighbours = self.classifier.detectMultiScale2(gray, scaleFactor=self.scale_factor, minNeighbors=1,
                                                             minSize=(min_side, min_side))
        faces = [Face(Box(int(x), int(y), int(w), int(h)), neighbours_to_confidence(int(n)))
                 for (x, y, w, h), n in zip(boxes, np.ravel(neighbours), strict=True)]
        return sorted(faces, key=lambda f: f.confidence, reverse=True)


class YoloDetector:
    """A user-supplied ultralytics YOLO face model file (bbox model); used only when the file exists locally."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FaceDetectorError(f"{model_path}: face model file not found (put a YOLO face .pt there, or leave "
                                    "'face model' empty to use OpenCV's bundled cascade)")
        try:
            from ultralytics import YOLO
        except ImportError as exc:
            raise FaceDetectorError(f"{model_path}: a YOLO face model needs the 'ultralytics' package "
                                    "(pip install ultralytics), or leave 'face model' empty") from exc
        self.model = YOLO(model_path)

    def __call__(self, image: Image.Image | np.ndarray) -> list[Face]:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        results = self.model.predict(pil.convert("RGB"), verbose=False)
        faces = []
        for result in results:
            for (x0, y0, x1, y1), conf in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), strict=True):
                faces.append(Face(Box(int(x0), int(y0), int(round(x1 - x0)), int(round(y1 - y0))), float(conf)))
        return sorted(faces, key=lambda f: f.confidence, reverse=True)


def make_detector(model_path: str = "") -> Callable[[Image.Image | np.ndarray], list[Face]]:
    """YOLO when a model file is given, else OpenCV's bundled Haar cascade."""
    return YoloDetector(model_path) if model_path else CascadeDetector()
