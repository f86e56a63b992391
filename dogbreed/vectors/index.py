"""The vector index beside a table: exact cosine search over the current rows' embeddings (usearch, on
memory-mapped float16 segments), refreshed incrementally when the table moves on.

    OUT/_dogbreed/similar/<embedding key>/state.json          the table version indexed, the segments
    OUT/_dogbreed/similar/<embedding key>/<run_id>.f16        unit-length float16 vectors of one run's rows
    OUT/_dogbreed/similar/<embedding key>/<run_id>.keys.parquet   path and run_id of each vector

A segment holds every vector one committed run wrote and never changes: a refresh only adds the segments of newer
runs that still own a current row (temporary file, then rename), so it is safe beside a running scan or another
refresh, and never touches the table. Which vectors count is decided at search time, from the table version
searched: a row's vector is searched while that row is its path's current one. A run none of whose rows is current
any more (every row rescanned or relabelled since) leaves the index at the next refresh, and its files are deleted
a grace period later (RETIRE_GRACE_S, so that a search still reading an older state finds them), so the index does
not grow by a full copy with every relabel. Exact search needs no training and has recall 1; at 1M rows a query takes
about 0.2 s (README, "similar at scale"). Searching memory-maps the segments, so an s3:// table's index is kept
beside it and mirrored into a local cache; a table this process cannot write gets its index in that cache only.
The index is derived data: a segment whose files do not hold what the state says (segments.py) is written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbreed.config import cache_home
from dogbreed.errors import UsageError
from dogbreed.table.location import unwritable
from dogbreed.table.objects import META_DIR
from dogbreed.table.output import Output
from dogbreed.table.readers import stream
from dogbreed.table.store import is_run_id
from dogbreed.vectors.segments import OtherWidth, check, occupied, unusable_cache

log = logging.getLogger("dogbreed.vectors")
INDEX_DIR = "similar"
STATE = "state.json"
READ_BATCH = 16_384  # rows read from the table at a time while a segment is written
SEARCH_THREADS = 2
RETIRE_GRACE_S = 3600.0  # a retired segment's files outlive its leaving the state by this long (searches in flight)
MIRROR_UNUSED_DAYS = 30  # a mirror in the user cache not opened for this long is removed (it is made again if needed)
USED = ".used"  # in a mirror: its mtime is when it was last opened


class SimilarError(UsageError):
    """A search that cannot be made (no vectors, vectors of another network, a query that is not a photo)."""


def _key(embedding_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", embedding_id)


def _writable(output: Output) -> bool:
    if output.loc.remote:
        return True  # tried, and a failure falls back to the local cache
    # tried for real: a read-only mount or a full disk does not show in permission bits (nor to root)
    return Path(output.loc.root, META_DIR).is_dir() and unwritable(output.loc, META_DIR) is None


@dataclass
class Segment:
    name: str  # the run id (or a merged name)
    rows: int


def prune_mirrors(root: Path, keep: Path, now: float | None = None) -> list[str]:
    """Mark the mirror `keep` used; remove the mirrors under root (root/<table>/<network>) not opened for
    MIRROR_UNUSED_DAYS: an old model's vectors of a million-row table are gigabytes. Returns what was removed."""
    import shutil

    now = time.time() if now is None else now
    keep.mkdir(parents=True, exist_ok=True)
    (keep / USED).touch()
    removed = []
    for table in (t for t in root.iterdir() if t.is_dir()):
        try:  # another process may be making or removing mirrors here meanwhile: what fails is left for next time
            for mirror in (m for m in table.iterdir() if m.is_dir() and m != keep):
                marker = mirror / USED
                if not marker.exists():  # only a mirror this module marked is its own: anything else stays
                    continue
                used = max(marker.stat().st_mtime, mirror.stat().st_mtime)
                if now - used > MIRROR_UNUSED_DAYS * 86400:
                    shutil.rmtree(mirror, ignore_errors=True)
                    removed.append(f"{table.name}/{mirror.name}")
            if removed and not any(table.iterdir()):
                table.rmdir()
        except OSError:
            continue
    if removed:
        log.info("removed %d vector index mirror(s) unused for %d days from %s", len(removed), MIRROR_UNUSED_DAYS, root)
    return removed


class VectorIndex:
    """The index of one table's vectors made by one network (embedding_id)."""

    def __init__(self, output: Output, embedding_id: str):
        self.output, self.embedding_id = output, embedding_id
        key = _key(embedding_id)
        table_key = hashlib.sha256(output.loc.uri.encode()).hexdigest()[:16]
        self.local = cache_home() / INDEX_DIR / table_key / key  # what is memory-mapped
        self.beside = output.loc.path(META_DIR, INDEX_DIR, key) if _writable(output) else None
        if self.beside is not None and not output.loc.remote:
            self.local = Path(self.beside)  # a local table's index is searched where it lies
        else:  # a mirror in the user cache: marked used, and the mirrors nobody opened for a month go
            try:
                prune_mirrors(cache_home() / INDEX_DIR, keep=self.local)
            except OSError as e:
                raise unusable_cache(self.local, e, output.out) from None
        self.dim = 0
        self.segments: list[Segment] = []
        self.version = -1
        self.retired: dict[str, float] = {}  # segment name -> when it left the index (its files go a grace later)
        self._keys: dict[str, pa.Table] = {}  # segment name -> its keys, read once
        self._positions: dict[str, dict[str, int]] = {}

    # ---- state -------------------------------------------------------------------------------------------------

    def _read_state(self) -> None:
        raw = self._get(STATE)
        if raw is None:
            return
        try:
            doc = json.loads(raw)
            if doc["embedding_id"] != self.embedding_id:
                raise ValueError("another embedding")
            self.dim, self.version = int(doc["dim"]), int(doc["version"])
            self.segments = [Segment(s["name"], int(s["rows"])) for s in doc["segments"]]
            self.retired = {str(k): float(v) for k, v in doc.get("retired", {}).items()}
            names = [seg.name for seg in self.segments] + list(self.retired)
            if not all(is_run_id(name) for name in names):  # a name is a file name here: '../x' would reach outside
                raise ValueError(f"a segment name that is not a run id: {next(n for n in names if not is_run_id(n))!r}")
            if len({seg.name for seg in self.segments}) != len(self.segments):
                raise ValueError("a segment named twice")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("the vector index of %s is unreadable (%s): building it again", self.output.out, e)
            self.dim, self.version, self.segments, self.retired = 0, -1, [], {}

    def _write_state(self) -> None:
        doc = {"embedding_id": self.embedding_id, "dim": self.dim, "version": self.version,
               "segments": [{"name": s.name, "rows": s.rows} for s in self.segments], "retired": self.retired}
        self._put(STATE, json.dumps(doc, indent=1).encode())

    # ---- files: beside the table (any file system) and their local copies --------------------------------------

    def _get(self, name: str) -> bytes | None:
        if self.beside is not None:
            try:
                with self.output.loc.fs.open_input_stream(f"{self.beside}/{name}") as f:
                    return f.read()
            except (FileNotFoundError, OSError, pa.ArrowException):
                pass
        path = self.local / name
        return path.read_bytes() if path.is_file() else None

    def _put(self, name: str, data: bytes) -> None:
        self._put_local(name, data)
        self._publish(name)

    def _put_local(self, name: str, data: bytes) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f".{name}.{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.local / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _publish(self, name: str) -> None:
        """A remote table's index files are written beside it as well (a local table's index is already there)."""
        if self.beside is None or not self.output.loc.remote:
            return
        try:
            pafs.copy_files(str(self.local / name), f"{self.beside}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.output.loc.fs)
        except (OSError, pa.ArrowException) as e:
            log.warning("cannot write the vector index beside %s (%s); it stays in %s", self.output.out, e, self.local)
            self.beside = None

    def _fetch(self, name: str) -> Path:
        """The local copy of an index file (a remote table's segments are mirrored once: they never change)."""
        path = self.local / name
        if not path.is_file() and self.beside is not None and self.output.loc.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            tmp = self.local / f".{name}.{uuid.uuid4().hex}"
            try:
                pafs.copy_files(f"{self.beside}/{name}", str(tmp), source_filesystem=self.output.loc.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    # ---- refresh -----------------------------------------------------------------------------------------------

    def refresh(self, table, live: set[str] | None = None) -> int:
        """Add a segment for every committed run whose vectors (of this embedding_id) are not indexed yet and that
        still owns a current row, retire the segments of runs that own none; returns the vectors added. `table` is
        the committed version to follow; `live`, the runs of its current rows with vectors of this network, where
        the caller has them already. A segment whose files do not hold what the state says is written again."""
        where = occupied(self.local)
        if where is not None:  # never removed: dogbreed writes no plain file there
            raise SimilarError(f"the vector index of {self.output.out} belongs in {self.local}, but {where} is a file, "
                               "not a folder: move it away and search again")
        self._read_state()
        if live is None:  # at the state's own version, every segment it names is live
            live = ({s.name for s in self.segments} if self.version == table.version() else
                    self.live_runs(self.output.latest(["path", "run_id", "embedding_id"], table=table)))
        if not self._drop_damaged(live) and self.version == table.version():
            return 0
        order = [m["run_id"] for m in self.output.runs(table) if m["run_id"] in live]
        try:
            return self._update(table, live, order)
        except OSError as e:
            raise SimilarError(f"the vector index of {self.output.out} cannot be written in {self.local} "
                               f"({e.strerror or e})") from None

    def _update(self, table, live: set[str], order: list[str]) -> int:
        have = {s.name for s in self.segments}
        runs = [run for run in order if run not in have]
        added = 0
        if runs:
            try:
                added = self._write_segments(table, runs)
            except OtherWidth as e:  # the table's vectors are right: the index is made again from them
                log.warning("the vector index of %s holds vectors of %d values, the table's have %d: building it "
                            "again", self.output.out, self.dim, e.args[0])
                self.segments, self.dim = [], 0
                added = self._write_segments(table, order)
        now = time.time()
        for segment in self.segments:
            if segment.name not in live:
                self.retired.setdefault(segment.name, now)
        self.segments = [s for s in self.segments if s.name in live]
        for segment in self.segments:  # an older version's run indexed again (a search of an earlier snapshot)
            self.retired.pop(segment.name, None)
        expired = [name for name, at in self.retired.items() if now - at >= RETIRE_GRACE_S]
        for name in expired:
            del self.retired[name]
        self.version = table.version()
        self._write_state()
        for name in expired:  # after the state that no longer names them
            self._delete(name)
        self._sweep(now)
        return added

    def _drop_damaged(self, live: set[str]) -> bool:
        """Leave out of the state the live segments whose files do not hold what it says (the refresh writes them
        again from the table); the keys read to check the others serve the search. Whether any was left out."""
        keys, damaged = check([s for s in self.segments if s.name in live], self.dim, self._fetch)
        self._keys.update(keys)
        if damaged:
            log.warning("the vector index of %s is damaged (%s): writing %d segment(s) again from the table",
                        self.output.out, "; ".join(list(damaged.values())[:2]), len(damaged))
            self.segments = [s for s in self.segments if s.name not in damaged]
        if not self.segments:
            self.dim = 0  # no file holds vectors of the state's width: the table's is taken
        return bool(damaged)

    def _sweep(self, now: float) -> None:
        """Local segment files the state does not name and older than the grace: a refresh killed before its state
        was written, or a remote table's segments retired by a refresh on another machine."""
        named = {s.name for s in self.segments} | set(self.retired)
        for path in list(self.local.glob("*.f16")) + list(self.local.glob("*.parquet")):  # temporary ones too
            name = path.name.removesuffix(".f16").removesuffix(".parquet").removesuffix(".keys")
            try:
                if name not in named and now - path.stat().st_mtime >= RETIRE_GRACE_S:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def live_runs(self, current: pa.Table) -> set[str]:
        """The runs that own current rows (the latest row of their path) with vectors of this network."""
        keep = pc.fill_null(pc.equal(current.column("embedding_id"), self.embedding_id), False)
        return set(pc.unique(current.column("run_id").filter(keep)).to_pylist())

    def _delete(self, name: str) -> None:
        for suffix in (".f16", ".keys.parquet"):
            with suppress(OSError):  # not a file of ours (a folder): left alone
                (self.local / f"{name}{suffix}").unlink(missing_ok=True)
            if self.beside is not None and self.output.loc.remote:
                try:
                    self.output.loc.fs.delete_file(f"{self.beside}/{name}{suffix}")
                except (FileNotFoundError, OSError, pa.ArrowException):
                    pass  # already gone, or left for a later refresh to find: it is no longer in the state

    def _write_segments(self, table, runs: list[str]) -> int:
        """Stream the runs' vectors out of the table into one float16 file (and its keys) per run."""
        runs_set = pa.array(runs, pa.string())

        def wanted(rows: pa.Table):
            return pc.and_(pc.is_in(rows.column("run_id"), value_set=runs_set),
                           pc.fill_null(pc.equal(rows.column("embedding_id"), self.embedding_id), False))

        writers: dict[str, tuple] = {}
        self.local.mkdir(parents=True, exist_ok=True)
        added = 0
        try:  # one row group at a time (about 30 MB of vectors), never the table
            columns = ["path", "run_id", "embedding", "embedding_id"]
            for batch in stream(self.output.out, table, columns, READ_BATCH, wanted):
                col = batch.column("embedding").combine_chunks()
                valid = col.is_valid().to_numpy(zero_copy_only=False)
                if not valid.any():
                    continue
                values = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
                n_valid = int(valid.sum())
                dim = len(values) // n_valid
                if self.dim and dim != self.dim:
                    if self.segments:  # the width came from the index, not from this pass over the table
                        raise OtherWidth(dim)
                    raise SimilarError(f"{self.output.out} holds vectors of {dim} values beside vectors of {self.dim} "
                                       f"under one embedding id ({self.embedding_id}); the table was edited by hand?")
                self.dim = dim
                x = values.reshape(n_valid, dim).astype(np.float32)
                x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                keys = pa.table({"path": batch.column("path").filter(pa.array(valid)),
                                 "run_id": batch.column("run_id").filter(pa.array(valid))})
                run_ids = keys.column("run_id").to_numpy(zero_copy_only=False)
                for run in np.unique(run_ids):
                    mine = run_ids == run
                    if run not in writers:
                        tmp = self.local / f".{run}.{uuid.uuid4().hex}"
                        writers[run] = (tmp, open(tmp.with_suffix(".f16"), "wb"), [], [0])
                    _, f16, key_parts, count = writers[run]
                    f16.write(x[mine].astype(np.float16).tobytes())
                    key_parts.append(keys.filter(pa.array(mine)))
                    count[0] += int(mine.sum())
            for run, (tmp, f16, key_parts, count) in writers.items():
                f16.close()
                pq.write_table(pa.concat_tables(key_parts), tmp.with_suffix(".parquet"))
                os.replace(tmp.with_suffix(".f16"), self.local / f"{run}.f16")
                os.replace(tmp.with_suffix(".parquet"), self.local / f"{run}.keys.parquet")
                self._publish(f"{run}.f16")
                self._publish(f"{run}.keys.parquet")
                self._keys.pop(run, None)  # a damaged segment written again: its keys are read anew
                self._positions.pop(run, None)
                self.segments.append(Segment(run, count[0]))
                added += count[0]
        finally:  # a table that cannot be read, vectors of two widths, a file in the way: no temporary file stays
            for tmp, f16, _, _ in writers.values():
                f16.close()
                for suffix in (".f16", ".parquet"):
                    tmp.with_suffix(suffix).unlink(missing_ok=True)
        return added

    # ---- search ------------------------------------------------------------------------------------------------

    def vectors(self, segment: Segment) -> np.ndarray:
        return np.memmap(self._fetch(f"{segment.name}.f16"), dtype=np.float16, mode="r", shape=(segment.rows, self.dim))

    def position(self, segment: Segment, path: str) -> int | None:
        """Where a path's vector lies in a segment (a lookup table built once per segment)."""
        if segment.name not in self._positions:
            self._positions[segment.name] = {p: i for i, p in enumerate(self.keys(segment).column("path").to_pylist())}
        return self._positions[segment.name].get(path)

    def keys(self, segment: Segment) -> pa.Table:
        if segment.name not in self._keys:
            self._keys[segment.name] = pq.read_table(self._fetch(f"{segment.name}.keys.parquet"))
        return self._keys[segment.name]

    def search(self, queries: np.ndarray, k: int, allowed: dict[str, np.ndarray]) -> list[list[tuple[str, str, float]]]:
        """The k most similar allowed vectors for each query (cosine): [(path, run_id, similarity), ...] per query,
        best first. `allowed[segment name]` masks the segment's rows (current rows, wanted statuses)."""
        from usearch.index import MetricKind, search

        q = np.asarray(queries, dtype=np.float32)
        q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float16)
        found: list[list[tuple[float, str, str]]] = [[] for _ in q]
        for segment in self.segments:
            mask = allowed.get(segment.name)
            if mask is None or not mask.any():
                continue
            count = min(segment.rows, k + int((~mask).sum()))  # enough that k allowed rows are among them
            matches = search(self.vectors(segment), q, count, MetricKind.IP, exact=True, threads=SEARCH_THREADS)
            paths = self.keys(segment).column("path")
            rows = np.atleast_2d(matches.keys).astype(np.int64)
            sims = 1.0 - np.atleast_2d(matches.distances)
            for i in range(len(q)):
                keep = (rows[i] >= 0) & (rows[i] < len(mask))
                keep[keep] = mask[rows[i][keep]]
                hit_rows, hit_sims = rows[i][keep][:k], sims[i][keep][:k]
                names = paths.take(pa.array(hit_rows)).to_pylist()  # only the hits become Python strings
                found[i].extend((float(s), p, segment.name) for s, p in zip(hit_sims, names))
        return [[(p, r, s) for s, p, r in sorted(f, key=lambda t: -t[0])[:k]] for f in found]
