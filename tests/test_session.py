"""Starting or joining Ray: the Ray version in use is the tested one, and the pin in pyproject.toml says so."""

from __future__ import annotations

import logging
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dogbreed.cluster import session

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_ray_is_the_tested_one_and_pyproject_pins_that_range():
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pinned = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert pinned.specifier == SpecifierSet(session.TESTED_RAY)
    assert "2.64" not in pinned.specifier  # Ray 2.64 removes the remote args that bound the scan's retries
    assert ray.__version__ in pinned.specifier, f"Ray {ray.__version__} is untested: run the full suite, then widen the pin"


def test_an_untested_ray_is_named_in_a_warning(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.70.0")
    with caplog.at_level(logging.WARNING, logger="dogbreed.cluster"):
        assert session.check_ray_version() is False
    assert "Ray 2.70.0 is outside the range dogbreed was tested with" in caplog.text


def test_a_home_where_ray_cannot_keep_its_token_is_one_sentence_not_a_traceback(tmp_path):
    """A real process with HOME=/dev/null (a cron job's account without a home): Ray's token setup raised
    NotADirectoryError and the scan printed Ray's traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HOME": "/dev/null", "RAY_ADDRESS": ""}
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "coffee.png").write_bytes((ROOT / "dogbreed" / "samples" / "coffee.png").read_bytes())
    r = subprocess.run([str(Path(sys.executable).with_name("dogbreed")), "scan", str(tmp_path / "photos"), "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("failed: cannot start a private local Ray: ")
    assert "give a writable HOME" in r.stderr


def test_only_ray_datas_own_console_handler_is_quietened(monkeypatch):
    """The loop also set Ray Data's session log file to ERROR, and any other handler found on ray.data (pytest's log
    capture, left there in a long test session): later tests saw no warnings at all."""
    import ray
    import ray.data  # noqa: F401 - configures Ray Data's handlers

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    data = logging.getLogger("ray.data")
    mine = logging.StreamHandler()
    data.addHandler(mine)
    try:
        assert session.start_ray() is ray.shutdown
        levels = {type(h).__name__: h.level for h in data.handlers}
        assert levels["PlainRayHandler"] == logging.ERROR  # Ray Data's console: errors only
        assert levels.get("SessionFileHandler", logging.NOTSET) < logging.ERROR  # its log file keeps everything
        assert mine.level == logging.NOTSET
    finally:
        data.removeHandler(mine)


def test_a_sigterm_while_ray_starts_unwinds_with_dogbreeds_sentence(tmp_path):
    """SIGTERM in a scan's first seconds met Ray's own handler (installed for ray.init), whose sys.exit(15) passed
    every handler: exit 15, no sentence, no log line, and Ray's agents outliving the run for a minute. A real process
    with dogbreed's handler, signalled while ray.init runs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\n"
            "import ray\n"  # imported before 'starting': the signal then lands in ray.init, not in the import
            "from dogbreed.console import Terminated, stop_on_sigterm\n"
            "from dogbreed.cluster import session\n"
            "stop_on_sigterm()\n"
            "print('starting', flush=True)\n"
            "try:\n"
            "    session.start_ray(num_cpus=1)\n"
            "    print('started', flush=True)\n"
            "except Terminated as e:\n"
            "    print('unwound:', e, ray.is_initialized(), flush=True)\n"
            "    sys.exit(1)\n")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "starting"
        time.sleep(1.0)  # ray.init takes seconds: the signal lands inside it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and out.strip() == "unwound: stopped by SIGTERM False", (proc.returncode, out)


def test_an_address_nothing_answers_at_is_one_sentence_in_seconds():
    """`train --address 127.0.0.1:1` was still retrying after 7 minutes (ray.init waits for a GCS for ever, with a
    warning every 5 s); the scan and relabel join Ray the same way."""
    import socket
    import time

    import pytest

    from dogbreed.errors import Failed

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(Failed, match=rf"^cannot join the Ray cluster at 127.0.0.1:{port}: Connection refused; is the"):
        session.start_ray(f"127.0.0.1:{port}")
    with pytest.raises(Failed, match=rf"^cannot join the Ray cluster at ray://127.0.0.1:{port}: Connection refused"):
        session.start_ray(f"ray://127.0.0.1:{port}")
    with pytest.raises(Failed, match="give HOST:PORT"):
        session.start_ray("head-without-port")
    assert time.monotonic() - t0 < 10
