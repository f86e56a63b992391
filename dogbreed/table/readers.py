"""What analysts (and `latest`, `report`, the planner) call to read a scan's output.

An output (a local folder or an s3:// / gs:// URI) is a Delta Lake table of result rows::

    OUT/_delta_log/                    the table's log: one commit per run, its manifest as commit metadata
    OUT/data/<run_id>/part-*.parquet   rows written by that run (readers see them once its commit exists)
    OUT/_dogbreed/                     dogbreed's own: the table's marker, the lock, records of runs in progress

The table's current version holds every committed row (the history); :func:`latest` gives the current
answer per photo. Read it through these functions or `deltalake`, never as a plain Parquet folder.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from dogbreed.table.deltalog import DamagedTable, check_hint, check_next
from dogbreed.table.health import reading
from dogbreed.table.location import locate
from dogbreed.table.schema import REPEATED, ROW_COLUMNS, SCHEMA, empty_table
from dogbreed.table.store import committed_runs, open_table


def manifests(out: Any, table: Any = None) -> list[dict[str, Any]]:
    """Manifest of every committed run still in the table's log, oldest first (run_id, model_id, counts, ...)."""
    return committed_runs(table if table is not None else open_table(locate(out)))


def dataset(out: Any, dictionaries: tuple[str, ...] = (), table: Any = None) -> pads.Dataset | None:
    """The current version's files (of `table`, or of the latest version) as one pyarrow dataset of exactly SCHEMA,
    None before the first commit. Read it with a column list: the embedding is ~2 KB per decoded row."""
    loc = locate(out)
    table = table if table is not None else open_table(loc)
    check_next(loc, table.version() if table is not None else None)  # a FIFO or folder as the next commit
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
    with reading(loc, table):  # a missing file is found here
        return pads.dataset(sorted(files), schema=schema, format=fmt, filesystem=loc.fs)


def _scan(out: Any, ds: pads.Dataset, table: Any, **kwargs: Any) -> pa.Table:
    """ds.to_table(**kwargs); a damaged file is one sentence naming the table, the version and the file."""
    from deltalake import DeltaTable

    loc = locate(out)
    with reading(loc, table if table is not None else DeltaTable(loc.uri, storage_options=loc.storage_options())):
        return ds.to_table(**kwargs)


def stream(out: Any, table: Any, columns: list[str], batch_size: int = 16_384,
           keep: Any = None) -> Iterator[pa.Table]:
    """The current version's rows, one row group at a time, file after file (no read-ahead): bounded memory for a
    pass over every vector of a table of any size (similar's index, relabel). `keep` filters each batch."""
    import pyarrow.parquet as pq

    loc = locate(out)
    for path in sorted(table.get_add_actions(flatten=True).column("path").to_pylist()):
        with reading(loc, table), loc.fs.open_input_file(loc.path(path)) as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            have = set(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=batch_size, columns=[c for c in columns if c in have]):
                rows = pa.Table.from_batches([batch])
                for name in columns:  # a file written before a column existed: nulls
                    if name not in have:
                        rows = rows.append_column(SCHEMA.field(name), pa.nulls(rows.num_rows, SCHEMA.field(name).type))
                rows = rows.select(columns)
                if keep is not None:
                    rows = rows.filter(keep(rows))
                if rows.num_rows:
                    yield rows


def rows_of(out: Any, paths: pa.ChunkedArray, run_ids: pa.ChunkedArray, table: Any = None) -> pa.Table:
    """The committed rows written for (path, run_id) pairs, in the pairs' order (one per pair that exists)."""
    ds = dataset(out, table=table)
    if ds is None:
        return empty_table()
    found = _scan(out, ds, table, filter=pc.field("path").isin(pc.unique(paths)))
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
    """Every row of every committed run (history), as pandas (nullable Int32/Int64 integers in every run); the
    embedding only when `columns` names it."""
    ds = dataset(out)
    columns = columns or ROW_COLUMNS
    table = _scan(out, ds, None, columns=columns) if ds is not None else empty_table().select(columns)
    return table.to_pandas()


def latest_table(out: Any, columns: list[str] | None = None, model_id: str | None = None,
                 compact: bool = False, table: Any = None) -> pa.Table:
    """Latest row per path (optionally only rows of one model), deleted files included; arrow for speed.

    With `compact`, the repeated string columns come back dictionary-encoded (the planner's way of reading
    years of history in little memory). The embedding is read only when `columns` names it.
    """
    ds = dataset(out, REPEATED if compact else (), table=table)
    cols = list(dict.fromkeys(["path", "processed_at", "run_id"] + (columns or ROW_COLUMNS)))
    if ds is None:
        return empty_table().select(cols)
    filt = pc.field("model_id") == model_id if model_id else None
    if model_id:  # a deletion is recorded without a model: keep it so vanished files drop out
        filt = filt | (pc.field("status") == "deleted")
    table = _scan(out, ds, table, columns=cols, filter=filt)
    if table.column("path").null_count or table.column("run_id").null_count:
        raise DamagedTable(f"table {out} holds rows without a path or run id, which dogbreed never writes (another "
                           f"table's file, or a commit edited by hand?); {check_hint(locate(out))}")
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
    keep = rank == best[codes]
    if np.count_nonzero(keep) > len(paths.dictionary):
        keep = _one_per_path(table, codes, keep)
    return table.filter(pa.array(keep))


def _one_per_path(table: pa.Table, codes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Of several rows of one path in its newest run (a commit replayed by hand adds a file twice), the one processed
    last, then the last in file order: one row per path, the same one on every read of a version."""
    rows = np.flatnonzero(keep)
    at = pc.cast(table.column("processed_at").take(pa.array(rows)), pa.int64()).fill_null(np.iinfo(np.int64).min)
    order = np.lexsort((rows, at.to_numpy(), codes[rows]))
    ordered = codes[rows][order]
    last = np.append(ordered[1:] != ordered[:-1], True)
    keep = np.zeros(len(keep), dtype=bool)
    keep[rows[order][last]] = True
    return keep


def latest(out: Any, model_id: str | None = None, vectors: bool = False) -> pd.DataFrame:
    """The current answer per existing photo: its latest row (for `model_id` if given), deleted files left out;
    with `vectors`, the embedding column too (about 2 KB per decoded photo)."""
    columns = SCHEMA.names if vectors else ROW_COLUMNS
    table = latest_table(out, columns, model_id=model_id)
    if table.num_rows:
        table = table.take(pc.sort_indices(table.column("path")))
    mask = pc.not_equal(table.column("status"), "deleted")
    return table.filter(mask).select(columns).to_pandas().reset_index(drop=True)
