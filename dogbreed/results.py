"""The output schema (one constant) and what analysts call to read a scan's output.

An output (a local folder or an s3:// / gs:// URI) is a Delta Lake table of result rows::

    OUT/_delta_log/                    the table's log: one commit per run, its manifest as commit metadata
    OUT/data/<run_id>/part-*.parquet   rows written by that run (readers see them once its commit exists)
    OUT/_dogbreed/lock/                the lock of the running scan

The table's current version holds every committed row (the history); :func:`latest` gives the current
answer per photo. Read it through these functions or `deltalake`, never as a plain Parquet folder.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

BREED = pa.struct([("breed", pa.string()), ("prob", pa.float32())])
# score: the detector's confidence 0..1 (face.detector yunet); null for haar, which has none, and in older runs.
BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()), ("score", pa.float32())])
BOX_FIELDS = tuple(f.name for f in BOX)
UTC_US = pa.timestamp("us", tz="UTC")

# One row per file found. Documented column by column in README.md ("Output schema").
SCHEMA = pa.schema([
    ("path", pa.string()),              # absolute local path or URI; bytes that are not UTF-8 written as \xNN
    ("path_bytes", pa.binary()),        # the exact bytes of the path when it is not valid UTF-8, else null
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

OK_STATUSES = ("dog", "human", "dog_and_human", "neither")
STATUSES = OK_STATUSES + ("error", "skipped", "deleted")
# What `dogbreed latest` prints as a table, and what `dogbreed predict --json` prints per photo.
SUMMARY_COLUMNS = ["path", "status", "breed", "breed_prob", "dog_score", "face_count"]
PREDICT_COLUMNS = ["path", "status", "error", "dog_score", "breed", "breed_prob", "face_count"]

RUNS_DIR = "runs"  # the layout before the Delta table (dogbreed migrate converts it)
MANIFEST = "_manifest.json"


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
    cols["path_bytes"] = rows.get("raw")
    cols["mtime"] = pa.array(np.asarray(rows["mtime_ns"], dtype=np.int64) // 1000, type=pa.int64()).cast(UTC_US)
    if "ctime_ns" in rows:
        cols["ctime"] = pc.cast(pc.divide(pa.array(rows["ctime_ns"], pa.int64(), from_pandas=True), 1000),
                                pa.int64()).cast(UTC_US)
    for name in ("width", "height", "face_count"):
        cols[name] = [int(v) if good else None for v, good in zip(rows[name], ok)]
    cols["faces"] = [[dict(zip(BOX_FIELDS, b)) for b in json.loads(f)] if good else None for f, good in zip(rows["faces"], ok)]
    cols["dog_score"] = [float(v) if good else None for v, good in zip(rows["dog_score"], ok)]
    cols["breed_prob"] = [float(v) if good else None for v, good in zip(rows["breed_prob"], ok)]
    cols["breeds"] = [list(b) if good else None for b, good in zip(rows["breeds"], ok)]
    cols["run_id"] = [run_id] * n
    cols["settings_id"] = [settings_id] * n
    cols["processed_at"] = pa.array([processed_at] * n, type=UTC_US)
    return to_table(cols)


def manifests(out: Any, table: Any = None) -> list[dict[str, Any]]:
    """Manifest of every committed run still in the table's log, oldest first (run_id, model_id, counts, ...)."""
    from dogbreed.store import committed_runs, locate, open_table

    return committed_runs(table if table is not None else open_table(locate(out)))


# Columns with few distinct values: read as dictionaries, a million rows of them cost a few MiB, not tens.
REPEATED = ("status", "error", "error_kind", "model_id", "settings_id", "run_id")


def _dataset(out: Any, dictionaries: tuple[str, ...] = (), table: Any = None) -> pads.Dataset | None:
    """The current version's files as one pyarrow dataset of exactly SCHEMA (None before the first commit)."""
    from dogbreed.store import locate, open_table

    loc = locate(out)
    table = table if table is not None else open_table(loc)
    if table is None:
        return None
    files = [loc.path(p) for p in table.get_add_actions(flatten=True).column("path").to_pylist()]
    if not files:
        return None
    schema, fmt = SCHEMA, pads.ParquetFileFormat()
    if dictionaries:
        for name in dictionaries:
            i = schema.get_field_index(name)
            schema = schema.set(i, schema.field(i).with_type(pa.dictionary(pa.int32(), pa.string())))
        fmt = pads.ParquetFileFormat(read_options={"dictionary_columns": list(dictionaries)})
    return pads.dataset(sorted(files), schema=schema, format=fmt, filesystem=loc.fs)


def rows_of(out: Any, paths: pa.ChunkedArray, run_ids: pa.ChunkedArray, table: Any = None) -> pa.Table:
    """The committed rows written for (path, run_id) pairs, in the pairs' order (one per pair that exists)."""
    ds = _dataset(out, table=table)
    if ds is None:
        return empty_table()
    found = ds.to_table(filter=pc.field("path").isin(pc.unique(paths)))
    # Acero joins carry no list or struct columns: join the keys with row numbers, then take.
    mine = pa.table({"path": found.column("path"), "run_id": found.column("run_id"),
                     "_j": pa.array(np.arange(found.num_rows, dtype=np.int64))})
    wanted = pa.table({"path": paths, "run_id": run_ids, "_o": pa.array(np.arange(len(paths), dtype=np.int64))})
    pairs = wanted.join(mine, keys=["path", "run_id"], join_type="inner").sort_by("_o")
    order = pairs.column("_j").to_numpy()
    if len(order) > 1:  # a pair written twice in one run (never, but never two rows for one pair either)
        keep = np.ones(len(order), dtype=bool)
        o = pairs.column("_o").to_numpy()
        keep[1:] = o[1:] != o[:-1]
        order = order[keep]
    return found.take(pa.array(order, pa.int64()))


def read_all(out: Any, columns: list[str] | None = None) -> pd.DataFrame:
    """Every row of every committed run (history), as pandas (nullable Int32/Int64 integers in every run)."""
    ds = _dataset(out)
    table = ds.to_table(columns=columns) if ds is not None else empty_table().select(columns or SCHEMA.names)
    return table.to_pandas()


def latest_table(out: Any, columns: list[str] | None = None, model_id: str | None = None,
                 compact: bool = False, table: Any = None) -> pa.Table:
    """Latest row per path (optionally only rows of one model), deleted files included; arrow for speed.

    With `compact`, the repeated string columns come back dictionary-encoded (the planner's way of reading
    years of history in little memory).
    """
    ds = _dataset(out, REPEATED if compact else (), table=table)
    cols = list(dict.fromkeys(["path", "processed_at", "run_id"] + (columns or SCHEMA.names)))
    if ds is None:
        return empty_table().select(cols)
    filt = pc.field("model_id") == model_id if model_id else None
    if model_id:  # a deletion is recorded without a model: keep it so vanished files drop out
        filt = filt | (pc.field("status") == "deleted")
    table = ds.to_table(columns=cols, filter=filt)
    if table.num_rows < 2:
        return table
    # A path's latest row is the one of its newest run (run ids sort by start time, runs never overlap, and a
    # run writes a path once). Compaction reorders rows across files, so the run id decides, not the position:
    # two hash passes, without sorting or copying the whole history.
    paths = pc.dictionary_encode(table.column("path")).combine_chunks()
    runs = table.column("run_id")
    runs = (runs if pa.types.is_dictionary(runs.type) else pc.dictionary_encode(runs)).combine_chunks()
    order = pc.rank(runs.dictionary.cast(pa.string()), sort_keys="ascending", tiebreaker="dense").to_numpy()
    rank = order[runs.indices.to_numpy(zero_copy_only=False)]
    codes = paths.indices.to_numpy(zero_copy_only=False)
    best = np.zeros(len(paths.dictionary), dtype=order.dtype)
    np.maximum.at(best, codes, rank)
    return table.filter(pa.array(rank == best[codes]))


def latest(out: Any, model_id: str | None = None) -> pd.DataFrame:
    """The current answer per existing photo: its latest row (for `model_id` if given), deleted files left out."""
    table = latest_table(out, model_id=model_id)
    if table.num_rows:
        table = table.take(pc.sort_indices(table.column("path")))
    mask = pc.not_equal(table.column("status"), "deleted")
    return table.filter(mask).select(SCHEMA.names).to_pandas().reset_index(drop=True)
