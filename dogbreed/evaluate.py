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

from dogbreed import labels
from dogbreed.config import ScanConfig
from dogbreed.images import FileEntry, list_files
from dogbreed.predictors import BreedPredictor, Decoder
from dogbreed.scan import rows_to_table

HUMANS, OTHER = "humans", "other"


def analyze(paths: Iterable[str], cfg: ScanConfig, predictor: BreedPredictor | None = None,
            batch_size: int = 32) -> pd.DataFrame:
    """One result row (results.SCHEMA) per path, computed in this process."""
    predictor = predictor or BreedPredictor(cfg.model, cfg.top_k, cfg.dog_threshold, cfg.count_dingo_as_dog)
    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.decode, extensions=None)
    entries = []
    for p in paths:
        try:
            st = os.stat(p)
            entries.append(FileEntry(os.path.abspath(p), st.st_size, st.st_mtime_ns))
        except OSError as e:
            entries.append(FileEntry(os.path.abspath(p), 0, 0, f"cannot stat: {e.strerror}"))
    frames = []
    for i in range(0, len(entries), batch_size):
        chunk = entries[i:i + batch_size]
        batch = {
            "path": np.array([e.path for e in chunk], dtype=object),
            "size_bytes": np.array([e.size for e in chunk], dtype=np.int64),
            "mtime_ns": np.array([e.mtime_ns for e in chunk], dtype=np.int64),
            "listed_error": np.array([e.error for e in chunk], dtype=object),
        }
        frames.append(rows_to_table(predictor(decoder(batch)), run_id="predict").to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
        for e in list_files(folder):
            if e.error:
                continue
            if name in (HUMANS, OTHER):
                out.paths.append(e.path)
                out.category.append("human" if name == HUMANS else "other")
                out.breed.append(None)
                continue
            rel = Path(e.path).relative_to(Path(folder).absolute())
            if len(rel.parts) < 2:
                continue  # files directly in a class-folder root have no breed label
            out.paths.append(e.path)
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
        raise ValueError(f"no labelled photos found in {', '.join(folders)}")
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
