"""The one module that turns photo bytes into pixels: what the network, the face detector and people see.

(:func:`decode_jpegs_on` is the accelerator's batched JPEG decode, for dogbreed.vision.device_decode; the Pillow
plugins of :mod:`dogbreed.vision.codecs` are what :func:`decode` opens HEIC, JPEG XL and RAW with.)

:func:`decode` serves every path (the scan, training, evaluation, the report, the benchmarks): it refuses
decompression bombs before decoding a pixel, applies EXIF orientation, turns any mode into RGB, decodes large
JPEGs reduced (DCT scaling, Pillow ``draft``) and reduces the rest by an integer box filter, as far as the
geometry (:mod:`dogbreed.vision.geometry`) allows, then makes the model crop and the face copy. Memory per pixel
stays small: 16-bit and float photos are rescaled to 8 bits in row strips. Every failure is an :class:`ImageError`
with a one-line reason.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from dogbreed.vision import codecs
from dogbreed.vision.geometry import Geometry

FINGERPRINT_CHUNK = 64 * 1024  # bytes hashed from each end of a file
_STRIP_ROWS = 256  # rows rescaled at a time for 16-bit / float photos
_REDUCIBLE = {"L", "RGB", "RGBA", "LA", "CMYK", "I", "F"}  # modes Image.reduce accepts
_DEEP = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # more than 8 bits per sample: rescaled to 'L'
_DRAFTABLE = ("JPEG", "MPO")  # formats libjpeg decodes with DCT scaling



class ImageError(Exception):
    """A file that cannot be turned into a photo; str(e) is a one-line reason.

    ``permanent`` errors cannot change until the file does (corrupt, not an image, bomb), so an unchanged
    file is not tried again; transient ones (permission denied, I/O error) are retried on the next run.
    """

    def __init__(self, reason: str, permanent: bool = True):
        super().__init__(reason)
        self.permanent = permanent


@dataclass
class Decoded:
    """A photo ready for the detectors: the model crop, the small copy for faces, and the full-size frame."""

    width: int  # full-size width after EXIF orientation (and the turn, if one was asked for)
    height: int
    model_input: np.ndarray | None  # uint8 (S, S, 3) per the geometry's crop; None for a thumbnail geometry
    small: np.ndarray  # uint8 RGB (h, w, 3), upright, longest side <= face_side: what face detectors see
    small_to_full: float  # full-size pixels per pixel of the small copy (multiply a small-copy box by it)
    rgb: np.ndarray | None = None  # the reduced upright photo the two were made from (keep_rgb: training augments it)


def is_uri(path: str | bytes) -> bool:
    return (b"://" if isinstance(path, bytes) else "://") in path


def fingerprint(size: int, head: bytes, tail: bytes) -> str:
    """A cheap content fingerprint: size plus the first and last FINGERPRINT_CHUNK bytes (BLAKE2b, 128 bit)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    h.update(head)
    h.update(tail)
    return h.hexdigest()


def fingerprint_of_bytes(data: bytes) -> str:
    tail = data[-FINGERPRINT_CHUNK:] if len(data) > FINGERPRINT_CHUNK else b""
    return fingerprint(len(data), data[:FINGERPRINT_CHUNK], tail)


def fingerprint_file(path: str | bytes) -> str | None:
    """The fingerprint of a local file read from its two ends, or None if it cannot be read or is no longer a regular
    file. Opened without blocking and checked on the open file: a FIFO swapped in since the listing would otherwise
    block the open (in the driver, holding the output's lock) until something writes to it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            size = info.st_size
            head = f.read(FINGERPRINT_CHUNK)
            tail = b""
            if size > FINGERPRINT_CHUNK:  # the last chunk, overlapping the first for small files, as above
                f.seek(size - FINGERPRINT_CHUNK)
                tail = f.read(FINGERPRINT_CHUNK)
            return fingerprint(size, head, tail)
    except OSError:
        return None


def read_bytes(path: str | bytes, max_bytes: int) -> bytes:
    """The file's bytes (local path, raw bytes path, or URI), refusing files over max_bytes."""
    try:
        if is_uri(path):
            from dogbreed.table.location import filesystem_from_uri

            try:
                filesystem, p = filesystem_from_uri(os.fsdecode(path))
            except ValueError as e:  # a scheme no store serves (http://): a sentence, not Arrow's exception name
                raise ImageError(str(e).splitlines()[0]) from None
            with filesystem.open_input_file(p) as f:
                if f.size() > max_bytes:
                    raise ImageError(f"file is {f.size()} bytes, over the {max_bytes}-byte limit")
                return f.read()
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError("is a folder, not a file", permanent=False)
        if not stat.S_ISREG(mode):  # opening a FIFO waits for a writer; /dev/zero never ends
            raise ImageError("not a regular file (a device, FIFO or socket); never opened")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ImageError(f"file is {size} bytes, over the {max_bytes}-byte limit")
            return f.read()
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError("is a folder, not a file", permanent=False) from None
    except PermissionError:
        raise ImageError("permission denied", permanent=False) from None
    except FileNotFoundError:
        raise ImageError("no such file (missing, or removed before it could be read)", permanent=False) from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}", permanent=False) from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit int or float gray to 8-bit 'L', a strip of rows at a time (1 byte per pixel kept)."""
    lo, hi = im.getextrema()
    top = 65535.0 if im.mode.startswith("I;16") or hi > 255 else 255.0
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    for y in range(0, h, _STRIP_ROWS):
        strip = np.array(im.crop((0, y, w, min(h, y + _STRIP_ROWS))), dtype=np.float32)  # a copy: a float image's
        # pixels come as a read-only view, which the in-place clip below cannot write
        np.clip(strip * np.float32(255.0 / top) + np.float32(0.5), 0, 255, out=strip)
        out[y:y + strip.shape[0]] = strip
    return Image.fromarray(out, "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit/float is rescaled."""
    if im.mode in _DEEP:
        im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


_FORMAT_NAMES = {"HEIF": "HEIC/HEIF", "AVIF": "AVIF", "JXL": "JPEG XL", "RAW": "camera RAW", "TIFF": "TIFF"}


def _open(data: bytes, max_pixels: int, suffix: str | None = None) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    codecs.register()
    kind = codecs.sniff(data, suffix)
    if kind == "RAW":  # before Pillow, which would take a DNG or NEF for a TIFF and show its tiny thumbnail
        try:
            return codecs.open_raw(data, max_pixels)
        except codecs.RawError as e:
            raise ImageError(f"camera RAW: {e}") from None
    try:
        with warnings.catch_warnings():
            # The max_pixels check below is the guard. Pillow's own warning at 89 Mpixel would silently
            # halve the configured limit; its hard error (at twice that) still stops absurd headers early.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if kind is not None:
            raise ImageError(f"{_FORMAT_NAMES[kind]} file whose header cannot be read (corrupt or truncated, or a "
                             "variant the decoder does not support)") from None
        raise ImageError("not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: declared size too large") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file
        raise ImageError(f"unreadable image header: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageError(f"decompression-bomb guard: {w}x{h} is over {max_pixels} pixels")
    return im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation exactly as ImageOps.exif_transpose will apply it (1 where it applies none: a value
    outside 1-8, or one stored as text), so the reported size always matches the pixels."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if not isinstance(value, (str, bytes)) and value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the photo
        return 1


def _reduced(data: bytes, geometry: Geometry, max_pixels: int,
             suffix: str | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into an upright 8-bit RGB image, reduced as far as the geometry allows, and the full-size
    (width, height) after EXIF orientation. Raises ImageError with a one-line reason."""
    im = _open(data, max_pixels, suffix)
    orientation = _orientation(im)
    w, h = im.size
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: full-size frame swaps axes
        w, h = h, w
    need = geometry.need((w, h))
    if im.format in _DRAFTABLE:
        draft = geometry.draft(im.size, need)
        if draft > 1:
            # DCT-domain downscale while decoding; Pillow picks exactly `draft` for this request.
            im.draft(None, (im.size[0] // draft, im.size[1] // draft))
    try:
        im.seek(0)  # animated GIF / multi-page TIFF: first frame
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"corrupt or truncated image data: {msg}") from None
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: declared size too large") from None
    factor = geometry.box_factor(im.size, (w, h), need)
    if factor > 1:  # still much larger than needed (a PNG, or a JPEG beyond 1/8): integer box reduction
        if im.mode in _DEEP:
            im = _to_8bit(im)  # 1 byte per pixel before anything else is made at full size
        elif im.mode not in _REDUCIBLE:
            im = _to_rgb(im)
        im = im.reduce(factor)
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block keeps the pixels as stored
            pass
    return _to_rgb(im), (w, h)


def decode(data: bytes, geometry: Geometry, max_pixels: int = 180_000_000, keep_rgb: bool = False,
           rotate: float = 0.0, suffix: str | None = None) -> Decoded:
    """Photo bytes -> the model crop, the face copy and the full-size frame, per `geometry`; the one decode path.

    `rotate` turns the upright photo counter-clockwise by that many degrees on a canvas that holds it all
    (face detectors measured on tilted heads); `keep_rgb` also returns the reduced photo itself. Raises
    ImageError with a one-line reason. `suffix` (the file name's extension) tells camera RAW formats that look
    like plain TIFF (NEF, ARW, PEF) from TIFF; every other format is known by its bytes.
    """
    rgb, (w, h) = _reduced(data, geometry, max_pixels, suffix)
    if rotate:
        rgb = rgb.rotate(rotate, resample=Image.Resampling.BICUBIC, expand=True)
        t = math.radians(rotate)
        w, h = (round(abs(w * math.cos(t)) + abs(h * math.sin(t))), round(abs(w * math.sin(t)) + abs(h * math.cos(t))))
    small = small_copy(rgb, geometry.small(rgb.size))
    crop = model_crop(rgb, geometry) if geometry.input_size is not None else None
    return Decoded(width=w, height=h, model_input=crop, small=small, small_to_full=w / small.shape[1],
                   rgb=np.asarray(rgb, dtype=np.uint8) if keep_rgb else None)


def decode_jpegs_on(datas: list[bytes], device) -> list:
    """Plain JPEGs (checked by :func:`jpeg_header`) decoded in one batched call on a torch device (nvJPEG on CUDA,
    libjpeg-turbo on CPU): full-size RGB uint8 CHW tensors as stored (orientation not applied), None for each JPEG
    the device decoder refuses (the caller sends those to the sandboxed CPU path)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def call(items: list[bytes]) -> list:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in items]
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return out if isinstance(out, list) else [out]

    try:
        return call(datas)
    except Exception:  # noqa: BLE001 - one bad JPEG fails the batched call: find it one by one
        out: list = []
        for d in datas:
            try:
                out.extend(call([d]))
            except Exception:  # noqa: BLE001 - the sandboxed CPU decoder takes it
                out.append(None)
        return out


# SOF markers an accelerator's JPEG decoder (nvJPEG, libjpeg-turbo through torchvision) takes whole: baseline,
# extended sequential and progressive Huffman. Lossless, hierarchical and arithmetic-coded files keep the CPU path.
_DEVICE_SOF = (0xC0, 0xC1, 0xC2)


def _jpeg_sof(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG, walking its segment headers only; None if there is none before SOS."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers carry no length
            i += 2
            continue
        if marker == 0xDA or marker == 0xD9:  # scan data or end before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, data[i + 4]) if i + 5 <= n else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height after EXIF orientation, EXIF orientation) of a JPEG an accelerator can decode whole, from
    its header alone (no pixel is decoded); None for anything else, which then takes :func:`decode` with every guard.

    Accepted: 8-bit baseline or progressive RGB/gray JPEGs within max_pixels that end in an EOI marker (a
    truncated file keeps the CPU path, which names it). CMYK/YCCK, other formats and odd files are refused here.
    """
    if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    sof = _jpeg_sof(data)
    if sof is None or sof[0] not in _DEVICE_SOF or sof[1] != 8:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=["JPEG"])  # the JPEG plugin only: header parsing in Python
    except Exception:  # noqa: BLE001 - whatever Pillow refuses, decode() will name
        return None
    w, h = im.size
    if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L") or w <= 0 or h <= 0 or w * h > max_pixels:
        return None
    orientation = _orientation(im)
    orientation = orientation if 1 <= orientation <= 8 else 1  # exif_transpose ignores other values too
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)


_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.5, "lanczos": 3.0}  # Pillow's filter radii, in pixels
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


# A resize larger than this (only an extreme aspect ratio gets there: 1x60000 pixels asked for 256 x 15.4 million)
# makes only the part inside the crop (_resized_crop)
MAX_RESIZE_PIXELS = 1 << 24


def model_crop(rgb: Image.Image, geometry: Geometry) -> np.ndarray:
    """The geometry's crop of an upright RGB image (timm's eval transform for the weights' crop mode)."""
    plan = geometry.crop(rgb.size)
    if plan.resize[0] * plan.resize[1] > MAX_RESIZE_PIXELS and not any(plan.pad):
        return np.asarray(_resized_crop(rgb, plan, geometry.interpolation), dtype=np.uint8)
    img = rgb.resize(plan.resize, _RESAMPLE[geometry.interpolation]) if plan.resize != rgb.size else rgb
    if any(plan.pad):
        canvas = Image.new("RGB", (img.size[0] + plan.pad[0] + plan.pad[2], img.size[1] + plan.pad[1] + plan.pad[3]),
                           geometry.fill)
        canvas.paste(img, (plan.pad[0], plan.pad[1]))
        img = canvas
    return np.asarray(img.crop(plan.box), dtype=np.uint8)


def _resized_crop(rgb: Image.Image, plan, interpolation: str) -> Image.Image:
    """Only the crop of the resized photo, as Pillow's resize makes it (across, then down): the crop's columns over
    the rows the second pass reads, then its rows. Within 2 levels of resizing everything and cropping (measured on
    noise; 'nearest' may take the neighbouring pixel)."""
    (w, h), (nw, nh) = rgb.size, plan.resize
    left, top, right, bottom = plan.box
    sx, sy = w / nw, h / nh
    reach = math.ceil(_SUPPORT[interpolation] * max(sy, 1.0)) + 1  # source rows an output row's filter reads, beyond it
    y0, y1 = max(0, math.floor(top * sy) - reach), min(h, math.ceil(bottom * sy) + reach)
    across = rgb.crop((0, y0, w, y1)).resize((right - left, y1 - y0), _RESAMPLE[interpolation],
                                              box=(left * sx, 0, right * sx, y1 - y0))
    return across.resize((right - left, bottom - top), _RESAMPLE[interpolation],
                         box=(0, top * sy - y0, right - left, bottom * sy - y0))


def small_copy(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The RGB face copy (h, w, 3) at `size` (Geometry.small), box-filtered."""
    small = rgb.resize(size, Image.Resampling.BOX, reducing_gap=2.0) if size != rgb.size else rgb
    return np.asarray(small, dtype=np.uint8)
