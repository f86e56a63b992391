"""The batch job: list -> plan (incremental) -> decode (CPU tasks) -> infer (actor pool) -> rows -> commit.

Every file found yields exactly one row; a bad photo becomes an error row, never a crash. The listing and the
plan are Arrow tables, the paths reach the decode tasks in blocks of thousands, and the result rows stream
back to this driver, which writes them into the output table's files, counts them and shows progress. The
whole run is one Delta commit (:mod:`dogbreed.table.store`), made while holding the output's lock (:mod:`dogbreed.table.lock`).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed.cluster.session import start_ray
from dogbreed.config import ScanConfig, dump_config, settings_id
from dogbreed.errors import Exit, Failed
from dogbreed.scan.listing import RootError, list_roots, normalise_roots
from dogbreed.scan.plan import KNOWN_COLUMNS, Plan, ScanRefused, make_plan
from dogbreed.table import readers, schema
from dogbreed.table.lock import hold
from dogbreed.table.ownership import check_roots, inspect
from dogbreed.table.store import RunWriter, check_out, clear_orphans, new_run_id, open_table, utcnow
from dogbreed.vision import device_decode
from dogbreed.vision.models import describe_model
from dogbreed.vision.predictors import TRANSIENT, BreedPredictor, Decoder

log = logging.getLogger("dogbreed.scan.job")

DRY_RUN_PREVIEW = 10  # paths a dry run lists of each kind
DECODE_CALLS_PER_WORKER = 50  # a decode worker process exits after this many blocks (max_calls)
OUTPUT_BLOCK_PHOTOS = 32  # decoded crops per block sent on to the actors
BLOCKS_PER_DECODER = 16  # a run is cut into at least this many blocks per decode task: a short tail


class ScanFailed(Failed):
    """The run could not produce its rows (e.g. every photo was lost to worker failures); nothing was committed."""


@dataclass
class ScanSummary:
    """What a run did; `line()` is the one-line summary for cron logs."""

    run_id: str | None
    out: str
    model_id: str
    listed: int
    processed: int
    unchanged: int
    carried: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    dry_run: bool = False
    would_process: list[str] = field(default_factory=list)  # dry run: the first paths a run would process
    would_delete: list[str] = field(default_factory=list)  # dry run: the first paths it would record as deleted

    @property
    def exit_code(self) -> int:
        return Exit.BAD_PHOTOS if self.counts.get("error", 0) else Exit.OK

    def line(self) -> str:
        c = self.counts
        if self.dry_run:
            return (f"dry run: {self.listed} files; would process {self.processed} (new, changed or not yet done "
                    f"for model {self.model_id}), skip {self.unchanged} unchanged, carry over {self.carried} "
                    f"moved or re-identified, record {c.get('deleted', 0)} as deleted; nothing written to {self.out}")
        return (f"run {self.run_id}: {self.listed} files, {self.processed} processed, {self.unchanged} unchanged, "
                f"{self.carried} carried over; "
                f"dogs {c.get('dog', 0)}, humans {c.get('human', 0)}, dog+human {c.get('dog_and_human', 0)}, "
                f"neither {c.get('neither', 0)}, errors {c.get('error', 0)}, skipped {c.get('skipped', 0)}, "
                f"deleted {c.get('deleted', 0)}; {self.images_per_s:.1f} images/s; {self.seconds:.1f} s; out {self.out}")


class _InferStage:
    """Actor-pool stage: BreedPredictor then the fixed output schema (so the driver never infers types)."""

    def __init__(self, run_id: str, settings: str, device_decode: dict[str, Any] | None = None, **predictor_kwargs: Any):
        self.run_id, self.settings = run_id, settings
        self.predict = BreedPredictor(**predictor_kwargs)
        self.decode = None  # decode.device accelerator: JPEGs arrive compressed and are decoded on the actor's device
        if device_decode is not None:
            self.decode = device_decode.DeviceDecoder(self.predict.spec.preprocessing, device=self.predict.device, **device_decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = self.predict(self.decode(batch) if self.decode else batch)
        table = schema.rows_to_table(rows, self.run_id, self.settings, utcnow())
        return table.append_column("_idx", pa.array(np.asarray(rows["_idx"], dtype=np.int64)))


_DECODERS: dict[str, Any] = {}  # one sandboxed decoder per decode worker process, kept across its tasks


def _decode_stage(batch: dict[str, np.ndarray], ship_jpegs: bool = False, **decoder_kwargs: Any) -> dict[str, np.ndarray]:
    key = repr((ship_jpegs, sorted(decoder_kwargs.items())))
    if key not in _DECODERS:
        _DECODERS.clear()
        _DECODERS[key] = (device_decode.JpegShipper if ship_jpegs else Decoder)(**decoder_kwargs)
    return _DECODERS[key](batch)


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


def _blocks(todo: pa.Table, cfg: ScanConfig, decoders: int) -> list[pa.Table]:
    """Input blocks of up to decode.block_rows paths, cut finer for a small run so that every decode task has work."""
    n = todo.num_rows
    rows = min(cfg.decode.block_rows, max(cfg.decode.batch_size, -(-n // (decoders * BLOCKS_PER_DECODER))))
    table = todo.append_column("_idx", pa.array(np.arange(n, dtype=np.int64)))
    return [table.slice(i, rows) for i in range(0, n, rows)]


def run_pipeline(todo: pa.Table, cfg: ScanConfig, run_id: str, writer: RunWriter) -> np.ndarray:
    """Decode on CPU tasks, infer in an actor pool, and write the rows streaming back; returns rows seen per todo row."""
    import ray

    spec, _ = describe_model(cfg.model)
    num_gpus, actors, decoders = _inference_resources(cfg)
    blocks = _blocks(todo, cfg, decoders)
    decoders = min(decoders, len(blocks))
    ds = ray.data.from_arrow(blocks)
    # The dataset's own context (copied from the global one at creation, and by every dataset derived from it):
    ctx = ds.context
    ctx.enable_progress_bars = False  # one bar, ours: files done of planned
    # The operators are sized here. Ray Data's reservation allocator would also hold CPUs back, which on 2 cores
    # leaves room for one decode task at a time.
    ctx.op_resource_reservation_enabled = False
    if cfg.inference.wait_for_actors_s:
        ctx.wait_for_min_actors_s = cfg.inference.wait_for_actors_s
    # A block whose task failed after its bounded retries is dropped, not fatal: its photos become 'lost'
    # error rows (transient, retried next run) and the rest of the run commits.
    ctx.max_errored_blocks = -1
    # Decoded crops are 150 KB each: small output blocks keep them streaming to the actors as they are made,
    # instead of waiting for a whole input block (or 128 MiB) of them.
    ctx.target_max_block_size = OUTPUT_BLOCK_PHOTOS * 3 * spec.preprocessing.input_size ** 2
    with warnings.catch_warnings():
        # Bounded retries can only be given as remote args, which Ray 2.60 deprecates without a replacement yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _stages(ds, cfg, spec, run_id, num_gpus, actors, decoders, _on_device(cfg, spec, num_gpus))
    seen = np.zeros(todo.num_rows, dtype=np.int32)
    with _progress(cfg, todo.num_rows) as bar:
        # Result blocks are small (no pixels). They are fetched here from the bundles' references: on Ray 2.60,
        # iter_batches() behind an actor pool stalls after a few batches, while the references keep streaming.
        for bundle in ds.iter_internal_ref_bundles():
            for block in ray.get(bundle.block_refs):
                idx = block.column("_idx").to_numpy()
                fresh = seen[idx] == 0  # a retried batch may deliver a row twice: the first one counts
                np.add.at(seen, idx, 1)
                writer.write(block.drop_columns(["_idx"]).filter(pa.array(fresh)))
                bar.update(int(fresh.sum()))
    if log.isEnabledFor(logging.DEBUG):  # where the time went, per operator (dogbreed bench reads this)
        log.debug("Ray Data stats:\n%s", ds.stats())
    return seen


def _on_device(cfg: ScanConfig, spec, num_gpus: float) -> bool:
    """Whether JPEGs are decoded in the inference actors (decode.device), and the model's resize exists in torch."""
    if not device_decode.wants_accelerator(cfg.decode.device, num_gpus):
        return False
    if not device_decode.device_supports(spec.preprocessing):
        log.warning("decode.device %s: the model's %s resize has no torch equivalent; photos are decoded on the CPU",
                    cfg.decode.device, spec.preprocessing.interpolation)
        return False
    return True


def _stages(ds, cfg: ScanConfig, spec, run_id: str, num_gpus: float, actors: int, decoders: int,
            on_device: bool = False):
    import ray

    ds = ds.map_batches(
        _decode_stage, batch_size=cfg.decode.batch_size, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=decoders),
        fn_kwargs=dict(prep=spec.preprocessing, face=cfg.face, decode_cfg=cfg.decode, ship_jpegs=on_device),
        # Ray Data would retry a task whose worker died without bound; a poison photo only kills its sandboxed
        # child, so a dead worker is a node or infrastructure fault and a few retries are plenty. max_calls also
        # keeps decoding from being fused into the inference actors.
        max_retries=cfg.decode.max_retries, max_calls=DECODE_CALLS_PER_WORKER,
    )
    ds = ds.map_batches(
        _InferStage, batch_size=cfg.inference.batch_size, batch_format="numpy", num_gpus=num_gpus,
        num_cpus=cfg.inference.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=cfg.inference.max_tasks_in_flight),
        max_restarts=cfg.inference.max_restarts, max_task_retries=cfg.inference.max_task_retries,
        fn_constructor_kwargs=dict(run_id=run_id, settings=settings_id(cfg), model=cfg.model, top_k=cfg.top_k,
                                   dog_threshold=cfg.dog_threshold, count_dingo=cfg.count_dingo_as_dog,
                                   breed_flip=cfg.breed_flip,
                                   device_decode=dict(face=cfg.face, decode_cfg=cfg.decode,
                                                      face_threads=max(1, int(cfg.inference.num_cpus)))
                                   if on_device else None,
                                   num_threads=None if num_gpus else max(1, int(cfg.inference.num_cpus))),
    )
    return ds


class _progress:
    """One tqdm bar on stderr (files done of planned, images/s, ETA) at a terminal; nothing under cron."""

    def __init__(self, cfg: ScanConfig, total: int):
        self.enabled = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        self.total = total

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="photo", desc="scan", disable=not self.enabled, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.05, mininterval=0.5)
        return self.bar

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _identity_columns(table: pa.Table) -> dict[str, Any]:
    return {"path": table.column("path"), "path_bytes": table.column("raw"), "size_bytes": table.column("size_bytes"),
            "mtime": pc.cast(pc.cast(pc.divide(table.column("mtime_ns"), 1000), pa.int64()), schema.UTC_US),
            "ctime": pc.cast(pc.cast(pc.divide(table.column("ctime_ns"), 1000), pa.int64()), schema.UTC_US)}


def _write_direct(writer: RunWriter, plan: Plan, run_id: str, settings: str, model_id: str) -> None:
    """Rows decided by listing (skipped, unreadable, loops) for files whose row changed."""
    d = plan.direct
    if d.num_rows:
        n = d.num_rows
        writer.write(schema.to_table({**_identity_columns(d), "status": d.column("status"), "error": d.column("error"),
                                       "error_kind": d.column("error_kind"), "model_id": [model_id] * n,
                                       "settings_id": [settings] * n, "run_id": [run_id] * n,
                                       "processed_at": pa.array([utcnow()] * n, schema.UTC_US)}))


def _write_carried(writer: RunWriter, plan: Plan, out: str, run_id: str, table: Any) -> None:
    """Moved or re-identified files: their previous result, under their current path and identity."""
    c = plan.carried
    if not c.num_rows:
        return
    old = readers.rows_of(out, c.column("src_path"), c.column("src_run"), table=table)
    if old.num_rows != c.num_rows:  # a source row vanished from history (never, unless edited by hand)
        raise ScanFailed(f"{c.num_rows - old.num_rows} carried-over rows could not be found in the history of {out}")
    n = old.num_rows
    cols = {name: old.column(name) for name in schema.SCHEMA.names}
    cols.update(_identity_columns(c))
    cols.update({"run_id": [run_id] * n, "processed_at": pa.array([utcnow()] * n, schema.UTC_US)})
    writer.write(schema.to_table(cols))


def _write_lost(writer: RunWriter, todo: pa.Table, seen: np.ndarray, run_id: str, settings: str) -> int:
    lost = todo.filter(pa.array(seen == 0))
    n = lost.num_rows
    if n:
        log.warning("%d photos were lost to worker failures after bounded retries; they are error rows, retried next run", n)
        writer.write(schema.to_table({**_identity_columns(lost), "status": ["error"] * n,
                                       "error": ["lost during processing (worker failure)"] * n,
                                       "error_kind": [TRANSIENT] * n, "settings_id": [settings] * n,
                                       "run_id": [run_id] * n, "processed_at": pa.array([utcnow()] * n, schema.UTC_US)}))
    return n


def _write_deleted(writer: RunWriter, deleted: list[str], run_id: str) -> None:
    n = len(deleted)
    if n:
        writer.write(schema.to_table({"path": deleted, "status": ["deleted"] * n, "run_id": [run_id] * n,
                                       "processed_at": pa.array([utcnow()] * n, schema.UTC_US)}))


def _preview(table: pa.Table) -> list[str]:
    return table.column("path").slice(0, DRY_RUN_PREVIEW).to_pylist()


def run_scan(cfg: ScanConfig, dry_run: bool = False) -> ScanSummary:
    """Scan cfg.roots into cfg.out: one committed run, or nothing at all if it fails or is killed."""
    if not cfg.roots:
        raise ScanRefused("no roots to scan")
    if not cfg.out:
        raise ScanRefused("no output folder given (--out)")
    loc = check_out(cfg.out, write=not dry_run)
    roots = normalise_roots(cfg.roots)
    check_roots(loc, roots.roots)
    for given, outer in roots.dropped:
        log.warning("root %s lies inside root %s: its files are scanned once, through %s", given, outer, outer)
    cfg = cfg.model_copy(update={"roots": roots.roots})
    _, model_id = describe_model(cfg.model)
    settings = settings_id(cfg)
    if dry_run:  # reads the committed table as it is: no lock, no marker, nothing written
        inspect(loc)
        return _dry_run(cfg, open_table(loc), model_id, settings)
    with hold(loc, cfg.lock_lease_s, break_lock=cfg.break_lock) as lease:
        table = open_table(loc)  # the snapshot this run plans from and commits on top of
        started, t0 = utcnow(), time.perf_counter()
        plan = _plan(cfg, table, model_id, settings)
        summary = ScanSummary(None, str(cfg.out), model_id, plan.listed, plan.todo.num_rows, plan.unchanged,
                              carried=plan.carried.num_rows)
        left = clear_orphans(loc, table)
        if left:
            log.warning("removed the files of %d unfinished earlier run(s): %s", len(left), ", ".join(left))
        run_id = new_run_id()
        with RunWriter(loc, run_id) as writer:
            proc_s = _write_run(writer, plan, cfg, run_id, settings, model_id, table)
        counts = Counter(writer.counts)
        summary.run_id, summary.counts = run_id, dict(counts)
        summary.seconds = time.perf_counter() - t0
        summary.images_per_s = plan.todo.num_rows / proc_s if plan.todo.num_rows and proc_s > 0 else 0.0
        manifest = {
            "run_id": run_id, "model_id": model_id, "settings_id": settings, "roots": cfg.roots, "mode": cfg.mode,
            "status": "committed", "started_at": started.isoformat(), "finished_at": utcnow().isoformat(),
            "counts": {"files": plan.listed, "processed": plan.todo.num_rows, "unchanged": plan.unchanged,
                       "carried": plan.carried.num_rows, "moved": plan.moved, **counts},
            "files_per_root": plan.files_per_root,
            "seconds": round(summary.seconds, 3), "images_per_s": round(summary.images_per_s, 3),
            "config": dump_config(cfg),
        }
        try:
            lease.check(str(cfg.out))
            writer.commit(table, manifest)
        except BaseException:
            writer.abandon()  # refused or failed: its files go now (a kill leaves them to the next run)
            raise
        return summary


def _plan(cfg: ScanConfig, table: Any, model_id: str, settings: str) -> Plan:
    """List the roots and plan the run against the latest committed rows of `table` (None: nothing yet)."""
    try:
        listing = list_roots(cfg.roots, cfg.include_hidden, cfg.follow_symlinks)
    except RootError as e:
        raise ScanRefused(str(e)) from None
    known = readers.latest_table(cfg.out, columns=["path", "run_id", *KNOWN_COLUMNS], compact=True, table=table)
    return make_plan(listing, cfg.roots, known, model_id, settings, cfg)


def _dry_run(cfg: ScanConfig, table: Any, model_id: str, settings: str) -> ScanSummary:
    plan = _plan(cfg, table, model_id, settings)
    summary = ScanSummary(None, str(cfg.out), model_id, plan.listed, plan.todo.num_rows, plan.unchanged,
                          carried=plan.carried.num_rows, dry_run=True)
    summary.counts = {"to_process": plan.todo.num_rows, "deleted": len(plan.deleted)}
    summary.would_process = _preview(plan.todo)
    summary.would_delete = plan.deleted[:DRY_RUN_PREVIEW]
    return summary


def _write_run(writer: RunWriter, plan: Plan, cfg: ScanConfig, run_id: str, settings: str, model_id: str,
               table: Any) -> float:
    """Every row of the run into the writer; returns the seconds spent processing photos."""
    _write_direct(writer, plan, run_id, settings, model_id)
    _write_carried(writer, plan, cfg.out, run_id, table)
    t_proc = time.perf_counter()
    if plan.todo.num_rows:
        shutdown = start_ray(cfg.address)
        try:
            seen = run_pipeline(plan.todo, cfg, run_id, writer)
        finally:
            if shutdown:
                shutdown()
        lost = _write_lost(writer, plan.todo, seen, run_id, settings)
        if lost == plan.todo.num_rows:
            raise ScanFailed(f"all {lost} photos were lost to worker failures; nothing was committed")
    proc_s = time.perf_counter() - t_proc
    _write_deleted(writer, plan.deleted, run_id)
    return proc_s
