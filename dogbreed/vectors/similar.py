"""`dogbreed similar`: the current rows nearest a query by the cosine similarity of their embeddings.

A query is a path already in the table (its stored vector) or any photo file, decoded and embedded through the
scan's own decode and predictor path with the model given (by default the offline default model). Vectors are only
compared with vectors of the same network (embedding_id): a query embedded by another one is one sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed.config import ScanConfig
from dogbreed.scan.listing import text_path
from dogbreed.table.output import Output
from dogbreed.table.schema import OK_STATUSES
from dogbreed.vectors.index import SimilarError, VectorIndex

CURRENT = ["path", "run_id", "status", "breed", "breed_prob", "embedding_id"]


@dataclass
class Hit:
    path: str
    similarity: float
    status: str
    breed: str | None


@dataclass
class Found:
    query: str
    hits: list[Hit]


@lru_cache(maxsize=4)
def _current(out: str, version: int) -> pa.Table:
    """The current (not deleted) rows of one committed version: what every query of a process shares."""
    output = Output(out)
    rows = output.latest(CURRENT, table=output.snapshot(version))
    rows = rows.filter(pc.not_equal(rows.column("status"), "deleted"))
    return rows.combine_chunks()


@lru_cache(maxsize=4)
def _positions(out: str, version: int) -> dict[str, int]:
    """path -> row of _current: built once per version, so a warm query looks a path up without a pass over all."""
    return {p: i for i, p in enumerate(_current(out, version).column("path").to_pylist())}


def _find(rows: pa.Table, paths: list[str], positions: dict[str, int] | None = None) -> np.ndarray:
    """Row numbers of paths in rows (-1 where absent)."""
    if positions is not None:
        return np.array([positions.get(p, -1) for p in paths], dtype=np.int64)
    return pc.fill_null(pc.index_in(pa.array(paths, pa.string()), value_set=rows.column("path")), -1).to_numpy()


def _query_rows(queries: list[str], current: pa.Table, cfg: ScanConfig,
                positions: dict[str, int]) -> list[tuple[str, str | None, np.ndarray | None]]:
    """(query, embedding_id, vector or None when it is a stored row's) for each query."""
    plain = _find(current, queries, positions)
    # a file here is looked up by the text path the scan gave it (a name spelling \\xe9 is not the byte 0xE9's row)
    stored = [text_path(os.fsencode(os.path.abspath(q))) for q in queries]
    absolute = _find(current, stored, positions)
    out, files = [], []
    for q, text, i, j in zip(queries, stored, plain, absolute):
        if j >= 0 and (i < 0 or os.path.lexists(q)):
            out.append((text, None, None))
        elif i >= 0:
            out.append((q, None, None))
        elif os.path.isfile(q):
            out.append((q, None, None))
            files.append(q)
        elif os.path.exists(q):  # a folder, a FIFO, a device (a link to /dev/zero): never opened
            what = "a folder" if os.path.isdir(q) else "no regular file (a device, FIFO or socket)"
            raise SimilarError(f"{q} is not a photo in the table, and here it is {what}, not a photo file")
        else:
            raise SimilarError(f"{q} is neither a photo in the table nor a file here")
    if files:
        from dogbreed.evaluation.breeds import analyze

        df = analyze(files, cfg)
        embedded = {}
        for path, status, error, vector, eid in zip(files, df["status"], df["error"], df["embedding"], df["embedding_id"]):
            if status == "error" or vector is None:
                raise SimilarError(f"{path} cannot be searched with: {error}")
            embedded[path] = (eid, np.asarray(vector, dtype=np.float32))
        out = [(q, *embedded[q]) if q in embedded else (q, None, None) for q, _, _ in out]
    return out


def similar(out: str, queries: list[str], cfg: ScanConfig, k: int = 20, status: str | None = None) -> list[Found]:
    """The k current rows most similar to each query (the query's own row left out), best first."""
    output = Output(out)
    table = output.require()
    current = _current(str(out), table.version())
    positions = _positions(str(out), table.version())
    if not pc.any(pc.is_valid(current.column("embedding_id"))).as_py():
        raise SimilarError(_no_vectors(out, current))
    resolved = _query_rows(queries, current, cfg, positions)
    ids = set(pc.unique(current.column("embedding_id")).drop_null().to_pylist())
    results = []
    for query, eid, vector in resolved:
        if vector is None:  # a stored row: its own embedding id and vector
            row = int(_find(current, [query], positions)[0])
            eid = current.column("embedding_id")[row].as_py()
            if eid is None:
                why = _WITHOUT.get(current.column("status")[row].as_py(), "its row comes from a run before dogbreed "
                                   "stored vectors (or from a scan with inference.embeddings off)")
                raise SimilarError(f"{query} has no embedding in {out}: {why}")
        elif eid not in ids:
            raise SimilarError(f"the query was embedded by {eid}, but the vectors in {out} were made by "
                               f"{', '.join(sorted(ids))}; pass the model the archive was scanned with (--model)")
        index = _index(str(out), table.version(), eid)
        if vector is not None and len(vector) != index.dim:  # the index's widths are checked against its files
            raise SimilarError(f"{query} was embedded as {len(vector)} values by {eid}, but {out} holds its vectors as "
                               f"{index.dim}; the table was edited by hand?")
        allowed = _allowed(str(out), table.version(), eid, status)
        if vector is None:
            vector = _stored_vector(index, query, current.column("run_id")[row].as_py())
        hits = [h for h in index.search(vector[None, :], k + 1, allowed)[0] if h[0] != query][:k]
        rows = _find(current, [p for p, _, _ in hits], positions)
        results.append(Found(query, [Hit(p, round(sim, 4), current.column("status")[int(r)].as_py(),
                                         current.column("breed")[int(r)].as_py()) for (p, _, sim), r in zip(hits, rows)]))
    return results


_WITHOUT = {"error": "it is an error row (its file could not be read as a photo)",
            "skipped": "it is a skipped row (not a photo, never opened)"}  # why a current row has no vector


def _no_vectors(out: str, current: pa.Table) -> str:
    """Why no current row of `out` has a vector, as it is: no rows, no decoded ones, or rows of older runs."""
    if not current.num_rows:
        return f"{out} has no current rows to search (no photo scanned into it yet, or every one deleted since)"
    decoded = pc.sum(pc.is_in(current.column("status"), value_set=pa.array(OK_STATUSES))).as_py() or 0
    if not decoded:
        return (f"{out} has no decoded photos to search: its {current.num_rows} current rows are errors or skipped "
                "files, which have no vectors")
    return (f"{out} holds no embeddings yet: its {decoded} decoded rows come from runs before dogbreed stored them (or "
            "from a scan with inference.embeddings off); scan it with --mode all to store them")


@lru_cache(maxsize=4)
def _index(out: str, version: int, eid: str) -> VectorIndex:
    """The index of one network's vectors, refreshed to this version once per process."""
    output = Output(out)
    index = VectorIndex(output, eid)
    index.refresh(output.snapshot(version), live=index.live_runs(_current(out, version)))
    return index


@lru_cache(maxsize=8)
def _allowed(out: str, version: int, eid: str, status: str | None) -> dict[str, np.ndarray]:
    """Per segment: which of its vectors belong to current rows (of this network and, if asked, this status)."""
    rows = _current(out, version)
    keep = pc.fill_null(pc.equal(rows.column("embedding_id"), eid), False)
    if status:
        keep = pc.and_(keep, pc.equal(rows.column("status"), status))
    rows = rows.filter(keep)
    runs = rows.column("run_id").to_numpy(zero_copy_only=False)
    by_run = {run: rows.column("path").filter(pa.array(runs == run)) for run in np.unique(runs)}
    index = _index(out, version, eid)
    allowed = {}
    for segment in index.segments:
        if segment.name in by_run:
            seg_paths = index.keys(segment).column("path")
            allowed[segment.name] = np.asarray(pc.is_in(seg_paths, value_set=by_run[segment.name].combine_chunks())
                                               .to_numpy(zero_copy_only=False), dtype=bool)
    return allowed


def _stored_vector(index: VectorIndex, path: str, run_id: str) -> np.ndarray:
    segment = next((s for s in index.segments if s.name == run_id), None)
    if segment is not None:
        row = index.position(segment, path)
        if row is not None:
            return np.asarray(index.vectors(segment)[row], dtype=np.float32)
    raise SimilarError(f"{path} has no indexed vector in run {run_id}")
