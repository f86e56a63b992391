"""Where an output lives: parsing --out into a location (local folder, s3://, gs://), and checking it up front.

A name Delta Lake cannot hold is refused here, before anything is created: it percent-decodes paths and refuses
control characters, and object-store keys keep to AWS's safe characters.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from dogbreed.errors import UsageError

SCHEMES = ("s3", "gs")


class OutputError(UsageError):
    """An --out that cannot be used (an unsupported URI or name, a file, no bucket, no credentials, not a dogbreed
    table); nothing was created."""


@dataclass(frozen=True)
class Location:
    """Where a table lives: its URI for deltalake, and the pyarrow filesystem and path the driver writes through."""

    out: str  # as given
    uri: str  # absolute local path, or scheme://bucket/prefix without a trailing slash
    fs: pafs.FileSystem
    root: str  # the table's folder as a path of `fs`

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def storage_options(self) -> dict[str, str] | None:
        """deltalake reads the standard AWS_* / GOOGLE_* variables itself; an http:// endpoint must be allowed, and its
        retries are bounded (its object store retries a request that gets no answer for 180 s by default: `latest`
        took 3 minutes against a store that accepted connections and never answered)."""
        if not self.remote:
            return None
        options = {"connect_timeout": f"{STORE_CONNECT_S}s", "timeout": f"{STORE_REQUEST_S}s",
                   "retry_timeout": f"{STORE_RETRY_S}s", "max_retries": str(STORE_ATTEMPTS - 1)}
        if self.uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
        return options


# Names Delta Lake's object store cannot hold: it percent-decodes paths (a folder "a%2Fb" would be written as a/b,
# and its data files lost) and refuses control characters (a newline aborts the process).
_BAD_NAME = re.compile(r"%[0-9A-Fa-f]{2}|[\x00-\x1f\x7f]")


# On object stores, keys hold only the characters AWS calls safe: pyarrow cannot parse a URI with a space, and
# Delta Lake would percent-encode what pyarrow writes verbatim.
_SAFE_KEY = re.compile(r"[A-Za-z0-9!_.*'()/=+,@-]*")


def _check_name(out: str, path: str, remote: bool) -> None:
    if remote and not _SAFE_KEY.fullmatch(path):
        odd = next(c for c in path if not _SAFE_KEY.fullmatch(c))
        raise OutputError(f"--out {out!r}: object-store outputs may name only letters, digits and !_.*'()/=+,@- "
                          f"(not {odd!r}), which Delta Lake cannot store in a table path otherwise; give another name")
    bad = _BAD_NAME.search(path)
    if bad:
        what = "a control character" if bad.group(0) < " " or bad.group(0) == "\x7f" else repr(bad.group(0))
        raise OutputError(f"--out {out!r}: its path holds {what}, which Delta Lake cannot store in a table path; "
                          "give another folder name")


GCS_RETRY_S = 15  # Google's client retries a call for 15 minutes by default, deaf to SIGTERM all the while
# An object store that takes the connection and never answers: each request gives up after STORE_REQUEST_S without a
# byte (a slow upload that still moves is not cut), and after STORE_ATTEMPTS tries, so a command ends in well under a
# minute with one sentence (S3's client defaults took 100 s, deltalake's 180 s).
STORE_CONNECT_S, STORE_REQUEST_S, STORE_ATTEMPTS, STORE_RETRY_S = 5, 10, 2, 30


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pafs.FileSystem.from_uri, with a gs:// store's retries bounded (Arrow's retry_limit_seconds URI option, unless
    the URI sets it): an unreachable bucket or missing credentials is an error in seconds, not a hang."""
    parts = urlsplit(uri)
    if parts.scheme not in (*SCHEMES, "gcs", "file"):  # Arrow's own words name no remedy: "Unrecognized filesystem type"
        raise ValueError(f"{parts.scheme}:// is not storage dogbreed can read; give a local path, an s3:// or a gs:// URI")
    if parts.scheme in ("gs", "gcs") and "retry_limit_seconds" not in parts.query:
        uri += ("&" if parts.query else "?") + f"retry_limit_seconds={GCS_RETRY_S}"
    fs, path = pafs.FileSystem.from_uri(uri)
    if parts.scheme == "s3" and not parts.query:  # the same store (region, endpoint as Arrow found them), with bounds
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        fs = pafs.S3FileSystem(region=fs.region or None, endpoint_override=endpoint, connect_timeout=STORE_CONNECT_S,
                               request_timeout=STORE_REQUEST_S,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=STORE_ATTEMPTS))
    return fs, path


def locate(out: str | Path) -> Location:
    """Parse --out into a Location without touching the store (OutputError for an unsupported URI or name)."""
    out = str(out)
    if "://" not in out:
        root = str(Path(out).absolute())
        _check_name(out, root, remote=False)
        return Location(out, root, pafs.LocalFileSystem(), root)
    parts = urlsplit(out)
    if parts.scheme not in SCHEMES:
        raise OutputError(f"--out {out}: {parts.scheme}:// output is not supported; give a local folder, "
                          "an s3:// or a gs:// URI")
    _check_name(out, out.split("://", 1)[1], remote=True)
    if not parts.netloc:
        raise OutputError(f"--out {out} names no bucket")
    prefix = parts.path.strip("/")
    uri = f"{parts.scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")
    try:
        fs, root = filesystem_from_uri(uri)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise OutputError(f"--out {out}: cannot use {parts.scheme}:// storage here ({first_line(e)})") from None
    return Location(out, uri, fs, root.rstrip("/"))


# What a storage failure was, in words, whichever layer reports it: Python's OSError (errno), pyarrow ("[Errno 28]
# ... No space left on device") or deltalake's Rust object store ("Generic LocalFileSystem error: ... (os error 28)").
_STORAGE = {errno.ENOSPC: "no space left on device (the disk is full)", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.EIO: "input/output error (a failing disk or a lost mount?)"}


def storage_errno(e: BaseException) -> int | None:
    """The errno a storage failure stands for, where the error says one (at any layer), else None."""
    code = getattr(e, "errno", None)
    if code in _STORAGE:
        return code
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m and int(m.group(1)) in _STORAGE:
        return int(m.group(1))
    return next((c for c in _STORAGE if os.strerror(c) in text), None)


def first_line(e: BaseException) -> str:
    """One line that says what went wrong: a disk full, a permission or a read-only file system in plain words."""
    code = storage_errno(e)
    if code is not None:
        return _STORAGE[code]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def unwritable(loc: Location, folder: str) -> str | None:
    """Why `folder` of the output cannot be written, or None when a probe file could be
    written there and removed. Tried for real, not by permission bits: root ignores them, a read-only mount or a
    full disk does not show in them."""
    if not loc.remote and not os.path.isdir(loc.path(folder)):
        return None  # nothing to probe yet: it is made next to what the lock already wrote
    probe = loc.path(folder, f".dogbreed-probe-{uuid.uuid4().hex}")
    try:
        with loc.fs.open_output_stream(probe) as f:
            f.write(b"\0" * 4096)  # one page: a full disk refuses it
    except (OSError, pa.ArrowException) as e:
        reason = first_line(e)
    else:
        reason = None
    try:
        loc.fs.delete_file(probe)
    except (OSError, pa.ArrowException):
        pass
    return reason


def check_out(out: str | Path, write: bool = True) -> Location:
    """Refuse an unusable output location before anything is created or started; returns where it is.

    Readers (write=False) need no write access: a read-only table serves `latest`, `report` and `--dry-run`.
    """
    loc = locate(out)
    if not loc.remote:
        path = Path(loc.root)
        if path.exists() and not path.is_dir():
            raise OutputError(f"--out {out} is a file, not a folder")
        parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputError(f"--out {out}: {parent} is a file, not a folder")
        if write and parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            why = "read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
            raise OutputError(f"--out {out}: {parent} is not writable ({why})")
        return loc
    bucket = loc.root.split("/", 1)[0]
    try:  # one request each: is the bucket there, is the prefix not an object; credentials are checked too
        kind = loc.fs.get_file_info(bucket).type
        here = loc.fs.get_file_info(loc.root).type if loc.root != bucket else pafs.FileType.Directory
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"--out {out}: cannot reach the store ({first_line(e)}); check the credentials "
                          "(standard chain, AWS_ENDPOINT_URL for an S3-compatible store)") from None
    if kind == pafs.FileType.NotFound:
        raise OutputError(f"--out {out}: bucket {bucket} does not exist (or these credentials cannot see it)")
    if here == pafs.FileType.File:
        raise OutputError(f"--out {out} is an object, not a prefix")
    return loc
