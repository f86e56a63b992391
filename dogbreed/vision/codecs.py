"""Pillow plugins for the photo formats Pillow does not read itself, so that the one decode path (vision.decode)
opens every format the same way: size first (checked against the pixel limit), pixels on load(), orientation as
EXIF for exif_transpose.

- HEIC/HEIF: pi-heif (decode only: libheif with libde265, no encoder). It turns the photo upright itself and resets
  its EXIF orientation, so nothing is turned twice.
- AVIF: Pillow's own plugin (Pillow >= 11.3); its orientation arrives as EXIF.
- JPEG XL: imagecodecs (BSD, libjxl). Size and orientation are parsed from the codestream header here.
- Camera RAW (DNG, CR2/CR3, NEF, ARW, ORF, RW2, RAF, ...): rawpy (MIT, LibRaw). The embedded preview where there is
  a big enough one, else a half-size development (no demosaicing); the sensor's size is checked before either.

Each decoder runs with one thread: a decode task works on one photo on one core.

The user's own plugins (photos.plugins) are checked in the driver (check_plugins) and imported in every decoder
process (load_plugins).
"""

from __future__ import annotations

import io
import os
import struct
import sys
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFile

from dogbreed.config import RAW_EXTENSIONS

MIN_PREVIEW_SIDE = 256  # a RAW's embedded preview is used when its short side is at least this; else it is developed
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


@lru_cache(maxsize=1)
def register() -> None:
    """Teach Pillow HEIF and JPEG XL (once per process); Pillow's own plugins first, so AVIF keeps its files."""
    Image.init()
    try:
        import pi_heif

        pi_heif.register_heif_opener()
        pi_heif.options.DECODE_THREADS = 1
    except ImportError:  # pragma: no cover - a platform without pi-heif wheels: HEIC photos are error rows
        pass
    try:
        from PIL import AvifImagePlugin

        AvifImagePlugin.DEFAULT_MAX_THREADS = 1
    except ImportError:  # pragma: no cover - Pillow < 11.3
        pass
    Image.register_open(JpegXlImageFile.format, JpegXlImageFile, _accept)
    Image.register_extensions(JpegXlImageFile.format, [".jxl"])


def sniff(data: bytes, suffix: str | None = None) -> str | None:
    """The format the bytes claim (for routing RAW and for naming a broken file), or None."""
    h = data[:16]
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        compatible = {data[i:i + 4] for i in range(16, min(int.from_bytes(h[:4], "big"), 64), 4)}
        if brand in _AVIF_BRANDS or (brand in (b"mif1", b"msf1") and compatible & _AVIF_BRANDS):
            return "AVIF"
        if brand == b"crx ":
            return "RAW"  # Canon CR3
        if brand in _HEIF_BRANDS:
            return "HEIF"
    if h[:2] == b"\xff\x0a" or h[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JXL"
    if h[:16] == b"FUJIFILMCCD-RAW " or h[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00", b"FOVb", b"\x00MRM"):
        return "RAW"  # RAF, ORF, RW2, X3F, MRW
    if h[:4] in (b"II*\x00", b"MM\x00*"):
        if h[8:11] == b"CR\x02" or _tiff_has_tag(data, 50706):  # CR2, or a DNGVersion tag in IFD0
            return "RAW"
        if suffix and suffix.lower() in RAW_EXTENSIONS:  # NEF, ARW, PEF, ... look like plain TIFF
            return "RAW"
        return "TIFF"
    return None


def _tiff_has_tag(data: bytes, tag_id: int) -> bool:
    try:
        e = "<" if data[:2] == b"II" else ">"
        off = struct.unpack_from(e + "I", data, 4)[0]
        n = struct.unpack_from(e + "H", data, off)[0]
        return any(struct.unpack_from(e + "H", data, off + 2 + 12 * k)[0] == tag_id for k in range(min(n, 1000)))
    except struct.error:
        return False


# ---- JPEG XL --------------------------------------------------------------------------------------------------

_CODESTREAM = b"\xff\x0a"
_CONTAINER = b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a"
_RATIOS = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))


def _accept(prefix: bytes) -> bool:
    return prefix[:2] == _CODESTREAM or prefix[:12] == _CONTAINER


class _Bits:
    """LSB-first bit reader (JPEG XL's bit order)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        v = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise SyntaxError("truncated JPEG XL header")
            v |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return v

    def u32(self, *dist: tuple[int, int]) -> int:  # each distribution is (bits, offset)
        bits, offset = dist[self.u(2)]
        return self.u(bits) + offset


def _boxes(data: bytes):
    """(type, payload) of each ISO BMFF box of a JPEG XL container."""
    i, n = 0, len(data)
    while i + 8 <= n:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        head = 8
        if size == 1:
            if i + 16 > n:
                raise SyntaxError("truncated JPEG XL box")
            size, head = struct.unpack(">Q", data[i + 8:i + 16])[0], 16
        elif size == 0:
            size = n - i
        if size < head:
            raise SyntaxError("bad JPEG XL box size")
        yield kind, data[i + head:i + size]
        i += size


def split_container(data: bytes) -> tuple[bytes, bytes | None]:
    """(codestream start, raw EXIF TIFF bytes or None) of a raw codestream or a container file."""
    if data[:2] == _CODESTREAM:
        return data, None
    parts, exif = [], None
    for kind, payload in _boxes(data):
        if kind == b"jxlc":
            parts.append(payload)
        elif kind == b"jxlp":
            parts.append(payload[4:])  # 4-byte part index first
        elif kind == b"Exif" and len(payload) > 4:
            exif = payload[4 + int.from_bytes(payload[:4], "big"):]  # skip the offset to the TIFF header
    if not parts:
        raise SyntaxError("JPEG XL container without a codestream")
    return b"".join(parts), exif


def header(codestream: bytes) -> tuple[int, int, int]:
    """(width, height, orientation 1..8) from SizeHeader and the start of ImageMetadata, as stored (before
    orientation, like JxlBasicInfo.xsize/ysize)."""
    if codestream[:2] != _CODESTREAM:
        raise SyntaxError("not a JPEG XL codestream")
    b = _Bits(codestream[2:64])
    dist = ((9, 1), (13, 1), (18, 1), (30, 1))
    small = b.u(1)
    height = (b.u(5) + 1) * 8 if small else b.u32(*dist)
    ratio = b.u(3)
    if ratio == 0:
        width = (b.u(5) + 1) * 8 if small else b.u32(*dist)
    else:
        num, den = _RATIOS[ratio - 1]
        width = height * num // den
    orientation = 1
    if not b.u(1):  # ImageMetadata.all_default
        if b.u(1):  # extra_fields
            orientation = 1 + b.u(3)
    return width, height, orientation


class JpegXlImageFile(ImageFile.ImageFile):
    format = "JXL"
    format_description = "JPEG XL image"
    numthreads = 1  # libjxl worker threads; the scan runs one decoder process per core

    def _open(self) -> None:
        self._data = self.fp.read()  # whole file: the project hands Image.open a BytesIO anyway
        codestream, exif = split_container(self._data)
        width, height, orientation = header(codestream)
        self._size = (width, height)
        self._mode = "RGB"  # provisional: load() sets the decoded mode (L, LA, RGB, RGBA)
        ex = Image.Exif()
        if exif:
            try:
                ex.load(exif)
            except Exception:  # noqa: BLE001 - a broken EXIF box must not lose the photo
                ex = Image.Exif()
        ex.pop(0x0112, None)  # the codestream's orientation is the one that counts
        if orientation != 1:
            ex[0x0112] = orientation
        if len(ex):
            self.info["exif"] = ex.tobytes()
        self.tile = []

    def load(self):
        if self._im is not None:
            return Image.Image.load(self)
        import imagecodecs

        try:
            a = imagecodecs.jpegxl_decode(self._data, index=0, keeporientation=True, numthreads=self.numthreads)
        except imagecodecs.JpegxlError as e:
            raise OSError(f"JPEG XL: {e}") from None
        if a.ndim == 4:  # frames, even with index=0 on some builds
            a = a[0]
        if a.dtype != np.uint8:  # 16-bit or float: to 8 bits
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8) if a.dtype.kind == "f" else (a >> 8).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if (a.shape[1], a.shape[0]) != self._size:
            raise OSError(f"JPEG XL decoded {a.shape[1]}x{a.shape[0]}, header said {self._size[0]}x{self._size[1]}")
        im = Image.fromarray(np.ascontiguousarray(a))  # mode follows the shape: L, LA, RGB, RGBA
        mode = im.mode
        self.im = im.im
        self._mode = mode
        self._data = b""  # the compressed bytes are no longer needed
        return Image.Image.load(self)


# ---- camera RAW -----------------------------------------------------------------------------------------------


class RawError(ValueError):
    """A RAW file LibRaw cannot read; the message is the row's reason."""


_FLIP_TO_EXIF = {0: 1, 3: 3, 5: 8, 6: 6}  # LibRaw's sizes.flip -> EXIF orientation


def open_raw(data: bytes, max_pixels: int) -> Image.Image:
    """A RAW photo as a Pillow image (its orientation as EXIF where exif_transpose must apply it): the embedded JPEG
    preview when its short side is at least MIN_PREVIEW_SIDE, else a half-size development (upright already).
    The sensor's size is checked against max_pixels before anything is decoded."""
    import rawpy

    try:
        raw = rawpy.imread(io.BytesIO(data))  # metadata only; pixels are unpacked on first use
    except rawpy.LibRawFileUnsupportedError:
        raise RawError("not a camera RAW file LibRaw can read") from None
    except rawpy.LibRawError as e:
        raise RawError(f"unreadable RAW header ({type(e).__name__})") from None
    with raw:
        w, h = raw.sizes.width, raw.sizes.height
        if w <= 0 or h <= 0:
            raise RawError("RAW image has no pixels")
        if w * h > max_pixels:
            raise RawError(f"decompression-bomb guard: {w}x{h} is over {max_pixels} pixels")
        try:
            thumb = raw.extract_thumb()
        except rawpy.LibRawError:  # no preview, or one LibRaw cannot hand out
            thumb = None
        if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
            preview = Image.open(io.BytesIO(thumb.data))  # LibRaw gives it an EXIF block with the raw's orientation
            if min(preview.size) >= MIN_PREVIEW_SIDE:
                return preview
        try:
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8, no_auto_bright=False)
        except rawpy.LibRawError as e:
            raise RawError(f"corrupt or truncated RAW data ({type(e).__name__})") from None
    return Image.fromarray(np.ascontiguousarray(rgb))


def load_plugins(names: list[str]) -> None:
    """Import Pillow plugins (module names, or .py files) in a decoder process before it opens a photo."""
    import importlib
    import importlib.util

    for name in names:
        if name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"dogbreed_plugin_{abs(hash(name))}", name)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load decoder plugin {name}")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        else:
            importlib.import_module(name)


def check_plugins(names: list[str]) -> None:
    """In the driver, before any worker: each plugin is a .py file that exists or a module that can be found (it is
    not imported here). A missing one made every photo a transient error row, run after run."""
    import importlib.util

    from dogbreed.config import ConfigError

    for name in names:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise ConfigError(f"key 'photos.plugins': the decoder plugin file {name} does not exist")
            continue
        here = os.getcwd()  # the decoder children start with `python -m`, which puts the current folder first
        sys.path.insert(0, here)
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path.remove(here)
        if not found:
            raise ConfigError(f"key 'photos.plugins': no module named {name!r} can be imported for the decoders")
