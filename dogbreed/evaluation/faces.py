"""Face detectors side by side on labelled folders: faces found on humans, false faces on dogs and on other
photos, the same on copies rotated by some angle, and each detector's speed on one core.

Photos go through the decode and detect_faces functions the scan's decoder child runs, in a sandboxed child of
the same kind, which also times the detector alone; rotated copies are made at full size, then decoded the same way.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, ImageOps
from pydantic import ValidationError

from dogbreed.breeds.folders import LabelledPhotos, evaluation_photos
from dogbreed.config import ConfigError, DecodeConfig, FaceConfig, ScanConfig
from dogbreed.vision import faces
from dogbreed.vision.decode import ImageError, Preprocessing, decode, read_bytes
from dogbreed.vision.sandbox import Sandbox

CATEGORIES = ("human", "dog", "other")


@dataclass
class DetectorFigures:
    """One detector's figures: share of photos with at least one face, per category (upright and rotated)."""

    detector: str  # as asked for
    ran_as: str  # what really ran (yunet falls back to haar where yuface is missing)
    photos: dict[str, int] = field(default_factory=dict)  # category -> photos decoded
    faces: dict[str, float] = field(default_factory=dict)  # category -> share with a face, upright
    faces_rotated: dict[str, float] = field(default_factory=dict)  # the same on the rotated copies (empty: none)
    images_per_s: float = 0.0  # detect_faces on the upright copies, one core, decoding not counted

    def flat(self) -> dict[str, float | int | str]:
        """Figures as flat keys (face_detected_in_human, ..._rotated), for JSON and the evaluate listing."""
        out: dict[str, float | int | str] = {"detector": self.detector, "ran_as": self.ran_as}
        out.update({f"face_detected_in_{c}": v for c, v in self.faces.items()})
        out.update({f"face_detected_in_{c}_rotated": v for c, v in self.faces_rotated.items()})
        out["face_images_per_s"] = round(self.images_per_s, 1)
        return out


def rotated(data: bytes, degrees: float) -> bytes:
    """The photo upright (EXIF applied), rotated counter-clockwise by `degrees` on a canvas that holds it all, as PNG."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    buf = io.BytesIO()
    rgb.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def faces_worker(face: dict, decode_cfg: dict) -> Callable[[str, float], "tuple[int, float] | None"]:
    """Runs in a sandboxed child, as the scan's decoder does: per photo (rotated if asked), the number of faces
    and the seconds detect_faces took; None for a photo that cannot be decoded.

    A child of its own keeps the detector away from torch's OpenMP threads in the calling process (with them
    beside it YuNet ran 40 times slower), and measures it the way a decode task runs it: one core.
    """
    import cv2

    face_, cfg = FaceConfig(**face), DecodeConfig(**decode_cfg)
    faces.load_face_detector(face_)
    cv2.setNumThreads(1)
    prep = Preprocessing()  # the model crop is not used here; the face copy does not depend on it

    def one(path: str, degrees: float) -> tuple[int, float] | None:
        try:
            data = read_bytes(path, cfg.max_bytes)
            d = decode(rotated(data, degrees) if degrees else data, prep, face_.max_side, cfg.max_pixels)
        except (ImageError, OSError):
            return None  # an unreadable photo counts for no detector
        t0 = time.perf_counter()
        found = faces.detect_faces(d.small, d.small_to_full, face_)
        return len(found), time.perf_counter() - t0

    return one


def _figures(name: str, face_cfg: FaceConfig, photos: LabelledPhotos, cfg: ScanConfig,
             rotate_degrees: float) -> DetectorFigures:
    """One detector over every photo, upright and (with rotate_degrees) rotated, in one sandboxed child."""
    angles = [0.0] + ([rotate_degrees] if rotate_degrees else [])
    counts = {a: dict.fromkeys(CATEGORIES, 0) for a in angles}
    hits = {a: dict.fromkeys(CATEGORIES, 0) for a in angles}
    seconds = 0.0
    sandbox = Sandbox("dogbreed.evaluation.faces:faces_worker",
                      {"face": face_cfg.model_dump(), "decode_cfg": cfg.decode.model_dump()},
                      timeout_s=cfg.decode.timeout_s, memory_mb=cfg.decode.max_memory_mb)
    try:
        for angle in angles:
            for path, c in zip(photos.paths, photos.category):
                result, failure = sandbox(path, angle)
                if failure is not None or result is None:
                    continue  # a photo that cannot be decoded (or crashes the decoder) counts for no detector
                counts[angle][c] += 1
                hits[angle][c] += result[0] > 0
                seconds += result[1] if angle == 0.0 else 0.0
    finally:
        sandbox.close()
    shares = {a: {c: hits[a][c] / counts[a][c] for c in CATEGORIES if counts[a][c]} for a in angles}
    upright = {c: n for c, n in counts[0.0].items() if n}
    return DetectorFigures(name, faces.active_detector(face_cfg), upright, shares[0.0],
                           shares[rotate_degrees] if rotate_degrees else {},
                           sum(upright.values()) / seconds if seconds > 0 else 0.0)


def compare_detectors(folders: list[str], cfg: ScanConfig, detectors: list[str] | None = None,
                      rotate_degrees: float = 0.0) -> list[DetectorFigures]:
    """Figures for each detector (default: the configured one) on labelled folders, see :func:`labelled.evaluation_photos`.

    With `rotate_degrees`, each photo is also rotated by that angle and searched again.
    """
    photos = evaluation_photos(folders, cfg.extensions)
    if not photos.paths:
        raise ConfigError(f"no labelled photos found in {', '.join(folders)}")
    names = list(dict.fromkeys(detectors or [cfg.face.detector]))
    face_cfgs = []
    for name in names:  # validated like any config value: an unknown name is one sentence naming face.detector
        try:
            face_cfgs.append(FaceConfig.model_validate({**cfg.face.model_dump(), "detector": name}))
        except ValidationError:
            raise ConfigError(f"face.detector: unknown detector {name!r} (use yunet or haar)") from None
    return [_figures(name, face_cfg, photos, cfg, rotate_degrees) for name, face_cfg in zip(names, face_cfgs)]


def with_face_figures(figures: dict, compared: list[DetectorFigures], detector: str) -> dict:
    """The pipeline's figures plus the configured detector's on rotated copies and its speed, when compared."""
    mine = next((c for c in compared if c.detector == detector), None)
    if mine is None:
        return figures
    extra = {k: v for k, v in mine.flat().items() if k.endswith("_rotated") or k == "face_images_per_s"}
    return {**figures, "face_detector": mine.ran_as, **extra}


def detector_table(compared: list[DetectorFigures], rotate_degrees: float = 0.0) -> str:
    """One line per detector: share of human / dog / other photos with a face (upright, then rotated), images/s."""
    cols = ["humans", "dogs", "other"]
    if rotate_degrees:
        cols += [f"{c} {rotate_degrees:g}°" for c in cols]
    lines = [f"{'detector':<20}" + "".join(f"{c:>12}" for c in cols) + f"{'images/s':>10}"]
    for c in compared:
        shares = [c.faces.get(k) for k in CATEGORIES]
        if rotate_degrees:
            shares += [c.faces_rotated.get(k) for k in CATEGORIES]
        name = c.detector if c.ran_as == c.detector else f"{c.detector} (ran {c.ran_as})"
        lines.append(f"{name:<20}" + "".join(f"{'-' if v is None else f'{v:.1%}':>12}" for v in shares)
                     + f"{c.images_per_s:>10.1f}")
    return "\n".join(lines)
