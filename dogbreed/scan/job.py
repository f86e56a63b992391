"""The scan job: list, plan (incremental), process (the Ray pipeline), commit.

Every file found yields exactly one row; a bad photo becomes an error row, never a crash. The listing and the
plan are Arrow tables; rows decided without decoding (skipped, carried over, deleted, lost) are written here, the
rest stream back from :mod:`dogbreed.scan.pipeline`. The whole run is one Delta commit, made through the
output object (:mod:`dogbreed.table.output`) while holding the output's lock.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dogbreed.cluster.session import start_ray
from dogbreed.config import ScanConfig, dump_config
from dogbreed.errors import Exit, Failed
from dogbreed.scan.listing import RootError, check_root, list_roots, normalise_roots
from dogbreed.scan.pipeline import run_pipeline
from dogbreed.scan.plan import KNOWN_COLUMNS, Plan, ScanRefused, make_plan
from dogbreed.table import readers, schema
from dogbreed.table.output import Output
from dogbreed.table.store import RunWriter, utcnow
from dogbreed.vision.codecs import check_plugins
from dogbreed.vision.decision import settings_id
from dogbreed.vision.faces import resolved
from dogbreed.vision.models import check_model, describe_model
from dogbreed.vision.worker import TRANSIENT

log = logging.getLogger("dogbreed.scan.job")

DRY_RUN_PREVIEW = 10  # paths a dry run lists of each kind
KNOWN = ["path", "run_id", *KNOWN_COLUMNS]  # what planning reads of the latest rows: never the results themselves


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


def _identity_columns(table: pa.Table) -> dict[str, Any]:
    return {"path": table.column("path"), "path_bytes": table.column("raw"), "size_bytes": table.column("size_bytes"),
            "mtime": schema.timestamps(table.column("mtime_ns")), "ctime": schema.timestamps(table.column("ctime_ns"))}


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
    """Scan cfg.roots into cfg.out: list, plan, process, commit. One committed run, or nothing at all if the run
    fails or is killed; a dry run reads the committed table as it is and writes nothing (no lock, no marker)."""
    if not cfg.roots:
        raise ScanRefused("no roots to scan")
    if not cfg.out:
        raise ScanRefused("no output folder given (--out)")
    output = Output(cfg.out, write=not dry_run)
    roots = normalise_roots(cfg.roots)
    output.check_roots(roots.roots)
    for root in roots.roots:  # an unmounted archive is refused at once, before seconds of model checking
        try:
            check_root(root)
        except RootError as e:
            raise ScanRefused(str(e)) from None
    for given, outer in roots.dropped:
        if normalise_roots([given]).roots == [outer]:  # the same folder again, perhaps by another name (a link)
            log.warning("root %s is given twice (as %s): its files are scanned once", outer, given)
        else:
            log.warning("root %s lies inside root %s: its files are scanned once, through %s", given, outer, outer)
    check_plugins(cfg.photos.plugins)
    # The detector is decided here, once: settings_id names it and the workers run exactly it.
    cfg = cfg.model_copy(update={"roots": roots.roots, "face": resolved(cfg.face)})
    # What would otherwise fail only inside a worker (weights that do not fit the backbone) is one sentence before
    # Ray starts. The check builds the network's shapes, which imports torch and timm (seconds), so a dry run and a
    # run that decodes for sure (the first, or --mode all) check at once, before anything is written, and an
    # incremental one once its plan has something to decode: a nightly run with nothing new loads no network
    # library. Describing alone reads model.json and hashes the weights: a tampered model stops here either way.
    checked = dry_run or _decodes_for_sure(cfg, output)
    _, model_id = (check_model if checked else describe_model)(cfg.model)
    settings = settings_id(cfg)
    if dry_run:
        output.check_claimable()
        return _dry_run(cfg, model_id, _plan(cfg, output.latest(KNOWN, compact=True), model_id, settings))
    with output.writing(cfg.lock_lease_s, break_lock=cfg.break_lock) as session, ExitStack() as ray_session:
        started, t0 = utcnow(), time.perf_counter()
        plan = _plan_starting_ray(cfg, session.latest(KNOWN, compact=True), model_id, settings, ray_session,
                                  checked)
        with session.writer() as writer:
            proc_s = _write_run(writer, plan, cfg, settings, model_id, session.table)
        summary = ScanSummary(writer.run_id, str(cfg.out), model_id, plan.listed, plan.todo.num_rows, plan.unchanged,
                              carried=plan.carried.num_rows, counts=dict(writer.counts),
                              seconds=time.perf_counter() - t0)
        summary.images_per_s = plan.todo.num_rows / proc_s if plan.todo.num_rows and proc_s > 0 else 0.0
        session.commit(writer, {
            "run_id": writer.run_id, "model_id": model_id, "settings_id": settings, "roots": cfg.roots,
            "mode": cfg.mode, "status": "committed", "started_at": started.isoformat(),
            "finished_at": utcnow().isoformat(),
            "counts": {"files": plan.listed, "processed": plan.todo.num_rows, "unchanged": plan.unchanged,
                       "carried": plan.carried.num_rows, "moved": plan.moved, **writer.counts},
            "files_per_root": plan.files_per_root,
            "seconds": round(summary.seconds, 3), "images_per_s": round(summary.images_per_s, 3),
            "config": dump_config(cfg),
        })
        return summary


def _decodes_for_sure(cfg: ScanConfig, output: Output) -> bool:
    """A first run or --mode all: every file is decoded. An output that cannot be read counts as such too; the lock
    refuses it with its own sentence once the model is checked, as before."""
    if cfg.mode == "all":
        return True
    try:
        return output.snapshot() is None
    except Exception:  # noqa: BLE001 - unreadable, damaged or foreign: output.writing() names the problem
        return True


def _plan(cfg: ScanConfig, known: pa.Table, model_id: str, settings: str) -> Plan:
    """List the roots and plan the run against the latest committed rows."""
    try:
        listing = list_roots(cfg.roots, cfg.include_hidden, cfg.follow_symlinks)
    except RootError as e:
        raise ScanRefused(str(e)) from None
    return make_plan(listing, cfg.roots, known, model_id, settings, cfg)


def _plan_starting_ray(cfg: ScanConfig, known: pa.Table, model_id: str, settings: str, ray_session: ExitStack,
                       checked: bool = True) -> Plan:
    """List and plan, with Ray started (or joined) for the run and stopped when `ray_session` closes.

    Where the run surely decodes (a first run, or mode all), Ray's start-up (seconds for a local Ray) overlaps the
    listing and planning, which run in a thread meanwhile; otherwise Ray starts after planning, and only if there
    is something to decode, so an unchanged nightly run starts no Ray. The model is checked (check_model) before
    Ray starts where the caller has not done so yet.
    """
    def start() -> None:
        if not checked:
            check_model(cfg.model)
        shutdown = start_ray(cfg.address)  # in the main thread: Ray's signal handling needs it
        if shutdown:
            ray_session.callback(shutdown)

    if known.num_rows and cfg.mode != "all":
        plan = _plan(cfg, known, model_id, settings)
        if plan.todo.num_rows:
            start()
        return plan
    with ThreadPoolExecutor(1, thread_name_prefix="dogbreed-plan") as pool:
        planning = pool.submit(_plan, cfg, known, model_id, settings)
        try:
            start()
        finally:
            plan = planning.result()  # a refusal of the plan is the run's answer
    return plan


def _dry_run(cfg: ScanConfig, model_id: str, plan: Plan) -> ScanSummary:
    summary = ScanSummary(None, str(cfg.out), model_id, plan.listed, plan.todo.num_rows, plan.unchanged,
                          carried=plan.carried.num_rows, dry_run=True)
    summary.counts = {"to_process": plan.todo.num_rows, "deleted": len(plan.deleted)}
    summary.would_process = _preview(plan.todo)
    summary.would_delete = plan.deleted[:DRY_RUN_PREVIEW]
    return summary


def _write_run(writer: RunWriter, plan: Plan, cfg: ScanConfig, settings: str, model_id: str, table: Any) -> float:
    """Every row of the run into the writer; returns the seconds spent processing photos."""
    run_id = writer.run_id
    _write_direct(writer, plan, run_id, settings, model_id)
    _write_carried(writer, plan, cfg.out, run_id, table)
    t_proc = time.perf_counter()
    if plan.todo.num_rows:
        seen = run_pipeline(plan.todo, cfg, run_id, writer)  # in the Ray that _plan_starting_ray started or joined
        lost = _write_lost(writer, plan.todo, seen, run_id, settings)
        if lost == plan.todo.num_rows:
            raise ScanFailed(f"all {lost} photos were lost to worker failures; nothing was committed")
    proc_s = time.perf_counter() - t_proc
    _write_deleted(writer, plan.deleted, run_id)
    return proc_s
