"""Incremental planning, in Arrow: what a run must decode, what it records directly, what it carries over.

A listed file is *unchanged* when its latest row has the same size, mtime and ctime and a result that is still
current: made by this model under these settings, or an error that cannot change until the file does. A file
whose ctime moved but whose size and mtime did not (``cp -p``, ``rsync -t``, ``chmod``) is checked by its
fingerprint. A new path whose size, mtime and fingerprint match a vanished one is a *move*: its result is
carried over without inference. The archive guard refuses a root that looks unmounted or emptied.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed.config import ScanConfig
from dogbreed.errors import Refused
from dogbreed.scan.listing import text_path
from dogbreed.table import schema
from dogbreed.vision.decode import fingerprint_file

log = logging.getLogger("dogbreed.scan.plan")

KNOWN_COLUMNS = ["status", "error", "error_kind", "model_id", "settings_id", "size_bytes", "mtime", "ctime",
                 "fingerprint"]
FINGERPRINT_THREADS = 8  # reads of two 64-KiB ends are I/O bound: a few threads hide the latency
IDENTITY = ["path", "raw", "size_bytes", "mtime_ns", "ctime_ns"]  # what a planned row carries about its file


class ScanRefused(Refused):
    """The archive looks unavailable (missing, unreadable, suddenly empty, mass-deleted); nothing was changed."""


@dataclass
class Plan:
    """What a run will do. Tables keep the listing's order; `todo` goes through Ray, the rest is written here."""

    listed: int
    todo: pa.Table  # path, raw, size_bytes, mtime_ns, ctime_ns: photos to decode and infer
    direct: pa.Table  # path, raw, size_bytes, mtime_ns, ctime_ns, status, error, error_kind: decided by listing
    carried: pa.Table  # path, raw, size_bytes, mtime_ns, ctime_ns, src_path, src_run: results carried over
    deleted: list[str]
    unchanged: int
    moved: int = 0
    files_per_root: dict[str, int] = field(default_factory=dict)


def _fingerprints(raws: list[bytes]) -> list[str | None]:
    with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
        return list(pool.map(fingerprint_file, raws))


def _raw_paths(table: pa.Table) -> list[bytes]:
    return [r if r is not None else p.encode() for p, r in zip(table.column("path").to_pylist(),
                                                              table.column("raw").to_pylist())]


def _np(mask) -> np.ndarray:
    """An Arrow boolean array (nulls as False) as a numpy mask."""
    if isinstance(mask, np.ndarray):
        return mask
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _eq(a, b) -> np.ndarray:
    """Element-wise equality where null == null is true."""
    return _np(pc.or_kleene(pc.equal(a, b), pc.and_kleene(pc.is_null(a), pc.is_null(b))))


def _plain(col) -> pa.ChunkedArray:
    """A string column as plain strings (history is read with dictionary-encoded repeated strings)."""
    return col.cast(pa.string())


def _us(ns) -> pa.Array:
    return schema.us_from_ns(ns)


def _decided_by_listing(listing: pa.Table, extensions: list[str]) -> tuple[np.ndarray, pa.Table]:
    """Files whose row the listing decides: notes (loops, links outside the roots, unreadable folders) and
    non-photo extensions, which are never opened. Returns their mask, and their status, error and error_kind
    (computed for those few rows only, not for every listed path)."""
    # An extension has no control characters: a name ending in "jpg\n" has none, and the reason stays one line
    ext = pc.struct_field(pc.extract_regex(listing.column("path"), r"(?P<ext>\.[^./\x00-\x1f\x7f]*)$"), [0])
    ext = pc.utf8_lower(pc.fill_null(ext, ""))  # lower-cases the few-byte extensions, not every path
    is_photo = _np(pc.is_in(ext, value_set=pa.array([e.lower() for e in extensions], pa.string())))
    noted = _np(pc.is_valid(listing.column("note_status")))
    mask = noted | ~is_photo
    sel = pa.array(mask)
    noted_sel, ext_sel = pa.array(noted[mask]), ext.filter(sel)
    reason = pc.binary_join_element_wise("not a photo extension (", pc.if_else(pc.equal(ext_sel, ""), "none", ext_sel),
                                         ")", "")
    none = pa.scalar(None, pa.string())
    decided = pa.table({
        "status": pc.if_else(noted_sel, listing.column("note_status").filter(sel), "skipped"),
        "error": pc.if_else(noted_sel, listing.column("note").filter(sel), reason),
        "error_kind": pc.if_else(noted_sel, listing.column("note_kind").filter(sel), none),
    })
    return mask, decided


def _aligned_known(listing: pa.Table, known: pa.Table) -> pa.Table | None:
    """The latest row's KNOWN_COLUMNS for each listed file (nulls where there is none); None if nothing is known."""
    if not known.num_rows:
        return None
    pos = pc.index_in(listing.column("path"), value_set=known.column("path"))
    return known.select(["run_id", *KNOWN_COLUMNS]).take(pos)


def _is_current(k: pa.Table, model_id: str, settings: str, cfg: ScanConfig) -> np.ndarray:
    """Rows whose result still holds: made by this model under these settings, or a permanent error."""
    if cfg.mode == "all":
        return np.zeros(k.num_rows, dtype=bool)
    status = k.column("status")
    ok = (_np(pc.is_in(status, value_set=pa.array(schema.OK_STATUSES))) & _eq(k.column("model_id"), pa.scalar(model_id))
          & _eq(k.column("settings_id"), pa.scalar(settings)))
    permanent = _np(pc.equal(status, "error")) & _np(pc.equal(k.column("error_kind"), "permanent"))
    return ok | (permanent & (not cfg.retry_errors))


def make_plan(listing: pa.Table, roots: list[str], known: pa.Table, model_id: str, settings: str,
              cfg: ScanConfig) -> Plan:
    """Decide unchanged / to decode / to record / carried / deleted against the latest committed rows."""
    listing = listing.rename_columns(["size_bytes" if c == "size" else c for c in listing.column_names])
    n = listing.num_rows
    is_direct, decided = _decided_by_listing(listing, cfg.extensions)
    photo = ~is_direct
    k = _aligned_known(listing, known)
    suspect = np.zeros(n, dtype=bool)
    direct_at = np.flatnonzero(is_direct)
    if k is None:  # the first run: everything is to do
        unchanged, rewrite = np.zeros(n, dtype=bool), np.ones(len(direct_at), dtype=bool)
    else:
        same_file = (_eq(k.column("size_bytes"), listing.column("size_bytes"))
                     & _eq(pc.cast(k.column("mtime"), pa.int64()), _us(listing.column("mtime_ns"))))
        k_ctime = pc.cast(k.column("ctime"), pa.int64())
        ctime_same = (_np(pc.is_null(k_ctime)) | _np(pc.is_null(listing.column("ctime_ns")))
                      | _np(pc.equal(k_ctime, _us(listing.column("ctime_ns")))))
        # Rows decided by listing are written again only when what they say changed.
        kd = k.take(pa.array(direct_at))
        rewrite = ~(_eq(kd.column("status"), decided.column("status")) & _eq(kd.column("error"), decided.column("error"))
                    & same_file[direct_at])
        current = _is_current(k, model_id, settings, cfg)
        unchanged = photo & same_file & ctime_same & current
        # Same path, new ctime, same size and mtime: the fingerprint says whether the content changed.
        suspect = photo & same_file & ~ctime_same & current & _np(pc.is_valid(k.column("fingerprint")))
    todo_mask = photo & ~unchanged & ~suspect
    carried = []
    if suspect.any():
        rows = listing.filter(pa.array(suspect))
        same = _np(pc.equal(pa.array(_fingerprints(_raw_paths(rows)), pa.string()),
                            k.column("fingerprint").filter(pa.array(suspect))))
        carried.append(rows.filter(pa.array(same)).select(IDENTITY)
                       .append_column("src_path", rows.filter(pa.array(same)).column("path"))
                       .append_column("src_run", _plain(k.column("run_id").filter(pa.array(suspect)).filter(pa.array(same))))
                       .append_column("_i", pa.array(np.flatnonzero(suspect)[same])))
        todo_mask[np.flatnonzero(suspect)[~same]] = True

    gone, files_per_root = _vanished(listing, roots, known, cfg)
    moved_from: set[str] = set()
    moves = _moves(listing, todo_mask & (k is None or _np(pc.is_null(k.column("status")))), gone, model_id,
                   settings, cfg) if gone.num_rows else None
    if moves is not None and moves.num_rows:
        carried.append(moves)
        moved_from = set(moves.column("src_path").to_pylist())
        todo_mask[moves.column("_i").to_numpy()] = False
    _guard(roots, known, gone, moved_from, cfg)

    carried_table = (pa.concat_tables([c.cast(carried[0].schema) for c in carried]).sort_by("_i").drop_columns(["_i"])
                     if carried else _empty_carried())
    keep = pa.array(rewrite)
    direct = listing.take(pa.array(direct_at[rewrite])).select(IDENTITY)
    for name in ("status", "error", "error_kind"):
        direct = direct.append_column(name, decided.column(name).filter(keep))
    return Plan(listed=n, todo=listing.filter(pa.array(todo_mask)).select(IDENTITY), direct=direct,
                carried=carried_table, deleted=sorted(gone.column("path").to_pylist()),
                unchanged=int(unchanged.sum() + (~rewrite).sum()), moved=len(moved_from),
                files_per_root=files_per_root)


def _empty_carried() -> pa.Table:
    return pa.schema([("path", pa.string()), ("raw", pa.binary()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
                      ("ctime_ns", pa.int64()), ("src_path", pa.string()), ("src_run", pa.string())]).empty_table()


def _vanished(listing: pa.Table, roots: list[str], known: pa.Table, cfg: ScanConfig) -> tuple[pa.Table, dict[str, int]]:
    """Known, not deleted, under a root, and no longer listed; refuses a root that is suddenly empty."""
    alive = known.filter(pc.not_equal(known.column("status"), "deleted")) if known.num_rows else known
    parts, files_per_root = [], {}
    for i, root in enumerate(roots):
        files_here = int(pc.sum(pc.equal(listing.column("root"), i)).as_py() or 0)
        files_per_root[root] = files_here
        if not alive.num_rows:
            continue
        here = alive.filter(pc.starts_with(alive.column("path"), _prefix(root)))
        if here.num_rows and not files_here and not cfg.allow_empty_roots:
            raise ScanRefused(f"root {root} is empty but earlier runs saw {here.num_rows} files there "
                              "(unmounted archive?); pass --allow-empty-roots if they were really deleted")
        parts.append(here.filter(pc.invert(pc.is_in(here.column("path"), value_set=listing.column("path")))))
    return (pa.concat_tables(parts) if parts else known.slice(0, 0)), files_per_root


def _prefix(root: str) -> str:
    """What the text path of every file under root starts with: the root's own name in the same text form."""
    return text_path(os.fsencode(root)).rstrip("/") + "/"


def _guard(roots: list[str], known: pa.Table, gone: pa.Table, moved_from: set[str], cfg: ScanConfig) -> None:
    """Refuse a run that would record more than max_deleted_fraction of a root's files as deleted (moves excepted)."""
    if not gone.num_rows or cfg.allow_deletions:
        return
    alive = known.filter(pc.not_equal(known.column("status"), "deleted"))
    for root in roots:
        prefix = _prefix(root)
        alive_n = int(pc.sum(pc.starts_with(alive.column("path"), prefix)).as_py() or 0)
        really = sum(1 for p in gone.filter(pc.starts_with(gone.column("path"), prefix)).column("path").to_pylist()
                     if p not in moved_from)
        if alive_n >= 10 and really > cfg.max_deleted_fraction * alive_n:
            raise ScanRefused(f"root {root}: {really} of {alive_n} known files vanished, over the "
                              f"max_deleted_fraction of {cfg.max_deleted_fraction}; refusing to record them as deleted "
                              "(is part of the archive unmounted?); pass --allow-deletions if they were really deleted")


def _moves(listing: pa.Table, fresh_mask: np.ndarray, gone: pa.Table, model_id: str, settings: str,
           cfg: ScanConfig) -> pa.Table | None:
    """New local paths whose size, mtime and fingerprint match a vanished file with a current result."""
    if cfg.mode == "all":
        return None
    gone = gone.filter(pa.array(_is_current(gone, model_id, settings, cfg) & _np(pc.is_valid(gone.column("fingerprint")))))
    if not gone.num_rows:
        return None
    fresh = listing.filter(pa.array(fresh_mask)).select(IDENTITY).append_column("_i", pa.array(np.flatnonzero(fresh_mask)))
    fresh = fresh.filter(pc.invert(pc.match_substring(fresh.column("path"), "://")))  # fingerprints read local files
    fresh = fresh.append_column("mtime_us", _us(fresh.column("mtime_ns")))
    src = pa.table({"src_path": gone.column("path"), "src_run": _plain(gone.column("run_id")),
                    "size_bytes": gone.column("size_bytes"),
                    "mtime_us": pc.cast(gone.column("mtime"), pa.int64()), "fp": gone.column("fingerprint")})
    maybe = fresh.join(src.select(["size_bytes", "mtime_us"]), keys=["size_bytes", "mtime_us"], join_type="left semi")
    if not maybe.num_rows:
        return None
    maybe = maybe.append_column("fp", pa.array(_fingerprints(_raw_paths(maybe)), pa.string()))
    matched = maybe.join(src, keys=["size_bytes", "mtime_us", "fp"], join_type="inner")
    matched = _first_per(matched.sort_by([("_i", "ascending"), ("src_path", "ascending")]), "_i")
    return matched.select([*IDENTITY, "src_path", "src_run", "_i"])


def _first_per(table: pa.Table, key: str) -> pa.Table:
    """The first row of each run of equal `key` values in an already sorted table."""
    if table.num_rows < 2:
        return table
    col = table.column(key)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[1:] = pc.not_equal(col.slice(1), col.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(keep))
