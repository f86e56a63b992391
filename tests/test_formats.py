"""The formats phones and cameras write, read by default: HEIC, AVIF, JPEG XL and camera RAW (DNG), made here with
real encoders; upright whatever orientation they carry, guarded like every other photo, and named a dog by a scan."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreed.scan.job import run_scan
from dogbreed.table import readers
from dogbreed.vision.decode import ImageError, decode
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.worker import PhotoReader, PhotoTask
from tests import photo_formats as pf

pytest.importorskip("pillow_heif")
pytest.importorskip("pidng")

SRC = Path(__file__).resolve().parents[1] / "dogbreed" / "samples" / "Labrador_retriever_06455.jpg"
# name -> (maker, orientation, options); 6 = pixels stored sideways, the turn recorded the format's own way
CASES = {
    "dog.heic": (pf.heic, 1, {}), "dog_rot6.heic": (pf.heic, 6, {}),
    "dog.avif": (pf.avif, 1, {}), "dog_rot6.avif": (pf.avif, 6, {}),
    "dog.jxl": (pf.jxl, 1, {}), "dog_box.jxl": (pf.jxl, 1, {"container": True}), "dog_rot6.jxl": (pf.jxl, 6, {}),
    "dog.dng": (pf.dng, 1, {}), "dog_rot6.dng": (pf.dng, 6, {}),
    "dog_preview.dng": (pf.dng, 1, {"preview": True}), "dog_preview_rot6.dng": (pf.dng, 6, {"preview": True}),
}


@pytest.fixture(scope="module")
def upright() -> Image.Image:
    im = Image.open(SRC).convert("RGB")
    im.thumbnail((400, 400))
    return im.crop((0, 0, im.width & ~1, im.height & ~1))  # even sides: a Bayer mosaic keeps every pixel


@pytest.fixture(scope="module")
def files(upright, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    for name, (make, orientation, options) in CASES.items():
        (root / name).write_bytes(make(upright, orientation, **options))
    return root


def _similarity(a: np.ndarray, b: Image.Image) -> float:
    b = np.asarray(b.resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("name", CASES)
def test_each_format_decodes_upright_to_the_photo(name, files, upright):
    d = decode((files / name).read_bytes(), Geometry.copy(), suffix=Path(name).suffix)
    assert (d.width, d.height) == upright.size, name  # sideways-stored files come out upright
    assert _similarity(d.small, upright) > 0.95, name  # the photo itself, not a thumbnail or a turned copy


def test_a_raw_named_like_tiff_is_not_taken_for_its_thumbnail(files, upright):
    data = (files / "dog_preview.dng").read_bytes()
    assert decode(data, Geometry.copy(), suffix=".dng").width == upright.width
    assert decode(data, Geometry.copy(), suffix=".nef").width == upright.width  # NEF: known by its name only


@pytest.mark.parametrize("name, reason", [
    ("dog.heic", "HEIC/HEIF file whose header cannot be read"),
    ("dog.avif", "AVIF file whose header cannot be read"),
    ("dog.jxl", "corrupt or truncated image data: JPEG XL"),
    ("dog.dng", "camera RAW: "),
])
def test_truncated_files_are_error_rows_in_the_sandbox(name, reason, files, tmp_path):
    path = tmp_path / name
    data = (files / name).read_bytes()
    path.write_bytes(data[: len(data) // 3] if name != "dog.heic" else data[:200])
    reader = PhotoReader(PhotoTask(Geometry.copy(320)))  # a real child process: a native crash would show here
    try:
        r = reader(os.fsencode(path))
    finally:
        reader.close()
    assert r.error is not None and reason in r.error and "\n" not in r.error, r.error


@pytest.mark.parametrize("name", ["dog.heic", "dog.avif", "dog.jxl", "dog.dng", "dog_preview.dng"])
def test_declared_size_is_checked_before_decoding(name, files):
    with pytest.raises(ImageError, match="decompression-bomb guard") as e:
        decode((files / name).read_bytes(), Geometry.copy(), max_pixels=50_000, suffix=Path(name).suffix)
    assert "\n" not in str(e.value)


def test_a_raw_over_the_limit_is_refused_by_its_sensor_size(files, upright):
    data = (files / "dog_preview.dng").read_bytes()  # the preview is the photo's size; the sensor 4x as large
    with pytest.raises(ImageError, match="camera RAW: decompression-bomb guard"):
        decode(data, Geometry.copy(), max_pixels=2 * upright.width * upright.height, suffix=".dng")


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_scan_names_a_dog_in_every_format(files, upright, tmp_path, ray_local, scan_config):
    out = tmp_path / "out"
    s = run_scan(scan_config([files], out))
    df = readers.latest(out).set_index("path")
    assert len(df) == len(CASES) and s.exit_code == 0, df[["status", "error"]]
    for name in CASES:
        row = df.loc[str(files.resolve() / name)]
        assert row["status"] in ("dog", "dog_and_human"), (name, row["status"], row["error"])
        assert (row["width"], row["height"]) == upright.size, name
