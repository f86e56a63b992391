"""In-process analysis of photos (predict) and assessment on labelled folders (evaluate, a model's test).

All of it runs the same Decoder and BreedPredictor the scan job runs, batch by batch, without Ray, the way
the dog-app assessed its detectors: dog-detector rate on dogs/humans/other, face rate on humans/dogs,
breed top-1/top-5 on breed folders. A trained model's test_top1 is measured here too, so it is the
accuracy the scan serves.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from dogbreed.breeds.folders import class_index, evaluation_photos
from dogbreed.breeds.taxonomy import DataError
from dogbreed.config import ScanConfig
from dogbreed.console import printable
from dogbreed.scan.listing import exact_bytes, text_path
from dogbreed.table import schema
from dogbreed.table.store import utcnow
from dogbreed.vision.batch import Batch, column
from dogbreed.vision.decision import settings_id
from dogbreed.vision.decode import is_uri
from dogbreed.vision.faces import resolved
from dogbreed.vision.predictors import BreedPredictor, Decoder

log = logging.getLogger("dogbreed.evaluation")


def analyze(paths: Iterable[str], cfg: ScanConfig, predictor: BreedPredictor | None = None) -> pd.DataFrame:
    """One result row (schema.SCHEMA) per path, computed in this process (photos decoded in a sandboxed child)."""
    batch_size = cfg.inference.batch_size
    cfg = cfg.model_copy(update={"face": resolved(cfg.face)})  # decided once, as the scan decides it
    predictor = predictor or BreedPredictor.for_scan(cfg)
    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.photos)
    settings = settings_id(cfg)
    paths = [p if is_uri(p) else os.path.abspath(p) for p in paths]  # an s3:// object stays one
    frames = []
    try:
        for i in range(0, len(paths), batch_size):
            rows = predictor(decoder(listed(paths[i:i + batch_size])))
            frames.append(schema.rows_to_table(rows, "predict", settings, utcnow()).to_pandas())
    finally:
        decoder.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def listed(paths: list[str]) -> Batch:
    """A LISTED batch (dogbreed.vision.batch) for local files given by path, as the scan's plan would list them."""
    stats = []
    for p in paths:
        try:
            stats.append(os.stat(p))
        except OSError:
            stats.append(None)
    raw = [os.fsencode(p) for p in paths]
    return {"path": column([text_path(r) for r in raw], "O"), "raw": column([exact_bytes(r) for r in raw], "O"),
            "size_bytes": column([s.st_size if s else 0 for s in stats], "i8"),
            "mtime_ns": column([s.st_mtime_ns if s else 0 for s in stats], "i8"),
            "ctime_ns": column([s.st_ctime_ns if s else 0 for s in stats], "i8")}


def ranked_classes(df: pd.DataFrame, class_names: list[str], k: int = 5,
                   match: Callable[[str], int | None] | None = None) -> np.ndarray:
    """(n, k) class indices of each row's top-k breeds, best first; -1 where a row has no breeds (an error).

    A breed not spelled as in class_names is looked up with match (folders.class_index), where the predictor's classes
    are another taxonomy's (ImageNet's 'Brittany spaniel' is the dog app's 'Brittany'); -1 if it is none of them.
    """
    index = {name: i for i, name in enumerate(class_names)}
    out = np.full((len(df), k), -1, dtype=np.int64)
    for r, breeds in enumerate(df["breeds"]):
        if breeds is not None:
            for c, b in enumerate(list(breeds)[:k]):
                name = b["breed"]
                if name not in index and match is not None:
                    index[name] = -1 if (i := match(name)) is None else i
                out[r, c] = index.get(name, -1)
    return out


def breed_metrics(truth: np.ndarray, ranked: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, per-breed accuracy and the confusion matrix (rows = truth) of ranked predictions.

    A photo that could not be read (ranked -1) or whose folder matches no class (truth -1) counts as wrong.
    """
    truth = np.asarray(truth, dtype=np.int64)
    n_cls = len(class_names)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    known = (truth >= 0) & (ranked[:, 0] >= 0)
    np.add.at(confusion, (truth[known], ranked[known, 0]), 1)
    support = np.bincount(truth[truth >= 0], minlength=n_cls)
    per_breed = [{"breed": name, "n": int(support[i]),
                  "accuracy": float(confusion[i, i] / support[i]) if support[i] else float("nan")}
                 for i, name in enumerate(class_names)]
    hit = (ranked == truth[:, None]) & (truth[:, None] >= 0)
    return {"n": int(len(truth)), "top1": float(hit[:, 0].mean()) if len(truth) else float("nan"),
            "top5": float(hit.any(1).mean()) if len(truth) else float("nan"),
            "unreadable": int((ranked[:, 0] < 0).sum()), "per_breed": per_breed, "confusion": confusion.tolist()}


def classify(paths: list[str], truth: list[int], cfg: ScanConfig) -> dict[str, Any]:
    """Breed metrics of cfg.model on labelled photos, through the scan's own decoder and predictor."""
    cfg = cfg.model_copy(update={"top_k": max(cfg.top_k, 5)})
    predictor = BreedPredictor.for_scan(cfg)
    df = analyze(paths, cfg, predictor)
    names = predictor.spec.class_names
    return breed_metrics(np.asarray(truth), ranked_classes(df, names), names)


def few(names: list[str], shown: int = 3) -> str:
    """'A, B, C and 4 more': the first few of some names for a one-line message (an odd name shown escaped)."""
    text = [printable(n) for n in names[:shown]]
    return ", ".join(text) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def breed_truth(folders: list[str | None], class_names: list[str], source: str, where: list[str],
                required: bool = True) -> np.ndarray:
    """The class index of each dog photo's breed folder; -1 for a folder that names none of class_names (left out
    of breed accuracy, with a warning naming them). No folder naming any class is a DataError where the breeds are
    what is measured (`required`: a taxonomy); otherwise (detector rates too) the same warning, and no accuracy."""
    match = class_index(class_names)
    index = {f: match(f) for f in sorted(set(folders))}
    unknown = [f for f, i in index.items() if i is None]
    if required and unknown and len(unknown) == len(index):
        raise DataError(f"no breed folder under {', '.join(where)} is a class of {source} ({counted(len(unknown), 'folder')}: "
                        f"{few(unknown)}): name each breed folder for one of its classes")
    truth = np.array([-1 if index[f] is None else index[f] for f in folders], dtype=np.int64)
    if unknown:
        n = int((truth < 0).sum())
        what = "that is not a class" if len(unknown) == 1 else "that are not classes"
        log.warning("%s in %s %s of %s %s left out of the breed accuracy: %s", counted(n, "photo"),
                    counted(len(unknown), "breed folder"), what, source, "is" if n == 1 else "are", few(unknown))
    return truth


def assess(folders: list[str], cfg: ScanConfig) -> dict[str, float | int]:
    """Detector rates and breed accuracy over labelled folders, as a flat dict of figures (`dogbreed evaluate`).

    Every photo counts in the detector rates of its category; breed accuracy is over the photos of breed folders that
    name one of the model's classes (breed_photos); photos of other breed folders are left out (breed_left_out).
    """
    photos = evaluation_photos(folders, cfg.extensions, require_photos=True)
    cfg = cfg.model_copy(update={"top_k": max(cfg.top_k, 5)})
    predictor = BreedPredictor.for_scan(cfg)
    names = predictor.spec.class_names
    cat = np.array(photos.category)
    dogs = cat == "dog"
    truth = breed_truth([f for f, d in zip(photos.folder, dogs) if d], names, f"the model {predictor.model_id}",
                        folders, required=False) if dogs.any() else np.zeros(0, dtype=np.int64)
    df = analyze(photos.paths, cfg, predictor)
    is_dog = df["status"].isin(["dog", "dog_and_human"]).to_numpy()
    has_face = df["face_count"].fillna(0).to_numpy() > 0
    report: dict[str, float | int] = {"photos": len(df), "errors": int((df["status"] == "error").sum())}
    for c in ("dog", "human", "other"):
        m = cat == c
        report[f"{c}_photos"] = int(m.sum())
        if m.any():
            report[f"dog_detected_in_{c}"] = float(is_dog[m].mean())
            report[f"face_detected_in_{c}"] = float(has_face[m].mean())
    if dogs.any():
        scored = truth >= 0
        report["breed_photos"], report["breed_left_out"] = int(scored.sum()), int((~scored).sum())
        if scored.any():  # no folder naming a breed of the model: the detector rates stand, no breed accuracy
            ranked = ranked_classes(df[dogs].reset_index(drop=True), names)
            figures = breed_metrics(truth[scored], ranked[scored], names)
            report["breed_top1"], report["breed_top5"] = figures["top1"], figures["top5"]
    expected = np.where(cat == "dog", "dog", np.where(cat == "human", "human", "neither"))
    report["status_correct"] = float((df["status"].to_numpy() == expected).mean())
    return report
