"""Embeddings in the table: stored compactly, read by pandas, DuckDB and Polars, searched by `similar`, and used by
`relabel` to re-decide rows without opening a photo; shown with real photos and real processes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from PIL import Image, ImageOps

from dogbreed.config import ScanConfig
from dogbreed.errors import Exit
from dogbreed.table import readers, schema
from dogbreed.table.output import Output
from dogbreed.table.store import new_run_id
from dogbreed.vectors.index import SimilarError, VectorIndex
from dogbreed.vectors.relabel import RelabelError, relabel
from dogbreed.vectors.similar import similar
from dogbreed.vision.models import ModelSpec, load_default, save_artifact
from dogbreed.vision.nets import BreedNet, create_backbone
from dogbreed.vision.predictors import BreedPredictor, Decoder

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "dogbreed" / "samples"
DOGBREED = Path(sys.executable).with_name("dogbreed")


@pytest.fixture(scope="module")
def predictor():
    return BreedPredictor(top_k=3)


def commit_photos(out, paths, predictor, cfg: ScanConfig | None = None) -> str:
    """Commit one run of these photos' rows exactly as the scan's stages make them (decoded and predicted in this
    process, without Ray)."""
    from dogbreed.evaluation.breeds import listed
    from dogbreed.vision.decision import settings_id

    cfg = cfg or ScanConfig()
    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.photos)
    try:
        rows = predictor(decoder(listed([str(p) for p in paths])))
    finally:
        decoder.close()
    with Output(out, write=True).writing(30) as session:
        with session.writer() as writer:
            writer.write(schema.rows_to_table(rows, writer.run_id, settings_id(cfg), schema.UTC_US and _now()))
        session.commit(writer, {"run_id": writer.run_id, "model_id": predictor.model_id, "status": "committed"})
    return writer.run_id


def _now():
    from dogbreed.table.store import utcnow

    return utcnow()


TEST_NET = "test-net@0123"  # an embedding id no model makes: rows written here, searched by their stored paths


def commit_vectors(out, vectors: dict[str, list[float] | None], status: str = "dog", eid: str = TEST_NET) -> str:
    """Commit one run of rows holding these vectors (None: a row without one) as a scan writes them, no network run:
    a table in milliseconds whose nearest neighbours are known."""
    n, dim = len(vectors), max((len(v) for v in vectors.values() if v is not None), default=0)
    valid = np.array([v is not None for v in vectors.values()], dtype=bool)
    x = np.array([v if v is not None else [0.0] * dim for v in vectors.values()], dtype=np.float32).reshape(n, dim)
    with Output(out, write=True).writing(30) as session:
        with session.writer() as writer:
            writer.write(schema.to_table({
                "path": list(vectors), "status": [status] * n, "run_id": [writer.run_id] * n,
                "embedding": schema.embedding_array(x, valid), "embedding_id": [eid if ok else None for ok in valid],
                "processed_at": pa.array([_now()] * n, schema.UTC_US)}))
        session.commit(writer, {"run_id": writer.run_id, "model_id": "test-model", "status": "committed"})
    return writer.run_id


def edited(path: Path, how: str) -> Image.Image:
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    if how == "half":
        return img.resize((w // 2, h // 2), Image.Resampling.BICUBIC)
    if how == "q60":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if how == "crop90":
        return img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    return ImageOps.mirror(img)


# ---------------------------------------------------------------------------------------------- stored


def test_the_embedding_column_is_float16_rounded_float32_lists_and_null_where_not_decoded():
    vectors = np.array([[0.1, 1 / 3, 6.0], [0, 0, 0], [2.0001, 0.5, 0.25]], dtype=np.float32)
    arr = schema.embedding_array(vectors, np.array([True, False, True]))
    assert arr.type == pa.list_(pa.float32()) and arr.null_count == 1 and arr[1].as_py() is None
    assert arr[0].as_py() == [float(np.float16(v)) for v in vectors[0]]  # rounded to float16, stored as float32


def test_decoded_rows_store_a_1280_value_vector_and_its_network_error_rows_none(tmp_path, predictor):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    out = tmp_path / "out"
    commit_photos(out, [SAMPLES / "grace_hopper.jpg", bad], predictor)
    df = readers.latest(out, vectors=True).set_index("path")
    good = df.loc[str(SAMPLES / "grace_hopper.jpg")]
    assert len(good["embedding"]) == 1280 and good["embedding_id"] == load_default().embedding_id
    assert df.loc[str(bad), "embedding"] is None and pd.isna(df.loc[str(bad), "embedding_id"])
    assert "embedding" not in readers.latest(out).columns  # a plain read leaves the vectors out


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_a_scan_told_not_to_store_embeddings_gives_the_same_answers_with_null_vectors(tmp_path, predictor):
    photos = [SAMPLES / "grace_hopper.jpg", SAMPLES / "Brittany_02625.jpg"]
    plain = BreedPredictor(load_default(), top_k=3, embeddings=False)
    commit_photos(tmp_path / "with", photos, predictor)
    commit_photos(tmp_path / "without", photos, plain)
    cols = ["path", "status", "breed", "dog_score"]
    a = readers.latest(tmp_path / "with", vectors=True).sort_values("path")
    b = readers.latest(tmp_path / "without", vectors=True).sort_values("path")
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))
    assert a["embedding"].map(len).tolist() == [1280, 1280]
    assert b["embedding"].isna().all() and b["embedding_id"].isna().all()
    assert BreedPredictor.for_scan(ScanConfig(inference={"embeddings": False})).embeddings is False


def test_pandas_duckdb_and_polars_read_the_vectors_in_one_line_and_older_rows_as_null(tmp_path, predictor):
    out = tmp_path / "out"
    old = schema.to_table({"path": ["/p/old.jpg"], "status": ["dog"], "run_id": [new_run_id()]})
    old = old.drop_columns(["embedding", "embedding_id"])  # a table written before the columns existed
    write_deltalake(str(out), old.cast(schema.SCHEMA.remove_metadata().remove(schema.SCHEMA.get_field_index(
        "embedding_id")).remove(schema.SCHEMA.get_field_index("embedding"))), name="dogbreed scan results")
    commit_photos(out, [SAMPLES / "grace_hopper.jpg"], predictor)  # adds the columns, one metadata-only commit
    # The README's one-liners:
    pandas_df = DeltaTable(str(out)).to_pandas(columns=["path", "embedding"])
    import duckdb

    files = DeltaTable(str(out)).file_uris()
    duck = duckdb.sql(f"select path, embedding from read_parquet({files}, union_by_name=true)").fetchall()
    import polars as pl

    polars_df = pl.scan_delta(str(out)).select("path", "embedding").collect()
    for rows in (dict(zip(pandas_df["path"], pandas_df["embedding"])), dict(duck),
                 dict(zip(polars_df["path"].to_list(), polars_df["embedding"].to_list()))):
        assert rows["/p/old.jpg"] is None
        assert len(rows[str(SAMPLES / "grace_hopper.jpg")]) == 1280


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_decoded_row_costs_under_3_kb_on_disk(tmp_path, predictor, shared_data):
    """The issue's budget for the vectors; measured on real photos against a table without them."""
    photos = sorted((shared_data / "imagewoof" / "val-unseen").rglob("*.jpeg"))[:60]
    out = tmp_path / "out"
    commit_photos(out, photos, predictor)
    table = DeltaTable(str(out))
    size = sum(pa.table(table.get_add_actions(flatten=True)).column("size_bytes").to_pylist())
    without = pa.Table.from_batches(table.to_pyarrow_dataset().to_batches()).drop_columns(["embedding"])
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(without, buf, compression="zstd")
    per_photo = (size - len(buf.getvalue())) / len(photos)
    assert per_photo <= 3000, per_photo


# ---------------------------------------------------------------------------------------------- similar


def test_similar_by_a_stored_path_and_by_a_new_photo_file(tmp_path, predictor):
    out = tmp_path / "out"
    photos = sorted(SAMPLES.glob("*"))
    commit_photos(out, photos, predictor)
    lab = str(SAMPLES / "Labrador_retriever_06455.jpg")
    (found,) = similar(str(out), [lab], ScanConfig(), k=3)
    assert lab not in [h.path for h in found.hits] and len(found.hits) == 3  # the query's own row is left out
    assert found.hits[0].similarity >= found.hits[1].similarity >= found.hits[2].similarity
    copy = tmp_path / "copy.jpg"
    edited(SAMPLES / "Labrador_retriever_06455.jpg", "mirror").save(copy, quality=90)
    (by_file,) = similar(str(out), [str(copy)], ScanConfig(), k=2, status="dog")
    assert by_file.hits[0].path == lab and by_file.hits[0].similarity > 0.9
    assert all(h.status == "dog" for h in by_file.hits)
    # The index lies beside the table and follows it: a new run's vectors are found after the next query.
    assert list((out / "_dogbreed" / "similar").iterdir())
    commit_photos(out, [copy], predictor)
    (again,) = similar(str(out), [lab], ScanConfig(), k=1)
    assert again.hits[0].path == str(copy)


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_similar_refuses_in_one_sentence(tmp_path, predictor, commit_rows):
    out = tmp_path / "out"
    commit_photos(out, [SAMPLES / "grace_hopper.jpg"], predictor)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(SimilarError, match=r"notes\.jpg cannot be searched with: not a recognised image format"):
        similar(str(out), [str(text)], ScanConfig())
    with pytest.raises(SimilarError, match="is neither a photo in the table nor a file here"):
        similar(str(out), [str(tmp_path / "nowhere.jpg")], ScanConfig())
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # was "neither a photo in the table nor a file here"
    with pytest.raises(SimilarError, match=r"zero\.jpg is not a photo in the table, and here it is no regular file"):
        similar(str(out), [str(tmp_path / "zero.jpg")], ScanConfig())
    empty = tmp_path / "old"
    commit_rows(empty, ["/p/a.jpg"], status="dog")  # rows without vectors
    with pytest.raises(SimilarError, match="holds no embeddings yet"):
        similar(str(empty), ["/p/a.jpg"], ScanConfig())
    other = tmp_path / "other-backbone"
    save_artifact(BreedNet(create_backbone("test_efficientnet"), 2),
                  ModelSpec(backbone="test_efficientnet", class_names=["a", "b"], breed_source="head",
                            preprocessing=predictor.spec.preprocessing), other)
    proc = subprocess.run([str(DOGBREED), "similar", str(out), str(SAMPLES / "coffee.png"), "--model", str(other)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == Exit.USAGE and "Traceback" not in proc.stderr
    assert "the query was embedded by test_efficientnet@" in proc.stderr and "were made by tf_efficientnet_lite0@" in proc.stderr


@pytest.mark.slow  # 200 real photos and 800 edited copies through the decoder and the network
def test_near_copies_rank_first_for_their_original(tmp_path, predictor, shared_data):
    originals = sorted((shared_data / "imagewoof" / "val-unseen").rglob("*.jpeg"))
    out = tmp_path / "out"
    commit_photos(out, originals, predictor)
    copies = tmp_path / "copies"
    copies.mkdir()
    queries, want = [], []
    for i, photo in enumerate(originals):
        for how in ("half", "q60", "crop90", "mirror"):
            path = copies / f"{i:03d}_{how}.jpg"
            edited(photo, how).save(path, quality=95)
            queries.append(str(path))
            want.append(str(photo))
    found = similar(str(out), queries, ScanConfig(), k=1)
    first = [f.hits[0].path for f in found]
    share = np.mean([a == b for a, b in zip(first, want)])
    print(f"near copies ranked first: {share:.2%} of {len(queries)}")
    assert share >= 0.99


# ---------------------------------------------------------------------------------------------- relabel


def freeze_artifact(folder: Path, seed: int = 0, classes=("Golden retriever", "Samoyed", "Beagle")) -> Path:
    """A freeze-mode artifact: the default backbone untouched, a new breed head (ImageNet rows, nudged)."""
    from dogbreed.train.loop import init_breed_head

    base = load_default()
    net = BreedNet(base.net.backbone, len(classes))
    init_breed_head(net, list(classes))
    with __import__("torch").no_grad():
        net.breed_head.weight.add_(__import__("torch").randn(net.breed_head.weight.shape,
                                                             generator=__import__("torch").Generator().manual_seed(seed)) * 0.01)
    save_artifact(net, ModelSpec(backbone=base.spec.backbone, class_names=list(classes), breed_source="head",
                                 preprocessing=base.spec.preprocessing, training={"mode": "freeze"}), folder)
    return folder


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_relabel_is_what_a_scan_with_the_model_gives_and_keeps_the_history(tmp_path, predictor, monkeypatch):
    from dogbreed.vision import runtime

    out = tmp_path / "out"
    photos = sorted(SAMPLES.glob("*"))
    first = commit_photos(out, photos, predictor)
    model = freeze_artifact(tmp_path / "model")
    with monkeypatch.context() as m:  # relabel runs the heads alone: it neither converts nor loads the backbone
        for name in ("cached", "convert"):
            m.setattr(runtime, name, lambda *a, name=name: pytest.fail(f"relabel called runtime.{name}"))
        summary = relabel(str(out), ScanConfig(model=str(model)))
    assert summary.relabelled == len(photos) and summary.without_vector == 0
    now = readers.latest(out).set_index("path")
    direct = BreedPredictor(str(model), top_k=3)
    fresh = tmp_path / "fresh"
    commit_photos(fresh, photos, direct)
    scanned = readers.latest(fresh).set_index("path")
    assert (now["model_id"] == direct.model_id).all() and (now["run_id"] == summary.run_id).all()
    assert (now["status"] == scanned["status"]).all() and (now["breed"] == scanned["breed"]).all()
    assert np.abs(now["dog_score"] - scanned["dog_score"]).max() < 1e-3
    assert first in set(readers.read_all(out)["run_id"])  # the history keeps the rows it replaced


def test_relabel_refuses_a_model_whose_backbone_differs(tmp_path, predictor):
    import torch

    out = tmp_path / "out"
    commit_photos(out, [SAMPLES / "grace_hopper.jpg"], predictor)
    tuned = tmp_path / "tuned"
    freeze_artifact(tuned)
    base = load_default()
    net = BreedNet(base.net.backbone, 3)
    with torch.no_grad():
        next(net.backbone.parameters()).add_(0.01)  # what fine-tuning does: the features change
    save_artifact(net, ModelSpec(backbone=base.spec.backbone, class_names=["a", "b", "c"], breed_source="head",
                                 preprocessing=base.spec.preprocessing), tuned)
    before = DeltaTable(str(out)).version()
    with pytest.raises(RelabelError, match="this model's backbone differs .* so a scan is needed"):
        relabel(str(out), ScanConfig(model=str(tuned)))
    assert DeltaTable(str(out)).version() == before
    with pytest.raises(RelabelError, match="breed_flip"):
        relabel(str(out), ScanConfig(breed_flip=True))


KILLED = """
import sys, time
import dogbreed.vectors.relabel as r
def slow(*a, **k):
    print("relabelling", flush=True)
    time.sleep(600)
r.Relabeller._answers = slow
from dogbreed.config import ScanConfig
r.relabel(sys.argv[1], ScanConfig(model="default"))
"""


@pytest.mark.slow  # a SIGKILL scenario
def test_a_killed_relabel_leaves_the_table_as_it_was(tmp_path, predictor):
    out = tmp_path / "out"
    commit_photos(out, sorted(SAMPLES.glob("*.jpg")), predictor)
    before = (DeltaTable(str(out)).version(), sorted(readers.read_all(out)["run_id"]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "relabelling"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (DeltaTable(str(out)).version(), sorted(readers.read_all(out)["run_id"])) == before
    summary = relabel(str(out), ScanConfig(model="default"))  # the next one takes the lock over and commits
    assert summary.relabelled == len(list(SAMPLES.glob("*.jpg")))


def test_index_refresh_adds_only_the_new_runs_segment(tmp_path, predictor):
    out = tmp_path / "out"
    commit_photos(out, [SAMPLES / "grace_hopper.jpg"], predictor)
    output = Output(out)
    index = VectorIndex(output, load_default().embedding_id)
    assert index.refresh(output.require()) == 1
    assert index.refresh(output.require()) == 0  # nothing new: nothing written
    commit_photos(out, [SAMPLES / "coffee.png", SAMPLES / "astronaut.png"], predictor)
    assert index.refresh(output.require()) == 2
    assert sorted(s.rows for s in index.segments) == [1, 2]
    state = json.loads((Path(index.local) / "state.json").read_text())
    assert state["version"] == DeltaTable(str(out)).version()


def test_a_tampered_index_state_naming_files_outside_it_is_rebuilt_and_deletes_nothing(tmp_path, predictor):
    """A retired segment named '../../victim' made the next refresh delete victim.f16 outside the index."""
    out = tmp_path / "out"
    commit_photos(out, [SAMPLES / "grace_hopper.jpg"], predictor)
    output = Output(out)
    index = VectorIndex(output, load_default().embedding_id)
    index.refresh(output.require())
    victim = tmp_path / "victim.f16"
    victim.write_bytes(b"mine")
    state_path = Path(index.local) / "state.json"
    state = json.loads(state_path.read_text())
    state["retired"] = {os.path.relpath(tmp_path / "victim", index.local): 0.0}
    state_path.write_text(json.dumps(state))
    again = VectorIndex(output, load_default().embedding_id)
    again.refresh(output.require())
    assert victim.read_bytes() == b"mine" and again.retired == {} and len(again.segments) == 1


def _v(*head: float) -> list[float]:
    return list(head) + [0.0] * (8 - len(head))


def _new_process() -> None:
    """What a next `dogbreed similar` starts from: nothing of the last search held in memory."""
    from dogbreed.vectors import similar as similar_module

    for cached in (similar_module._current, similar_module._positions, similar_module._index, similar_module._allowed):
        cached.cache_clear()


@pytest.fixture
def two_runs(tmp_path):
    """A table of two runs of 8-value vectors (b nearest a, then c, then d) searched once, so its index is built:
    (out, index folder, first run, second run, the hits for a)."""
    out = tmp_path / "out"
    first = commit_vectors(out, {"/p/a.jpg": _v(1), "/p/b.jpg": _v(1, 0.2)})
    second = commit_vectors(out, {"/p/c.jpg": _v(1, 1), "/p/d.jpg": _v(0, 1)})
    (found,) = similar(str(out), ["/p/a.jpg"], ScanConfig(), k=3)
    assert [h.path for h in found.hits] == ["/p/b.jpg", "/p/c.jpg", "/p/d.jpg"]
    yield out, out / "_dogbreed" / "similar" / "test-net_0123", first, second, found.hits
    _new_process()


def _state(folder: Path, **changes) -> None:
    state = json.loads((folder / "state.json").read_text())
    for key, change in changes.items():
        state[key] = change(state) if callable(change) else change
    (folder / "state.json").write_text(json.dumps(state))


def _one_segment_rows(n: int):
    return lambda state: [dict(state["segments"][0], rows=n)] + state["segments"][1:]


DAMAGE = {  # what a crash, a full disk, a hand or a sync tool left; the first run's segment unless said
    "truncated vectors": lambda f, run: (f / f"{run}.f16").write_bytes((f / f"{run}.f16").read_bytes()[:10]),
    "deleted vectors": lambda f, run: (f / f"{run}.f16").unlink(),
    "junk keys": lambda f, run: (f / f"{run}.keys.parquet").write_bytes(b"PAR1 not parquet"),
    "deleted keys": lambda f, run: (f / f"{run}.keys.parquet").unlink(),
    "more rows than the files hold": lambda f, run: _state(f, segments=_one_segment_rows(7)),
    "keys of another length": lambda f, run: pq.write_table(
        pa.table({"path": ["/p/a.jpg", "/p/b.jpg", "/p/x.jpg"], "run_id": [run] * 3}), f / f"{run}.keys.parquet"),
    "a narrower dim (every segment)": lambda f, run: _state(f, dim=4),
    "a wider dim (every segment)": lambda f, run: _state(f, dim=16),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_index_is_written_again_from_the_table_with_one_warning(two_runs, how, caplog):
    """A truncated or deleted vectors file, junk or deleted keys, or a state whose rows or dim the files do not hold
    was a traceback (or, for a wrong dim, silently wrong hits): the damaged segments are written again."""
    out, folder, first, second, hits = two_runs
    untouched = (folder / f"{second}.f16").stat().st_mtime_ns
    DAMAGE[how](folder, first)
    _new_process()
    (found,) = similar(str(out), ["/p/a.jpg"], ScanConfig(), k=3)
    assert [(h.path, h.similarity) for h in found.hits] == [(h.path, h.similarity) for h in hits]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(out) in warnings[0] and "\n" not in warnings[0], warnings
    for run in (first, second):
        assert (folder / f"{run}.f16").stat().st_size == 2 * 8 * 2
    if "every segment" not in how:
        assert (folder / f"{second}.f16").stat().st_mtime_ns == untouched  # only the damaged segment is written
    index = VectorIndex(Output(out), TEST_NET)
    caplog.clear()
    assert index.refresh(Output(out).require()) == 0 and not caplog.records  # whole again: nothing more to do
    assert index.dim == 8 and sorted(s.rows for s in index.segments) == [2, 2]


def test_a_wrong_dim_in_a_state_without_segments_is_not_taken_for_the_tables(two_runs, caplog):
    """The state's dim was taken for the width of the table's vectors: 'holds vectors of 8 values beside vectors of
    3 ... edited by hand?'."""
    out, folder, first, second, hits = two_runs
    _state(folder, dim=3, segments=[], version=0)
    _new_process()
    (found,) = similar(str(out), ["/p/a.jpg"], ScanConfig(), k=3)
    assert [(h.path, h.similarity) for h in found.hits] == [(h.path, h.similarity) for h in hits]
    assert json.loads((folder / "state.json").read_text())["dim"] == 8


def test_an_index_of_coherent_files_narrower_than_the_tables_vectors_is_built_again(two_runs, caplog):
    """A state and files that agree with each other, at a width the table's vectors do not have, gave wrong hits: a
    new run's vectors (of the table's width) show it, and the whole index is made again from the table."""
    out, folder, first, second, hits = two_runs
    vectors = np.fromfile(folder / f"{first}.f16", dtype=np.float16).reshape(2, 8)
    vectors[:, :4].copy().tofile(folder / f"{first}.f16")
    _state(folder, dim=4, segments=lambda state: [s for s in state["segments"] if s["name"] == first])
    commit_vectors(out, {"/p/e.jpg": _v(-1)})
    _new_process()
    (found,) = similar(str(out), ["/p/a.jpg"], ScanConfig(), k=3)
    assert [(h.path, h.similarity) for h in found.hits] == [(h.path, h.similarity) for h in hits]
    assert any("holds vectors of 4 values, the table's have 8: building it again" in r.getMessage()
               for r in caplog.records)
    assert (folder / f"{first}.f16").stat().st_size == 2 * 8 * 2


def test_a_file_where_the_index_folder_belongs_is_one_sentence_exit_2_and_left_alone(two_runs):
    out, folder, first, second, hits = two_runs
    shutil.rmtree(folder.parent)
    folder.parent.write_text("not dogbreed's")  # OUT/_dogbreed/similar is a file
    proc = subprocess.run([str(DOGBREED), "similar", str(out), "/p/a.jpg"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == Exit.USAGE and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: the vector index of {out} belongs in {folder}, but {folder.parent} is a file, not a folder: move it "
        "away and search again"]
    assert folder.parent.read_text() == "not dogbreed's"
    folder.parent.unlink()
    folder.parent.mkdir()
    folder.write_text("not dogbreed's either")  # the embedding's folder is a file
    _new_process()
    with pytest.raises(SimilarError, match=f"but {folder} is a file, not a folder"):
        similar(str(out), ["/p/a.jpg"], ScanConfig())
    assert folder.read_text() == "not dogbreed's either"


def test_a_damaged_segment_that_cannot_be_written_again_is_one_sentence_and_deletes_nothing(two_runs):
    out, folder, first, second, hits = two_runs
    (folder / f"{first}.f16").unlink()
    (folder / f"{first}.f16").mkdir()  # someone's folder where a segment's vectors belong
    (folder / f"{first}.f16" / "mine.txt").write_text("mine")
    _new_process()
    with pytest.raises(SimilarError, match=f"the vector index of {out} cannot be written in {folder} "):
        similar(str(out), ["/p/a.jpg"], ScanConfig())
    assert (folder / f"{first}.f16" / "mine.txt").read_text() == "mine"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_damaged_index_through_the_cli_is_a_warning_line_and_the_right_hits(two_runs):
    out, folder, first, second, hits = two_runs
    (folder / f"{first}.f16").write_bytes(b"\0" * 5)
    proc = subprocess.run([str(DOGBREED), "similar", str(out), "/p/a.jpg", "--k", "1", "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [h["path"] for h in json.loads(proc.stdout)["hits"]] == ["/p/b.jpg"]
    (line,) = proc.stderr.strip().splitlines()
    assert "vector index" in line and "damaged" in line and f"{first}.f16 holds 5 bytes" in line


def test_a_dogbreed_cache_that_is_a_file_is_one_sentence_naming_it(two_runs, tmp_path, monkeypatch):
    """A table this process cannot write gets its index in the user cache: DOGBREED_CACHE naming a file was a
    NotADirectoryError traceback."""
    from typer.testing import CliRunner

    import dogbreed.vectors.index as index_module
    from dogbreed.cli import app

    out, folder, first, second, hits = two_runs
    cache = tmp_path / "cache"
    cache.write_text("a file")
    monkeypatch.setenv("DOGBREED_CACHE", str(cache))
    monkeypatch.setattr(index_module, "_writable", lambda output: False)  # as a read-only mount or bucket is
    _new_process()
    r = CliRunner().invoke(app, ["similar", str(out), "/p/a.jpg"])
    assert r.exit_code == Exit.USAGE, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: DOGBREED_CACHE={cache} cannot hold the vector index of {out} ({cache} is a file, ")
    assert line.endswith("set DOGBREED_CACHE to a folder this user can write") and cache.read_text() == "a file"
    monkeypatch.setenv("DOGBREED_CACHE", str(tmp_path / "cache2"))
    _new_process()
    (found,) = similar(str(out), ["/p/a.jpg"], ScanConfig(), k=3)  # a folder: the index is made there
    assert [h.path for h in found.hits] == [h.path for h in hits] and list((tmp_path / "cache2").rglob("*.f16"))


def test_similar_and_relabel_say_why_a_table_has_no_vectors(tmp_path, commit_rows):
    """An empty table, or one of error rows only, was said to hold 'rows of runs before dogbreed stored vectors'."""
    gone = tmp_path / "gone"
    commit_rows(gone, ["/p/a.jpg"], status="dog")
    commit_rows(gone, ["/p/a.jpg"], status="deleted")  # every file deleted since
    broken = tmp_path / "broken"
    commit_rows(broken, ["/p/a.jpg", "/p/b.txt"], status="error")
    old = tmp_path / "old"
    commit_rows(old, ["/p/a.jpg"], status="dog")
    cases = {gone: "has no current rows to {} (no photo scanned into it yet, or every one deleted since)",
             broken: "has no decoded photos to {}: its 2 current rows are errors or skipped files, which have no vectors",
             old: "{}: its 1 decoded rows come from runs before dogbreed stored"}
    for out, said in cases.items():
        with pytest.raises(SimilarError) as e:
            similar(str(out), ["/p/a.jpg"], ScanConfig())
        assert said.format("search" if out != old else "holds no embeddings yet") in str(e.value)
        with pytest.raises(RelabelError) as e:
            relabel(str(out), ScanConfig(model="default"))
        assert said.format("relabel" if out != old else "backbone)") in str(e.value)
    mixed = tmp_path / "mixed"
    commit_vectors(mixed, {"/p/a.jpg": _v(1), "/p/b.jpg": None}, status="dog")
    commit_rows(mixed, ["/p/c.jpg"], status="error")
    for query, said in (("/p/c.jpg", "it is an error row"), ("/p/b.jpg", "its row comes from a run before dogbreed")):
        with pytest.raises(SimilarError, match=f"{query} has no embedding in {mixed}: {said}"):
            similar(str(mixed), [query], ScanConfig())


def test_a_query_embedded_wider_than_the_tables_vectors_is_one_sentence(tmp_path):
    out = tmp_path / "out"
    commit_vectors(out, {"/p/a.jpg": _v(1), "/p/b.jpg": _v(0, 1)}, eid=load_default().embedding_id)
    with pytest.raises(SimilarError, match=r"coffee\.png was embedded as 1280 values by .*, but .* holds its vectors "
                                           "as 8; the table was edited by hand"):
        similar(str(out), [str(SAMPLES / "coffee.png")], ScanConfig())


@pytest.mark.slow  # two commits, a relabel and two searches: the full suite (CI) runs it
def test_a_relabelled_runs_segment_leaves_the_index_and_its_files_go_after_the_grace(tmp_path, predictor,
                                                                                     monkeypatch):
    """Every relabel copies each current row's vector into its own run: the index used to keep the replaced run's
    segment on disk for good, growing by a full copy of the vectors with every relabel."""
    import dogbreed.vectors.index as index_module

    out = tmp_path / "out"
    photos = sorted(SAMPLES.glob("*.jpg"))
    first = commit_photos(out, photos, predictor)
    output = Output(out)
    eid = load_default().embedding_id
    before = similar(str(out), [str(photos[0])], ScanConfig(), k=3)[0].hits
    relabelled = relabel(str(out), ScanConfig(model="default")).run_id
    index = VectorIndex(output, eid)
    index.refresh(output.require())
    assert [s.name for s in index.segments] == [relabelled] and set(index.retired) == {first}
    assert (Path(index.local) / f"{first}.f16").exists()  # a search still reading the older state finds it
    (Path(index.local) / f".{first}.{'0' * 32}.parquet").write_bytes(b"PAR1")  # what a killed refresh left
    monkeypatch.setattr(index_module, "RETIRE_GRACE_S", 0.0)
    later = commit_photos(out, [SAMPLES / "coffee.png"], predictor)
    index = VectorIndex(output, eid)
    assert index.refresh(output.require()) == 1
    assert sorted(s.name for s in index.segments) == sorted([relabelled, later]) and index.retired == {}
    assert sorted(p.name for p in Path(index.local).iterdir()) == sorted(
        [f"{run}{suffix}" for run in (relabelled, later) for suffix in (".f16", ".keys.parquet")] + ["state.json"])
    after = similar(str(out), [str(photos[0])], ScanConfig(), k=3)[0].hits
    assert [(h.path, h.similarity) for h in after] == [(h.path, h.similarity) for h in before]
    # a fresh index of a table with a relabel in its history indexes only the run that owns the current rows
    fresh = VectorIndex(Output(out), eid)
    fresh.local = tmp_path / "fresh-index"
    fresh.beside = None
    fresh.refresh(output.require())
    assert sorted(s.name for s in fresh.segments) == sorted([relabelled, later])


@pytest.mark.slow  # Ray Data on a local Ray
def test_relabel_on_ray_data_gives_the_rows_of_a_local_relabel(tmp_path, predictor, ray_local):
    photos = sorted(SAMPLES.glob("*"))
    model = freeze_artifact(tmp_path / "model")
    here, there = tmp_path / "here", tmp_path / "there"
    for out in (here, there):
        commit_photos(out, photos, predictor)
    relabel(str(here), ScanConfig(model=str(model)))
    summary = relabel(str(there), ScanConfig(model=str(model), address="local"))  # Ray is up: Ray Data does it
    assert summary.relabelled == len(photos)
    a, b = (readers.latest(o).set_index("path").sort_index() for o in (here, there))
    assert (a["status"] == b["status"]).all() and (a["breed"] == b["breed"]).all()
    assert np.allclose(a["dog_score"], b["dog_score"])


@pytest.mark.slow  # three runs through Ray Data
def test_relabel_gives_what_a_real_scan_with_the_model_gives(tmp_path, predictor, ray_local, scan_config):
    """Issue 21's yardstick: `scan` (the default model, through Ray) then `relabel --model` answers as a fresh
    `scan --mode all --model` of the same photos does (same status and top-1 on >= 99.5% of rows)."""
    from dogbreed.scan.job import run_scan

    photos = tmp_path / "photos"
    photos.mkdir()
    shared = REPO.parent / "shared" / "data"
    picked = sorted(SAMPLES.glob("*")) + sorted((shared / "imagewoof" / "val-unseen").rglob("*.jpeg"))[::10][:30] \
        + sorted((shared / "humans").rglob("*.jpg"))[:5]  # the shared ones where they are there
    for i, p in enumerate(picked):
        (photos / f"{i:03d}_{p.name}").write_bytes(p.read_bytes())
    model = freeze_artifact(tmp_path / "model")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_scan(scan_config([photos], out))
    summary = relabel(str(out), scan_config([photos], out, model=str(model)))
    run_scan(scan_config([photos], fresh, model=str(model), mode="all"))
    now, scanned = (readers.latest(o).set_index("path").sort_index() for o in (out, fresh))
    assert summary.relabelled == len(picked) == len(scanned) and (now.index == scanned.index).all()
    assert (now["model_id"] == scanned["model_id"]).all() and (now["run_id"] == summary.run_id).all()
    same = (now["status"] == scanned["status"]) & (now["breed"].fillna("") == scanned["breed"].fillna(""))
    assert same.mean() >= 0.995, now.loc[~same, ["status", "breed"]].join(scanned[["status", "breed"]], rsuffix="_scan")
    assert set(now["status"]) >= {"dog", "human"}  # both kinds of answer are compared


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_the_report_shows_look_alikes_of_a_few_dog_photos(tmp_path, predictor):
    from dogbreed.report import build_report

    out = tmp_path / "out"
    commit_photos(out, sorted(SAMPLES.glob("*")), predictor)
    html = build_report(out, tmp_path / "r.html").read_text()
    assert "<h2>Look-alikes</h2>" in html
    assert html.count('class="tile query"') == 4  # four dog photos, each with its nearest rows beside it
    section = html[html.index("<h2>Look-alikes</h2>"):html.index("<h2>Errors")]
    assert section.count("data:image/jpeg;base64,") == 4 * 5


@pytest.mark.slow  # a real scan in another process
def test_similar_beside_a_running_scan_sees_committed_versions_only(tmp_path, predictor, make_photos):
    out = tmp_path / "out"
    first = sorted(SAMPLES.glob("*"))
    commit_photos(out, first, predictor)
    more = make_photos(tmp_path / "more", 24)
    version = DeltaTable(str(out)).version()
    scan = subprocess.Popen([str(DOGBREED), "scan", str(tmp_path / "more"), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    lab = str(SAMPLES / "Labrador_retriever_06455.jpg")
    try:
        while scan.poll() is None:
            (found,) = similar(str(out), [lab], ScanConfig(), k=40)
            seen |= {h.path for h in found.hits}
            time.sleep(0.5)
    finally:
        log = scan.communicate(timeout=300)[0]
    assert scan.returncode == 0, log[-2000:]
    assert DeltaTable(str(out)).version() > version
    (after,) = similar(str(out), [lab], ScanConfig(), k=40)
    assert {str(p) for p in more} <= {h.path for h in after.hits}  # the new run's vectors, once committed
    assert seen <= {str(p) for p in first + more}  # never anything but committed rows


def test_mirrors_in_the_user_cache_not_opened_for_a_month_are_removed_and_the_rest_kept(tmp_path):
    """An old model's mirrored vectors of a remote or read-only table stayed in the user's cache for ever."""
    import os

    from dogbreed.vectors.index import MIRROR_UNUSED_DAYS, USED, prune_mirrors

    root, now = tmp_path / "similar", time.time()
    old_day = now - (MIRROR_UNUSED_DAYS + 1) * 86400

    def mirror(name: str, used: float | None) -> Path:
        path = root / name
        path.mkdir(parents=True)
        (path / "run.f16").write_bytes(b"\0" * 64)
        if used is not None:
            (path / USED).touch()
            os.utime(path / USED, (used, used))
        os.utime(path, (old_day, old_day))
        return path

    stale, recent, unmarked = mirror("t1/net_a", old_day), mirror("t1/net_b", now - 86400), mirror("t2/net_a", None)
    keep = mirror("t3/net_c", old_day)  # the one being opened now, however old
    removed = prune_mirrors(root, keep=keep, now=now)
    assert removed == ["t1/net_a"]  # a folder without the mark is not a mirror of ours (a user's), however old
    assert not stale.exists() and unmarked.is_dir() and (unmarked / "run.f16").is_file()
    assert recent.is_dir() and keep.is_dir() and (keep / USED).stat().st_mtime > now - 60


def test_a_query_file_spelling_an_escape_is_looked_up_as_its_own_row(tmp_path):
    """similar's query `caf\\xe9.jpg` (a UTF-8 name) resolved to the row of the file holding the byte 0xE9."""
    import os

    from dogbreed.scan.listing import list_roots
    from dogbreed.vectors.similar import _query_rows

    latin = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(latin, "wb") as f:
        f.write(b"x")
    spelled = tmp_path / "caf\\xe9.jpg"
    spelled.write_bytes(b"y")
    listing = list_roots([str(tmp_path)])
    current = pa.table({"path": listing.column("path"), "path_bytes": listing.column("raw")})
    (text, _, _), = _query_rows([str(spelled)], current, ScanConfig(), None)
    assert text == str(tmp_path) + "/caf\\x5cxe9.jpg"
    (stored, _, _), = _query_rows([str(tmp_path) + "/caf\\x5cxe9.jpg"], current, ScanConfig(), None)
    assert stored == text  # a path copied from the table still finds its row
