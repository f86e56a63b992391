"""A Ray cluster's Jobs API, with a bound on every wait: its documented REST endpoints through `requests` (a deadline
for each whole request), the log tail through an aiohttp websocket (a bounded handshake, then a heartbeat), and Ray's
public JobSubmissionClient only to submit a job (it packages and uploads the working dir). Requests and the submission
run in threads the caller stops waiting for at their deadline.

A head that accepts connections but never answers, answers a byte at a time, or answers JSON of another shape costs
one sentence (SubmitError, exit 2), not a hung cron job or a traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote, urlsplit

from dogbreed.errors import UsageError

REQUEST_TIMEOUT_S = 30.0  # every request to the cluster, whole: connecting, sending, and reading the entire answer
MAX_REPLY_BYTES = 256 << 20  # a Jobs API answer (a job list, all nodes, a long job's logs so far) is far smaller
HEARTBEAT_S = 30.0  # following logs: a head that stops answering pings is given up after about this long
SUBMIT_REQUESTS = 4  # submitting is a few requests (version, package check, upload, submit): bounded as many timeouts
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own, in Ray's order of precedence


class SubmitError(UsageError):
    """The job could not be submitted or looked up (no address, cluster unreachable, bad config, too few GPUs): exit 2,
    nothing ran."""


def resolve_address(address: str | None) -> str:
    """The dashboard address: the given one, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    for value in (address, *(os.environ.get(v) for v in _ADDRESS_VARS)):
        if value:
            return value if "://" in value else f"http://{value}"
    raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")


def auth_token(token: str | None = None) -> str | None:
    """The cluster's token (Ray's token authentication): given, $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names,
    or ~/.ray/auth_token when RAY_AUTH_MODE=token; sent as a bearer token (a cluster without authentication ignores it)."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token" if os.environ.get("RAY_AUTH_MODE") == "token" else None)
    if not token and path and Path(path).is_file():
        token = Path(path).read_text(encoding="utf-8").strip()
    return token or None


def _silent(url: str, timeout_s: float) -> str:
    return (f"the Ray dashboard at {url} accepted the connection but did not answer within {timeout_s:g} s; "
            "is it overloaded, or is something else listening on that port?")


def _odd(url: str) -> SubmitError:
    return SubmitError(f"the dashboard at {url} answered something that is not a Ray Jobs API reply; "
                       "is --address the Ray dashboard (http://HEAD:8265) of a supported Ray?")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Cluster:
    """One Ray dashboard's Jobs API (https://docs.ray.io/en/latest/cluster/running-applications/job-submission/rest.html)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """One request, whole (connecting, sending, every byte of the answer) within timeout_s: (status, body).

        requests' own timeout bounds each read only, so a head that answers a byte at a time would never time
        out; the request runs in a daemon thread that is abandoned at the deadline (it stops at its next chunk)."""
        import requests

        state: dict[str, Any] = {}

        def fetch() -> tuple[int, bytes]:
            with requests.request(method, self.url + path, headers=self.headers, stream=True,
                                  timeout=(self.timeout_s, self.timeout_s), **kwargs) as r:
                state["status"] = r.status_code
                body = bytearray()
                for chunk in r.iter_content(1 << 16):
                    if state.get("abandoned"):
                        break
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise SubmitError(f"the dashboard at {self.url} answered {path.split('?')[0]} with more than "
                                          f"{MAX_REPLY_BYTES >> 20} MiB; is --address the Ray dashboard?")
                return r.status_code, bytes(body)

        def late() -> SubmitError:
            state["abandoned"] = True
            if "status" in state:
                return SubmitError(f"the Ray dashboard at {self.url} began answering but did not finish within "
                                   f"{self.timeout_s:g} s; is it overloaded, or is something else listening on that port?")
            return SubmitError(_silent(self.url, self.timeout_s))

        try:
            status, body = _bounded(fetch, self.timeout_s, late)
        except requests.exceptions.Timeout:
            raise SubmitError(_silent(self.url, self.timeout_s)) from None
        except requests.exceptions.RequestException as e:
            raise SubmitError(f"lost the connection to the Ray dashboard at {self.url} ({_first_line(e)})") from None
        if status in (401, 403):
            raise SubmitError(f"the cluster at {self.url} requires a token: set RAY_AUTH_TOKEN (or RAY_AUTH_MODE=token "
                              "with ~/.ray/auth_token) to the cluster's token")
        return status, body

    def _json(self, method: str, path: str, what: str, shape: type = dict, **kwargs: Any) -> Any:
        """The answer's JSON, which must be of `shape` (a dict or a list), else one sentence."""
        return self._parse(*self._request(method, path, **kwargs), what, shape)

    def _parse(self, status: int, body: bytes, what: str, shape: type = dict) -> Any:
        if status >= 400:
            text = body.decode("utf-8", "replace").strip()
            raise SubmitError(f"the Ray dashboard at {self.url} could not {what}: HTTP {status} "
                              f"{text.splitlines()[0][:200] if text else ''}".rstrip())
        try:
            data = json.loads(body)
        except ValueError:
            raise SubmitError(f"the Ray dashboard at {self.url} did not answer as a Jobs API (not JSON)") from None
        if not isinstance(data, shape):
            raise _odd(self.url)
        return data

    def check(self) -> dict[str, Any]:
        """The cluster's version, which also proves the address is a Jobs API and the token is accepted."""
        version = self._json("GET", "/api/version", "tell its version")
        if not isinstance(version, dict) or "ray_version" not in version:
            raise SubmitError(f"the Ray dashboard at {self.url} did not answer as a Jobs API")
        return version

    def gpus(self) -> float:
        """GPUs on the cluster's alive nodes now (an autoscaler may add more later)."""
        data = self._json("GET", "/api/v0/nodes?limit=10000&detail=true", "list its nodes")
        nodes = data
        for key in ("data", "result", "result"):  # {"data": {"result": {"result": [node, ...]}}}
            nodes = nodes.get(key) if isinstance(nodes, dict) else None
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise _odd(self.url)
        gpus = [n.get("resources_total") for n in nodes if n.get("state") == "ALIVE"]
        if not all(isinstance(r, dict) and _number(r.get("GPU", 0)) for r in gpus):
            raise _odd(self.url)
        return float(sum(r.get("GPU", 0) for r in gpus))

    def job(self, job_id: str) -> dict[str, Any]:
        status, body = self._request("GET", f"/api/jobs/{quote(job_id)}")
        if status == 404:
            raise SubmitError(f"the cluster has no job {job_id!r} (see `dogbreed jobs`)")
        return self._parse(status, body, f"look up job {job_id!r}")

    def list_jobs(self) -> list[dict[str, Any]]:
        jobs = self._json("GET", "/api/jobs/", "list its jobs", shape=list)
        if not all(isinstance(j, dict) for j in jobs):
            raise _odd(self.url)
        return jobs

    def logs(self, job_id: str) -> str:
        self.job(job_id)
        text = self._json("GET", f"/api/jobs/{quote(job_id)}/logs", "send the job's logs").get("logs", "")
        if not isinstance(text, str):
            raise _odd(self.url)
        return text

    def stop(self, job_id: str) -> bool:
        self.job(job_id)
        return bool(self._json("POST", f"/api/jobs/{quote(job_id)}/stop", "stop the job").get("stopped"))

    def submit(self, **job: Any) -> str:
        """Submit through Ray's JobSubmissionClient (it packages and uploads runtime_env's working_dir), giving up
        after SUBMIT_REQUESTS request timeouts; returns the submission id."""
        from ray.job_submission import JobSubmissionClient

        def call() -> str:
            saved = {v: os.environ.pop(v) for v in _ADDRESS_VARS if v in os.environ}  # an explicit address wins
            try:
                return JobSubmissionClient(self.url, headers=self.headers).submit_job(**job)
            finally:
                os.environ.update(saved)

        try:
            return _bounded(call, SUBMIT_REQUESTS * self.timeout_s, lambda: SubmitError(_silent(self.url, self.timeout_s)))
        except SubmitError:
            raise
        except Exception as e:  # noqa: BLE001 - the client's own errors (HTTP, upload): one sentence
            raise SubmitError(f"the cluster at {self.url} did not take the job: {_first_line(e)}") from None

    async def tail(self, job_id: str) -> AsyncIterator[str]:
        """The job's log lines as they come, until the job ends or the head stops answering the heartbeat. Opening the
        stream (the websocket handshake) takes at most timeout_s; a failure is an OSError with one line."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=self.timeout_s, sock_read=None)
        ws_url = "ws" + self.url[len("http"):] + f"/api/jobs/{quote(job_id)}/logs/tail"
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as session:
            try:  # the handshake as a whole: a head that accepts the upgrade request and never answers it
                ws = await asyncio.wait_for(session.ws_connect(ws_url, heartbeat=HEARTBEAT_S), self.timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"the dashboard did not open it within {self.timeout_s:g} s") from None
            except aiohttp.ClientError as e:
                why = f"HTTP {e.status}" if isinstance(e, aiohttp.ClientResponseError) else _first_line(e)
                raise ConnectionError(f"the dashboard did not open it: {why}") from None
            async with ws:
                try:
                    async for msg in ws:  # ends when the head closes the stream, or stops answering the heartbeat
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            yield msg.data
                        elif msg.type == aiohttp.WSMsgType.ERROR:
                            break
                except aiohttp.ClientError as e:
                    raise ConnectionError(_first_line(e)) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounded(call: Callable[[], Any], seconds: float, on_timeout: Callable[[], Exception]) -> Any:
    """call() in a daemon thread, waiting at most `seconds` (the thread is abandoned, never joined, after that)."""
    done: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            done.put((True, call()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.put((False, e))

    threading.Thread(target=run, name="dogbreed-submit", daemon=True).start()
    try:
        ok, value = done.get(timeout=seconds)
    except queue.Empty:
        raise on_timeout() from None
    if not ok:
        raise value
    return value


def connect(address: str | None = None, token: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> Cluster:
    """The cluster's Jobs API, checked (reachable, a Jobs API, the token accepted), or SubmitError naming the address."""
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
    cluster = Cluster(url, auth_token(token), timeout_s)
    cluster.check()
    return cluster
