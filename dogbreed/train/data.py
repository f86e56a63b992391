"""Training data: seeded splits of labelled folders, a data fingerprint, and the Ray Data pipelines.

Photos are opened by the scan's own sandboxed photo worker (dogbreed.vision.worker) with the scan's geometry, so a
photo that crashes or hangs its decoder costs one logged photo, not the run, and validation crops are the scan's
crops byte for byte; training augmentation is timm's train transform applied to the same reduced photo. Photos travel as uint8 and are
normalised on the train worker's device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dogbreed.breeds import taxonomy
from dogbreed.breeds.folders import DataError, class_folders, labelled_items, photos_under, split_folders
from dogbreed.config import PhotoConfig
from dogbreed.train.config import TrainDecodeConfig
from dogbreed.vision.preprocessing import Preprocessing
from dogbreed.vision.spec import unusable_class_name
from dogbreed.vision.worker import PhotoTask, shared_reader

log = logging.getLogger(__name__)

Item = tuple[str, int]  # (photo path, class index)

__all__ = ["DataError", "Item", "Splits", "make_splits", "stratified_split", "fingerprint", "image_dataset",
           "feature_dataset", "decode_batch", "photo_ids"]


@dataclass
class Splits:
    """Class folders (index = label) and the photos of each split."""

    class_folders: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    fingerprint: str

    @property
    def class_names(self) -> list[str]:
        return [taxonomy.breed_from_folder(f) for f in self.class_folders]


def stratified_split(items: list[Item], fractions: tuple[float, ...], seed: int) -> list[list[Item]]:
    """Split per class with a seeded shuffle so every part keeps the class balance."""
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    parts: list[list[Item]] = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        bounds = np.round(np.cumsum(fractions) / sum(fractions) * len(members)).astype(int)
        for i, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds)):
            parts[i].extend(members[lo:hi])
    return parts


def fingerprint(roots: dict[str, str | Path], extensions: list[str] | None = None) -> str:
    """SHA-256 over sorted (role, relative path, size) of every photo: changes when the data does."""
    h = hashlib.sha256()
    for role in sorted(roots):
        root = os.path.realpath(roots[role])
        lines = sorted(f"{os.path.relpath(p, root)}\t{os.stat(p).st_size}" for p in photos_under(root, extensions))
        h.update(f"[{role}]\n".encode() + "\n".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def make_splits(data: str, val_data: str | None = None, test_data: str | None = None, seed: int = 0,
                extensions: list[str] | None = None, classes: list[str] | None = None, carve: bool = True) -> Splits:
    """Train/val/test photos: existing splits are kept; otherwise a seeded stratified 80/10/10 split of data (with
    carve; few-shot fits on every photo). `classes` (a taxonomy file's lines) fixes the classes and their order:
    folders match them by name, synonym or ImageNet class, and a folder of another breed is left out."""
    root = Path(data)
    split_roots = split_folders(root) if root.is_dir() else None
    train_root = split_roots["train"] if split_roots else root
    found = class_folders(train_root, extensions, min_classes=0 if classes else 2, breeds_only=True)
    folders = classes or list(found)
    train = labelled_items(found, folders, train_root, unknown_ok=bool(classes))
    given = {"val": val_data or (split_roots or {}).get("val"), "test": test_data or (split_roots or {}).get("test")}
    missing = [k for k, v in given.items() if v is None] if carve else []
    parts = {k: labelled_items(class_folders(v, extensions, min_classes=0, breeds_only=True), folders, v,
                               unknown_ok=bool(classes))
             for k, v in given.items() if v is not None}
    for k, items in parts.items():
        if not items:
            raise DataError(f"{_ROLE[k]} folder {given[k]} holds no photos in class folders of the model's classes; "
                            "give a folder of breed folders (a breed folder itself labels nothing)")
    _check_apart({"train": train} | parts, {"train": str(train_root)} | given)
    parts.setdefault("val", [])
    parts.setdefault("test", [])
    if missing:  # carve what is missing out of the training photos, 10% each
        carved = stratified_split(train, (1.0 - 0.1 * len(missing), *[0.1] * len(missing)), seed)
        train = carved[0]
        parts.update(zip(missing, carved[1:]))
    roots = {"data": root} | {k: Path(v) for k, v in given.items() if v is not None}
    splits = Splits(folders, train, parts["val"], parts["test"], fingerprint(roots, extensions))
    why = unusable_class_name(splits.class_names)
    if why:  # the model's spec refuses it: before training, not after it
        raise DataError(f"{data}: {why}; rename that class folder")
    return splits


_ROLE = {"train": "training", "val": "validation", "test": "test"}


def _check_apart(parts: dict[str, list[Item]], roots: dict[str, Any]) -> None:
    """Refuse splits that share photos (by real path): a test measured on training photos measures nothing."""
    real = {k: {os.path.realpath(p) for p, _ in items} for k, items in parts.items()}
    names = list(real)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if shared := real[a] & real[b]:
                raise DataError(f"the {_ROLE[b]} photos ({roots[b]}) share {len(shared)} photos with the {_ROLE[a]} "
                                f"photos ({roots[a]}), e.g. {min(shared)}; give folders that hold different photos")


# ---- decoding, in a sandboxed child per Ray worker process ---------------------------------------------------


@lru_cache(maxsize=8)
def _augment(prep: Preprocessing, gentle: bool = False):
    """timm's train transform up to (not including) ToTensor/Normalize: PIL in, augmented PIL out. gentle: views of a
    photo for few-shot prototypes (crops of 35-100% of the photo, colour jitter 0.2), which must stay that breed."""
    from timm.data import create_transform

    extra = {"scale": (0.35, 1.0), "color_jitter": 0.2} if gentle else {}
    primary, secondary, _final = create_transform(
        input_size=(3, prep.input_size, prep.input_size), is_training=True, separate=True,
        interpolation=prep.interpolation, mean=prep.mean, std=prep.std, crop_pct=prep.crop_pct, **extra)
    return lambda img: secondary(primary(img))


def photo_task(prep: Preprocessing, photos: PhotoConfig, train: bool) -> PhotoTask:
    """What training asks of the one photo worker: the scan's geometry (so validation crops are the scan's crops,
    byte for byte), no faces, and for training photos the reduced photo itself, which timm's augmentation crops."""
    return PhotoTask(prep.geometry(photos.face_side), photos, face=None, keep_rgb=train)


def decode_batch(batch: dict[str, np.ndarray], prep: Preprocessing, train: bool,
                 photos: PhotoConfig) -> dict[str, np.ndarray]:
    """Ray Data task: paths -> uint8 (N, S, S, 3) crops, augmented when train. A photo that cannot be used is
    logged with its reason and left out (one bad photo must not stop training)."""
    from PIL import Image

    reader = shared_reader(photo_task(prep, photos, train))
    xs, ys, kept = [], [], []
    for n, (path, label) in enumerate(zip(batch["path"], batch["label"])):
        result = reader(os.fsencode(str(path)))
        if not result.ok:
            log.warning("training photo %s left out: %s", path, result.error)
            continue
        xs.append(np.asarray(_augment(prep)(Image.fromarray(result.rgb, "RGB")), dtype=np.uint8) if train
                  else result.image)
        ys.append(int(label))
        kept.append(n)
    shape = (0, prep.input_size, prep.input_size, 3)
    out = {"x": np.stack(xs) if xs else np.zeros(shape, np.uint8), "label": np.asarray(ys, dtype=np.int64)}
    if "i" in batch:  # which photos came through: the driver names those left out (workers' logs never reach it)
        out["i"] = np.asarray(batch["i"], dtype=np.int64)[kept]
    return out


def decode_views(batch: dict[str, np.ndarray], prep: Preprocessing, views: int,
                 photos: PhotoConfig) -> dict[str, np.ndarray]:
    """Ray Data task for few-shot: each photo decoded once into 1 + views crops: the scan's crop (view 0), its mirror
    (view 1), then gentle augmentations; a photo that cannot be used is logged and left out."""
    from PIL import Image

    reader = shared_reader(photo_task(prep, photos, train=views > 1))
    xs, index, view = [], [], []
    for path, i in zip(batch["path"], batch["i"]):
        result = reader(os.fsencode(str(path)))
        if not result.ok:
            log.warning("training photo %s left out: %s", path, result.error)
            continue
        crops = [result.image, np.ascontiguousarray(result.image[:, ::-1])][:1 + views]
        crops += [np.asarray(_augment(prep, gentle=True)(Image.fromarray(result.rgb, "RGB")), dtype=np.uint8)
                  for _ in range(views - 1)]
        xs += crops
        index += [int(i)] * len(crops)
        view += list(range(len(crops)))
    shape = (0, prep.input_size, prep.input_size, 3)
    return {"x": np.stack(xs) if xs else np.zeros(shape, np.uint8), "i": np.asarray(index, dtype=np.int64),
            "view": np.asarray(view, dtype=np.int64)}


def view_features(items: list[Item], prep: Preprocessing, model: dict[str, Any], views: int, actors: int,
                  use_gpu: bool, batch_size: int, photos: PhotoConfig, tasks: TrainDecodeConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, d) of each photo's crop, features (n, views, d) of its other views, which photos were used)."""
    import ray.data

    from dogbreed.vision.predictors import FeatureExtractor

    ds = ray.data.from_items([{"path": p, "i": i} for i, (p, _) in enumerate(items)],
                             override_num_blocks=max(1, min(64, len(items) // 8)))
    ds = ds.map_batches(decode_views, fn_kwargs={"prep": prep, "views": views, "photos": photos},
                        batch_size=tasks.batch_size, num_cpus=tasks.num_cpus, max_retries=tasks.max_retries)
    ds = ds.map_batches(FeatureExtractor, fn_constructor_kwargs=model | {"prep": asdict(prep),
                                                                         "device": "cuda" if use_gpu else "cpu"},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0, max_restarts=tasks.max_retries, max_task_retries=tasks.max_retries)
    rows = ds.to_pandas()
    if not len(rows):
        raise DataError(f"none of the {len(items)} training photos could be used (each was left out: unreadable, "
                        "not a photo, or too large); see the photos' folders")
    used = np.unique(rows["i"].to_numpy())
    d = len(rows["x"].iloc[0])
    feats = np.zeros((len(items), 1 + views, d), dtype=np.float32)
    feats[rows["i"].to_numpy(), rows["view"].to_numpy()] = np.stack(rows["x"].to_numpy())
    return feats[used, 0], feats[used, 1:], used


def image_dataset(items: list[Item], prep: Preprocessing, train: bool, batch_size: int, photos: PhotoConfig,
                  tasks: TrainDecodeConfig, ids: bool = False):
    """Lazy Ray Dataset of {"x", "label"} (and "i", each photo's index in items, with ids); re-executed
    (reshuffled, re-augmented) every epoch it is read."""
    import ray.data

    blocks = max(1, min(256, len(items) // (2 * batch_size)))
    ds = ray.data.from_items([{"path": p, "label": y} | ({"i": i} if ids else {}) for i, (p, y) in enumerate(items)],
                             override_num_blocks=blocks)
    if train:
        ds = ds.random_shuffle()
    return ds.map_batches(decode_batch, fn_kwargs={"prep": prep, "train": train, "photos": photos},
                          batch_size=tasks.batch_size, num_cpus=tasks.num_cpus, max_retries=tasks.max_retries)


def feature_dataset(items: list[Item], prep: Preprocessing, model: dict[str, Any], actors: int, use_gpu: bool,
                    batch_size: int, photos: PhotoConfig, tasks: TrainDecodeConfig):
    """Bottleneck features of every photo, computed once (un-augmented) and materialised in the object store; "i"
    says which of items each row is (photo_ids: those that could be used)."""
    import ray.data

    from dogbreed.vision.predictors import FeatureExtractor

    ds = image_dataset(items, prep, train=False, batch_size=batch_size, photos=photos, tasks=tasks, ids=True)
    return ds.map_batches(FeatureExtractor, fn_constructor_kwargs=model | {"prep": asdict(prep),
                                                                           "device": "cuda" if use_gpu else "cpu"},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                          num_gpus=1 if use_gpu else 0, max_restarts=tasks.max_retries,
                          max_task_retries=tasks.max_retries).materialize()


def photo_ids(features) -> np.ndarray:
    """The sorted indices ("i") of the photos a materialised feature dataset holds: those that could be used."""
    if not features.count():
        return np.zeros(0, dtype=np.int64)
    return np.unique(features.select_columns(["i"]).to_pandas()["i"].to_numpy())
