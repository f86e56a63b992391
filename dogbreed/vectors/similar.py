"""`dogbreed similar`: the current rows nearest a query by the cosine similarity of their embeddings.

A query is a path already in the table (its stored vector) or any photo file, decoded and embedded through the
scan's own decode and predictor path with the model given (by default the offline default model). Vectors are only
compared with vectors of the same network (embedding_id): a query embedded by another one is one sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed.config import ScanConfig
from dogbreed.table.output import Output
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


def _current(output: Output, table) -> pa.Table:
    rows = output.latest(CURRENT, table=table)
    return rows.filter(pc.not_equal(rows.column("status"), "deleted"))


def _query_rows(queries: list[str], current: pa.Table, cfg: ScanConfig) -> list[tuple[str, str | None, np.ndarray | None]]:
    """(query, embedding_id, vector or None when it is a stored row's) for each query."""
    stored = set(current.column("path").to_pylist())
    out, files = [], []
    for q in queries:
        if q in stored:
            out.append((q, None, None))
        elif os.path.abspath(q) in stored:
            out.append((os.path.abspath(q), None, None))
        elif os.path.isfile(q):
            out.append((q, None, None))
            files.append(q)
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
    current = _current(output, table)
    with_vectors = current.filter(pc.is_valid(current.column("embedding_id")))
    if not with_vectors.num_rows:
        raise SimilarError(f"{out} holds no embeddings yet (rows of runs before dogbreed stored them have none); "
                           "scan it with --mode all to store them")
    resolved = _query_rows(queries, current, cfg)
    ids = set(with_vectors.column("embedding_id").to_pylist())
    by_path = {p: i for i, p in enumerate(current.column("path").to_pylist())}
    results = []
    for query, eid, vector in resolved:
        if vector is None:  # a stored row: its own embedding id and vector
            row = by_path[query]
            eid = current.column("embedding_id")[row].as_py()
            if eid is None:
                raise SimilarError(f"{query} has no embedding in {out} (status {current.column('status')[row].as_py()}, "
                                   "or scanned before dogbreed stored them)")
        elif eid not in ids:
            raise SimilarError(f"the query was embedded by {eid}, but the vectors in {out} were made by "
                               f"{', '.join(sorted(ids))}; pass the model the archive was scanned with (--model)")
        index = VectorIndex(output, eid)
        index.refresh(table)
        allowed = _allowed(index, with_vectors, eid, status, exclude=query)
        if vector is None:
            vector = _stored_vector(index, query, current.column("run_id")[by_path[query]].as_py())
        hits = index.search(vector[None, :], k, allowed)[0]
        results.append(Found(query, [_hit(current, by_path, path, sim) for path, _, sim in hits]))
    return results


def _allowed(index: VectorIndex, rows: pa.Table, eid: str, status: str | None, exclude: str) -> dict[str, np.ndarray]:
    """Per segment: which of its vectors belong to current rows (of this network and, if asked, this status)."""
    keep = pc.equal(rows.column("embedding_id"), eid)
    if status:
        keep = pc.and_(keep, pc.equal(rows.column("status"), status))
    keep = pc.and_(keep, pc.not_equal(rows.column("path"), exclude))
    rows = rows.filter(keep)
    by_run: dict[str, pa.Array] = {}
    runs = rows.column("run_id").to_numpy(zero_copy_only=False)
    paths = rows.column("path")
    for run in np.unique(runs):
        by_run[run] = paths.filter(pa.array(runs == run))
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
        where = np.flatnonzero(np.asarray(pc.equal(index.keys(segment).column("path"), path)
                                          .to_numpy(zero_copy_only=False), dtype=bool))
        if len(where):
            return np.asarray(index.vectors(segment)[int(where[0])], dtype=np.float32)
    raise SimilarError(f"{path} has no indexed vector in run {run_id}")


def _hit(current: pa.Table, by_path: dict[str, int], path: str, similarity: float) -> Hit:
    row = by_path[path]
    return Hit(path, round(similarity, 4), current.column("status")[row].as_py(), current.column("breed")[row].as_py())
