"""A model measured on a taxonomy (`dogbreed evaluate FOLDER --classes FILE`): its top-1 and top-5 beside zero-shot's,
on photos of breeds ImageNet has and of breeds it lacks, and per breed.

Every photo is decoded once, through the scan's own decoder, and answered by both predictors the scan would run: the
model, and zero-shot (the default model's ImageNet head restricted to the taxonomy's breeds that ImageNet has; a
breed it lacks it can never name). Photos of breed folders the taxonomy does not name, and of humans/ or other/
folders, are left out, named in a warning and counted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from dogbreed.breeds.folders import class_index, evaluation_photos
from dogbreed.breeds.taxonomy import DataError, breed_from_folder, imagenet_index_for, read_classes
from dogbreed.config import ConfigError, ScanConfig
from dogbreed.evaluation.breeds import breed_metrics, breed_truth, counted, listed, ranked_classes
from dogbreed.table import schema
from dogbreed.table.store import utcnow
from dogbreed.vision.faces import resolved

log = logging.getLogger("dogbreed.evaluation")
GROUPS = ("all", "known", "new")  # every photo; photos of breeds ImageNet has; of breeds it lacks


def zero_shot_model(classes: list[str]):
    """The default model answering with the taxonomy's breeds that ImageNet has (by the synonym table)."""
    from dogbreed.vision.models import LoadedModel, ModelSpec, load_default

    base = load_default()
    mapped = [(breed_from_folder(c), i) for c in classes if (i := imagenet_index_for(c)) is not None]
    if not mapped:
        raise ConfigError("none of the classes is an ImageNet class: zero-shot cannot name any of them")
    spec = ModelSpec(backbone=base.spec.backbone, class_names=[n for n, _ in mapped], breed_source="imagenet",
                     imagenet_breed_indices=[i for _, i in mapped], preprocessing=base.spec.preprocessing,
                     training={"source": "zero-shot: ImageNet head restricted to the taxonomy"})
    return LoadedModel(base.net, spec, f"zero-shot@{base.model_id}")


def labelled(folders: list[str], classes: list[str], extensions: list[str],
             source: str = "the taxonomy") -> tuple[list[str], np.ndarray, int, int]:
    """(photo paths, taxonomy class of each, photos of breed folders the taxonomy does not name, photos of humans/ or
    other/ folders): both kinds are left out, each with a warning, and nothing to measure is a DataError."""
    photos = evaluation_photos(folders, extensions, require_photos=True)
    dog = np.array(photos.category) == "dog"
    not_breeds = int((~dog).sum())
    if not_breeds:
        log.warning("%s of humans/ or other/ folders left out: a taxonomy is measured on breed folders only",
                    counted(not_breeds, "photo"))
    if not dog.any():
        raise DataError(f"no breed folders under {', '.join(folders)}: a taxonomy is measured on folders of dog photos, "
                        "one folder per breed")
    truth = breed_truth([f for f, d in zip(photos.folder, dog) if d], classes, source, folders)
    paths = [p for p, d in zip(photos.paths, dog) if d]
    keep = truth >= 0
    return [p for p, k in zip(paths, keep) if k], truth[keep], int((~keep).sum()), not_breeds


def compare(folders: list[str], classes_file: str, cfg: ScanConfig) -> dict[str, Any]:
    """Top-1/top-5 of zero-shot and of cfg.model on the labelled photos, by group and per breed."""
    from dogbreed.vision.predictors import BreedPredictor, Decoder

    classes = read_classes(classes_file)
    names = [breed_from_folder(c) for c in classes]
    paths, truth, skipped, not_breeds = labelled(folders, classes, cfg.extensions, str(classes_file))
    cfg = cfg.model_copy(update={"top_k": max(cfg.top_k, 5), "face": resolved(cfg.face)})
    predictors = {"zero-shot": BreedPredictor(zero_shot_model(classes), top_k=5, count_dingo=cfg.count_dingo_as_dog),
                  "model": BreedPredictor.for_scan(cfg)}
    decoder = Decoder(predictors["model"].spec.preprocessing, cfg.face, cfg.photos)
    frames: dict[str, list] = {k: [] for k in predictors}
    try:
        for i in range(0, len(paths), cfg.inference.batch_size):
            batch = decoder(listed([os.path.abspath(p) for p in paths[i:i + cfg.inference.batch_size]]))
            for name, predictor in predictors.items():
                frames[name].append(schema.rows_to_table(predictor(batch), "evaluate", None, utcnow()).to_pandas())
    finally:
        decoder.close()
    import pandas as pd

    known = np.array([imagenet_index_for(classes[t]) is not None for t in truth])
    figures: dict[str, Any] = {"photos": len(paths), "left_out": skipped, "not_breeds": not_breeds, "classes": len(classes),
                               "model_id": predictors["model"].model_id, "groups": {}, "per_breed": []}
    per_breed, match = {}, class_index(classes)
    for name in predictors:
        df = pd.concat(frames[name], ignore_index=True)
        ranked = ranked_classes(df, names, match=match)  # match: a model of ImageNet's classes names them otherwise
        for group, mask in (("all", np.ones(len(truth), bool)), ("known", known), ("new", ~known)):
            if mask.any():
                m = breed_metrics(truth[mask], ranked[mask], names)
                figures["groups"].setdefault(group, {"n": int(mask.sum())})[name] = {"top1": m["top1"], "top5": m["top5"]}
        per_breed[name] = breed_metrics(truth, ranked, names)["per_breed"]
    for z, a in zip(per_breed["zero-shot"], per_breed["model"]):
        if a["n"]:
            figures["per_breed"].append({"breed": a["breed"], "n": a["n"], "in_imagenet": bool(
                imagenet_index_for(classes[names.index(a["breed"])]) is not None),
                "zero-shot": z["accuracy"], "model": a["accuracy"]})
    return figures


def format_comparison(f: dict[str, Any]) -> str:
    humans = f", {f['not_breeds']} of humans/other" if f.get("not_breeds") else ""
    lines = [f"{f['photos']} photos of {f['classes']} classes ({f['left_out']} photos of other breeds{humans} left out); "
             f"model {f['model_id']}", f"{'':<24}{'zero-shot':>22}{'model':>22}", f"{'':<24}{'top-1':>11}{'top-5':>11}"
             f"{'top-1':>11}{'top-5':>11}"]
    labels = {"all": "all photos", "known": "breeds ImageNet has", "new": "breeds ImageNet lacks"}
    for group in GROUPS:
        g = f["groups"].get(group)
        if g:
            z, m = g["zero-shot"], g["model"]
            lines.append(f"{labels[group] + ' (' + str(g['n']) + ')':<24}{z['top1']:>11.1%}{z['top5']:>11.1%}"
                         f"{m['top1']:>11.1%}{m['top5']:>11.1%}")
    lines.append("\nper breed (top-1): breed, photos, in ImageNet, zero-shot, model")
    for b in sorted(f["per_breed"], key=lambda b: b["breed"]):
        lines.append(f"  {b['breed']:<34}{b['n']:>4}  {'yes' if b['in_imagenet'] else 'no ':>3}  {b['zero-shot']:>6.0%}"
                     f"  {b['model']:>6.0%}")
    return "\n".join(lines)
