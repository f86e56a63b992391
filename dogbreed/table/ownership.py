"""An output is dogbreed's and nothing else's: the marker that claims a new one, the refusal of anything else.

A new output (absent, or an empty folder or prefix) is marked as a dogbreed table the first time it is written:
``OUT/_dogbreed/table.json``, created if absent. An output that holds anything else (a user's files, another
tool's Delta table, photos) is refused with one sentence before anything is written, and so is an output that
is a photo root, lies inside one or holds one. Tables written before the marker existed are recognised by their
Delta table name and marked on their next write.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from dogbreed.table.location import Location, OutputError, first_line
from dogbreed.table.objects import META_DIR, is_temporary, objects
from dogbreed.table.store import LOG_DIR, TABLE_NAME, StoreError, utcnow

MARKER = "table.json"
MARKER_FORMAT = "dogbreed-table"
# What dogbreed itself puts at the top of an output: the Delta log, its data files, its own folder, and the
# old runs/ layout that `dogbreed migrate` moved aside.
OWN_ENTRIES = {LOG_DIR, "data", META_DIR, "_runs_before_delta"}
OLD_RUNS = "runs"  # the layout before the Delta table: only `dogbreed migrate` writes to such an output
# A data file delta-rs writes at the table's root (compaction's output): part-00001-<uuid>-c000.zstd.parquet
DELTA_FILE = re.compile(r"part-\d{5}-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-c\d{3}(\.\w+)?\.parquet")


def _entries(loc: Location) -> list[str] | None:
    """Top-level names under the output, or None where it does not exist yet."""
    try:
        if not loc.remote:
            return sorted(os.listdir(loc.root)) if os.path.isdir(loc.root) else None
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.root, allow_not_found=True, recursive=False))
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"cannot list {loc.out}: {first_line(e)}") from None
    return sorted(i.base_name for i in infos)


def _marker(loc: Location) -> dict | None:
    raw = objects(loc.uri, loc.root, "").get(MARKER)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        raise OutputError(f"{loc.out}: {META_DIR}/{MARKER} is not a dogbreed table marker; this folder was not made "
                          "by dogbreed")
    return doc


def _delta_name(loc: Location) -> str | None:
    """The name in the Delta table's metadata ('' for an unnamed table)."""
    from deltalake import DeltaTable

    try:
        return DeltaTable(loc.uri, storage_options=loc.storage_options()).metadata().name or ""
    except Exception as e:  # noqa: BLE001 - a log that cannot be read is not ours to judge
        raise OutputError(f"{loc.out} holds a Delta log that cannot be read ({first_line(e)}); dogbreed reads and "
                          "writes only its own tables") from None


def inspect(loc: Location, reading: bool = False) -> str:
    """What the output is: 'new' (absent or empty), 'ours' (marked, or a dogbreed table from before the marker),
    or 'old-layout' (the runs/ folders of dogbreed before the Delta table); anything else is an OutputError, worded
    for a command that would write there, or (`reading`) for one that reads a table (latest, check, similar)."""
    entries = _entries(loc)
    if not entries:
        return "new"
    if META_DIR in entries and _marker(loc) is not None:
        return "ours"
    if LOG_DIR in entries:
        name = _delta_name(loc)
        if name != TABLE_NAME:
            other = f"is a Delta table of another tool ({f'named {name!r}' if name else 'unnamed'})"
            raise OutputError(f"{loc.out} {other}, not a dogbreed table" if reading else f"--out {loc.out} {other}; "
                              "dogbreed writes only to its own tables: give a new folder")
        foreign = [e for e in entries if e not in OWN_ENTRIES and not DELTA_FILE.fullmatch(e)]
        if foreign and not reading:  # a reader reads the table beside them; a writer never writes beside them
            raise OutputError(f"--out {loc.out} holds {foreign[0]!r} besides a dogbreed table; dogbreed writes only to "
                              "a folder of its own")
        return "ours"
    if OLD_RUNS in entries and all(e in OWN_ENTRIES | {OLD_RUNS, "_staging", ".lock"} for e in entries):
        return "old-layout"
    if set(entries) <= {META_DIR, "data"} and _entries_of(loc, META_DIR) == ["lock"]:
        return "ours"  # a first run of an older dogbreed, killed before its commit: only its lock and run files
    if entries == [META_DIR] and all(is_temporary(e, MARKER) for e in _entries_of(loc, META_DIR)):
        return "new"  # another first run's claim in progress (its marker not yet linked in), or one killed half-way
    held = f"{entries[0]!r}{' and more' if len(entries) > 1 else ''}, which dogbreed did not write"
    if reading:
        raise OutputError(f"{loc.out} is not a dogbreed table: it holds {held}")
    raise OutputError(f"--out {loc.out} already holds {held}; give a new or empty folder (dogbreed never writes beside "
                      "other files)")


def _entries_of(loc: Location, sub: str) -> list[str]:
    inner = Location(loc.out, loc.uri, loc.fs, loc.path(sub))
    return _entries(inner) or []


def claimable(loc: Location, allow_old_layout: bool = False) -> str:
    """What :func:`inspect` says, refusing what a scan may not write to; writes nothing (a dry run's check)."""
    kind = inspect(loc)
    if kind == "old-layout" and not allow_old_layout:
        raise OutputError(f"--out {loc.out} holds results in the old runs/ layout: convert it first with "
                          f"`dogbreed migrate {loc.out}`")
    return kind


def claim(loc: Location, allow_old_layout: bool = False) -> None:
    """Before the first write: refuse an output that holds anything but a dogbreed table; mark a new one."""
    kind = claimable(loc, allow_old_layout)
    if kind == "ours" and _marker_quiet(loc) is not None:
        return
    doc = {"format": MARKER_FORMAT, "format_version": 1, "created_at": utcnow().isoformat(),
           "note": "this folder is a dogbreed results table (Delta Lake); dogbreed deletes only files it wrote here"}
    if not loc.remote:
        Path(loc.root).mkdir(parents=True, exist_ok=True)
    try:
        objects(loc.uri, loc.root, "").create(MARKER, json.dumps(doc, indent=2).encode())
    except OSError as e:
        raise StoreError(f"cannot write to {loc.out}: {e.strerror or e}") from None
    _marker(loc)  # whoever won the race, it must be a dogbreed marker now


def _marker_quiet(loc: Location) -> dict | None:
    try:
        return _marker(loc)
    except OutputError:
        return None


def _resolved(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_roots(loc: Location, roots: list[str]) -> None:
    """Refuse an output that is a photo root, lies inside one, or holds one: a scan must never write among photos."""
    out = loc.uri if loc.remote else _resolved(loc.root)
    for root in roots:
        r = _resolved(root)
        if _inside(out, r):
            where = "is" if out == r else "lies inside"
            raise OutputError(f"--out {loc.out} {where} the photo root {root}; give an output folder outside the "
                              "photos")
        if _inside(r, out):
            raise OutputError(f"--out {loc.out} holds the photo root {root}; give an output folder outside the photos")

