"""Shared fixtures: one local Ray per test module, the real scan config shrunk for the CPU, photo makers, and a
real S3 protocol server (moto_server) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

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


# ---------------------------------------------------------------- a real S3 protocol server on loopback

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    """`moto_server` on 127.0.0.1 (a real S3 protocol server in a child process); skipped where it cannot start."""
    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} is absent (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
                break
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"moto_server did not start on {url}; see {log.name}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_ALLOW_HTTP": "true"}  # deltalake refuses an http:// endpoint unless allowed


def point_at_moto(mp: pytest.MonkeyPatch, endpoint: str) -> str:
    """Set AWS_* (dummy keys, endpoint) for this process and its children, create a fresh bucket; returns OUT."""
    import boto3

    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    for key, value in S3_ENV.items():
        mp.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(key, raising=False)
    bucket = f"dogbreed-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/scans/nightly"


@pytest.fixture
def s3_out(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto server and an s3:// output URI in it; AWS_* point at the server (dummy keys)."""
    return point_at_moto(monkeypatch, moto_endpoint)


@pytest.fixture(scope="session")
def s3_env(moto_endpoint) -> Callable[[pytest.MonkeyPatch], str]:
    """For wider-scoped fixtures: s3_env(monkeypatch_context) -> a fresh s3:// OUT with AWS_* pointing at moto."""
    return lambda mp: point_at_moto(mp, moto_endpoint)


def _commit_rows(out: str | Path, paths: list[Path | str], status: str = "neither", model_id: str = "test-model",
                 lease_s: float = 30.0) -> str:
    """Commit one run with a row per path (real size and mtime for local files) the way a scan commits."""
    import pyarrow as pa

    from dogbreed.table import schema
    from dogbreed.table.output import Output
    from dogbreed.table.store import new_run_id, utcnow

    n, run_id = len(paths), new_run_id()
    stats = [Path(p).stat() if status != "deleted" and Path(p).exists() else None for p in paths]
    table = schema.to_table({
        "path": [str(p) for p in paths], "status": [status] * n, "run_id": [run_id] * n,
        "size_bytes": [s.st_size if s else None for s in stats], "model_id": [model_id] * n,
        "mtime": pa.array([s.st_mtime_ns // 1000 if s else None for s in stats], pa.int64()).cast(schema.UTC_US),
        "processed_at": pa.array([utcnow()] * n, schema.UTC_US),
    })
    with Output(out, write=True).writing(lease_s) as session:
        with session.writer(run_id) as writer:
            writer.write(table)
        session.commit(writer, {"run_id": run_id, "model_id": model_id, "status": "committed",
                                "counts": dict(writer.counts)})
    return run_id


@pytest.fixture(scope="session")
def commit_rows() -> Callable[..., str]:
    """commit_rows(out, paths, status="neither", model_id=...) -> run_id: one committed run, no Ray."""
    return _commit_rows
