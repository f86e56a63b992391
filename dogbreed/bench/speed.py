"""Speed benchmark: the classic dog-app loop, the scan end to end and the stage bounds, on the same photos.

Each measurement is one function returning a :class:`Measure`; :func:`run_benchmark` runs them all in one go on
generated full-size JPEGs (real photos upscaled) and on the original small photos, and :func:`format_report`
prints the figures and whether the targets hold. Performance targets are checked here, never in timed tests.
Where a scan's time goes is read from the processes themselves (CPU seconds per kind of process, from /proc).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogbreed.bench.memory import Clock, PeakMemory
from dogbreed.bench.photos import find_sources, make_photos
from dogbreed.bench.vectors import storing_cost
from dogbreed.bench.workdir import claim, fresh
from dogbreed.cluster.session import start_ray
from dogbreed.config import PhotoConfig, ScanConfig
from dogbreed.vision.decode import decode, read_bytes
from dogbreed.vision.geometry import Geometry

CLASSIC_CASCADE = "haarcascade_frontalface_default.xml"  # what the dog-app used
SMALL_CLASSIC_FACTOR = 8  # the classic loop runs on this many times --classic small photos (12 s of 12-MP ones: 0.6 s)
BEFORE_FACE_SIDE = 640  # the face copy of the round before OpenVINO and the 480-px copy: its bound is re-measured in each run


@dataclass
class Measure:
    """One throughput figure: images over seconds, where the time went, and peak memory where measured."""

    name: str
    images: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (summed over workers for the scan)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # "driver", "actor", "decode worker", "decode child"
    cpu_seconds: float | None = None  # this process's CPU time, for the stages measured in it (what a bound is made of)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_photo(self) -> float:
        """CPU seconds per photo where measured (else wall seconds): on a shared machine other processes' load
        stretches the wall clock but not the work itself."""
        return (self.cpu_seconds if self.cpu_seconds is not None else self.seconds) / max(self.images, 1)


# ------------------------------------------------------------------------------------ measurements
def classic_loop(paths: list[Path], model: str = "default") -> Measure:
    """The dog-app loop: full PIL decode, default Haar cascade on the full-size gray image, then batch-of-one
    forward passes, one for the dog detector and another for the breed (each with its own preprocessing)."""
    import cv2
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from dogbreed.breeds import taxonomy
    from dogbreed.vision.models import load_model

    loaded = load_model(model)
    net, prep = loaded.net.eval(), loaded.spec.preprocessing
    guards = PhotoConfig()
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, CLASSIC_CASCADE))
    to_tensor = T.Compose([T.Resize(prep.geometry().scale_size), T.CenterCrop(prep.input_size), T.ToTensor(),
                           T.Normalize(prep.mean, prep.std)])
    dogs = taxonomy.dog_class_indices(False)
    stages = {"decode": 0.0, "faces": 0.0, "model": 0.0}
    dogs_seen = 0
    t_all = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        # full size, as the app decoded it
        rgb = Image.fromarray(decode(read_bytes(str(path), guards.max_bytes), Geometry.copy(), guards.max_pixels).small)
        t1 = time.perf_counter()
        cascade.detectMultiScale(cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2GRAY))
        t2 = time.perf_counter()
        with torch.no_grad():  # each detector preprocesses the photo itself, as the app's functions did
            imagenet, _ = net(to_tensor(rgb).unsqueeze(0))  # dog detector: is the top class a dog?
            dogs_seen += dogs[0] <= int(imagenet.argmax()) <= dogs[-1]
            net(to_tensor(rgb).unsqueeze(0))  # breed classifier: a second batch-of-one pass, for every photo
        stages["decode"] += t1 - t0
        stages["faces"] += t2 - t1
        stages["model"] += time.perf_counter() - t2
    return Measure(f"classic loop ({dogs_seen} dogs)", len(paths), time.perf_counter() - t_all, stages)


@dataclass
class _Threads:
    """Pin torch's and OpenCV's thread pools for one measurement, then restore them."""
    n: int | None

    def __enter__(self) -> None:
        import cv2
        import torch

        self._libs, self._saved = (torch, cv2), (torch.get_num_threads(), cv2.getNumThreads())
        if self.n:
            torch.set_num_threads(self.n)
            cv2.setNumThreads(self.n)

    def __exit__(self, *exc) -> None:
        self._libs[0].set_num_threads(self._saved[0])
        self._libs[1].setNumThreads(self._saved[1])


def decode_only(paths: list[Path], cfg: ScanConfig) -> tuple[Measure, list]:
    """Read + reduced decode + model crop + face copy, one photo at a time on one core; also returns the decoded photos."""
    from dogbreed.vision.models import describe_model

    prep = describe_model(cfg.model)[0].preprocessing
    with _Threads(1), Clock() as clock:
        geometry = prep.geometry(cfg.photos.face_side)
        decoded = [decode(read_bytes(str(p), cfg.photos.max_bytes), geometry, cfg.photos.max_pixels) for p in paths]
    return Measure(f"decode only (1 core, {cfg.photos.face_side}-px face copy)", len(paths), clock.seconds,
                   {"decode": clock.seconds}, cpu_seconds=clock.cpu), decoded


def faces_only(decoded: list, cfg: ScanConfig, detector: str | None = None) -> Measure:
    """The configured face detector (or `detector`) on the decoded small copies, on one core, as in a decode task."""
    from dogbreed.vision import faces

    face = cfg.face if detector is None else cfg.face.model_copy(update={"detector": detector})
    with _Threads(1):  # also torch's: with torch loaded, YuNet's OpenMP threads are torch's (30x slower unpinned)
        faces.load_face_detector(face)
        with Clock() as clock:
            for d in decoded:
                faces.detect_faces(d.small, d.small_to_full, face)
    return Measure(f"faces only, {faces.active_detector(face)} (1 core)", len(decoded), clock.seconds,
                   {"faces": clock.seconds}, cpu_seconds=clock.cpu)


def model_only(decoded: list, cfg: ScanConfig, predictor, threads: int | None) -> Measure:
    """BreedPredictor's batched forward pass on the 224-px crops (threads None = the library default)."""
    crops = np.stack([d.model_input for d in decoded])
    b = cfg.inference.batch_size
    with _Threads(threads):
        predictor._forward(crops[:b])  # warm-up: first-call allocations are not throughput
        with Clock() as clock:
            for i in range(0, len(crops), b):
                predictor._forward(crops[i:i + b])
    label = f"{threads} core" + ("s" if threads and threads > 1 else "") if threads else "all cores"
    return Measure(f"model only ({label})", len(crops), clock.seconds, {"model": clock.seconds},
                   cpu_seconds=clock.cpu if threads == 1 else None)


def in_process(paths: list[Path], cfg: ScanConfig, predictor) -> Measure:
    """The in-process stage bound: the scan's own Decoder and BreedPredictor in one loop in this process (reduced
    decode, Haar on the small copy, one batched pass per inference batch), libraries at their default threads."""
    from dogbreed.evaluation.breeds import listed
    from dogbreed.vision.predictors import Decoder

    decoder = Decoder(predictor.spec.preprocessing, cfg.face, cfg.photos)
    b = cfg.inference.batch_size
    stages = {"decode+faces": 0.0, "model": 0.0}
    t_all = time.perf_counter()
    for i in range(0, len(paths), b):
        chunk = [str(p) for p in paths[i:i + b]]
        t0 = time.perf_counter()
        batch = decoder(listed(chunk))
        t1 = time.perf_counter()
        predictor(batch)
        stages["decode+faces"] += t1 - t0
        stages["model"] += time.perf_counter() - t1
    return Measure("in-process loop", len(paths), time.perf_counter() - t_all, stages)


def ray_startup(num_cpus: int | None = None) -> float:
    """Seconds to start a private local Ray (it stays up for the scans; ray_shutdown() times the other end)."""
    import ray
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; the benchmark times its own local Ray")
    t = time.perf_counter()
    start_ray("local", num_cpus=num_cpus or os.cpu_count())
    return time.perf_counter() - t


def ray_shutdown() -> float:
    import ray
    t = time.perf_counter()
    ray.shutdown()
    return time.perf_counter() - t


def scan(roots: list[Path], out: Path, cfg: ScanConfig) -> Measure:
    """run_scan end to end on a fresh table in `out` (replaced only if the benchmark made it), in the Ray already started
    (images/s excludes Ray's startup); stages: CPU seconds per kind of process (driver, actor, decode workers, children)."""
    from dogbreed.scan.job import run_scan

    table = fresh(out) / "table"  # the table beside nothing else: the scan writes only to a folder of its own
    cfg = cfg.model_copy(update={"roots": [str(r) for r in roots], "out": str(table), "mode": "missing"})
    with PeakMemory() as mem:
        t = time.perf_counter()
        summary = run_scan(cfg)
        seconds = time.perf_counter() - t
    if summary.counts.get("error", 0):
        raise RuntimeError(f"benchmark scan had errors: {summary.line()}")
    stages = {f"{kind} cpu": round(cpu, 2) for kind, cpu in mem.cpu_s.items()}
    return Measure(f"scan of {summary.processed}", summary.processed, seconds, stages, dict(mem.peaks))


# ------------------------------------------------------------------------------------------- the run
@dataclass
class SizeResult:
    """Every figure for one kind of photo (12-MP or the small originals)."""

    label: str
    mean_mb: float
    measures: dict[str, Measure]  # classic, [scan_cold,] scan_n, scan_3n, decode, faces, model_1, model_all, in_process
    ray_overhead_s: float  # Ray start + stop + first-scan worker start-up, charged to the "with startup" figure
    cores: int

    def rate(self, key: str) -> float:
        return self.measures[key].images_per_s

    @property
    def scan_with_startup(self) -> float:
        m = self.measures["scan_3n"]
        return m.images / (m.seconds + self.ray_overhead_s)

    @property
    def scan_marginal(self) -> float:
        """images/s between the two archive sizes: the scan's steady rate, without its fixed costs."""
        a, b = self.measures["scan_n"], self.measures["scan_3n"]
        return (b.images - a.images) / (b.seconds - a.seconds) if b.seconds > a.seconds else float("inf")

    @property
    def ideal_bound(self) -> float:
        """All cores busy on the per-photo work with no overhead: cores / (decode + faces + model CPU s per photo, 1 core)."""
        return self.bound_with("model_1")

    def bound_with(self, model_key: str, decode_key: str = "decode", faces_key: str = "faces") -> float:
        """The ideal bound with these measures for the stages (model_torch: eager torch's model; decode_before and
        faces_before: the earlier 640-px face copy)."""
        return self.cores / sum(self.measures[k].cpu_per_photo for k in (decode_key, faces_key, model_key))

    @property
    def bound_before(self) -> float | None:
        """The ideal bound of the round before (640-px face copy, eager torch), re-measured in this run; None where
        this run did not measure it."""
        if not all(k in self.measures for k in ("decode_before", "faces_before", "model_torch")):
            return None
        return self.bound_with("model_torch", "decode_before", "faces_before")

    @property
    def steady(self) -> float:
        """The scan's steady (marginal) rate as a share of the ideal bound."""
        return self.scan_marginal / self.ideal_bound

    @property
    def best_bound(self) -> float:
        return max(self.rate("in_process"), self.ideal_bound)

    def _vector_sides(self) -> dict[bool, list[Measure]]:
        """The 3N scans storing embeddings (True) and storing none (False)."""
        return {side: [m for k, m in self.measures.items() if k.startswith("scan_3n_" + ("with" if side else "plain"))]
                for side in (True, False)}

    @property
    def vector_runs(self) -> int:
        return min(len(ms) for ms in self._vector_sides().values())

    def vector_cost(self, cpu: bool = False) -> float:
        """What storing embeddings costs the 3N scan: 1 - (best rate with) / (best rate without), over the runs
        after the first, interleaved (see _vector_order: drift in the machine's speed hits both sides alike);
        with cpu=True, the extra CPU seconds per photo of the processes that handle vectors, the inference actor
        and the driver (least run of each side), instead."""
        runs = self._vector_sides()
        if not runs[True] or not runs[False]:
            return float("nan")
        if cpu:
            per_photo = {side: min((m.stages.get("actor cpu", 0) + m.stages.get("driver cpu", 0)) / m.images for m in ms)
                         for side, ms in runs.items()}
            return per_photo[True] / per_photo[False] - 1
        return 1 - max(m.images_per_s for m in runs[True]) / max(m.images_per_s for m in runs[False])

    @property
    def vector_share(self) -> float:
        """The vectors' own extra CPU per photo (bench.vectors.storing_cost) over the CPU time a photo takes in the best scan
        storing none (cores / its rate): what storing embeddings can cost the scan at most, without the noise."""
        if "vectors" not in self.measures or not self._vector_sides()[False]:
            return float("nan")
        per_photo = self.measures["vectors"].seconds / self.measures["vectors"].images
        return per_photo / (self.cores / max(m.images_per_s for m in self._vector_sides()[False]))

    def cpu_split(self, faces: str = "faces") -> dict[str, float]:
        """Share of one photo's single-core CPU time in decode, faces (the `faces` measure) and model."""
        seconds = {k: self.measures[key].cpu_per_photo for k, key in (("decode", "decode"), ("faces", faces), ("model", "model_1"))}
        return {k: v / sum(seconds.values()) for k, v in seconds.items()}

    def ratios(self) -> dict[str, float]:
        scan = self.rate("scan_3n")
        return {"scan / classic": scan / self.rate("classic"), "scan / in-process": scan / self.rate("in_process"),
                "scan / best bound": scan / self.best_bound}


@dataclass
class BenchReport:
    sizes: list[SizeResult]
    ray_start_s: float
    ray_stop_s: float
    ray_workers_s: float  # extra seconds of the first scan in a fresh Ray over the same scan again (worker start-up)
    load: list[tuple[str, float]]  # (moment, 1-minute load average) through the run
    cores: int


def _vector_order(runs: int) -> list[str]:
    """Keys of the 3N scans in the order they run after the first (scan_3n, not compared): with and without in
    the order ABBA BAAB ABBA ..., which cancels a steady drift in the machine's speed over each block of four."""
    keys, count = [], {True: 0, False: 0}
    for i in range(2 * runs):
        side = (i % 4 in (0, 3)) != (i // 4 % 2 == 1)  # True: storing embeddings
        count[side] += 1
        keys.append("scan_3n_" + ("with" if side else "plain") + f"_{count[side]}")
    return keys


def _load(moments: list[tuple[str, float]], what: str) -> None:
    moments.append((what, os.getloadavg()[0]))


def run_benchmark(workdir: Path, cfg: ScanConfig, n: int = 40, classic_n: int = 8, size: tuple[int, int] = (4000, 3000),
                  quality: int = 92, sources: list[Path] | None = None, small: bool = True, small_n: int | None = None,
                  vector_runs: int = 4, log: Callable[[str], None] = print) -> BenchReport:
    """Generate the photos in workdir, then measure everything on them in one run (scans first, on a fresh Ray).

    The scans run on N and on 3N photos: N = `n` full-size ones, and N = `small_n` (default `n`) small ones; the 3N
    scan `vector_runs` times storing embeddings and as many times storing none."""
    from dogbreed.vision.predictors import BreedPredictor

    claim(workdir, ["out"])  # before any work: the scans replace workdir/out, only if an earlier run made it
    sources = sources or find_sources(None, log=log)
    cores = int(os.cpu_count() or 1)
    kinds = [(f"{size[0]}x{size[1]} JPEG q{quality}", size)] + ([("small (the originals)", None)] if small else [])
    folders = {}
    for label, sz in kinds:
        base = workdir / ("full" if sz else "small")
        k = n if sz or not small_n else small_n
        log(f"photos: {label} in {base}")
        folders[label] = (make_photos(sources, base / "a", k, sz, quality),
                          make_photos(sources, base / "b", 2 * k, sz, quality, start=k))
    load: list[tuple[str, float]] = []
    _load(load, "start")
    measures: dict[str, dict[str, Measure]] = {label: {} for label, _ in kinds}
    plain = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"embeddings": False})})
    start_s = ray_startup(cores)
    try:
        for label, _ in kinds:
            a, b = folders[label]
            log(f"scan: {label}")
            if not measures[kinds[0][0]]:  # the first scan in a fresh Ray also starts its worker processes
                measures[label]["scan_cold"] = scan([a[0].parent], workdir / "out", cfg)
            measures[label]["scan_n"] = scan([a[0].parent], workdir / "out", cfg)
            measures[label]["scan_3n"] = scan([a[0].parent, b[0].parent], workdir / "out", cfg)
            for key in _vector_order(vector_runs):  # with and without embeddings, interleaved: SizeResult.vector_cost
                measures[label][key] = scan([a[0].parent, b[0].parent], workdir / "out", plain if "plain" in key else cfg)
            _load(load, f"after scans, {label}")
    finally:
        stop_s = ray_shutdown()
    first = measures[kinds[0][0]]
    workers_s = max(first["scan_cold"].seconds - first["scan_n"].seconds, 0.0)
    predictor = BreedPredictor.for_scan(cfg)  # the libraries' default threads: model_all, in_process
    torch_cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"runtime": "torch"})})
    with _Threads(None):  # one-thread predictors (OpenVINO fixes its threads when it compiles); torch's restored
        one = BreedPredictor.for_scan(cfg, num_threads=1)
        torch_one = BreedPredictor.for_scan(torch_cfg, num_threads=1) if one.runtime != "torch" else None
    results = []
    for label, _ in kinds:
        a, _b = folders[label]
        m = measures[label]
        log(f"stage bounds: {label}")
        m["decode"], decoded = decode_only(a, cfg)
        m["faces"] = faces_only(decoded, cfg)
        if cfg.photos.face_side != BEFORE_FACE_SIDE:  # the round before's decode and faces, on the same photos, now
            before = cfg.model_copy(update={"photos": cfg.photos.model_copy(update={"face_side": BEFORE_FACE_SIDE})})
            m["decode_before"], decoded_before = decode_only(a, before)
            m["faces_before"] = faces_only(decoded_before, before)
            del decoded_before
        if cfg.face.detector != "haar":
            m["faces_haar"] = faces_only(decoded, cfg, "haar")
        m["model_1"] = model_only(decoded, cfg, one, 1)
        if torch_one is not None:  # what the CPU runtime changed in the bound
            m["model_torch"] = model_only(decoded, cfg, torch_one, 1)
        m["model_all"] = model_only(decoded, cfg, predictor, None)
        m["in_process"] = in_process(a[:max(n, cfg.inference.batch_size)], cfg, predictor)
        extra = storing_cost(a, cfg, one)  # what storing embeddings adds, measured apart from the scan
        m["vectors"] = Measure("storing embeddings alone", len(a), max(sum(extra.values()), 1e-9), extra)
        log(f"classic loop: {label}")
        # Small photos take the loop about 75 ms each: SMALL_CLASSIC_FACTOR times as many keep its figure out of the noise
        m["classic"] = classic_loop(a[:classic_n * (1 if label == kinds[0][0] else SMALL_CLASSIC_FACTOR)], cfg.model)
        _load(load, f"after bounds, {label}")
        mean_mb = float(np.mean([p.stat().st_size for p in a])) / 1e6
        results.append(SizeResult(label, mean_mb, m, start_s + stop_s + workers_s, cores))
    return BenchReport(results, start_s, stop_s, workers_s, load, cores)
