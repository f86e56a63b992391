"""dogbreed.cluster.submit without a cluster: what is shipped (an explicit list, never secrets), and every request to the
cluster timing out, against real servers on 127.0.0.1 that accept connections but never (or only partly) answer.
"""

from __future__ import annotations

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
