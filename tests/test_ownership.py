"""An output is dogbreed's and nothing else's, shown with real files and real `dogbreed` processes, on a local
folder and on a real S3 protocol server (moto_server on 127.0.0.1): a scan or compact never deletes what dogbreed
did not write, an output holding anything else is refused before anything is written, and every --out name either
works or is refused up front.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable, write_deltalake

from dogbreed.errors import Exit
from dogbreed.table import readers, schema
from dogbreed.table.location import locate
from dogbreed.table.lock import hold
from dogbreed.table.objects import META_DIR
from dogbreed.table.ownership import MARKER
from dogbreed.table.store import RunWriter, StoreError, clear_orphans, new_run_id, open_table, utcnow
from tests.processes import cli


def one_sentence(proc: subprocess.CompletedProcess) -> str:
    """The refusal's text: one line on stderr, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


class Tree:
    """A folder or an S3 prefix with files in it, seen the same way: write, list, read back."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.fs, self.root = (pafs.FileSystem.from_uri(base) if "://" in base else (pafs.LocalFileSystem(), base))

    def write(self, rel: str, data: bytes) -> str:
        path = f"{self.root}/{rel}"
        if "://" not in self.base:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        return f"{self.base}/{rel}"

    def files(self) -> dict[str, bytes]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        out = {}
        for i in infos:
            if i.type == pafs.FileType.File:
                with self.fs.open_input_stream(i.path) as f:
                    out[i.path[len(self.root) + 1:]] = f.read()
        return out


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """A place for an archive and outputs: a local folder, or a prefix in a fresh bucket on moto_server."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_out").rsplit("/", 2)[0]  # s3://bucket


def _jpeg(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((32, 48, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- an output that holds something else


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_scan_whose_out_is_the_photo_root_is_refused_and_deletes_no_photo(base):
    """The reported loss: `dogbreed scan arch --out arch` removed arch/data/album1/ ("unfinished earlier runs")."""
    arch = Tree(f"{base}/arch")
    arch.write("data/album1/dog.jpg", _jpeg(1))
    arch.write("data/album2/cat.jpg", _jpeg(2))
    arch.write("2024/beach.jpg", _jpeg(3))
    before = arch.files()
    proc = cli("scan", arch.base, "--out", arch.base)
    assert proc.returncode == Exit.USAGE, proc.stderr
    assert one_sentence(proc) == f"error: --out {arch.base} is the photo root {arch.base}; give an output folder outside the photos"
    proc = cli("scan", arch.base, "--out", f"{arch.base}/2024")  # inside a root
    assert proc.returncode == Exit.USAGE and "lies inside the photo root" in one_sentence(proc)
    assert arch.files() == before  # not one byte changed, nothing added


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_an_out_holding_other_files_is_refused_before_anything_is_written(base):
    """`--out` at a folder holding data/customers/list.csv lost that file; now it is refused and left as it was."""
    photos, out = Tree(f"{base}/photos"), Tree(f"{base}/work")
    photos.write("dog.jpg", _jpeg(1))
    out.write("data/customers/list.csv", b"id,name\n1,Ada\n")
    out.write("notes.txt", b"keep me")
    before = out.files()
    proc = cli("scan", photos.base, "--out", out.base)
    assert proc.returncode == Exit.USAGE, proc.stderr
    assert one_sentence(proc).startswith(f"error: --out {out.base} already holds 'data' and more, which dogbreed did "
                                         "not write")
    assert out.files() == before  # no marker, no lock, no run folder
    proc = cli("compact", out.base)
    assert proc.returncode == Exit.USAGE and "which dogbreed did not write" in one_sentence(proc)
    assert out.files() == before


@pytest.mark.parametrize("rows", [0, 1, 5])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_another_tools_delta_table_is_refused_and_left_unchanged(base, rows):
    """It used to get a row of nulls appended (0 or 1 rows) or an IndexError traceback (more)."""
    photos, out = Tree(f"{base}/photos"), f"{base}/sales"
    photos.write("dog.jpg", _jpeg(1))
    loc = locate(out)
    write_deltalake(loc.uri, pa.table({"order": pa.array(range(rows), pa.int64())}), name="sales",
                    storage_options=loc.storage_options())
    before = Tree(out).files()
    proc = cli("scan", photos.base, "--out", out)
    assert proc.returncode == Exit.USAGE, proc.stderr
    assert one_sentence(proc) == (f"error: --out {out} is a Delta table of another tool (named 'sales'); dogbreed writes "
                                  "only to its own tables: give a new folder")
    for args in (["compact", out], ["latest", out]):
        proc = cli(*args)
        assert proc.returncode == Exit.USAGE and "Delta table of another tool" in one_sentence(proc), args
    assert Tree(out).files() == before
    assert DeltaTable(loc.uri, storage_options=loc.storage_options()).to_pyarrow_table().num_rows == rows


# --------------------------------------------------------------------------- cleanup deletes only what dogbreed wrote


def test_cleanup_and_compact_delete_only_files_dogbreed_recorded(base, commit_rows):
    """A marked table where the user later put files (old ones too) and a killed run that left its own files."""
    out = f"{base}/table"
    commit_rows(out, ["/p/a.jpg", "/p/b.jpg"])
    commit_rows(out, ["/p/b.jpg", "/p/c.jpg"], status="dog")
    tree = Tree(out)
    assert json.loads(tree.files()[f"{META_DIR}/{MARKER}"])["format"] == "dogbreed-table"  # marked when first written
    theirs = {"2024/beach.jpg": _jpeg(4), "src/app.py": b"print('hi')\n", "notes.txt": b"mine",
              "data/customers/list.csv": b"id\n1\n", "data/album1/dog.jpg": _jpeg(5)}
    for rel, data in theirs.items():
        tree.write(rel, data)
    if "://" not in out:  # and make them a month old, far beyond any retention
        month_ago = time.time() - 30 * 86400
        for rel in theirs:
            os.utime(Path(out, rel), (month_ago, month_ago))
    # A run killed before its commit: its recorded files go, an unrecorded file beside them stays.
    loc, run_id = locate(out), new_run_id()
    with hold(loc, 30):
        writer = RunWriter(loc, run_id)
        writer.write(schema.to_table({"path": ["/p/x.jpg"], "status": ["dog"], "run_id": [run_id],
                                       "processed_at": pa.array([utcnow()], schema.UTC_US)}))
        writer.flush()
        writer._close_file()
    tree.write(f"data/{run_id}/user-notes.txt", b"not dogbreed's")
    proc = cli("compact", out, "--retention-hours", "1")
    assert proc.returncode == 0, proc.stderr
    after = tree.files()
    for rel, data in theirs.items():
        assert after.get(rel) == data, rel
    assert f"data/{run_id}/part-00000.parquet" not in after  # the killed run's own file went
    assert after[f"data/{run_id}/user-notes.txt"] == b"not dogbreed's"
    assert not any(k.startswith(f"{META_DIR}/runs/") for k in after)  # and so did its record
    current = readers.latest(out)
    assert dict(zip(current["path"], current["status"])) == {"/p/a.jpg": "neither", "/p/b.jpg": "dog", "/p/c.jpg": "dog"}


def test_a_tampered_run_record_deletes_nothing_outside_its_run(tmp_path, commit_rows):
    out = tmp_path / "table"
    commit_rows(out, ["/p/a.jpg"])
    (tmp_path / "precious.txt").write_text("keep")
    (out / "data" / "x").mkdir()
    (out / "data" / "x" / "y.parquet").write_text("keep")
    run_id = new_run_id()
    record = {"run_id": run_id, "files": ["../precious.txt", str(tmp_path / "precious.txt"), "data/x/y.parquet",
                                          f"data/{run_id}/../x/y.parquet"]}
    (out / META_DIR / "runs").mkdir(parents=True, exist_ok=True)
    (out / META_DIR / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    loc = locate(out)
    with hold(loc, 30):
        assert clear_orphans(loc, open_table(loc)) == [run_id]
    assert (tmp_path / "precious.txt").read_text() == "keep" and (out / "data" / "x" / "y.parquet").read_text() == "keep"


@pytest.mark.parametrize("run_id", ["..", ".", "x/..", "x/../.."])
def test_a_run_record_whose_run_id_names_a_parent_deletes_nothing(tmp_path, commit_rows, run_id):
    """A record named '...json' with run_id '..' made data/../ the output itself: compact deleted OUT/mine.parquet."""
    out = tmp_path / "table"
    commit_rows(out, ["/p/a.jpg"])
    (out / "mine.parquet").write_text("keep")
    (out / "data" / "mine.parquet").write_text("keep")
    runs = out / META_DIR / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run_id, "files": [f"data/{run_id}/mine.parquet", "data/../mine.parquet"]}
    (runs / f"{run_id}.json").parent.mkdir(parents=True, exist_ok=True)
    (runs / f"{run_id}.json").write_text(json.dumps(record))
    loc = locate(out)
    with hold(loc, 30):
        assert clear_orphans(loc, open_table(loc)) == []
    assert (out / "mine.parquet").read_text() == "keep" and (out / "data" / "mine.parquet").read_text() == "keep"


# --------------------------------------------------------------------------- every --out name works or is refused


@pytest.mark.parametrize("name", ["a%2Fb", "out%20pct", "new\nline", "tab\there"])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_out_names_delta_lake_cannot_hold_are_refused_up_front(tmp_path, name):
    """`a%2Fb` used to commit a version 0 whose data files were deleted; a newline aborted the process."""
    photos = Tree(str(tmp_path / "photos"))
    photos.write("dog.jpg", _jpeg(1))
    out = tmp_path / "outs" / name
    proc = cli("scan", photos.base, "--out", str(out))
    assert proc.returncode == Exit.USAGE, proc.stderr
    assert "which Delta Lake cannot store in a table path; give another folder name" in one_sentence(proc)
    assert not (tmp_path / "outs").exists()  # nothing created


@pytest.mark.parametrize("name", ["sp ace", "ünï→cøde", "ha#sh", "q?mark", "pct%", "pct%zz"])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_other_out_names_work_end_to_end(tmp_path, commit_rows, name):
    out = tmp_path / name
    commit_rows(out, ["/p/a.jpg"])
    commit_rows(out, ["/p/b.jpg"], status="dog")
    assert sorted(readers.latest(out)["path"]) == ["/p/a.jpg", "/p/b.jpg"]
    proc = cli("compact", str(out), "--retention-hours", "1")
    assert proc.returncode == 0, proc.stderr
    proc = cli("latest", str(out))
    assert proc.returncode == 0 and "/p/b.jpg" in proc.stdout, proc.stderr


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_s3_out_names_outside_the_safe_characters_are_refused_up_front(s3_out, commit_rows):
    base = s3_out.rsplit("/", 1)[0]
    commit_rows(f"{base}/night-2024_v1.0", ["/p/a.jpg"])
    assert list(readers.latest(f"{base}/night-2024_v1.0")["path"]) == ["/p/a.jpg"]
    for name in ("sp ace", "ünï→cøde", "q?mark", "ha#sh", "a%2Fb"):
        proc = cli("latest", f"{base}/{name}")
        assert proc.returncode == Exit.USAGE and "cannot store in a table path" in one_sentence(proc), name


# --------------------------------------------------------------------------- locks that would block forever


def _lock_record(out: Path, body: bytes) -> None:
    lock = out / META_DIR / "lock"
    lock.mkdir(parents=True, exist_ok=True)
    for old in lock.glob("*.json"):
        old.unlink()
    (lock / "000000000099.json").write_bytes(body)


@pytest.mark.parametrize("body, says", [
    (b"[]", "is malformed"), (b"{not json", "is malformed"), (b'{"renewed": "soon", "lease_s": 60}', "is malformed"),
    (json.dumps({"holder": "scan pid 1 on elsewhere", "renewed": time.time() + 10 * 86400, "lease_s": 60,
                 "host": "elsewhere", "pid": 1}).encode(), "s in the future, beyond its 60 s lease"),
])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_malformed_or_future_lock_record_is_one_sentence_and_breakable(tmp_path, commit_rows, body, says):
    out = tmp_path / "table"
    commit_rows(out, ["/p/a.jpg"])
    _lock_record(out, body)
    proc = cli("compact", str(out))
    assert proc.returncode == Exit.LOCKED, proc.stderr
    text = one_sentence(proc)
    assert says in text and text.endswith("if no dogbreed run is using it, run again with --break-lock"), text
    proc = cli("compact", str(out), "--break-lock")
    assert proc.returncode == 0, proc.stderr
    assert not (out / META_DIR / "lock" / "000000000099.json").exists()  # the bad record is gone: the next run is fine
    assert cli("compact", str(out)).returncode == 0


def test_a_failed_lock_attempt_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Zero-byte temporary files of failed attempts (a full disk) used to stay forever."""
    out = tmp_path / "table"
    import dogbreed.table.objects as objects

    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "x" in mode:
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr(objects, "open", full_disk, raising=False)
    with pytest.raises(StoreError, match="No space left on device"):
        with hold(locate(out), 30):
            pass
    leftovers = [p for p in out.rglob("*") if p.is_file()]
    assert leftovers == []


@pytest.mark.parametrize("inside", [[], [".table.json.0123456789abcdef0123456789abcdef"]])
def test_a_first_run_racing_another_first_runs_claim_takes_its_turn_at_the_lock(tmp_path, inside):
    """Four first runs racing on one new folder: one saw `_dogbreed/` made (or its marker's temporary file written)
    by another before the marker was linked in, and crashed with "already holds '_dogbreed', which dogbreed did
    not write" instead of being refused by the lock (CI, test_of_racing_processes_exactly_one_takes_the_lock)."""
    out = tmp_path / "out"
    (out / META_DIR).mkdir(parents=True)
    for name in inside:
        (out / META_DIR / name).write_bytes(b'{"format": "dogbreed-')  # a claim caught half-way
    with hold(locate(out), 30):
        assert json.loads((out / META_DIR / MARKER).read_text())["format"] == "dogbreed-table"
    (out / "notes.txt").write_text("a user's file")  # beside the folder, the same claim is still refused
    other = tmp_path / "other"
    (other / META_DIR).mkdir(parents=True)
    (other / "notes.txt").write_text("a user's file")
    with pytest.raises(Exception, match="which dogbreed did not write"):
        with hold(locate(other), 30):
            pass
