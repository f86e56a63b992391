"""The scan's Ray Data pipeline: paths in blocks -> decode (CPU tasks, sandboxed) -> infer (actor pool) -> rows.

Only small uint8 crops travel between the stages, and only result rows (no pixels) stream back to the driver,
which writes them as they arrive. Every retry is bounded; a block whose task still fails is dropped and its
photos come back as 'lost' rows (see the job).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from dogbreed.cluster.session import is_private
from dogbreed.config import ScanConfig
from dogbreed.scan.plan import ScanRefused
from dogbreed.table import schema
from dogbreed.table.store import RunWriter, utcnow
from dogbreed.vision import device_decode
from dogbreed.vision.decision import settings_id
from dogbreed.vision.predictors import BreedPredictor, Decoder

log = logging.getLogger("dogbreed.scan.pipeline")

DECODE_CALLS_PER_WORKER = 50  # a decode worker process exits after this many blocks (max_calls)
OUTPUT_BLOCK_PHOTOS = 32  # decoded crops per block sent on to the actors
BLOCKS_PER_DECODER = 16  # a run is cut into at least this many blocks per decode task: a short tail
# How far an operator's unconsumed output may outgrow what its consumer has in hand before Ray Data pauses it (Ray's
# default is 2). The driver holds about two result blocks (the one it writes and one prefetched), and a third
# waiting was enough to pause the actors, at times for 5-8 s while the decode tasks ran on, until every photo was
# decoded. At 16 three traced scans never paused them, and it still bounds the crops waiting for the actors (16
# times the actors' pending input) and the results waiting for the driver.
BACKPRESSURE_RATIO = 16.0


class _InferStage:
    """Actor-pool stage: BreedPredictor then the fixed output schema (so the driver never infers types)."""

    def __init__(self, run_id: str, cfg: ScanConfig, on_device: dict[str, Any] | None = None,
                 num_threads: int | None = None, described: tuple | None = None, cpu_only: bool = False):
        self.run_id, self.settings = run_id, settings_id(cfg)
        # On a CPU actor, the driver's description of the model lets the predictor load the cached OpenVINO network
        # without importing torch or timm
        self.predict = BreedPredictor.for_scan(cfg, num_threads=num_threads, device="cpu" if cpu_only else "auto",
                                               described=None if on_device else described)  # every setting from the one source
        self.decode = None  # decode.device accelerator: JPEGs arrive compressed and are decoded on the actor's device
        if on_device is not None:
            self.decode = device_decode.DeviceDecoder(self.predict.spec.preprocessing, device=self.predict.device, **on_device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = self.predict(self.decode(batch) if self.decode else batch)
        table = schema.rows_to_table(rows, self.run_id, self.settings, utcnow())
        return table.append_column("_idx", pa.array(np.asarray(rows["_idx"], dtype=np.int64)))


def _decode_stage(batch: dict[str, np.ndarray], ship_jpegs: bool = False, **decoder_kwargs: Any) -> dict[str, np.ndarray]:
    """Decode tasks: LISTED -> DECODED (or SHIPPED) batches; the sandboxed child is kept across a worker's tasks."""
    return (device_decode.JpegShipper if ship_jpegs else Decoder)(shared=True, **decoder_kwargs)(batch)


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
    cpus = resources.get("CPU", 1)
    if is_private(cfg.address):  # this run's own Ray, which never grows: a request it
        # cannot hold would wait for ever (a cluster that autoscales may add the nodes, so there Ray waits)
        need = actors * cfg.inference.num_cpus + cfg.decode.num_cpus
        if need > cpus + 1e-6:
            raise ScanRefused(f"{actors} inference actor(s) at inference.num_cpus {cfg.inference.num_cpus:g} and a decode "
                              f"task at decode.num_cpus {cfg.decode.num_cpus:g} need {need:g} CPUs, but this machine's "
                              f"Ray has {cpus:g}: lower them")
    free_cpus = cpus - actors * cfg.inference.num_cpus
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

    from dogbreed.vision.models import describe_model  # here, not at the top: decode workers import this module
    # and must not pay for torch, which only the driver and the actors need

    spec, model_id = describe_model(cfg.model)
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
    ctx.downstream_capacity_backpressure_ratio = BACKPRESSURE_RATIO
    # Decoded crops are 150 KB each: small output blocks keep them streaming to the actors as they are made,
    # instead of waiting for a whole input block (or 128 MiB) of them.
    ctx.target_max_block_size = OUTPUT_BLOCK_PHOTOS * 3 * spec.preprocessing.input_size ** 2
    with warnings.catch_warnings():
        # Bounded retries can only be given as remote args, which Ray 2.60 deprecates without a replacement yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _stages(ds, cfg, spec, model_id, run_id, num_gpus, actors, decoders, _on_device(cfg, spec, num_gpus))
    seen = np.zeros(todo.num_rows, dtype=np.int32)
    with _progress(cfg, todo.num_rows) as bar:
        # Result blocks are small (no pixels): each is taken as it is (batch_size=None), as it arrives.
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
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


def _stages(ds, cfg: ScanConfig, spec, model_id: str, run_id: str, num_gpus: float, actors: int, decoders: int,
            on_device: bool = False):
    import ray

    ds = ds.map_batches(
        _decode_stage, batch_size=cfg.decode.batch_size, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=decoders),
        fn_kwargs=dict(prep=spec.preprocessing, face=cfg.face, photos=cfg.photos, ship_jpegs=on_device),
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
        fn_constructor_kwargs=dict(run_id=run_id, cfg=cfg,
                                   on_device=dict(face=cfg.face, photos=cfg.photos,
                                                  face_threads=max(1, int(cfg.inference.num_cpus)))
                                   if on_device else None,
                                   num_threads=None if num_gpus else max(1, int(cfg.inference.num_cpus)),
                                   described=(spec, model_id), cpu_only=not num_gpus),
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
