"""Benchmark photos: real photos taken in turn (dogs, faces, neither), copied or scaled up to phone size."""

from __future__ import annotations

import io
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dogbreed.config import PhotoConfig
from dogbreed.errors import UsageError
from dogbreed.vision.decode import decode, read_bytes
from dogbreed.vision.geometry import Geometry

SOURCE_FOLDERS = ("imagewoof/val-unseen", "humans", "other")  # dogs, faces and neither, taken in turn
DEFAULT_DATA = Path("../shared/data")  # the project's photos beside the checkout, where there are some


def samples() -> Path:
    """The package's own sample photos."""
    return Path(str(files("dogbreed") / "samples"))


def data_folder(data: Path | None) -> Path | None:
    """The folder --data names (refused in one sentence unless it holds one of SOURCE_FOLDERS); without --data,
    DEFAULT_DATA where it exists, else None (the samples)."""
    if data is None:
        return DEFAULT_DATA if DEFAULT_DATA.is_dir() else None
    if not data.is_dir():
        raise UsageError(f"--data {data}: no such folder")
    if not any((data / f).is_dir() for f in SOURCE_FOLDERS):
        raise UsageError(f"--data {data} holds none of the folders the benchmark takes photos from: {', '.join(SOURCE_FOLDERS)}")
    return data


def find_sources(data: Path | None, limit: int = 90, log: Callable[[str], None] = print) -> list[Path]:
    """Real photos to build the benchmark from: `data` (../shared/data: dogs, faces, neither in turn), else the samples."""
    folders = [sorted(p for p in (data / f).rglob("*") if p.is_file()) for f in SOURCE_FOLDERS if (data / f).is_dir()] \
        if data is not None else []
    if any(folders):
        mixed = [p for group in zip(*[f for f in folders if f]) for p in group]
        return mixed[:limit]
    log(f"note: no photos in {data or DEFAULT_DATA}; the benchmark is built from the bundled samples in {samples()} instead")
    return sorted(p for p in samples().iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def make_photos(sources: list[Path], folder: Path, n: int, size: tuple[int, int] | None = None,
                quality: int = 92, noise: float = 8.0, start: int = 0) -> list[Path]:
    """n JPEGs in folder: the sources in turn, copied as they are (size None) or scaled to cover `size` and centre-cropped.

    Upscaled photos get mild sensor-like noise so that their files are as large as a phone's (3-4 MB at 12 MP).
    Photos already there are kept, so a re-run does not regenerate them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    guards = PhotoConfig()
    grain = None
    paths = []
    for i in range(start, start + n):
        src = sources[i % len(sources)]
        path = folder / f"{i:04d}_{src.stem}.jpg"
        paths.append(path)
        if path.exists():
            continue
        if size is None and src.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(src, path)
            continue
        im = Image.fromarray(decode(read_bytes(str(src), guards.max_bytes), Geometry.copy(), guards.max_pixels).small)
        if size is not None:
            s = max(size[0] / im.width, size[1] / im.height)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
            left, top = (im.width - size[0]) // 2, (im.height - size[1]) // 2
            im = im.crop((left, top, left + size[0], top + size[1]))
            if noise:
                if grain is None:
                    grain = np.random.default_rng(0).normal(0, noise, (size[1], size[0], 3)).astype(np.int16)
                im = Image.fromarray(np.clip(np.asarray(im, np.int16) + grain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        path.write_bytes(buf.getvalue())
    return paths
