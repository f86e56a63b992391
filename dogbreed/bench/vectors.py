"""`dogbreed bench --mode similar`: what `similar` and `relabel` cost at 10k, 100k and 1M rows.

Each size is a real table of real embeddings (the default model's features of real photos) repeated with
multiplicative noise, committed the way a scan commits. Each measurement runs in a child process of its own, so its
peak memory (VmHWM) is its own: the first index build and an incremental refresh (a second run of 1% more rows),
the first and warm query latency, recall@10 against an exact float32 search over the current rows, and relabel's
throughput with the default model (one commit of every row). :func:`storing_cost` is the speed benchmark's
measure of what storing the vectors adds to a scan.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUERIES = 20
MAX_ROWS = 10_000_000  # about 18 GB of vectors and as much disk: past that, --rows 10**12 only filled the disk
TARGETS = {"warm_query_s": 1.0, "recall_at_10": 0.95, "peak_mb": 4096, "relabel_s": 120.0}  # at 1M rows


@dataclass
class VectorFigures:
    rows: int
    bytes_per_row: float = 0.0
    build_s: float = 0.0
    build_peak_mb: float = 0.0
    refresh_rows: int = 0
    refresh_s: float = 0.0
    first_query_s: float = 0.0
    warm_query_s: float = 0.0
    query_peak_mb: float = 0.0
    recall_at_10: float = 0.0
    relabel_s: float = 0.0
    relabel_peak_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def real_vectors(sources: list[Path], limit: int = 256) -> np.ndarray:
    """The default model's pooled features of real photos (what a scan stores)."""
    from dogbreed.config import ScanConfig
    from dogbreed.evaluation.breeds import analyze

    df = analyze([str(p) for p in sources[:limit]], ScanConfig())
    good = [np.asarray(v, dtype=np.float32) for v in df["embedding"] if v is not None]
    return np.stack(good)


def make_table(out: Path, rows: int, base: np.ndarray, seed: int = 0, prefix: str = "/archive/p") -> None:
    """Commit `rows` rows whose vectors are real ones times (1 + 0.15 * noise), as one run, in blocks."""
    from dogbreed.table import schema
    from dogbreed.table.output import Output
    from dogbreed.table.store import utcnow
    from dogbreed.vision.models import load_default

    eid = load_default().embedding_id
    rng = np.random.default_rng(seed)
    with Output(out, write=True).writing(60, what="bench") as session:
        with session.writer() as writer:
            for start in range(0, rows, 16_384):
                n = min(16_384, rows - start)
                x = base[rng.integers(0, len(base), n)] * (1 + 0.15 * rng.standard_normal((n, base.shape[1])))
                x = np.maximum(x, 0).astype(np.float32)
                writer.write(schema.to_table({
                    "path": pa.array([f"{prefix}{start + i:08d}.jpg" for i in range(n)]),
                    "status": pa.array(["dog"] * n), "face_count": pa.array(np.zeros(n, np.int32)),
                    "faces": pa.nulls(n, pa.list_(schema.BOX)), "run_id": pa.array([writer.run_id] * n),
                    "processed_at": pa.array([utcnow()] * n, schema.UTC_US),
                    "embedding": schema.embedding_array(x, np.ones(n, bool)), "embedding_id": pa.array([eid] * n)}))
        session.commit(writer, {"run_id": writer.run_id, "status": "committed", "synthetic": True})


CHILD = """
import json, sys, time, numpy as np
from dogbreed.config import ScanConfig
def hwm():
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
what, out = sys.argv[1], sys.argv[2]
res = {}
if what == "build":
    from dogbreed.table.output import Output
    from dogbreed.vectors.index import VectorIndex
    from dogbreed.vision.models import load_default
    output = Output(out)
    t = time.perf_counter(); added = VectorIndex(output, load_default().embedding_id).refresh(output.require())
    res = {"seconds": time.perf_counter() - t, "added": added}
elif what == "query":
    from dogbreed.vectors.similar import similar
    queries = json.loads(sys.argv[3])
    t = time.perf_counter(); similar(out, queries[:1], ScanConfig(), k=20); res["first"] = time.perf_counter() - t
    times, hits = [], []
    for q in queries:
        t = time.perf_counter(); (f,) = similar(out, [q], ScanConfig(), k=20); times.append(time.perf_counter() - t)
        hits.append([h.path for h in f.hits])
    res.update(warm=float(np.median(times)), hits=hits)
elif what == "relabel":
    from dogbreed.vectors.relabel import relabel
    t = time.perf_counter(); s = relabel(out, ScanConfig(model="default")); res = {"seconds": time.perf_counter() - t, "rows": s.relabelled}
res["peak_mb"] = hwm()
print(json.dumps(res))
"""


def _child(what: str, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, what, str(out), *args], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {what} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exact_top10(out: Path, queries: list[str]) -> list[list[str]]:
    """Exact float32 cosine search over every current row (the reference for recall), chunk by chunk."""
    from dogbreed.table.readers import dataset

    ds = dataset(str(out))
    qv, found = None, []
    table = ds.to_table(columns=["path", "embedding"], filter=pc.field("path").isin(queries))
    by_path = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist()))
    qv = np.stack([np.asarray(by_path[q], np.float32) for q in queries])
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    best = [[] for _ in queries]
    for batch in ds.to_batches(columns=["path", "embedding"], batch_size=65_536):
        col = batch.column("embedding")
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = qv @ x.T
        paths = batch.column("path").to_pylist()
        for i, q in enumerate(queries):
            top = np.argsort(-sims[i])[:12]
            best[i] += [(float(sims[i][j]), paths[j]) for j in top if paths[j] != q]
    for i in range(len(queries)):
        found.append([p for _, p in sorted(best[i], reverse=True)[:10]])
    return found


def run_vector_benchmark(workdir: Path, sizes: list[int], sources: list[Path],
                         log: Callable[[str], None] = print) -> list[VectorFigures]:
    """Every figure for every table size (at least QUERIES rows), each table in workdir/similar-ROWS, a folder the
    benchmark made (workdir.fresh) and deletes afterwards: a folder there it did not make is refused before any work."""
    from dogbreed.bench.workdir import claim, fresh, remove

    if min(sizes) < QUERIES:
        raise ValueError(f"{min(sizes)} rows: the benchmark's {QUERIES} queries need at least as many rows")
    claim(workdir, [f"similar-{rows}" for rows in sizes])
    log(f"vectors: embedding {min(len(sources), 256)} real photos")
    base = real_vectors(sources)
    figures = []
    for rows in sizes:
        out = fresh(workdir / f"similar-{rows}") / "table"
        fig = VectorFigures(rows)
        log(f"vectors: {rows} rows: writing the table")
        make_table(out, rows, base)
        table_bytes = sum(p.stat().st_size for p in (out / "data").rglob("*.parquet"))
        fig.bytes_per_row = table_bytes / rows
        log(f"vectors: {rows} rows: index build")
        b = _child("build", out)
        fig.build_s, fig.build_peak_mb = b["seconds"], b["peak_mb"]
        fig.refresh_rows = max(1, rows // 100)
        make_table(out, fig.refresh_rows, base, seed=1, prefix="/archive/new")
        r = _child("build", out)
        fig.refresh_s = r["seconds"]
        rng = np.random.default_rng(2)
        queries = [f"/archive/p{i:08d}.jpg" for i in rng.choice(rows, QUERIES, replace=False)]
        log(f"vectors: {rows} rows: {QUERIES} queries")
        q = _child("query", out, json.dumps(queries))
        fig.first_query_s, fig.warm_query_s, fig.query_peak_mb = q["first"], q["warm"], q["peak_mb"]
        exact = exact_top10(out, queries)
        fig.recall_at_10 = float(np.mean([len(set(h[:10]) & set(e)) / 10 for h, e in zip(q["hits"], exact)]))
        log(f"vectors: {rows} rows: relabel")
        rl = _child("relabel", out)
        fig.relabel_s, fig.relabel_peak_mb = rl["seconds"], rl["peak_mb"]
        figures.append(fig)
        log(format_figures(fig))
        remove(out.parent)
    return figures


def format_figures(f: VectorFigures) -> str:
    return (f"{f.rows:>9,} rows: {f.bytes_per_row:,.0f} B/row; index build {f.build_s:.1f} s (peak {f.build_peak_mb:,.0f} MiB), "
            f"refresh +{f.refresh_rows:,} rows {f.refresh_s:.1f} s; query first {f.first_query_s:.2f} s, warm "
            f"{f.warm_query_s:.2f} s (peak {f.query_peak_mb:,.0f} MiB), recall@10 {f.recall_at_10:.3f}; relabel "
            f"{f.relabel_s:.1f} s = {f.rows / max(f.relabel_s, 1e-9):,.0f} rows/s (peak {f.relabel_peak_mb:,.0f} MiB)")


def format_report(figures: list[VectorFigures]) -> str:
    lines = ["similar and relabel at scale (each figure measured in a child process of its own):"]
    lines += [format_figures(f) for f in figures]
    big = next((f for f in figures if f.rows >= 1_000_000), None)
    if big is not None:
        peak = max(big.build_peak_mb, big.query_peak_mb, big.relabel_peak_mb)
        checks = [("warm query", big.warm_query_s, TARGETS["warm_query_s"], "s", True),
                  ("recall@10", big.recall_at_10, TARGETS["recall_at_10"], "", False),
                  ("peak memory", peak, TARGETS["peak_mb"], "MiB", True),
                  ("relabel", big.relabel_s, TARGETS["relabel_s"], "s", True)]
        for name, value, target, unit, at_most in checks:
            ok = value <= target if at_most else value >= target
            lines.append(f"  1M target {name}: {value:.3g}{unit} {'<=' if at_most else '>='} {target:g}{unit}: "
                         f"{'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def storing_cost(paths: list[Path], cfg, predictor, repeats: int = 5) -> dict[str, float]:
    """The CPU seconds that storing embeddings adds to a scan of `paths`, measured apart from it (one process, least
    of `repeats`): "actor", its result table with vectors over the same rows without; "block", that table's Arrow
    IPC on its way to the driver; "driver", the zstd Parquet write. `cfg` is the scan's ScanConfig."""
    import io
    import time

    import pyarrow.parquet as pq

    from dogbreed.evaluation.breeds import listed
    from dogbreed.table import schema
    from dogbreed.table.store import utcnow
    from dogbreed.vision.predictors import Decoder, without_embeddings

    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.photos)
    try:
        rows = predictor(decoder(listed([str(p) for p in paths])))
    finally:
        decoder.close()
    plain = without_embeddings(rows)  # the same rows as a scan storing none makes them

    def least(fn: Callable[..., object], *args: object) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
        return min(times)

    def ipc(table: pa.Table) -> None:
        with pa.ipc.new_stream(io.BytesIO(), table.schema) as w:
            w.write_table(table)

    extra = {"actor": 0.0, "block": 0.0, "driver": 0.0}
    for sign, r in ((1, rows), (-1, plain)):
        table = schema.rows_to_table(r, "bench", None, utcnow())
        extra["actor"] += sign * least(schema.rows_to_table, r, "bench", None, utcnow())
        extra["block"] += sign * least(ipc, table)
        extra["driver"] += sign * least(lambda t=table: pq.write_table(t, io.BytesIO(), compression="zstd"))
    return {k: max(v, 0.0) for k, v in extra.items()}
