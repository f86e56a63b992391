"""One run at a time on an output, local or on an object store: a lease lock built on create-if-absent.

The lock is a sequence of small objects ``OUT/_dogbreed/lock/<generation>.json``. Taking it means creating the
next generation with a conditional put (If-None-Match: * on S3, ifGenerationMatch=0 on GCS, a hard link
locally), which exactly one contender can win, and only while the newest generation is released or its lease
has run out. The holder renews its lease from a background thread; a holder that cannot renew in time, or
that sees a newer generation, has lost the lock and its run refuses to commit. A holder on this same host whose
process is gone (SIGKILL, OOM) frees the lock at once; elsewhere its lease has to run out.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dogbreed.store import META_DIR, Location, ScanLocked, StoreError, utcnow

LOCK_DIR = f"{META_DIR}/lock"
RENEWALS_PER_LEASE = 4  # renew this often per lease, so a few slow or failed requests do not lose it


class _LocalObjects:
    """The lock folder on a local (or NFS) file system: create-if-absent is link(2), which never overwrites."""

    def __init__(self, root: str):
        self.dir = Path(root) / LOCK_DIR

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def get(self, name: str) -> bytes | None:
        try:
            return (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def create(self, name: str, data: bytes) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.dir / name)  # atomic and with its content, unlike O_EXCL + write
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def put(self, name: str, data: bytes) -> None:
        tmp = self.dir / f".{name}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / name)

    def delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)


class _S3Objects:
    """The lock prefix on S3 or an S3-compatible store (AWS_ENDPOINT_URL), through boto3's credential chain."""

    def __init__(self, root: str):
        import boto3
        from botocore.config import Config

        self.bucket, _, prefix = root.partition("/")
        self.prefix = "/".join(p for p in (prefix, LOCK_DIR) if p) + "/"
        # Every request is bounded: a store that stops answering costs the run its lease, not a hang.
        self.s3 = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=15,
                                                   retries={"max_attempts": 3, "mode": "standard"}))

    def names(self) -> list[str]:
        r = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
        return sorted(o["Key"][len(self.prefix):] for o in r.get("Contents", []) if o["Key"].endswith(".json"))

    def get(self, name: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def create(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def put(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)


class _GCSObjects:
    """The lock prefix on Google Cloud Storage (google-cloud-storage, application default credentials)."""

    def __init__(self, root: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise StoreError("gs:// output needs the google-cloud-storage package for its lock "
                             "(pip install 'dogbreed[gcs]')") from None
        bucket, _, prefix = root.partition("/")
        self.prefix = "/".join(p for p in (prefix, LOCK_DIR) if p) + "/"
        self.bucket = storage.Client().bucket(bucket)

    def names(self) -> list[str]:
        return sorted(b.name[len(self.prefix):] for b in self.bucket.list_blobs(prefix=self.prefix, timeout=15)
                      if b.name.endswith(".json"))

    def get(self, name: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(self.prefix + name).download_as_bytes(timeout=15)
        except NotFound:
            return None

    def create(self, name: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.bucket.blob(self.prefix + name).upload_from_string(data, if_generation_match=0, timeout=15)
            return True
        except PreconditionFailed:
            return False

    def put(self, name: str, data: bytes) -> None:
        self.bucket.blob(self.prefix + name).upload_from_string(data, timeout=15)

    def delete(self, name: str) -> None:
        self.bucket.blob(self.prefix + name).delete(timeout=15)


def _objects(loc: Location):
    if not loc.remote:
        return _LocalObjects(loc.root)
    return _S3Objects(loc.root) if loc.uri.startswith("s3://") else _GCSObjects(loc.root)


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


class Lease:
    """A held lock: renews itself in a background thread until released; `lost` once it may have been taken over."""

    def __init__(self, store, generation: int, record: dict, lease_s: float):
        self.store, self.generation, self.record, self.lease_s = store, generation, record, lease_s
        self.renewed = time.monotonic()
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="dogbreed-lock-lease", daemon=True)

    @property
    def lost(self) -> bool:
        if self.lost_reason is None and time.monotonic() - self.renewed > self.lease_s:
            self.lost_reason = f"its lease was not renewed for over {self.lease_s:g} s"
        return self.lost_reason is not None

    def check(self, out: str) -> None:
        """Raise ScanLocked if this lease may no longer be ours (call just before committing)."""
        if self.lost:
            raise ScanLocked(f"this run lost the lock on {out} ({self.lost_reason}); nothing was committed")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            self.renew()

    def renew(self) -> None:
        try:
            newer = [n for n in self.store.names() if n > _name(self.generation)]
            if newer:
                self.lost_reason = f"another run took it over as {newer[-1]}"
                return
            self.store.put(_name(self.generation), _encode({**self.record, "renewed": time.time()}))
            self.renewed = time.monotonic()
        except Exception:  # noqa: BLE001 - a failed renewal is retried; `lost` turns true when the lease runs out
            pass

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lease_s)
        if not self.lost:
            try:
                self.store.put(_name(self.generation), _encode({**self.record, "released": True}))
            except Exception:  # noqa: BLE001 - an unreleased lease simply runs out
                pass


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _holder(record: dict | None) -> str:
    if not record:
        return "unknown holder"
    return f"{record.get('holder', 'unknown holder')}, since {record.get('since', '?')}"


def _alive(record: dict | None, now: float) -> bool:
    if record is None:  # gone, or not a record (creates are atomic with their content, so never half-written)
        return False
    if record.get("released") or now - float(record.get("renewed", 0)) >= float(record.get("lease_s", 0)):
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:  # the kernel knows whether a holder on this machine still exists
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


@contextmanager
def hold(loc: Location, lease_s: float, what: str = "scan") -> Iterator[Lease]:
    """Hold the output's lock for the duration; a second holder is refused at once with ScanLocked."""
    try:
        store = _objects(loc)
        lease = _acquire(store, loc, lease_s, what)
    except (ScanLocked, StoreError):
        raise
    except Exception as e:  # noqa: BLE001 - the store's own errors (network, credentials): one sentence
        raise StoreError(f"cannot take the lock on {loc.out}: {str(e).strip().splitlines()[0] if str(e) else e!r}") from None
    lease._thread.start()
    try:
        yield lease
    finally:
        lease.release()


def _acquire(store, loc: Location, lease_s: float, what: str) -> Lease:
    names = store.names()
    top = int(names[-1].split(".")[0]) if names else 0
    if top:
        record = _parse(store.get(_name(top)))
        if _alive(record, time.time()):
            raise ScanLocked(f"another scan is already running on {loc.out} ({_holder(record)})")
    me = {"holder": f"{what} pid {os.getpid()} on {socket.gethostname()}", "since": utcnow().isoformat(),
          "host": socket.gethostname(), "pid": os.getpid(),
          "renewed": time.time(), "lease_s": lease_s, "released": False}
    if not store.create(_name(top + 1), _encode(me)):
        raise ScanLocked(f"another scan is already running on {loc.out} (it took the lock just now)")
    # A contender with an older listing may have recreated a generation a newer holder had already removed:
    # only the newest generation holds the lock.
    newest = store.names()[-1]
    if newest != _name(top + 1):
        store.delete(_name(top + 1))
        raise ScanLocked(f"another scan is already running on {loc.out} ({_holder(_parse(store.get(newest)))})")
    for name in names:  # earlier generations are over
        try:
            store.delete(name)
        except Exception:  # noqa: BLE001 - they only cost a listing entry
            pass
    return Lease(store, top + 1, me, lease_s)


def _parse(raw: bytes | None) -> dict | None:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def holder(loc: Location) -> dict | None:
    """The record of the lock's current holder (who, since when, its lease), or None while nobody holds it."""
    store = _objects(loc)
    names = store.names()
    record = _parse(store.get(names[-1])) if names else None
    return record if record is not None and _alive(record, time.time()) else None
