"""The output schema: face boxes carry a score, and runs written before scores existed still read."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dogbreed import results


def _rows(faces: list[list]) -> dict:
    n = len(faces)
    return {"path": np.array([f"/p/{i}.jpg" for i in range(n)], dtype=object), "status": np.array(["human"] * n, dtype=object),
            "size_bytes": np.ones(n, np.int64), "mtime_ns": np.zeros(n, np.int64), "width": np.full(n, 100, np.int32),
            "height": np.full(n, 80, np.int32), "face_count": np.array([len(f) for f in faces], np.int32),
            "faces": np.array([json.dumps(f) for f in faces], dtype=object), "dog_score": np.zeros(n, np.float32),
            "breed_prob": np.zeros(n, np.float32), "breeds": np.array([[]] * n + [None], dtype=object)[:n]}


def test_face_boxes_carry_the_detectors_score_or_null():
    table = results.rows_to_table(_rows([[[1, 2, 30, 40, 0.93]], [[5, 6, 7, 8, None]]]), "r", "s", None)
    assert table.schema.field("faces").type == pa.list_(results.BOX)
    faces = table.column("faces").to_pylist()
    assert faces[0] == [{"x": 1, "y": 2, "w": 30, "h": 40, "score": faces[0][0]["score"]}]
    assert abs(faces[0][0]["score"] - 0.93) < 1e-6  # float32
    assert faces[1][0]["score"] is None  # Haar: no confidence


def test_runs_written_before_scores_existed_still_read(tmp_path):
    run = tmp_path / results.RUNS_DIR / "20200101T000000Z-old"
    run.mkdir(parents=True)
    old_box = pa.struct([(n, pa.int32()) for n in "xywh"])
    old_schema = pa.schema([f if f.name != "faces" else pa.field("faces", pa.list_(old_box)) for f in results.SCHEMA])
    old = results.rows_to_table(_rows([[[1, 2, 3, 4, None]]]), "old", "s", None).drop_columns(["faces"])
    old = old.append_column("faces", pa.array([[{"x": 1, "y": 2, "w": 3, "h": 4}]], pa.list_(old_box))).select(old_schema.names)
    pq.write_table(old.cast(old_schema), run / "part-0.parquet")
    (run / results.MANIFEST).write_text(json.dumps({"run_id": "old"}))
    df = results.latest(tmp_path)
    assert df["faces"][0].tolist() == [{"x": 1, "y": 2, "w": 3, "h": 4, "score": None}]
