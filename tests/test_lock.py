"""The lease lock on a local output, in this process and against real child processes: hold, refuse, release, take
over a SIGKILLed holder, lose a lease that is not renewed, break a live lock, and tidy earlier generations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from dogbreed.table import lock
from dogbreed.table.location import locate
from dogbreed.table.lock import Lease, hold, holder
from dogbreed.table.objects import META_DIR
from dogbreed.table.store import ScanLocked

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


@pytest.fixture
def out(tmp_path) -> str:
    return str(tmp_path / "out")


def generations(out: str) -> list[str]:
    return sorted(p.name for p in Path(out, META_DIR, lock.LOCK_DIR).glob("*.json"))


def record(out: str, name: str) -> dict:
    return json.loads(Path(out, META_DIR, lock.LOCK_DIR, name).read_text())


@pytest.fixture
def clock(monkeypatch):
    """Moves the lock module's monotonic clock forward (only there: pytest and the renew thread keep the real one)."""
    shift = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: time.monotonic() + shift[0], time=time.time)
    monkeypatch.setattr(lock, "time", fake)

    def advance(seconds: float) -> None:
        shift[0] += seconds

    return advance


HOLDER = """
    import sys
    from dogbreed.table.location import locate
    from dogbreed.table.lock import hold
    with hold(locate(sys.argv[1]), 30, what=sys.argv[2]) as lease:
        print("held", flush=True)
        sys.stdin.readline()                   # the test says when to look again (or SIGKILLs it here)
        lease.renew()
        try:
            lease.check(sys.argv[1])
            print("still mine", flush=True)
        except Exception as e:
            print(f"{type(e).__name__}: {e}", flush=True)
"""


@pytest.fixture
def child_holder(out):
    """child_holder(what) -> a separate Python process holding the lock on `out` (killed at the end if still there)."""
    procs: list[subprocess.Popen] = []

    def start(what: str = "scan") -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), out, what], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "held", proc.stderr.read() if proc.poll() is not None else line
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- in this process


def test_hold_gives_a_lease_recorded_as_generation_one(out):
    with hold(locate(out), 30) as lease:
        assert isinstance(lease, Lease) and not lease.lost
        lease.check(out)  # does not raise
        assert generations(out) == ["000000000001.json"]
        rec = record(out, "000000000001.json")
        assert (rec["pid"], rec["host"], rec["lease_s"], rec["released"]) == (os.getpid(), HOST, 30, False)
        assert rec["holder"] == f"scan pid {os.getpid()} on {HOST}"


def test_a_second_hold_is_refused_at_once_naming_the_holder(out):
    with hold(locate(out), 30, what="compact"):
        t0 = time.monotonic()
        with pytest.raises(ScanLocked, match=rf"another scan is already running on {out} \(compact pid {os.getpid()} "
                                             rf"on {HOST}, since \d{{4}}-"):
            with hold(locate(out), 30):
                pytest.fail("a second holder got the lock")
        assert time.monotonic() - t0 < 2


def test_release_frees_the_lock_and_marks_the_record_released(out):
    with hold(locate(out), 30):
        pass
    assert record(out, "000000000001.json")["released"] is True
    with hold(locate(out), 30):  # at once, while the first lease would still run
        assert generations(out) == ["000000000002.json"]


def test_holder_returns_the_live_record_and_none_after_release(out):
    assert holder(locate(out)) is None  # never held
    with hold(locate(out), 30, what="relabel"):
        found = holder(locate(out))
        assert found is not None and found["holder"].startswith("relabel pid ") and found["pid"] == os.getpid()
    assert holder(locate(out)) is None


def test_earlier_generations_are_deleted_on_acquire(out):
    for _ in range(3):
        with hold(locate(out), 30):
            pass
    (Path(out, META_DIR, lock.LOCK_DIR) / "000000000001.json").write_text("{}")  # one left behind by a crash
    with hold(locate(out), 30):
        assert generations(out) == ["000000000004.json"]


def test_a_lease_that_cannot_be_renewed_is_lost_after_lease_s(out, clock, monkeypatch):
    with hold(locate(out), 30) as lease:
        def refuse(name, data):
            raise OSError("the store stopped answering")

        monkeypatch.setattr(lease.store, "put", refuse)
        clock(20)
        lease.renew()  # fails quietly: retried on the next turn
        assert not lease.lost
        clock(11)
        assert lease.lost and lease.lost_reason == "its lease was not renewed for over 30 s"
        with pytest.raises(ScanLocked, match=rf"^this run lost the lock on {out} \(its lease was not renewed for over "
                                             r"30 s\); nothing was committed$"):
            lease.check(out)


def test_a_renewed_lease_runs_from_its_last_renewal(out, clock):
    with hold(locate(out), 30) as lease:
        before = record(out, "000000000001.json")["renewed"]
        clock(20)
        lease.renew()
        clock(20)  # 40 s after taking it, 20 s after renewing it
        assert not lease.lost
        assert record(out, "000000000001.json")["renewed"] > before


def test_break_lock_takes_over_a_live_lock_and_the_old_holder_sees_it_lost(out):
    with hold(locate(out), 30) as first:
        with hold(locate(out), 30, break_lock=True) as second:
            assert second.generation == 2 and generations(out) == ["000000000002.json"]
            first.renew()
            assert first.lost and first.lost_reason == "another run took it over as 000000000002.json"
            with pytest.raises(ScanLocked, match=r"lost the lock .*another run took it over"):
                first.check(out)
            assert holder(locate(out))["since"] == second.record["since"]
            second.check(out)  # the new holder is fine
    assert generations(out) == ["000000000002.json"]  # the old holder's release did not bring its generation back


# ---------------------------------------------------------------- real child processes


def test_a_live_child_holder_is_named_and_when_sigkilled_is_taken_over_at_once(out, child_holder):
    proc = child_holder("scan")
    with pytest.raises(ScanLocked, match=rf"\(scan pid {proc.pid} on {HOST}, since "):
        with hold(locate(out), 30):
            pass
    assert holder(locate(out))["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert holder(locate(out)) is None  # its 30 s lease still runs, but the kernel says it is gone
    t0 = time.monotonic()
    with hold(locate(out), 30) as lease:
        assert lease.generation == 2
    assert time.monotonic() - t0 < 2


def test_a_child_whose_lock_was_broken_sees_it_lost(out, child_holder):
    proc = child_holder("scan")
    with hold(locate(out), 30, break_lock=True):
        answer, err = proc.communicate("look\n", timeout=60)
    assert answer.strip() == f"ScanLocked: this run lost the lock on {out} (another run took it over as " \
                             "000000000002.json); nothing was committed", err
