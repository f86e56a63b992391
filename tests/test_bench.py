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


# ------------------------------------------------------------------ what bench may delete, and its options
class _Started(Exception):
    """Raised where the real work would begin: a test that reaches it was not refused up front."""


def _no_work(*args, **kwargs):
    raise _Started("the benchmark started its work")


@pytest.fixture
def stubbed(monkeypatch):
    """The heavy steps stubbed out: a run that is not refused up front stops at the first of them (exit 1)."""
    from dogbreed.bench import archive, vectors

    monkeypatch.setattr(vectors, "real_vectors", _no_work)
    monkeypatch.setattr(archive, "_dry_run", _no_work)


def _bench(*args: str):
    from typer.testing import CliRunner

    from dogbreed.cli import app

    return CliRunner().invoke(app, ["bench", *args])


@pytest.mark.parametrize("mode, folder", [("similar", "similar-20"), ("archive", "out-20-dry"), ("archive", "archive-20")])
def test_bench_refuses_to_delete_a_folder_it_did_not_make(tmp_path, stubbed, mode, folder):
    wd = tmp_path / "wd"
    (wd / folder).mkdir(parents=True)
    (wd / folder / "precious.txt").write_text("notes")
    r = _bench("--mode", mode, "--rows", "20", "--files", "20", "--workdir", str(wd))
    assert (wd / folder / "precious.txt").read_text() == "notes", "bench deleted a folder it had not made"
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()  # one sentence, before any work
    assert line.startswith("error: ") and str(wd / folder) in line, r.output


def test_speed_scan_replaces_only_an_output_it_made(tmp_path, monkeypatch):
    from dogbreed.errors import UsageError
    from dogbreed.scan import job

    monkeypatch.setattr(job, "run_scan", _no_work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("notes")
    with pytest.raises(UsageError, match=str(out)):
        bench.scan([tmp_path], out, None)
    assert (out / "precious.txt").read_text() == "notes"


@pytest.mark.parametrize("args, named", [
    (["--mode", "similar", "--rows", "10"], "--rows"), (["--mode", "similar", "--rows", "abc"], "--rows"),
    (["--mode", "similar", "--rows", "20,1000000000000"], "--rows"),
    (["--mode", "similar", "--rows", ""], "--rows"), (["--mode", "archive", "--files", "abc"], "--files"),
    (["--mode", "archive", "--files", "1e3"], "--files"), (["--mode", "archive", "--files", "0"], "--files"),
    (["--mode", "archive", "--files", "-5"], "--files"), (["--mode", "archive", "--files", ""], "--files"),
    (["--mode", "archive", "--files", "10,,x"], "--files"), (["--mode", "similar", "--data", "/nonexistent"], "/nonexistent"),
    (["--mode", "archive", "--data", "/nonexistent"], "/nonexistent")])
def test_bad_bench_options_are_one_sentence_before_any_work(tmp_path, stubbed, args, named):
    r = _bench(*args, "--workdir", str(tmp_path / "wd"))
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()  # one sentence, before any work
    assert line.startswith("error: ") and named in line, r.output


def test_workdir_folders_are_replaced_only_when_marked(tmp_path):
    from dogbreed.bench import workdir
    from dogbreed.errors import UsageError

    made = workdir.fresh(tmp_path / "wd" / "similar-20")
    (made / "table").mkdir()
    assert (made / workdir.MARKER).is_file()
    assert workdir.fresh(made) == made and [p.name for p in made.iterdir()] == [workdir.MARKER]  # replaced, empty
    workdir.remove(made)
    assert not made.exists()
    workdir.remove(made)  # nothing there: nothing to do
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("notes")
    link = tmp_path / "wd" / "out"
    link.symlink_to(workdir.fresh(tmp_path / "marked"))  # a link to a marked folder is not the benchmark's folder
    for folder in (theirs, link):
        with pytest.raises(UsageError, match="not made by dogbreed bench"):
            workdir.fresh(folder)
        with pytest.raises(UsageError, match=str(folder)):
            workdir.claim(folder.parent, [folder.name])
        workdir.tidy(folder)
    assert (theirs / "precious.txt").read_text() == "notes" and (tmp_path / "marked" / workdir.MARKER).is_file()
    with pytest.raises(UsageError, match="is a file"):
        workdir.claim(theirs / "precious.txt", ["out"])


@pytest.mark.parametrize("text, sizes", [("2000,10_000", [2000, 10000]), (" 20 , 30", [20, 30]), ("20", [20])])
def test_size_lists(text, sizes):
    from dogbreed.bench.workdir import parse_sizes

    assert parse_sizes(text, "--rows", 20) == sizes


@pytest.mark.parametrize("text", ["19", "1e3", "abc", "", "20,", "-20", "²⁰", "3000000"])
def test_bad_size_lists_are_one_sentence(text):
    from dogbreed.bench.workdir import parse_sizes
    from dogbreed.errors import UsageError

    with pytest.raises(UsageError, match=r"--files .*: give comma-separated whole numbers, each at least 20 and at most"):
        parse_sizes(text, "--files", 20, 2_000_000)


@pytest.mark.parametrize("mode, runner", [("gpu", "dogbreed.bench.gpu.run_gpu_benchmark"),
                                          ("speed", "dogbreed.bench.speed.run_benchmark")])
def test_the_benchmarks_get_the_face_detector_that_will_really_run(tmp_path, monkeypatch, mode, runner):
    """On the GPU machine (CPython 3.12: no yuface wheel) the scans fell back to haar, and then the stage bounds,
    which load the configured detector directly, failed: 'face.detector yunet: the yuface package is not installed'."""
    import importlib

    from dogbreed.vision import faces

    monkeypatch.setattr(faces, "_yuface", lambda: None)
    seen = {}

    def record(workdir, cfg, **kwargs):
        seen["detector"] = cfg.face.detector
        raise SystemExit(0)

    module, name = runner.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, record)
    _bench("--mode", mode, "--workdir", str(tmp_path / "wd"))
    assert seen == {"detector": "haar"}
