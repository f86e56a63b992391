"""Sandbox with a tiny worker defined here: results, crashes and hangs named and survived, the memory cap, setup
failures, close(), and a child that dies with its parent.

The child process imports this file as the module ``test_sandbox`` (its folder is put on PYTHONPATH).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dogbreed.vision.sandbox import Sandbox, SandboxError

HERE = Path(__file__).resolve().parent
WORKER = f"{Path(__file__).stem}:make_worker"


# ---------------------------------------------------------------- the worker the child runs


def make_worker(greeting: str = "hello", fail_setup: bool = False):
    """Called once in the child with the setup dict; returns the per-request task."""
    if fail_setup:
        raise ValueError("no such model file: /models/x.bin")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the crashes below leave no core file in the working folder

    def task(action: str, arg=None):
        if action == "echo":
            print("a stray print must not corrupt the protocol")
            return {"greeting": greeting, "arg": arg, "pid": os.getpid()}
        if action == "nice":
            return os.nice(0)
        if action == "raise":
            try:
                raise ValueError(f"bad photo {arg}")
            except ValueError as e:
                return f"error: {e}"
        if action == "raise_uncaught":
            raise ValueError(f"bad photo {arg}")
        if action == "abort":
            os.abort()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "segv":
            ctypes.string_at(0)
        if action == "hang":
            time.sleep(arg)
        if action == "alloc":
            try:
                block = bytearray(arg << 20)
            except MemoryError:
                return "MemoryError"
            return len(block) >> 20
        raise AssertionError(f"unknown action {action}")

    return task


# ---------------------------------------------------------------- helpers


@pytest.fixture
def sandbox(monkeypatch):
    """sandbox(timeout_s=10, **kwargs) -> a Sandbox running make_worker; every one is closed at the end."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    made: list[Sandbox] = []

    def make(timeout_s: float = 10, setup: dict | None = None, worker: str = WORKER, **kwargs) -> Sandbox:
        made.append(Sandbox(worker, setup or {}, timeout_s, **kwargs))
        return made[-1]

    yield make
    for sb in made:
        sb.close()


def running(pid: int) -> bool:
    """True while pid is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- results


def test_results_come_back_from_a_child_set_up_once(sandbox):
    sb = sandbox(setup={"greeting": "woof"})
    first, err = sb("echo", [1, b"\x00bytes", {"k": 2.5}])
    assert err is None and first["greeting"] == "woof" and first["arg"] == [1, b"\x00bytes", {"k": 2.5}]
    assert first["pid"] not in (os.getpid(), None)
    second, _ = sb("echo", None)
    assert second["pid"] == first["pid"] and sb.restarts == 0  # one child serves request after request


def test_an_exception_the_worker_catches_comes_back_as_its_return_value(sandbox):
    sb = sandbox()
    assert sb("raise", "x.jpg") == ("error: bad photo x.jpg", None)
    assert sb.restarts == 0


def test_an_uncaught_exception_ends_the_child_and_the_next_request_works(sandbox):
    sb = sandbox()
    assert sb("raise_uncaught", "x.jpg") == (None, "decoder exited with code 1")
    assert sb("raise", "y.jpg") == ("error: bad photo y.jpg", None) and sb.restarts == 1


def test_nice_lowers_the_childs_priority(sandbox):
    assert sandbox(nice=7)("nice") == (os.nice(0) + 7, None)


# ---------------------------------------------------------------- crashes and hangs


@pytest.mark.parametrize("action, reason", [
    ("abort", "decoder crashed (SIGABRT)"),
    ("kill", "decoder was killed (SIGKILL; out of memory?)"),
    ("segv", "decoder crashed (SIGSEGV)"),
])
def test_a_crash_is_named_and_a_fresh_child_takes_the_next_request(sandbox, action, reason):
    sb = sandbox()
    before, _ = sb("echo", 1)
    assert sb(action) == (None, reason)
    assert sb.restarts == 1 and not running(before["pid"])
    after, err = sb("echo", 2)
    assert err is None and after["arg"] == 2 and after["pid"] != before["pid"]


def test_a_hang_is_cut_off_after_timeout_s_and_the_next_request_works(sandbox):
    sb = sandbox(timeout_s=1)
    before, _ = sb("echo", 1)  # started: the timeout is the request's, not the child's start-up
    t0 = time.monotonic()
    assert sb("hang", 60) == (None, "decoder hung for over 1 s")
    assert time.monotonic() - t0 < 1 + 2
    assert sb.restarts == 1 and not running(before["pid"])
    assert sb("echo", 2)[0]["arg"] == 2


def test_memory_mb_caps_the_child_so_a_big_allocation_fails_inside_it(sandbox):
    sb = sandbox(memory_mb=100)
    assert sb("alloc", 150) == ("MemoryError", None)  # 150 MiB over a 100 MiB cap: refused, and the child lives on
    assert sb("alloc", 20) == (20, None)
    assert sb.restarts == 0
    assert sandbox()("alloc", 150) == (150, None)  # without the cap the same request succeeds


LOWER_HARD_LIMIT = """
    import resource, sys
    from dogbreed.vision.sandbox import Sandbox
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))  # a node (or container) whose own hard limit is 2 GiB
    sb = Sandbox(sys.argv[1], {}, timeout_s=60, memory_mb=4096)  # the default cap, above what may be set there
    print(sb("alloc", 20)[0], sb("alloc", 3000)[0], flush=True)
"""


def test_a_memory_cap_above_the_process_hard_limit_keeps_the_lower_limit(monkeypatch):
    """A cap the kernel refuses (over the hard limit a process inherits) made every photo a transient error row."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LOWER_HARD_LIMIT), WORKER], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["20", "MemoryError"]


# ---------------------------------------------------------------- setup, close, parent death


def test_a_worker_whose_setup_raises_gives_sandbox_error_with_its_one_line(sandbox):
    with pytest.raises(SandboxError, match=r"^the decoder process did not start: ValueError: no such model file: "
                                           r"/models/x.bin$"):
        sandbox(setup={"fail_setup": True})("echo")


def test_a_worker_that_cannot_be_imported_gives_sandbox_error(sandbox):
    with pytest.raises(SandboxError, match=r"did not start: ModuleNotFoundError: No module named 'no_such_module'$"):
        sandbox(worker="no_such_module:make")("echo")


def test_close_ends_the_child(sandbox):
    sb = sandbox()
    pid = sb("echo")[0]["pid"]
    sb.close()
    assert sb.proc is None and not running(pid)


PARENT = """
    import sys, threading, time, os
    from dogbreed.vision.sandbox import Sandbox
    sb = Sandbox(sys.argv[1], {}, timeout_s=600)
    print(sb("echo")[0]["pid"], flush=True)
    threading.Thread(target=sb, args=("hang", 600), daemon=True).start()  # the child now sleeps, deaf to its stdin
    time.sleep(0.5)
    os._exit(0)
"""


def test_the_child_dies_with_its_parent_even_while_busy(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.run([sys.executable, "-c", textwrap.dedent(PARENT), WORKER], capture_output=True, text=True,
                            timeout=60)
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[0])
    try:
        assert wait_gone(child, timeout=5), f"decoder child {child} outlived its parent"
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)
