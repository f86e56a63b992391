"""Running the jobs on a Ray cluster through its Jobs API: ship the project, follow the logs, exit as the job did.

`dogbreed submit scan|train`, `dogbreed jobs`, `dogbreed logs` and `dogbreed stop` call the functions here. Only
an explicit list of project files is shipped (never .env, keys or tokens that happen to lie in the checkout),
and every request to the cluster has a timeout, so a head that accepts connections but never answers costs
one sentence and exit 2, not a hung cron job.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO

import yaml

from dogbreed.cluster.jobs_api import REQUEST_TIMEOUT_S, Cluster, SubmitError, connect
from dogbreed.config import ConfigError, ScanConfig, load_config
from dogbreed.errors import Exit

JOBS = {"scan": ("jobs/scan.py", "configs/scan.yaml"), "train": ("jobs/train.py", "configs/train.yaml")}

# What is shipped: these project files and folders, and in the folders only files of these kinds (no hidden
# names). Anything else in the checkout (.env, .aws/, id_rsa, token files, outputs, tests) stays here.
SHIPPED = ("pyproject.toml", "dogbreed", "jobs", "configs")
SHIPPED_SUFFIXES = (".py", ".yaml", ".yml", ".j2", ".md", ".jpg", ".png")
PACKAGE_DATA = ("dogbreed", ".txt")  # the class lists dogbreed reads (breeds/imagenet1k.txt, breeds/dogapp133.txt)
# A file named like a secret is never shipped, whatever its suffix (configs/aws_credentials.yaml, token.yml, ...).
SECRET_NAME = re.compile(r"secret|credential|passw|token|private|api[_-]?key|id_rsa|id_ed25519|\.env", re.IGNORECASE)

log = logging.getLogger("dogbreed.cluster.submit")


@dataclass
class JobOutcome:
    """How a submitted job ended; `exit_code` is what `dogbreed submit` exits with."""

    job_id: str
    status: str
    exit_code: int
    message: str = ""


def project_root() -> Path:
    """The folder holding jobs/ and configs/: the one holding the dogbreed package (editable install), else the cwd."""
    package = next(p for p in Path(__file__).resolve().parents if p.name == "dogbreed")
    for candidate in (package.parent, Path.cwd()):
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


def entrypoint(kind: str, config: Path, args: list[str], root: Path) -> str:
    """The shell command the cluster runs: the job script with the shipped config and the pass-through args."""
    script, _ = JOBS[kind]
    try:
        rel = config.resolve().relative_to(root)
    except ValueError:
        raise SubmitError(f"config {config} is outside the project folder {root} that is shipped to the cluster; "
                          "put it under configs/") from None
    return shlex.join(["python", script, "--config", rel.as_posix(), *args])


def _shippable(f: Path, root: Path) -> bool:
    """Not named like a secret, and not a link to anything outside the project (its content would leave with it)."""
    if SECRET_NAME.search(f.name):
        log.warning("not shipped: %s is named like a secret", f.relative_to(root))
        return False
    if f.is_symlink() and not f.resolve().is_relative_to(root.resolve()):
        log.warning("not shipped: %s links outside the project", f.relative_to(root))
        return False
    return True


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
                kind = f.suffix in SHIPPED_SUFFIXES or (rel.parts[0], f.suffix) == PACKAGE_DATA
                if (f.is_file() and kind and "__pycache__" not in rel.parts
                        and not any(p.startswith(".") for p in rel.parts) and _shippable(f, root)):
                    found.add(rel)
    for f in extra:
        if SECRET_NAME.search(f.name):
            raise SubmitError(f"config {f} is named like a secret and is not shipped; rename it")
        found.add(f.resolve().relative_to(root.resolve()))
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
    if wanted and (have := client.gpus()) < wanted:
        raise SubmitError(f"the config asks for {wanted:g} GPUs but the cluster has {have:g}; "
                          "add GPU workers or set the job to use none")
    job_id = f"dogbreed-{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    with staged_project(root, [config]) as staged:  # uploaded by the submission, then removed here
        client.submit(entrypoint=command, submission_id=job_id, runtime_env=runtime_env(staged),
                      metadata={"dogbreed_job": kind})
    out = out or sys.stdout
    print(f"submitted {job_id}: {command}", file=out, flush=True)
    if not follow:
        return JobOutcome(job_id, "PENDING", Exit.OK, "not followed")
    return follow_job(client, job_id, out)


def follow_job(client: Cluster, job_id: str, out: TextIO) -> JobOutcome:
    """Stream a job's logs until it ends; Ctrl-C stops following but leaves the job running."""
    async def tail() -> None:
        async for chunk in client.tail(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running (dogbreed stop {job_id} stops it)", file=out)
        return JobOutcome(job_id, "RUNNING", Exit.INTERRUPTED, "interrupted")
    except (OSError, asyncio.TimeoutError) as e:  # Cluster.tail's errors are OSErrors; the head went away
        print(f"\nlost the log stream of {job_id} ({e or type(e).__name__}); it may still be running "
              f"(dogbreed logs {job_id})", file=out)
    try:
        return outcome(client, job_id)
    except SubmitError as e:  # the job was submitted: not exit 2 ("nothing ran"), but a status nobody knows
        return JobOutcome(job_id, "UNKNOWN", Exit.UNFINISHED, f"its status could not be read: {e}")


def outcome(client: Cluster, job_id: str) -> JobOutcome:
    """The job's status mapped to an exit code: the driver's own where Ray recorded it."""
    info = client.job(job_id)
    status = str(info.get("status"))
    code = info.get("driver_exit_code")
    code = code if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255 else None
    if status == "SUCCEEDED":
        exit_code = code or Exit.OK
    elif status == "FAILED":
        exit_code = code if code else Exit.FAILED
    elif status == "STOPPED":
        exit_code = Exit.STOPPED
    else:  # PENDING or RUNNING when following ended: not a failure, a job whose end nobody saw (it may yet succeed)
        exit_code = Exit.UNFINISHED
    return JobOutcome(job_id, status, exit_code, str(info.get("message") or ""))


def list_jobs(address: str | None = None, token: str | None = None,
              timeout_s: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
    """The cluster's jobs, newest first: id, status, start time (UTC), entrypoint."""
    rows = []
    for j in connect(address, token, timeout_s).list_jobs():
        rows.append({"job_id": str(j.get("submission_id") or j.get("job_id")), "status": str(j.get("status")),
                     "started": _started(j.get("start_time")), "entrypoint": str(j.get("entrypoint") or "")})
    return sorted(rows, key=lambda r: r["started"], reverse=True)


def _started(ms: Any) -> str:
    """A job's start time (milliseconds since the epoch) in UTC, or "" where the dashboard gave none it could mean."""
    try:
        return f"{datetime.fromtimestamp(ms / 1000, timezone.utc):%Y-%m-%d %H:%M:%S}" if ms else ""
    except (TypeError, ValueError, OverflowError, OSError):  # not a number, or out of any calendar's range
        return ""


def job_logs(job_id: str, address: str | None = None, token: str | None = None,
             timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """A job's logs so far."""
    return connect(address, token, timeout_s).logs(job_id)


def stop_job(job_id: str, address: str | None = None, token: str | None = None,
             timeout_s: float = REQUEST_TIMEOUT_S) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return connect(address, token, timeout_s).stop(job_id)
