"""Shared fixtures: one local Ray per test module, the real scan config shrunk for the CPU, photo makers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from dogbreed.config import ScanConfig, load_config
from dogbreed.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "test_efficientnet"  # timm builds it offline with random weights
# How the real configs are shrunk for a 2-core CPU: small batches, so a scan of a few dozen photos has many
# batches and a kill lands mid-run; a tiny backbone and one short epoch for training.
SHRINK: dict[str, dict[str, Any]] = {
    "scan": {"decode.batch_size": 2, "inference.batch_size": 2},
    "train": {"backbone": TINY_BACKBONE, "input_size": 64, "batch_size": 8, "epochs": 1, "lr": 0.01,
              "decode.batch_size": 8, "address": "local"},  # never another engineer's Ray
}
KINDS = {"scan": ScanConfig, "train": TrainConfig}


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


def _shrunk(kind: str, **overrides: Any) -> ScanConfig | TrainConfig:
    """configs/<kind>.yaml, shrunk for the CPU (SHRINK), plus dotted-key overrides; paths may be Path objects."""
    given = {k: [str(r) for r in v] if k == "roots" else (str(v) if isinstance(v, Path) else v)
             for k, v in overrides.items()}
    return load_config(KINDS[kind], REPO / "configs" / f"{kind}.yaml", SHRINK[kind] | given)


@pytest.fixture(scope="session")
def shrunk_config() -> Callable[..., ScanConfig | TrainConfig]:
    """shrunk_config("scan" | "train", **dotted_overrides): the real config, shrunk (the one such fixture)."""
    return _shrunk


@pytest.fixture(scope="session")
def scan_config() -> Callable[..., ScanConfig]:
    """scan_config(roots, out, **dotted_overrides): shorthand for shrunk_config("scan", roots=..., out=...)."""
    return lambda roots, out, **overrides: _shrunk("scan", roots=roots, out=out, **overrides)


@pytest.fixture(scope="session")
def shrunk_yaml(tmp_path_factory) -> Callable[..., Path]:
    """shrunk_yaml("scan" | "train", **overrides): the shrunk config written as YAML, for a real CLI process."""
    from dogbreed.config import dump_config

    def write(kind: str, **overrides: Any) -> Path:
        path = tmp_path_factory.mktemp(f"{kind}-config") / f"{kind}.yaml"
        path.write_text(dump_config(_shrunk(kind, **overrides)), encoding="utf-8")
        return path

    return write


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
