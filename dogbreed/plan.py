"""Incremental planning, in Arrow: what a run must decode, what it records directly, what it carries over.

A listed file is *unchanged* when its latest row has the same size, mtime and ctime and a result that is still
current: made by this model under these settings, or an error that cannot change until the file does. A file
whose ctime moved but whose size and mtime did not (``cp -p``, ``rsync -t``, ``chmod``) is checked by its
fingerprint. A new path whose size, mtime and fingerprint match a vanished one is a *move*: its result is
carried over without inference. The archive guard refuses a root that looks unmounted or emptied.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed import results
from dogbreed.config import ScanConfig
from dogbreed.images import fingerprint_file, is_uri

log = logging.getLogger("dogbreed.scan")

KNOWN_COLUMNS = ["status", "error", "error_kind", "model_id", "settings_id", "size_bytes", "mtime", "ctime",
                 "fingerprint"]
FINGERPRINT_THREADS = 8  # reads of two 64-KiB ends are I/O bound: a few threads hide the latency


class ScanRefused(RuntimeError):
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

    @property
    def work(self) -> int:
        return self.todo.num_rows + self.direct.num_rows + self.carried.num_rows


def _extension_skips(listing: pa.Table, extensions: list[str]) -> tuple[pa.Array, pa.Array]:
    """(is_photo mask, reason) per listed file, from its extension alone; a non-photo is never opened."""
    name_ext = pc.extract_regex(pc.utf8_lower(listing.column("path")), r"(?P<ext>\.[^./]*)$")
    ext = pc.fill_null(pc.struct_field(name_ext, [0]), "")
    is_photo = pc.is_in(ext, value_set=pa.array([e.lower() for e in extensions], pa.string()))
    shown = pc.if_else(pc.equal(ext, ""), "none", ext)
    reason = pc.binary_join_element_wise("not a photo extension (", shown, ")", "")
    return is_photo, reason


def _eq(a, b) -> pa.Array:
    """Element-wise equality where null == null is true."""
    return pc.fill_null(pc.or_kleene(pc.equal(a, b), pc.and_kleene(pc.is_null(a), pc.is_null(b))), False)


def _us(ns: pa.ChunkedArray) -> pa.Array:
    return pc.cast(pc.divide(ns, 1000), pa.int64())


def _fingerprints(raws: list[bytes]) -> list[str | None]:
    with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
        return list(pool.map(fingerprint_file, raws))


def _raw_paths(table: pa.Table) -> list[bytes]:
    return [r if r is not None else p.encode() for p, r in zip(table.column("path").to_pylist(),
                                                              table.column("raw").to_pylist())]


IDENTITY = ["path", "raw", "size_bytes", "mtime_ns", "ctime_ns"]


def make_plan(listing: pa.Table, roots: list[str], known: pa.Table, model_id: str, settings: str,
              cfg: ScanConfig) -> Plan:
    """Decide unchanged / to decode / to record / carried / deleted against the latest committed rows."""
    n = listing.num_rows
    listing = listing.rename_columns(["size_bytes" if c == "size" else c for c in listing.column_names])
    listing = listing.append_column("_i", pa.array(np.arange(n, dtype=np.int64)))
    known = known.select(["path", "run_id", *KNOWN_COLUMNS]).rename_columns(
        ["path", "k_run", *[f"k_{c}" for c in KNOWN_COLUMNS]])
    joined = listing.join(known, keys="path", join_type="left outer").sort_by("_i")

    is_photo, skip_reason = _extension_skips(joined, cfg.extensions)
    noted = pc.is_valid(joined.column("note_status"))
    direct_status = pc.if_else(noted, joined.column("note_status"), pc.if_else(is_photo, pa.scalar(None, pa.string()),
                                                                               "skipped"))
    direct_error = pc.if_else(noted, joined.column("note"), skip_reason)
    direct_kind = pc.if_else(noted, joined.column("note_kind"), pa.scalar(None, pa.string()))
    is_direct = pc.is_valid(direct_status)

    same_file = pc.and_kleene(_eq(joined.column("k_size_bytes"), joined.column("size_bytes")),
                        _eq(pc.cast(joined.column("k_mtime"), pa.int64()), _us(joined.column("mtime_ns"))))
    k_ctime = pc.cast(joined.column("k_ctime"), pa.int64())
    ctime_same = pc.or_kleene(pc.or_kleene(pc.is_null(k_ctime), pc.is_null(joined.column("ctime_ns"))),
                        pc.fill_null(pc.equal(k_ctime, _us(joined.column("ctime_ns"))), False))

    # Rows decided by listing: written again only when what they say changed.
    direct_same = pc.and_kleene(pc.and_kleene(_eq(joined.column("k_status"), direct_status), _eq(joined.column("k_error"), direct_error)),
                          same_file)
    direct_write = pc.and_kleene(is_direct, pc.invert(pc.fill_null(direct_same, False)))

    k_status = joined.column("k_status")
    ok_current = pc.and_kleene(pc.is_in(k_status, value_set=pa.array(results.OK_STATUSES)),
                         pc.and_kleene(_eq(joined.column("k_model_id"), pa.scalar(model_id)),
                                 _eq(joined.column("k_settings_id"), pa.scalar(settings))))
    permanent_error = pc.and_kleene(pc.equal(k_status, "error"), pc.equal(joined.column("k_error_kind"), "permanent"))
    current = pc.fill_null(pc.or_kleene(ok_current, pc.and_kleene(permanent_error, pa.scalar(not cfg.retry_errors))), False)
    if cfg.mode == "all":
        current = pa.array(np.zeros(n, dtype=bool))
    photo = pc.invert(is_direct)
    unchanged = pc.and_kleene(photo, pc.and_kleene(pc.and_kleene(same_file, ctime_same), current))
    suspect = pc.and_kleene(photo, pc.and_kleene(pc.and_kleene(same_file, pc.invert(ctime_same)),
                                     pc.and_kleene(current, pc.is_valid(joined.column("k_fingerprint")))))
    todo_mask = pc.and_kleene(photo, pc.invert(pc.or_kleene(unchanged, suspect)))

    # Same path, new ctime, same size and mtime: the fingerprint says whether the content changed.
    carried_parts, suspects = [], joined.filter(suspect)
    if suspects.num_rows:
        fps = pa.array(_fingerprints(_raw_paths(suspects)), pa.string())
        same = pc.fill_null(pc.equal(fps, suspects.column("k_fingerprint")), False)
        carried_parts.append(suspects.filter(same).append_column("src_path", suspects.filter(same).column("path"))
                             .select([*IDENTITY, "_i", "src_path", "k_run"]))
        todo_mask = pc.or_kleene(todo_mask, pc.is_in(joined.column("_i"), value_set=suspects.filter(pc.invert(same)).column("_i")))

    # Vanished paths, per root, and the archive guard.
    alive = known.filter(pc.not_equal(known.column("k_status"), "deleted"))
    listed_paths = listing.column("path")
    deleted: list[str] = []
    gone_tables, per_root_gone = [], {}
    files_per_root = {}
    for i, root in enumerate(roots):
        under = pc.starts_with(alive.column("path"), root.rstrip("/") + "/")
        alive_here = alive.filter(under)
        gone = alive_here.filter(pc.invert(pc.is_in(alive_here.column("path"), value_set=listed_paths)))
        files_here = int(pc.sum(pc.equal(listing.column("root"), i)).as_py() or 0)
        files_per_root[root] = files_here
        if alive_here.num_rows and not files_here and not cfg.allow_empty_roots:
            raise ScanRefused(f"root {root} is empty but earlier runs saw {alive_here.num_rows} files there "
                              "(unmounted archive?); pass --allow-empty-roots if they were really deleted")
        gone_tables.append(gone)
        per_root_gone[root] = (alive_here.num_rows, gone)

    # Moves: a new path whose size, mtime and fingerprint match a vanished file takes over its result.
    gone_all = pa.concat_tables(gone_tables) if gone_tables else known.slice(0, 0)
    gone_current = gone_all.filter(pc.fill_null(pc.or_kleene(
        pc.and_kleene(pc.is_in(gone_all.column("k_status"), value_set=pa.array(results.OK_STATUSES)),
                pc.and_kleene(pc.equal(gone_all.column("k_model_id"), model_id), pc.equal(gone_all.column("k_settings_id"), settings))),
        pc.and_kleene(pc.equal(gone_all.column("k_status"), "error"), pc.equal(gone_all.column("k_error_kind"), "permanent"))),
        False))
    gone_current = gone_current.filter(pc.is_valid(gone_current.column("k_fingerprint")))
    moved_from: set[str] = set()
    if gone_current.num_rows and cfg.mode != "all":
        fresh = joined.filter(pc.and_kleene(todo_mask, pc.is_null(joined.column("k_status")))).select([*IDENTITY, "_i"])
        fresh = fresh.filter(pc.invert(pc.match_substring(fresh.column("path"), "://")))  # local files: fingerprints
        fresh = fresh.append_column("mtime_us", _us(fresh.column("mtime_ns")))
        src = pa.table({"src_path": gone_current.column("path"), "src_run": gone_current.column("k_run"),
                        "size_bytes": gone_current.column("k_size_bytes"),
                        "mtime_us": pc.cast(gone_current.column("k_mtime"), pa.int64()),
                        "fp": gone_current.column("k_fingerprint")})
        maybe = fresh.join(src.select(["size_bytes", "mtime_us"]), keys=["size_bytes", "mtime_us"], join_type="left semi")
        if maybe.num_rows:
            maybe = maybe.append_column("fp", pa.array(_fingerprints(_raw_paths(maybe)), pa.string()))
            matched = maybe.join(src, keys=["size_bytes", "mtime_us", "fp"], join_type="inner")
            matched = _first_per(matched.sort_by([("_i", "ascending"), ("src_path", "ascending")]), "_i")
            if matched.num_rows:
                carried_parts.append(matched.select([*IDENTITY, "_i", "src_path", "src_run"])
                                     .rename_columns([*IDENTITY, "_i", "src_path", "k_run"]))
                moved_from = set(matched.column("src_path").to_pylist())
                todo_mask = pc.and_kleene(todo_mask, pc.invert(pc.is_in(joined.column("_i"), value_set=matched.column("_i"))))

    for root, (alive_n, gone) in per_root_gone.items():
        paths = gone.column("path").to_pylist()
        really = [p for p in paths if p not in moved_from]
        if alive_n >= 10 and len(really) > cfg.max_deleted_fraction * alive_n and not cfg.allow_deletions:
            raise ScanRefused(f"root {root}: {len(really)} of {alive_n} known files vanished, over the "
                              f"max_deleted_fraction of {cfg.max_deleted_fraction}; refusing to record them as deleted "
                              "(is part of the archive unmounted?); pass --allow-deletions if they were really deleted")
        deleted += paths

    carried = (pa.concat_tables([c.cast(carried_parts[0].schema) for c in carried_parts]).sort_by("_i")
               if carried_parts else joined.slice(0, 0).append_column("src_path", pa.array([], pa.string()))
               .select([*IDENTITY, "_i", "src_path", "k_run"]))
    carried = carried.rename_columns([*IDENTITY, "_i", "src_path", "src_run"]).drop_columns(["_i"])
    todo = joined.filter(todo_mask).select(IDENTITY)
    direct = (joined.filter(direct_write).select(IDENTITY)
              .append_column("status", direct_status.filter(direct_write))
              .append_column("error", direct_error.filter(direct_write))
              .append_column("error_kind", direct_kind.filter(direct_write)))
    quiet = pc.sum(unchanged).as_py() or 0
    quiet += pc.sum(pc.and_kleene(is_direct, pc.invert(direct_write))).as_py() or 0
    return Plan(listed=n, todo=todo, direct=direct, carried=carried, deleted=sorted(set(deleted)), unchanged=int(quiet),
                moved=len(moved_from), files_per_root=files_per_root)


def _first_per(table: pa.Table, key: str) -> pa.Table:
    """The first row of each run of equal `key` values in an already sorted table."""
    if table.num_rows < 2:
        return table
    col = table.column(key)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[1:] = pc.not_equal(col.slice(1), col.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(keep))
