"""Peak memory and CPU time of the driver and of the Ray worker processes below it, read from /proc (Linux); and the
wall and CPU time of a block of this process (Clock)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


def _status_kb(pid: int | str, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below root (Ray's raylet and its workers, for a local Ray)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    children: dict[int, list[int]] = {}
    for pid, par in parent.items():
        children.setdefault(par, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        todo += children.get(pid, [])
    return out


class Sampling:
    """Calls ``_sample()`` every ``every`` seconds on a daemon thread while the with-block runs.

    Subclasses define ``_sample`` (what one reading does) and ``every``.
    """

    every: float = 0.5

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _kind(cmd: str) -> str | None:
    """Which part of a scan a process below the driver is, from its command line (None: Ray's own)."""
    if "dogbreed.vision.sandbox" in cmd:
        return "decode child"  # the sandboxed process that really decodes (dogbreed.vision.sandbox)
    if not cmd.startswith("ray::") or "Dashboard" in cmd or "RuntimeEnv" in cmd:
        return None
    return "actor" if "MapWorker" in cmd else "decode worker"


class PeakMemory(Sampling):
    """Peak RSS (MiB) and CPU seconds of this driver and of the Ray worker processes below it while the block runs.

    The driver's peak is the kernel's high-water mark (reset on entry) and its CPU time its own; workers are
    sampled every `every` s, the inference actor ("MapWorker") apart from the decode task workers and their
    sandboxed decoder children. A worker's CPU counts from the block's start; a process that ends between two
    samples loses at most `every` s of it.
    """

    KINDS = ("driver", "actor", "decode worker", "decode child")

    def __init__(self, every: float = 0.5):
        self.every = every
        self.peaks = {k: 0.0 for k in self.KINDS}
        self.cpu_s = {k: 0.0 for k in self.KINDS}

    def _sample(self) -> None:
        for pid, cmd in _descendants(os.getpid()).items():
            kind = _kind(cmd)
            if kind is None:
                continue
            self.peaks[kind] = max(self.peaks[kind], _status_kb(pid, "VmRSS") / 1024)
            cpu = _cpu_s(pid)
            if cpu:
                self._used[pid] = (kind, cpu - self._before.get(pid, 0.0))

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the peak of this block, not of the whole benchmark
        except OSError:
            pass
        self._before = {pid: _cpu_s(pid) for pid in _descendants(os.getpid())}
        self._used: dict[int, tuple[str, float]] = {}
        t = os.times()
        self._driver0 = t.user + t.system
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._sample()  # the workers' CPU up to the end of the block
        self.peaks["driver"] = _status_kb("self", "VmHWM") / 1024
        t = os.times()
        self.cpu_s["driver"] = t.user + t.system - self._driver0
        for kind, seconds in self._used.values():
            self.cpu_s[kind] += max(seconds, 0.0)


@dataclass
class Clock:
    """Wall and CPU seconds of the block it times (CPU: every thread of this process)."""
    seconds: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> "Clock":
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds, self.cpu = time.perf_counter() - self._t, time.process_time() - self._c
