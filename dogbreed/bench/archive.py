"""Archive-scale benchmark: listing, planning, driver memory and time to first result at 10k to 1M files.

Each archive is hard links to a few dozen real small photos (an ext4 inode takes about 65,000 links), in folders
of a thousand. For each size it runs the real `dogbreed scan` as cron would, in a child process, and measures:
- a `--dry-run` (listing + planning): wall seconds and the driver's peak RSS;
- a real scan: seconds until the first results reach the driver, and the driver's peak RSS up to then plus a
  stretch of streaming; the scan is then interrupted (SIGTERM), which commits nothing;
- the nightly re-run over the same archive once every file has a current row: seconds and peak RSS.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from dogbreed.bench.photos import find_sources, make_photos
from dogbreed.bench.workdir import claim, fresh, tidy

PER_FOLDER = 1000
DISTINCT = 40  # source photos: 1,000,000 files are 25,000 links per inode
MAX_FILES = DISTINCT * 50_000  # ext4 takes about 65,000 links per inode
TARGET_RSS_GROWTH_MB = 300.0  # driver peak at 1M files minus its peak at the smallest size
TARGET_FIRST_RESULT_S = 60.0
TARGET_DRY_RUN_S = 60.0
_PROGRESS = re.compile(r"scan:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass
class SizeFigures:
    files: int
    build_s: float = 0.0
    dry_run_s: float = 0.0
    dry_run_rss_mb: float = 0.0
    first_result_s: float = float("nan")
    scan_rss_mb: float = 0.0
    streamed: int = 0  # results received before the interrupt
    stream_rate: float = 0.0  # results per second after the first
    unchanged_s: float = 0.0
    unchanged_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def _hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_archive(root: Path, n: int, sources: list[Path]) -> None:
    """n photos under root in folders of PER_FOLDER, each a hard link to one of `sources` (taken in turn)."""
    for i in range(n):
        folder = root / f"{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        src = sources[i % len(sources)]
        os.link(src, folder / f"{i:07d}{src.suffix}")


class _Child:
    """`dogbreed ARGS` in a child process: its wall time, its own peak RSS (VmHWM) and its stderr lines."""

    def __init__(self, args: list[str]):
        exe = Path(sys.executable).with_name("dogbreed")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.peak_mb, self.first_at, self.first_done, self.done = 0.0, None, 0, 0
        self.stdout = ""
        self._err_thread = threading.Thread(target=self._read_err, daemon=True)
        self._err_thread.start()
        self._mem_thread = threading.Thread(target=self._watch, daemon=True)
        self._mem_thread.start()

    def _read_err(self) -> None:
        buf = ""
        while True:
            chunk = self.proc.stderr.read(256)
            if not chunk:
                return
            buf = (buf + chunk)[-4096:]
            for m in _PROGRESS.finditer(buf):
                done = int(m.group(1))
                if done and self.first_at is None:
                    self.first_at, self.first_done = time.perf_counter() - self.t0, done
                self.done = max(self.done, done)

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.peak_mb = max(self.peak_mb, _hwm_mb(self.proc.pid))
            time.sleep(0.1)

    def wait(self, timeout: float) -> float:
        """Seconds from start to exit (stderr is the reader thread's; stdout is read here)."""
        self.stdout = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        seconds = time.perf_counter() - self.t0
        self._mem_thread.join()
        self._err_thread.join(timeout=10)
        return seconds


def _dry_run(root: Path, out: Path, fig: SizeFigures) -> None:
    child = _Child(["scan", str(root), "--out", str(out), "--dry-run", "--no-progress"])
    fig.dry_run_s = child.wait(timeout=1800)
    fig.dry_run_rss_mb = child.peak_mb
    if child.proc.returncode != 0:
        raise RuntimeError(f"dry run failed: {child.stdout[-500:]}")


def _scan_start(root: Path, out: Path, fig: SizeFigures, stream_s: float, limit_s: float) -> None:
    child = _Child(["scan", str(root), "--out", str(out), "--progress"])
    deadline = time.perf_counter() + limit_s
    while child.first_at is None and child.proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.1)
    fig.first_result_s = child.first_at if child.first_at is not None else float("nan")
    if child.first_at is not None:
        time.sleep(stream_s)
        fig.streamed = child.done
        fig.stream_rate = (child.done - child.first_done) / (time.perf_counter() - child.t0 - child.first_at)
    if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGTERM)  # the scan unwinds and stops its Ray; nothing is committed
    try:
        child.wait(timeout=120)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.wait(timeout=60)
    fig.scan_rss_mb = child.peak_mb


def _commit_done(root: Path, out: Path, config: Path | None) -> int:
    """Commit one run in which every listed file has a current 'neither' row (as if all were processed)."""
    from dogbreed.config import ScanConfig, load_config
    from dogbreed.scan.listing import list_roots, normalise_roots
    from dogbreed.table import schema
    from dogbreed.table.output import Output
    from dogbreed.table.store import RunWriter, utcnow
    from dogbreed.vision.decision import settings_id
    from dogbreed.vision.models import describe_model

    cfg = load_config(ScanConfig, config, {"roots": [str(root)], "out": str(out)})
    roots = normalise_roots(cfg.roots).roots
    listing = list_roots(roots)
    n = listing.num_rows
    with Output(out, write=True).writing(cfg.lock_lease_s) as session:
        with session.writer() as writer:
            for start in range(0, n, RunWriter.ROW_GROUP):
                part = listing.slice(start, RunWriter.ROW_GROUP)
                k = part.num_rows
                writer.write(schema.to_table({
                    "path": part.column("path"), "size_bytes": part.column("size"),
                    "mtime": _us(part.column("mtime_ns")), "ctime": _us(part.column("ctime_ns")),
                    "status": ["neither"] * k, "model_id": [describe_model(cfg.model)[1]] * k,
                    "settings_id": [settings_id(cfg)] * k, "run_id": [writer.run_id] * k,
                    "processed_at": pa.array([utcnow()] * k, schema.UTC_US)}))
        session.commit(writer, {"run_id": writer.run_id, "status": "committed", "synthetic": True})
    return n


def _us(ns: pa.ChunkedArray) -> pa.Array:
    from dogbreed.table import schema

    return schema.timestamps(ns)


def _unchanged(root: Path, out: Path, fig: SizeFigures, config: Path | None) -> None:
    n = _commit_done(root, out, config)
    child = _Child(["scan", str(root), "--out", str(out), "--no-progress", *(["-c", str(config)] if config else [])])
    fig.unchanged_s = child.wait(timeout=1800)
    fig.unchanged_rss_mb = child.peak_mb
    if f"{n} files, 0 processed, {n} unchanged" not in child.stdout:
        raise RuntimeError(f"the re-run over an unchanged archive did work: {child.stdout.strip()}")


def run_archive_benchmark(workdir: Path, sizes: list[int], data: Path | None = None, stream_s: float = 20.0,
                          log: Callable[[str], None] = print) -> list[SizeFigures]:
    """Every figure for every archive size, smallest first; the archives are removed afterwards. Each archive and
    table lies in a folder of workdir that the benchmark made (workdir.fresh): a folder there it did not make is
    refused before any work, never deleted."""
    names = {n: [f"archive-{n}", f"out-{n}-dry", f"out-{n}-scan", f"out-{n}-done"] for n in sizes}
    claim(workdir, [name for n in sizes for name in names[n]])
    sources = make_photos(find_sources(data, log=log), workdir / "sources", DISTINCT, size=(320, 240))
    figures = []
    for n in sorted(sizes):
        folders = [workdir / name for name in names[n]]
        fig = SizeFigures(n)
        try:
            root, dry, started, done = (fresh(f) / what for f, what in zip(folders, ("photos", "table", "table", "table")))
            t = time.perf_counter()
            make_archive(root, n, sources)
            fig.build_s = time.perf_counter() - t
            _dry_run(root, dry, fig)
            _scan_start(root, started, fig, stream_s, limit_s=600)
            _unchanged(root, done, fig, None)
        finally:
            for f in folders:
                tidy(f)
        log(format_size(fig))
        figures.append(fig)
    return figures


def format_size(f: SizeFigures) -> str:
    return (f"{f.files:>9,} files: built in {f.build_s:.0f} s; dry run {f.dry_run_s:.1f} s, {f.dry_run_rss_mb:.0f} MiB; "
            f"first result after {f.first_result_s:.1f} s, driver peak {f.scan_rss_mb:.0f} MiB, {f.stream_rate:.1f} "
            f"photos/s streaming; unchanged re-run {f.unchanged_s:.1f} s, {f.unchanged_rss_mb:.0f} MiB")


def format_report(figures: list[SizeFigures]) -> str:
    """The table for the README, and each target with whether it held."""
    lines = ["| files | dry run (s) | dry-run peak RSS (MiB) | first result (s) | scan driver peak RSS (MiB) | "
             "unchanged re-run (s) | re-run peak RSS (MiB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        lines.append(f"| {f.files:,} | {f.dry_run_s:.1f} | {f.dry_run_rss_mb:.0f} | {f.first_result_s:.1f} | "
                     f"{f.scan_rss_mb:.0f} | {f.unchanged_s:.1f} | {f.unchanged_rss_mb:.0f} |")
    small, big = figures[0], figures[-1]
    growth = big.scan_rss_mb - small.scan_rss_mb
    ok = lambda met: "ok" if met else "MISSED"  # noqa: E731
    lines += [
        "",
        f"driver peak RSS growth, {small.files:,} -> {big.files:,} files: {growth:.0f} MiB "
        f"(target <= {TARGET_RSS_GROWTH_MB:.0f}): {ok(growth <= TARGET_RSS_GROWTH_MB)}",
        f"first result at {big.files:,} files: {big.first_result_s:.1f} s (target <= {TARGET_FIRST_RESULT_S:.0f}): "
        f"{ok(big.first_result_s <= TARGET_FIRST_RESULT_S)}",
        f"dry run at {big.files:,} files: {big.dry_run_s:.1f} s (target < {TARGET_DRY_RUN_S:.0f}): "
        f"{ok(big.dry_run_s < TARGET_DRY_RUN_S)}",
    ]
    return "\n".join(lines)
