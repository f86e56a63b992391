"""The output table and its lock, local and on a real S3 protocol server (moto_server on 127.0.0.1), without Ray:
commits, what a killed writer leaves, the lease lock under real killed and paused processes, and --out errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from dogbreed.table import readers
from dogbreed.table.location import OutputError, check_out, locate
from dogbreed.table.lock import hold
from dogbreed.table.store import ScanLocked, clear_orphans, commit, open_table, run_prefixes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    """An output location of each kind: a local folder, and a prefix in a fresh bucket on moto_server."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_out")


def table_state(out: str) -> tuple:
    """What a reader can see: the table's version, its files, and its rows."""
    loc = locate(out)
    table = open_table(loc)
    if table is None:
        return (None, [], [])
    rows = readers.read_all(out).sort_values(["path", "run_id"]).to_dict("records")
    return (table.version(), sorted(table.get_add_actions(flatten=True).column("path").to_pylist()), repr(rows))


def child(code: str, out: str, *args: str, stdin: bool = False) -> subprocess.Popen:
    """A separate Python process running `code` (with OUT as sys.argv[1]); its stdout is a pipe to read lines from
    (and its stdin one to write to, if asked)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), out, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None, text=True, env=env)


def wait_line(proc: subprocess.Popen, expected: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return line
        if not line and proc.poll() is not None:
            pytest.fail(f"child exited {proc.returncode} before {expected!r}: {proc.stderr.read()[-2000:]}")
    pytest.fail(f"child did not print {expected!r} within {timeout} s")


# --------------------------------------------------------------------------- commits and readers


def test_each_run_is_one_commit_that_deltalake_reads_with_its_manifest(out, commit_rows):
    first = commit_rows(out, ["/p/a.jpg", "/p/b.jpg"])
    second = commit_rows(out, ["/p/b.jpg", "/p/c.jpg"], status="dog")
    table = DeltaTable(locate(out).uri)
    assert table.version() == 1
    history = table.to_pandas()
    assert len(history) == 4 and set(history["run_id"]) == {first, second}
    runs = readers.manifests(out)
    assert [(m["run_id"], m["version"], m["counts"]) for m in runs] == [
        (first, 0, {"neither": 2}), (second, 1, {"dog": 2})]
    current = readers.latest(out)
    assert dict(zip(current["path"], current["run_id"])) == {"/p/a.jpg": first, "/p/b.jpg": second, "/p/c.jpg": second}
    assert run_prefixes(locate(out)) == sorted([first, second])


def test_a_run_that_planned_from_an_old_version_cannot_commit(out, commit_rows):
    """Optimistic concurrency backs the lock: of two runs planned from one version, exactly one commits."""
    commit_rows(out, ["/p/a.jpg"])
    loc = locate(out)
    a, b = open_table(loc), open_table(loc)
    commit(loc, a, [], {"run_id": "run-a"})
    with pytest.raises(ScanLocked, match="another writer committed to .* while this run was in progress"):
        commit(loc, b, [], {"run_id": "run-b"})
    assert [m["run_id"] for m in readers.manifests(out)][1:] == ["run-a"]


# --------------------------------------------------------------------------- killed writers


WRITER = """
    import sys, time
    import pyarrow as pa
    from dogbreed.table import schema
    from dogbreed.table.lock import hold
    from dogbreed.table.store import RunWriter, new_run_id, utcnow
    from dogbreed.table.location import locate
    loc, run_id = locate(sys.argv[1]), new_run_id()
    RunWriter.ROW_GROUP = RunWriter.FILE_ROWS = 1          # every row its own finished file
    with hold(loc, float(sys.argv[2])):
        with RunWriter(loc, run_id) as w:
            for i in range(3):
                w.write(schema.to_table({"path": [f"/p/new{i}.jpg"], "status": ["dog"], "run_id": [run_id],
                                          "processed_at": pa.array([utcnow()], schema.UTC_US)}))
            print(run_id, flush=True)
            print("written", flush=True)
            time.sleep(600)                                # killed here, before its commit
"""


SLOW_WRITE = """
    import sys, threading, time
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dogbreed.console import Terminated, stop_on_sigterm
    from dogbreed.table import schema
    from dogbreed.table.location import locate
    from dogbreed.table.store import RunWriter, new_run_id, utcnow
    ended = threading.Event()
    original = pq.ParquetWriter.write_table

    def slow(self, *args, **kwargs):  # the row group in flight takes a while, as a large one does
        print("writing", flush=True)
        time.sleep(1.5)
        original(self, *args, **kwargs)
        ended.set()

    pq.ParquetWriter.write_table = slow
    stop_on_sigterm()
    loc, run_id = locate(sys.argv[1]), new_run_id()
    writer = RunWriter(loc, run_id)
    try:
        with writer:
            writer.write(schema.to_table({"path": ["/p/a.jpg"], "status": ["dog"], "run_id": [run_id],
                                          "processed_at": pa.array([utcnow()], schema.UTC_US)}))
            writer.flush()  # the row group goes to the writing thread; leaving the block waits for it,
            # and the SIGTERM lands in that wait
        print("the signal came too late", flush=True)
    except Terminated:
        print("abandoned after the write ended" if ended.is_set() else "abandoned while the write ran", flush=True)
        sys.exit(1)
"""


def test_a_sigterm_while_a_row_group_is_written_lets_that_write_end_before_its_file_is_closed(out):
    """SIGTERM while the driver waited for the row group in flight: abandon() closed the Parquet writer under the
    writing thread, a segmentation fault in 3 of 5 real scans (no sentence, no log line). A real process, signalled
    while its write runs."""
    proc = child(SLOW_WRITE, out)
    try:
        wait_line(proc, "writing")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and stdout.strip() == "abandoned after the write ended", (proc.returncode, stdout, stderr)
    assert not list(Path(out).rglob("*.parquet"))  # the abandoned run's file is gone


@pytest.mark.slow  # a SIGKILL scenario
def test_sigkilled_writer_leaves_the_table_unchanged_and_the_next_run_removes_its_files(out, commit_rows):
    commit_rows(out, ["/p/a.jpg", "/p/b.jpg"])
    before = table_state(out)
    proc = child(WRITER, out, "600")
    try:
        run_id = proc.stdout.readline().strip()
        wait_line(proc, "written")
        loc = locate(out)
        assert run_id in run_prefixes(loc)  # its files are really there
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert table_state(out) == before  # readers see nothing of it
    with hold(loc, 30):  # its lease still runs, but its process is gone from this host: taken over at once
        assert clear_orphans(loc, open_table(loc)) == [run_id]
    assert run_id not in run_prefixes(loc)
    commit_rows(out, ["/p/c.jpg"])
    assert sorted(readers.latest(out)["path"]) == ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]


# --------------------------------------------------------------------------- the lock


def test_a_second_holder_is_refused_at_once_naming_the_first_and_the_lock_frees_on_release(out):
    loc = locate(out)
    with hold(loc, 30):
        t0 = time.monotonic()
        with pytest.raises(ScanLocked, match=r"another scan is already running on .* \(scan pid \d+ on .*, since "):
            with hold(loc, 30):
                pass
        assert time.monotonic() - t0 < 2  # refused, never waiting
    with hold(loc, 30):
        pass


RACER = """
    import sys
    from dogbreed.table.lock import hold
    from dogbreed.table.store import ScanLocked
    from dogbreed.table.location import locate
    import dogbreed.table.ownership                        # imported before the start, not during the race
    loc = locate(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()                                   # "go": all four start together, whatever the load
    try:
        with hold(loc, 30):
            print("held", flush=True)
            sys.stdin.readline()                           # held until every racer has answered
    except ScanLocked as e:
        print("refused", flush=True)
"""


@pytest.mark.slow  # four Python processes
def test_of_racing_processes_exactly_one_takes_the_lock(out):
    racers = [child(RACER, out, stdin=True) for _ in range(4)]
    try:
        for p in racers:
            wait_line(p, "ready")
        for p in racers:
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().strip() for p in racers]
        outputs = [p.communicate("release\n", timeout=60) for p in racers]
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
    assert sorted(answers) == ["held", "refused", "refused", "refused"], [stderr[-2000:] for _, stderr in outputs]
    with hold(locate(out), 30):  # released at the end
        pass


PAUSED = """
    import sys
    from dogbreed.table.lock import hold
    from dogbreed.table.store import ScanLocked, commit, open_table
    from dogbreed.table.location import locate
    loc = locate(sys.argv[1])
    with hold(loc, 2) as lease:
        table = open_table(loc)
        print("holding", flush=True)
        sys.stdin.readline()                               # paused (SIGSTOP) while waiting here
        try:
            lease.check(sys.argv[1])
            commit(loc, table, [], {"run_id": "paused-run"})
            print("committed", flush=True)
        except ScanLocked as e:
            print("refused:", e, flush=True)
"""


@pytest.mark.slow  # waits out a lease
def test_a_paused_holder_loses_its_lease_and_never_commits_beside_the_run_that_took_over(out, commit_rows):
    commit_rows(out, ["/p/a.jpg"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PAUSED), out], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_line(proc, "holding")
        proc.send_signal(signal.SIGSTOP)  # a frozen VM, a GC pause: it cannot renew
        time.sleep(2.5)
        taker = commit_rows(out, ["/p/b.jpg"], lease_s=2)  # takes the stale lock over and commits
        proc.send_signal(signal.SIGCONT)
        answer, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "refused: this run lost the lock" in answer or "refused: another writer committed" in answer, answer + err
    assert [m["run_id"] for m in readers.manifests(out)][-1] == taker
    assert "paused-run" not in {m["run_id"] for m in readers.manifests(out)}


# --------------------------------------------------------------------------- --out errors: one sentence, nothing made


def test_unusable_outputs_are_one_sentence_and_create_nothing(tmp_path, s3_out):
    with pytest.raises(OutputError, match=r"^--out ftp://host/x: ftp:// output is not supported"):
        check_out("ftp://host/x")
    with pytest.raises(OutputError, match=r"^--out http://127.0.0.1:9/x: http:// output is not supported"):
        check_out("http://127.0.0.1:9/x")  # was a complaint about the ':' of the port
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_out(str(tmp_path / "f"))
    bucket = s3_out.split("/")[2]
    with pytest.raises(OutputError, match=r"bucket no-such-bucket-x does not exist"):
        check_out("s3://no-such-bucket-x/out")
    check_out(s3_out)  # fine, and nothing is created by the check
    import boto3

    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket)


def test_a_uri_no_store_serves_is_one_sentence_for_a_root_a_photo_and_an_out(tmp_path):
    """Arrow said "ArrowInvalid: Unrecognized filesystem type in URI" for predict http://..., and named no remedy."""
    from dogbreed.scan.listing import RootError, check_root
    from dogbreed.table.location import filesystem_from_uri
    from dogbreed.vision.decode import ImageError, read_bytes

    with pytest.raises(ValueError, match=r"^http:// is not storage dogbreed can read; give a local path, an s3://"):
        filesystem_from_uri("http://127.0.0.1:9/x.jpg")
    with pytest.raises(ImageError, match=r"^http:// is not storage dogbreed can read"):
        read_bytes("http://127.0.0.1:9/x.jpg", 1000)
    with pytest.raises(RootError, match=r"^root https://127.0.0.1:9/p is unreachable: https:// is not storage"):
        check_root("https://127.0.0.1:9/p")
    assert filesystem_from_uri(f"file://{tmp_path}")[1] == str(tmp_path)


@pytest.mark.slow  # the S3 client's bounded retries take 6 s
def test_an_unreachable_store_is_one_sentence(s3_out, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(OutputError, match=r"^--out s3://\S+: cannot reach the store \(.*\); check the credentials"):
        check_out(s3_out)


@pytest.mark.slow  # waits out the bounded timeouts: about 20 s each
def test_a_store_that_takes_the_connection_and_never_answers_is_given_up_in_seconds(monkeypatch):
    """An endpoint that accepted connections and never replied: `latest`, `check` and `compact` took 100 s in S3's
    client (its default retries) and then, past that check, 182 s more in deltalake's object store (retry_timeout
    180 s), which outlasts the scan's 60-s lock lease. Both clients now stop after a bounded silence."""
    import socket
    import threading

    from deltalake import DeltaTable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])  # taken, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputError, match=r"^--out s3://silent/t: cannot reach the store \(.*Timeout"):
            check_out("s3://silent/t")
        assert time.monotonic() - t0 < 45
        t0 = time.monotonic()
        with pytest.raises(Exception, match="retry_timeout"):
            DeltaTable("s3://silent/t", storage_options=locate("s3://silent/t").storage_options())
        assert time.monotonic() - t0 < 45
    finally:
        server.close()
        for c in held:
            c.close()


def test_a_gs_store_gives_up_in_seconds_not_the_google_clients_fifteen_minutes():
    """`scan --out gs://bucket/out` without credentials or network was alive after 935 s, deaf to SIGTERM (the
    hostile tester's finding): Google's client retries for 15 minutes by default. Every gs:// filesystem dogbreed
    makes (output, roots, photos) comes from filesystem_from_uri; a URI's own retry_limit_seconds is kept."""
    import datetime

    from dogbreed.table.location import GCS_RETRY_S, filesystem_from_uri

    def retry_limit(fs) -> datetime.timedelta:
        return fs.__reduce__()[1][0]["retry_time_limit"]  # GcsFileSystem's own options, as pickle sees them

    fs, root = filesystem_from_uri("gs://bucket/some/out")
    assert root == "bucket/some/out" and retry_limit(fs) == datetime.timedelta(seconds=GCS_RETRY_S)
    assert retry_limit(filesystem_from_uri("gs://bucket/out?retry_limit_seconds=3")[0]) == datetime.timedelta(seconds=3)
    assert retry_limit(locate("gs://bucket/out").fs) == datetime.timedelta(seconds=GCS_RETRY_S)
