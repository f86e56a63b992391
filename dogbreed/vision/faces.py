"""Face detectors: the YuNet CNN (default) or OpenCV's Haar cascade, on the small upright copy of each photo.

Faces are reported as (x, y, w, h, score) in full-size, EXIF-upright pixels. YuNet (the ``yuface`` package,
libfacedetection's CNN compiled in) re-checks weaker candidates turned by +-rotate_deg, which finds tilted heads
without admitting more false faces on fur; Haar, the classic dog-app detector, finds upright frontal faces and has
no confidence (score None).
"""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from dogbreed.config import ConfigError, FaceConfig

Face = tuple[int, int, int, int, "float | None"]  # x, y, w, h in full-size pixels; score 0..1 (None: Haar)
WINDOW_PX = 128  # largest side of the window in which a candidate is re-checked turned
NO_YUFACE = ("face.detector yunet needs the yuface package (wheels for CPython 3.10 and 3.11 only), "
             "so faces are found with haar here")


@lru_cache(maxsize=4)
def _cascade(name: str):
    import cv2

    path = name if os.path.isfile(name) else os.path.join(cv2.data.haarcascades, name)
    clf = cv2.CascadeClassifier(path)
    if clf.empty():
        raise ConfigError(f"face.cascade: Haar cascade {name!r} could not be loaded")
    return clf


@lru_cache(maxsize=1)
def _yuface() -> Any | None:
    """The yuface module, or None where it is not installed (or does not load)."""
    try:
        module = importlib.import_module("yuface")
    except ImportError:
        return None
    _one_openmp_thread(module)
    return module


def _one_openmp_thread(module: Any) -> None:
    """One thread for yuface's own (vendored) OpenMP, as cv2.setNumThreads(1) does for OpenCV.

    A decode task works on one photo on one core; OpenMP threads spinning beside it on a busy node made
    YuNet 17 times slower (1.3 instead of 22 photos/s measured on 2 loaded cores). Decoder children also get
    OMP_NUM_THREADS=1 (dogbreed.vision.sandbox). In a process that loaded torch first, yuface's OpenMP calls reach
    torch's runtime instead, which this cannot limit: measure YuNet in a child (see evaluate_faces).
    """
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(os.path.dirname(module.__file__)), "yuface.libs", "libgomp*.so*")
    for path in glob.glob(libs):
        try:
            ctypes.CDLL(path).omp_set_num_threads(1)
        except (OSError, AttributeError):  # another build of yuface: its threads stay as OMP_NUM_THREADS says
            pass


def active_detector(cfg: FaceConfig) -> str:
    """The detector that will really run: yunet falls back to haar, with one warning, where yuface is missing."""
    if cfg.detector == "yunet" and _yuface() is None:
        _warn_fallback()
        return "haar"
    return cfg.detector


@lru_cache(maxsize=1)
def _warn_fallback() -> None:
    warnings.warn(NO_YUFACE, RuntimeWarning, stacklevel=3)


def resolved(cfg: FaceConfig) -> FaceConfig:
    """The face settings with the detector that will really run (decided once, where settings_id is computed, and
    passed to the workers as it is)."""
    return cfg.model_copy(update={"detector": active_detector(cfg)})


def load_face_detector(cfg: FaceConfig) -> None:
    """Load (and cache) the detector the settings name now, so that a missing one fails once, at start-up.

    Workers get resolved settings and never fall back on their own: a node without yuface that is asked for
    yunet fails to start instead of writing rows that claim a detector that did not run.
    """
    if cfg.detector == "yunet" and _yuface() is None:
        raise ConfigError("face.detector yunet: the yuface package is not installed on this node "
                          f"({platform.node()}); install it there, or set face.detector: haar")
    if cfg.detector == "haar":
        _cascade(cfg.cascade)


def detect_faces(small: np.ndarray, scale: float, cfg: FaceConfig) -> list[Face]:
    """Face boxes (x, y, w, h, score) in full-size pixels, from a downscaled upright copy `scale` times smaller.

    `small` is the RGB copy (h, w, 3) of images.Decoded; a grayscale (h, w) copy is accepted too.
    """
    import cv2

    if cfg.detector == "haar":
        gray = small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        found = _cascade(cfg.cascade).detectMultiScale(
            gray, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(cfg.min_size, cfg.min_size))
        return [(*(int(round(v * scale)) for v in box), None) for box in (found if len(found) else [])]
    bgr = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR if small.ndim == 2 else cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    out = []
    for cx, cy, fw, fh, score in _yunet(bgr, cfg):
        x0, y0 = max(0.0, cx - fw / 2), max(0.0, cy - fh / 2)
        x1, y1 = min(float(w), cx + fw / 2), min(float(h), cy + fh / 2)
        if x1 > x0 and y1 > y0:
            box = (int(round(x0 * scale)), int(round(y0 * scale)),
                   int(round((x1 - x0) * scale)), int(round((y1 - y0) * scale)))
            out.append((*box, round(float(score), 3)))
    return out


def _yunet(bgr: np.ndarray, cfg: FaceConfig) -> list[tuple[float, float, float, float, float]]:
    """Faces as (centre x, centre y, w, h, score) in pixels of `bgr`.

    One upright pass accepts candidates at min_score. YuNet still sees a tilted head, only less sure of it,
    so each weaker candidate (verify_score and up, best first, at most max_verify) is looked at again in a
    window around it turned by +rotate_deg and -rotate_deg; a face found there at min_score is kept, its
    centre mapped back. Re-checking a window costs far less than turning the whole photo, and fur seldom
    passes min_score at any angle.
    """
    rows = _yuface().c_detect(np.ascontiguousarray(bgr))  # conf (percent), x, y, w, h, landmarks...
    rows = rows[np.argsort(-rows[:, 0], kind="stable")] if len(rows) else rows
    faces: list[tuple[float, float, float, float, float]] = []

    def covered(cx: float, cy: float) -> bool:  # a found face already holds this centre: the same face
        return any(abs(cx - fx) < fw / 2 and abs(cy - fy) < fh / 2 for fx, fy, fw, fh, _ in faces)

    verified = 0
    for row in rows:
        conf, (x, y, w, h) = row[0] / 100.0, (float(v) for v in row[1:5])
        cx, cy = x + w / 2, y + h / 2
        if conf < cfg.verify_score or covered(cx, cy):
            continue
        if conf >= cfg.min_score:
            faces.append((cx, cy, w, h, conf))
        elif cfg.rotate_deg > 0 and verified < cfg.max_verify:
            verified += 1
            best = _turned(bgr, cx, cy, max(w, h), cfg)
            if best is not None and not covered(best[0], best[1]):
                faces.append(best)
    return faces


def _turned(bgr: np.ndarray, cx: float, cy: float, side: float, cfg: FaceConfig):
    """The best face at min_score in a window twice the candidate's size around (cx, cy), turned +-rotate_deg.

    The window is shrunk to at most WINDOW_PX: YuNet finds a 64-px face as well as a large one, and a small
    window keeps the re-check cheap however large the candidate.
    """
    import cv2

    zoom = min(1.0, WINDOW_PX / (2 * side))
    win = max(16, int(round(2 * side * zoom)))
    best = None
    for angle in (cfg.rotate_deg, -cfg.rotate_deg):
        m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
        m[:, 2] += (win / 2 - cx, win / 2 - cy)  # the candidate's centre lands in the window's centre
        window = cv2.warpAffine(bgr, m, (win, win), flags=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT)
        found = _yuface().c_detect(window)
        if not len(found):
            continue
        top = found[int(np.argmax(found[:, 0]))]
        conf = top[0] / 100.0
        if conf < cfg.min_score or (best is not None and conf <= best[4]):
            continue
        wx, wy = float(top[1]) + float(top[3]) / 2, float(top[2]) + float(top[4]) / 2
        back = cv2.invertAffineTransform(m) @ np.array([wx, wy, 1.0])
        best = (float(back[0]), float(back[1]), float(top[3]) / zoom, float(top[4]) / zoom, conf)
    return best
