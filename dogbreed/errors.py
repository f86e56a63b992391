"""The project's error types and the one table of exit codes that commands (and cron, and `dogbreed submit`) use.

Every error a user can cause is a :class:`DogbreedError`; its class says how it is reported: the label printed
before the sentence and the exit code. The CLI catches these types and nothing else, so a real bug keeps its
traceback. A photo that cannot be read is never an exception here: it is an error row.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path


class Exit(IntEnum):
    """What every dogbreed command exits with (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # the run failed; nothing was committed
    USAGE = 2  # a bad argument, config, model, output or labelled folder; nothing ran (submit: not submitted)
    BAD_PHOTOS = 3  # committed, and some photos were unreadable (error rows)
    REFUSED = 4  # the archive looks unavailable (missing root, emptied, mass deletion); nothing changed
    LOCKED = 5  # another run holds the output's lock
    STOPPED = 6  # submit: the job was stopped on the cluster
    UNFINISHED = 7  # submit: following ended before the job did (log stream lost, status unreadable); it may still run
    INTERRUPTED = 130  # submit: Ctrl-C while following; the job keeps running


class DogbreedError(Exception):
    """Base of the errors a user can cause: one sentence (str(e)), a label and an exit code."""

    exit_code: Exit = Exit.FAILED
    label = "failed"


class UsageError(DogbreedError, ValueError):
    """Something given cannot be used (config, model, output, labelled folder, photo file); nothing ran."""

    exit_code, label = Exit.USAGE, "error"


class Refused(DogbreedError, RuntimeError):
    """The archive looks unavailable or the run would do something drastic; nothing was changed."""

    exit_code, label = Exit.REFUSED, "refused"


class Locked(DogbreedError, RuntimeError):
    """Another run holds the output's lock (or took it over while this one ran); nothing was committed."""

    exit_code, label = Exit.LOCKED, "refused"


class Failed(DogbreedError, RuntimeError):
    """The run started and could not finish (store unwritable, every photo lost); nothing was committed."""

    exit_code, label = Exit.FAILED, "failed"


MAX_TEXT_BYTES = 4 << 20  # a config, a classes file or a model.json is kilobytes: nothing this large is one


def read_text(path: str | Path, encoding: str = "utf-8", limit: int = MAX_TEXT_BYTES, streams: bool = True) -> str:
    """A small text file the user named (a config, a classes file, a model.json), read with bounded effort: at most
    `limit` bytes (/dev/zero, a huge file: an OSError whose strerror says so). A named pipe (`--config <(...)`,
    /dev/stdin) is read as it is written, waiting at most PIPE_WAIT_S for the next bytes, never for ever for a writer
    that does not come; without `streams` (a file inside a table) only a regular file is read. A folder is an OSError
    too. Callers turn OSError and UnicodeDecodeError into their sentence."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO waits for a writer otherwise
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode) or not (streams or stat.S_ISREG(mode)):
        os.close(fd)
        raise OSError(errno.EISDIR, "it is a folder, not a file", str(path)) if stat.S_ISDIR(mode) else \
            OSError(errno.EINVAL, "not a regular file (a device, pipe or socket)", str(path))
    with os.fdopen(fd, "rb", buffering=-1 if stat.S_ISREG(mode) else 0) as f:  # buffered: read(n) loops over short reads
        if stat.S_ISREG(mode):
            data = f.read(limit + 1)
        else:
            data = _read_stream(fd, limit, str(path))
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB, far more than such a file holds", str(path))
    return data.decode(encoding)


PIPE_WAIT_S = 30.0  # a pipe's writer (`<(...)`, a cron pipeline) writes at once: this long without a byte is none


def _read_stream(fd: int, limit: int, name: str) -> bytes:
    """A pipe's or device's bytes to its end, or limit + 1 of them; PIPE_WAIT_S at most between two reads."""
    chunks, size = [], 0
    while size <= limit:
        if not select.select([fd], [], [], PIPE_WAIT_S)[0]:
            raise OSError(errno.ETIMEDOUT, f"nothing came through it for {PIPE_WAIT_S:g} s", name)
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def report_target(path: Path, suffixes: tuple[str, ...], table: str) -> None:
    """A file a command writes for the user must be named as what it is (.csv, .parquet, .html), lead to a file of
    that kind if it is a link, and lie outside the table: `latest --csv photo.jpg` overwrote the photo, `--csv x.csv`
    (a link to a photo) overwrote the photo it leads to, and `--csv OUT/_delta_log/...json` the table's own log."""
    kinds = " or ".join(suffixes)
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{path}: give a file name ending in {kinds} (an existing file of that name is replaced; "
                         "nothing else is)")
    real = os.path.realpath(path)
    if Path(real).suffix.lower() not in suffixes:
        raise UsageError(f"{path} is a link to {real}, which is no {kinds} file: give another name (the file a link "
                         "leads to is the one replaced)")
    if os.path.isdir(real) or (os.path.lexists(real) and not os.path.isfile(real)):
        raise UsageError(f"cannot write {path}: it is a folder, device or pipe, not a file")
    if "://" not in table:
        folder = os.path.realpath(table)
        if real.startswith(folder.rstrip("/") + "/"):
            raise UsageError(f"{path} lies inside the table {table}: write it elsewhere")


@contextmanager
def writing(path: object) -> Iterator[None]:
    """Writing a file or folder the user named: an OSError (a folder where a file goes, a missing parent folder, no
    permission: exit 2; a full disk, a read-only file system: exit 1) becomes one sentence naming it, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):  # the disk, not the name: exit 1, as a scan
            raise Failed(f"cannot write {path}: {e.strerror or e}") from None
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


@contextmanager
def replacing(path: Path, parents: bool = False) -> Iterator[Path]:
    """Write a file the user named (latest --csv/--parquet, report --html) whole or not at all: the body writes the
    temporary file this yields (.NAME.dogbreed-tmp-RANDOM, beside the file `path` leads to), which then takes that
    file's place in one step (os.replace). So a hard link's other names (a photo) keep their content, a link to a
    .csv elsewhere is updated where it leads, and a failed or stopped write leaves the old file as it was and no
    temporary file (a SIGKILL can leave one, under that name). With `parents`, missing folders are made first.
    An OSError is one sentence, as in writing()."""
    with writing(path):
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        dest = Path(os.path.realpath(path))
        if dest.exists() and not os.access(dest, os.W_OK):  # a file made read-only stays so, as when written in place
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        name = os.fsdecode(os.fsencode(dest.name)[:200])  # the temporary name stays within NAME_MAX
        tmp = dest.with_name(f".{name}.dogbreed-tmp-{secrets.token_hex(6)}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 less the umask, as a new file
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # on disk before it takes the name
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
