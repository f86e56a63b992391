"""Starting or joining Ray, one way for the scan, training and the benchmark."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

from dogbreed.errors import Failed

TESTED_RAY = ">=2.60,<2.61"  # equal to pyproject.toml's pin (a test keeps the two together)


def check_ray_version() -> bool:
    """Whether the installed Ray is one this project was tested with; a warning names it when it is not."""
    import ray
    from packaging.specifiers import SpecifierSet

    if ray.__version__ in SpecifierSet(TESTED_RAY):
        return True
    logging.getLogger("dogbreed.cluster").warning(
        "Ray %s is outside the range dogbreed was tested with (%s); the scan relies on Ray Data's remote args for "
        "bounded retries, which Ray removes in 2.64", ray.__version__, TESTED_RAY)
    return False


def ray_address(address: str | None = None) -> str:
    """The Ray a run uses: `address`, else RAY_ADDRESS, else "local" (a private Ray started for the run)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def is_private(address: str | None = None) -> bool:
    """Whether the run gets a private local Ray: it never grows, so a request it cannot hold is refused up front
    (a cluster joined by address may autoscale: there Ray waits)."""
    return ray_address(address) == "local"


def start_ray(address: str | None = None, num_cpus: int | None = None) -> Callable[[], None] | None:
    """Join `address` (or RAY_ADDRESS), else start a private local Ray: never another user's `ray start`.

    Returns ``ray.shutdown`` when this call started the session, None when Ray was already running here.
    Ray's console output is kept to errors (its own log files keep everything), and a SIGTERM handler
    installed before the call survives it.
    """
    import ray

    check_ray_version()
    if ray.is_initialized():
        return None
    address = ray_address(address)
    _probe(address)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    except SystemExit as e:  # Ray's own handler, installed for the call, turns a SIGTERM into sys.exit(15)
        if e.code != signal.SIGTERM or not _main_thread():
            raise
        ray.shutdown()  # what it had started (dashboard, agents) would otherwise outlive us for a minute
        signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)  # handled as the caller's handler would (dogbreed's unwinds with a sentence)
        raise
    except (OSError, RuntimeError, ValueError) as e:  # ConnectionError and TimeoutError are OSErrors
        logging.getLogger("dogbreed.cluster").info("Ray did not start", exc_info=True)  # the log file keeps the traceback
        home = os.path.expanduser("~")
        hint = (f"; Ray keeps its token and session files under {home} and the temporary folder: give a writable HOME"
                if isinstance(e, OSError) and str(getattr(e, "filename", "") or "").startswith(home) else "")
        where = "a private local Ray" if address == "local" else f"the Ray cluster at {address}"
        raise Failed(f"cannot start {where}: {(str(e).strip() or type(e).__name__).splitlines()[0]}{hint}") from None
    if callable(on_term) and _main_thread():
        signal.signal(signal.SIGTERM, on_term)  # Ray's core worker replaces it with a handler that aborts
    import ray.data  # noqa: F401 - configures Ray Data's logging, which the next lines quieten

    # Ray Data's own console handler shows only errors; its session log file (a plain Handler) keeps everything, and
    # handlers that are not Ray's (the caller's, or a test's log capture) keep their levels.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and type(handler).__module__.startswith("ray."):
            handler.setLevel(logging.ERROR)
    return ray.shutdown


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


PROBE_S = 5.0  # a cluster head that does not take a connection in this long is taken as unreachable


def _probe(address: str) -> None:
    """Refuse an address nothing answers at, in seconds: ray.init retries a GCS that refuses the connection for ever
    (still retrying after 7 minutes), printing a warning every 5 s. `local` and `auto` are Ray's to find."""
    import socket
    from urllib.parse import urlsplit

    if address in ("local", "auto"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number
        host, port = None, None
    if not host or not port:
        raise Failed(f"cannot join the Ray cluster at {address}: give HOST:PORT (its head's GCS port, 6379 by "
                     "default) or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError as e:
        why = "no answer within {:g} s".format(PROBE_S) if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise Failed(f"cannot join the Ray cluster at {address}: {why}; is the cluster up, and is that its head's "
                     "address?") from None
