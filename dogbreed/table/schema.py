"""The output's row schema (one constant) and the functions that build tables of exactly that schema.

One row per file found, documented column by column in README.md ("Reading the results").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

BREED = pa.struct([("breed", pa.string()), ("prob", pa.float32())])
# score: the detector's confidence 0..1 (face.detector yunet); null for haar, which has none, and in older runs.
BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()), ("score", pa.float32())])
BOX_FIELDS = tuple(f.name for f in BOX)
UTC_US = pa.timestamp("us", tz="UTC")

# One row per file found. Documented column by column in README.md ("Output schema").
SCHEMA = pa.schema([
    ("path", pa.string()),              # absolute local path or URI; bytes that are not UTF-8 written as \xNN
    ("path_bytes", pa.binary()),        # the exact bytes of the path when `path` is not them, else null
    ("size_bytes", pa.int64()),         # file size when listed
    ("mtime", UTC_US),                  # modification time when listed
    ("ctime", UTC_US),                  # inode change time when listed (null on object stores)
    ("fingerprint", pa.string()),       # BLAKE2b of size + first and last 64 KiB: finds moved files, restored mtimes
    ("status", pa.string()),            # dog | human | dog_and_human | neither | error | skipped | deleted
    ("error", pa.string()),             # one-line reason when status is error/skipped, else null
    ("error_kind", pa.string()),        # errors: permanent (not retried on an unchanged file) or transient
    ("width", pa.int32()),              # oriented (EXIF-applied) full-size width; null if not decoded
    ("height", pa.int32()),
    ("dog_score", pa.float32()),        # probability mass on ImageNet dog classes, 0..1
    ("breed", pa.string()),             # top-1 breed (for humans: the breed they most resemble)
    ("breed_prob", pa.float32()),       # its probability among breeds
    ("breeds", pa.list_(BREED)),        # top-k breeds with probabilities, best first
    ("face_count", pa.int32()),
    ("faces", pa.list_(BOX)),           # face boxes in full-size oriented pixel coordinates, with a score
    ("model_id", pa.string()),          # content hash of the model that produced the row
    ("settings_id", pa.string()),       # hash of the result-changing settings (thresholds, dingo rule, faces, top_k)
    ("run_id", pa.string()),
    ("processed_at", UTC_US),
    ("decode_node", pa.string()),       # Ray node id of the decode task (proof of distribution)
    ("infer_node", pa.string()),        # Ray node id of the inference actor
    ("embedding", pa.list_(pa.float32())),  # the backbone's pooled features of the model crop (float16-rounded);
                                        # null where not decoded and in rows of older runs
    ("embedding_id", pa.string()),      # the network that made them (backbone@hash): vectors compare only within one
])



def _with_pandas_dtypes(schema: pa.Schema) -> pa.Schema:
    """Attach pandas metadata so integer columns read back as nullable Int32/Int64 in every file.

    Without it, pandas turns an int column into float64 only in files that happen to hold a null (an error
    row), so dtypes would drift between runs.
    """
    nullable = {pa.int32(): "Int32", pa.int64(): "Int64"}  # binary columns stay object (bytes or None)
    empty = pd.DataFrame({f.name: pd.Series([], dtype=nullable.get(f.type, "object")) for f in schema})
    return schema.with_metadata(pa.Schema.from_pandas(empty, preserve_index=False).metadata)


SCHEMA = _with_pandas_dtypes(SCHEMA)

# What a plain read leaves out: ~2 KB per decoded row, read only by `similar`, `relabel` and readers that ask.
VECTOR_COLUMNS = ("embedding",)
ROW_COLUMNS = [name for name in SCHEMA.names if name not in VECTOR_COLUMNS]

OK_STATUSES = ("dog", "human", "dog_and_human", "neither")
STATUSES = OK_STATUSES + ("error", "skipped", "deleted")
# What `dogbreed latest` prints as a table, and what `dogbreed predict --json` prints per photo.
SUMMARY_COLUMNS = ["path", "status", "breed", "breed_prob", "dog_score", "face_count"]
PREDICT_COLUMNS = ["path", "status", "error", "dog_score", "breed", "breed_prob", "face_count"]

RUNS_DIR = "runs"  # the layout before the Delta table (dogbreed migrate converts it)
MANIFEST = "_manifest.json"


def us_from_ns(ns) -> pa.Array:
    """Nanoseconds (a file's mtime or ctime) to whole microseconds, rounded down (also before 1970), nulls kept.

    One rounding for every writer and for the planner: a time rounded two ways would look changed every night.
    """
    arr = ns.combine_chunks() if isinstance(ns, pa.ChunkedArray) else pa.array(ns, pa.int64(), from_pandas=True)
    values = np.floor_divide(arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), 1000)
    return pa.array(values, pa.int64(), mask=arr.is_null().to_numpy(zero_copy_only=False))


def timestamps(ns) -> pa.Array:
    """us_from_ns as the schema's UTC timestamps."""
    return us_from_ns(ns).cast(UTC_US)


def embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(n, d) float features -> the embedding column: float16-rounded float32 lists, null where not valid.

    float16 keeps a relabel's answers those of a scan (on real photos every status and top-1 agreed) in half the
    bytes; Delta Lake has no float16 type, so the values are stored as float32 (zstd compresses the spare bits).
    """
    valid = np.asarray(valid, dtype=bool)
    x = np.asarray(vectors, dtype=np.float32)[valid].astype(np.float16).astype(np.float32)
    d = x.shape[1] if x.ndim == 2 and len(x) else 0
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(np.where(valid, d, 0), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.ravel(), pa.float32()), mask=pa.array(~valid))


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def to_table(columns: dict[str, Any]) -> pa.Table:
    """Build a table with exactly SCHEMA from python/numpy columns; missing columns become nulls."""
    n = len(columns["path"])
    arrays = []
    for f in SCHEMA:
        v = columns.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
            continue
        if isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v.cast(f.type))
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind in "OU":
            v = v.tolist()
        arrays.append(pa.array(v, type=f.type, from_pandas=True))
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                schema=SCHEMA)


def rows_to_table(rows: dict[str, Any], run_id: str, settings_id: str | None, processed_at: Any) -> pa.Table:
    """Predictor output columns (numpy, one entry per photo) -> a table with exactly SCHEMA."""
    n = len(rows["path"])
    ok = np.array([s in OK_STATUSES for s in rows["status"]], dtype=bool)
    cols = dict(rows)
    raw = rows.get("raw")  # Arrow's trip between stages may turn a null into b'': a path is never empty, so b'' is null
    if raw is not None:
        raw = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) and len(v) else None for v in raw]
    cols["path_bytes"] = raw
    cols["mtime"] = timestamps(rows["mtime_ns"])
    if "ctime_ns" in rows:
        cols["ctime"] = timestamps(rows["ctime_ns"])
    for name in ("width", "height", "face_count"):
        cols[name] = [int(v) if good else None for v, good in zip(rows[name], ok)]
    cols["faces"] = [[dict(zip(BOX_FIELDS, b)) for b in json.loads(f)] if good else None for f, good in zip(rows["faces"], ok)]
    cols["dog_score"] = [float(v) if good else None for v, good in zip(rows["dog_score"], ok)]
    cols["breed_prob"] = [float(v) if good else None for v, good in zip(rows["breed_prob"], ok)]
    cols["breeds"] = [list(b) if good else None for b, good in zip(rows["breeds"], ok)]
    if "embedding" in rows:
        cols["embedding"] = embedding_array(rows["embedding"], ok)
    cols["run_id"] = [run_id] * n
    cols["settings_id"] = [settings_id] * n
    cols["processed_at"] = pa.array([processed_at] * n, type=UTC_US)
    return to_table(cols)


# Columns with few distinct values: read as dictionaries, a million rows of them cost a few MiB, not tens.
REPEATED = ("status", "error", "error_kind", "model_id", "settings_id", "run_id")
