"""GPU readiness (issue 13, `dogbreed bench --mode gpu`): the scan against its decode and model bounds on one node.

On the same 12-MP and small JPEGs, in one run: the decode bound on the GPU (``decode.device: accelerator``) and on
the CPU (all cores), the model bound (backbone + faces, one actor), the scan end to end, the ratio of the scan to
min(decode bound, model bound), GPU utilisation and CPU use sampled through each measurement, and where the time
goes. Without CUDA it says so and measures the CPU figures only. No target is asserted in tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogbreed.bench.memory import Sampling
from dogbreed.bench.photos import find_sources, make_photos
from dogbreed.bench.speed import Measure, ray_shutdown, ray_startup, scan
from dogbreed.bench.workdir import claim
from dogbreed.config import ScanConfig

TARGET = 0.90  # issue 13: the scan reaches 90% of min(decode bound, model bound)
NO_CUDA = "No CUDA device here: the GPU figures (GPU decode bound, GPU utilisation) are not measured; CPU figures follow."


# ------------------------------------------------------------------------------ utilisation sampling
def gpu_reader() -> Callable[[], float | None] | None:
    """A function returning the GPU's utilisation in percent now (torch/pynvml, else nvidia-smi), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.utilization()
        return lambda: float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - pynvml missing: ask nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return lambda: None

    def smi() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    return smi


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat; (0, 0) where there is none."""
    try:
        with open("/proc/stat") as f:
            values = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Usage:
    """GPU utilisation (percent, sampled) and CPU use (cores busy on average) over one measurement."""

    gpu_mean: float | None = None
    gpu_max: float | None = None
    cpu_cores: float | None = None
    samples: int = 0


class Sampler(Sampling):
    """Samples the GPU reader every `interval` seconds in a thread and the machine's CPU ticks at both ends."""

    def __init__(self, reader: Callable[[], float | None] | None, cores: int, interval: float = 0.2,
                 ticks: Callable[[], tuple[float, float]] = cpu_ticks):
        self.reader, self.cores, self.every, self.ticks = reader, cores, interval, ticks
        self.values: list[float] = []
        self.usage = Usage()

    def _sample(self) -> None:
        v = self.reader() if self.reader else None
        if v is not None:
            self.values.append(v)

    def __enter__(self) -> "Sampler":
        self._t0 = self.ticks()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        (b0, t0), (b1, t1) = self._t0, self.ticks()
        cores = self.cores * (b1 - b0) / (t1 - t0) if t1 > t0 else None
        v = self.values
        self.usage = Usage(float(np.mean(v)) if v else None, float(max(v)) if v else None, cores, len(v))


# ------------------------------------------------------------------------------------ measurements
def _cpu_decode(args: tuple) -> int:
    """One photo through the CPU path's decode (read, reduced decode, model crop, face copy), in a pool process."""
    from dogbreed.vision.decode import decode, read_bytes

    path, geometry, max_bytes, max_pixels = args
    decode(read_bytes(path, max_bytes), geometry, max_pixels)
    return 1


def _ship(args: tuple) -> int:
    """One photo through what decode tasks do with decode.device accelerator: read, fingerprint, JPEG header."""
    from dogbreed.vision.decode import fingerprint_of_bytes, jpeg_header, read_bytes

    path, max_bytes, max_pixels = args
    data = read_bytes(path, max_bytes)
    fingerprint_of_bytes(data)
    return int(jpeg_header(data, max_pixels) is not None)


def all_cores(name: str, fn: Callable[[tuple], int], items: list[tuple], cores: int) -> Measure:
    """fn over items in a pool of `cores` processes (started before the clock), as the scan's decode tasks would."""
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(fn, items[:cores]))  # start and warm every process
        t = time.perf_counter()
        done = sum(pool.map(fn, items, chunksize=max(1, len(items) // (4 * cores))))
        seconds = time.perf_counter() - t
    return Measure(f"{name} ({cores} cores; {done} of {len(items)})", len(items), seconds, {name: seconds})


def device_decode(paths: list[Path], cfg: ScanConfig, prep, device: str) -> tuple[Measure, dict]:
    """DeviceDecoder on `device`, batches of inference.batch_size, bytes already in memory: decode + orient + resize
    + face copy (the faces it also finds are timed apart and excluded from this bound)."""
    from dogbreed.vision.device_decode import DeviceDecoder, JpegShipper

    b = cfg.inference.batch_size
    shipper = JpegShipper(prep, cfg.face, cfg.photos)
    listed = lambda ps: {"path": np.array([str(p) for p in ps], dtype=object)}  # noqa: E731
    batches = [shipper(listed(paths[i:i + b])) for i in range(0, len(paths), b)]
    shipper.close()
    dd = DeviceDecoder(prep, cfg.face, cfg.photos, device=device, face_threads=max(1, int(cfg.inference.num_cpus)))
    dd(batches[0])  # warm-up: CUDA context, nvJPEG handles, cuDNN
    dd.seconds.clear()
    for batch in batches:
        dd(batch)
    stages = dict(dd.seconds)
    faces = stages.pop("faces", 0.0)
    dd.close()
    return Measure(f"decode on {device} (batches of {b})", len(paths), sum(stages.values()), stages), {"faces": faces}


def model_bound(decoded: list, cfg: ScanConfig, predictor) -> Measure:
    """One actor's per-photo work after decoding: Haar faces (inference.num_cpus threads) and the batched backbone."""
    import cv2

    from dogbreed.vision import faces

    b, threads = cfg.inference.batch_size, max(1, int(cfg.inference.num_cpus))
    crops = np.stack([d.model_input for d in decoded])
    predictor._forward(crops[:b])  # warm-up
    faces.load_face_detector(cfg.face)
    saved = cv2.getNumThreads()
    cv2.setNumThreads(threads)  # as DeviceDecoder sets it in the actor
    try:
        t = time.perf_counter()
        for d in decoded:
            faces.detect_faces(d.small, d.small_to_full, cfg.face)
        t_faces = time.perf_counter()
        for i in range(0, len(crops), b):
            predictor._forward(crops[i:i + b])
        t_end = time.perf_counter()
    finally:
        cv2.setNumThreads(saved)
    return Measure(f"model: backbone + faces ({threads} OpenCV threads)", len(decoded), t_end - t,
                   {"faces": t_faces - t, "backbone": t_end - t_faces})


def agreement(paths: list[Path], cfg: ScanConfig, prep, predictor, device: str) -> dict[str, float]:
    """The device path's rows against the CPU path's on the same photos and the same predictor (README figures)."""
    import json

    from dogbreed.vision.device_decode import DeviceDecoder, JpegShipper
    from dogbreed.vision.predictors import Decoder

    cpu_dec, ship = Decoder(prep, cfg.face, cfg.photos), JpegShipper(prep, cfg.face, cfg.photos)
    dd = DeviceDecoder(prep, cfg.face, cfg.photos, device=device)
    same = {"status": 0, "breed": 0, "size": 0, "faces": 0, "error": 0}
    score, box, crop = [0.0], [0.0], []
    for i in range(0, len(paths), cfg.inference.batch_size):
        batch = {"path": np.array([str(p) for p in paths[i:i + cfg.inference.batch_size]], dtype=object)}
        c, d = cpu_dec(batch), dd(ship(batch))
        a, b = predictor(c), predictor(d)
        for j in range(len(batch["path"])):
            same["status"] += a["status"][j] == b["status"][j]
            same["breed"] += a["breed"][j] == b["breed"][j]
            same["size"] += (a["width"][j], a["height"][j]) == (b["width"][j], b["height"][j])
            same["faces"] += a["face_count"][j] == b["face_count"][j]
            same["error"] += a["error"][j] == b["error"][j]
            if a["status"][j] != "error":
                score.append(abs(float(a["dog_score"][j]) - float(b["dog_score"][j])))
                crop.append(float(np.abs(c["image"][j].astype(int) - d["image"][j].cpu().numpy().astype(int)).mean()))
                per_px = max(1.0, max(int(a["width"][j]), int(a["height"][j])) / cfg.photos.face_side)
                box += [float(np.abs(np.subtract(x, y)).max()) / per_px
                        for x, y in zip(json.loads(a["faces"][j]), json.loads(b["faces"][j]))]
    for closing in (cpu_dec, ship, dd):
        closing.close()
    return {"photos": len(paths), **same, "max dog score diff": max(score), "max box diff (face-copy px)": max(box),
            "crop mean abs diff": float(np.mean(crop)) if crop else 0.0, "device fallbacks": dd.fallbacks}


# ------------------------------------------------------------------------------------------- the run
@dataclass
class GpuSize:
    """The figures for one kind of photo."""

    label: str
    measures: dict[str, Measure]  # decode_cpu, ship_cpu, [decode_gpu,] model, scan, [scan_cpu_decode]
    usage: dict[str, Usage] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # the device path's rows vs. the CPU path's

    def rate(self, key: str) -> float:
        return self.measures[key].images_per_s if key in self.measures else float("nan")

    @property
    def decode_bound(self) -> float:
        """With the GPU: min(CPU tasks reading and checking headers, GPU decode); without: the CPU decode."""
        if "decode_gpu" in self.measures:
            return min(self.rate("ship_cpu"), self.rate("decode_gpu"))
        return self.rate("decode_cpu")

    @property
    def model_bound(self) -> float:
        return self.rate("model")

    @property
    def ratio(self) -> float:
        return self.rate("scan") / min(self.decode_bound, self.model_bound)

    @property
    def limit(self) -> str:
        return "decode" if self.decode_bound <= self.model_bound else "model"


@dataclass
class GpuReport:
    device: str
    cuda: bool
    cores: int
    sizes: list[GpuSize]


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def run_gpu_benchmark(workdir: Path, cfg: ScanConfig, n: int = 200, size: tuple[int, int] = (4000, 3000),
                      quality: int = 92, sources: list[Path] | None = None, small: bool = True,
                      log: Callable[[str], None] = print) -> GpuReport:
    """Generate the photos, then measure the bounds and the scan on them, sampling GPU and CPU use throughout."""
    import torch

    from dogbreed.vision.decode import decode, read_bytes
    from dogbreed.vision.models import describe_model
    from dogbreed.vision.predictors import BreedPredictor

    claim(workdir, ["gpu-out"])  # before any work: the scans replace workdir/gpu-out, only if an earlier run made it
    cuda, cores = torch.cuda.is_available(), int(os.cpu_count() or 1)
    if not cuda:
        log(NO_CUDA)
    sources = sources or find_sources(None, log=log)
    prep = describe_model(cfg.model)[0].preprocessing
    reader = gpu_reader()
    kinds = [(f"{size[0]}x{size[1]} JPEG q{quality}", size)] + ([("small (the originals)", None)] if small else [])
    folders = {label: make_photos(sources, workdir / ("gpu-full" if sz else "gpu-small"), n, sz, quality)
               for label, sz in kinds}
    results = {label: GpuSize(label, {}) for label, _ in kinds}

    def timed(label: str, key: str, fn: Callable[..., Measure], *args) -> None:
        with Sampler(reader, cores) as s:
            measure = results[label].measures[key] = fn(*args)
        results[label].usage[key] = s.usage
        # each figure as it comes: a run cut short (a GPU lease's time limit) still leaves what it measured
        log(f"  {label}, {key}: {measure.images_per_s:.1f} images/s ({measure.images} in {measure.seconds:.2f} s)")

    def on(where: str) -> ScanConfig:
        return cfg.model_copy(update={"decode": cfg.decode.model_copy(update={"device": where})})

    ray_startup(cores)
    try:
        warm = workdir / "gpu-warm-up"
        warm.mkdir(parents=True, exist_ok=True)
        for p in folders[kinds[0][0]][:4]:
            shutil.copyfile(p, warm / p.name)
        scan([warm], workdir / "gpu-out", cfg)  # warm-up: worker start-up is not throughput
        for label, _ in kinds:
            root = [folders[label][0].parent]
            log(f"scan: {label}")
            timed(label, "scan", scan, root, workdir / "gpu-out", on("accelerator" if cuda else "cpu"))
            if cuda:  # the same scan with every photo decoded on the CPU, for comparison
                timed(label, "scan_cpu_decode", scan, root, workdir / "gpu-out", on("cpu"))
    finally:
        ray_shutdown()
    predictor = BreedPredictor.for_scan(cfg)
    for label, _ in kinds:
        paths = [str(p) for p in folders[label]]
        log(f"bounds: {label}")
        timed(label, "decode_cpu", all_cores, "CPU decode", _cpu_decode, [
            (p, prep.geometry(cfg.photos.face_side), cfg.photos.max_bytes, cfg.photos.max_pixels) for p in paths], cores)
        timed(label, "ship_cpu", all_cores, "read + JPEG header", _ship, [
            (p, cfg.photos.max_bytes, cfg.photos.max_pixels) for p in paths], cores)
        if cuda:
            timed(label, "decode_gpu", lambda ps: device_decode(ps, cfg, prep, "cuda")[0], folders[label])
        geometry = prep.geometry(cfg.photos.face_side)
        decoded = [decode(read_bytes(p, cfg.photos.max_bytes), geometry, cfg.photos.max_pixels) for p in paths]
        timed(label, "model", model_bound, decoded, cfg, predictor)
        results[label].agreement = agreement(folders[label][:64], cfg, prep, predictor, "cuda" if cuda else "cpu")
    return GpuReport(_device_name(), cuda, cores, [results[label] for label, _ in kinds])


_ROWS = [("decode_gpu", "decode bound, GPU: nvJPEG batch + orient + resize + face copy"),
         ("ship_cpu", "decode tasks with decode.device accelerator: read + JPEG header"),
         ("decode_cpu", "decode bound, CPU: the CPU path's decode on every core"),
         ("model", "model bound: backbone + faces, one actor"),
         ("scan", "scan end to end"),
         ("scan_cpu_decode", "scan end to end, decode.device cpu (for comparison)")]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def format_gpu_report(report: GpuReport) -> str:
    """The figures as plain text, one table per kind of photo."""
    lines = [f"device: {report.device}; {report.cores} CPU cores"]
    if not report.cuda:
        lines.append(NO_CUDA)
    for r in report.sizes:
        lines += ["", f"{r.label}:",
                  f"  {'measurement':<66}{'photos':>7}{'seconds':>9}{'images/s':>10}{'GPU mean/max':>14}{'CPU cores':>10}"
                  "  where the time goes (s)"]
        for key, title in _ROWS:
            if key not in r.measures:
                continue
            m, u = r.measures[key], r.usage.get(key, Usage())
            gpu = f"{_pct(u.gpu_mean)}/{_pct(u.gpu_max)}"
            cpu = "-" if u.cpu_cores is None else f"{u.cpu_cores:.1f}"
            where = ", ".join(f"{k} {v:.1f}" for k, v in m.stages.items())
            lines.append(f"  {title:<66}{m.images:>7}{m.seconds:>9.1f}{m.images_per_s:>10.1f}{gpu:>14}{cpu:>10}  {where}")
        lines += [f"  decode bound {r.decode_bound:.1f} images/s, model bound {r.model_bound:.1f} images/s: "
                  f"the {r.limit} side sets the pace",
                  f"  scan / min(decode bound, model bound) = {r.ratio:.2f} "
                  f"(target >= {TARGET:.2f}: {'met' if r.ratio >= TARGET else 'MISSED'}"
                  + ("" if report.cuda else "; on CPU the bounds share the same cores, so this is not the GPU target") + ")"]
        if r.agreement:
            g = r.agreement
            n = int(g["photos"])
            lines.append(f"  device path vs. CPU path ({'cuda' if report.cuda else 'device=cpu'}), {n} photos: statuses "
                         f"{g['status']}/{n}, top-1 breeds {g['breed']}/{n}, sizes {g['size']}/{n}, face counts "
                         f"{g['faces']}/{n}, errors {g['error']}/{n}; max |dog score diff| {g['max dog score diff']:.4f}, "
                         f"face boxes within {g['max box diff (face-copy px)']:.1f} px of the face copy, crop mean "
                         f"|diff| {g['crop mean abs diff']:.2f}; {g['device fallbacks']} sent to the CPU decoder")
    return "\n".join(lines)
