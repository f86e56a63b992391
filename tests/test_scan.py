"""The Ray Data scan job end to end on real photos: one row per file, the fixed schema, the summary."""

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from typer.testing import CliRunner

from dogbreed.cli import app
from dogbreed.scan.job import run_scan
from dogbreed.table import readers, schema

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "dogbreed" / "samples"
HUMANS = {"astronaut.png", "grace_hopper.jpg"}
NEITHER = {"chelsea_cat.png", "coffee.png"}


def test_scan_of_the_samples_through_the_cli(tmp_path, ray_local):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["scan", str(SAMPLES), "--out", str(out), "--config", str(ROOT / "configs" / "scan.yaml")])
    assert r.exit_code == 0, r.output
    assert "11 files, 11 processed" in r.output
    df = DeltaTable(str(out)).to_pandas()  # analysts' one-liner works on the whole output table
    assert len(df) == 11 and df["path"].is_unique
    for _, row in df.iterrows():
        name = Path(row["path"]).name
        expected = "human" if name in HUMANS else "neither" if name in NEITHER else "dog"
        assert row["status"] == expected, name
        assert row["width"] > 0 and row["model_id"].startswith("tf_efficientnet_lite0@")
    manifest = readers.manifests(out)[-1]
    files = list((out / "data" / manifest["run_id"]).glob("*.parquet"))
    assert files and all(pq.read_schema(f).equals(schema.SCHEMA, check_metadata=False) for f in files)
    assert manifest["counts"]["files"] == 11 and manifest["status"] == "committed" and manifest["version"] == 0
    assert "top_k: 3" in manifest["config"]  # the resolved config travels in the commit's metadata


def test_a_scan_told_to_store_no_embeddings_ships_none_through_ray(tmp_path, ray_local, scan_config):
    """inference.embeddings: false reaches the inference actors (the bench's with/without figure depends on it)."""
    photos = [SAMPLES / "grace_hopper.jpg", SAMPLES / "Brittany_02625.jpg", SAMPLES / "coffee.png"]
    for p in photos:
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    run_scan(scan_config([tmp_path / "a"], out, **{"inference.embeddings": False}))
    df = readers.latest(out, vectors=True).set_index("path")
    assert df["embedding"].isna().all() and df["embedding_id"].isna().all()
    assert {Path(p).name: s for p, s in df["status"].items()} == {
        "grace_hopper.jpg": "human", "Brittany_02625.jpg": "dog", "coffee.png": "neither"}


@pytest.mark.slow  # two scans
@pytest.mark.parametrize("overrides", [{"inference.num_cpus": 64}, {"decode.num_cpus": 64},
                                       {"inference.concurrency": 8, "inference.wait_for_actors_s": 100_000}])
def test_resources_this_machines_ray_cannot_hold_are_refused_not_waited_for(tmp_path, ray_local, scan_config,
                                                                             monkeypatch, overrides):
    """Each of these ran until it was killed (the decode tasks or the actors could never be scheduled)."""
    from dogbreed.scan.plan import ScanRefused

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ScanRefused, match=r"need [\d.]+ CPUs, but this machine's Ray has 2"):
        run_scan(scan_config([SAMPLES], tmp_path / "out", **overrides))
    assert readers.manifests(tmp_path / "out") == []  # nothing committed


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_dtypes_do_not_drift_between_runs(tmp_path, ray_local, scan_config):
    out = tmp_path / "out"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cup.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    run_scan(scan_config([tmp_path / "a"], out))
    first = readers.read_all(out).dtypes
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8garbage")  # a run of only an error row
    s = run_scan(scan_config([tmp_path / "a"], out))
    assert s.counts == {"error": 1} and s.exit_code == 3
    both = readers.read_all(out)
    assert len(both) == 2 and both.dtypes.equals(first)
    assert str(both["width"].dtype) == "Int32"


@pytest.mark.slow
@pytest.mark.shared_data
def test_scan_of_all_shared_photos_gives_one_right_row_per_file(tmp_path, shared_data, ray_local, scan_config):
    out = tmp_path / "out"
    summary = run_scan(scan_config([shared_data], out, **{"decode.batch_size": 16, "inference.batch_size": 32}))
    df = readers.latest(out)
    labels = pd.read_csv(shared_data / "labels.csv")
    labels["path"] = [str(shared_data.resolve() / f) for f in labels["file"]]  # rows carry the real path of a root
    m = labels.merge(df, on="path", how="left", validate="one_to_one")
    assert m["status"].notna().all() and len(df) == summary.listed  # every file found has exactly one row
    rate = lambda cat, ok: m[m["category"] == cat]["status"].isin(ok).mean()  # noqa: E731
    assert rate("dog", ["dog", "dog_and_human"]) >= 0.97
    assert rate("human", ["human"]) >= 0.95
    assert rate("other", ["neither"]) >= 0.95


def test_ray_starts_beside_a_first_listing_and_not_at_all_for_an_unchanged_rerun(tmp_path, scan_config, monkeypatch):
    """A first run lists and plans in a thread while Ray starts in the main thread, and stops the Ray it started;
    a re-run with nothing to decode starts no Ray. (Text files need no Ray to be recorded as skipped.)"""
    import threading

    from dogbreed.scan import job

    calls, real_plan = [], job._plan

    def fake_start(address):
        calls.append(("start", threading.current_thread().name))
        return lambda: calls.append(("stop", threading.current_thread().name))

    def plan_spy(*args):
        calls.append(("plan", threading.current_thread().name))
        return real_plan(*args)

    monkeypatch.setattr(job, "start_ray", fake_start)
    monkeypatch.setattr(job, "_plan", plan_spy)
    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "photos" / f"notes{i}.txt").write_text("not a photo")
    cfg = scan_config([tmp_path / "photos"], tmp_path / "out")
    first = run_scan(cfg)
    assert first.counts == {"skipped": 3}
    assert sorted(calls) == [("plan", "dogbreed-plan_0"), ("start", "MainThread"), ("stop", "MainThread")]
    calls.clear()
    again = run_scan(cfg)
    assert again.unchanged == 3 and calls == [("plan", "MainThread")]
