"""The speed benchmark produces every figure on a few tiny photos; no timing is asserted (targets live in the benchmark)."""

import math

import pytest
from PIL import Image

from dogbreed.bench import photos, speed_report
from dogbreed.bench import speed as bench

KEYS = ("classic", "scan_cold", "scan_n", "scan_3n", "scan_3n_with_1", "scan_3n_plain_1", "scan_3n_plain_2", "scan_3n_with_2", "decode", "faces", "decode_before", "faces_before", "model_1", "model_all", "in_process", "vectors")


def test_make_photos_scales_crops_and_keeps_existing_files(tmp_path, write_photo):
    sources = [write_photo(tmp_path / "src" / f"s{i}.png", seed=i, size=(40, 30 + 10 * i)) for i in range(2)]
    paths = photos.make_photos(sources, tmp_path / "full", 3, size=(64, 48))
    assert [Image.open(p).size for p in paths] == [(64, 48)] * 3
    assert paths[2].name.endswith("_s0.jpg")  # sources are taken in turn
    stamp = paths[0].stat().st_mtime_ns
    assert photos.make_photos(sources, tmp_path / "full", 3, size=(64, 48)) == paths
    assert paths[0].stat().st_mtime_ns == stamp  # a re-run does not regenerate


@pytest.mark.slow  # the whole speed benchmark on tiny photos
def test_benchmark_produces_every_figure(tmp_path, write_photo, scan_config):
    sources = [write_photo(tmp_path / "src" / f"s{i}.jpg", seed=i) for i in range(3)]
    cfg = scan_config([], tmp_path / "unused")
    report = bench.run_benchmark(tmp_path / "work", cfg, n=2, classic_n=2, size=(320, 240), sources=sources,
                                 small=False, vector_runs=2, log=lambda line: None)
    assert report.ray_start_s > 0 and report.ray_stop_s > 0 and report.ray_workers_s >= 0 and report.load
    (r,) = report.sizes
    for key in KEYS:
        m = r.measures[key]
        assert m.images > 0 and m.seconds > 0 and m.images_per_s > 0 and m.stages, key
        assert all(v >= 0 for v in m.stages.values()), key
    assert (r.measures["scan_n"].images, r.measures["scan_3n"].images) == (2, 6)
    for key in ("scan_cold", "scan_n", "scan_3n", "scan_3n_with_1", "scan_3n_plain_1", "scan_3n_plain_2", "scan_3n_with_2"):
        cpu = r.measures[key].stages  # CPU seconds of each kind of process, read from /proc
        assert cpu["actor cpu"] > 0 and cpu["driver cpu"] > 0 and min(cpu.values()) >= 0, cpu
        assert all(r.measures[key].peak_rss_mb[k] > 0 for k in ("driver", "actor", "decode worker", "decode child"))
    scan = r.rate("scan_3n")
    assert set(r.ratios()) >= {"scan / classic", "scan / in-process", "scan / best bound"}
    assert r.best_bound >= max(r.rate("in_process"), r.ideal_bound)
    assert 0 < r.scan_with_startup < scan and math.isfinite(r.ideal_bound)
    stages = ("decode", "faces", "model_1", "decode_before", "faces_before", "model_torch")
    assert all(r.measures[k].cpu_seconds is not None and r.measures[k].cpu_seconds >= 0 for k in stages)
    assert r.bound_before is not None and math.isfinite(r.bound_before)  # the round before's bound, re-measured
    assert r.vector_runs == 2 and math.isfinite(r.vector_cost()) and math.isfinite(r.vector_cost(cpu=True))
    extra = r.measures["vectors"].stages  # timings of two photos: only their presence and sign are certain
    assert set(extra) == {"actor", "block", "driver"} and min(extra.values()) >= 0 and 0 <= r.vector_share < 1
    text = speed_report.format_report(report)
    for key, title in speed_report._ROWS:
        assert (title in text) == (key in r.measures), key  # a row for every measure made, none for one not made
    assert "storing embeddings costs" in text and "best of 2 runs each" in text
    assert "of the round before (640-px face copy, eager torch), measured now" in text
