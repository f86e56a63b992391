"""A damaged table, named in one sentence, checked whole by `dogbreed check`, and repaired keeping its history.

What can go wrong under a table: a commit of the log deleted or garbled (a hand, a bad sync, a disk), a data file
deleted or truncated. Readers name the table, the version and the file (:class:`DamagedTable`) instead of a
traceback. :func:`check` verifies a table: the log continuous from its last checkpoint and every commit readable,
every file the current version references present (at its recorded size) and readable (its Parquet footer; with
``deep``, every page). :func:`repair` makes it readable again and loses only what was already lost:

- log commits from the first damaged one on are moved aside (``_dogbreed/quarantine/<time>/``), so the last
  version before the damage is current again;
- data files that are missing or unreadable are removed from the current version by a Delta ``FSCK`` commit
  (unreadable ones moved aside first). Older versions, and the history, stay.

The photos whose rows were lost simply have no row (or an older one) again: the next scan decodes them.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed.table.location import Location, OutputError, first_line
from dogbreed.table.objects import LOG_DIR, META_DIR

QUARANTINE = "quarantine"
_COMMIT = re.compile(r"(\d{20})\.json")
_CHECKPOINT = re.compile(r"(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet")


class DamagedTable(OutputError):
    """A table whose log or data files cannot be read; the sentence names the table, the version and the file."""


def _hint(loc: Location) -> str:
    return f"`dogbreed check {loc.out}` verifies it and says how to repair it"


@dataclass
class LogState:
    commits: dict[int, str]  # version -> file name, of every commit in the log
    checkpoint: int | None  # the newest checkpoint's version
    problem: tuple[int, str, str] | None  # (version, file, what is wrong) of the first damaged commit

    @property
    def readable_to(self) -> int | None:
        """The newest version that can be read (the one before the first problem), or None: none can."""
        if self.problem is not None:
            if self.checkpoint is None and min(self.commits) > 0:  # the commits a reader would start from are gone
                return None
            version = self.problem[0] - 1
            base = self.checkpoint if self.checkpoint is not None else 0
            return version if version >= base and (version in self.commits or version == self.checkpoint) else None
        return max(self.commits) if self.commits else None


def read_log(loc: Location) -> LogState:
    """The log's commits and checkpoints, and the first commit Delta readers would stumble on."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(LOG_DIR), allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise DamagedTable(f"table {loc.out}: its log ({LOG_DIR}) cannot be listed: {first_line(e)}") from None
    commits, checkpoints = {}, []
    for info in infos:
        if (m := _COMMIT.fullmatch(info.base_name)):
            commits[int(m.group(1))] = info.base_name
        elif (m := _CHECKPOINT.fullmatch(info.base_name)):
            checkpoints.append(int(m.group(1)))
    checkpoint = max(checkpoints) if checkpoints else None
    state = LogState(commits, checkpoint, None)
    if not commits:
        return state
    if checkpoint is None and min(commits) > 0 and (hinted := _checkpoint_hint(loc)) is not None:
        # the commits before the checkpoint _last_checkpoint names were cleaned up, and the checkpoint is gone too
        state.problem = (hinted, f"{hinted:020d}.checkpoint.parquet",
                         "is missing (the checkpoint _last_checkpoint names; the commits before it were cleaned up)")
        return state
    first = checkpoint + 1 if checkpoint is not None else 0
    for version in range(first, max(commits) + 1):
        name = commits.get(version, f"{version:020d}.json")
        if version not in commits:
            state.problem = (version, name, "is missing")
            break
        why = _bad_commit(loc, name)
        if why:
            state.problem = (version, name, why)
            break
    return state


def _bad_commit(loc: Location, name: str) -> str | None:
    try:
        with loc.fs.open_input_stream(loc.path(LOG_DIR, name)) as f:
            text = f.read().decode("utf-8")
        actions = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, pa.ArrowException) as e:
        return f"cannot be read ({first_line(e)})"
    except (UnicodeDecodeError, ValueError):
        return "is not valid JSON (garbled or cut short)"
    if not actions or not all(isinstance(a, dict) and len(a) >= 1 for a in actions):
        return "holds no Delta actions"
    for action in actions:  # a file a commit adds or removes lies in the table: repair moves it, compact deletes it
        for kind in ("add", "remove"):
            path = action.get(kind, {}).get("path") if isinstance(action.get(kind), dict) else None
            if kind in action and not _inside(path):
                return f"names a data file outside the table ({str(path)[:80]!r}; edited by hand?)"
    return None


def _inside(path: object) -> bool:
    """Whether a log's (URL-encoded) data file path is one dogbreed writes: relative, below the table's folder."""
    if not isinstance(path, str) or not path:
        return False
    parts = unquote(path).replace("\\", "/").split("/")
    return not unquote(path).startswith("/") and ":" not in parts[0] and ".." not in parts and "" not in parts


def log_damage(loc: Location, error: BaseException) -> DamagedTable:
    """The sentence for a table deltalake could not open: the first damaged commit, where the log shows one."""
    problem = read_log(loc).problem
    if problem is not None:
        version, name, what = problem
        return DamagedTable(f"table {loc.out} is damaged at version {version}: {LOG_DIR}/{name} {what}; {_hint(loc)}")
    return DamagedTable(f"table {loc.out}: its log cannot be read ({first_line(error)}); {_hint(loc)}")


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
        what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({_reason(e)})"
        raise DamagedTable(f"table {loc.out} is damaged at version {_version(table)}: data file {name} {what}; "
                           f"{_hint(loc)}") from None


def _reason(e: BaseException) -> str:
    text = first_line(e)
    if "magic bytes not found" in text or "Couldn't deserialize thrift" in text or "footer" in text.lower():
        return "not a whole Parquet file: truncated or overwritten"
    return text.split(": ", 1)[-1] if text.startswith("Could not open Parquet input source") else text


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
        return self.log.problem is None and not self.missing and not self.unreadable

    def lines(self) -> list[str]:
        log, out = self.log, [f"table {self.out}"]
        if not log.commits and self.unlogged:
            return out + [f"  no commits, but data/ holds {self.unlogged} data file(s) of an earlier history (its log was "
                          "deleted, or its first version moved aside by --repair): the next scan starts the table "
                          "again and decodes every photo"]
        if not log.commits:
            return out + ["  no commits: nothing to check (a new output)"]
        versions = sorted(log.commits)
        out.append(f"  log: versions {versions[0]}..{versions[-1]}"
                   + (f", checkpoint at {log.checkpoint}" if log.checkpoint is not None else ""))
        if log.problem:
            v, name, what = log.problem
            last = versions[-1]
            out.append(f"  DAMAGED log: version {v} ({LOG_DIR}/{name}) {what}; "
                       + (f"versions {v}..{last} cannot be read" if last > v else f"version {v} cannot be read"))
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
        steps = []
        if log.problem:
            steps.append("moves the damaged log commits aside" + (" (the last good version becomes current)"
                                                                  if self.version is not None else
                                                                  " (no version is left: the next scan starts over)"))
        if self.missing or self.unreadable:
            steps.append("removes the damaged data files from the table in a new version")
        out.append(f"  repair: `dogbreed check {self.out} --repair` {' and '.join(steps)}, keeping the history; "
                   "the next scan decodes again the photos whose rows were lost")
        return out


def check(loc: Location, deep: bool = False) -> Health:
    """Verify the table at loc: its log, and every file its newest readable version references."""
    from deltalake import DeltaTable

    health = Health(loc.out, read_log(loc))
    health.version = health.log.readable_to
    if not health.log.commits:
        try:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path("data"), recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException):
            infos = []
        health.unlogged = sum(1 for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if health.version is None:
        return health
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
        return _reason(e)
    return None


def repair(loc: Location, health: Health) -> list[str]:
    """Make a damaged table readable again (call with the lock held); returns what was done, one line each."""
    from deltalake import CommitProperties, DeltaTable

    done: list[str] = []
    aside = f"{META_DIR}/{QUARANTINE}/{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    if health.log.problem is not None:
        # from the first damaged commit on; every commit where none can be read (the ones before would stay unreadable)
        first = health.log.problem[0] if health.version is not None else min(health.log.commits)
        names = [name for v, name in sorted(health.log.commits.items()) if v >= first]
        for name in names:
            _move(loc, f"{LOG_DIR}/{name}", f"{aside}/{LOG_DIR}/{name}")
        _drop_checkpoint_hint(loc, first)
        done.append(f"moved {len(names)} log commit(s) from version {first} on to {aside}/{LOG_DIR}/")
        health = check(loc)
    if health.version is None:
        done.append("no version is left: the next scan starts the table again (its data files stay in data/)")
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


def _checkpoint_hint(loc: Location) -> int | None:
    """The version _last_checkpoint names, or None (absent, unreadable)."""
    try:
        with loc.fs.open_input_stream(loc.path(LOG_DIR, "_last_checkpoint")) as f:
            version = json.loads(f.read()).get("version")
    except (OSError, pa.ArrowException, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and version >= 0 else None


def _drop_checkpoint_hint(loc: Location, first: int) -> None:
    """_last_checkpoint pointing at a version that was moved aside would send readers there."""
    version = _checkpoint_hint(loc)
    if version is not None and version >= first:
        loc.fs.delete_file(loc.path(LOG_DIR, "_last_checkpoint"))
