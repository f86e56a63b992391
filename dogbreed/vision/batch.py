"""The batches passed between the scan's stages (and in evaluation): one schema constant per stage boundary.

Ray Data hands stages ``dict[str, np.ndarray]`` batches. Their columns are declared here once, with their dtypes:

- LISTED: what the plan knows of each file (path, raw path bytes, size, times, the row's index in the run);
- DECODED: LISTED plus what the decode stage found (status, sizes, faces, fingerprint) and the model crop;
- SHIPPED: DECODED without the crop, plus compressed JPEG bytes that the inference actor decodes on its device.

:func:`decoded` builds a DECODED batch from per-photo results; :func:`clean` undoes what a trip through Arrow does to
nullable columns (a null string arrives as NaN, a null binary as b''), so every stage reads the same types.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

Batch = dict[str, np.ndarray]

# name -> numpy dtype ("O": Python objects, None for null)
LISTED: dict[str, str] = {
    "path": "O",        # the path's text form (non-UTF-8 bytes escaped as \xNN)
    "raw": "O",         # the path's exact bytes when the text form is not them (scan.listing.exact_bytes), else None
    "size_bytes": "i8",
    "mtime_ns": "i8",
    "ctime_ns": "i8",
}
DECODE_RESULT: dict[str, str] = {
    "ok": "?",          # decoded: the network runs on it
    "status": "O",      # None while undecided, "error" for a photo that could not be used
    "error": "O",       # its one-line reason
    "error_kind": "O",  # permanent | transient
    "fingerprint": "O",
    "width": "i4",      # full size after EXIF orientation; -1 when not decoded
    "height": "i4",
    "face_count": "i4",
    "faces": "O",       # JSON list of [x, y, w, h, score] in full-size pixels
    "decode_node": "O",  # Ray node of the decode task
}
IMAGE = "image"  # uint8 (N, S, S, 3): the model crops (zeros where not decoded)
DECODED: dict[str, str] = {**LISTED, **DECODE_RESULT, IMAGE: "u1"}
PAYLOAD, KIND, ORIENTATION = "payload", "payload_kind", "orientation"
SHIPPED: dict[str, str] = {**LISTED, **DECODE_RESULT, PAYLOAD: "O", KIND: "O", ORIENTATION: "i1"}
JPEG, CROP = "jpeg", "crop"  # payload kinds: compressed bytes to decode on the device; a crop the CPU already made


def column(values: Iterable[Any], dtype: str) -> np.ndarray:
    """A column of `dtype`; object columns are filled element by element (equal-length bytes stay bytes)."""
    if dtype != "O":
        return np.asarray(list(values), dtype=dtype)
    items = list(values)
    out = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        out[i] = v
    return out


def _null(v: Any) -> Any:
    return None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v


def clean(batch: Batch) -> Batch:
    """The batch with its nullable object columns as Python None where Arrow made NaN (strings) or b'' (raw path
    bytes: a path is never empty), and its declared columns fresh and writable, in their declared dtypes."""
    out = dict(batch)
    for name, dtype in {**DECODED, **SHIPPED}.items():
        if name not in out or name == IMAGE:
            continue
        if dtype == "O":
            values = [_null(v) for v in out[name]]
            if name == "raw":
                values = [bytes(v) if v else None for v in values]
            out[name] = column(values, "O")
        else:
            out[name] = np.array(out[name], dtype=dtype)  # a writable copy: Ray hands stages read-only arrays
    return out


def raw_paths(batch: Batch) -> list[bytes]:
    """The exact bytes to open for each row: the raw path where the text form is not them, else the text path."""
    raws = batch.get("raw", [None] * len(batch["path"]))
    return [bytes(r) if r else os.fsencode(str(p)) for p, r in zip(batch["path"], raws)]


def decoded(batch: Batch, results: Sequence[Any], input_size: int, node: str | None = None) -> Batch:
    """A DECODED batch: the incoming columns plus each photo's result (vision.worker.PhotoResult)."""
    n = len(results)
    images = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
    for i, r in enumerate(results):
        if r.image is not None:
            images[i] = r.image
    out = dict(batch)
    out.update({
        "ok": column((r.ok for r in results), "?"),
        "status": column((None if r.ok else "error" for r in results), "O"),
        "error": column((r.error for r in results), "O"),
        "error_kind": column((r.error_kind for r in results), "O"),
        "fingerprint": column((r.fingerprint for r in results), "O"),
        "width": column((r.width for r in results), "i4"),
        "height": column((r.height for r in results), "i4"),
        "face_count": column((len(r.faces) for r in results), "i4"),
        "faces": column((json.dumps(r.faces) for r in results), "O"),
        "decode_node": column([node] * n, "O"),
        IMAGE: images,
    })
    return out
