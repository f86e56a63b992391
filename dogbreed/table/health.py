"""A damaged table, named in one sentence, checked whole by `dogbreed check`, and repaired keeping its history.

What can go wrong under a table: a commit of the log deleted or garbled (a hand, a bad sync, a disk), a data file
deleted or truncated. Readers name the table, the version and the file (:class:`DamagedTable`) instead of a
traceback. :func:`check` verifies a table: the log continuous from its last checkpoint and every commit readable,
every file the current version references present (at its recorded size) and readable (its Parquet footer; with
``deep``, every page). :func:`repair` makes it readable again and loses only what was already lost:

- log commits from the first damaged one on are moved aside (``_dogbreed/quarantine/<time>/``), so the last
  version before the damage is current again;
- data files that are missing or unreadable are removed from the current version by a Delta ``FSCK`` commit
  (unreadable ones moved aside first). Older versions, and the history, stay;
- a checkpoint lost or unreadable, a ``_last_checkpoint`` naming none, an entry named like a commit that is no file:
  only those are moved aside where every commit readers need is there (they replay the commits instead). Where
  compact's log retention cleaned up the commits before the checkpoint, no version can be read: the whole log goes.

The photos whose rows were lost simply have no row (or an older one) again: the next scan decodes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed.table.deltalog import CLEANED, HINT, DamagedTable, LogState, check_hint, read_log, reason
from dogbreed.table.location import Location, first_line
from dogbreed.table.objects import LOG_DIR, META_DIR

__all__ = ["DamagedTable", "Health", "LogState", "check", "log_damage", "read_log", "reading", "repair"]
QUARANTINE = "quarantine"


def log_damage(loc: Location, error: BaseException | None) -> DamagedTable | None:
    """The sentence for a table deltalake could not open: the first damaged commit or log entry the log shows. With
    no error (deltalake opened it), None where the log shows no damage: a writer asks before it rewrites the table."""
    log = read_log(loc)
    if log.problem is not None:
        version, name, what = log.problem
        return DamagedTable(f"table {loc.out} is damaged at version {version}: {LOG_DIR}/{name} {what}; {check_hint(loc)}")
    if log.strays:
        name, what = log.strays[0]
        return DamagedTable(f"table {loc.out} is damaged: {LOG_DIR}/{name} {what}; {check_hint(loc)}")
    if error is None:
        return None
    return DamagedTable(f"table {loc.out}: its log cannot be read ({first_line(error)}); {check_hint(loc)}")


def _version(table: Any) -> str:
    try:
        return str(table.version())
    except Exception:  # noqa: BLE001 - only for the sentence
        return "?"


@contextmanager
def reading(loc: Location, table: Any) -> Iterator[None]:
    """Read a table's data files; a missing or unreadable one becomes one sentence naming table, version, file."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        text = str(e)
        name = next((p for p in (_files(table) if table is not None else []) if p in text), None)
        if name is None:
            raise DamagedTable(f"cannot read the table at {loc.out}: {first_line(e)}") from None
        what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({reason(e)})"
        raise DamagedTable(f"table {loc.out} is damaged at version {_version(table)}: data file {name} {what}; "
                           f"{check_hint(loc)}") from None


def _files(table: Any) -> list[str]:
    return table.get_add_actions(flatten=True).column("path").to_pylist()


# ---- check and repair --------------------------------------------------------------------------------------------


@dataclass
class Health:
    """What `dogbreed check` found."""

    out: str
    log: LogState
    version: int | None = None  # the version whose files were checked (the newest readable one)
    files: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    unlogged: int = 0  # data files under data/ while the log has no commit (an earlier history's)

    @property
    def ok(self) -> bool:
        return self.log.problem is None and not self.log.strays and not self.missing and not self.unreadable

    def lines(self) -> list[str]:
        log, out = self.log, [f"table {self.out}"]
        if not log.commits and not log.others and not log.strays and log.checkpoint is None:
            if self.unlogged:
                return out + [f"  no commits, but data/ holds {self.unlogged} data file(s) of an earlier history (its "
                              "log was deleted, or its first version moved aside by --repair): the next scan starts "
                              "the table again and decodes every photo"]
            return out + ["  no commits: nothing to check (a new output)"]
        versions = sorted(set(log.commits) | set(log.others)) or [log.checkpoint]
        out.append((f"  log: versions {versions[0]}..{versions[-1]}" if versions != [None] else "  log: no commits")
                   + (f", checkpoint at {log.checkpoint}" if log.checkpoint is not None else ""))
        for name, what in log.strays:
            out.append(f"  DAMAGED log entry: {LOG_DIR}/{name} {what}")
        if log.strays and log.problem is None and self.version is not None:
            out.append("  every commit readers need is sound: moving the entries above aside loses nothing")
        if log.problem:
            v, name, what = log.problem
            last = versions[-1]
            out.append(f"  DAMAGED log: version {v} ({LOG_DIR}/{name}) {what}"
                       + ("" if what.endswith(CLEANED) else "; " + (f"versions {v}..{last} cannot be read" if last > v
                                                                    else f"version {v} cannot be read")))
        if self.version is None:
            out.append("  no version can be read")
        else:
            out.append(f"  version {self.version}: {self.files} data files, "
                       f"{self.files - len(self.missing) - len(self.unreadable)} present and readable")
            out += [f"  DAMAGED data file: {name} is missing" for name in self.missing]
            out += [f"  DAMAGED data file: {name} cannot be read ({why})" for name, why in self.unreadable]
        if self.ok:
            out.append("  ok")
            return out
        lost = self.log.problem is not None or self.missing or self.unreadable
        out.append(f"  repair: `dogbreed check {self.out} --repair` {' and '.join(self._steps())}"
                   + (", keeping the history" if self.version is not None else "")
                   + ("; the next scan decodes again the photos whose rows were lost" if lost else ""))
        return out

    def _steps(self) -> list[str]:
        log, steps = self.log, []
        if self.version is None:
            return [f"moves the whole log aside to {META_DIR}/{QUARANTINE}/ (no version is left: the next scan starts "
                    "over)"]
        if log.strays:
            steps.append("moves the damaged log entries aside")
        if log.problem:
            steps.append("moves the damaged log commits aside (the last good version becomes current)")
        if self.missing or self.unreadable:
            steps.append("removes the damaged data files from the table in a new version")
        return steps


def check(loc: Location, deep: bool = False) -> Health:
    """Verify the table at loc: its log, and every file its newest readable version references."""
    from deltalake import DeltaTable

    health = Health(loc.out, read_log(loc))
    health.version = health.log.readable_to
    if not health.log.commits:  # data files of an earlier history: a run's under data/, compact's in the folder
        infos = []
        for folder, recursive in (("data", True), ("", False)):
            try:
                infos += loc.fs.get_file_info(pafs.FileSelector(loc.path(folder) if folder else loc.root,
                                                                recursive=recursive, allow_not_found=True))
            except (OSError, pa.ArrowException):
                pass
        health.unlogged = sum(1 for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if health.version is None:
        return health
    if health.log.strays and health.log.files is not None:
        sizes = health.log.files  # deltalake would stop at the entries repair moves aside: the log's own replay
    else:
        try:
            table = DeltaTable(loc.uri, version=health.version, storage_options=loc.storage_options())
        except Exception as e:  # noqa: BLE001 - deltalake's own errors: the log holds more than read_log sees
            health.log.problem = (health.version, f"{health.version:020d}.json", f"cannot be loaded ({first_line(e)})")
            health.version = None
            return health
        adds = table.get_add_actions(flatten=True)
        sizes = dict(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist()))
    health.files = len(sizes)
    infos = loc.fs.get_file_info([loc.path(p) for p in sizes]) if sizes else []
    for (name, size), info in zip(sizes.items(), infos):
        if info.type != pafs.FileType.File:
            health.missing.append(name)
        elif size is not None and info.size != size:
            health.unreadable.append((name, f"{info.size} bytes where the log says {size}: truncated or overwritten"))
        else:
            why = _unreadable(loc, name, deep)
            if why:
                health.unreadable.append((name, why))
    return health


def _unreadable(loc: Location, name: str, deep: bool) -> str | None:
    try:
        with loc.fs.open_input_file(loc.path(name)) as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            if deep:
                for i in range(parquet.num_row_groups):
                    parquet.read_row_group(i)
    except (OSError, pa.ArrowException) as e:
        return reason(e)
    missing = sorted({"path", "run_id"} - set(parquet.schema_arrow.names))
    return f"is not a dogbreed data file (no {', '.join(missing)} column)" if missing else None


def repair(loc: Location, health: Health) -> list[str]:
    """Make a damaged table readable again (call with the lock held); returns what was done, one line each."""
    from deltalake import CommitProperties, DeltaTable

    done: list[str] = []
    aside = f"{META_DIR}/{QUARANTINE}/{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    log = health.log
    if log.problem is not None or log.strays:
        if health.version is None:  # nothing can be read: the whole log goes, or a checkpoint left would be read
            first = -1
        else:
            first = log.problem[0] if log.problem is not None else health.version + 1
        names = [name for v, name in sorted({**log.commits, **log.others}.items()) if v >= first]
        names += [stray for stray, _ in log.strays if stray != HINT and stray not in names]
        names += [n for v, ns in sorted(log.checkpoints.items()) if v >= first or first < 0 for n in ns if n not in names]
        # _last_checkpoint naming a version moved aside (or none) would send readers there
        hinted = log.hint is not None and (log.hint < 0 or any(s == HINT for s, _ in log.strays) or
                                           (bool(names) and log.hint >= first))
        for name in names + ([HINT] if hinted else []):
            _move(loc, f"{LOG_DIR}/{name}", f"{aside}/{LOG_DIR}/{name}")
        if names:
            done.append(f"moved {len(names)} log entr{'y' if len(names) == 1 else 'ies'} "
                        + (f"from version {first} on " if first >= 0 and log.problem is not None else "")
                        + f"to {aside}/{LOG_DIR}/" + (f" (and {HINT})" if hinted else ""))
        elif hinted:
            done.append(f"moved {LOG_DIR}/{HINT} to {aside}/{LOG_DIR}/ (readers replay the commits instead)")
        health = check(loc)
    if health.version is None:
        done.append("no version is left: the next scan starts the table again (its data files stay where they are)")
        return done
    for name, _ in health.unreadable:
        _move(loc, name, f"{aside}/{name}")
    if health.missing or health.unreadable:
        table = DeltaTable(loc.uri, storage_options=loc.storage_options())
        result = table.repair(commit_properties=CommitProperties(custom_metadata={"dogbreed": "check --repair"}))
        removed = len(result.get("files_removed", [])) if isinstance(result, dict) else 0
        done.append(f"removed {removed} damaged data file(s) from the table in version {table.version()}"
                    + (f" (unreadable ones moved to {aside}/)" if health.unreadable else ""))
    return done


def _move(loc: Location, src: str, dst: str) -> None:
    if not loc.remote:
        loc.fs.create_dir(loc.path(dst.rsplit("/", 1)[0]), recursive=True)
    loc.fs.move(loc.path(src), loc.path(dst))

