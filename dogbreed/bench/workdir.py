"""What a benchmark may do in its --workdir: make folders, each marked as its own, and delete only those; and read
the size lists (--files, --rows) that name them. A folder without the mark is never deleted: the run is refused."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dogbreed.errors import Failed, UsageError, writing

MARKER = ".dogbreed-bench"  # written into every folder the benchmark makes and will replace or delete


def _ours(folder: Path) -> bool:
    """A real folder (not a link to one) holding the marker: the benchmark made it."""
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def _refuse(folder: Path) -> UsageError:
    return UsageError(f"{folder} was not made by dogbreed bench (no {MARKER} file in it) and the benchmark would "
                      "replace it: move it away or give another --workdir (bench deletes only folders it made)")


def claim(workdir: Path, names: list[str]) -> None:
    """Make the workdir where needed; refuse the run before any work when it is not a writable folder, or when a
    folder the run will replace (workdir/NAME) is there and was not made by the benchmark."""
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is a file, not a folder")
    with writing(workdir):  # the default lies in a shared /tmp: another user's folder there is one sentence too
        workdir.mkdir(parents=True, exist_ok=True)
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(workdir))
    for name in names:
        folder = workdir / name
        if (folder.exists() or folder.is_symlink()) and not _ours(folder):
            raise _refuse(folder)


def fresh(folder: Path) -> Path:
    """An empty folder, marked as the benchmark's: one it made before is deleted first, anything else is refused."""
    remove(folder)
    with writing(folder):
        folder.mkdir(parents=True)
        (folder / MARKER).write_text("made by `dogbreed bench`, which deletes this folder when it is done with it\n")
    return folder


def remove(folder: Path) -> None:
    """Delete a folder the benchmark made; refuse (UsageError naming it) one it did not make; nothing there is fine."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if not _ours(folder):
        raise _refuse(folder)
    try:
        shutil.rmtree(folder)
    except OSError as e:
        raise Failed(f"cannot delete the benchmark's folder {folder}: {e.strerror or e}") from None


def tidy(folder: Path) -> None:
    """Cleanup after a run (in a `finally`): delete the folder if the benchmark made it, else leave it as it is."""
    if _ours(folder):
        shutil.rmtree(folder, ignore_errors=True)


def parse_sizes(text: str, option: str, minimum: int, maximum: int | None = None) -> list[int]:
    """`--files 2000,10_000` as [2000, 10000]: whole numbers in [minimum, maximum], at least one; else one sentence."""
    bound = f"at least {minimum:,}" + (f" and at most {maximum:,}" if maximum else "")
    sizes = []
    for part in text.split(","):
        v = part.strip().replace("_", "")
        if not (v.isascii() and v.isdigit()) or not minimum <= int(v) <= (maximum or int(v)):
            raise UsageError(f"{option} {text!r}: give comma-separated whole numbers, each {bound} (e.g. {option} "
                             f"{minimum},{minimum * 10})")
        sizes.append(int(v))
    return sizes
