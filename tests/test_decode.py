"""Decoding: reduced JPEG decode, EXIF orientation, any mode to RGB, the model crop and the face copy."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from dogbreed.vision.decode import ImageError, decode, model_crop, small_copy
from dogbreed.vision.preprocessing import Preprocessing

PREP = Preprocessing()
GEOM = PREP.geometry()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 128, np.float32)], axis=2).astype(np.uint8))


def test_large_jpeg_uses_dct_scaling_but_reports_full_size(monkeypatch):
    from PIL import JpegImagePlugin

    drafts = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = orig(self, mode, size)
        drafts.append((size, self.size))
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    d = decode(_jpeg(_gradient(4000, 3000)), GEOM)
    assert (d.width, d.height) == (4000, 3000)
    assert drafts and drafts[0][1][0] <= 1000  # decoded at 1/4 scale or smaller, not 4000 px wide
    assert d.model_input.shape == (224, 224, 3) and d.model_input.dtype == np.uint8
    assert max(d.small.shape) <= 640 and d.small_to_full == pytest.approx(4000 / d.small.shape[1])


def test_exif_rotation_swaps_the_frame():
    img = _gradient(600, 400)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    d = decode(_jpeg(img, exif=exif.tobytes()), GEOM)
    assert (d.width, d.height) == (400, 600)
    assert d.small.shape[0] > d.small.shape[1]  # portrait after orientation


def test_an_orientation_stored_as_text_is_applied_to_neither_the_size_nor_the_pixels():
    """Pillow's exif_transpose ignores a text "6"; the size once took it (600x400 reported for unrotated pixels)."""
    img = _gradient(600, 400)
    import struct

    # one IFD entry: tag 0x0112, type 2 (ASCII), count 2, the value "6\0" inline
    ifd = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 0x0112, 2, 2) + b"6\0\0\0" + b"\0" * 4
    d = decode(_jpeg(img, exif=b"Exif\0\0" + ifd), GEOM)
    assert (d.width, d.height) == (600, 400) and d.small.shape[1] > d.small.shape[0]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    img = _gradient(300, 260).convert("RGBA" if mode in ("LA", "RGBA") else "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        assert img.mode.startswith("I;16")
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK",) else "PNG")
    d = decode(buf.getvalue(), GEOM)
    assert d.model_input.shape == (224, 224, 3)
    if mode == "I;16":  # 16-bit is rescaled, not clipped to white
        assert 60 < d.model_input.mean() < 200


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert decode(buf.getvalue(), GEOM).model_input.min() == 255


@pytest.mark.parametrize("crop_mode, crop_pct", [("center", 0.875), ("center", 0.95), ("squash", 0.9), ("border", 0.875)])
@pytest.mark.parametrize("size", [(500, 320), (320, 500), (331, 317), (640, 427), (150, 90)])
def test_model_crop_is_timms_eval_transform_exactly(crop_mode, crop_pct, size):
    import timm.data

    img = _gradient(*size)
    prep = Preprocessing(crop_pct=crop_pct, crop_mode=crop_mode)
    t = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=crop_pct, crop_mode=crop_mode,
                                   interpolation="bicubic", mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    t.transforms = [x for x in t.transforms if type(x).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    ref = np.asarray(t(img), dtype=np.uint8)
    ours = model_crop(img, prep.geometry())
    if crop_mode == "border":  # timm pads with the mean colour: ours is (0.5, 0.5, 0.5) -> 128
        assert ours.shape == ref.shape
        inside = ~(ours == 128).all(axis=2)
        assert np.array_equal(ours[inside], ref[inside])
    else:
        assert np.array_equal(ours, ref)


def test_small_copy_size():
    small = small_copy(Image.fromarray(np.zeros((960, 1280, 3), np.uint8)), GEOM.small((1280, 960)))
    assert small.shape == (360, 480, 3) and small.dtype == np.uint8  # photos.face_side 480


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am text\n" * 10, "not a recognised image"),
    (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "HEIC"),
])
def test_bad_bytes_give_one_line_reasons(data, reason):
    with pytest.raises(ImageError, match=reason) as e:
        decode(data, GEOM)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_an_error():
    data = _jpeg(_gradient(800, 600))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode(data[: len(data) // 2], GEOM)


def test_decompression_bomb_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid header, just huge
    with pytest.raises(ImageError, match="decompression"):
        decode(bytes(data), GEOM)


def test_a_large_16_bit_photo_decodes_in_a_few_bytes_per_pixel(tmp_path):
    """A 20-Mpixel 16-bit PNG once took 26 bytes per pixel (float64 copies); the peak is measured in a fresh process.

    It holds the 2-byte pixels Pillow decodes and a 1-byte copy at most; everything else is made after reduction.
    """
    import subprocess
    import sys

    path = tmp_path / "deep.png"
    w, h = 5000, 4000
    ramp = (np.arange(w * h, dtype=np.uint32).reshape(h, w) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(path, compress_level=1)
    # Imports and first-call allocations happen on a small photo first; the peak then grows by the big one alone.
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    code = ("import sys\n"
            "from dogbreed.vision.decode import decode\n"
            "from dogbreed.vision.geometry import Geometry\n"
            "def hwm():\n"
            "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
            "decode(open(sys.argv[2], 'rb').read(), Geometry())\n"
            "data = open(sys.argv[1], 'rb').read()\n"
            "before = hwm()\n"
            "d = decode(data, Geometry())\n"
            "print(hwm() - before, d.width, d.height)\n")
    small = tmp_path / "small.png"
    Image.fromarray(ramp[:64, :64]).save(small)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(small)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_kb, width, height = map(int, proc.stdout.split())
    assert (width, height) == (w, h)
    bytes_per_pixel = grown_kb * 1024 / (w * h)
    assert bytes_per_pixel < 6, f"decoding took {bytes_per_pixel:.1f} bytes per pixel"
    print(f"16-bit decode: {bytes_per_pixel:.2f} bytes per pixel")


def test_a_32_bit_float_tiff_decodes():
    """It was an error row: a float image's pixels came as a read-only view, which the in-place clip could not write."""
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 255, 40 * 60, dtype=np.float32).reshape(40, 60), "F").save(buf, "TIFF")
    d = decode(buf.getvalue(), GEOM)
    assert d.model_input.dtype == np.uint8 and d.model_input.max() > 100


def test_fingerprinting_a_fifo_swapped_in_since_the_listing_returns_at_once(tmp_path):
    """The plan fingerprints files in the driver, holding the output's lock: open() on a FIFO blocked it for good."""
    import os
    import threading

    from dogbreed.vision.decode import fingerprint_file

    fifo = tmp_path / "p.jpg"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fingerprint_file(str(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the thread before failing, so that the test run can end
        with open(fifo, "wb"):
            pass
        pytest.fail("fingerprint_file blocked on a FIFO")
    assert got == [None]
    (tmp_path / "a.jpg").write_bytes(b"x" * 10)
    assert fingerprint_file(str(tmp_path / "a.jpg")) is not None


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_an_extreme_aspect_ratio_gets_its_crop_not_out_of_memory(monkeypatch):
    """A 1x60000 PNG asked for a 256 x 15.4-million-pixel resize before the crop: 'out of memory while decoding'."""
    from dogbreed.vision import decode as decode_module

    buf = io.BytesIO()
    Image.new("RGB", (1, 60000), (200, 10, 10)).save(buf, "PNG")
    d = decode(buf.getvalue(), Preprocessing().geometry(), 180_000_000, suffix=".png")
    assert d.model_input.shape == (224, 224, 3) and (d.model_input == (200, 10, 10)).all()
    # resizing only the part inside the crop gives the pixels of resizing everything and cropping, within 2 levels
    rng = np.random.default_rng(0)
    for size in [(40, 4000), (4000, 40), (3, 5000), (640, 480)]:
        noise = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
        for interpolation in ("bicubic", "bilinear", "lanczos"):
            geometry = Preprocessing(interpolation=interpolation).geometry()
            monkeypatch.setattr(decode_module, "MAX_RESIZE_PIXELS", 1 << 40)
            whole = model_crop(noise, geometry).astype(int)
            monkeypatch.setattr(decode_module, "MAX_RESIZE_PIXELS", 0)
            assert np.abs(model_crop(noise, geometry) - whole).max() <= 2, (size, interpolation)
