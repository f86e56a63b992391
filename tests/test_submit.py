"""dogbreed.cluster.submit without a cluster: what is shipped (an explicit list, never secrets), and every request to the
cluster timing out, against real servers on 127.0.0.1 that accept connections but never (or only partly) answer.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dogbreed.cli import app
from dogbreed.cluster import submit
from dogbreed.errors import Exit

ROOT = Path(__file__).resolve().parents[1]
SECRETS = [".env", ".aws/credentials", "id_rsa", ".ssh/id_ed25519", "token", "ray_token.txt", "dogbreed/.env",
           "configs/.netrc", "configs/gcp-key.json", "jobs/id_rsa", ".git/config", "out/part-0.parquet",
           "tests/test_x.py", ".venv/bin/python", "dogbreed/__pycache__/x.cpython-311.pyc", "notes.txt",
           "configs/notes.txt", "dogbreed/token.txt"]


def _project(root: Path) -> list[str]:
    """A checkout with the project's files and, beside them, the secrets and clutter a working directory collects."""
    wanted = ["pyproject.toml", "dogbreed/__init__.py", "dogbreed/templates/report.html.j2", "dogbreed/samples/a.jpg",
              "dogbreed/breeds/imagenet1k.txt",
              "jobs/scan.py", "configs/scan.yaml", "configs/cluster.yaml"]
    for rel in wanted + SECRETS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"contents of {rel}\n")
    return sorted(wanted)


def test_only_the_listed_project_files_are_shipped_never_secrets(tmp_path):
    root = tmp_path / "checkout"
    wanted = _project(root)
    assert [p.as_posix() for p in submit.shipped_files(root)] == wanted
    with submit.staged_project(root) as staged:
        env = submit.runtime_env(staged)
        assert Path(env["working_dir"]) == staged
        shipped = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        assert shipped == wanted
        assert (staged / "jobs/scan.py").read_text() == "contents of jobs/scan.py\n"
    assert not staged.exists()  # the staged copy is removed once uploaded


def test_a_config_named_on_the_command_line_is_shipped_too(tmp_path):
    root = tmp_path / "checkout"
    _project(root)
    (root / "nightly").mkdir()
    (root / "nightly" / "scan-s3.yaml").write_text("out: s3://bucket/out\n")
    assert Path("nightly/scan-s3.yaml") in submit.shipped_files(root, [root / "nightly" / "scan-s3.yaml"])


def test_a_link_leaving_the_project_and_files_named_like_secrets_are_never_shipped(tmp_path):
    """A symlink in configs/ to a file outside the checkout used to ship that file's content."""
    root = tmp_path / "checkout"
    wanted = _project(root)
    outside = tmp_path / "home" / "notes.yaml"
    outside.parent.mkdir()
    outside.write_text("aws_secret_access_key: hunter2\n")
    (root / "configs" / "linked.yaml").symlink_to(outside)
    (root / "configs" / "inside.yaml").symlink_to(root / "configs" / "scan.yaml")  # stays in the project: fine
    for name in ("aws_credentials.yaml", "token.yml", "db_password.yaml", "private_key.py"):
        (root / "configs" / name).write_text("x: 1\n")
    shipped = [p.as_posix() for p in submit.shipped_files(root)]
    assert shipped == sorted(wanted + ["configs/inside.yaml"])
    with submit.staged_project(root) as staged:
        assert "hunter2" not in "".join(p.read_text() for p in staged.rglob("*") if p.is_file())
    with pytest.raises(submit.SubmitError, match="named like a secret"):
        submit.shipped_files(root, [root / "configs" / "token.yml"])


def test_no_private_ray_client_api_is_used():
    """The Jobs API is reached through its documented REST endpoints and Ray's public client only."""
    source = "\n".join(p.read_text() for p in (ROOT / "dogbreed").rglob("*.py"))
    for private in ("_do_request", "._cookies", "._headers", "._ssl_context", "iter_internal_ref_bundles"):
        assert private not in source, private


def test_the_real_project_ships_code_and_configs_and_nothing_else():
    shipped = {p.as_posix() for p in submit.shipped_files(ROOT)}
    assert {"pyproject.toml", "dogbreed/table/store.py", "dogbreed/table/lock.py", "jobs/scan.py", "configs/scan.yaml"} <= shipped
    assert {p.split("/")[0] for p in shipped} == {"pyproject.toml", "dogbreed", "jobs", "configs"}
    assert not any(part.startswith(".") for p in shipped for part in p.split("/"))


# --------------------------------------------------------------------------- timeouts


@pytest.fixture
def silent_head():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_a_head_that_accepts_but_never_answers_is_one_sentence_not_a_hang(silent_head):
    t0 = time.monotonic()
    with pytest.raises(submit.SubmitError, match=r"^the Ray dashboard at http://127\.0\.0\.1:\d+ accepted the "
                       r"connection but did not answer within 1 s; is it overloaded"):
        submit.connect(silent_head, timeout_s=1)
    assert time.monotonic() - t0 < 10


def test_submit_to_a_silent_head_exits_2_at_once(silent_head, tmp_path):
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["submit", "scan", str(tmp_path), "--out", "s3://bucket/out", "--address", silent_head,
                                 "--timeout", "1", "--no-follow"])
    assert r.exit_code == Exit.USAGE, r.output
    assert "did not answer within 1 s" in r.output and "Traceback" not in r.output
    assert time.monotonic() - t0 < 20


class _VersionOnly(BaseHTTPRequestHandler):
    """Answers the Jobs client's version check, then hangs on every other request (an overloaded head)."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/api/version":
            body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.server.hung.wait(60)

    do_PUT = do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_every_later_request_times_out_too(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VersionOnly)
    server.hung = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = submit.connect(url, timeout_s=1)  # the version check is answered
        t0 = time.monotonic()
        with pytest.raises(submit.SubmitError, match="did not answer within 1 s"):
            client.list_jobs()
        with pytest.raises(submit.SubmitError, match="did not answer within 1 s"):
            submit.submit("scan", [str(tmp_path), "--out", "s3://bucket/out"], address=url, follow=False, timeout_s=1)
        assert time.monotonic() - t0 < 20
    finally:
        server.hung.set()
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- dashboards that answer oddly


class _OddDashboard(BaseHTTPRequestHandler):
    """A dashboard in one of the hostile tester's modes (as /tmp/probe's fake.py, but each wait ends with the test):
    "trickle" sends /api/version's answer a byte at a time, "wshang" never answers the log websocket's handshake,
    "weird" answers JSON of other shapes, "ok" answers as a Jobs API with a RUNNING job and no log stream."""

    protocol_version = "HTTP/1.1"

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        mode, p = self.server.mode, self.path
        if p.startswith("/api/version") and mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000000")
            self.end_headers()
            self.wfile.write(b'{"ray_version": "2.60.0", "pad": "')
            t0 = time.monotonic()  # a byte every 0.2 s: each read is quick, the whole answer never comes
            while not self.server.stop.wait(0.2) and time.monotonic() - t0 < 8:
                self.wfile.write(b"x")
                self.wfile.flush()
            self.close_connection = True
            return
        if p.startswith("/api/version"):
            return self._send({"ray_version": "2.60.0", "version": "4", "ray_commit": "x", "session_name": "s"})
        if p.endswith("/logs/tail"):
            if mode == "wshang":
                self.server.stop.wait(8)
                self.close_connection = True
                return
            return self._send({}, 404)
        if p.endswith("/logs"):
            return self._send([1, 2] if mode == "weird" else {"logs": "hello\n"})
        if p == "/api/jobs/":
            return self._send({"a": 1} if mode == "weird" else [{"submission_id": None, "start_time": "soon"},
                                                                  {"job_id": "j2", "start_time": 10**30, "status": "RUNNING"}])
        if p.startswith("/api/jobs/"):
            return self._send([1] if mode == "weird" else {"status": "RUNNING", "driver_exit_code": "3"})
        if p.startswith("/api/v0/nodes"):
            return self._send({"data": {}} if mode == "weird" else {"data": {"result": {"result": [
                {"state": "ALIVE", "resources_total": {"GPU": 2}}, {"state": "DEAD", "resources_total": {"GPU": "x"}}]}}})
        return self._send({}, 404)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return self._send(["stopped"] if self.server.mode == "weird" else {"stopped": True})

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard():
    """dashboard(mode) -> the URL of an _OddDashboard on 127.0.0.1, stopped (every wait ended) after the test."""
    servers = []

    def start(mode: str) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _OddDashboard)
        server.mode, server.stop = mode, threading.Event()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()


def test_a_head_answering_a_byte_at_a_time_is_given_up_at_the_deadline(dashboard):
    """requests' timeout bounds each read only: a byte every 0.2 s used to keep `dogbreed jobs` waiting for ever."""
    url = dashboard("trickle")
    t0 = time.monotonic()
    with pytest.raises(submit.SubmitError, match=r"^the Ray dashboard at http://127\.0\.0\.1:\d+ began answering but did "
                       r"not finish within 1 s"):
        submit.connect(url, timeout_s=1)
    assert time.monotonic() - t0 < 4
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["jobs", "--address", url, "--timeout", "1"])
    assert r.exit_code == Exit.USAGE, r.output
    assert "did not finish within 1 s" in r.output and "Traceback" not in r.output
    assert time.monotonic() - t0 < 4


def test_a_log_stream_whose_handshake_never_completes_is_given_up(dashboard):
    """A head that takes the job but never answers the log websocket's upgrade used to hang `submit` after "submitted"."""
    client = submit.Cluster(dashboard("wshang"), timeout_s=1)
    out = io.StringIO()
    t0 = time.monotonic()
    result = submit.follow_job(client, "dogbreed-scan-x", out)
    assert time.monotonic() - t0 < 4
    assert "lost the log stream of dogbreed-scan-x (the dashboard did not open it within 1 s)" in out.getvalue()
    assert (result.status, result.exit_code) == ("RUNNING", Exit.UNFINISHED)  # was 1, "failed", for a job that may yet succeed


def test_a_log_stream_refused_is_one_line_and_the_status_still_read(dashboard):
    out = io.StringIO()
    result = submit.follow_job(submit.Cluster(dashboard("ok"), timeout_s=1), "dogbreed-scan-x", out)
    assert "(the dashboard did not open it: HTTP 404); it may still be running" in out.getvalue()
    assert (result.status, result.exit_code) == ("RUNNING", Exit.UNFINISHED)


@pytest.mark.parametrize("command", [["jobs"], ["logs", "x"], ["stop", "x"]])
def test_json_of_another_shape_is_one_sentence_not_a_traceback(dashboard, command):
    url = dashboard("weird")
    r = CliRunner().invoke(app, [*command, "--address", url, "--timeout", "2"])
    assert r.exit_code == Exit.USAGE, r.output
    assert f"the dashboard at {url} answered something that is not a Ray Jobs API reply" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def test_gpus_and_a_job_status_of_another_shape_are_one_sentence(dashboard):
    client = submit.Cluster(dashboard("weird"), timeout_s=2)
    with pytest.raises(submit.SubmitError, match="not a Ray Jobs API reply"):
        client.gpus()
    result = submit.follow_job(client, "dogbreed-scan-x", io.StringIO())  # submitted: never 2 ("nothing ran")
    assert (result.status, result.exit_code) == ("UNKNOWN", Exit.UNFINISHED)
    assert "not a Ray Jobs API reply" in result.message


def test_odd_fields_in_a_well_shaped_answer_are_shown_as_they_can_be(dashboard):
    url = dashboard("ok")
    assert submit.Cluster(url, timeout_s=2).gpus() == 2.0  # a dead node's odd resources do not count
    rows = submit.list_jobs(url, timeout_s=2)
    assert {(r["job_id"], r["status"], r["started"]) for r in rows} == {("None", "None", ""), ("j2", "RUNNING", "")}
    r = CliRunner().invoke(app, ["jobs", "--address", url, "--timeout", "2"])
    assert r.exit_code == 0 and "j2" in r.output, r.output


def test_a_log_stream_that_opens_is_followed_to_its_end():
    """The bounded handshake still lets a real websocket through: its lines, then the job's status."""
    import asyncio

    from aiohttp import web

    async def tail(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for line in ("scanning\n", "run r1: 3 files\n"):
            await ws.send_str(line)
        await ws.close()
        return ws

    async def job(request):
        return web.json_response({"status": "SUCCEEDED", "driver_exit_code": 3})

    web_app = web.Application()
    web_app.router.add_get("/api/jobs/{id}/logs/tail", tail)
    web_app.router.add_get("/api/jobs/{id}", job)
    loop, ready = asyncio.new_event_loop(), threading.Event()
    runner = web.AppRunner(web_app)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        serve.port = runner.addresses[0][1]  # the port the OS chose
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    assert ready.wait(10)
    try:
        out = io.StringIO()
        result = submit.follow_job(submit.Cluster(f"http://127.0.0.1:{serve.port}", timeout_s=2), "dogbreed-scan-x", out)
        assert out.getvalue() == "scanning\nrun r1: 3 files\n"
        assert (result.status, result.exit_code) == ("SUCCEEDED", 3)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


class _Status:
    def __init__(self, status, code):
        self.info = {"status": status, "driver_exit_code": code, "message": ""}

    def job(self, job_id):
        return self.info


@pytest.mark.parametrize("status, code, exit_code", [
    ("SUCCEEDED", 0, Exit.OK), ("SUCCEEDED", 3, Exit.BAD_PHOTOS), ("FAILED", 4, Exit.REFUSED), ("FAILED", None, Exit.FAILED),
    ("STOPPED", None, Exit.STOPPED), ("RUNNING", None, Exit.UNFINISHED), ("PENDING", None, Exit.UNFINISHED)])
def test_submit_exits_as_the_job_did_and_a_job_not_seen_to_end_is_not_called_failed(status, code, exit_code):
    """A job still running when following ended (the head went quiet) exited 1, "failed", though it may yet succeed."""
    assert submit.outcome(_Status(status, code), "j").exit_code == exit_code
