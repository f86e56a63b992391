"""Listing photo files and decoding them robustly into what the detectors need.

Decoding applies EXIF orientation, turns any mode into RGB, uses JPEG DCT scaling (Pillow ``draft``)
when the photo is much larger than needed, and refuses decompression bombs before decoding a pixel.
Every failure is an :class:`ImageError` with a one-line reason.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dogbreed.models import Preprocessing

# Never let Pillow stitch a truncated file together silently: a truncated JPEG is an error row.
ImageFile.LOAD_TRUNCATED_IMAGES = False

try:  # optional HEIC/HEIF support (pip install dogbreed[heic])
    from pillow_heif import register_heif_opener
except ImportError:  # pragma: no cover - depends on the environment
    register_heif_opener = None


class ImageError(Exception):
    """A file that cannot be turned into a photo; str(e) is a one-line reason."""


@dataclass(frozen=True)
class FileEntry:
    """One file found under a root, with the identity used for incremental runs."""

    path: str
    size: int
    mtime_ns: int
    error: str | None = None  # set when the file is known bad at listing time (e.g. a symlink loop)


@dataclass
class Decoded:
    """A photo ready for the detectors: model crop, grayscale copy for faces, and full-size geometry."""

    width: int  # full-size width after EXIF orientation
    height: int
    model_input: np.ndarray  # uint8 (S, S, 3), resized and centre-cropped per the model's preprocessing
    gray: np.ndarray  # uint8 (h, w), longest side <= face max_side
    gray_scale: float  # full-size pixels per gray pixel


class RootError(Exception):
    """A root that cannot be scanned (missing, not a folder, unreadable)."""


def _is_uri(path: str) -> bool:
    return "://" in path


def _walk_local(root: str, include_hidden: bool) -> Iterator[FileEntry]:
    """Depth-first, sorted, following directory symlinks once (a loop becomes an error entry)."""
    seen: set[tuple[int, int]] = set()
    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield FileEntry(folder, 0, 0, f"folder unreadable: {e.strerror}")
            continue
        subdirs = []
        for e in entries:
            if not include_hidden and e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=True)
            except OSError as err:
                reason = "symlink loop" if err.errno == 40 else f"cannot stat: {err.strerror}"
                yield FileEntry(e.path, 0, 0, reason)
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    yield FileEntry(e.path, 0, 0, "symlink loop: folder already scanned")
                    continue
                seen.add(key)
                subdirs.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                yield FileEntry(e.path, st.st_size, st.st_mtime_ns)
        stack.extend(reversed(subdirs))


def _walk_uri(root: str, include_hidden: bool) -> Iterator[FileEntry]:
    from pyarrow import fs as pafs

    filesystem, base = pafs.FileSystem.from_uri(root)
    scheme = root.split("://", 1)[0]
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):]
        if not include_hidden and any(part.startswith(".") for part in rel.split("/")):
            continue
        mtime_ns = int(info.mtime_ns) if info.mtime_ns is not None else 0
        yield FileEntry(f"{scheme}://{info.path}", int(info.size or 0), mtime_ns)


def check_root(root: str) -> None:
    """Raise RootError unless root is an existing, readable folder (or a reachable URI prefix)."""
    if _is_uri(root):
        from pyarrow import fs as pafs

        try:
            filesystem, base = pafs.FileSystem.from_uri(root)
            info = filesystem.get_file_info(base)
        except Exception as e:  # noqa: BLE001 - any filesystem failure refuses the root
            raise RootError(f"root {root} is unreachable: {str(e).splitlines()[0]}") from None
        if info.type != pafs.FileType.Directory:
            raise RootError(f"root {root} is not a folder")
        return
    if not os.path.exists(root):
        raise RootError(f"root {root} does not exist (is the archive mounted?)")
    if not os.path.isdir(root):
        raise RootError(f"root {root} is not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise RootError(f"root {root} is not readable")


def list_files(root: str, include_hidden: bool = False) -> Iterator[FileEntry]:
    """Every regular file under root, recursively (local folder or pyarrow filesystem URI)."""
    check_root(root)
    if _is_uri(root):
        yield from _walk_uri(root, include_hidden)
    else:
        yield from _walk_local(os.path.abspath(root), include_hidden)


def read_bytes(path: str, max_bytes: int) -> bytes:
    """The file's bytes (local path or URI), refusing files over max_bytes."""
    try:
        if _is_uri(path):
            from pyarrow import fs as pafs

            filesystem, p = pafs.FileSystem.from_uri(path)
            with filesystem.open_input_file(p) as f:
                if f.size() > max_bytes:
                    raise ImageError(f"file is {f.size()} bytes, over the {max_bytes}-byte limit")
                return f.read()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ImageError(f"file is {size} bytes, over the {max_bytes}-byte limit")
            return f.read()
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError("is a folder, not a file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit/float is rescaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    if register_heif_opener is not None:
        register_heif_opener()
    try:
        with warnings.catch_warnings():
            # The max_pixels check below is the guard. Pillow's own warning at 89 Mpixel would silently
            # halve the configured limit; its hard error (at twice that) still stops absurd headers early.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:12]
        if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypheim", b"ftyphevc"):
            raise ImageError("HEIC/HEIF photo but no HEIF decoder is installed (pip install dogbreed[heic])") from None
        raise ImageError("not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: declared size too large") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file
        raise ImageError(f"unreadable image header: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageError(f"decompression-bomb guard: {w}x{h} is over {max_pixels} pixels")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the photo
        return 1


def decode(data: bytes, prep: Preprocessing, face_max_side: int = 640, max_pixels: int = 180_000_000) -> Decoded:
    """Decode bytes into a model crop and a small grayscale copy; raises ImageError with a reason."""
    im = _open(data, max_pixels)
    orientation = _orientation(im)
    w, h = im.size
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: full-size frame swaps axes
        w, h = h, w
    # Smallest size that still serves both the model crop and the face copy.
    need = max(prep.resize_to / min(w, h), min(1.0, face_max_side / max(w, h)))
    if need < 0.5 and im.format == "JPEG":
        req = (max(1, int(im.size[0] * need)), max(1, int(im.size[1] * need)))
        im.draft(None, req)  # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding
    try:
        im.seek(0)  # animated GIF / multi-page TIFF: first frame
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"corrupt or truncated image data: {msg}") from None
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: declared size too large") from None
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block keeps the pixels as stored
            pass
    rgb = _to_rgb(im)
    gray, _ = gray_copy(rgb, face_max_side)
    return Decoded(width=w, height=h, model_input=model_crop(rgb, prep), gray=gray, gray_scale=w / gray.shape[1])


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def model_crop(rgb: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize the short side to prep.resize_to and centre-crop prep.input_size (timm's eval transform)."""
    w, h = rgb.size
    s = prep.resize_to / min(w, h)
    nw, nh = max(prep.input_size, round(w * s)), max(prep.input_size, round(h * s))
    resized = rgb.resize((nw, nh), _RESAMPLE.get(prep.interpolation, Image.Resampling.BICUBIC), reducing_gap=3.0)
    left, top = (nw - prep.input_size) // 2, (nh - prep.input_size) // 2
    crop = resized.crop((left, top, left + prep.input_size, top + prep.input_size))
    return np.asarray(crop, dtype=np.uint8)


def gray_copy_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def gray_copy(rgb: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """Grayscale copy with the longest side <= max_side, and its scale relative to the given image."""
    size = gray_copy_size(rgb.size, max_side)
    small = rgb.convert("L")
    if size != rgb.size:
        small = small.resize(size, Image.Resampling.BOX, reducing_gap=2.0)
    return np.asarray(small, dtype=np.uint8), rgb.size[0] / size[0]
