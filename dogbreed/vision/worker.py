"""The one sandboxed per-photo worker: read, fingerprint, decode and find faces, in a child process.

The scan's decode tasks, training, evaluation, the report and the benchmarks all open photos through a
:class:`PhotoReader`, so every path gets the same guards (bytes, pixels, time, memory) and the same pixels
(:func:`dogbreed.vision.decode.decode`). A photo that crashes or hangs native code costs its child process and
becomes a result with a reason; the child is started again for the next photo.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dogbreed.config import FaceConfig, PhotoConfig
from dogbreed.vision.codecs import load_plugins
from dogbreed.vision.decode import ImageError, decode, fingerprint_of_bytes, read_bytes
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.sandbox import Sandbox, SandboxError

PERMANENT, TRANSIENT = "permanent", "transient"  # error kinds: not retried on an unchanged file / retried next run
DECODE_NICE = 5  # decoding runs ahead of the network; the inference actor, which sets the pace, gets the CPU first


@dataclass(frozen=True)
class PhotoTask:
    """What the worker does to every photo: decode it per `geometry` within `photos`' limits, find faces with
    `face` (None: none), and keep the reduced photo (training's augmentation) or the small copy (thumbnails)."""

    geometry: Geometry
    photos: PhotoConfig = field(default_factory=PhotoConfig)
    face: FaceConfig | None = None
    keep_rgb: bool = False
    keep_small: bool = False


@dataclass
class PhotoResult:
    """One photo's outcome: an error with its reason and kind, or what decoding and the face detector made."""

    error: str | None = None
    error_kind: str | None = None  # permanent | transient
    fingerprint: str | None = None
    width: int = -1  # full size after EXIF orientation
    height: int = -1
    image: np.ndarray | None = None  # the model crop, uint8 (S, S, 3)
    faces: list[tuple] = field(default_factory=list)  # (x, y, w, h, score) in full-size pixels
    small: np.ndarray | None = None  # the face copy (keep_small)
    rgb: np.ndarray | None = None  # the reduced upright photo (keep_rgb)
    face_seconds: float = 0.0  # time the face detector took

    @property
    def ok(self) -> bool:
        return self.error is None


def _failure(e: BaseException) -> tuple[str, str]:
    if isinstance(e, ImageError):
        return str(e), PERMANENT if e.permanent else TRANSIENT
    if isinstance(e, MemoryError):
        return "out of memory while decoding (photos.max_memory_mb)", PERMANENT
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}".strip().rstrip(":"), PERMANENT


def photo_worker(task: PhotoTask) -> Callable[[bytes, float], PhotoResult]:
    """Runs in the sandboxed child (see dogbreed.vision.sandbox): the per-photo function, set up once."""
    from dogbreed.vision import faces

    load_plugins(task.photos.plugins)
    if task.face is not None:
        import cv2

        faces.load_face_detector(task.face)  # fail at start-up, once, if the detector cannot be loaded
        cv2.setNumThreads(1)  # one photo at a time on one core

    def one(raw_path: bytes, rotate: float = 0.0) -> PhotoResult:
        fp = None
        try:
            data = read_bytes(raw_path, task.photos.max_bytes)
            fp = fingerprint_of_bytes(data)
            d = decode(data, task.geometry, task.photos.max_pixels, keep_rgb=task.keep_rgb, rotate=rotate,
                       suffix=os.fsdecode(os.path.splitext(raw_path)[1]))
            del data
            boxes, t0 = [], time.perf_counter()
            if task.face is not None:
                boxes = faces.detect_faces(d.small, d.small_to_full, task.face)
            return PhotoResult(fingerprint=fp, width=d.width, height=d.height, image=d.model_input, faces=boxes,
                               small=d.small if task.keep_small else None, rgb=d.rgb,
                               face_seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - one bad photo must never take its batch down
            reason, kind = _failure(e)
            return PhotoResult(error=reason, error_kind=kind, fingerprint=fp)

    return one


class PhotoReader:
    """A sandboxed :func:`photo_worker`: never raises for a photo; a crash, a hang or a bad file is a result with a
    reason. The child lives as long as this object (close() ends it)."""

    def __init__(self, task: PhotoTask, nice: int = 0):
        self.task = task
        self.sandbox = Sandbox("dogbreed.vision.worker:photo_worker", {"task": task}, timeout_s=task.photos.timeout_s,
                               memory_mb=task.photos.max_memory_mb, nice=nice)

    def __call__(self, raw_path: bytes, rotate: float = 0.0) -> PhotoResult:
        try:
            result, failure = self.sandbox(raw_path, rotate)
        except SandboxError as e:
            return PhotoResult(error=str(e), error_kind=TRANSIENT)
        if failure is not None:  # the child crashed or hung on this photo
            return PhotoResult(error=failure, error_kind=PERMANENT)
        return result

    def close(self) -> None:
        self.sandbox.close()


_SHARED: dict[str, PhotoReader] = {}


def shared_reader(task: PhotoTask, nice: int = 0) -> PhotoReader:
    """The reader of this worker process for `task`, kept across the Ray tasks it runs (one child, started once);
    a reader for another task closes the old one first."""
    key = f"{task!r}/{nice}"  # the configs inside are not hashable; their repr is exact
    if key not in _SHARED:
        for old in _SHARED.values():
            old.close()
        _SHARED.clear()
        _SHARED[key] = PhotoReader(task, nice)
    return _SHARED[key]
