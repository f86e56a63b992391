"""The output as a Delta Lake table, in a local folder or at an s3:// / gs:// URI: run writer, commit, orphans.

A run's rows are written by the driver as Parquet files under ``OUT/data/<run_id>/`` and become visible with
one Delta commit (a put-if-absent of the next log entry) whose commit metadata is the run's manifest. A run
killed at any moment leaves the table exactly as it was; the next run deletes the files it left behind. The
commit is made against the table version the run planned from, without retries, so of two runs that planned
from the same version at most one commits (the lock in :mod:`dogbreed.table.lock` keeps a second one from starting).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed.errors import Failed, Locked
from dogbreed.table import schema
from dogbreed.table.deltalog import TABLE_NAME, check_next
from dogbreed.table.health import log_damage
from dogbreed.table.location import Location, first_line
from dogbreed.table.objects import LOG_DIR, objects

DATA_DIR = "data"  # OUT/data/<run_id>/part-*.parquet: a run's files, under a prefix of its own
RUNS_DIR = "runs"  # OUT/_dogbreed/runs/<run_id>.json: the files a run in progress has created


class ScanLocked(Locked):
    """Another scan holds the output's lock (or committed while this run held a lost lease)."""


class StoreError(Failed):
    """The output could not be written or read while a run was in progress; nothing was committed."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # what new_run_id() makes (and older layouts' ids): no dots,
# no separators, so a run's folder data/<run_id>/ can never name its parent or another folder


def is_run_id(value: Any) -> bool:
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return utcnow().strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


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
        raise StoreError(f"cannot read the table at {loc.out}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - deltalake's DeltaError for a log it cannot read: name the damage
        raise log_damage(loc, e) from None


class RunWriter:
    """Rows of one run into Parquet files of exactly schema.SCHEMA under OUT/data/<run_id>/, written as rows arrive.

    Rows are buffered into row groups of ROW_GROUP rows; a new file starts every FILE_ROWS rows, so a run of any
    size is a few large files. A full row group is compressed and written in a thread while the next one fills
    (one in flight at most, its error raised at the next flush or at close), so the driver holds two row groups
    at most. `adds` are the Delta add actions of the files closed so far.
    """

    ROW_GROUP = 16_384  # about 30 MB of embeddings: what the driver holds before writing, and what a relabel reads
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
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self.files: list[str] = []  # every file this run created, recorded before it is created
        self._records = objects(loc.uri, loc.root, RUNS_DIR)

    def _record(self) -> None:
        """The run's record (OUT/_dogbreed/runs/<run_id>.json): what a later cleanup may delete, and nothing else."""
        doc = {"run_id": self.run_id, "files": self.files, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self._records.put(f"{self.run_id}.json", json.dumps(doc).encode())
        except Exception as e:  # noqa: BLE001 - local or object-store failure: the run cannot write safely
            raise StoreError(f"cannot write the run's record to {self.loc.out}: {first_line(e)}") from None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                try:
                    self.flush()
                    self._close_file()  # the last write's error surfaces here
                except BaseException:
                    self.abandon()
                    raise
            else:  # a failure (not a kill): leave nothing behind
                self.abandon()
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(schema.SCHEMA.names).cast(schema.SCHEMA)
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
        self._drain()  # the previous row group is written (or its error raised) first: files stay in order
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dogbreed-write")
        self._inflight = self._pool.submit(self._write_group, table)

    def _drain(self) -> None:
        if self._inflight is not None:
            self._inflight.result()  # a signal may interrupt this wait: the write then stays in flight for abandon()
            self._inflight = None

    def _write_group(self, table: pa.Table) -> None:
        if self._writer is not None and self._file_rows >= self.FILE_ROWS:
            self._finish_file()
        try:
            if self._writer is None:
                name = f"{self.prefix}/part-{len(self.adds):05d}.parquet"
                self.files.append(name)
                self._record()  # recorded before it exists: a kill at any moment leaves nothing unnamed
                if not self.loc.remote:  # object stores have no folders to make
                    self.loc.fs.create_dir(self.loc.path(self.prefix), recursive=True)
                self._stream = self.loc.fs.open_output_stream(self.loc.path(name))
                self._name, self._file_rows = name, 0
                # zstd keeps a row near 60 bytes on disk.
                self._writer = pq.ParquetWriter(self._stream, schema.SCHEMA, compression="zstd")
            self._writer.write_table(table, row_group_size=self.ROW_GROUP)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot write the run's rows to {self.loc.out}: {first_line(e)}") from None
        self._file_rows += table.num_rows

    def _close_file(self) -> None:
        self._drain()
        self._finish_file()

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        from deltalake.transaction import AddAction

        try:
            self._writer.close()
            size = self._stream.tell()
            self._stream.close()
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot write the run's rows to {self.loc.out}: {first_line(e)}") from None
        stats = json.dumps({"numRecords": self._file_rows})
        self.adds.append(AddAction(self._name, size, {}, int(utcnow().timestamp() * 1000), True, stats))
        self._writer = self._stream = None

    def commit(self, table, manifest: dict[str, Any]) -> int:
        """Commit the run's files (see :func:`commit`); its record goes once they are part of the table."""
        version = commit(self.loc, table, self.adds, manifest)
        self.forget()
        return version

    def forget(self) -> None:
        try:
            self._records.delete(f"{self.run_id}.json")
        except Exception:  # noqa: BLE001 - a leftover record of a committed run only costs the next run a lookup
            pass

    def abandon(self) -> None:
        """Close and delete the files this run wrote (a run that failed or was refused), and its record."""
        if self._inflight is not None:  # whatever it raised; closing the writer under a write crashed natively
            futures_wait([self._inflight])  # (SIGTERM had interrupted the wait for it: a segfault, no sentence)
            self._inflight = None
        try:
            if self._writer is not None:
                self._writer.close()
                self._stream.close()
        except (OSError, pa.ArrowException):
            pass
        self._writer = self._stream = None
        if delete_run_files(self.loc, self.run_id, self.files):
            self.forget()


def delete_run_files(loc: Location, run_id: str, files: list[str]) -> bool:
    """Delete the files a run recorded (only names inside its own data/<run_id>/ folder), then that folder if it
    is empty; True when nothing of it is left. Files the run did not record are never touched."""
    if not is_run_id(run_id):  # ".." would make data/../ the output folder itself
        return False
    ok = True
    own = f"{DATA_DIR}/{run_id}/"
    for name in files:
        if not (isinstance(name, str) and name.startswith(own) and "/" not in name[len(own):]
                and name.endswith(".parquet")):
            continue  # not a name this code writes: a tampered record deletes nothing
        try:
            loc.fs.delete_file(loc.path(name))
        except FileNotFoundError:
            pass
        except OSError:
            ok = False  # best effort: the record stays, so the next run tries again
    folder = loc.path(DATA_DIR, run_id)
    try:  # the folder goes only if it is empty (pyarrow keeps an empty marker object on S3): anything else stays
        if not loc.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            loc.fs.delete_dir(folder)
    except (OSError, pa.ArrowException):
        pass
    return ok


def add_new_columns(loc: Location, table):
    """A table written before some of SCHEMA's columns existed gets them (one metadata-only commit; older rows read
    them as null); returns the table as it now is. Call with the lock held, before planning."""
    from deltalake import CommitProperties, Schema

    have = {f.name for f in table.schema().fields}
    missing = [f for f in schema.SCHEMA.remove_metadata() if f.name not in have]
    if not missing:
        return table
    try:
        table.alter.add_columns(Schema.from_arrow(pa.schema(missing)).fields,
                                commit_properties=CommitProperties(custom_metadata={"dogbreed": "new columns: " +
                                                                                    ", ".join(f.name for f in missing)}))
    except Exception as e:  # noqa: BLE001 - delta-rs raises several kinds
        raise StoreError(f"cannot add the columns {', '.join(f.name for f in missing)} to {loc.out}: "
                         f"{first_line(e)}") from None
    return open_table(loc)


def delta_schema():
    from deltalake import Schema

    return Schema.from_arrow(schema.SCHEMA.remove_metadata())


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
            check_next(loc, table.version() if table is not None else None)  # not a writer: a FIFO or folder there
            raise ScanLocked(f"another writer committed to {loc.out} while this run was in progress; "
                             "this run was discarded") from None
        raise StoreError(f"cannot commit the run to {loc.out}: {first_line(e)}") from None
    except OSError as e:
        raise StoreError(f"cannot commit the run to {loc.out}: {first_line(e)}") from None


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
        raise StoreError(f"cannot list {loc.out}/{DATA_DIR}: {first_line(e)}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def clear_orphans(loc: Location, table) -> list[str]:
    """Delete the files of runs that never committed (call with the lock held); returns their run ids.

    Only runs that left a record (OUT/_dogbreed/runs/<run_id>.json) are cleaned, and only the files named in it:
    whatever else lies in the output is never touched. A record of a run the log names (it committed, then was
    killed before removing its record) is simply removed.
    """
    import logging

    records = objects(loc.uri, loc.root, RUNS_DIR)
    try:
        names = records.names()
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot list the run records of {loc.out}: {first_line(e)}") from None
    if not names:
        return []
    live = {m["run_id"] for m in committed_runs(table)}
    if table is not None:
        live |= {p.split("/")[1] for p in table.get_add_actions(flatten=True).column("path").to_pylist()
                 if p.startswith(DATA_DIR + "/")}
    cleaned = []
    for name in names:
        try:
            doc = json.loads(records.get(name) or b"null")
            run_id, files = doc["run_id"], list(doc["files"])
            if f"{run_id}.json" != name:
                raise ValueError("run id and record name differ")
            if not is_run_id(run_id):
                raise ValueError(f"{run_id!r} is not a run id")
        except (ValueError, KeyError, TypeError) as e:
            logging.getLogger("dogbreed.table.store").warning("run record %s in %s is unreadable (%s): left alone",
                                                        name, loc.out, e)
            continue
        if run_id in live:
            records.delete(name)
        elif delete_run_files(loc, run_id, files):
            records.delete(name)
            cleaned.append(run_id)
    return cleaned
