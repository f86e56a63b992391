"""Whether a vector index's files hold what its state says, and its folder can be made: checked before a search
trusts them.

The index is derived data: a segment whose files do not match its state (a truncated or missing vectors file, junk
or missing keys, a row count or width they do not hold) is written again from the table, never an error. The checks
are cheap: the vectors file's size against rows x dim float16 values, and the keys (read anyway to search) counted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from dogbreed.config import cache_home
from dogbreed.errors import UsageError


class OtherWidth(Exception):
    """The table's vectors (args[0] values each) are not as wide as the indexed ones: the index is made again."""


def check(segments: list, dim: int, fetch: Callable[[str], Path]) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """Of these segments (Segment: name, rows): the keys of each whose files hold its rows of `dim` values, and why
    each other one does not. `fetch(file name)` gives an index file's local copy."""
    keys, damaged = {}, {}
    for segment in segments:
        try:
            why, table = damage(fetch(f"{segment.name}.f16"), fetch(f"{segment.name}.keys.parquet"), segment.rows, dim)
        except (OSError, pa.ArrowException) as e:  # a remote table's index file that cannot be mirrored
            why, table = f"{segment.name} cannot be fetched ({e})", None
        if why:
            damaged[segment.name] = why
        else:
            keys[segment.name] = table
    return keys, damaged


def damage(vectors: Path, keys: Path, rows: int, dim: int) -> tuple[str | None, pa.Table | None]:
    """(why the segment's files, `vectors` of float16 values and `keys` in Parquet, do not hold `rows` vectors of
    `dim` values, None) or, when they do, (None, its keys)."""
    if rows <= 0 or dim <= 0:
        return f"the state gives it {rows} vectors of {dim} values", None
    if not vectors.is_file():
        return f"{vectors.name} is missing", None
    size, want = vectors.stat().st_size, rows * dim * 2
    if size != want:
        return f"{vectors.name} holds {size} bytes, not {rows} vectors of {dim} values ({want} bytes)", None
    if not keys.is_file():
        return f"{keys.name} is missing", None
    try:
        table = pq.read_table(keys)
    except (OSError, pa.ArrowException):
        return f"{keys.name} is not a readable Parquet file", None
    if "path" not in table.column_names or not pa.types.is_string(table.schema.field("path").type):
        return f"{keys.name} has no path column", None
    if table.num_rows != rows or table.column("path").null_count:
        return f"{keys.name} names {table.num_rows} paths, not {rows}", None
    return None, table


def occupied(folder: Path) -> Path | None:
    """The file (or anything but a folder) standing where `folder` or one of its parents should be; None when the
    path is folders, or free to make."""
    for path in (folder, *folder.parents):  # os.path: a folder that cannot be searched is no error here
        if os.path.isdir(path):
            return None
        if os.path.lexists(path):
            return path
    return None


def unusable_cache(folder: Path, error: OSError, out: str) -> UsageError:
    """The sentence for a user cache that cannot hold `folder` (the index of `out`), naming what sets the cache."""
    where = occupied(folder)
    why = f"{where} is a file, not a folder" if where else error.strerror or str(error)
    given = os.environ.get("DOGBREED_CACHE")
    return UsageError(f"{f'DOGBREED_CACHE={given}' if given else f'the user cache {cache_home()}'} cannot hold the "
                      f"vector index of {out} ({why}): set DOGBREED_CACHE to a folder this user can write")
