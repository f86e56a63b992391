"""Labelled photo folders for training: class-folder listing, seeded splits, fingerprints, Ray Data pipelines.

Photos are decoded and augmented by Ray Data tasks on CPU and stream into the train workers; the
cached-bottleneck path runs the frozen backbone once over every photo and keeps only the small features.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dogbreed import labels
from dogbreed.models import Preprocessing

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_SPLIT_NAMES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}

Item = tuple[str, int]  # (absolute photo path, class index)


class DataError(ValueError):
    """A training folder that cannot be used; one readable sentence naming it."""


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
        return [labels.breed_from_folder(f) for f in self.class_folders]


def list_class_folders(root: str | Path) -> dict[str, list[Path]]:
    """{class folder name: sorted photo paths} of a class-per-folder tree (Stanford ``Images/`` is entered)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"training folder {root} does not exist")
    if (root / "Images").is_dir():
        root = root / "Images"
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if photos:
            classes[folder.name] = photos
    if len(classes) < 2:
        raise DataError(f"{root} needs at least two class folders with photos (found {len(classes)})")
    return classes


def _split_roots(root: Path) -> dict[str, Path] | None:
    """The dog-app layout's train/valid/test subfolders, or None when the folder is not split."""
    found = {}
    for split, names in _SPLIT_NAMES.items():
        present = [root / n for n in names if (root / n).is_dir()]
        if present:
            found[split] = present[0]
    return found if "train" in found and "val" in found else None


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


def label_items(classes: dict[str, list[Path]], class_folders: list[str], source: Path) -> list[Item]:
    """(path, index in class_folders) for every photo; a class folder outside class_folders is an error."""
    unknown = sorted(set(classes) - set(class_folders))
    if unknown:
        raise DataError(f"{source} has class folders the training data lacks: {', '.join(unknown[:5])}")
    return [(str(p), class_folders.index(name)) for name, paths in classes.items() for p in paths]


def fingerprint(roots: dict[str, str | Path]) -> str:
    """SHA-256 over sorted (role, relative path, size) of every photo: changes when the data does."""
    h = hashlib.sha256()
    for role in sorted(roots):
        root = Path(roots[role])
        lines = sorted(
            f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}"
            for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        h.update(f"[{role}]\n".encode() + "\n".join(lines).encode())
    return h.hexdigest()


def make_splits(data: str, val_data: str | None = None, test_data: str | None = None, seed: int = 0) -> Splits:
    """Train/val/test photos: existing splits are kept; otherwise a seeded stratified 80/10/10 split of data."""
    root = Path(data)
    split_roots = _split_roots(root) if root.is_dir() else None
    train_root = split_roots["train"] if split_roots else root
    classes = list_class_folders(train_root)
    folders = list(classes)
    train = label_items(classes, folders, train_root)
    given = {"val": val_data or (split_roots or {}).get("val"), "test": test_data or (split_roots or {}).get("test")}
    missing = [k for k, v in given.items() if v is None]
    parts = {k: label_items(list_class_folders(v), folders, Path(v)) for k, v in given.items() if v is not None}
    if missing:  # carve what is missing out of the training photos, 10% each
        fractions = {"val": 0.1, "test": 0.1}
        carved = stratified_split(train, (1.0 - 0.1 * len(missing), *[fractions[k] for k in missing]), seed)
        train = carved[0]
        parts.update(zip(missing, carved[1:]))
    roots = {"data": root} | {k: Path(v) for k, v in given.items() if v is not None}
    return Splits(folders, train, parts["val"], parts["test"], fingerprint(roots))


@lru_cache(maxsize=8)
def _transform(prep: Preprocessing, train: bool):
    from timm.data import create_transform

    return create_transform(input_size=(3, prep.input_size, prep.input_size), is_training=train,
                            interpolation=prep.interpolation, mean=prep.mean, std=prep.std, crop_pct=prep.crop_pct)


def _open_rgb(path: str, size: int):
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the photo is much larger
        return ImageOps.exif_transpose(img).convert("RGB")


def decode_batch(batch: dict[str, np.ndarray], prep: Preprocessing, train: bool) -> dict[str, np.ndarray]:
    """Ray Data task: paths -> normalised CHW float32 (augmented when train); unreadable photos are dropped."""
    transform = _transform(prep, train)
    xs, ys = [], []
    for path, label in zip(batch["path"], batch["label"]):
        try:
            xs.append(transform(_open_rgb(str(path), prep.resize_to)).numpy())
            ys.append(int(label))
        except Exception as e:  # noqa: BLE001 - one bad photo must not stop training
            log.warning("skipping unreadable photo %s: %s", path, e)
    shape = (0, 3, prep.input_size, prep.input_size)
    return {"x": np.stack(xs) if xs else np.zeros(shape, np.float32), "label": np.asarray(ys, dtype=np.int64)}


def image_dataset(items: list[Item], prep: Preprocessing, train: bool, batch_size: int = 16):
    """Lazy Ray Dataset of {"x", "label"}; re-executed (reshuffled, re-augmented) every epoch it is read."""
    import ray.data

    blocks = max(1, min(256, len(items) // (2 * batch_size)))
    ds = ray.data.from_items([{"path": p, "label": y} for p, y in items], override_num_blocks=blocks)
    if train:
        ds = ds.random_shuffle()
    return ds.map_batches(decode_batch, fn_kwargs={"prep": prep, "train": train}, batch_size=batch_size)


class FeatureExtractor:
    """Ray Data actor: loads the frozen backbone once; __call__ maps images to pooled bottleneck features."""

    def __init__(self, backbone: str, weights: str | None, pretrained: bool, device: str = "cpu"):
        import torch

        from dogbreed.models import BreedNet, create_backbone

        self.torch = torch
        self.device = torch.device(device)
        self.net = BreedNet(create_backbone(backbone, weights, pretrained)).eval().to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(batch["x"]).to(self.device)
            feats = self.net.features(x).float().cpu().numpy()
        return {"x": feats, "label": batch["label"]}


def feature_dataset(items: list[Item], prep: Preprocessing, model: dict[str, Any], actors: int, use_gpu: bool,
                    batch_size: int = 32):
    """Bottleneck features of every photo, computed once (un-augmented) and materialised in the object store."""
    import ray.data

    ds = image_dataset(items, prep, train=False, batch_size=batch_size)
    device = "cuda" if use_gpu else "cpu"
    return ds.map_batches(FeatureExtractor, fn_constructor_kwargs=model | {"device": device}, batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0).materialize()


class ArtifactPredictor:
    """Ray Data actor: loads a model artifact once; __call__ maps images to breed logits."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from dogbreed.models import load_artifact

        self.torch = torch
        self.device = torch.device(device)
        self.net = load_artifact(model_dir).net.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            _, logits = self.net(self.torch.from_numpy(batch["x"]).to(self.device))
        return {"logits": logits.float().cpu().numpy(), "label": batch["label"]}


def predict_items(items: list[Item], prep: Preprocessing, model_dir: str, actors: int, use_gpu: bool,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(labels, breed logits) of every readable photo, decoded and run through the artifact by Ray Data."""
    import ray.data

    ds = image_dataset(items, prep, train=False, batch_size=batch_size)
    ds = ds.map_batches(ArtifactPredictor, fn_constructor_kwargs={"model_dir": model_dir,
                                                                  "device": "cuda" if use_gpu else "cpu"},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0)
    rows = [b for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    if not rows:
        raise DataError("no readable photos to evaluate")
    return np.concatenate([r["label"] for r in rows]), np.concatenate([r["logits"] for r in rows])
