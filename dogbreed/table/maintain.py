"""Keeping an output table small over years (compact), checking and repairing it (check), and converting the old
runs/ layout into it (migrate).

All that write hold the output's lock (through the output object), like a scan, so they never run beside one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dogbreed.errors import read_text
from dogbreed.table import health as table_health
from dogbreed.table import schema
from dogbreed.table.location import OutputError, first_line
from dogbreed.table.lock import hold
from dogbreed.table.output import Output
from dogbreed.table.ownership import inspect
from dogbreed.table.store import DELTA_COMMIT_KEYS, RunWriter, StoreError, is_run_id

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
    damage = table_health.log_damage(output.loc, None)  # deltalake reads past another table's commit, and compacting
    if damage is not None:  # would fold its rows into dogbreed's files for good (so would the schema commit below)
        raise damage
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
    # Read first, so a folder of anything else is "not a dogbreed table", not a writer's "--out ... already holds";
    # a repair then also refuses a table with other files beside it, as every writer does.
    if inspect(output.loc, reading=True) != "ours" or (repair and inspect(output.loc) != "ours"):
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

    Every old run is checked first (:func:`old_runs`): a damaged one is refused before anything is written.
    Killed half-way, it is simply run again: runs already in the table are skipped.
    """
    output = Output(out, write=True)
    loc = output.loc
    if loc.remote:
        raise OutputError(f"--out {out}: the runs/ layout only ever existed in local folders")
    old = old_runs(out, Path(loc.root))
    if not old:
        raise OutputError(f"{out} has no runs/<run_id>/{schema.MANIFEST} to migrate")
    done: list[str] = []
    with output.writing(lease_s, what="migrate", break_lock=break_lock, old_layout_ok=True) as session:
        have = {m["run_id"] for m in output.runs(session.table)}
        for run in old:
            if run.run_id in have:
                continue
            with session.writer(run.run_id) as writer:
                for part, columns in run.parts:
                    try:
                        with pq.ParquetFile(part) as f:
                            for batch in f.iter_batches(batch_size=RunWriter.ROW_GROUP, columns=columns):
                                writer.write(schema.to_table({n: batch.column(n) for n in columns}))
                    except (OSError, pa.ArrowException) as e:  # a page damaged behind a sound footer
                        raise OutputError(
                            f"{_shown(out, loc.root, part)} cannot be read ({first_line(e)}); {len(done)} runs were "
                            f"migrated before it, this one was not: move {_shown(out, loc.root, run.folder)} out of "
                            f"{out} and run `dogbreed migrate {out}` again (it skips the runs already migrated)"
                        ) from None
            session.commit(writer, run.manifest)
            done.append(run.run_id)
            log.info("migrated run %s: %d rows", run.run_id, writer.rows)
        # The old layout stays on disk, out of readers' way, until its owner has checked the table.
        shutil.move(str(Path(loc.root) / schema.RUNS_DIR), str(Path(loc.root) / MIGRATED_DIR / schema.RUNS_DIR))
        shutil.rmtree(Path(loc.root) / OLD_STAGING, ignore_errors=True)
        (Path(loc.root) / OLD_LOCK).unlink(missing_ok=True)
    return done


# --------------------------------------------------------------------------- reading the old runs/ layout

HARMLESS = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what a desktop puts in any folder; moved aside with runs/
_TIME_UNITS = ("s", "ms", "us", "ns")


@dataclass
class OldRun:
    """One committed run of the old layout, checked: its folder, run id, manifest as it will be committed, and each
    part file with the columns of schema.SCHEMA it holds (the only ones read)."""

    folder: Path
    run_id: str
    manifest: dict[str, Any]
    parts: list[tuple[Path, list[str]]]


def old_runs(out: str, root: Path) -> list[OldRun]:
    """Every run under OUT/runs/, oldest first, each checked with bounded effort (its manifest and config, and its
    part files' footers) before anything is written, so a damaged one cannot leave a table half-migrated.

    Anything damaged is an OutputError naming the file, what is wrong and what to do; nothing has been written.
    """
    runs_dir = root / schema.RUNS_DIR
    if not runs_dir.is_dir():
        return []
    try:
        entries = sorted(runs_dir.iterdir())
    except OSError as e:
        raise OutputError(f"cannot read {_shown(out, root, runs_dir)}: {e.strerror or e}; nothing was migrated") from None
    found: dict[str, OldRun] = {}
    for folder in entries:
        if folder.name in HARMLESS or folder.name.startswith("._"):
            continue
        run = _old_run(out, root, folder)
        if run.run_id in found:
            raise _damaged(out, root, folder / schema.MANIFEST, f"names the run {run.run_id}, as "
                           f"{_shown(out, root, found[run.run_id].folder / schema.MANIFEST)} does", folder)
        found[run.run_id] = run
    return list(found.values())


def _old_run(out: str, root: Path, folder: Path) -> OldRun:
    def damaged(path: Path, why: str) -> OutputError:
        return _damaged(out, root, path, why, folder)

    if not folder.is_dir():
        raise OutputError(f"{_shown(out, root, folder)} is not a run folder; nothing was migrated: move it out of {out} "
                          f"and run `dogbreed migrate {out}` again")
    path = folder / schema.MANIFEST
    if not os.path.lexists(path):
        raise OutputError(f"{_shown(out, root, folder)} holds no {schema.MANIFEST}, so it is no committed run; nothing "
                          f"was migrated: move it out of {out} and run `dogbreed migrate {out}` again")
    text = _small_text(path, damaged)
    try:
        manifest = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, NaN or Infinity
        raise damaged(path, f"is not valid JSON ({first_line(e)})") from None
    except RecursionError:
        raise damaged(path, "is not a manifest (JSON nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise damaged(path, f"is not a manifest (a JSON {type(manifest).__name__}, not an object)")
    run_id = manifest.get("run_id", folder.name)
    if not is_run_id(run_id):
        given = json.dumps(run_id)[:80] if isinstance(run_id, str) else f"a JSON {type(run_id).__name__}"
        where = "names no valid run id" if "run_id" in manifest else "names no run id, and its folder's name is none"
        raise damaged(path, f"{where} ({given}; letters, digits, _ and - expected)")
    manifest = {k: v for k, v in manifest.items() if k not in DELTA_COMMIT_KEYS}
    config = folder / "_config.yaml"
    if os.path.lexists(config):
        manifest["config"] = _small_text(config, damaged)
    # A folder name that is not UTF-8 is recorded with \xNN for its other bytes, as paths are in the table.
    name = os.fsencode(folder.name).decode("utf-8", "backslashreplace")
    manifest.update(run_id=run_id, migrated_from=f"{schema.RUNS_DIR}/{name}")
    try:  # what the commit will write: a lone surrogate (\ud800 in the JSON) is no Delta commit's text
        json.dumps(manifest, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:
        raise damaged(path, f"is not a manifest a Delta commit can hold ({first_line(e)})") from None
    parts = [(part, _part_columns(part, damaged)) for part in sorted(folder.glob("*.parquet"))
             if not part.name.startswith(".")]  # macOS's ._part-*.parquet (AppleDouble), a writer's hidden temporary
    return OldRun(folder, run_id, manifest, parts)


def _small_text(path: Path, damaged: Callable[[Path, str], OutputError]) -> str:
    """A manifest or config as UTF-8 text, read with bounded effort (errors.read_text: no pipe, device or huge file)."""
    try:
        return read_text(path, streams=False)  # a pipe in an old run is damage, not a writer to wait for
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise damaged(path, f"is not UTF-8 text (at byte {e.start})") from None


def _part_columns(part: Path, damaged: Callable[[Path, str], OutputError]) -> list[str]:
    """The columns of schema.SCHEMA a part file holds, from its footer alone; each must cast to its column's type
    without loss, and `path` must be there."""
    try:
        regular = stat.S_ISREG(part.stat().st_mode)
    except OSError as e:
        raise damaged(part, f"cannot be read ({e.strerror or e})") from None
    if not regular:  # a folder, pipe or device named *.parquet
        raise damaged(part, "is not a regular file")
    try:
        with pq.ParquetFile(part) as f:
            held = f.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise damaged(part, f"is not a readable Parquet file ({first_line(e)})") from None
    columns = [name for name in schema.SCHEMA.names if name in held.names]
    if "path" not in columns:
        raise damaged(part, "has no path column, so it is no part of a dogbreed run")
    for name in columns:
        if held.names.count(name) > 1:
            raise damaged(part, f"has {held.names.count(name)} columns named {name}")
        have, want = held.field(name).type, schema.SCHEMA.field(name).type
        if not _fits(have, want):
            raise damaged(part, f"has a column {name} of type {have}, not {want}")
    return columns


def _fits(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether every value of type `have` casts to `want` with nothing lost and no failure: the column's own type,
    a narrower one, or (for faces) a struct with fewer fields. A type that would have to be parsed or could
    overflow (text as a number, int64 as int32, nanoseconds as microseconds) does not fit."""
    t = pa.types
    if t.is_dictionary(have):
        have = have.value_type
    if have == want or t.is_null(have):
        ok = True
    elif t.is_string(want):
        ok = t.is_string(have) or t.is_large_string(have)
    elif t.is_binary(want):
        ok = t.is_binary(have) or t.is_large_binary(have) or t.is_string(have) or t.is_large_string(have)
    elif t.is_integer(want):
        ok = t.is_integer(have) and (have.bit_width < want.bit_width or
                                     (have.bit_width == want.bit_width and t.is_signed_integer(have)))
    elif t.is_floating(want):
        ok = t.is_floating(have)
    elif t.is_timestamp(want):
        ok = t.is_timestamp(have) and _TIME_UNITS.index(have.unit) <= _TIME_UNITS.index(want.unit)
    elif t.is_list(want):
        ok = (t.is_list(have) or t.is_large_list(have)) and _fits(have.value_type, want.value_type)
    elif t.is_struct(want):
        fields = {f.name: f.type for f in want}
        ok = t.is_struct(have) and len({f.name for f in have}) == have.num_fields and all(
            f.name in fields and _fits(f.type, fields[f.name]) for f in have)
    else:
        ok = False
    if not ok:
        return False
    try:  # and this pyarrow can cast it at all
        pa.array([], have).cast(want)
    except pa.ArrowException:
        return False
    return True


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is no JSON value")


def _shown(out: str, root: str | Path, path: Path) -> str:
    """`path` as the user named the output (OUT/runs/...), not as the absolute path it was resolved to."""
    return str(Path(out) / path.relative_to(root))


def _damaged(out: str, root: Path, path: Path, why: str, folder: Path) -> OutputError:
    return OutputError(f"{_shown(out, root, path)} {why}; nothing was migrated: repair it, or move "
                       f"{_shown(out, root, folder)} out of {out} (its rows are then not migrated), and run "
                       f"`dogbreed migrate {out}` again")
