"""What a run shows and where it logs (terminal or cron's mail, the log file), SIGTERM, and the exit codes.

Under cron (stderr not a terminal) Ray's native log lines stay in Ray's own logs; the console gets
warnings, refusals and the final line, and the log file gets everything at INFO and up.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def printable(name: str) -> str:
    """A name (a file, a breed) as printed on a line: as it is, or quoted with escapes where it holds a newline or
    another control character, so a file named "x.jpg\\ncat.jpg: dog: ..." cannot print a line of its own making."""
    return name if name.isprintable() else repr(name)


def setup_logging(log_file: str | None, verbose: bool = False) -> None:
    """INFO and up go to the log file; the terminal (or cron's mail) gets warnings and errors only."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_file:
        try:
            handlers.append(_log_file_handler(log_file))
        except OSError as e:
            print(f"warning: cannot write the log file {log_file}: {e.strerror or e}", file=sys.stderr)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _log_file_handler(log_file: str) -> logging.Handler:
    """Appends to `log_file` (made with its folder where missing). A named pipe is written as any file (`--log-file
    /dev/stdout` under Docker or systemd, `| tee`), but one that nobody reads is refused at once, not waited on."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    try:  # O_NONBLOCK: opening a FIFO without a reader fails (ENXIO) instead of waiting for one
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "it is a named pipe that nobody reads") from None
        raise
    os.set_blocking(fd, True)  # this very descriptor is kept: closing it would be end-of-file to the pipe's reader
    handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)
    handler.setStream(open(fd, "a", encoding="utf-8"))
    return handler


@contextmanager
def native_stderr_quiet(enabled: bool) -> Iterator[None]:
    """Under cron (stderr not a terminal), keep Ray's native log lines off stderr; Python's messages stay.

    Python writes (warnings, refusals) go to a duplicate of the real stderr; file descriptor 2, which native
    code (Ray's C++ core worker, child processes) writes to, points to /dev/null meanwhile. Ray keeps those
    lines in its own session logs.
    """
    try:
        real = sys.stderr.fileno() == 2  # not when stderr is captured (tests, notebooks)
    except (AttributeError, OSError, ValueError):
        real = False
    if not enabled or not real:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    console = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                        errors="backslashreplace")
    old_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        sys.stderr = console
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(console)
        yield
    finally:
        console.flush()
        os.dup2(saved_fd, 2)
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(old_stderr)
        sys.stderr = old_stderr
        for fd in (saved_fd, devnull):
            os.close(fd)
        # `console` stays open: loggers created meanwhile (Ray Data's) may still hold it until exit.


class Terminated(BaseException):
    """SIGTERM (cron's timeout, systemd, Kubernetes) arrived: unwind, so the scan stops its Ray and commits nothing."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
