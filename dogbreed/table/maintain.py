"""Keeping an output table small over years (compact), checking and repairing it (check), and converting the old
runs/ layout into it (migrate).

All that write hold the output's lock (through the output object), like a scan, so they never run beside one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from dogbreed.table import health as table_health
from dogbreed.table import schema
from dogbreed.table.location import OutputError, first_line
from dogbreed.table.lock import hold
from dogbreed.table.output import Output
from dogbreed.table.ownership import inspect
from dogbreed.table.store import DELTA_COMMIT_KEYS, RunWriter, StoreError

log = logging.getLogger("dogbreed.table.maintain")
MIGRATED_DIR = "_runs_before_delta"  # where migrate moves the old runs/ (hidden from Delta and Parquet readers)
OLD_STAGING, OLD_LOCK = "_staging", ".lock"


@dataclass
class CompactSummary:
    version: int
    files_before: int
    files_after: int
    removed: int

    def line(self) -> str:
        return (f"compacted to version {self.version}: {self.files_before} -> {self.files_after} current files; "
                f"{self.removed} files of earlier versions (older than the retention) or of killed runs deleted")


def compact(out: str, retention_hours: int, lease_s: float = 60.0, break_lock: bool = False) -> CompactSummary:
    """OPTIMIZE (rewrite small files into large ones), checkpoint, then VACUUM the files this table's log removed
    longer ago than the retention, and the files of killed runs; nothing is lost from the current version.

    Only files dogbreed recorded are deleted: those the log added and later removed, and those a killed run named
    in its record. Anything else in the output (a user's files, whatever their age) is never touched.
    """
    output = Output(out, write=True)
    output.require()  # a committed dogbreed table, before anything (a marker, a lock) is written
    with output.writing(lease_s, what="compact", break_lock=break_lock) as session:
        table = session.table
        before = len(table.get_add_actions(flatten=True))
        try:
            table.optimize.compact()
            table.create_checkpoint()
            session.lease.check(out)
            # Not full: only tombstones (files the log removed), never "whatever the log does not name".
            removed = table.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False,
                                   full=False)
            table.cleanup_metadata()  # log entries past the table's log retention (30 days by default)
        except OSError as e:
            raise StoreError(f"cannot compact {out}: {first_line(e)}") from None
        table = output.snapshot()
        return CompactSummary(table.version(), before, len(table.get_add_actions(flatten=True)), len(removed))


def check(out: str, repair: bool = False, deep: bool = False, lease_s: float = 60.0,
          break_lock: bool = False) -> tuple[table_health.Health, list[str], table_health.Health]:
    """Verify the table at `out` (see dogbreed.table.health); with `repair`, mend it under the lock. Returns what was
    found, what was done and what a check finds afterwards. Without `repair` nothing is written."""
    output = Output(out, write=repair)
    if inspect(output.loc) != "ours":
        raise OutputError(f"{out} holds no dogbreed table")
    found = table_health.check(output.loc, deep)
    if not repair or found.ok:
        return found, [], found
    with hold(output.loc, lease_s, what="check --repair", break_lock=break_lock):
        done = table_health.repair(output.loc, found)
    return found, done, table_health.check(output.loc, deep)


def migrate(out: str, lease_s: float = 60.0, break_lock: bool = False) -> list[str]:
    """Convert a local output folder in the runs/<run_id>/ + manifest layout into the Delta table, one commit per
    old run with its manifest, every row kept; then move runs/ aside. Returns the run ids migrated.

    Killed half-way, it is simply run again: runs already in the table are skipped.
    """
    output = Output(out, write=True)
    loc = output.loc
    if loc.remote:
        raise OutputError(f"--out {out}: the runs/ layout only ever existed in local folders")
    runs_dir = Path(loc.root) / schema.RUNS_DIR
    old = sorted(p for p in runs_dir.iterdir() if (p / schema.MANIFEST).is_file()) if runs_dir.is_dir() else []
    if not old:
        raise OutputError(f"{out} has no runs/<run_id>/{schema.MANIFEST} to migrate")
    done = []
    with output.writing(lease_s, what="migrate", break_lock=break_lock, old_layout_ok=True) as session:
        have = {m["run_id"] for m in output.runs(session.table)}
        for run in old:
            manifest = {k: v for k, v in json.loads((run / schema.MANIFEST).read_text(encoding="utf-8")).items()
                        if k not in DELTA_COMMIT_KEYS}
            run_id = manifest.get("run_id", run.name)
            if run_id in have:
                continue
            config = run / "_config.yaml"
            if config.is_file():
                manifest["config"] = config.read_text(encoding="utf-8")
            manifest.update(run_id=run_id, migrated_from=f"{schema.RUNS_DIR}/{run.name}")
            with session.writer(run_id) as writer:
                for part in sorted(run.glob("*.parquet")):
                    for batch in pq.ParquetFile(part).iter_batches(batch_size=RunWriter.ROW_GROUP):
                        writer.write(schema.to_table({n: batch.column(n) for n in batch.schema.names}))
            session.commit(writer, manifest)
            done.append(run_id)
            log.info("migrated run %s: %d rows", run_id, writer.rows)
        # The old layout stays on disk, out of readers' way, until its owner has checked the table.
        shutil.move(str(runs_dir), str(Path(loc.root) / MIGRATED_DIR / schema.RUNS_DIR))
        shutil.rmtree(Path(loc.root) / OLD_STAGING, ignore_errors=True)
        (Path(loc.root) / OLD_LOCK).unlink(missing_ok=True)
    return done
