"""Face detectors side by side on labelled folders: faces found on humans, false faces on dogs and on other
photos, the same on copies rotated by some angle, and each detector's speed on one core.

Photos go through the scan's own sandboxed photo worker (dogbreed.vision.worker), which also times the detector
alone; rotated copies are the decoded photo turned on a canvas that holds it all, before the face copy is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pydantic import ValidationError

from dogbreed.breeds.folders import LabelledPhotos, evaluation_photos
from dogbreed.config import ConfigError, FaceConfig, ScanConfig
from dogbreed.vision.faces import resolved
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.worker import PhotoReader, PhotoTask

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


def _figures(name: str, face_cfg: FaceConfig, photos: LabelledPhotos, cfg: ScanConfig,
             rotate_degrees: float) -> DetectorFigures:
    """One detector over every photo, upright and (with rotate_degrees) rotated, in one sandboxed child."""
    angles = [0.0] + ([rotate_degrees] if rotate_degrees else [])
    counts = {a: dict.fromkeys(CATEGORIES, 0) for a in angles}
    hits = {a: dict.fromkeys(CATEGORIES, 0) for a in angles}
    seconds = 0.0
    # The scan's own photo worker, in a child of its own, which also keeps the detector away from torch's OpenMP
    # threads in this process (with them beside it YuNet ran 40 times slower) and measures it as a decode task
    # runs it: one core. Only the face copy is made (no model crop).
    reader = PhotoReader(PhotoTask(Geometry.copy(cfg.photos.face_side), cfg.photos, face_cfg))
    try:
        for angle in angles:
            for path, c in zip(photos.paths, photos.category):
                result = reader(os.fsencode(path), angle)
                if not result.ok:
                    continue  # a photo that cannot be decoded (or crashes the decoder) counts for no detector
                counts[angle][c] += 1
                hits[angle][c] += len(result.faces) > 0
                seconds += result.face_seconds if angle == 0.0 else 0.0
    finally:
        reader.close()
    shares = {a: {c: hits[a][c] / counts[a][c] for c in CATEGORIES if counts[a][c]} for a in angles}
    upright = {c: n for c, n in counts[0.0].items() if n}
    return DetectorFigures(name, face_cfg.detector, upright, shares[0.0],
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
            face_cfgs.append(resolved(FaceConfig.model_validate({**cfg.face.model_dump(), "detector": name})))
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
