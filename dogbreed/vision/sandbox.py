"""Poison isolation: photos are read, decoded and searched for faces in a child process, one at a time.

A photo that crashes native code (SIGSEGV in a decoder, abort, killed for memory) or hangs inside it takes
only the child down. The parent names the photo ("decoder crashed (SIGSEGV)", "decoder hung for over
60 s"), starts a fresh child, and carries on with the rest of the batch. The child's memory is capped with
RLIMIT_DATA, so a photo that needs too much fails with MemoryError instead of waking the kernel's OOM killer.

The protocol is length-prefixed pickles over the child's stdin/stdout, between two processes of this
package (no model file is ever unpickled).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

_HEADER = struct.Struct("!Q")
STARTUP_TIMEOUT_S = 120.0  # importing numpy, Pillow and OpenCV in a fresh interpreter, on a loaded node


class SandboxError(Exception):
    """The child could not be started; every photo handed to it becomes a transient error row."""


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes from fd, or None at EOF; raises TimeoutError past the deadline."""
    parts, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _recv(fd: int, deadline: float | None) -> Any:
    """The next message, or raises EOFError (child gone) / TimeoutError (no answer in time)."""
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        raise EOFError
    body = _read_exact(fd, _HEADER.unpack(head)[0], deadline)
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _death_reason(returncode: int | None) -> str:
    if returncode is None:
        return "decoder stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if name == "SIGKILL":
            return "decoder was killed (SIGKILL; out of memory?)"
        return f"decoder crashed ({name})"
    return f"decoder exited with code {returncode}"


class Sandbox:
    """A child process that runs ``task(*args)`` per request; restarted after every crash or hang.

    ``worker`` names a function ``module:function`` that the child calls once with ``setup`` and that
    returns the per-request callable.
    """

    def __init__(self, worker: str, setup: dict[str, Any], timeout_s: float, memory_mb: int | None = None,
                 nice: int = 0):
        self.worker, self.setup, self.timeout_s, self.memory_mb, self.nice = worker, setup, timeout_s, memory_mb, nice
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "dogbreed.vision.sandbox"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, close_fds=True)
        except OSError as e:
            raise SandboxError(f"the decoder process could not be started: {e.strerror or e}") from None
        try:
            _send(proc.stdin.fileno(), (self.worker, self.setup, self.memory_mb, self.nice))
            ready = _recv(proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
        except (EOFError, TimeoutError, OSError):
            self._kill(proc)
            raise SandboxError(f"the decoder process did not start ({_death_reason(proc.returncode)})") from None
        if ready != "ready":
            self._kill(proc)
            raise SandboxError(f"the decoder process did not start: {ready}")
        self.proc = proc

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __call__(self, *args: Any) -> tuple[Any, str | None]:
        """(result, None), or (None, reason) when the child crashed or hung on this request."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self._kill(self.proc)
                self.restarts += 1
            self._start()
        proc = self.proc
        try:
            _send(proc.stdin.fileno(), args)
            return _recv(proc.stdout.fileno(), time.monotonic() + self.timeout_s), None
        except TimeoutError:
            self._kill(proc)
            self.proc = None
            self.restarts += 1
            return None, f"decoder hung for over {self.timeout_s:g} s"
        except (EOFError, BrokenPipeError, ConnectionResetError):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            reason = _death_reason(proc.returncode)
            self._kill(proc)
            self.proc = None
            self.restarts += 1
            return None, reason

    def close(self) -> None:
        if self.proc is not None:
            self._kill(self.proc)
            self.proc = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _limit_memory(memory_mb: int | None) -> None:
    if memory_mb:
        import resource

        limit = int(memory_mb) << 20
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:  # a process may only lower its hard limit: a lower one already caps it
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when its parent dies, even while it hangs inside native code (where
    it would never see stdin close), so a killed decode worker leaves no orphan behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _child() -> None:
    """The child's loop: set up once, then answer one request at a time until stdin closes."""
    import importlib

    _die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above: nothing to serve
        return

    rfd, wfd = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the protocol
    try:
        worker, setup, memory_mb, nice = _recv(rfd, None)
        if nice:
            os.nice(nice)
        module, name = worker.split(":")
        task = getattr(importlib.import_module(module), name)(**setup)
        _limit_memory(memory_mb)
    except EOFError:
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        _send(wfd, f"{type(e).__name__}: {e}")
        return
    _send(wfd, "ready")
    while True:
        try:
            args = _recv(rfd, None)
        except EOFError:
            return
        _send(wfd, task(*args))


if __name__ == "__main__":
    _child()
