"""Running the jobs on a Ray cluster through its Jobs API: ship the project, follow the logs, exit as the job did.

`dogbreed submit scan|train`, `dogbreed jobs`, `dogbreed logs` and `dogbreed stop` call the functions here. Only
an explicit list of project files is shipped (never .env, keys or tokens that happen to lie in the checkout),
and every request to the cluster has a timeout, so a head that accepts connections but never answers costs
one sentence and exit 2, not a hung cron job.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shlex
import shutil
import socket
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.parse import urlsplit

import yaml

from dogbreed.config import ConfigError, ScanConfig, load_config
from dogbreed.errors import Exit, UsageError

JOBS = {"scan": ("jobs/scan.py", "configs/scan.yaml"), "train": ("jobs/train.py", "configs/train.yaml")}

# What is shipped: these project files and folders, and in the folders only files of these kinds (no hidden
# names). Anything else in the checkout (.env, .aws/, id_rsa, token files, outputs, tests) stays here.
SHIPPED = ("pyproject.toml", "dogbreed", "jobs", "configs")
SHIPPED_SUFFIXES = (".py", ".yaml", ".yml", ".j2", ".md", ".jpg", ".png")
REQUEST_TIMEOUT_S = 30.0  # every request to the cluster: connecting, and waiting for each answer
HEARTBEAT_S = 30.0  # following logs: a head that stops answering pings is given up after about this long


_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own, in Ray's order of precedence


class SubmitError(UsageError):
    """The job could not be submitted or looked up (no address, cluster unreachable, bad config, too few GPUs): exit 2,
    nothing ran."""


@dataclass
class JobOutcome:
    """How a submitted job ended; `exit_code` is what `dogbreed submit` exits with."""

    job_id: str
    status: str
    exit_code: int
    message: str = ""


def resolve_address(address: str | None) -> str:
    """The dashboard address: the given one, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    for value in (address, *(os.environ.get(v) for v in _ADDRESS_VARS)):
        if value:
            return value if "://" in value else f"http://{value}"
    raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")


def _auth_headers(token: str | None) -> dict[str, str] | None:
    """A bearer token for clusters started with RAY_AUTH_MODE=token.

    Ray's client adds the token itself only when this process has RAY_AUTH_MODE=token; a token given
    here or in $RAY_AUTH_TOKEN is sent either way (a cluster without authentication ignores it).
    """
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else None


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    # JobSubmissionClient lets $RAY_ADDRESS override an explicit address; an explicit --address must win.
    saved = {v: os.environ.pop(v) for v in _ADDRESS_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, token: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
    """A JobSubmissionClient for the cluster whose every request times out after timeout_s, or SubmitError
    naming the address it could not reach."""
    import requests
    from ray.exceptions import AuthenticationError

    url = resolve_address(address)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"cluster address {url} is not a dashboard URL like http://HEAD:8265")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # a quick probe, for a clear message when nothing listens
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {url} ({e.strerror or e}); "
                          "is the head running and its dashboard port open to you?") from None
    try:
        with _address_env_cleared():
            return _client_class()(url, headers=_auth_headers(token), timeout_s=timeout_s)
    except AuthenticationError:
        raise SubmitError(f"the cluster at {url} requires a token: set RAY_AUTH_TOKEN (or RAY_AUTH_MODE=token "
                          "with ~/.ray/auth_token) to the cluster's token") from None
    except SubmitError:
        raise
    except requests.exceptions.Timeout:
        raise SubmitError(_silent(url, timeout_s)) from None
    except (ConnectionError, RuntimeError, requests.exceptions.RequestException) as e:
        raise SubmitError(f"the Ray dashboard at {url} did not answer as a Jobs API: {e}") from None


def _silent(url: str, timeout_s: float) -> str:
    return (f"the Ray dashboard at {url} accepted the connection but did not answer within {timeout_s:g} s; "
            "is it overloaded, or is something else listening on that port?")


@functools.cache
def _client_class():
    """JobSubmissionClient with a timeout on every request (Ray's own has none) and a heartbeat on the log tail."""
    import aiohttp
    import requests
    from ray.job_submission import JobSubmissionClient

    class TimedClient(JobSubmissionClient):
        def __init__(self, *args: Any, timeout_s: float = REQUEST_TIMEOUT_S, **kwargs: Any):
            self.timeout_s = timeout_s
            super().__init__(*args, **kwargs)

        def _do_request(self, method: str, endpoint: str, **kwargs: Any):
            kwargs.setdefault("timeout", (self.timeout_s, self.timeout_s))
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.exceptions.Timeout:
                raise SubmitError(_silent(self._address, self.timeout_s)) from None

        async def tail_job_logs(self, job_id: str):
            timeout = aiohttp.ClientTimeout(sock_connect=self.timeout_s, sock_read=self.timeout_s)
            async with aiohttp.ClientSession(cookies=self._cookies, headers=self._headers, timeout=timeout) as session:
                ws = await session.ws_connect(f"{self._address}/api/jobs/{job_id}/logs/tail", headers=self._headers,
                                              ssl=self._ssl_context, heartbeat=HEARTBEAT_S)
                async for msg in ws:  # ends when the head closes the stream, or stops answering the heartbeat
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        yield msg.data
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        break

    return TimedClient


def project_root() -> Path:
    """The folder holding jobs/ and configs/: beside the dogbreed package (editable install), else the cwd."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "jobs" / "scan.py").is_file() and (candidate / "dogbreed").is_dir():
            return candidate
    raise SubmitError("cannot find the project folder (with jobs/ and dogbreed/): run this from your checkout")


def _overrides(args: list[str]) -> dict[str, Any]:
    """The GPU-related options among pass-through `dogbreed train` arguments (--gpu/--cpu, --workers N)."""
    found: dict[str, Any] = {}
    for i, a in enumerate(args):
        if a in ("--gpu", "--cpu"):
            found["use_gpu"] = a == "--gpu"
        elif a == "--workers" and i + 1 < len(args):
            found["num_workers"] = yaml.safe_load(args[i + 1])
        elif a.startswith("--workers="):
            found["num_workers"] = yaml.safe_load(a.partition("=")[2])
    return found


def gpus_wanted(kind: str, config: Path, args: list[str]) -> float:
    """GPUs the job insists on (0 when it adapts to what it finds); also validates the config file locally."""
    if kind == "scan":
        num_gpus = load_config(ScanConfig, config).inference.num_gpus
        return 0.0 if num_gpus == "auto" else float(num_gpus)
    from dogbreed.train.config import TrainConfig

    cfg = load_config(TrainConfig, config, _overrides(args))
    return float(cfg.num_workers) if cfg.use_gpu else 0.0


def cluster_gpus(client) -> float:
    """GPUs on the cluster's alive nodes now, from the dashboard's state API (an autoscaler may add more later)."""
    r = client._do_request("GET", "/api/v0/nodes?limit=10000&detail=true")  # same auth and TLS as the client
    if r.status_code != 200:
        raise SubmitError(f"cannot list the cluster's nodes: HTTP {r.status_code}")
    nodes = r.json()["data"]["result"]["result"]
    return sum(n.get("resources_total", {}).get("GPU", 0) for n in nodes if n.get("state") == "ALIVE")


def entrypoint(kind: str, config: Path, args: list[str], root: Path) -> str:
    """The shell command the cluster runs: the job script with the shipped config and the pass-through args."""
    script, _ = JOBS[kind]
    try:
        rel = config.resolve().relative_to(root)
    except ValueError:
        raise SubmitError(f"config {config} is outside the project folder {root} that is shipped to the cluster; "
                          "put it under configs/") from None
    return shlex.join(["python", script, "--config", rel.as_posix(), *args])


def shipped_files(root: Path, extra: list[Path] = ()) -> list[Path]:
    """The project files a job needs, relative to root: SHIPPED, filtered by SHIPPED_SUFFIXES, plus `extra`."""
    found: set[Path] = set()
    for name in SHIPPED:
        path = root / name
        if path.is_file():
            found.add(Path(name))
        elif path.is_dir():
            for f in path.rglob("*"):
                rel = f.relative_to(root)
                if (f.is_file() and f.suffix in SHIPPED_SUFFIXES and "__pycache__" not in rel.parts
                        and not any(p.startswith(".") for p in rel.parts)):
                    found.add(rel)
    for f in extra:
        found.add(f.resolve().relative_to(root))
    return sorted(found)


@contextmanager
def staged_project(root: Path, extra: list[Path] = ()) -> Iterator[Path]:
    """A temporary folder holding only shipped_files(root): what the cluster receives as the job's working dir."""
    with tempfile.TemporaryDirectory(prefix="dogbreed-ship-") as tmp:
        for rel in shipped_files(root, extra):
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, Path(tmp) / rel)
        yield Path(tmp)


def runtime_env(working_dir: Path) -> dict[str, Any]:
    """The staged project as the job's working dir: it is the driver's cwd and on every worker's PYTHONPATH."""
    return {"working_dir": str(working_dir), "env_vars": {"PYTHONUNBUFFERED": "1"}}


def submit(kind: str, args: list[str], address: str | None = None, config: str | Path | None = None,
           follow: bool = True, token: str | None = None, out: TextIO | None = None,
           timeout_s: float = REQUEST_TIMEOUT_S) -> JobOutcome:
    """Submit `jobs/<kind>.py --config CONFIG ARGS...`; with follow, stream its logs and wait for the outcome."""
    if kind not in JOBS:
        raise SubmitError(f"unknown job {kind!r}: choose one of {', '.join(JOBS)}")
    root = project_root()
    config = Path(config) if config else root / JOBS[kind][1]
    try:
        wanted = gpus_wanted(kind, config, args)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    command = entrypoint(kind, config, args, root)
    client = connect(address, token, timeout_s)
    if wanted and (have := cluster_gpus(client)) < wanted:
        raise SubmitError(f"the config asks for {wanted:g} GPUs but the cluster has {have:g}; "
                          "add GPU workers or set the job to use none")
    job_id = f"dogbreed-{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    with staged_project(root, [config]) as staged:  # uploaded by submit_job, then removed here
        client.submit_job(entrypoint=command, submission_id=job_id, runtime_env=runtime_env(staged),
                          metadata={"dogbreed_job": kind})
    out = out or sys.stdout
    print(f"submitted {job_id}: {command}", file=out, flush=True)
    if not follow:
        return JobOutcome(job_id, "PENDING", Exit.OK, "not followed")
    return follow_job(client, job_id, out)


def follow_job(client, job_id: str, out: TextIO) -> JobOutcome:
    """Stream a job's logs until it ends; Ctrl-C stops following but leaves the job running."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running (dogbreed stop {job_id} stops it)", file=out)
        return JobOutcome(job_id, "RUNNING", Exit.INTERRUPTED, "interrupted")
    except (OSError, asyncio.TimeoutError) as e:  # aiohttp's errors are OSErrors; the head went away
        print(f"\nlost the log stream of {job_id} ({e or type(e).__name__}); it may still be running "
              f"(dogbreed logs {job_id})", file=out)
    return outcome(client, job_id)


def outcome(client, job_id: str) -> JobOutcome:
    """The job's status mapped to an exit code: the driver's own where Ray recorded it."""
    info = client.get_job_info(job_id)
    status = _status(info.status)
    code = getattr(info, "driver_exit_code", None)
    if status == "SUCCEEDED":
        exit_code = code or Exit.OK
    elif status == "FAILED":
        exit_code = code if code else Exit.FAILED
    elif status == "STOPPED":
        exit_code = Exit.STOPPED
    else:
        exit_code = Exit.FAILED
    return JobOutcome(job_id, status, exit_code, info.message or "")


def list_jobs(address: str | None = None, token: str | None = None,
              timeout_s: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
    """The cluster's jobs, newest first: id, status, start time (UTC), entrypoint."""
    rows = []
    for j in connect(address, token, timeout_s).list_jobs():
        started = datetime.fromtimestamp(j.start_time / 1000, timezone.utc) if j.start_time else None
        rows.append({"job_id": j.submission_id or j.job_id, "status": _status(j.status),
                     "started": f"{started:%Y-%m-%d %H:%M:%S}" if started else "", "entrypoint": j.entrypoint})
    return sorted(rows, key=lambda r: r["started"], reverse=True)


def job_logs(job_id: str, address: str | None = None, token: str | None = None,
             timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """A job's logs so far."""
    client = connect(address, token, timeout_s)
    _check_known(client, job_id)
    return client.get_job_logs(job_id)


def stop_job(job_id: str, address: str | None = None, token: str | None = None,
             timeout_s: float = REQUEST_TIMEOUT_S) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    client = connect(address, token, timeout_s)
    _check_known(client, job_id)
    return client.stop_job(job_id)


def _check_known(client, job_id: str) -> None:
    try:
        client.get_job_info(job_id)
    except RuntimeError:
        raise SubmitError(f"the cluster has no job {job_id!r} (see `dogbreed jobs`)") from None


def _status(status: Any) -> str:
    return str(getattr(status, "value", status))
