"""Shared fixtures: one local Ray per test module, the real scan config shrunk for the CPU, photo makers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from dogbreed.config import ScanConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SCAN_YAML = REPO / "configs" / "scan.yaml"

# Small batches so a scan of a few dozen photos has many batches and a kill lands mid-run.
SMALL_BATCHES = {"decode.batch_size": 2, "inference.batch_size": 2}


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray for the module (address="local": never joins another engineer's cluster)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real photos beside the repository (../shared/data); skipped where absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def _scan_config(roots: list[Path | str], out: Path | str, **overrides: Any) -> ScanConfig:
    return load_config(ScanConfig, SCAN_YAML, {"roots": [str(r) for r in roots], "out": str(out),
                                               **SMALL_BATCHES, **overrides})


@pytest.fixture(scope="session")
def scan_config() -> Callable[..., ScanConfig]:
    """scan_config(roots, out, **dotted_overrides): configs/scan.yaml with small batches (the real config, shrunk)."""
    return _scan_config


def _write_photo(path: Path, seed: int, size: tuple[int, int] = (160, 120), fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    small = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size).save(path, fmt)
    return path


@pytest.fixture(scope="session")
def write_photo() -> Callable[..., Path]:
    """write_photo(path, seed, size=(160, 120)): a small valid photo of coloured noise; seeds give different bytes."""
    return _write_photo


@pytest.fixture(scope="session")
def make_photos() -> Callable[..., list[Path]]:
    """make_photos(folder, n, start=0) -> n small JPEGs named p000.jpg, p001.jpg, ..."""

    def make(folder: Path, n: int, start: int = 0) -> list[Path]:
        return [_write_photo(folder / f"p{i:03d}.jpg", seed=i) for i in range(start, start + n)]

    return make
