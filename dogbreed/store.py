"""The output folder as a store of committed runs: one-run-at-a-time lock, staging, atomic commit.

A run is written under ``OUT/_staging/<run_id>/`` and becomes visible by one ``rename`` into
``OUT/runs/<run_id>/`` with its manifest already inside, so readers never see half a run and a run
killed at any moment leaves the committed output exactly as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dogbreed import results
from dogbreed.results import MANIFEST, RUNS_DIR

STAGING_DIR = "_staging"
LOCK_FILE = ".lock"


class ScanLocked(RuntimeError):
    """Another scan holds the output folder's lock."""


class OutputError(ValueError):
    """An --out that cannot be used (an unsupported URI, a path that is a file); nothing was created."""


def check_out(out: str) -> None:
    """Refuse an unusable output location before anything is created or started."""
    if "://" in out:
        scheme = out.split("://", 1)[0]
        raise OutputError(f"--out {out}: {scheme}:// output is not supported; give a local folder")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    parent = next((p for p in [path.absolute(), *path.absolute().parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"--out {out}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {parent} is not writable")


class RunWriter:
    """Rows of one run into its staging folder: Parquet files of exactly results.SCHEMA, written as rows arrive.

    Rows are buffered into row groups of ROW_GROUP rows; a new file starts every FILE_ROWS rows, so a run of any
    size is a few large files (good for pandas, DuckDB and Spark) and the driver holds one row group at most.
    """

    ROW_GROUP = 65_536
    FILE_ROWS = 1_000_000

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts: dict[str, int] = {}
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._files = 0

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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
        if self._writer is None or self._file_rows >= self.FILE_ROWS:
            if self._writer is not None:
                self._writer.close()
            # zstd keeps a row near 60 bytes on disk.
            self._writer = pq.ParquetWriter(self.folder / f"part-{self._files:05d}.parquet", results.SCHEMA,
                                            compression="zstd")
            self._files += 1
            self._file_rows = 0
        self._writer.write_table(table, row_group_size=self.ROW_GROUP)
        self._file_rows += table.num_rows


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return utcnow().strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputStore:
    """Committed runs, staging and the lock of one output folder (local filesystem)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.runs = self.out / RUNS_DIR
        self.staging = self.out / STAGING_DIR

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the output's lock for the duration; a second holder is refused at once.

        flock is released by the kernel when its process dies, so a lock left by a killed run is
        simply taken over; the file's contents only say who held it last.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                raise ScanLocked(f"another scan is already running on {self.out} ({holder})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utcnow().isoformat()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def clear_staging(self) -> list[str]:
        """Remove what killed runs left in staging (call with the lock held); returns their run ids."""
        if not self.staging.is_dir():
            return []
        left = sorted(p.name for p in self.staging.iterdir())
        for name in left:
            shutil.rmtree(self.staging / name, ignore_errors=True)
        return left

    def stage(self, run_id: str) -> Path:
        path = self.staging / run_id
        path.mkdir(parents=True, exist_ok=False)
        return path

    def commit(self, run_id: str, manifest: dict[str, Any], extra_files: dict[str, str] | None = None) -> Path:
        """Write the manifest into the staged run, fsync everything, and publish it with one rename."""
        staged = self.staging / run_id
        for name, text in (extra_files or {}).items():
            (staged / name).write_text(text, encoding="utf-8")
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in staged.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(staged)
        self.runs.mkdir(parents=True, exist_ok=True)
        final = self.runs / run_id
        os.rename(staged, final)  # the commit point
        _fsync_dir(self.runs)
        return final
