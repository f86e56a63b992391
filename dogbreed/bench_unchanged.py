"""Benchmark of the nightly re-run over an unchanged archive: it must open no image and take seconds.

Builds an archive from hard links to 100 tiny JPEGs, commits an "all done" run for it through
results.to_table + OutputStore.commit (the real commit path), then times a real run_scan.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dogbreed import results
from dogbreed.config import ScanConfig, load_config
from dogbreed.images import list_files
from dogbreed.models import describe_model
from dogbreed.scan import make_plan, run_scan
from dogbreed.store import OutputStore, new_run_id, utcnow

SCAN_YAML = Path(__file__).resolve().parents[1] / "configs" / "scan.yaml"
FOLDERS = 100  # one source JPEG per folder, hard-linked (ext4 allows 65,000 links per inode)


def make_archive(root: Path, n: int) -> None:
    """n valid JPEGs in FOLDERS folders; each folder's files are hard links of one 16x16 photo."""
    per = -(-n // FOLDERS)
    for f in range(FOLDERS):
        folder = root / f"{f:03d}"
        folder.mkdir(parents=True)
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (f, 255 - f, 128)).save(buf, "JPEG")
        src = folder / "000000.jpg"
        src.write_bytes(buf.getvalue())
        for i in range(1, min(per, n - f * per)):
            os.link(src, folder / f"{i:06d}.jpg")


def commit_done(root: Path, out: Path, model_id: str) -> int:
    """Commit one run holding a 'neither' row for every file, as if every photo had been processed."""
    entries = list(list_files(str(root)))
    n = len(entries)
    run_id, now = new_run_id(), utcnow()
    table = results.to_table({
        "path": [e.path for e in entries], "size_bytes": [e.size for e in entries],
        "mtime": pa.array([e.mtime_ns // 1000 for e in entries], pa.int64()).cast(results.UTC_US),
        "status": ["neither"] * n, "width": np.full(n, 16), "height": np.full(n, 16), "face_count": np.zeros(n, int),
        "model_id": [model_id] * n, "run_id": [run_id] * n, "processed_at": pa.array([now] * n, results.UTC_US),
    })
    store = OutputStore(out)
    pq.write_table(table, store.stage(run_id) / "part-0.parquet")
    store.commit(run_id, {"run_id": run_id, "model_id": model_id, "status": "committed", "synthetic": True})
    return n


def _profile(cfg: ScanConfig) -> None:
    """Where the time of a re-run goes: listing, reading the latest rows, planning."""
    t0 = time.perf_counter()
    found = {r: list(list_files(r)) for r in cfg.roots}
    t1 = time.perf_counter()
    known = results.latest_table(cfg.out, columns=["status", "model_id", "size_bytes", "mtime"])
    t2 = time.perf_counter()
    make_plan(found, known, describe_model(cfg.model)[1], cfg)
    t3 = time.perf_counter()
    print(f"profile: list {t1 - t0:.2f} s, latest rows {t2 - t1:.2f} s, plan {t3 - t2:.2f} s")


def run_unchanged_benchmark(files: int = 100_000, workdir: Path | None = None, config: Path = SCAN_YAML) -> float:
    """Seconds of a real re-run over `files` unchanged files (asserting that nothing was processed)."""
    work = workdir or Path(tempfile.mkdtemp(prefix="bench_unchanged_"))
    root, out = work / "archive", work / "out"
    try:
        t = time.perf_counter()
        make_archive(root, files)
        n = commit_done(root, out, describe_model("default")[1])
        print(f"setup: {n} files and a committed run in {time.perf_counter() - t:.1f} s")
        cfg = load_config(ScanConfig, config, {"roots": [str(root)], "out": str(out)})
        _profile(cfg)
        t = time.perf_counter()
        summary = run_scan(cfg)
        seconds = time.perf_counter() - t
        assert summary.processed == 0 and summary.unchanged == n, summary.line()  # no image was opened
        print(summary.line())
        print(f"unchanged re-run over {n} files: {seconds:.2f} s")
        return seconds
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
