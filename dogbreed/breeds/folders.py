"""Labelled photo folders, read one way for training and for evaluation, with one rule for matching labels.

Layouts: Stanford Dogs (``Images/n02085620-Chihuahua/``), the dog-app's split folders (``train/``,
``valid/``, ``test/`` of ``001.Affenpinscher/``), plain ``Golden_retriever/`` class folders, and for
evaluation folders named ``humans/`` or ``other/`` (given, or inside a breed tree) whose photos are all of that category.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from dogbreed.breeds import taxonomy
from dogbreed.breeds.taxonomy import DataError
from dogbreed.config import PHOTO_EXTENSIONS
from dogbreed.scan.listing import list_roots, normalise_roots

log = logging.getLogger("dogbreed.breeds")
# Folder names (any case) that hold people or neither in an evaluation, never a breed: dogbreed's own humans/ and
# other/, and the names people give them (the dog app's lfw/ is named by its source, so it is not among them).
CATEGORY_FOLDERS = {**dict.fromkeys(("humans", "human", "people"), "human"),
                    **dict.fromkeys(("other", "others", "neither"), "other")}
SPLIT_NAMES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}


def photos_under(root: str | Path, extensions: list[str] | None = None) -> list[str]:
    """Every photo file under root (recursively, by extension), sorted; names that are not UTF-8 included.

    Paths are ``os.fsdecode`` strings, so ``os.fsencode`` gives back the exact bytes of any name.
    """
    exts = tuple(e.lower() for e in (extensions or PHOTO_EXTENSIONS))
    listing = list_roots(normalise_roots([str(root)]).roots)
    listing = listing.filter(pc.is_null(listing.column("note_status")))
    paths = [os.fsdecode(raw) if raw is not None else text
             for text, raw in zip(listing.column("path").to_pylist(), listing.column("raw").to_pylist())]
    return sorted(p for p in paths if p.lower().endswith(exts))


def class_folders(root: str | Path, extensions: list[str] | None = None, min_classes: int = 2,
                  breeds_only: bool = False) -> dict[str, list[str]]:
    """{class folder name: sorted photo paths} of a class-per-folder tree (Stanford ``Images/`` is entered).

    Training needs two classes at least; an evaluation folder may hold one breed, or none (min_classes=0). With
    breeds_only (training), a humans/ or other/ folder (CATEGORY_FOLDERS) is left out with a warning: it holds
    people or neither, never a breed a model should answer with.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"labelled folder {root} does not exist")
    if (root / "Images").is_dir():
        _left_beside(root, {"Images"}, "Images/ (Stanford Dogs' layout)")
        root = root / "Images"
    classes: dict[str, list[str]] = {}
    for path in photos_under(root, extensions):
        rel = Path(path).relative_to(root.resolve())
        if len(rel.parts) >= 2 and not rel.parts[0].startswith("."):  # a file directly in root has no label
            classes.setdefault(rel.parts[0], []).append(path)
    categories = sorted(c for c in classes if breeds_only and category_folder(c))
    if categories:
        log.warning("%s: %s left out: a folder of people or of neither, not a breed", root,
                    ", ".join(f"{c}/" for c in categories))
        classes = {c: paths for c, paths in classes.items() if c not in categories}
    if len(classes) < min_classes:
        need = "at least two class folders" if min_classes == 2 else f"at least {min_classes} class folder(s)"
        raise DataError(f"{root} needs {need} with photos (found {len(classes)})")
    return dict(sorted(classes.items()))


def split_folders(root: str | Path) -> dict[str, Path] | None:
    """The dog-app layout's train/valid/test subfolders, or None when the folder is not split."""
    root = Path(root)
    found = {}
    for split, names in SPLIT_NAMES.items():
        present = [root / n for n in names if (root / n).is_dir()]
        if present:
            found[split] = present[0]
    if "train" not in found or "val" not in found:
        return None
    _left_beside(root, {p.name for p in found.values()}, "train/ and valid/ (the dog app's split)")
    return found


def _left_beside(root: Path, used: set[str], layout: str) -> None:
    """A tree whose layout folder is read alone: say which other folders beside it are left out (a breed folder
    there would otherwise train nothing, without a word)."""
    try:
        others = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in used and not e.name.startswith("."))
    except OSError:
        return
    if others:
        log.warning("%s holds %s: only %s read; the folders beside it are left out: %s%s", root, layout,
                    "that is" if len(used) == 1 else "those are", ", ".join(others[:5]), ", ..." if len(others) > 5 else "")


def class_index(class_names: list[str]):
    """The one label-matching rule: folder -> index of its class in class_names, or None.

    A folder matches a class when their readable breed names are equal ignoring case, '_', '-' and
    spacing, or when both are the same ImageNet class (by WordNet id or any ImageNet synonym).
    """
    by_key = {taxonomy.canonical(taxonomy.breed_from_folder(n)): i for i, n in enumerate(class_names)}
    by_imagenet: dict[int, int] = {}
    for i, n in enumerate(class_names):
        index = taxonomy.imagenet_index_for(n)
        if index is not None:
            by_imagenet.setdefault(index, i)

    def match(folder: str) -> int | None:
        hit = by_key.get(taxonomy.canonical(taxonomy.breed_from_folder(folder)))
        if hit is None:
            index = taxonomy.imagenet_index_for(folder)
            hit = by_imagenet.get(index) if index is not None else None
        return hit

    return match


def labelled_items(classes: dict[str, list[str]], class_names: list[str], source: str | Path,
                   unknown_ok: bool = False) -> list[tuple[str, int]]:
    """(path, class index) for every photo; a class folder that matches no class is an error naming it, or (with
    unknown_ok: a taxonomy chose the classes) left out with a warning."""
    match = class_index(class_names)
    index = {folder: match(folder) for folder in classes}
    unknown = sorted(f for f, i in index.items() if i is None)
    if unknown and not unknown_ok:
        raise DataError(f"{source} has class folders the model's classes lack: {', '.join(unknown[:5])}")
    if unknown:
        log.warning("%d class folders of %s are not among the classes and are left out: %s%s", len(unknown), source,
                    ", ".join(unknown[:5]), ", ..." if len(unknown) > 5 else "")
    return [(p, index[folder]) for folder, paths in classes.items() if index[folder] is not None for p in paths]


def category_folder(name: str) -> str | None:
    """'human' or 'other' for a folder an evaluation reads as that category (humans/, other/, neither/, ...), else None."""
    return CATEGORY_FOLDERS.get(name.strip().lower())


@dataclass
class LabelledPhotos:
    """Photos of labelled folders: category is dog / human / other; folder is the class folder of a dog."""

    paths: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    folder: list[str | None] = field(default_factory=list)

    def add(self, paths: list[str], category: str, folder: str | None = None) -> None:
        self.paths += paths
        self.category += [category] * len(paths)
        self.folder += [folder] * len(paths)


def evaluation_photos(folders: list[str], extensions: list[str] | None = None,
                      require_photos: bool = False) -> LabelledPhotos:
    """A folder named humans/ or other/ (see CATEGORY_FOLDERS) holds that category; any other folder holds one class
    folder per breed, where a humans/ or other/ folder is that category too, not a breed.

    With require_photos, each folder must give labelled photos: one that gives none is a DataError naming it.
    """
    out = LabelledPhotos()
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError(f"labelled folder {folder} does not exist" if not os.path.lexists(folder)
                            else f"labelled folder {folder} is not a folder")
        before = len(out.paths)
        category = category_folder(Path(folder.rstrip("/")).name)
        if category:
            out.add(photos_under(folder, extensions), category)
        else:
            for class_folder, paths in class_folders(folder, extensions, min_classes=0).items():
                inside = category_folder(class_folder)
                out.add(paths, inside or "dog", None if inside else class_folder)
        if require_photos and len(out.paths) == before:
            if not photos_under(folder, extensions):
                exts = list(extensions or PHOTO_EXTENSIONS)
                raise DataError(f"no photos under {folder}: none of its files has a photo's extension "
                                f"({', '.join(exts[:3])}{', ...' if len(exts) > 3 else ''})")
            raise DataError(f"{folder} holds photos but no breed folders: put each breed's photos in a folder named "
                            "for it, or name the folder humans/ or other/")
    return out
