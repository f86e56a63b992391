"""The per-photo answer from the network's outputs: the dog score, the top-k breeds, and dog / human / neither.

The dog score is the softmax probability mass on ImageNet's dog classes (151-268, plus 273 dingo by default). A
photo shows a dog when that mass reaches the threshold, or when its single most likely ImageNet class is a dog
(the classic dog-app rule, which catches dogs whose remaining mass spreads over wild canids). Breed probabilities
are conditional on "dog" (renormalised over the breed classes), so a human's "looks like" breed is meaningful too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from dogbreed.config import ScanConfig
from dogbreed.vision.faces import active_detector


def dog_scores(imagenet_probs: np.ndarray, dog_indices: list[int]) -> np.ndarray:
    """Probability mass on the dog classes, per row."""
    return imagenet_probs[:, dog_indices].sum(axis=1)


def top1_is_dog(imagenet_probs: np.ndarray, dog_indices: list[int]) -> np.ndarray:
    """Whether each row's most likely ImageNet class is a dog class."""
    return np.isin(imagenet_probs.argmax(axis=1), dog_indices)


def decide(dog_score: float, face_count: int, dog_threshold: float, top1_is_dog: bool = False) -> str:
    """dog / human / dog_and_human / neither for one decoded photo.

    A dog is seen when the dog mass reaches the threshold, or when the single most likely ImageNet class
    is a dog (the classic dog-app rule), which catches dogs whose remaining mass spreads over wild canids.
    """
    is_dog = dog_score >= dog_threshold or top1_is_dog
    if is_dog and face_count:
        return "dog_and_human"
    if is_dog:
        return "dog"
    return "human" if face_count else "neither"


def decide_all(dog_scores_: np.ndarray, face_counts: np.ndarray, dog_threshold: float,
               top1_dog: np.ndarray) -> np.ndarray:
    """decide() for whole arrays of photos (relabel)."""
    is_dog = (np.asarray(dog_scores_) >= dog_threshold) | np.asarray(top1_dog, dtype=bool)
    face = np.asarray(face_counts) > 0
    return np.where(is_dog & face, "dog_and_human", np.where(is_dog, "dog", np.where(face, "human", "neither")))


def top_k(probs: np.ndarray, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (name, prob) pairs, best first."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(p[j])) for j in row] for p, row in zip(probs, idx)]


def _effective_face(cfg: ScanConfig) -> dict[str, Any]:
    """The face settings as they will run: a yunet that falls back to haar (no yuface here) hashes as haar. The copy's
    size (photos.face_side) is hashed as the face setting `max_side` it once was, so rows keep their settings_id."""
    face = cfg.face.model_copy(update={"detector": active_detector(cfg.face)}).model_dump(mode="json")
    return {**face, "max_side": cfg.photos.face_side}


def settings_id(cfg: ScanConfig) -> str:
    """A short hash of the settings that change a photo's result besides the model (the model has its model_id).

    It is stored in every row: rows made under other settings are due again, so results never silently mix them.
    """
    relevant = {"top_k": cfg.top_k, "dog_threshold": cfg.dog_threshold, "count_dingo_as_dog": cfg.count_dingo_as_dog,
                "face": _effective_face(cfg)}
    if cfg.breed_flip:  # added only when on, so rows written before the setting existed stay current
        relevant["breed_flip"] = True
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
