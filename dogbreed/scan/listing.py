"""Listing an archive into Arrow tables: normalised roots, any file name, symlinks kept inside the roots.

A listing never holds a Python object per file: it walks with ``os.scandir`` on raw bytes names and
emits columnar chunks, so a million files cost a few tens of MiB of Arrow buffers. Names that are not
valid UTF-8 keep their raw bytes (``raw``); their text form (``path``) escapes the bad bytes as ``\\xNN``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from dogbreed.errors import Refused

CHUNK_ROWS = 65_536  # files per Arrow chunk while walking: bounds the Python lists alive at once

LISTING_SCHEMA = pa.schema([
    ("path", pa.string()),        # text form of the path: UTF-8, undecodable bytes escaped as \xNN
    ("raw", pa.binary()),         # the path's exact bytes when path.encode() is not them (see exact_bytes), else null
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("ctime_ns", pa.int64()),     # inode change time; null where the filesystem has none (object stores)
    ("root", pa.int32()),         # index into the normalised roots
    ("note_status", pa.string()),  # set when listing already decided the row: 'error' or 'skipped'
    ("note", pa.string()),        # its one-line reason
    ("note_kind", pa.string()),   # for errors: 'permanent' or 'transient'
])

FollowSymlinks = Literal["inside", "all", "none"]


class RootError(Refused):
    """A root that cannot be scanned (missing, not a folder, unreadable)."""


def is_uri(path: str) -> bool:
    return "://" in path


# A backslash that starts what reads as an escape (\\x and two hex digits) is itself written \\x5c in the text form:
# otherwise a name spelling "\\xe9" and a name holding the byte 0xE9 would share one path, and one row between them
_LOOKS_ESCAPED = re.compile(rb"\\(?=x[0-9A-Fa-f]{2})")


def text_path(raw: bytes) -> str:
    """The text form of a raw path: itself when it is UTF-8, else with each bad byte written as \\xNN (and a literal
    backslash that would read as such an escape written as \\x5c, so that two names never share one text form)."""
    if b"\\x" in raw:
        raw = _LOOKS_ESCAPED.sub(rb"\\x5c", raw)
    return raw.decode("utf-8", "backslashreplace")


def is_utf8(raw: bytes) -> bool:
    if raw.isascii():
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def exact_bytes(raw: bytes) -> bytes | None:
    """The bytes a row keeps beside its text path: None when the text form encodes back to them exactly (UTF-8 without
    a backslash that reads as an escape), else the bytes themselves."""
    return None if is_utf8(raw) and not (b"\\x" in raw and _LOOKS_ESCAPED.search(raw)) else raw


def _inside(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


@dataclass(frozen=True)
class Roots:
    """Roots after normalisation: absolute, real (symlinks and '..' resolved), no trailing '/', none inside another."""

    roots: list[str]
    dropped: list[tuple[str, str]]  # (root as given, the root it lies inside): scanned once, through that one


def normalise_roots(given: list[str]) -> Roots:
    """Resolve '..', trailing '/', symlinked roots; drop duplicates and roots that lie inside another root."""
    resolved: list[str] = []
    for root in given:
        if is_uri(root):
            resolved.append(root.rstrip("/") if not root.endswith(":///") else root)
        else:
            resolved.append(os.path.realpath(root))
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    for given_root, root in sorted(zip(given, resolved), key=lambda p: (len(p[1]), p[1])):
        outer = next((k for k in kept if root == k or root.startswith(k.rstrip("/") + "/")), None)
        if outer is None:
            kept.append(root)
        else:
            dropped.append((given_root, outer))
    order = {r: i for i, r in enumerate(resolved)}
    return Roots(sorted(kept, key=lambda r: order[r]), dropped)


def check_root(root: str) -> None:
    """Raise RootError unless root is an existing, readable folder (or a reachable URI prefix)."""
    if is_uri(root):
        from pyarrow import fs as pafs

        from dogbreed.table.location import filesystem_from_uri

        try:
            filesystem, base = filesystem_from_uri(root)
            info = filesystem.get_file_info(base)
        except Exception as e:  # noqa: BLE001 - any filesystem failure refuses the root
            raise RootError(f"root {root} is unreachable: {str(e).splitlines()[0]}") from None
        if info.type != pafs.FileType.Directory:
            raise RootError(f"root {root} is not a folder")
        return
    try:
        os.stat(root)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise  # a name no file system takes is a usage error (the CLI says so, exit 2), not an unmounted archive
        raise RootError(f"root {root} does not exist (is the archive mounted?)") from None
    if not os.path.isdir(root):
        raise RootError(f"root {root} is not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise RootError(f"root {root} is not readable")


class _Chunks:
    """Column lists for one chunk of the listing; flushed to an Arrow record batch every CHUNK_ROWS files."""

    def __init__(self, root_index: int):
        self.root_index = root_index
        self.batches: list[pa.RecordBatch] = []
        self._reset()

    def _reset(self) -> None:
        self.raw: list[bytes] = []
        self.size: list[int] = []
        self.mtime: list[int] = []
        self.ctime: list[int | None] = []
        self.note_status: list[str | None] = []
        self.note: list[str | None] = []
        self.note_kind: list[str | None] = []

    def add(self, raw: bytes, size: int, mtime_ns: int, ctime_ns: int | None,
            note_status: str | None = None, note: str | None = None, note_kind: str | None = None) -> None:
        self.raw.append(raw)
        self.size.append(size)
        self.mtime.append(mtime_ns)
        self.ctime.append(ctime_ns)
        self.note_status.append(note_status)
        self.note.append(note)
        self.note_kind.append(note_kind)
        if len(self.raw) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.raw:
            return
        n = len(self.raw)
        self.batches.append(pa.RecordBatch.from_arrays([
            pa.array([text_path(r) for r in self.raw], pa.string()),
            pa.array([exact_bytes(r) for r in self.raw], pa.binary()),
            pa.array(self.size, pa.int64()),
            pa.array(self.mtime, pa.int64()),
            pa.array(self.ctime, pa.int64()),
            pa.array([self.root_index] * n, pa.int32()),
            pa.array(self.note_status, pa.string()),
            pa.array(self.note, pa.string()),
            pa.array(self.note_kind, pa.string()),
        ], schema=LISTING_SCHEMA))
        self._reset()


def _special(mode: int) -> str:
    """The skipped row's reason for a file that is not a regular file (never opened: reading a FIFO can block)."""
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file")
    return f"not a regular file ({kind}); never opened"


def _error_from_stat(err: OSError) -> tuple[str, str]:
    if err.errno == errno.ELOOP:
        return "symlink loop", "permanent"
    if err.errno == errno.ENOENT:
        return "broken symlink (its target does not exist)", "transient"
    return f"cannot stat: {err.strerror}", "transient"


def _walk_local(top: bytes, out: _Chunks, all_roots: list[bytes], seen: set[tuple[int, int]], include_hidden: bool,
                follow: FollowSymlinks, deferred: list[tuple[bytes, tuple[int, int], _Chunks]]) -> None:
    """Depth-first, sorted by name, over real folders. A symlinked folder is deferred until every real folder of
    every root has been walked, so a real folder always wins over a link to it (see list_roots)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            lst = os.lstat(folder) if os.path.lexists(folder) else None
            out.add(folder, 0, lst.st_mtime_ns if lst else 0, lst.st_ctime_ns if lst else None,
                    "error", f"folder unreadable: {e.strerror}", "transient")
            continue
        subdirs: list[bytes] = []
        for e in entries:
            if not include_hidden and e.name.startswith(b"."):
                continue
            try:
                if e.is_symlink():
                    _link(e, out, all_roots, follow, deferred)
                elif e.is_dir(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:  # else: a second route (a bind mount) to a folder walked already
                        seen.add(key)
                        subdirs.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.add(e.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                else:  # a FIFO, socket or device: opening it could block forever, so it is never opened
                    st = e.stat(follow_symlinks=False)
                    out.add(e.path, 0, st.st_mtime_ns, st.st_ctime_ns, "skipped", _special(st.st_mode))
            except OSError as err:  # vanished while listed, or unreadable metadata
                reason, kind = _error_from_stat(err)
                out.add(e.path, 0, 0, None, "error", reason, kind)
        stack.extend(reversed(subdirs))


def _link(e: os.DirEntry, out: _Chunks, all_roots: list[bytes], follow: FollowSymlinks,
          deferred: list[tuple[bytes, tuple[int, int], _Chunks]]) -> None:
    """One symlink: a row for a link to a file, a deferred walk for a link to a folder, or a row saying why not."""
    lst = e.stat(follow_symlinks=False)
    ident = (lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns)
    if follow == "none":
        out.add(e.path, *ident, "skipped", "symlink (follow_symlinks: none)")
        return
    if follow == "inside" and not any(_inside(os.path.realpath(e.path), r) for r in all_roots):
        out.add(e.path, *ident, "skipped", "symlink to a place outside the roots (follow_symlinks: inside)")
        return
    try:
        st = e.stat(follow_symlinks=True)
    except OSError as err:
        out.add(e.path, *ident, "error", *_error_from_stat(err))
        return
    if stat.S_ISDIR(st.st_mode):
        deferred.append((e.path, (st.st_dev, st.st_ino), out))
    elif stat.S_ISREG(st.st_mode):
        out.add(e.path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    else:
        out.add(e.path, *ident, "skipped", _special(st.st_mode))


def _walk_uri(root: str, index: int, include_hidden: bool) -> list[pa.RecordBatch]:
    """Every object under a pyarrow filesystem URI (s3://, gs://, file://)."""
    from pyarrow import fs as pafs

    from dogbreed.table.location import filesystem_from_uri

    filesystem, base = filesystem_from_uri(root)
    scheme = root.split("://", 1)[0]
    out = _Chunks(index)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):]
        if not include_hidden and any(part.startswith(".") for part in rel.split("/")):
            continue
        mtime_ns = int(info.mtime_ns) if info.mtime_ns is not None else 0
        out.add(f"{scheme}://{info.path}".encode(), int(info.size or 0), mtime_ns, None)
    out.flush()
    return out.batches


def list_roots(roots: list[str], include_hidden: bool = False, follow: FollowSymlinks = "inside") -> pa.Table:
    """Every file under the (normalised) roots as one Arrow table of LISTING_SCHEMA; a bad root raises RootError.

    Real folders are walked first. Then each symlinked folder: one that points to a folder containing it is a
    loop (an error row); one that points to a folder walked already, through its real path or another link, is
    a second route and is skipped quietly; any other is walked under the link's path.
    """
    for root in roots:
        check_root(root)
    local = [os.fsencode(r) for r in roots if not is_uri(r)]
    seen: set[tuple[int, int]] = set()
    for r in local:  # a link from one root into another is a second route: that root is walked on its own
        st = os.stat(r)
        seen.add((st.st_dev, st.st_ino))
    chunks = [_Chunks(i) for i in range(len(roots))]
    deferred: list[tuple[bytes, tuple[int, int], _Chunks]] = []
    for i, root in enumerate(roots):
        if is_uri(root):
            chunks[i].batches += _walk_uri(root, i, include_hidden)
        else:
            _walk_local(os.fsencode(root), chunks[i], local, seen, include_hidden, follow, deferred)
    while deferred:
        link, key, out = deferred.pop(0)
        target, parent = os.path.realpath(link), os.path.realpath(os.path.dirname(link))
        if _inside(parent, target):
            lst = os.lstat(link)
            out.add(link, lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns, "error",
                    "symlink loop: it points to a folder that contains it", "permanent")
        elif key not in seen:
            seen.add(key)
            _walk_local(link, out, local, seen, include_hidden, follow, deferred)
    for c in chunks:
        c.flush()
    return pa.Table.from_batches([b for c in chunks for b in c.batches], schema=LISTING_SCHEMA)
