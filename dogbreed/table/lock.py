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
from contextlib import contextmanager
from typing import Iterator

from dogbreed.table.location import Location, first_line
from dogbreed.table.objects import objects
from dogbreed.table.store import ScanLocked, StoreError, utcnow

LOCK_DIR = "lock"  # OUT/_dogbreed/lock/<generation>.json
RENEWALS_PER_LEASE = 4  # renew this often per lease, so a few slow or failed requests do not lose it


def _objects(loc: Location):
    return objects(loc.uri, loc.root, LOCK_DIR)


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
    if not isinstance(record, dict):
        return "unknown holder"
    return f"{record.get('holder', 'unknown holder')}, since {record.get('since', '?')}"


def _alive(record: dict | None, now: float) -> bool:
    if record is None:  # gone, or not a record (creates are atomic with their content, so never half-written)
        return False
    if record.get("released") or now - float(record.get("renewed", 0)) >= float(record.get("lease_s", 0)):
        return False
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        try:  # the kernel knows whether a holder on this machine still exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


@contextmanager
def hold(loc: Location, lease_s: float, what: str = "scan", break_lock: bool = False,
         old_layout_ok: bool = False) -> Iterator[Lease]:
    """Claim the output (see :mod:`dogbreed.table.ownership`) and hold its lock for the duration; a second holder is
    refused at once with ScanLocked. `break_lock` takes the lock whatever its record says (a run that held it
    then fails to commit: it sees the newer generation)."""
    from dogbreed.table.ownership import claim

    claim(loc, allow_old_layout=old_layout_ok)
    try:
        store = _objects(loc)
        lease = _acquire(store, loc, lease_s, what, break_lock)
    except (ScanLocked, StoreError):
        raise
    except Exception as e:  # noqa: BLE001 - the disk's or the store's own errors (network, credentials): one sentence
        raise StoreError(f"cannot take the lock on {loc.out}: {first_line(e)}") from None
    lease._thread.start()
    try:
        yield lease
    finally:
        lease.release()


BREAK_HINT = "if no dogbreed run is using it, run again with --break-lock"


def _check_record(raw: bytes | None, name: str, loc: Location, now: float) -> dict | None:
    """The newest generation's record, validated; a malformed or future-dated one is a sentence, never a silent
    block (nor a silent takeover)."""
    if raw is None:
        return None  # removed since the listing: over
    record = _parse(raw)
    where = f"the lock record {loc.out}/_dogbreed/{LOCK_DIR}/{name}"
    fields_ok = (isinstance(record, dict) and isinstance(record.get("renewed"), (int, float))
                 and isinstance(record.get("lease_s"), (int, float)) and not isinstance(record.get("renewed"), bool))
    if not fields_ok:
        raise ScanLocked(f"{where} is malformed; {BREAK_HINT}")
    ahead = float(record["renewed"]) - now
    if ahead > float(record["lease_s"]):
        raise ScanLocked(f"{where} says it was renewed {ahead:.0f} s in the future, beyond its {record['lease_s']:g} s "
                         f"lease (a clock far off, or a tampered record); {BREAK_HINT}")
    return record


def _acquire(store, loc: Location, lease_s: float, what: str, break_lock: bool = False) -> Lease:
    names = store.names()
    top = int(names[-1].split(".")[0]) if names else 0
    if top and not break_lock:
        record = _check_record(store.get(_name(top)), _name(top), loc, time.time())
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
    return record if isinstance(record, dict) and _alive(record, time.time()) else None
