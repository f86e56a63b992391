"""Reading the output table: the current answer per photo, history, the readers the README shows (pandas through
deltalake, DuckDB, Polars), compaction, and migration from the old runs/ layout. No Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from typer.testing import CliRunner

from dogbreed.cli import app
from dogbreed.table import readers, schema
from dogbreed.table.location import OutputError, locate
from dogbreed.table.maintain import MIGRATED_DIR, compact, migrate


@pytest.fixture
def three_runs(tmp_path, commit_rows) -> tuple[str, dict[str, str]]:
    """Three runs over overlapping photos; the third deletes one. Returns OUT and the expected run per photo."""
    out = str(tmp_path / "out")
    r1 = commit_rows(out, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
    r2 = commit_rows(out, ["/p/b.jpg", "/p/d.jpg"], status="dog", model_id="other-model")
    r3 = commit_rows(out, ["/p/c.jpg"], status="deleted")
    return out, {"/p/a.jpg": r1, "/p/b.jpg": r2, "/p/d.jpg": r2}, (r1, r2, r3)


def test_latest_is_the_newest_row_per_existing_photo_and_history_keeps_every_row(three_runs):
    out, expected, _ = three_runs
    current = readers.latest(out)
    assert dict(zip(current["path"], current["run_id"])) == expected and current["path"].is_monotonic_increasing
    assert len(readers.read_all(out)) == 6
    by_model = readers.latest(out, model_id="test-model")
    assert list(by_model["path"]) == ["/p/a.jpg", "/p/b.jpg"]  # b's row of the default model; c deleted


def test_latest_does_not_depend_on_file_order_and_survives_compaction(three_runs):
    out, expected, _ = three_runs
    summary = compact(out, retention_hours=1)
    assert (summary.files_before, summary.files_after) == (3, 1)  # one file, rows in whatever order OPTIMIZE chose
    current = readers.latest(out)
    assert dict(zip(current["path"], current["run_id"])) == expected
    assert len(readers.read_all(out)) == 6 and len(readers.manifests(out)) == 3


def _hand_commit(out: str, path: str) -> None:
    """The next log version, adding one file by hand (as a copied commit or a hand edit would)."""
    log = Path(out, "_delta_log")
    version = max(int(p.name[:20]) for p in log.glob("*.json")) + 1
    add = {"path": path, "size": os.path.getsize(Path(out, path)), "partitionValues": {}, "modificationTime": 1,
           "dataChange": True}
    (log / f"{version:020d}.json").write_text(json.dumps({"commitInfo": {"timestamp": 1, "operation": "WRITE"}}) + "\n"
                                              + json.dumps({"add": add}) + "\n")


def test_latest_is_one_row_per_path_when_a_replayed_commit_adds_a_removed_file_again(three_runs):
    """A copy of an old commit after a compaction re-adds a file the compaction removed: latest gave rows twice."""
    out, expected, (_, r2, _) = three_runs
    compact(out, retention_hours=1)
    _hand_commit(out, DeltaTable(out, version=1).get_add_actions(flatten=True).column("path")[0].as_py())
    current = readers.latest(out)
    assert len(current) == current["path"].nunique() == 3
    assert dict(zip(current["path"], current["run_id"])) == expected


def test_two_rows_of_one_path_in_its_newest_run_give_one_the_same_on_every_read(three_runs):
    """A run's rows added twice (a copy of its file under another name): the one processed last, deterministically."""
    out, expected, (_, r2, _) = three_runs
    name = next(p for p in DeltaTable(out).get_add_actions(flatten=True).column("path").to_pylist() if r2 in p)
    rows = pq.read_table(Path(out, name))
    later = pa.array([t.as_py() + pd.Timedelta(seconds=1) for t in rows.column("processed_at")], schema.UTC_US)
    rows = rows.set_column(rows.schema.get_field_index("processed_at"), "processed_at", later)
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(["human"] * rows.num_rows))
    pq.write_table(rows, Path(out, name.replace("part-00000", "part-00001")))
    _hand_commit(out, name.replace("part-00000", "part-00001"))
    for _ in range(2):
        current = readers.latest(out)
        assert len(current) == current["path"].nunique() == 3
        assert dict(zip(current["path"], current["run_id"])) == expected
        assert dict(zip(current["path"], current["status"])) == {"/p/a.jpg": "neither", "/p/b.jpg": "human",
                                                                 "/p/d.jpg": "human"}


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_compaction_on_s3_keeps_every_row_and_removes_what_it_replaced(s3_out, commit_rows):
    import boto3

    for batch in (["/p/a.jpg", "/p/b.jpg"], ["/p/b.jpg"], ["/p/c.jpg"]):
        run = commit_rows(s3_out, batch)
    before = readers.latest(s3_out)
    summary = compact(s3_out, retention_hours=0)
    assert (summary.files_before, summary.files_after, summary.removed) == (3, 1, 3)
    pd.testing.assert_frame_equal(readers.latest(s3_out), before)
    assert before["run_id"].iloc[-1] == run and len(readers.read_all(s3_out)) == 4
    bucket, prefix = s3_out[5:].split("/", 1)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert sum(k.endswith(".parquet") and "_delta_log" not in k for k in keys) == 1


def test_plain_read_parquet_on_the_folder_counts_removed_files_until_vacuum(three_runs):
    """Why the README says: read OUT with deltalake, never as a plain Parquet folder."""
    out, _, _ = three_runs
    compact(out, retention_hours=1)
    assert len(pd.read_parquet(out)) == 12  # the compacted file plus the three it replaced: every row twice
    assert len(DeltaTable(out).to_pandas()) == 6
    compact(out, retention_hours=0)  # vacuum now deletes what the current version no longer names
    assert len(pd.read_parquet(out)) == 6


def test_integer_columns_are_nullable_in_every_run(tmp_path, commit_rows):
    out = str(tmp_path / "out")
    commit_rows(out, ["/p/a.jpg"])  # size_bytes null (no such file)
    commit_rows(out, [Path(__file__)])  # size_bytes set
    df = readers.read_all(out)
    assert str(df["size_bytes"].dtype) == "Int64" and str(df["width"].dtype) == "Int32"


def test_the_readers_in_the_readme_give_the_current_answer(three_runs):
    out, expected, _ = three_runs
    # pandas through deltalake: every row of the current version (the history)
    history = DeltaTable(out).to_pandas()
    assert len(history) == 6
    # DuckDB on the table's Arrow dataset (delta_scan needs DuckDB's delta extension, downloaded at run time)
    import duckdb

    con = duckdb.connect()
    con.register("rows", DeltaTable(out).to_pyarrow_dataset())
    current = con.sql("""
        SELECT path, run_id FROM rows
        QUALIFY row_number() OVER (PARTITION BY path ORDER BY run_id DESC) = 1 AND status <> 'deleted'
        ORDER BY path""").fetchall()
    assert dict(current) == expected
    # Polars
    import polars as pl

    newest = (pl.read_delta(out).sort("run_id").group_by("path").last()
              .filter(pl.col("status") != "deleted").sort("path"))
    assert dict(zip(newest["path"], newest["run_id"])) == expected


def test_time_travel_answers_what_an_earlier_run_said(three_runs):
    out, _, (r1, r2, r3) = three_runs
    first = DeltaTable(out, version=0).to_pandas()
    assert set(first["run_id"]) == {r1} and len(first) == 3


def test_latest_command_on_an_s3_output(s3_out, commit_rows, tmp_path):
    commit_rows(s3_out, ["/p/a.jpg", "/p/b.jpg"])
    run = commit_rows(s3_out, ["/p/b.jpg"], status="dog")
    r = CliRunner().invoke(app, ["latest", s3_out, "--csv", str(tmp_path / "l.csv")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "l.csv")
    assert list(table["path"]) == ["/p/a.jpg", "/p/b.jpg"] and table["run_id"].iloc[1] == run
    assert "2 photos" in r.output


def test_latest_command_on_a_bad_uri_is_one_sentence():
    r = CliRunner().invoke(app, ["latest", "ftp://host/out"])
    assert r.exit_code == 2 and r.output.strip() == (
        "error: --out ftp://host/out: ftp:// output is not supported; give a local folder, an s3:// or a gs:// URI")


# --------------------------------------------------------------------------- migration from runs/


def _old_run(out: Path, run_id: str, paths: list[str], status: str) -> None:
    """A run exactly as the pre-Delta store committed it: runs/<run_id>/part-00000.parquet, manifest, config."""
    run = out / schema.RUNS_DIR / run_id
    run.mkdir(parents=True)
    n = len(paths)
    pq.write_table(schema.to_table({"path": paths, "status": [status] * n, "run_id": [run_id] * n,
                                     "width": [640] * n, "processed_at": pa.array([None] * n, schema.UTC_US)}),
                   run / "part-00000.parquet")
    (run / schema.MANIFEST).write_text(json.dumps({"run_id": run_id, "model_id": "m", "status": "committed",
                                                    "counts": {status: n}}))
    (run / "_config.yaml").write_text("top_k: 3\n")


def test_migrate_converts_the_runs_layout_keeping_every_row(tmp_path):
    out = tmp_path / "out"
    _old_run(out, "20240101T000000000000Z-aaaaaa", ["/p/a.jpg", "/p/b.jpg"], "neither")
    _old_run(out, "20240102T000000000000Z-bbbbbb", ["/p/b.jpg", "/p/c.jpg"], "dog")
    (out / "_staging" / "20240103T000000000000Z-cccccc").mkdir(parents=True)  # a killed run's leftovers
    (out / ".lock").write_text("pid 1")
    # A copy through a Mac leaves AppleDouble files beside the parts; they hold no rows (the run was refused as junk).
    (out / schema.RUNS_DIR / "20240101T000000000000Z-aaaaaa" / "._part-00000.parquet").write_bytes(b"\0\5\26\7 Mac OS X")
    r = CliRunner().invoke(app, ["migrate", str(out)])
    assert r.exit_code == 0, r.output
    assert "migrated 2 runs" in r.output
    runs = readers.manifests(out)
    assert [m["run_id"] for m in runs] == ["20240101T000000000000Z-aaaaaa", "20240102T000000000000Z-bbbbbb"]
    assert runs[0]["config"] == "top_k: 3\n" and runs[1]["counts"] == {"dog": 2}
    history = readers.read_all(out)
    assert len(history) == 4 and set(history["width"]) == {640}
    current = readers.latest(out)
    assert dict(zip(current["path"], current["status"])) == {"/p/a.jpg": "neither", "/p/b.jpg": "dog", "/p/c.jpg": "dog"}
    assert not (out / schema.RUNS_DIR).exists() and (out / MIGRATED_DIR / schema.RUNS_DIR).is_dir()
    assert not (out / "_staging").exists() and not (out / ".lock").exists()
    assert len(pd.read_parquet(out)) == 4  # the old files are out of plain readers' way too
    r = CliRunner().invoke(app, ["migrate", str(out)])
    assert r.exit_code == 2 and "has no runs/<run_id>/_manifest.json to migrate" in r.output


def test_migrate_killed_half_way_is_simply_run_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _old_run(out, "20240101T000000000000Z-aaaaaa", ["/p/a.jpg"], "neither")
    _old_run(out, "20240102T000000000000Z-bbbbbb", ["/p/b.jpg"], "dog")
    import dogbreed.table.store as store

    real_commit, calls = store.commit, []

    def commit_once(*args, **kwargs):  # the process "dies" after its first commit
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(store, "commit", commit_once)
    with pytest.raises(KeyboardInterrupt):
        migrate(str(out))
    monkeypatch.setattr(store, "commit", real_commit)
    assert migrate(str(out)) == ["20240102T000000000000Z-bbbbbb"]
    assert len(readers.read_all(out)) == 2 and len(readers.manifests(out)) == 2
    assert locate(out).remote is False



A, B = "20240101T000000000000Z-aaaaaa", "20240102T000000000000Z-bbbbbb"


def _tree(out: Path) -> dict[str, bytes | None]:
    """Every path under `out` with its bytes (None for a folder, pipe or link to nothing): what 'unchanged' means."""
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}


def _write_part(run: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), run / "part-00001.parquet")


# Each damages the second of two old runs (or runs/ itself); the first alone would have migrated before the change.
DAMAGE = {
    "manifest not JSON": (lambda run: (run / "_manifest.json").write_text('{"run_id": "x",'), "_manifest.json is not valid JSON"),
    "manifest a list": (lambda run: (run / "_manifest.json").write_text("[1, 2]"), "_manifest.json is not a manifest (a JSON list"),
    "manifest with NaN": (lambda run: (run / "_manifest.json").write_text('{"counts": NaN}'), "NaN is no JSON value"),
    "manifest with a lone surrogate": (lambda run: (run / "_manifest.json").write_text('{"model_id": "\\ud800"}'),
                                       "_manifest.json is not a manifest a Delta commit can hold"),
    "manifest not UTF-8": (lambda run: (run / "_manifest.json").write_bytes(b'{"model_id": "\xff"}'), "_manifest.json is not UTF-8 text"),
    "manifest a folder": (lambda run: ((run / "_manifest.json").unlink(), (run / "_manifest.json").mkdir()),
                          "_manifest.json cannot be read (it is a folder"),
    "manifest a pipe": (lambda run: ((run / "_manifest.json").unlink(), os.mkfifo(run / "_manifest.json")),
                        "_manifest.json cannot be read (not a regular file"),
    "run id not a string": (lambda run: (run / "_manifest.json").write_text('{"run_id": 5}'), "names no valid run id (a JSON int"),
    "run id a path": (lambda run: (run / "_manifest.json").write_text('{"run_id": "../../x"}'), 'names no valid run id ("../../x"'),
    "no run id, folder not one": (lambda run: ((run / "_manifest.json").write_text("{}"), run.rename(run.parent / "my run")),
                                  "names no run id, and its folder's name is none (\"my run\""),
    "run id of another run": (lambda run: (run / "_manifest.json").write_text(json.dumps({"run_id": A})),
                              f"names the run {A}, as "),
    "junk part file": (lambda run: (run / "part-00001.parquet").write_bytes(b"PAR1 not really"), "is not a readable Parquet file"),
    "empty part file": (lambda run: (run / "part-00001.parquet").write_bytes(b""), "is not a readable Parquet file"),
    "part file a folder": (lambda run: (run / "part-00001.parquet").mkdir(), "part-00001.parquet is not a regular file"),
    "part without a path column": (lambda run: _write_part(run, {"status": ["dog"]}), "has no path column"),
    "path of integers": (lambda run: _write_part(run, {"path": [1]}), "has a column path of type int64, not string"),
    "width as text": (lambda run: _write_part(run, {"path": ["/p/x.jpg"], "width": ["wide"]}),
                      "has a column width of type string, not int32"),
    "width too wide": (lambda run: _write_part(run, {"path": ["/p/x.jpg"], "width": pa.array([2**40], pa.int64())}),
                       "has a column width of type int64, not int32"),
    "nanosecond times": (lambda run: _write_part(run, {"path": ["/p/x.jpg"], "mtime": pa.array([1001], pa.timestamp("ns"))}),
                         "has a column mtime of type timestamp[ns], not timestamp[us, tz=UTC]"),
    "config not UTF-8": (lambda run: (run / "_config.yaml").write_bytes(b"top_k: \xff\xfe\n"), "_config.yaml is not UTF-8 text"),
    "a file in runs/": (lambda run: (run.parent / "notes.txt").write_text("mine"), "runs/notes.txt is not a run folder"),
    "a folder without manifest": (lambda run: (run / "_manifest.json").unlink(), f"runs/{B} holds no _manifest.json"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_migrate_refuses_a_damaged_old_run_before_writing_anything(tmp_path, damage):
    out = tmp_path / "out"
    _old_run(out, A, ["/p/a.jpg"], "neither")
    _old_run(out, B, ["/p/b.jpg"], "dog")
    make, says = DAMAGE[damage]
    make(out / schema.RUNS_DIR / B)
    before = _tree(out)
    with pytest.raises(OutputError) as e:
        migrate(str(out))
    message = str(e.value)
    assert says in message, message
    assert str(out / schema.RUNS_DIR) in message and "nothing was migrated" in message and "dogbreed migrate" in message
    assert "\n" not in message and e.value.exit_code == 2
    assert _tree(out) == before  # no commit, no lock, nothing moved


def test_migrate_command_on_a_damaged_run_is_one_sentence_and_a_good_run_still_migrates(tmp_path):
    out = tmp_path / "out"
    _old_run(out, A, ["/p/a.jpg", "/p/b.jpg"], "neither")
    _old_run(out, B, ["/p/c.jpg"], "dog")
    (out / schema.RUNS_DIR / B / schema.MANIFEST).write_text("not json")
    (out / schema.RUNS_DIR / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # a desktop's litter is no run, and no damage
    before = _tree(out)
    r = CliRunner().invoke(app, ["migrate", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"error: {out / schema.RUNS_DIR / B / schema.MANIFEST} is not valid JSON"), r.output
    assert f"move {out / schema.RUNS_DIR / B} out of {out}" in r.output
    assert _tree(out) == before
    (out / schema.RUNS_DIR / B).rename(tmp_path / B)  # what the sentence says to do
    r = CliRunner().invoke(app, ["migrate", str(out)])
    assert r.exit_code == 0 and "migrated 1 runs" in r.output, r.output
    assert [m["run_id"] for m in readers.manifests(out)] == [A] and len(readers.read_all(out)) == 2
    assert (out / MIGRATED_DIR / schema.RUNS_DIR / ".DS_Store").is_file()


def test_a_part_damaged_behind_its_footer_stops_migrate_with_one_sentence_and_a_rerun_finishes(tmp_path):
    """Pages are read only while writing: the runs before it stay migrated, and a second migrate skips them."""
    out = tmp_path / "out"
    _old_run(out, A, ["/p/a.jpg"], "neither")
    _old_run(out, B, [f"/p/{i}.jpg" for i in range(100)], "dog")
    part = out / schema.RUNS_DIR / B / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    start = pq.ParquetFile(part).metadata.row_group(0).column(0).data_page_offset
    data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])  # the path column's page header
    part.write_bytes(bytes(data))
    with pytest.raises(OutputError, match=f"{part} cannot be read .*1 runs were migrated before it, this one was not"):
        migrate(str(out))
    assert (out / schema.RUNS_DIR / B).is_dir() and [m["run_id"] for m in readers.manifests(out)] == [A]
    (out / schema.RUNS_DIR / B).rename(tmp_path / B)
    assert migrate(str(out)) == [] and len(readers.read_all(out)) == 1
    assert not (out / schema.RUNS_DIR).exists()


# ---- face boxes carry the detector's score --------------------------------------------------------------------


def _face_rows(faces: list[list]) -> dict:
    import numpy as np

    n = len(faces)
    return {"path": np.array([f"/p/{i}.jpg" for i in range(n)], dtype=object), "status": np.array(["human"] * n, dtype=object),
            "size_bytes": np.ones(n, np.int64), "mtime_ns": np.zeros(n, np.int64), "width": np.full(n, 100, np.int32),
            "height": np.full(n, 80, np.int32), "face_count": np.array([len(f) for f in faces], np.int32),
            "faces": np.array([json.dumps(f) for f in faces], dtype=object), "dog_score": np.zeros(n, np.float32),
            "breed_prob": np.zeros(n, np.float32), "breeds": np.array([[]] * n + [None], dtype=object)[:n]}


def test_face_boxes_carry_the_detectors_score_or_null():
    table = schema.rows_to_table(_face_rows([[[1, 2, 30, 40, 0.93]], [[5, 6, 7, 8, None]]]), "r", "s", None)
    assert table.schema.field("faces").type == pa.list_(schema.BOX)
    faces = table.column("faces").to_pylist()
    assert faces[0] == [{"x": 1, "y": 2, "w": 30, "h": 40, "score": faces[0][0]["score"]}]
    assert abs(faces[0][0]["score"] - 0.93) < 1e-6  # float32
    assert faces[1][0]["score"] is None  # Haar: no confidence


def test_runs_written_before_scores_existed_migrate_with_a_null_score(tmp_path):
    out = tmp_path / "out"
    run = out / "runs" / "20200101T000000Z-old"
    run.mkdir(parents=True)
    old_box = pa.struct([(n, pa.int32()) for n in "xywh"])
    old_schema = pa.schema([f if f.name != "faces" else pa.field("faces", pa.list_(old_box)) for f in schema.SCHEMA])
    old = schema.rows_to_table(_face_rows([[[1, 2, 3, 4, None]]]), "20200101T000000Z-old", "s", None)
    old = old.drop_columns(["faces"]).append_column("faces", pa.array([[{"x": 1, "y": 2, "w": 3, "h": 4}]],
                                                                      pa.list_(old_box))).select(old_schema.names)
    pq.write_table(old.cast(old_schema), run / "part-0.parquet")
    (run / "_manifest.json").write_text(json.dumps({"run_id": "20200101T000000Z-old", "status": "committed"}))
    migrate(out)
    df = readers.latest(out)
    assert df["faces"][0].tolist() == [{"x": 1, "y": 2, "w": 3, "h": 4, "score": None}]


def test_latest_command_on_a_table_without_a_current_photo_says_so_in_one_line(tmp_path, commit_rows):
    """It printed pandas' "Empty DataFrame / Columns: [...] / Index: []" and "0 photos; "."""
    out = str(tmp_path / "out")
    commit_rows(out, ["/p/a.jpg"])
    commit_rows(out, ["/p/a.jpg"], status="deleted")
    for extra, of_model in (([], ""), (["--model-id", "test-model"], " of model test-model")):
        r = CliRunner().invoke(app, ["latest", out, *extra])
        assert r.exit_code == 0 and r.stdout == "", r.output
        assert r.stderr == f"0 photos: {out} holds no current photo{of_model} (its scans found none, or every photo " \
                           "they found was deleted since)\n"
