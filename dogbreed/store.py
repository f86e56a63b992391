"""The output as a Delta Lake table, in a local folder or at an s3:// / gs:// URI: run writer, commit, orphans.

A run's rows are written by the driver as Parquet files under ``OUT/data/<run_id>/`` and become visible with
one Delta commit (a put-if-absent of the next log entry) whose commit metadata is the run's manifest. A run
killed at any moment leaves the table exactly as it was; the next run deletes the files it left behind. The
commit is made against the table version the run planned from, without retries, so of two runs that planned
from the same version at most one commits (the lock in :mod:`dogbreed.lock` keeps a second one from starting).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed import results

DATA_DIR = "data"  # OUT/data/<run_id>/part-*.parquet: a run's files, under a prefix of its own
META_DIR = "_dogbreed"  # OUT/_dogbreed/lock/: the lock objects (a leading underscore: Delta and Parquet readers skip it)
LOG_DIR = "_delta_log"
SCHEMES = ("s3", "gs")
TABLE_NAME = "dogbreed scan results"


class ScanLocked(RuntimeError):
    """Another scan holds the output's lock (or committed while this run held a lost lease)."""


class OutputError(ValueError):
    """An --out that cannot be used (an unsupported URI, a file, no bucket, no credentials); nothing was created."""


class StoreError(RuntimeError):
    """The output could not be written or read while a run was in progress; nothing was committed."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return utcnow().strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Location:
    """Where a table lives: its URI for deltalake, and the pyarrow filesystem and path the driver writes through."""

    out: str  # as given
    uri: str  # absolute local path, or scheme://bucket/prefix without a trailing slash
    fs: pafs.FileSystem
    root: str  # the table's folder as a path of `fs`

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def storage_options(self) -> dict[str, str] | None:
        """deltalake reads the standard AWS_* / GOOGLE_* variables itself; an http:// endpoint must be allowed."""
        if self.uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
            return {"AWS_ALLOW_HTTP": "true"}
        return None


def locate(out: str | Path) -> Location:
    """Parse --out into a Location without touching the store (OutputError for an unsupported URI)."""
    out = str(out)
    if "://" not in out:
        root = str(Path(out).absolute())
        return Location(out, root, pafs.LocalFileSystem(), root)
    parts = urlsplit(out)
    if parts.scheme not in SCHEMES:
        raise OutputError(f"--out {out}: {parts.scheme}:// output is not supported; give a local folder, "
                          "an s3:// or a gs:// URI")
    if not parts.netloc:
        raise OutputError(f"--out {out} names no bucket")
    prefix = parts.path.strip("/")
    uri = f"{parts.scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise OutputError(f"--out {out}: cannot use {parts.scheme}:// storage here ({_first_line(e)})") from None
    return Location(out, uri, fs, root.rstrip("/"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_out(out: str | Path) -> Location:
    """Refuse an unusable output location before anything is created or started; returns where it is."""
    loc = locate(out)
    if not loc.remote:
        path = Path(loc.root)
        if path.exists() and not path.is_dir():
            raise OutputError(f"--out {out} is a file, not a folder")
        parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputError(f"--out {out}: {parent} is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--out {out}: {parent} is not writable")
        return loc
    bucket = loc.root.split("/", 1)[0]
    try:  # one request each: is the bucket there, is the prefix not an object; credentials are checked too
        kind = loc.fs.get_file_info(bucket).type
        here = loc.fs.get_file_info(loc.root).type if loc.root != bucket else pafs.FileType.Directory
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"--out {out}: cannot reach the store ({_first_line(e)}); check the credentials "
                          "(standard chain, AWS_ENDPOINT_URL for an S3-compatible store)") from None
    if kind == pafs.FileType.NotFound:
        raise OutputError(f"--out {out}: bucket {bucket} does not exist (or these credentials cannot see it)")
    if here == pafs.FileType.File:
        raise OutputError(f"--out {out} is an object, not a prefix")
    return loc


def require_table(out: str | Path):
    """The committed table at `out` for a reader; one sentence where `out` holds no committed scan run."""
    table = open_table(check_out(out))
    if table is None:
        raise OutputError(f"{out} holds no committed scan run (no Delta table there)")
    return table


def open_table(loc: Location, version: int | None = None):
    """The Delta table at loc (its latest version, or `version`), or None where no run has committed yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    if not loc.remote and not Path(loc.root, LOG_DIR).is_dir():
        return None  # deltalake would refuse a missing folder with another error
    try:
        return DeltaTable(loc.uri, version=version, storage_options=loc.storage_options())
    except TableNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read the table at {loc.out}: {_first_line(e)}") from None


class RunWriter:
    """Rows of one run into Parquet files of exactly results.SCHEMA under OUT/data/<run_id>/, written as rows arrive.

    Rows are buffered into row groups of ROW_GROUP rows; a new file starts every FILE_ROWS rows, so a run of any
    size is a few large files and the driver holds one row group at most. `adds` are the Delta add actions of
    the files closed so far.
    """

    ROW_GROUP = 65_536
    FILE_ROWS = 1_000_000

    def __init__(self, loc: Location, run_id: str):
        self.loc, self.run_id = loc, run_id
        self.prefix = f"{DATA_DIR}/{run_id}"
        self.counts: dict[str, int] = {}
        self.rows = 0
        self.adds: list[Any] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stream = None
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.flush()
            self._close_file()
        else:  # a failure (not a kill): leave nothing behind
            self.abandon()

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(results.SCHEMA.names).cast(results.SCHEMA)
        for value, count in zip(*pc.value_counts(table.column("status")).flatten()):
            self.counts[value.as_py()] = self.counts.get(value.as_py(), 0) + count.as_py()
        self.rows += table.num_rows
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._writer is not None and self._file_rows >= self.FILE_ROWS:
            self._close_file()
        try:
            if self._writer is None:
                name = f"{self.prefix}/part-{len(self.adds):05d}.parquet"
                if not self.loc.remote:  # object stores have no folders to make
                    self.loc.fs.create_dir(self.loc.path(self.prefix), recursive=True)
                self._stream = self.loc.fs.open_output_stream(self.loc.path(name))
                self._name, self._file_rows = name, 0
                # zstd keeps a row near 60 bytes on disk.
                self._writer = pq.ParquetWriter(self._stream, results.SCHEMA, compression="zstd")
            self._writer.write_table(table, row_group_size=self.ROW_GROUP)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot write the run's rows to {self.loc.out}: {_first_line(e)}") from None
        self._file_rows += table.num_rows

    def _close_file(self) -> None:
        if self._writer is None:
            return
        from deltalake.transaction import AddAction

        try:
            self._writer.close()
            size = self._stream.tell()
            self._stream.close()
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot write the run's rows to {self.loc.out}: {_first_line(e)}") from None
        stats = json.dumps({"numRecords": self._file_rows})
        self.adds.append(AddAction(self._name, size, {}, int(utcnow().timestamp() * 1000), True, stats))
        self._writer = self._stream = None

    def abandon(self) -> None:
        """Close and delete the run's files (a run that failed or was refused)."""
        try:
            if self._writer is not None:
                self._writer.close()
                self._stream.close()
        except (OSError, pa.ArrowException):
            pass
        self._writer = self._stream = None
        delete_prefix(self.loc, self.prefix)


def delete_prefix(loc: Location, prefix: str) -> None:
    try:
        loc.fs.delete_dir(loc.path(prefix))
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: the next run deletes what is left


def delta_schema():
    from deltalake import Schema

    return Schema.from_arrow(results.SCHEMA.remove_metadata())


def commit(loc: Location, table, adds: list[Any], manifest: dict[str, Any]) -> int:
    """One Delta commit of the run's files with its manifest as commit metadata; returns the new version.

    `table` is the snapshot the run planned from (None: no table yet). No commit retries: if another writer
    committed since, this commit fails (ScanLocked) instead of landing on top of rows it never saw.
    """
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import create_table_with_add_actions

    clash = set(manifest) & DELTA_COMMIT_KEYS
    if clash:
        raise ValueError(f"manifest keys {sorted(clash)} are Delta's own commitInfo fields")
    props = CommitProperties(custom_metadata=manifest, max_commit_retries=0)
    try:
        if table is None:
            create_table_with_add_actions(loc.uri, delta_schema(), adds, mode="error", name=TABLE_NAME,
                                          storage_options=loc.storage_options(), commit_properties=props)
            return 0
        planned = table.version()
        table.create_write_transaction(adds, "append", delta_schema(), commit_properties=props)
        return planned + 1
    except (CommitFailedError, DeltaError) as e:
        if isinstance(e, CommitFailedError) or "exists" in str(e).lower():
            raise ScanLocked(f"another writer committed to {loc.out} while this run was in progress; "
                             "this run was discarded") from None
        raise StoreError(f"cannot commit the run to {loc.out}: {_first_line(e)}") from None
    except OSError as e:
        raise StoreError(f"cannot commit the run to {loc.out}: {_first_line(e)}") from None


# commitInfo fields Delta writers set themselves; a run's manifest sits beside them in the same commitInfo.
DELTA_COMMIT_KEYS = {"timestamp", "operation", "operationParameters", "operationMetrics", "engineInfo", "clientVersion",
                     "version", "readVersion", "isolationLevel", "isBlindAppend", "userMetadata", "txnId",
                     "inCommitTimestamp", "tags"}


def committed_runs(table) -> list[dict[str, Any]]:
    """The manifest of every committed run still in the table's log, oldest first, with its table `version`.

    A run's commit carries its manifest as top-level commitInfo fields (run_id, model_id, counts, ...), so any
    Delta reader's history shows them; compaction commits have no run_id.
    """
    if table is None:
        return []
    runs = [{k: v for k, v in entry.items() if k not in DELTA_COMMIT_KEYS - {"version"}}
            for entry in table.history() if "run_id" in entry]
    return sorted(runs, key=lambda m: m["version"])


def run_prefixes(loc: Location) -> list[str]:
    """The run ids that have a folder (prefix) under OUT/data/."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(DATA_DIR), allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"cannot list {loc.out}/{DATA_DIR}: {_first_line(e)}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def clear_orphans(loc: Location, table) -> list[str]:
    """Delete the files of runs that never committed (call with the lock held); returns their run ids.

    A run's folder is live while the table's log names its run (history) or a current file lies in it; the
    log keeps the last 30 days, beyond which only current files count (tombstoned files that old are past
    any vacuum retention anyway).
    """
    live = {m["run_id"] for m in committed_runs(table)}
    if table is not None:
        live |= {p.split("/")[1] for p in table.get_add_actions(flatten=True).column("path").to_pylist()
                 if p.startswith(DATA_DIR + "/")}
    left = [rid for rid in run_prefixes(loc) if rid not in live]
    for rid in left:
        delete_prefix(loc, f"{DATA_DIR}/{rid}")
    return left
