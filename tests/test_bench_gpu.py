"""`dogbreed bench --mode gpu`: bounds, ratio and report on fake measurements, the samplers, and one real tiny run.

No timing is asserted: the 90% target is the benchmark's to check on a GPU machine, never a test's.
"""

import pytest

from dogbreed.bench import gpu
from dogbreed.bench.speed import Measure


def _size(with_gpu: bool) -> gpu.GpuSize:
    m = {"ship_cpu": Measure("ship", 600, 1.0), "decode_cpu": Measure("cpu", 100, 1.0),
         "model": Measure("model", 500, 1.0, {"faces": 0.7, "backbone": 0.3}), "scan": Measure("scan", 460, 1.0)}
    if with_gpu:
        m["decode_gpu"] = Measure("gpu", 800, 1.0, {"decode": 0.6, "resize": 0.4})
    return gpu.GpuSize("12-MP", m, {"scan": gpu.Usage(85.0, 99.0, 3.5, 40)})


def test_bounds_ratio_and_report_with_a_gpu():
    r = _size(with_gpu=True)
    assert r.decode_bound == 600  # the CPU tasks reading and checking headers are slower than the GPU decode
    assert r.model_bound == 500 and r.limit == "model"
    assert r.ratio == pytest.approx(460 / 500)
    text = gpu.format_gpu_report(gpu.GpuReport("NVIDIA H200", True, 16, [r]))
    assert "device: NVIDIA H200; 16 CPU cores" in text and gpu.NO_CUDA not in text
    assert "scan / min(decode bound, model bound) = 0.92 (target >= 0.90: met)" in text
    assert "85%/99%" in text and "3.5" in text and "faces 0.7, backbone 0.3" in text
    for key, title in gpu._ROWS:
        assert (title in text) == (key in r.measures), key


def test_without_cuda_the_report_says_so_and_uses_the_cpu_decode_bound():
    r = _size(with_gpu=False)
    assert r.decode_bound == 100 and r.limit == "decode" and r.ratio == pytest.approx(4.6)
    text = gpu.format_gpu_report(gpu.GpuReport("no CUDA device", False, 2, [r]))
    assert gpu.NO_CUDA in text and "not the GPU target" in text
    assert gpu._ROWS[0][1] not in text and "-/-" in text  # no GPU readings: shown as "-", never as 0%


def test_sampler_averages_the_readings_and_counts_busy_cores():
    readings = iter([50.0, None, 70.0] + [90.0] * 1000)
    ticks = iter([(100.0, 1000.0), (400.0, 1600.0)])  # 300 of 600 ticks busy: half of 4 cores
    with gpu.Sampler(lambda: next(readings), cores=4, interval=0.01, ticks=lambda: next(ticks)) as s:
        while len(s.values) < 3:
            pass
    u = s.usage
    assert u.samples >= 3 and u.gpu_mean >= 50.0 and u.gpu_max >= 70.0 and u.cpu_cores == pytest.approx(2.0)
    with gpu.Sampler(None, cores=4, interval=0.01) as s:
        pass
    assert s.usage.gpu_mean is None and s.usage.samples == 0


def test_cpu_ticks_and_no_gpu_reader_here():
    busy, total = gpu.cpu_ticks()
    assert 0 < busy <= total
    import torch

    assert (gpu.gpu_reader() is None) == (not torch.cuda.is_available())


def test_decode_tasks_bound_runs_on_every_core(tmp_path, write_photo):
    paths = [str(write_photo(tmp_path / f"p{i}.jpg", seed=i)) for i in range(4)] + [str(write_photo(tmp_path / "q.png", 9))]
    m = gpu.all_cores("read + JPEG header", gpu._ship, [(p, 10**8, 10**8) for p in paths], cores=2)
    assert m.images == 5 and m.seconds > 0 and "(2 cores; 4 of 5)" in m.name  # the PNG keeps the CPU path


@pytest.mark.slow  # a local Ray and three scans of tiny photos
def test_gpu_benchmark_runs_on_cpu_and_produces_every_cpu_figure(tmp_path, write_photo, scan_config):
    sources = [write_photo(tmp_path / "src" / f"s{i}.jpg", seed=i) for i in range(3)]
    lines = []
    report = gpu.run_gpu_benchmark(tmp_path / "work", scan_config([], tmp_path / "unused"), n=3, size=(320, 240),
                                   sources=sources, small=False, log=lines.append)
    (r,) = report.sizes
    assert not report.cuda and gpu.NO_CUDA in lines
    # each figure is logged as it is measured: a run cut short by a GPU lease's limit still leaves them
    assert [line.split(":")[0] for line in lines if "images/s (3 in" in line] == [
        f"  320x240 JPEG q92, {key}" for key in ("scan", "decode_cpu", "ship_cpu", "model")]
    assert set(r.measures) == {"scan", "decode_cpu", "ship_cpu", "model"}
    assert all(m.images == 3 and m.seconds > 0 for m in r.measures.values())
    assert r.usage["scan"].cpu_cores is not None and r.ratio > 0
    assert r.measures["scan"].stages["actor cpu"] > 0  # CPU seconds per kind of process, read from /proc
    assert r.agreement["photos"] == 3 and r.agreement["status"] == 3 and r.agreement["size"] == 3
    assert r.agreement["device fallbacks"] == 0 and r.agreement["max dog score diff"] <= 0.02
    text = gpu.format_gpu_report(report)
    assert "scan / min(decode bound, model bound)" in text and "device path vs. CPU path (device=cpu), 3 photos" in text
