"""decode.device accelerator gives the CPU path's rows: header check, orientation, crops, faces, fallbacks, a real scan.

Everything here runs the device path with device="cpu" (the code a GPU runs with device="cuda"); the tests marked
gpu run it on CUDA and skip where there is none.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dogbreed.config import FaceConfig, PhotoConfig
from dogbreed.table import readers
from dogbreed.vision import device_decode
from dogbreed.vision.decode import decode, jpeg_header, model_crop, small_copy
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.predictors import BreedPredictor, Decoder
from dogbreed.vision.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"
PREP = Preprocessing()
GEOM = PREP.geometry()
ROW_KEYS = ("status", "error", "error_kind", "fingerprint", "width", "height", "face_count", "breed")
BOX_TOLERANCE = 3  # face boxes agree within this many pixels of the face copy the detector sees
SCORE_TOLERANCE = 0.02
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _batch(paths):
    return {"path": np.array([str(p) for p in paths], dtype=object),
            "size_bytes": np.zeros(len(paths), np.int64), "mtime_ns": np.zeros(len(paths), np.int64)}


def _no_dqt(data: bytes) -> bytes:
    """A JPEG whose header passes every check but whose quantisation tables are gone: no decoder can read it."""
    out, i = bytearray(data[:2]), 2
    while i < len(data):
        if data[i + 1] == 0xDA:
            return bytes(out + data[i:])
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != 0xDB:
            out += data[i:i + 2 + length]
        i += 2 + length
    raise AssertionError("no scan in the JPEG")


def make_variants(folder: Path, big: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """Photos that exercise every branch: 12-MP, EXIF-rotated, progressive, gray, CMYK, PNG, and bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    human = Image.open(SAMPLES / "grace_hopper.jpg")
    Image.open(SAMPLES / "Labrador_retriever_06457.jpg").resize(big, Image.Resampling.BICUBIC).save(folder / "big.jpg", quality=92)
    human.resize(big[::-1], Image.Resampling.BICUBIC).save(folder / "big_human.jpg", quality=92)
    human.save(folder / "progressive.jpg", progressive=True, quality=90)
    human.convert("L").save(folder / "gray.jpg")
    human.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: must be turned upright before faces are searched
    human.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif)
    data = (folder / "progressive.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "no_tables.jpg").write_bytes(_no_dqt((SAMPLES / "grace_hopper.jpg").read_bytes()))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a photo")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def predictor():
    return BreedPredictor(top_k=3)


def rows_both_ways(paths, predictor, device="cpu", photos=None):
    """(CPU-path rows, device-path rows, the DeviceDecoder) for the same files."""
    batch = _batch(paths)
    cpu = predictor(Decoder(PREP, FaceConfig(), photos)(batch))
    dd = device_decode.DeviceDecoder(PREP, FaceConfig(), photos, device=device, face_threads=2)
    try:
        dev = predictor(dd(device_decode.JpegShipper(PREP, FaceConfig(), photos)(batch)))
    finally:
        dd.close()
    return cpu, dev, dd


def _clear_lead(ranked) -> bool:
    """Whether the top breed leads the runner-up by more than 0.01 (a non-dog's look-alike breed is often a tie)."""
    return ranked is not None and (len(ranked) < 2 or ranked[0]["prob"] - ranked[1]["prob"] > 0.01)


def assert_same_rows(paths, cpu, dev):
    for i, p in enumerate(paths):
        for key in ROW_KEYS:
            a, b = cpu[key][i], dev[key][i]
            if key == "breed" and not _clear_lead(cpu["breeds"][i]):
                continue
            assert a == b or (a is None and b is None), (p.name, key, a, b)
        if cpu["status"][i] != "error":
            assert abs(cpu["dog_score"][i] - dev["dog_score"][i]) <= SCORE_TOLERANCE, p.name
            scale = max(1.0, max(cpu["width"][i], cpu["height"][i]) / PhotoConfig().face_side)
            for box_a, box_b in zip(json.loads(cpu["faces"][i]), json.loads(dev["faces"][i])):
                assert np.abs(np.subtract(box_a, box_b)).max() <= BOX_TOLERANCE * scale, (p.name, box_a, box_b)


# ------------------------------------------------------------------------------------------ pieces
def test_jpeg_header_takes_plain_jpegs_and_refuses_the_rest(tmp_path):
    by_name = {p.name: jpeg_header(p.read_bytes(), 180_000_000) for p in make_variants(tmp_path, big=(400, 300))}
    assert by_name["big.jpg"] == (400, 300, 1)
    assert by_name["rotated.jpg"] == (512, 600, 6)  # upright size: the stored frame is 600 x 512
    assert by_name["progressive.jpg"] == by_name["gray.jpg"] == (512, 600, 1)
    assert by_name["no_tables.jpg"] == (512, 600, 1)  # only a decoder can tell: the device tries, the CPU names it
    for refused in ("cmyk.jpg", "truncated.jpg", "empty.jpg", "text.jpg"):
        assert by_name[refused] is None, refused
    assert jpeg_header((SAMPLES / "grace_hopper.jpg").read_bytes(), max_pixels=512 * 600 - 1) is None  # bomb guard
    assert jpeg_header((SAMPLES / "astronaut.png").read_bytes(), 180_000_000) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_as_pil_turns_the_photo(tmp_path, orientation):
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.png", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    tensor = torch.from_numpy(np.asarray(stored)).permute(2, 0, 1)
    assert np.array_equal(device_decode.orient(tensor, orientation).permute(1, 2, 0).numpy(), upright)


def test_crop_and_face_copy_on_the_device_match_pil():
    rgb = Image.open(SAMPLES / "Brittany_02625.jpg").convert("RGB")  # 450 x 664: upscaled to the 256 short side
    tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    crop = device_decode.model_crop(tensor, GEOM).numpy().astype(int)
    diff = np.abs(crop - model_crop(rgb, GEOM).astype(int))
    assert crop.shape == (224, 224, 3) and diff.mean() < 0.5 and diff.max() <= 8
    for side in (1000, 640, 320, 200):  # not reduced, then box-reduced 1.04x, 2.1x, 3.3x: PIL's BOX, bit for bit
        geometry = Geometry(face_side=side)
        small, scale = device_decode.small_copy(tensor, geometry)
        pil = small_copy(rgb, geometry.small(rgb.size))
        assert np.array_equal(small.permute(1, 2, 0).numpy(), pil) and scale == rgb.width / pil.shape[1], side
    for mode in ("squash", "border"):  # the other crop modes, from the same plan
        geometry = Preprocessing(crop_mode=mode).geometry()
        diff = np.abs(device_decode.model_crop(tensor, geometry).numpy().astype(int) - model_crop(rgb, geometry))
        assert diff.mean() < 0.5, mode


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(1283, 961), (2001, 777), (97, 301)])
def test_device_and_cpu_paths_share_one_geometry_on_odd_sizes_in_all_eight_orientations(tmp_path, orientation, size):
    """The device path takes its sizes and reductions from the same geometry as Pillow's: same frame, same face
    copy size, and a crop within rounding of the CPU path's, whatever the size and EXIF orientation."""
    rng = np.random.default_rng(orientation)
    smooth = Image.fromarray(rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    smooth.save(path, quality=95, exif=exif)
    cpu = decode(path.read_bytes(), GEOM)
    head = jpeg_header(path.read_bytes(), 180_000_000)
    assert head == (cpu.width, cpu.height, orientation)
    from torchvision.io import ImageReadMode, decode_jpeg

    img = device_decode.orient(decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8),
                                           mode=ImageReadMode.RGB), orientation)
    for factor in device_decode.reductions(cpu.width, cpu.height, GEOM):
        img = torch.nn.functional.avg_pool2d(img[None].float(), factor, ceil_mode=True)[0].round_().to(torch.uint8)
    small, _ = device_decode.small_copy(img, GEOM)
    assert tuple(small.shape[1:]) == cpu.small.shape[:2]  # the same face copy size
    crop = device_decode.model_crop(img, GEOM).numpy().astype(int)
    assert crop.shape == cpu.model_input.shape and np.abs(crop - cpu.model_input).mean() < 2.0


def test_wants_accelerator_and_resizes_torch_has():
    assert not device_decode.wants_accelerator("cpu", 1.0) and device_decode.wants_accelerator("accelerator", 0.0)
    assert device_decode.wants_accelerator("auto", 1.0) and not device_decode.wants_accelerator("auto", 0.0)
    assert device_decode.device_supports(PREP) and not device_decode.device_supports(Preprocessing(interpolation="lanczos"))


def test_shipper_sends_jpegs_compressed_and_cpu_crops_for_the_rest():
    paths = [SAMPLES / "grace_hopper.jpg", SAMPLES / "coffee.png"]
    out = device_decode.JpegShipper(PREP)(_batch(paths))
    assert list(out[device_decode.KIND]) == [device_decode.JPEG, device_decode.CROP] and "image" not in out
    assert out[device_decode.PAYLOAD][0] == paths[0].read_bytes()  # the file's own bytes, not pixels
    assert len(out[device_decode.PAYLOAD][1]) == 224 * 224 * 3 and out["ok"].all()
    assert (out["width"][0], out["height"][0]) == (512, 600)


def test_a_jpeg_too_elongated_for_the_device_gets_its_crop_on_the_cpu(tmp_path):
    """Resized whole on the device, an 8x20000 JPEG took 2.5 GB and 10 s; a 1x65000 one would take 51 GB."""
    path = tmp_path / "strip.jpg"
    Image.new("RGB", (8, 20000), (30, 160, 90)).save(path, quality=90)
    out = device_decode.JpegShipper(PREP)(_batch([path]))
    assert list(out[device_decode.KIND]) == [device_decode.CROP] and out["ok"].all()
    assert len(out[device_decode.PAYLOAD][0]) == 224 * 224 * 3


# ---------------------------------------------------------------------------------- the same rows
@pytest.mark.slow  # every sample and variant decoded both ways, 12-MP ones included
def test_device_path_gives_the_cpu_rows_on_samples_and_variants(tmp_path, predictor):
    paths = sorted(SAMPLES.iterdir()) + make_variants(tmp_path)
    cpu, dev, dd = rows_both_ways(paths, predictor)
    assert_same_rows(paths, cpu, dev)
    by_name = {p.name: i for i, p in enumerate(paths)}
    assert dev["status"][by_name["rotated.jpg"]] == "human"  # turned upright before the face search
    assert dev["error"][by_name["truncated.jpg"]].startswith("corrupt or truncated image data")
    assert dd.fallbacks == 1  # no_tables.jpg: the device refused it, the sandboxed CPU decoder named it
    assert dd.seconds["decode"] > 0 and dd.seconds["faces"] > 0


def test_a_jpeg_the_device_refuses_gets_the_cpu_row(monkeypatch, predictor):
    import torchvision.io

    paths = [SAMPLES / "grace_hopper.jpg", SAMPLES / "Brittany_02625.jpg"]
    refused = paths[1].read_bytes()
    real = torchvision.io.decode_jpeg

    def picky(tensors, **kwargs):  # a device decoder that cannot take one of the two files
        if any(bytes(t.numpy()) == refused for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return real(tensors, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    cpu, dev, dd = rows_both_ways(paths, predictor)
    assert dd.fallbacks == 1  # the batched call failed; the good photo was decoded again alone, on the device
    assert_same_rows(paths, cpu, dev)
    assert list(dev["status"]) == ["human", "dog"]


def test_decode_calls_are_chunked_by_declared_pixels(monkeypatch):
    import torchvision.io

    paths = [SAMPLES / n for n in ("grace_hopper.jpg", "Brittany_02625.jpg", "Labrador_retriever_06455.jpg")]
    calls, real = [], torchvision.io.decode_jpeg

    def spy(tensors, **kwargs):
        calls.append(len(tensors))
        return real(tensors, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    monkeypatch.setattr(device_decode, "CHUNK_PIXELS", 700_000)  # room for two of these ~0.3-Mpixel photos per call
    dd = device_decode.DeviceDecoder(PREP, device="cpu")
    out = dd(device_decode.JpegShipper(PREP)(_batch(paths)))
    assert calls == [2, 1] and out["ok"].all() and dd.fallbacks == 0
    assert np.array_equal(out["image"][2].numpy(), dd(device_decode.JpegShipper(PREP)(_batch(paths[2:])))["image"][0].numpy())


def test_scan_decodes_on_the_device_only_when_asked_and_able(shrunk_config, caplog):
    from dogbreed.scan.pipeline import _on_device

    def cfg(where):
        return shrunk_config("scan", **{"decode.device": where})

    assert not _on_device(cfg("cpu"), _Spec(PREP), 1.0) and not _on_device(cfg("auto"), _Spec(PREP), 0.0)
    assert _on_device(cfg("auto"), _Spec(PREP), 1.0) and _on_device(cfg("accelerator"), _Spec(PREP), 0.0)
    # The handler goes on the module's logger itself: what earlier tests did to the root logger cannot hide it.
    logger = logging.getLogger("dogbreed.scan.pipeline")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            assert not _on_device(cfg("accelerator"), _Spec(Preprocessing(interpolation="lanczos")), 1.0)
    finally:
        logger.removeHandler(caplog.handler)
    assert "lanczos resize has no torch equivalent" in caplog.text


class _Spec:
    def __init__(self, prep):
        self.preprocessing = prep


@pytest.mark.slow
@pytest.mark.shared_data
def test_device_path_gives_the_cpu_rows_on_real_photos(shared_data, predictor):
    paths = (sorted((shared_data / "humans").glob("*.jpg"))[:8] + sorted((shared_data / "other").iterdir())[:4]
             + [sorted(d.iterdir())[0] for d in sorted((shared_data / "imagewoof" / "val").iterdir())])
    cpu, dev, _ = rows_both_ways(paths, predictor)
    assert_same_rows(paths, cpu, dev)


@pytest.mark.slow  # two scans through a local Ray
def test_scan_with_decode_on_the_device_writes_the_rows_of_a_cpu_scan(tmp_path, ray_local, scan_config):
    from dogbreed.scan.job import run_scan

    root = tmp_path / "photos"
    shutil.copytree(SAMPLES, root)
    for p in make_variants(tmp_path / "variants", big=(1600, 1200)):
        shutil.copy(p, root / p.name)
    tables = {}
    for where in ("cpu", "accelerator"):
        summary = run_scan(scan_config([root], tmp_path / where, **{"decode.device": where}))
        assert summary.listed == len(list(root.iterdir()))
        tables[where] = readers.latest_table(tmp_path / where).sort_by("path")
    a, b = tables["cpu"], tables["accelerator"]
    for col in ("path", "status", "breed", "width", "height", "face_count", "error", "error_kind", "fingerprint"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    scores = [(x, y) for x, y in zip(a.column("dog_score").to_pylist(), b.column("dog_score").to_pylist()) if x is not None]
    assert len(scores) == a.num_rows - 4 and max(abs(x - y) for x, y in scores) <= SCORE_TOLERANCE
    assert a.column("status").to_pylist().count("error") == 4  # truncated, no tables, empty, text


# ------------------------------------------------------------------------------------------- CUDA
def _faces() -> FaceConfig:
    """The detector that runs on this node: the GPU machine's CPython 3.12 has no yuface wheel (haar there)."""
    from dogbreed.vision.faces import resolved

    return resolved(FaceConfig())


@pytest.mark.gpu
@cuda_only
def test_cuda_batched_decode_gives_the_cpu_rows(tmp_path, predictor):
    paths = sorted(SAMPLES.iterdir()) + make_variants(tmp_path)
    cuda_predictor = BreedPredictor(top_k=3, device="cuda")
    batch = _batch(paths)
    cpu = predictor(Decoder(PREP, _faces())(batch))
    dd = device_decode.DeviceDecoder(PREP, _faces(), device="cuda", face_threads=2)
    decoded = dd(device_decode.JpegShipper(PREP)(batch))
    assert decoded["image"].device.type == "cuda"
    dev = cuda_predictor(decoded)
    assert_same_rows(paths, cpu, dev)  # breeds, statuses, errors; bf16 scores within SCORE_TOLERANCE
    assert dd.fallbacks <= 1  # no_tables.jpg at most; every plain JPEG decoded on the GPU
    dd.close()


@pytest.mark.gpu
@cuda_only
def test_cuda_decode_of_a_batch_with_a_bad_jpeg_keeps_the_good_ones_on_the_device(tmp_path):
    paths = [p for p in make_variants(tmp_path, big=(1600, 1200)) if p.name in ("big.jpg", "no_tables.jpg", "rotated.jpg")]
    shipped = device_decode.JpegShipper(PREP)(_batch(paths))
    assert list(shipped[device_decode.KIND]) == [device_decode.JPEG] * 3
    dd = device_decode.DeviceDecoder(PREP, _faces(), PhotoConfig(), device="cuda")
    out = dd(shipped)
    assert dd.fallbacks == 1 and list(out["ok"]) == [True, False, True]
    cpu = Decoder(PREP)(_batch(paths))
    assert out["error"][1] == cpu["error"][1]
    dd.close()
