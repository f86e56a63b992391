"""In-process analysis of a few photos (predict) and assessment on labelled folders (evaluate).

Both run the same Decoder and BreedPredictor the scan job runs, batch by batch, without Ray, the way
the dog-app assessed its detectors: dog-detector rate on dogs/humans/other, face rate on humans/dogs,
breed top-1/top-5 on breed folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from dogbreed import labels, results
from dogbreed.config import ConfigError, ScanConfig, settings_id
from dogbreed.listing import is_utf8, list_roots, normalise_roots, text_path
from dogbreed.predictors import BreedPredictor, Decoder
from dogbreed.store import utcnow

HUMANS, OTHER = "humans", "other"


def analyze(paths: Iterable[str], cfg: ScanConfig, predictor: BreedPredictor | None = None,
            batch_size: int = 32) -> pd.DataFrame:
    """One result row (results.SCHEMA) per path, computed in this process (photos decoded in a sandboxed child)."""
    predictor = predictor or BreedPredictor(cfg.model, cfg.top_k, cfg.dog_threshold, cfg.count_dingo_as_dog)
    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.decode)
    settings = settings_id(cfg)
    paths = [os.path.abspath(p) for p in paths]
    frames = []
    try:
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            stats = [_stat(p) for p in chunk]
            batch = {
                "path": np.array([text_path(os.fsencode(p)) for p in chunk], dtype=object),
                "raw": np.array([None if is_utf8(os.fsencode(p)) else os.fsencode(p) for p in chunk], dtype=object),
                "size_bytes": np.array([s.st_size if s else 0 for s in stats], dtype=np.int64),
                "mtime_ns": np.array([s.st_mtime_ns if s else 0 for s in stats], dtype=np.int64),
                "ctime_ns": np.array([s.st_ctime_ns if s else 0 for s in stats], dtype=np.int64),
            }
            frames.append(results.rows_to_table(predictor(decoder(batch)), "predict", settings, utcnow()).to_pandas())
    finally:
        decoder.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


@dataclass
class LabelledPhotos:
    """Photos of a labelled folder: category is dog / human / other; breed for dogs."""

    paths: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    breed: list[str | None] = field(default_factory=list)


def collect(folders: list[str]) -> LabelledPhotos:
    """A folder named humans/ or other/ holds that category; any other folder holds one subfolder per breed."""
    out = LabelledPhotos()
    for folder in folders:
        name = Path(folder.rstrip("/")).name.lower()
        listing = list_roots(normalise_roots([folder]).roots)
        listing = listing.filter(pc.is_null(listing.column("note_status")))
        for path in listing.column("path").to_pylist():
            if name in (HUMANS, OTHER):
                out.paths.append(path)
                out.category.append("human" if name == HUMANS else "other")
                out.breed.append(None)
                continue
            rel = Path(path).relative_to(Path(folder).resolve())
            if len(rel.parts) < 2:
                continue  # files directly in a class-folder root have no breed label
            out.paths.append(path)
            out.category.append("dog")
            out.breed.append(rel.parts[0])
    return out


def _breed_hits(df: pd.DataFrame, breeds: list[str | None], k: int) -> np.ndarray:
    names = labels.imagenet_names()
    hits = []
    for row_breeds, folder in zip(df["breeds"], breeds):
        if folder is None or row_breeds is None:
            hits.append(False)
            continue
        idx = labels.imagenet_index_for(folder)
        wanted = {labels.canonical(labels.breed_from_folder(folder))}
        if idx is not None:
            wanted.add(labels.canonical(names[idx]))
        hits.append(any(labels.canonical(b["breed"]) in wanted for b in list(row_breeds)[:k]))
    return np.array(hits, dtype=bool)


def evaluate(folders: list[str], cfg: ScanConfig) -> dict[str, float | int]:
    """Detector rates and breed accuracy over labelled folders, as a flat dict of figures."""
    photos = collect(folders)
    if not photos.paths:
        raise ConfigError(f"no labelled photos found in {', '.join(folders)}")
    cfg = cfg.model_copy(update={"top_k": max(cfg.top_k, 5)})
    df = analyze(photos.paths, cfg)
    cat = np.array(photos.category)
    is_dog = df["status"].isin(["dog", "dog_and_human"]).to_numpy()
    has_face = df["face_count"].fillna(0).to_numpy() > 0
    report: dict[str, float | int] = {"photos": len(df), "errors": int((df["status"] == "error").sum())}
    for c in ("dog", "human", "other"):
        m = cat == c
        report[f"{c}_photos"] = int(m.sum())
        if m.any():
            report[f"dog_detected_in_{c}"] = float(is_dog[m].mean())
            report[f"face_detected_in_{c}"] = float(has_face[m].mean())
    dogs = cat == "dog"
    if dogs.any():
        sub = df[dogs].reset_index(drop=True)
        b = [x for x, d in zip(photos.breed, dogs) if d]
        report["breed_top1"] = float(_breed_hits(sub, b, 1).mean())
        report["breed_top5"] = float(_breed_hits(sub, b, 5).mean())
    expected = np.where(cat == "dog", "dog", np.where(cat == "human", "human", "neither"))
    report["status_correct"] = float((df["status"].to_numpy() == expected).mean())
    return report
