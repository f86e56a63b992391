"""Face detectors side by side on labelled folders: faces found on humans, false faces on dogs and on other
photos, the same on copies rotated by some angle, and each detector's speed on one core.

Photos go through the decode and detect_faces functions the scan's decoder child runs (in this process, so
the detector's own time can be measured); rotated copies are made at full size and then decoded the same way.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

from PIL import Image, ImageOps
from pydantic import ValidationError

from dogbreed import detect
from dogbreed.config import ConfigError, FaceConfig, ScanConfig
from dogbreed.evaluate import collect
from dogbreed.images import Decoded, ImageError, Preprocessing, decode, read_bytes

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

    def flat(self, prefix: str = "") -> dict[str, float | int | str]:
        """Figures as flat keys (face_detected_in_human, ..._rotated), for JSON and the evaluate listing."""
        out: dict[str, float | int | str] = {f"{prefix}detector": self.ran_as}
        out.update({f"{prefix}face_detected_in_{c}": v for c, v in self.faces.items()})
        out.update({f"{prefix}face_detected_in_{c}_rotated": v for c, v in self.faces_rotated.items()})
        out[f"{prefix}face_images_per_s"] = round(self.images_per_s, 1)
        return out


def rotated(data: bytes, degrees: float) -> bytes:
    """The photo upright (EXIF applied), rotated counter-clockwise by `degrees` on a canvas that holds it all, as PNG."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    buf = io.BytesIO()
    rgb.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _decoded(paths: list[str], cfg: ScanConfig, degrees: float) -> list[Decoded | None]:
    prep = Preprocessing()  # the model crop is not used here; the face copy does not depend on it
    out: list[Decoded | None] = []
    for path in paths:
        try:
            data = read_bytes(path, cfg.decode.max_bytes)
            out.append(decode(rotated(data, degrees) if degrees else data, prep, cfg.face.max_side,
                              cfg.decode.max_pixels))
        except (ImageError, OSError):
            out.append(None)  # an unreadable photo counts for no detector
    return out


def _share_with_faces(decoded: list[Decoded | None], category: list[str], face_cfg) -> tuple[dict, dict, float]:
    counts = {c: 0 for c in CATEGORIES}
    hits = {c: 0 for c in CATEGORIES}
    seconds = 0.0
    for d, c in zip(decoded, category):
        if d is None:
            continue
        t0 = time.perf_counter()
        found = detect.detect_faces(d.small, d.gray_scale, face_cfg)
        seconds += time.perf_counter() - t0
        counts[c] += 1
        hits[c] += bool(found)
    shares = {c: hits[c] / counts[c] for c in CATEGORIES if counts[c]}
    return {c: n for c, n in counts.items() if n}, shares, seconds


def compare_detectors(folders: list[str], cfg: ScanConfig, detectors: list[str] | None = None,
                      rotate_degrees: float = 0.0) -> list[DetectorFigures]:
    """Figures for each detector (default: the configured one) on labelled folders, see :func:`evaluate.collect`.

    With `rotate_degrees`, each photo is also rotated by that angle and searched again.
    """
    import cv2

    photos = collect(folders)
    if not photos.paths:
        raise ConfigError(f"no labelled photos found in {', '.join(folders)}")
    names = list(dict.fromkeys(detectors or [cfg.face.detector]))
    face_cfgs = []
    for name in names:  # validated like any config value: an unknown name is one sentence naming face.detector
        try:
            face_cfgs.append(FaceConfig.model_validate({**cfg.face.model_dump(), "detector": name}))
        except ValidationError:
            raise ConfigError(f"face.detector: unknown detector {name!r} (use yunet or haar)") from None
    cv2.setNumThreads(1)  # as in a decode task: one photo at a time on one core
    upright = _decoded(photos.paths, cfg, 0.0)
    rotated_ = _decoded(photos.paths, cfg, rotate_degrees) if rotate_degrees else []
    out = []
    for name, face_cfg in zip(names, face_cfgs):
        counts, shares, seconds = _share_with_faces(upright, photos.category, face_cfg)
        fig = DetectorFigures(name, detect.active_detector(face_cfg), counts, shares,
                              images_per_s=sum(counts.values()) / seconds if seconds > 0 else 0.0)
        if rotated_:
            fig.faces_rotated = _share_with_faces(rotated_, photos.category, face_cfg)[1]
        out.append(fig)
    return out


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
