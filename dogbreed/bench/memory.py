"""Peak memory of the driver and of the Ray worker processes below it, read from /proc (Linux)."""

from __future__ import annotations

import os
import threading


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


class PeakMemory(Sampling):
    """Peak RSS (MiB) of this driver and of the Ray worker processes below it while the block runs.

    The driver's peak is the kernel's high-water mark (reset on entry); workers are sampled every `every` s,
    the inference actor ("MapWorker") apart from the decode task workers and their sandboxed decoder children.
    """

    def __init__(self, every: float = 0.5):
        self.every, self.peaks = every, {"driver": 0.0, "actor": 0.0, "decode worker": 0.0, "decode child": 0.0}

    def _sample(self) -> None:
        for pid, cmd in _descendants(os.getpid()).items():
            if "dogbreed.vision.sandbox" in cmd:
                kind = "decode child"  # the sandboxed process that really decodes (dogbreed.vision.sandbox)
            elif not cmd.startswith("ray::") or "Dashboard" in cmd or "RuntimeEnv" in cmd:
                continue
            else:
                kind = "actor" if "MapWorker" in cmd else "decode worker"
            self.peaks[kind] = max(self.peaks[kind], _status_kb(pid, "VmRSS") / 1024)

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the peak of this block, not of the whole benchmark
        except OSError:
            pass
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.peaks["driver"] = _status_kb("self", "VmHWM") / 1024
