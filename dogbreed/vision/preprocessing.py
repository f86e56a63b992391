"""How photos must be prepared for some weights (timm's data config, stored whole), and the decode geometry it implies.

Free of torch, so decode tasks and decoder children can use it without loading the network's libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dogbreed.vision.geometry import CROP_MODES, FACE_SIDE, INTERPOLATIONS, Geometry

MAX_INPUT_SIZE = 2048  # the largest network input side accepted (timm's ImageNet models stay well below)


@dataclass(frozen=True)
class Preprocessing:
    """How photos must be prepared for some weights: timm's resolved data config, stored whole in model.json so
    that preprocessing travels with the weights (an older model.json without crop_mode was made with "center")."""

    input_size: int = 224
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not 1 <= self.input_size <= MAX_INPUT_SIZE or not 0 < self.crop_pct <= 1 or any(v <= 0 for v in self.std):
            raise ValueError(f"preprocessing needs 1 <= input_size <= {MAX_INPUT_SIZE}, 0 < crop_pct <= 1 and std > 0 "
                             f"(got {self})")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):  # NaN passes every comparison above
            raise ValueError(f"preprocessing needs finite mean and std (got {self})")
        if self.interpolation not in INTERPOLATIONS or self.crop_mode not in CROP_MODES:
            raise ValueError(f"preprocessing needs an interpolation of {', '.join(INTERPOLATIONS)} and a crop_mode of "
                             f"{', '.join(CROP_MODES)} (got {self.interpolation!r}, {self.crop_mode!r})")

    @classmethod
    def for_backbone(cls, name: str, input_size: int | None = None) -> "Preprocessing":
        """The one derivation: timm's data config of a backbone's pretrained weights (resolve_data_config), whole;
        `input_size` overrides the side, as timm's own override does."""
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(name)
        args = {"input_size": (3, input_size, input_size)} if input_size else {}
        cfg = resolve_data_config(args, pretrained_cfg=pretrained.to_dict() if pretrained else {})
        side, height = int(cfg["input_size"][-1]), int(cfg["input_size"][-2])
        if side != height:
            raise ValueError(f"backbone {name!r} wants a {side}x{height} input; dogbreed crops square photos only")
        return cls(input_size=side, crop_pct=float(cfg["crop_pct"]), crop_mode=str(cfg["crop_mode"]),
                   interpolation=str(cfg["interpolation"]), mean=tuple(float(v) for v in cfg["mean"]),
                   std=tuple(float(v) for v in cfg["std"]))

    def geometry(self, face_side: int = FACE_SIDE) -> Geometry:
        """How a photo is decoded for these weights and a face copy of `face_side`."""
        return Geometry(self.input_size, self.crop_pct, self.crop_mode, self.interpolation,
                        tuple(round(255 * v) for v in self.mean), face_side)
