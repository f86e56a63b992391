"""The table's Delta log as `dogbreed check` reads it, without deltalake: its commits, checkpoints and
``_last_checkpoint``, the first commit a reader would stumble on, and the log entries that would stop a reader
(a damaged or lost checkpoint, a stale ``_last_checkpoint``). Nothing here opens an entry that is not a regular file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed.table.location import Location, OutputError, first_line
from dogbreed.table.objects import LOG_DIR

HINT = "_last_checkpoint"
_COMMIT = re.compile(r"(\d{20})\.json")
_CHECKPOINT = re.compile(r"(\d{20})\.checkpoint(?:\.(\d+)\.(\d+))?\.parquet")
_OURS = {"path", "run_id", "status"}  # columns every dogbreed table has had since its first version
TABLE_NAME = "dogbreed scan results"  # the name store.py creates tables with (a test keeps the two the same)
CLEANED = "the commits before it were cleaned up (compact's log retention), so no version can be read"


class DamagedTable(OutputError):
    """A table whose log or data files cannot be read; the sentence names the table, the version and the file."""


def check_hint(loc: Location) -> str:
    return f"`dogbreed check {loc.out}` verifies it and says how to repair it"


@dataclass
class LogState:
    commits: dict[int, str]  # version -> file name, of every commit in the log that is a regular file
    checkpoint: int | None = None  # the newest readable checkpoint's version: where readers start
    problem: tuple[int, str, str] | None = None  # (version, file, what is wrong) of the first damaged commit
    strays: list[tuple[str, str]] = field(default_factory=list)  # (entry, what): checkpoints, _last_checkpoint and
    # odd entries that stop readers although every commit they need is sound; repair moves them aside
    checkpoints: dict[int, list[str]] = field(default_factory=dict)  # version -> its checkpoint file(s)
    others: dict[int, str] = field(default_factory=dict)  # version -> name of an entry named like a commit, not a file
    files: dict[str, int | None] | None = None  # data file -> size of `readable_to`, as replayed from the log
    hint: int | None = None  # the version _last_checkpoint names; -1: it is there but names none (or is not a file)

    @property
    def readable_to(self) -> int | None:
        """The newest version that can be read (the one before the first problem), or None: none can."""
        if self.problem is not None:
            version = self.problem[0] - 1
            if self.checkpoint is None:
                return version if version >= 0 and min(self.commits, default=1) == 0 else None
            return version if version >= self.checkpoint else None
        versions = list(self.commits) + ([self.checkpoint] if self.checkpoint is not None else [])
        return max(versions) if versions else None


def read_log(loc: Location) -> LogState:
    """The log's entries, and the first damage Delta readers would stumble on."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(LOG_DIR), allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise DamagedTable(f"table {loc.out}: its log ({LOG_DIR}) cannot be listed: {first_line(e)}") from None
    state, parts, hint = LogState({}), {}, None
    for info in infos:
        if (m := _COMMIT.fullmatch(info.base_name)):
            if info.type == pafs.FileType.File:
                state.commits[int(m.group(1))] = info.base_name
            else:
                state.others[int(m.group(1))] = info.base_name
        elif (m := _CHECKPOINT.fullmatch(info.base_name)):
            parts.setdefault(int(m.group(1)), []).append(info)
        elif info.base_name == HINT:
            hint = info
    state.checkpoints = {v: sorted(i.base_name for i in files) for v, files in parts.items()}
    lost = _checkpoints(loc, state, parts)
    lost = _hint(loc, state, hint, parts) or lost
    versions = set(state.commits) | set(state.others)
    if not versions:
        return state
    base = state.checkpoint
    if base is None and min(versions) > 0 and lost is not None:  # the commits a reader would start from are gone
        state.problem = (lost[0], lost[1], f"{lost[2]}; {CLEANED}")
        return state
    try:
        current, seen = _checkpoint_files(loc, base, state.checkpoints[base]) if base is not None else ({}, {})
    except (OSError, pa.ArrowException):  # its footer was readable a moment ago: check asks deltalake instead
        current, seen = {}, {}
        base_files_known = False
    else:
        base_files_known = True
    for version in sorted(v for v in state.others if base is not None and v <= base):  # never read, but not ours
        state.strays.append((state.others[version], _not_regular(loc, state.others[version])))
    for version in range(base + 1 if base is not None else 0, max(versions) + 1):
        name = state.commits.get(version) or state.others.get(version) or f"{version:020d}.json"
        if version in state.others:
            why = _not_regular(loc, name)
        elif version not in state.commits:
            why = "is missing"
        else:
            why = _bad_commit(loc, name, version, current, seen)
        if why:
            state.problem = (version, name, why)
            break
    state.files = current if base_files_known else None
    return state


def _not_regular(loc: Location, name: str) -> str:
    info = loc.fs.get_file_info(loc.path(LOG_DIR, name))
    kind = "a folder" if info.type == pafs.FileType.Directory else "not a regular file (a FIFO, socket or device?)"
    return f"is {kind}, never opened"


def _regular(loc: Location, path: str) -> bool:
    """Whether a local entry is a regular file now (the listing may be a moment old): a FIFO would block open()."""
    try:
        return loc.remote or stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # open() then says why


def _checkpoints(loc: Location, state: LogState, parts: dict[int, list[pafs.FileInfo]]) -> tuple[int, str, str] | None:
    """Find the newest readable checkpoint; each newer one that cannot be read is a stray. Returns the newest bad one."""
    bad = None
    for version in sorted(parts, reverse=True):
        infos = sorted(parts[version], key=lambda i: i.base_name)
        why = None
        counts = {int(m.group(3)) for i in infos if (m := _CHECKPOINT.fullmatch(i.base_name)) and m.group(3)}
        if counts and (len(counts) > 1 or len(infos) != counts.pop()):
            why = "is incomplete (parts of a multi-part checkpoint are missing)"
        for info in infos:
            if why is None and info.type != pafs.FileType.File:
                why = _not_regular(loc, info.base_name)
            elif why is None:
                why = _unreadable_checkpoint(loc, info.base_name)
        if why is None:
            state.checkpoint = version
            return bad
        for info in infos:
            state.strays.append((info.base_name, why))
        bad = bad or (version, infos[0].base_name, why)
    return bad


def _unreadable_checkpoint(loc: Location, name: str) -> str | None:
    path = loc.path(LOG_DIR, name)
    try:
        if not _regular(loc, path):
            return "is not a regular file, never opened"
        with loc.fs.open_input_file(path) as f:
            names = pq.ParquetFile(f, pre_buffer=False).schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        return f"cannot be read ({reason(e)})"
    return None if "add" in names else "is not a Delta checkpoint (no add column)"


def reason(e: BaseException) -> str:
    text = first_line(e)
    if "magic bytes not found" in text or "Couldn't deserialize thrift" in text or "footer" in text.lower():
        return "not a whole Parquet file: truncated or overwritten"
    return text.split(": ", 1)[-1] if text.startswith("Could not open Parquet input source") else text


def _hint(loc: Location, state: LogState, info: pafs.FileInfo | None,
          parts: dict[int, list[pafs.FileInfo]]) -> tuple[int, str, str] | None:
    """_last_checkpoint sends readers to its checkpoint: one that is missing, or a hint that cannot be read, is a stray.
    Returns the checkpoint it names where that is missing."""
    if info is None:
        return None
    why, version, state.hint = None, None, -1
    if info.type != pafs.FileType.File or not _regular(loc, loc.path(LOG_DIR, HINT)):
        why = _not_regular(loc, HINT)
    else:
        try:
            with loc.fs.open_input_stream(loc.path(LOG_DIR, HINT)) as f:
                version = json.loads(f.read()).get("version")
        except (OSError, pa.ArrowException) as e:
            why = f"cannot be read ({first_line(e)})"
        except (ValueError, AttributeError):
            why = "is not valid JSON (garbled or cut short)"
        if why is None and not (isinstance(version, int) and version >= 0):
            why = "names no checkpoint version"
        elif why is None:
            state.hint = version
            why = f"names checkpoint {version}, which is missing" if version not in parts else None
    if why is None and state.checkpoint is not None and version <= state.checkpoint:
        return None  # readers look from there for the newest checkpoint, a readable one
    if why is None:  # it names a checkpoint that cannot be read (a stray already): readers would go there
        why = f"names checkpoint {version}, which cannot be read"
    state.strays.append((HINT, why))
    if version is not None and version not in parts:
        return version, f"{version:020d}.checkpoint.parquet", "is missing (the checkpoint _last_checkpoint names)"
    return None


def _checkpoint_files(loc: Location, version: int, names: list[str]) -> tuple[dict[str, int | None], dict[str, tuple[int, str]]]:
    """The data files a (readable) checkpoint holds, with their sizes; and every file it names, added or removed."""
    current: dict[str, int | None] = {}
    seen: dict[str, tuple[int, str]] = {}
    for name in names:
        with loc.fs.open_input_file(loc.path(LOG_DIR, name)) as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            columns = [c for c in ("add.path", "add.size", "remove.path") if c.split(".")[0] in parquet.schema_arrow.names]
            table = parquet.read(columns=columns).flatten()
        column = {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
                  for name in ("add.path", "add.size", "remove.path")}
        for add, size, remove in zip(column["add.path"], column["add.size"], column["remove.path"]):
            if add is not None:
                current[unquote(add)] = size
            for file, kind in ((add, "added"), (remove, "removed")):
                if file is not None:
                    seen[unquote(file)] = (version, kind)
    return current, seen


def _bad_commit(loc: Location, name: str, version: int, current: dict[str, int | None],
                seen: dict[str, tuple[int, str]]) -> str | None:
    """What is wrong with a commit, or None; a sound one is replayed onto `current` (and `seen`: path -> the version
    that last added or removed it, and which)."""
    path = loc.path(LOG_DIR, name)
    if not _regular(loc, path):
        return "is not a regular file, never opened"
    try:
        with loc.fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
        actions = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, pa.ArrowException) as e:
        return f"cannot be read ({first_line(e)})"
    except (UnicodeDecodeError, ValueError):
        return "is not valid JSON (garbled or cut short)"
    if not actions or not all(isinstance(a, dict) and len(a) >= 1 for a in actions):
        return "holds no Delta actions"
    files = []
    for action in actions:  # a file a commit adds or removes lies in the table: repair moves it, compact deletes it
        for kind in ("add", "remove"):
            if kind not in action:
                continue
            file = action[kind].get("path") if isinstance(action[kind], dict) else None
            if not _inside(file):
                return f"names a data file outside the table ({str(file)[:80]!r}; edited by hand?)"
            if kind == "add" and unquote(file) in seen:  # Delta and dogbreed write every file once, under a new name
                return (f"adds data file {unquote(file)} again, which version {seen[unquote(file)][0]} already "
                        f"{seen[unquote(file)][1]} (a copied or replayed commit?)")
            files.append((kind, unquote(file), action[kind].get("size")))
        if isinstance(action.get("metaData"), dict) and (why := _foreign(action["metaData"])):
            return why
    for kind, file, size in files:
        seen[file] = (version, "added" if kind == "add" else "removed")
        if kind == "add":
            current[file] = size if isinstance(size, int) else None
        else:
            current.pop(file, None)
    return None


def _foreign(meta: dict[str, Any]) -> str | None:
    """Why a metaData action is another table's (another name, a schema without dogbreed's columns), or None."""
    try:
        names = {f.get("name") for f in json.loads(meta.get("schemaString") or "{}").get("fields", [])}
    except (ValueError, AttributeError, TypeError):
        return "holds table metadata whose schema cannot be read"
    name = meta.get("name")
    if (name is not None and name != TABLE_NAME) or not _OURS <= names:
        shown = ", ".join(sorted(str(n) for n in names))[:80]
        return f"holds another table's metadata (name {name!r}, columns {shown}): not a commit of this table"
    return None


def _inside(path: object) -> bool:
    """Whether a log's (URL-encoded) data file path is one dogbreed writes: relative, below the table's folder."""
    if not isinstance(path, str) or not path:
        return False
    parts = unquote(path).replace("\\", "/").split("/")
    return not unquote(path).startswith("/") and ":" not in parts[0] and ".." not in parts and "" not in parts


def check_next(loc: Location, version: int | None) -> None:
    """A reader's check of the entry after `version`: deltalake passes over a FIFO or a folder named like the next
    commit, and a scan would decode every photo and then find its commit refused. One stat, no listing."""
    nxt = 0 if version is None else version + 1
    name = f"{nxt:020d}.json"
    try:
        info = loc.fs.get_file_info(loc.path(LOG_DIR, name))
    except (OSError, pa.ArrowException):
        return
    if info.type not in (pafs.FileType.NotFound, pafs.FileType.File):
        raise DamagedTable(f"table {loc.out} is damaged at version {nxt}: {LOG_DIR}/{name} {_not_regular(loc, name)}; "
                           f"{check_hint(loc)}")
