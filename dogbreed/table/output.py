"""One output object: what the scan, `latest`, `report`, `compact`, `migrate` and `relabel` use to read and write a
scan output, so that each reads as "open, plan against the latest rows, write a run, commit under the lock".

``Output(out)`` checks the location (a readable one for readers, a writable one for writers). ``output.writing()``
claims the output (:mod:`dogbreed.table.ownership`), holds its lock, pins the snapshot the run plans from and
clears what killed runs left; its :class:`Session` hands out run writers and commits them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from dogbreed.table import readers
from dogbreed.table.location import OutputError, check_out, unwritable
from dogbreed.table.lock import Lease, hold
from dogbreed.table.ownership import check_roots, claimable, inspect
from dogbreed.table.store import DATA_DIR, LOG_DIR, RunWriter, StoreError, add_new_columns, clear_orphans, new_run_id, open_table

log = logging.getLogger("dogbreed.table")


class Output:
    """A scan output (local folder or s3:// / gs:// URI) that is, or will become, a dogbreed table."""

    def __init__(self, out: str | Path, write: bool = False):
        self.out = str(out)
        self.loc = check_out(out, write=write)

    def check_roots(self, roots: list[str]) -> None:
        """Refuse an output that is a photo root, lies in one or holds one."""
        check_roots(self.loc, roots)

    def check_claimable(self) -> None:
        """Refuse, without writing, an output that holds anything but a dogbreed table (a dry run's check)."""
        claimable(self.loc)

    def snapshot(self, version: int | None = None):
        """The committed Delta table (its latest version, or `version`), or None before the first commit."""
        return open_table(self.loc, version)

    def require(self):
        """The committed dogbreed table, for readers; one sentence when there is none (or it is not dogbreed's)."""
        if inspect(self.loc, reading=True) != "ours" or (table := self.snapshot()) is None:
            raise OutputError(f"{self.out} holds no committed scan run (no dogbreed table there)")
        return table

    def runs(self, table: Any = None) -> list[dict[str, Any]]:
        """The manifest of every committed run still in the log, oldest first."""
        return readers.manifests(self.out, table if table is not None else self.snapshot())

    def latest(self, columns: list[str] | None = None, model_id: str | None = None, compact: bool = False,
               table: Any = None) -> pa.Table:
        """The latest row per path (deleted files included) of `table` (default: the current snapshot)."""
        return readers.latest_table(self.out, columns, model_id, compact, table=table if table is not None
                                    else self.snapshot())

    @contextmanager
    def writing(self, lease_s: float, what: str = "scan", break_lock: bool = False,
                old_layout_ok: bool = False) -> Iterator["Session"]:
        """Claim the output, hold its lock and pin the snapshot to commit on top of; clears killed runs' files."""
        with hold(self.loc, lease_s, what=what, break_lock=break_lock, old_layout_ok=old_layout_ok) as lease:
            for folder in (LOG_DIR, DATA_DIR):  # the lock's folder was written just now; these must be too
                why = unwritable(self.loc, folder)
                if why:
                    raise StoreError(f"cannot write to {self.out}/{folder}: {why}; nothing was read or written")
            session = Session(self, lease)
            left = clear_orphans(self.loc, session.table)
            if left:
                log.warning("removed the files of %d unfinished earlier run(s): %s", len(left), ", ".join(left))
            yield session


class Session:
    """A held lock on an output: the snapshot runs plan from, run writers, and commits that check the lease."""

    def __init__(self, output: Output, lease: Lease):
        self.output, self.lease = output, lease
        table = output.snapshot()
        self.table = add_new_columns(output.loc, table) if table is not None else None

    def latest(self, columns: list[str] | None = None, model_id: str | None = None, compact: bool = False) -> pa.Table:
        """The latest row per path as of the pinned snapshot."""
        return self.output.latest(columns, model_id, compact, table=self.table)

    def writer(self, run_id: str | None = None) -> RunWriter:
        """A writer for one run's rows (use it as a context manager); the run id sorts by start time."""
        return RunWriter(self.output.loc, run_id or new_run_id())

    def commit(self, writer: RunWriter, manifest: dict[str, Any]) -> int:
        """One Delta commit of the writer's files with `manifest`, if the lease is still ours; returns the version.

        Refused or failed, the run's files are deleted now (a kill leaves them to the next run's cleanup).
        """
        try:
            self.lease.check(self.output.out)
            version = writer.commit(self.table, manifest)
        except BaseException:
            writer.abandon()
            raise
        self.table = self.output.snapshot()
        return version
