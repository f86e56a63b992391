"""Where every pixel of a decoded photo comes from: sizes, reductions, the model crop and the face copy, decided once.

Pillow (:mod:`dogbreed.vision.decode`) and torch (:mod:`dogbreed.vision.device_decode`) only apply what this module
decides, so the CPU and the device paths cannot drift apart. Sizes are (width, height) in pixels. The model crop
follows timm's eval transform for the weights' ``crop_mode``: ``center`` (short side to ``floor(input / crop_pct)``,
centre crop), ``squash`` (both sides to it, centre crop) or ``border`` (long side to it, pad with the mean colour,
centre crop); like torchvision, a resized side is truncated and a crop offset rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
DRAFT_SCALES = (8, 4, 2)  # JPEG DCT scaling: what libjpeg can decode directly, besides full size
FACE_SIDE = 480  # default longest side of the face copy (photos.face_side): a 12-MP JPEG decodes at 1/8 scale
FULL_SIZE = 1 << 30  # a side no photo reaches: a copy at full size


@dataclass(frozen=True)
class CropPlan:
    """How a (reduced) photo becomes the model input: resize to `resize`, pad by `pad` (left, top, right, bottom)
    with the fill colour, then cut `box` (left, top, right, bottom)."""

    resize: tuple[int, int]
    pad: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Geometry:
    """The sizes a photo is decoded to: the model's square input and the face copy's longest side.

    ``input_size`` None: no model crop (a thumbnail: only the small copy, up to ``face_side``).
    """

    input_size: int | None = 224
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"  # the resize filter of the crop (timm's name)
    fill: tuple[int, int, int] = (128, 128, 128)  # border mode's padding: the weights' mean colour
    face_side: int = FACE_SIDE

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r}: expected one of {', '.join(CROP_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        if self.input_size is not None and (self.input_size < 1 or not 0 < self.crop_pct <= 1):
            raise ValueError(f"a model crop needs input_size >= 1 and 0 < crop_pct <= 1 (got {self})")

    @classmethod
    def copy(cls, side: int | None = None) -> "Geometry":
        """Only an upright copy, longest side `side` (a thumbnail), or at full size (None): no model crop."""
        return cls(input_size=None, face_side=side or FULL_SIZE)

    @property
    def scale_size(self) -> int:
        """timm's resize target before the crop: floor(input_size / crop_pct)."""
        return math.floor(self.input_size / self.crop_pct)

    # ---- how far a photo may be reduced while decoding ------------------------------------------------------

    def need(self, size: tuple[int, int]) -> float:
        """The smallest scale of the full-size, upright photo that still serves the crop and the face copy."""
        w, h = size
        needs = [min(1.0, self.face_side / max(w, h))]
        if self.input_size is not None:
            side = max(w, h) if self.crop_mode == "border" else min(w, h)
            needs.append(self.scale_size / side)
        return max(needs)

    def draft(self, stored: tuple[int, int], need: float) -> int:
        """The JPEG DCT scale (1, 2, 4 or 8) to decode at, as Pillow's draft() picks it for the same request."""
        if need >= 0.5:
            return 1
        w, h = stored
        scale = min(w // max(1, int(w * need)), h // max(1, int(h * need)))
        return next((s for s in DRAFT_SCALES if scale >= s), 1)

    @staticmethod
    def drafted(stored: tuple[int, int], draft: int) -> tuple[int, int]:
        """The size libjpeg decodes to at a DCT scale (rounded up)."""
        return -(-stored[0] // draft), -(-stored[1] // draft)

    @staticmethod
    def box_factor(decoded: tuple[int, int], full: tuple[int, int], need: float) -> int:
        """The integer box reduction after decoding (a PNG, or a JPEG still twice as large as needed); 1 = none."""
        factor = int(max(decoded) / max(full) / need)
        return factor if factor >= 2 else 1

    @staticmethod
    def reduced(size: tuple[int, int], factor: int) -> tuple[int, int]:
        """The size Pillow's reduce(factor) gives (rounded up)."""
        return -(-size[0] // factor), -(-size[1] // factor)

    # ---- the model crop and the face copy, on the reduced upright photo -----------------------------------------

    def crop(self, size: tuple[int, int]) -> CropPlan:
        """The model crop of a photo of this (reduced, upright) size."""
        w, h = size
        s, t = self.scale_size, self.input_size
        if self.crop_mode == "squash":
            nw, nh = s, s
        elif self.crop_mode == "border":
            ratio = max(w / s, h / s)
            nw, nh = round(w / ratio), round(h / ratio)
        elif w <= h:
            nw, nh = s, int(s * h / w)
        else:
            nw, nh = int(s * w / h), s
        pad = (0, 0, 0, 0)
        if self.crop_mode == "border" and (nw < t or nh < t):
            dw, dh = max(0, t - nw), max(0, t - nh)
            pad = (dw // 2, dh // 2, (dw + 1) // 2, dh // 2 + dh % 2)
        pw, ph = nw + pad[0] + pad[2], nh + pad[1] + pad[3]
        left, top = int(round((pw - t) / 2.0)), int(round((ph - t) / 2.0))
        return CropPlan((nw, nh), pad, (left, top, left + t, top + t))

    def small(self, size: tuple[int, int]) -> tuple[int, int]:
        """The face copy's size: the longest side at most face_side."""
        w, h = size
        s = min(1.0, self.face_side / max(w, h))
        return max(1, round(w * s)), max(1, round(h * s))
