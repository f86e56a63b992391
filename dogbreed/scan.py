"""The batch job: list -> plan (incremental) -> decode (CPU tasks) -> infer (actor pool) -> Parquet -> commit.

Every file found yields exactly one row; a bad photo becomes an error row, never a crash. A re-run does
only new or changed files (path + size + mtime) for the current model, and records vanished files as
deleted. The whole run is committed atomically by :class:`dogbreed.store.OutputStore`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dogbreed import results
from dogbreed.config import ScanConfig, dump_config
from dogbreed.images import FileEntry, RootError, list_files
from dogbreed.models import describe_model
from dogbreed.predictors import BreedPredictor, Decoder
from dogbreed.store import OutputStore, new_run_id, utcnow

log = logging.getLogger("dogbreed.scan")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_PHOTOS, EXIT_REFUSED, EXIT_LOCKED = 0, 1, 2, 3, 4, 5
DRY_RUN_PREVIEW = 10  # paths a dry run lists of each kind
DECODE_BATCHES_PER_WORKER = 200  # a decode worker process exits after this many batches (max_calls)


class ScanRefused(RuntimeError):
    """The archive looks unavailable (missing, unreadable, suddenly empty); nothing was changed."""


@dataclass
class Plan:
    """What a run will do: files to process and files to record as deleted."""

    listed: int
    todo: list[FileEntry]
    deleted: list[str]
    unchanged: int


@dataclass
class ScanSummary:
    """What a run did; `line()` is the one-line summary for cron logs."""

    run_id: str | None
    out: str
    model_id: str
    listed: int
    processed: int
    unchanged: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    dry_run: bool = False
    would_process: list[str] = field(default_factory=list)  # dry run: the first paths a run would process
    would_delete: list[str] = field(default_factory=list)  # dry run: the first paths it would record as deleted

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_PHOTOS if self.counts.get("error", 0) else EXIT_OK

    def line(self) -> str:
        c = self.counts
        if self.dry_run:
            return (f"dry run: {self.listed} files; would process {self.processed} (new, changed or not yet done "
                    f"for model {self.model_id}), skip {self.unchanged} unchanged, record {c.get('deleted', 0)} "
                    f"as deleted; nothing written to {self.out}")
        return (f"run {self.run_id}: {self.listed} files, {self.processed} processed, {self.unchanged} unchanged; "
                f"dogs {c.get('dog', 0)}, humans {c.get('human', 0)}, dog+human {c.get('dog_and_human', 0)}, "
                f"neither {c.get('neither', 0)}, errors {c.get('error', 0)}, skipped {c.get('skipped', 0)}, "
                f"deleted {c.get('deleted', 0)}; {self.images_per_s:.1f} images/s; {self.seconds:.1f} s; out {self.out}")


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _normalise_root(root: str) -> str:
    return root if "://" in root else str(Path(root).absolute())


def list_roots(roots: list[str], include_hidden: bool) -> dict[str, list[FileEntry]]:
    """Files per root; a missing or unreadable root raises ScanRefused."""
    found: dict[str, list[FileEntry]] = {}
    for root in roots:
        try:
            found[root] = list(list_files(root, include_hidden))
        except RootError as e:
            raise ScanRefused(str(e)) from None
    return found


def make_plan(found: dict[str, list[FileEntry]], known: pa.Table, model_id: str, cfg: ScanConfig) -> Plan:
    """Decide new/changed/deleted against the latest committed rows, refusing a vanished archive."""
    k_path = known.column("path").to_pylist()
    k_status = known.column("status").to_pylist()
    k_model = known.column("model_id").to_pylist()
    k_size = known.column("size_bytes").to_pylist()
    k_mtime = pc.cast(known.column("mtime"), pa.int64()).to_pylist()
    latest = {p: (s, m, sz, mt) for p, s, m, sz, mt in zip(k_path, k_status, k_model, k_size, k_mtime)}
    todo, deleted, unchanged, listed = [], [], 0, 0
    for root, entries in found.items():
        seen = {e.path for e in entries}
        alive = [p for p, v in latest.items() if _under(p, root) and v[0] != "deleted"]
        gone = [p for p in alive if p not in seen]
        if alive and not entries and not cfg.allow_empty_roots:
            raise ScanRefused(f"root {root} is empty but earlier runs saw {len(alive)} files there "
                              "(unmounted archive?); pass --allow-empty-roots if they were really deleted")
        if len(alive) >= 10 and len(gone) > cfg.max_deleted_fraction * len(alive):
            raise ScanRefused(f"root {root}: {len(gone)} of {len(alive)} known files vanished, over the "
                              f"max_deleted_fraction of {cfg.max_deleted_fraction}; refusing to record them as deleted")
        deleted += gone
        for e in entries:
            listed += 1
            prev = latest.get(e.path)
            done = (prev is not None and prev[1] == model_id and prev[0] in results.OK_STATUSES + ("skipped",)
                    and prev[2] == e.size and prev[3] == e.mtime_ns // 1000 and e.error is None)
            if done and cfg.mode == "missing":
                unchanged += 1
            else:
                todo.append(e)
    return Plan(listed=listed, todo=todo, deleted=sorted(set(deleted)), unchanged=unchanged)


class _InferStage:
    """Actor-pool stage: BreedPredictor then the fixed output schema (so the writer never infers types)."""

    def __init__(self, run_id: str, **predictor_kwargs: Any):
        self.run_id = run_id
        self.predict = BreedPredictor(**predictor_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return rows_to_table(self.predict(batch), self.run_id)


def _decode_stage(batch: dict[str, np.ndarray], **decoder_kwargs: Any) -> dict[str, np.ndarray]:
    return Decoder(**decoder_kwargs)(batch)


def rows_to_table(rows: dict[str, Any], run_id: str) -> pa.Table:
    """Predictor output columns -> a table with exactly results.SCHEMA."""
    n = len(rows["path"])
    ok = np.array([s in results.OK_STATUSES for s in rows["status"]], dtype=bool)
    cols = dict(rows)
    cols["mtime"] = pa.array(np.asarray(rows["mtime_ns"], dtype=np.int64) // 1000, type=pa.int64()).cast(results.UTC_US)
    for name in ("width", "height", "face_count"):
        cols[name] = [int(v) if good else None for v, good in zip(rows[name], ok)]
    cols["faces"] = [[dict(zip("xywh", b)) for b in json.loads(f)] if good else None for f, good in zip(rows["faces"], ok)]
    cols["dog_score"] = [float(v) if good else None for v, good in zip(rows["dog_score"], ok)]
    cols["breed_prob"] = [float(v) if good else None for v, good in zip(rows["breed_prob"], ok)]
    cols["breeds"] = [list(b) if good else None for b, good in zip(rows["breeds"], ok)]
    cols["run_id"] = [run_id] * n
    cols["processed_at"] = pa.array([utcnow()] * n, type=results.UTC_US)
    return results.to_table(cols)


def _inference_resources(cfg: ScanConfig) -> tuple[float, int, int]:
    """(GPUs per actor, number of actors, number of decode tasks) from the config and what the cluster has.

    Decode concurrency null = every CPU the actors do not reserve: on a 2-core CPU box 2 x 0.75 + 0.5.
    """
    import ray

    resources = ray.cluster_resources()
    gpus_in_cluster = resources.get("GPU", 0)
    num_gpus = cfg.inference.num_gpus
    if num_gpus == "auto":
        num_gpus = 1.0 if gpus_in_cluster >= 1 else 0.0
    if num_gpus and gpus_in_cluster < num_gpus:
        raise ScanRefused(f"the config asks for {num_gpus} GPU per inference actor but the cluster has {gpus_in_cluster:g} GPUs")
    actors = cfg.inference.concurrency or (max(1, int(gpus_in_cluster // num_gpus)) if num_gpus else 1)
    free_cpus = resources.get("CPU", 1) - actors * cfg.inference.num_cpus
    decoders = cfg.decode.concurrency or max(1, int(free_cpus / cfg.decode.num_cpus + 1e-6))
    return float(num_gpus), actors, decoders


def _work_table(todo: list[FileEntry]) -> pa.Table:
    return pa.table({
        "path": pa.array([e.path for e in todo], pa.string()),
        "size_bytes": pa.array([e.size for e in todo], pa.int64()),
        "mtime_ns": pa.array([e.mtime_ns for e in todo], pa.int64()),
        "listed_error": pa.array([e.error for e in todo], pa.string()),
    })


def run_pipeline(todo: list[FileEntry], cfg: ScanConfig, run_id: str, dest: Path) -> None:
    """Decode on CPU tasks, infer in an actor pool, and write Parquet with Ray Data into dest."""
    import ray

    spec, _ = describe_model(cfg.model)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    num_gpus, actors, decoders = _inference_resources(cfg)
    # The operators are sized here. Ray Data's reservation allocator would also hold CPUs back for the write stage,
    # which on 2 cores leaves room for one decode task at a time. A dataset copies the context when it is created.
    reservation, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    wait_before = ctx.wait_for_min_actors_s
    if cfg.inference.wait_for_actors_s:
        ctx.wait_for_min_actors_s = cfg.inference.wait_for_actors_s
    try:
        table = _work_table(todo)
        # Small blocks keep every decode task busy and the pipeline streaming; paths are tiny.
        block = max(cfg.decode.batch_size, 1)
        ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, table.num_rows, block)])
    finally:
        ctx.op_resource_reservation_enabled, ctx.wait_for_min_actors_s = reservation, wait_before
    ds = ds.map_batches(
        _decode_stage, batch_size=cfg.decode.batch_size, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=min(decoders, -(-table.num_rows // block))),
        fn_kwargs=dict(prep=spec.preprocessing, face=cfg.face, decode_cfg=cfg.decode, extensions=cfg.extensions),
        # Recycling decode workers bounds what a leak or heap fragmentation from huge photos can build up. It
        # also makes the remote args differ from the actors', so Ray Data does not fuse decoding into the
        # inference actors, where it would run off the main thread and the per-photo SIGALRM timeout is void.
        max_calls=DECODE_BATCHES_PER_WORKER,
    )
    ds = ds.map_batches(
        _InferStage, batch_size=cfg.inference.batch_size, batch_format="numpy", num_gpus=num_gpus,
        # Ray Data restarts a killed actor and retries its batches (max_restarts=-1, max_task_retries=-1 by
        # default), as Ray retries a decode task whose worker died (max_retries=3); _verify then checks the rows.
        num_cpus=cfg.inference.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=cfg.inference.max_tasks_in_flight),
        fn_constructor_kwargs=dict(run_id=run_id, model=cfg.model, top_k=cfg.top_k, dog_threshold=cfg.dog_threshold,
                                   count_dingo=cfg.count_dingo_as_dog,
                                   num_threads=None if num_gpus else max(1, int(cfg.inference.num_cpus))),
    )
    # Writing a block of result rows takes milliseconds: a quarter CPU lets it slip in between decode tasks.
    # Few, large files suit pandas, DuckDB and Spark; zstd keeps a row near 60 bytes on disk.
    ds.write_parquet(str(dest), min_rows_per_file=100_000, row_group_size=100_000, compression="zstd",
                     ray_remote_args={"num_cpus": 0.25})
    if log.isEnabledFor(logging.DEBUG):  # where the time went, per operator (dogbreed bench reads this)
        log.debug("Ray Data stats:\n%s", ds.stats())


def _verify(dest: Path, todo: list[FileEntry], run_id: str) -> None:
    """Guarantee exactly one row per planned file: drop duplicates, add an error row for any lost file."""
    files = sorted(dest.glob("*.parquet"))
    table = pq.read_table([str(f) for f in files], schema=results.SCHEMA) if files else results.empty_table()
    paths = table.column("path").to_pylist()
    counts = Counter(paths)
    missing = [e for e in todo if e.path not in counts]
    if not missing and all(v == 1 for v in counts.values()) and len(counts) == len(todo):
        return
    log.warning("repairing run output: %d duplicate rows, %d lost files", len(paths) - len(counts), len(missing))
    first = {p: i for i, p in reversed(list(enumerate(paths)))}
    table = table.take(pa.array(sorted(first.values()), pa.int64()))
    lost = results.to_table({
        "path": [e.path for e in missing], "size_bytes": [e.size for e in missing],
        "mtime": pa.array([e.mtime_ns // 1000 for e in missing], pa.int64()).cast(results.UTC_US),
        "status": ["error"] * len(missing), "error": ["lost during processing (worker failure)"] * len(missing),
        "run_id": [run_id] * len(missing), "processed_at": pa.array([utcnow()] * len(missing), results.UTC_US),
    })
    for f in files:
        f.unlink()
    pq.write_table(pa.concat_tables([table, lost]), dest / "part-repaired.parquet")


def _write_deleted(dest: Path, deleted: list[str], run_id: str) -> None:
    n = len(deleted)
    if n:
        pq.write_table(results.to_table({
            "path": deleted, "status": ["deleted"] * n, "run_id": [run_id] * n,
            "processed_at": pa.array([utcnow()] * n, results.UTC_US),
        }), dest / "deleted.parquet")


def _ray_session(address: str | None):
    """Join the given cluster (or RAY_ADDRESS), else start a local Ray for this run only."""
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False}
    if address == "local":
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return ray.shutdown


def _count(dest: Path) -> Counter:
    files = [str(f) for f in dest.glob("*.parquet")]
    if not files:
        return Counter()
    return Counter(pq.read_table(files, columns=["status"]).column("status").to_pylist())


def run_scan(cfg: ScanConfig, dry_run: bool = False) -> ScanSummary:
    """Scan cfg.roots into cfg.out: one committed run, or nothing at all if it fails or is killed."""
    if not cfg.roots:
        raise ScanRefused("no roots to scan")
    if not cfg.out:
        raise ScanRefused("no output folder given (--out)")
    cfg = cfg.model_copy(update={"roots": [_normalise_root(r) for r in cfg.roots]})
    store = OutputStore(cfg.out)
    _, model_id = describe_model(cfg.model)
    with store.lock():
        left = store.clear_staging()
        if left:
            log.warning("removed staging of %d unfinished earlier run(s): %s", len(left), ", ".join(left))
        started, t0 = utcnow(), time.perf_counter()
        found = list_roots(cfg.roots, cfg.include_hidden)
        known = results.latest_table(cfg.out, columns=["status", "model_id", "size_bytes", "mtime"])
        plan = make_plan(found, known, model_id, cfg)
        summary = ScanSummary(None, str(cfg.out), model_id, plan.listed, len(plan.todo), plan.unchanged, dry_run=dry_run)
        if dry_run:
            summary.counts = {"to_process": len(plan.todo), "deleted": len(plan.deleted)}
            summary.would_process = [e.path for e in plan.todo[:DRY_RUN_PREVIEW]]
            summary.would_delete = plan.deleted[:DRY_RUN_PREVIEW]
            return summary
        run_id = new_run_id()
        dest = store.stage(run_id)
        t_proc = time.perf_counter()
        if plan.todo:
            shutdown = _ray_session(cfg.address)
            try:
                run_pipeline(plan.todo, cfg, run_id, dest)
            finally:
                if shutdown:
                    shutdown()
            _verify(dest, plan.todo, run_id)
        proc_s = time.perf_counter() - t_proc
        _write_deleted(dest, plan.deleted, run_id)
        counts = _count(dest)
        summary.run_id, summary.counts = run_id, dict(counts)
        summary.seconds = time.perf_counter() - t0
        summary.images_per_s = len(plan.todo) / proc_s if plan.todo and proc_s > 0 else 0.0
        manifest = {
            "run_id": run_id, "model_id": model_id, "roots": cfg.roots, "mode": cfg.mode, "status": "committed",
            "started_at": started.isoformat(), "finished_at": utcnow().isoformat(),
            "counts": {"files": plan.listed, "processed": len(plan.todo), "unchanged": plan.unchanged, **counts},
            "files_per_root": {r: len(v) for r, v in found.items()},
            "seconds": round(summary.seconds, 3), "images_per_s": round(summary.images_per_s, 3),
        }
        store.commit(run_id, manifest, {"_config.yaml": dump_config(cfg)})
        return summary
