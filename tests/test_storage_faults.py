"""Storage that fails for real: a read-only mount, a full disk (a small tmpfs), a folder the user may not write. Read
commands work on a read-only table and write nothing; writers are refused with what failed, before any photo is
decoded, and leave nothing behind. Mounts need root in a container that allows them; elsewhere these tests skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dogbreed.errors import Exit
from dogbreed.table.output import Output
from dogbreed.table.store import StoreError, new_run_id
from tests.processes import DOGBREED, cli

SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    """mounts.tmpfs(path, size) and mounts.read_only(path): real mounts, undone afterwards; skips where not allowed."""
    done: list[Path] = []

    class Mounts:
        @staticmethod
        def tmpfs(path: Path, size: str) -> Path:
            path.mkdir(parents=True, exist_ok=True)
            if os.geteuid() != 0 or not shutil.which("mount") or not _mount("-t", "tmpfs", "-o", f"size={size}",
                                                                            "tmpfs", str(path)):
                pytest.skip("mounting a tmpfs needs root in a container that allows mounts")
            done.append(path)
            return path

        @staticmethod
        def read_only(path: Path) -> Path:
            if os.geteuid() != 0 or not _mount("--bind", str(path), str(path)):
                pytest.skip("a read-only bind mount needs root in a container that allows mounts")
            done.append(path)
            assert _mount("-o", "remount,ro,bind", str(path))
            return path

    yield Mounts
    for path in reversed(done):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _tree(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every name under folder, with each file's size and mtime (a folder's own mtime moves with a removed temp)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in folder.rglob("*")}


def _one_sentence(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def _fill(folder: Path) -> None:
    """Fill the file system holding `folder` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError:
                pass


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """A real scan of three sample photos (vectors included): (photo root, output)."""
    base = tmp_path_factory.mktemp("ro")
    photos = base / "photos"
    photos.mkdir()
    for name in ("Labrador_retriever_06455.jpg", "grace_hopper.jpg", "coffee.png"):
        shutil.copy(SAMPLES / name, photos / name)
    proc = cli("scan", str(photos), "--out", str(base / "out"), timeout=600)
    assert proc.returncode == Exit.OK, proc.stderr
    return photos, base / "out"


@pytest.mark.slow  # one real scan
def test_read_only_table_serves_every_reader_and_refuses_writers_up_front(scanned, mounts, tmp_path):
    photos, out = scanned
    before = _tree(out)
    mounts.read_only(out)
    env = os.environ | {"DOGBREED_CACHE": str(tmp_path / "cache")}  # similar's index goes to the user's cache
    for args in (["latest", str(out)], ["report", str(out), "--html", str(tmp_path / "report.html")],
                 ["similar", str(out), str(photos.resolve() / "Labrador_retriever_06455.jpg"), "--k", "2"],
                 ["scan", str(photos), "--out", str(out), "--dry-run"], ["check", str(out), "--deep"]):
        proc = cli(*args, env=env)
        assert proc.returncode == Exit.OK, (args, proc.stdout, proc.stderr)
    assert (tmp_path / "report.html").stat().st_size > 0
    (photos / "new.jpg").write_bytes((SAMPLES / "grace_hopper.jpg").read_bytes())
    for args in (["scan", str(photos), "--out", str(out)], ["compact", str(out)]):
        proc = cli(*args, env=env)
        assert proc.returncode in (Exit.USAGE, Exit.FAILED), proc.stderr  # refused up front, or at the lock
        assert "read-only file system" in _one_sentence(proc), proc.stderr
    subprocess.run(["umount", "-l", str(out)], check=True)
    assert _tree(out) == before


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_an_unwritable_log_is_found_before_any_photo_is_decoded(tmp_path, commit_rows, mounts):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not decoded")
    out = tmp_path / "out"
    commit_rows(str(out), [photos / "a.jpg"])
    mounts.read_only(out / "_delta_log")
    before = _tree(out / "data")
    proc = cli("scan", str(photos), "--out", str(out), "--mode", "all")
    sentence = _one_sentence(proc)
    assert proc.returncode == Exit.FAILED and f"{out}/_delta_log" in sentence and "read-only file system" in sentence
    assert "nothing was read or written" in sentence
    assert _tree(out / "data") == before  # no run folder, no file
    assert not list((out / "_dogbreed" / "runs").glob("*")), "no run record left"


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_full_disk_is_refused_before_decoding_and_leaves_no_file(tmp_path, commit_rows, mounts):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(SAMPLES / "grace_hopper.jpg", photos / "a.jpg")
    disk = mounts.tmpfs(tmp_path / "disk", "4m")
    out = disk / "out"
    commit_rows(str(out), [photos / "a.jpg"])
    _fill(disk)
    before = _tree(disk)
    proc = cli("scan", str(photos), "--out", str(out), "--mode", "all")
    sentence = _one_sentence(proc)
    assert proc.returncode == Exit.FAILED and "no space left on device (the disk is full)" in sentence, proc.stderr
    assert str(out) in sentence
    assert _tree(disk) == before  # no temporary file, no lock record, no run folder


def test_a_disk_that_fills_while_rows_are_written_says_so_and_leaves_no_file(tmp_path, commit_rows, mounts):
    from dogbreed.table import schema

    disk = mounts.tmpfs(tmp_path / "disk", "1m")
    out = disk / "out"
    (tmp_path / "a.jpg").write_bytes(b"x")
    commit_rows(str(out), [tmp_path / "a.jpg"])
    before = _tree(out)
    n, run_id = 100_000, new_run_id()
    rows = schema.to_table({"path": [f"/photos/{os.urandom(24).hex()}.jpg" for _ in range(n)],  # ~2.4 MB compressed
                            "status": ["neither"] * n, "run_id": [run_id] * n})
    with pytest.raises(StoreError, match="no space left on device") as e:
        with Output(str(out), write=True).writing(30) as session:
            with session.writer(run_id) as writer:
                writer.write(rows)
            session.commit(writer, {"run_id": run_id, "status": "committed", "counts": {}})
    assert str(out) in str(e.value)
    after = _tree(out)
    assert {k for k in after if k.startswith(("data/", "_dogbreed/runs/"))} == \
        {k for k in before if k.startswith(("data/", "_dogbreed/runs/"))}, "the run's files and record are gone"
    assert not [k for k in after if Path(k).name.startswith(".")], "no temporary file stays"


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_folder_the_user_may_not_write_is_refused_and_reading_still_works(commit_rows):
    """As another user (root drops to nobody): permission denied for the scan, `latest` reads all the same."""
    base = Path(tempfile.mkdtemp(prefix="dogbreed-perm-"))
    try:
        base.chmod(0o755)
        photos = base / "photos"
        photos.mkdir()
        shutil.copy(SAMPLES / "grace_hopper.jpg", photos / "a.jpg")
        out = base / "out"
        commit_rows(str(out), [photos / "a.jpg"])
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as another user needs setpriv")
            for p in [out, *out.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            for p in [out, *out.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            as_user = []
        env = os.environ | {"HOME": str(base), "DOGBREED_CACHE": str(base / "cache"), "RAY_ADDRESS": ""}

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*as_user, str(DOGBREED), *args], capture_output=True, text=True, timeout=240,
                                  env=env)

        proc = run("scan", str(photos), "--out", str(out), "--mode", "all")
        assert proc.returncode in (Exit.FAILED, Exit.USAGE), proc.stderr
        assert "permission denied" in _one_sentence(proc) or "not writable" in _one_sentence(proc), proc.stderr
        latest = run("latest", str(out))
        assert latest.returncode == Exit.OK and "1 photos" in latest.stderr, latest.stderr
    finally:
        for p in [base, *base.rglob("*")]:
            try:
                p.chmod(0o755)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)
