"""`dogbreed relabel`: a model on the same backbone re-decides every current row from its stored embedding.

No photo is opened. The new model's heads (its ImageNet classifier for the dog score, its breed head or ImageNet
dog rows for the breed) run on the vectors a scan stored; faces are the ones the scan found. The run is one Delta
commit under the output's lock, like a scan: every relabelled row gets the model's model_id, the history keeps the
old rows, and a run killed midway leaves the table as it was. Only a model whose backbone computes the very same
features can do this (a freeze-mode artifact of the model that scanned); any other is refused: it needs a scan.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dogbreed.config import ScanConfig, dump_config
from dogbreed.errors import UsageError
from dogbreed.table import schema
from dogbreed.table.output import Output
from dogbreed.table.readers import stream
from dogbreed.table.store import utcnow
from dogbreed.vision import decision
from dogbreed.vision.faces import resolved

log = logging.getLogger("dogbreed.vectors")
READ_BATCH = 16_384
# What a relabelled row takes from its old row as it is; the answer columns are made new.
KEPT = ["path", "path_bytes", "size_bytes", "mtime", "ctime", "fingerprint", "error", "error_kind", "width", "height",
        "face_count", "faces", "decode_node", "embedding", "embedding_id"]


class RelabelError(UsageError):
    """A relabel that cannot be made (another backbone, no vectors, breed_flip): one sentence, nothing written."""


@dataclass
class RelabelSummary:
    run_id: str
    model_id: str
    relabelled: int
    counts: dict[str, int] = field(default_factory=dict)
    without_vector: int = 0  # current decoded rows with no embedding (older runs) or another network's
    seconds: float = 0.0

    def line(self) -> str:
        c = self.counts
        rest = (f"; {self.without_vector} decoded rows have no vector of this backbone (older runs): a scan with "
                "this model redoes them" if self.without_vector else "")
        return (f"relabel {self.run_id}: {self.relabelled} rows for model {self.model_id} in {self.seconds:.1f} s "
                f"({self.relabelled / max(self.seconds, 1e-9):.0f} rows/s); dogs {c.get('dog', 0)}, humans "
                f"{c.get('human', 0)}, dog+human {c.get('dog_and_human', 0)}, neither {c.get('neither', 0)}{rest}")


def _current_keys(session, embedding_id: str) -> tuple[pa.Table, int]:
    """(path, run_id) of the current decoded rows that have a vector of this network; and how many have none."""
    rows = session.latest(["path", "run_id", "status", "embedding_id"])
    decoded = rows.filter(pc.is_in(rows.column("status"), value_set=pa.array(schema.OK_STATUSES)))
    mine = decoded.filter(pc.fill_null(pc.equal(decoded.column("embedding_id"), embedding_id), False))
    return mine.select(["path", "run_id"]), decoded.num_rows - mine.num_rows


def _no_vectors(out: str, session, embedding_id: str, model: str) -> str:
    """Why no current row has a vector this model can relabel, as it is: no rows, no decoded ones, another backbone's
    vectors, or rows of runs before dogbreed stored vectors."""
    rows = session.latest(["status", "embedding_id"])
    rows = rows.filter(pc.not_equal(rows.column("status"), "deleted"))
    if not rows.num_rows:
        return f"{out} has no current rows to relabel (no photo scanned into it yet, or every one deleted since)"
    decoded = rows.filter(pc.is_in(rows.column("status"), value_set=pa.array(schema.OK_STATUSES)))
    if not decoded.num_rows:
        return (f"{out} has no decoded photos to relabel: its {rows.num_rows} current rows are errors or skipped "
                "files, which have no vectors")
    have = decoded.column("embedding_id").drop_null().unique().to_pylist()
    return (f"{out} has no vectors made by {embedding_id} ({model}'s backbone)"
            + (f"; its vectors come from {', '.join(have)}: this model's backbone differs (a fine-tuned or another "
               "model), so a scan is needed: dogbreed scan ... --mode all --model ..." if have else
               f": its {decoded.num_rows} decoded rows come from runs before dogbreed stored vectors (or from a scan "
               "with inference.embeddings off); a scan is needed: dogbreed scan ... --mode all"))


class Relabeller:
    """Table batches -> relabelled rows of exactly SCHEMA: the current rows among them (by path and run_id), with
    their answers made again by the model's heads from their vectors. Loads the model once; pure per batch, so the
    same object serves the local loop and Ray Data's actors."""

    def __init__(self, cfg: ScanConfig, keys: pa.Table, run_id: str, settings: str, model: Any = None):
        from dogbreed.vision.predictors import BreedPredictor

        self.cfg, self.run_id, self.settings = cfg, run_id, settings
        # Only the heads run here (from_features, in torch): the backbone is never run, so it is not converted to
        # or loaded in a CPU runtime. `model`: the model the caller already loaded.
        heads_only = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"runtime": "torch"})})
        self.predictor = BreedPredictor.for_scan(heads_only, model=model, device="cpu")
        self.keys = keys.append_column("_current", pa.array(np.ones(keys.num_rows, dtype=bool)))

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        table = table.append_column("_i", pa.array(np.arange(table.num_rows)))
        hit = table.select(["path", "run_id", "_i"]).join(self.keys, keys=["path", "run_id"], join_type="inner")
        rows = table.take(hit.column("_i"))
        n = rows.num_rows
        if not n:
            return schema.empty_table()
        columns = {name: rows.column(name) for name in KEPT} | self._answers(rows) | {
            "model_id": pa.array([self.predictor.model_id] * n), "settings_id": pa.array([self.settings] * n),
            "run_id": pa.array([self.run_id] * n), "processed_at": pa.array([utcnow()] * n, schema.UTC_US)}
        return schema.to_table(columns)

    def _answers(self, rows: pa.Table) -> dict[str, Any]:
        """The answer columns, as the scan computes them from the pooled features on."""
        p, cfg, n = self.predictor, self.cfg, rows.num_rows
        feats = rows.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        imagenet, breeds = p.from_features(feats)
        scores = decision.dog_scores(imagenet, p.dog_indices)
        top1_dog = decision.top1_is_dog(imagenet, p.dog_indices)
        faces = rows.column("face_count").to_numpy(zero_copy_only=False)
        status = decision.decide_all(scores, faces, cfg.dog_threshold, top1_dog)
        k = min(cfg.top_k, breeds.shape[1])
        order = np.argsort(-breeds, axis=1, kind="stable")[:, :k]
        probs = np.take_along_axis(breeds, order, axis=1).astype(np.float32)
        names = np.asarray(p.spec.class_names, dtype=object)
        ranked = pa.StructArray.from_arrays([pa.array(names[order].ravel(), pa.string()), pa.array(probs.ravel())],
                                            fields=list(schema.BREED))
        return {"status": pa.array(status, pa.string()), "dog_score": pa.array(scores.astype(np.float32)),
                "breed": pa.array(names[order[:, 0]], pa.string()), "breed_prob": pa.array(probs[:, 0]),
                "breeds": pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), ranked)}


READ_COLUMNS = KEPT + ["run_id", "status"]


def _read_ahead(batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The batches, the next one read in a thread while this one is relabelled and written (Parquet decoding and
    the heads' matrix products both release the GIL): one batch ahead, so memory stays bounded."""
    with ThreadPoolExecutor(1, thread_name_prefix="dogbreed-read") as pool:
        coming = pool.submit(next, batches, None)
        while (rows := coming.result()) is not None:
            coming = pool.submit(next, batches, None)
            yield rows


def _local(out: str, table, keys: pa.Table, relabeller: Relabeller) -> Iterator[pa.Table]:
    """On this machine: the table read one row group at a time (never the whole table), relabelled here."""
    runs = pc.unique(keys.column("run_id"))
    batches = stream(out, table, READ_COLUMNS, READ_BATCH, lambda t: pc.is_in(t.column("run_id"), value_set=runs))
    for rows in _read_ahead(batches):
        yield relabeller(rows)


def _on_ray(out: str, table, keys: pa.Table, cfg: ScanConfig, run_id: str, settings: str) -> Iterator[pa.Table]:
    """On a Ray cluster: the table's files read by Ray Data tasks, relabelled by an actor pool (CPU)."""
    import ray

    from dogbreed.table.location import locate

    loc = locate(out)
    files = [loc.path(p) for p in pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()]
    ds = ray.data.read_parquet(files, filesystem=loc.fs).select_columns(READ_COLUMNS)  # projected into the read
    actors = max(1, int(ray.cluster_resources().get("CPU", 1) // 2))
    ds = ds.map_batches(Relabeller, batch_format="pyarrow", batch_size=READ_BATCH, num_cpus=1,
                        fn_constructor_kwargs={"cfg": cfg, "keys": keys, "run_id": run_id, "settings": settings},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def relabel(out: str, cfg: ScanConfig, break_lock: bool = False) -> RelabelSummary:
    """Re-decide every current row of `out` that has a vector of cfg.model's backbone; one commit. Runs here, or
    with Ray Data on the cluster cfg.address (or $RAY_ADDRESS) names."""
    from dogbreed.vision.models import load_model

    if cfg.breed_flip:
        raise RelabelError("breed_flip averages a photo with its mirror image, which a stored vector cannot give: "
                           "relabel without it, or scan with --mode all")
    t0 = time.perf_counter()
    cfg = cfg.model_copy(update={"face": resolved(cfg.face)})
    output = Output(out, write=True)
    output.require()
    loaded = load_model(cfg.model)
    settings = decision.settings_id(cfg)
    with output.writing(cfg.lock_lease_s, what="relabel", break_lock=break_lock) as session:
        keys, without = _current_keys(session, loaded.embedding_id)
        if not keys.num_rows:
            raise RelabelError(_no_vectors(out, session, loaded.embedding_id, cfg.model))
        with session.writer() as writer:
            if cfg.address or os.environ.get("RAY_ADDRESS"):
                from dogbreed.cluster.session import start_ray

                shutdown = start_ray(cfg.address)
                try:
                    for rows in _on_ray(out, session.table, keys, cfg, writer.run_id, settings):
                        writer.write(rows)
                finally:
                    if shutdown:
                        shutdown()
            else:
                relabeller = Relabeller(cfg, keys, writer.run_id, settings, model=loaded)
                for rows in _local(out, session.table, keys, relabeller):
                    writer.write(rows)
        summary = RelabelSummary(writer.run_id, loaded.model_id, writer.rows, dict(writer.counts), without,
                                 time.perf_counter() - t0)
        session.commit(writer, {"run_id": writer.run_id, "kind": "relabel", "model_id": loaded.model_id,
                                "settings_id": settings, "status": "committed", "counts": dict(writer.counts),
                                "relabelled": writer.rows, "without_vector": without,
                                "seconds": round(summary.seconds, 3), "config": dump_config(cfg)})
    return summary
